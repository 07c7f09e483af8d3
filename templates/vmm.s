# Virtual memory: map, unmap and translate through the recursive slot, with page tables of every level taken
# straight from the frame allocator. One source for both architectures: i386's two levels (PD, PT) and x86_64's
# four (PML4, PDPT, PD, PT) are the same loop over LEVELn_SHIFT / LEVELn_ENTRIES (templates/paging.s).
#
# Every paging structure is edited through the recursive window, by the routines of templates/paging.s given the
# running space's windows table (paging_level_entries): a missing table is allocated at its own address in that
# window (pt_table_for), and given back when its last entry goes (pt_tables_put). No temp slot, no identity map, no
# physical-to-virtual lookup and no heap are involved, so table growth cannot deadlock on the heap that will later
# grow through it.
#
# Sharing the kernel half. x86_64: vmm_init gives every kernel-half PML4 entry (256..511) its PDPT at boot and
# those are never freed, so another address space shares the whole kernel half by copying 256 PML4 entries once;
# nothing it copied can change later. i386: a kernel page table is referenced by a PDE at or above
# KERNEL_HALF_START >> LEVEL0_SHIFT; every kernel-half PDE change (a table created or freed) bumps vmm_kernel_pde_generation,
# so an address space whose copy is older re-copies the kernel half before it runs. Kernel-half PTEs carry G, so
# a CR3 switch keeps them in the TLB.
#
# The kernel's virtual ranges, allocations backed now or on first touch, and the page-fault path that backs them
# live in templates/vrange.s.

.section .text
vmm_init:
.if KERNEL_HALF_GENERATION == 0
    push rbx
    push rdi
    mov ebx, KERNEL_HALF_FIRST_SLOT
.Linit_slot:
    cmp ebx, TABLE_ENTRIES
    jae .Linit_done
    cmp ebx, RECURSIVE_SLOT
    je .Linit_next
    cmp ebx, FOREIGN_SLOT                           # empty while no space is attached (templates/aspace.s)
    je .Linit_next
    mov rdi, LEVEL0_ENTRIES
    test qword ptr [rdi + rbx*ENTRY_SIZE], PTE_P
    jnz .Linit_next
    mov rdi, rbx                                    # PDPT i appears at LEVEL1_ENTRIES + i pages
    shl rdi, PAGE_SHIFT
    mov rax, LEVEL1_ENTRIES
    add rdi, rax
    push PTE_P | PTE_RW
    push rdi
    call pmm_map_top
    add rsp, 2*WORD_SIZE
    test rax, rax
    jz .Linit_no_memory
    xor eax, eax
    mov ecx, PAGE_SIZE / 4
    rep stosd
.Linit_next:
    inc ebx
    jmp .Linit_slot
.Linit_no_memory:
    push offset str_init_no_memory
    call panic
.Linit_done:
    pop rdi
    pop rbx
.endif
    jmp vrange_init

# vmm_table_for(vaddr) -> pt_table_for in the running space: 1 when the page table holding vaddr's PTE exists
# (made now if it did not), 0 when out of memory, -1 when a large page covers vaddr
vmm_table_for:
    FRAME 0x0
.if VMM_TABLE_USER
    # Build variant: the entry one level up, pointing at the new table, carries U/S. Ring 3 is then let through
    # at that level for everything the table will map; only the level below still stops it.
    PUSHW PTE_P | PTE_RW | PTE_US
.else
    PUSHW PTE_P | PTE_RW
.endif
    PUSHW xword ptr [xsp + ARG1]
    PUSHW offset paging_level_entries
    call pt_table_for
    DROP 0x3
    ret

# vmm_pte_flags(vaddr, flags) -> flags to store: G added in the kernel half (NX kept where entries have it)
vmm_pte_flags:
    FRAME 0x0
    mov xax, [xsp + ARG2]
    mov xdx, PTE_FLAGS_MASK
    and xax, xdx
    mov xdx, KERNEL_HALF_START
    cmp [xsp + ARG1], xdx
    jb .Lpte_flags_done
    or xax, PTE_G
