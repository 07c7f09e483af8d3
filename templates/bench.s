# Benchmarks for the harness (kgen/bench.py): each routine runs its body n times (n >= 1) between two rdtsc
# reads and returns the delta in edx:eax (the call channel's xdx:xax). Every loop has the same control (dec,
# jnz), so bench_empty's delta is the overhead to subtract. Under TCG with -icount shift=0 the delta counts
# executed instructions; under KVM it counts cycles (of this host's hypervisor, where that is kvm_pvm).
#
# The map/unmap primitive here is private to the benchmark: a PTE store through the recursive window and an
# INVLPG, then the same to clear it, i.e. the least a mapping can cost once its page table exists.

.section .text
# bench_empty(n)
bench_empty:
    push xbx
    mov xbx, [xsp + 2*WORD_SIZE]
    call bench_start
.Lempty_loop:
    dec ebx
    jnz .Lempty_loop
    call bench_stop
    pop xbx
    ret

# bench_alloc_free(n): pmm_alloc then pmm_free of that frame, each reaching the frame through a temp-map slot
bench_alloc_free:
    push xbx
    mov xbx, [xsp + 2*WORD_SIZE]
    call bench_start
.Lalloc_free_loop:
    call pmm_alloc
    push xax
    call pmm_free
    add xsp, WORD_SIZE
    dec ebx
    jnz .Lalloc_free_loop
    call bench_stop
    pop xbx
    ret

# bench_alloc_at_free_at(n, vaddr): pmm_alloc_at(vaddr, RW) then pmm_free_at(vaddr)
bench_alloc_at_free_at:
    push xbx
    push xsi
    mov xbx, [xsp + 3*WORD_SIZE]
    mov xsi, [xsp + 4*WORD_SIZE]
    call bench_start
.Lalloc_at_loop:
    push PTE_RW
    push xsi
    call pmm_alloc_at
    add xsp, 2*WORD_SIZE
    push xsi
    call pmm_free_at
    add xsp, WORD_SIZE
    dec ebx
    jnz .Lalloc_at_loop
    call bench_stop
    pop xsi
    pop xbx
    ret

# bench_map_unmap(n, vaddr, phys): map an already-owned frame at vaddr and unmap it again
bench_map_unmap:
    push xbx
    push xsi
    push xdi
    mov xbx, [xsp + 4*WORD_SIZE]
    call bench_pte_of_arg
    call bench_start
.Lmap_unmap_loop:
    mov [xsi], xdi
    invlpg [xcx]
    mov xword ptr [xsi], 0x0
    invlpg [xcx]
    dec ebx
    jnz .Lmap_unmap_loop
    call bench_stop
    pop xdi
    pop xsi
    pop xbx
    ret

# bench_map_clear_unmap(n, vaddr, phys): as bench_map_unmap, clearing the page while mapped (what any handing
# out of a fresh page costs on top of the mapping, and what pmm_alloc_at does)
bench_map_clear_unmap:
    push xbx
    push xsi
    push xdi
    mov xbx, [xsp + 4*WORD_SIZE]
    call bench_pte_of_arg
    call bench_start
.Lmap_clear_loop:
    mov [xsi], xdi
    invlpg [xcx]
    push xdi
    push xcx
    mov xdi, xcx
    xor eax, eax
    mov ecx, PAGE_SIZE / 4
    rep stosd
    pop xcx
    pop xdi
    mov xword ptr [xsi], 0x0
    invlpg [xcx]
    dec ebx
    jnz .Lmap_clear_loop
    call bench_stop
    pop xdi
    pop xsi
    pop xbx
    ret

# bench_invlpg(n, vaddr)
bench_invlpg:
    push xbx
    mov xbx, [xsp + 2*WORD_SIZE]
    mov xcx, [xsp + 3*WORD_SIZE]
    call bench_start
.Linvlpg_loop:
    invlpg [xcx]
    dec ebx
    jnz .Linvlpg_loop
    call bench_stop
    pop xbx
    ret

# bench_vmm_map_unmap(n, vaddr, phys): vmm_map then vmm_unmap. Whether the page table is made and freed every
# time depends on the caller: it keeps another page of the table mapped, or not.
bench_vmm_map_unmap:
    push xbx
    push xsi
    push xdi
    mov xbx, [xsp + 4*WORD_SIZE]
    mov xsi, [xsp + 5*WORD_SIZE]
    mov xdi, [xsp + 6*WORD_SIZE]
    call bench_start
.Lvmm_map_loop:
    push PTE_P | PTE_RW
    push xdi
    push xsi
    call vmm_map
    add xsp, 3*WORD_SIZE
    push xsi
    call vmm_unmap
    add xsp, WORD_SIZE
    dec ebx
    jnz .Lvmm_map_loop
    call bench_stop
    pop xdi
    pop xsi
    pop xbx
    ret

# bench_demand_fault(n, start): one write to each of n untouched pages of a lazy allocation: n page faults
bench_demand_fault:
    push xbx
    push xsi
    mov xbx, [xsp + 3*WORD_SIZE]
    mov xsi, [xsp + 4*WORD_SIZE]
    call bench_start
.Lfault_loop:
    mov dword ptr [xsi], 0x1
    add xsi, PAGE_SIZE
    dec ebx
    jnz .Lfault_loop
    call bench_stop
    pop xsi
    pop xbx
    ret

# bench_range(n, pages): vrange_reserve(pages) then vrange_release of the same range
bench_range:
    push xbx
    push xsi
    mov xbx, [xsp + 3*WORD_SIZE]
    mov xsi, [xsp + 4*WORD_SIZE]
    call bench_start
.Lrange_loop:
    push xsi
    call vrange_reserve
    add xsp, WORD_SIZE
    push xsi
    push xax
    call vrange_release
    add xsp, 2*WORD_SIZE
    dec ebx
    jnz .Lrange_loop
    call bench_stop
    pop xsi
    pop xbx
    ret

# bench_kmalloc_kfree(n, size, align): kmalloc_aligned then kfree of the block
bench_kmalloc_kfree:
    push xbx
    push xsi
    push xdi
    mov xbx, [xsp + 4*WORD_SIZE]
    mov xsi, [xsp + 5*WORD_SIZE]
    mov xdi, [xsp + 6*WORD_SIZE]
    call bench_start
.Lkmalloc_loop:
    push xdi
    push xsi
    call kmalloc_aligned
    add xsp, 2*WORD_SIZE
    push xax
    call kfree
    add xsp, WORD_SIZE
    dec ebx
    jnz .Lkmalloc_loop
    call bench_stop
    pop xdi
    pop xsi
    pop xbx
    ret

# For the map routines, from their (n, vaddr, phys) arguments: xcx = vaddr, xsi = its PTE through the recursive
# window, xdi = the PTE to store. Called by them right after pushing three registers, so vaddr is at
# xsp + 6*WORD_SIZE.
bench_pte_of_arg:
    mov xcx, [xsp + 6*WORD_SIZE]
    and xcx, -PAGE_SIZE
    mov xsi, xcx
    ENTRY_OF xsi, xdi, PAGE_SHIFT, LEAF_ENTRIES
    mov xdi, [xsp + 7*WORD_SIZE]
    and xdi, -PAGE_SIZE
    or xdi, PTE_P | PTE_RW
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
.balign 8, 0
bench_tsc:
    .skip 0x8
