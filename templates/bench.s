# Benchmarks for the harness (kgen/bench.py): each routine runs its body n times (n >= 1) between two rdtsc
# reads and returns the delta in edx:eax. Every loop has the same control (dec, jnz), so bench_empty's delta is
# the overhead to subtract. Under TCG with -icount shift=0 the delta counts executed instructions; under KVM on
# real hardware it counts cycles.
#
# The map/unmap primitive here is private to the benchmark: a PTE store through the recursive window and an
# INVLPG, then the same to clear it, i.e. the least a mapping can cost once its page table exists.

.section .text
# bench_empty(n)
bench_empty:
    push ebx
    mov ebx, [esp + 0x8]
    call bench_start
.Lempty_loop:
    dec ebx
    jnz .Lempty_loop
    call bench_stop
    pop ebx
    ret

# bench_alloc_free(n): pmm_alloc then pmm_free of that frame, each reaching the frame through a temp-map slot
bench_alloc_free:
    push ebx
    mov ebx, [esp + 0x8]
    call bench_start
.Lalloc_free_loop:
    call pmm_alloc
    push eax
    call pmm_free
    add esp, 0x4
    dec ebx
    jnz .Lalloc_free_loop
    call bench_stop
    pop ebx
    ret

# bench_alloc_at_free_at(n, vaddr): pmm_alloc_at(vaddr, RW) then pmm_free_at(vaddr)
bench_alloc_at_free_at:
    push ebx
    push esi
    mov ebx, [esp + 0xc]
    mov esi, [esp + 0x10]
    call bench_start
.Lalloc_at_loop:
    push PTE_RW
    push esi
    call pmm_alloc_at
    add esp, 0x8
    push esi
    call pmm_free_at
    add esp, 0x4
    dec ebx
    jnz .Lalloc_at_loop
    call bench_stop
    pop esi
    pop ebx
    ret

# bench_map_unmap(n, vaddr, phys): map an already-owned frame at vaddr and unmap it again
bench_map_unmap:
    push ebx
    push esi
    push edi
    mov ebx, [esp + 0x10]
    call bench_pte_of_arg
    call bench_start
.Lmap_unmap_loop:
    mov [esi], edi
    invlpg [ecx]
    mov dword ptr [esi], 0x0
    invlpg [ecx]
    dec ebx
    jnz .Lmap_unmap_loop
    call bench_stop
    pop edi
    pop esi
    pop ebx
    ret

# bench_map_clear_unmap(n, vaddr, phys): as bench_map_unmap, clearing the page while mapped (what any handing
# out of a fresh page costs on top of the mapping, and what pmm_alloc_at does)
bench_map_clear_unmap:
    push ebx
    push esi
    push edi
    mov ebx, [esp + 0x10]
    call bench_pte_of_arg
    call bench_start
.Lmap_clear_loop:
    mov [esi], edi
    invlpg [ecx]
    push edi
    push ecx
    mov edi, ecx
    xor eax, eax
    mov ecx, PAGE_SIZE / 4
    rep stosd
    pop ecx
    pop edi
    mov dword ptr [esi], 0x0
    invlpg [ecx]
    dec ebx
    jnz .Lmap_clear_loop
    call bench_stop
    pop edi
    pop esi
    pop ebx
    ret

# bench_invlpg(n, vaddr)
bench_invlpg:
    push ebx
    mov ebx, [esp + 0x8]
    mov ecx, [esp + 0xc]
    call bench_start
.Linvlpg_loop:
    invlpg [ecx]
    dec ebx
    jnz .Linvlpg_loop
    call bench_stop
    pop ebx
    ret

# bench_vmm_map_unmap(n, vaddr, phys): vmm_map then vmm_unmap. Whether the page table is made and freed every
# time depends on the caller: it keeps another page of the table mapped, or not.
bench_vmm_map_unmap:
    push ebx
    push esi
    push edi
    mov ebx, [esp + 0x10]
    mov esi, [esp + 0x14]
    mov edi, [esp + 0x18]
    call bench_start
.Lvmm_map_loop:
    push PTE_P | PTE_RW
    push edi
    push esi
    call vmm_map
    add esp, 0xc
    push esi
    call vmm_unmap
    add esp, 0x4
    dec ebx
    jnz .Lvmm_map_loop
    call bench_stop
    pop edi
    pop esi
    pop ebx
    ret

# bench_demand_fault(n, start): one write to each of n untouched pages of a lazy allocation: n page faults
bench_demand_fault:
    push ebx
    push esi
    mov ebx, [esp + 0xc]
    mov esi, [esp + 0x10]
    call bench_start
.Lfault_loop:
    mov dword ptr [esi], 0x1
    add esi, PAGE_SIZE
    dec ebx
    jnz .Lfault_loop
    call bench_stop
    pop esi
    pop ebx
    ret

# bench_range(n, pages): vrange_reserve(pages) then vrange_release of the same range
bench_range:
    push ebx
    push esi
    mov ebx, [esp + 0xc]
    mov esi, [esp + 0x10]
    call bench_start
.Lrange_loop:
    push esi
    call vrange_reserve
    add esp, 0x4
    push esi
    push eax
    call vrange_release
    add esp, 0x8
    dec ebx
    jnz .Lrange_loop
    call bench_stop
    pop esi
    pop ebx
    ret

# bench_kmalloc_kfree(n, size, align): kmalloc_aligned then kfree of the block
bench_kmalloc_kfree:
    push ebx
    push esi
    push edi
    mov ebx, [esp + 0x10]
    mov esi, [esp + 0x14]
    mov edi, [esp + 0x18]
    call bench_start
.Lkmalloc_loop:
    push edi
    push esi
    call kmalloc_aligned
    add esp, 0x8
    push eax
    call kfree
    add esp, 0x4
    dec ebx
    jnz .Lkmalloc_loop
    call bench_stop
    pop edi
    pop esi
    pop ebx
    ret

# For the map routines, from their (n, vaddr, phys) arguments: ecx = vaddr, esi = its PTE through the recursive
# window, edi = the PTE to store. Called by them right after pushing three registers, so vaddr is at esp + 0x18.
bench_pte_of_arg:
    mov ecx, [esp + 0x18]
    and ecx, PTE_FRAME_MASK
    mov esi, ecx
    shr esi, PAGE_SHIFT
    lea esi, [RECURSIVE_BASE + esi*4]
    mov edi, [esp + 0x1c]
    and edi, PTE_FRAME_MASK
    or edi, PTE_P | PTE_RW
    ret

# bench_start / bench_stop bracket a loop; they change only eax and edx.
bench_start:
    rdtsc
    mov [bench_tsc], eax
    mov [bench_tsc + 0x4], edx
    ret

bench_stop:
    rdtsc
    sub eax, [bench_tsc]
    sbb edx, [bench_tsc + 0x4]
    ret

.section .bss
.balign 4
bench_tsc:
    .skip 0x8