.Lpte_flags_done:
    ret

# vmm_map(vaddr, phys, flags) -> 1, or 0 when refused (already mapped, or inside a large page) or out of memory for
# a page table
vmm_map:
    push xbx
    FRAME 0x1
    mov xbx, [xsp + ARG1]
    and xbx, -PAGE_SIZE
    PUSHW xbx
    call vmm_table_for
    DROP 0x1
    test eax, eax
    jz .Lmap_done
    js .Lmap_present                                # a large page maps vaddr already
    PUSHW xword ptr [xsp + ARG3]
    PUSHW xbx
    call vmm_pte_flags
    DROP 0x2
    mov xdx, [xsp + ARG2]
    and xdx, -PAGE_SIZE
    or xax, xdx
    or xax, PTE_P
    PUSHW xax
    PUSHW xbx
    PUSHW offset paging_level_entries
    call pt_set_leaf
    DROP 0x3
    test eax, eax
    jz .Lmap_present
    invlpg [xbx]
.Lmap_done:
    pop xbx
    ret
.Lmap_present:
    PUSHW xbx
    PUSHW offset str_map_present
    call serial_putline
    DROP 0x2
    xor eax, eax
    pop xbx
    ret

# vmm_unmap(vaddr) -> the frame that was mapped there, or VMM_NONE
vmm_unmap:
    FRAME 0x0
    PUSHW xword ptr [xsp + ARG1]
    PUSHW offset paging_level_entries
    call pt_unmap
    DROP 0x2
    jmp vmm_entry_frame

# vmm_protect(vaddr, flags) -> 1 with the 4 KiB page at vaddr given flags (its frame kept; G added in the kernel
# half, as vmm_map does), or 0 when no such page is mapped there. When rights narrow (writable -> read-only,
# executable -> NX) the entry alone is not enough: the TLB may hold the old translation with the old rights, and
# the CPU goes on using it until INVLPG drops it.
vmm_protect:
    push xbx
    FRAME 0x1
    mov xbx, [xsp + ARG1]
    and xbx, -PAGE_SIZE
    PUSHW xbx
    call paging_table_present
    DROP 0x1
    test eax, eax
    jz .Lprotect_none
    PUSHW LEAF_LEVEL
    PUSHW xbx
    PUSHW offset paging_level_entries
    call pt_entry
    DROP 0x3
    test xword ptr [xax], PTE_P
    jz .Lprotect_none
    PUSHW xax                                       # the PTE's address
    PUSHW xword ptr [xsp + ARG2]
    PUSHW xbx
    call vmm_pte_flags
    DROP 0x2
    POPW xcx
    mov xdx, PTE_FRAME_MASK
    and xdx, [xcx]
    or xax, xdx
    or xax, PTE_P
    mov [xcx], xax
.if VMM_PROTECT_SKIP_INVLPG
    # Build variant: no INVLPG. The CPU may go on writing a page now read-only, or running one now NX, through the
    # translation it cached before.
.else
    invlpg [xbx]
.endif
    mov eax, 0x1
    pop xbx
    ret
.Lprotect_none:
    xor eax, eax
    pop xbx
    ret

# vmm_entry_frame (jumped to, xax: an entry or 0) -> the entry's frame, or VMM_NONE for 0
vmm_entry_frame:
    test xax, xax
    jz .Lentry_frame_none
    mov xdx, PTE_FRAME_MASK
    and xax, xdx
    ret
.Lentry_frame_none:
    mov xax, VMM_NONE
    ret

# vmm_translate(vaddr) -> physical address, or VMM_NONE: pt_translate in the running space
vmm_translate:
    FRAME 0x0
    PUSHW xword ptr [xsp + ARG1]
    PUSHW offset paging_level_entries
    call pt_translate
    DROP 0x2
    ret

