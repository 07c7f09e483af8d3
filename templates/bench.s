# Benchmarks for the harness (kgen/harness/bench.py): each routine runs its body n times (n >= 1) between two rdtsc
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
    FRAME 0x1
    mov xbx, [xsp + ARG1]
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
    FRAME 0x1
    mov xbx, [xsp + ARG1]
    call bench_start
.Lalloc_free_loop:
    call pmm_alloc
    PUSHW xax
    call pmm_free
    DROP 0x1
    dec ebx
    jnz .Lalloc_free_loop
    call bench_stop
    pop xbx
    ret

# bench_alloc_at_free_at(n, vaddr): pmm_alloc_at(vaddr, RW) then pmm_free_at(vaddr)
bench_alloc_at_free_at:
    push xbx
    push xsi
    FRAME 0x2
    mov xbx, [xsp + ARG1]
    mov xsi, [xsp + ARG2]
    call bench_start
.Lalloc_at_loop:
    PUSHW PTE_RW
    PUSHW xsi
    call pmm_alloc_at
    DROP 0x2
    PUSHW xsi
    call pmm_free_at
    DROP 0x1
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
    FRAME 0x3
    mov xbx, [xsp + ARG1]
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
    FRAME 0x3
    mov xbx, [xsp + ARG1]
    call bench_pte_of_arg
    call bench_start
.Lmap_clear_loop:
    mov [xsi], xdi
    invlpg [xcx]
    PUSHW xdi
    PUSHW xcx
    mov xdi, xcx
    xor eax, eax
    mov ecx, PAGE_SIZE / 4
    rep stosd
    POPW xcx
    POPW xdi
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
    FRAME 0x1
    mov xbx, [xsp + ARG1]
    mov xcx, [xsp + ARG2]
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
    FRAME 0x3
    mov xbx, [xsp + ARG1]
    mov xsi, [xsp + ARG2]
    mov xdi, [xsp + ARG3]
    call bench_start
.Lvmm_map_loop:
    PUSHW PTE_P | PTE_RW
    PUSHW xdi
    PUSHW xsi
    call vmm_map
    DROP 0x3
    PUSHW xsi
    call vmm_unmap
    DROP 0x1
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
    FRAME 0x2
    mov xbx, [xsp + ARG1]
    mov xsi, [xsp + ARG2]
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
    FRAME 0x2
    mov xbx, [xsp + ARG1]
    mov xsi, [xsp + ARG2]
    call bench_start
.Lrange_loop:
    PUSHW xsi
    call vrange_reserve
    DROP 0x1
    PUSHW xsi
    PUSHW xax
    call vrange_release
    DROP 0x2
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
    FRAME 0x3
    mov xbx, [xsp + ARG1]
    mov xsi, [xsp + ARG2]
    mov xdi, [xsp + ARG3]
    call bench_start
.Lkmalloc_loop:
    PUSHW xdi
    PUSHW xsi
    call kmalloc_aligned
    DROP 0x2
    PUSHW xax
    call kfree
    DROP 0x1
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