# vmm_back_page(vaddr, flags) -> phys, or 0 when out of memory (or inside a large page): a cleared frame at vaddr
# (tables made if needed)
vmm_back_page:
    push xbx
    FRAME 0x1
    mov xbx, [xsp + ARG1]
    and xbx, -PAGE_SIZE
    PUSHW xbx
    call vmm_table_for
    DROP 0x1
    cmp eax, 0x1
    jne .Lback_refused
    PUSHW xword ptr [xsp + ARG2]
    PUSHW xbx
    call vmm_pte_flags
    DROP 0x2
    PUSHW xax
    PUSHW xbx
    call pmm_alloc_at
    DROP 0x2
    test xax, xax
    jnz .Lback_done
    PUSHW xbx                                       # no frame for the page: give back tables made for it
    PUSHW offset paging_level_entries
    call pt_tables_put
    DROP 0x2
.Lback_refused:
    xor eax, eax
.Lback_done:
    pop xbx
    ret

# vmm_release_page(vaddr) -> phys: give the frame mapped at vaddr back to the allocator (pushed while still
# mapped), unmap it, and free the tables on its path that this left empty. vaddr must be mapped.
vmm_release_page:
    push xbx
    FRAME 0x1
    PUSHW xword ptr [xsp + ARG1]
    call pmm_free_at
    mov xbx, xax
    PUSHW offset paging_level_entries               # vaddr is still on the stack: pt_tables_put(windows, vaddr)
    call pt_tables_put
    DROP 0x2
    mov xax, xbx
    pop xbx
    ret

# vmm_report_fault(error): "kgen: page fault: not-present write supervisor" (plus "reserved-bit", "fetch")
vmm_report_fault:
    push xbx
    FRAME 0x1
    mov xbx, [xsp + ARG1]
    push offset str_pf
    call serial_puts
    mov xax, offset str_pf_not_present
    test ebx, PF_P
    jz .Lpf_p
    mov xax, offset str_pf_protection
.Lpf_p:
    push xax
    call serial_puts
    mov xax, offset str_pf_read
    test ebx, PF_W
    jz .Lpf_w
    mov xax, offset str_pf_write
.Lpf_w:
    push xax
    call serial_puts
    mov xax, offset str_pf_supervisor
    test ebx, PF_U
    jz .Lpf_u
    mov xax, offset str_pf_user
.Lpf_u:
    push xax
    call serial_puts
    add xsp, 4*WORD_SIZE
    test ebx, PF_RSVD
    jz .Lpf_rsvd
    push offset str_pf_reserved
    call serial_puts
    add xsp, WORD_SIZE
.Lpf_rsvd:
    test ebx, PF_I
    jz .Lpf_fetch
    push offset str_pf_fetch
    call serial_puts
    add xsp, WORD_SIZE
.Lpf_fetch:
    push offset str_newline
    call serial_puts
    add xsp, WORD_SIZE
    pop xbx
    ret

# kmem_read32(vaddr) -> the dword the CPU reads at vaddr (through the page tables, faults included)
kmem_read32:
    FRAME 0x0
    mov xax, [xsp + ARG1]
    mov eax, [xax]
    ret

# kmem_write32(vaddr, value)
kmem_write32:
    FRAME 0x0
    mov xax, [xsp + ARG1]
    mov xcx, [xsp + ARG2]
    mov [xax], ecx
    ret

.section .rodata
str_init_no_memory:
    .asciz "vmm_init: no frames for the kernel half's PDPTs"
str_map_present:
    .asciz "kgen: vmm_map: already mapped at "
str_pf:
    .asciz "kgen: page fault:"
str_pf_not_present:
    .asciz " not-present"
str_pf_protection:
    .asciz " protection"
str_pf_read:
    .asciz " read"
str_pf_write:
    .asciz " write"
str_pf_supervisor:
    .asciz " supervisor"
str_pf_user:
    .asciz " user"
str_pf_reserved:
    .asciz " reserved-bit"
str_pf_fetch:
    .asciz " fetch"

.section .bss
.balign 4, 0
vmm_kernel_pde_generation:
    .skip 0x4
