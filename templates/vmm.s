# Virtual memory: map, unmap and translate through the recursive slot, with page tables of every level taken
# straight from the frame allocator. One source for both architectures: i386's two levels (PD, PT) and x86_64's
# four (PML4, PDPT, PD, PT) are the same loop over LEVELn_SHIFT / LEVELn_ENTRIES (templates/paging.s).
#
# Every paging structure is edited through the recursive window: the entry that maps v at level n is at
# LEVELn_ENTRIES + (v >> LEVELn_SHIFT) * ENTRY_SIZE (paging_entry; ENTRY_OF for the PTE).
#
# A missing table is allocated *at its own address in that window*. The level-n table that holds v's entry appears
# as the page containing that entry, and the page's own PTE is the level n-1 entry pointing at the table. So
# pmm_map_top(page) writes the new frame straight into the entry one level up, and the table is then cleared
# through the same page. Going top-down, PML4 -> PDPT -> PD -> PT, each level's window page is reachable as soon as
# the level above exists. No temp slot, no identity map, no physical-to-virtual lookup and no heap are involved, so
# table growth cannot deadlock on the heap that will later grow through it.
#
# Tables are given back when their last entry goes: after an unmap, each table on v's path is scanned bottom up
# (`repe scas` stops at the first entry still in use), and an empty one is pushed onto the free stack while still
# mapped (pmm_free_at at its window page), which also clears the entry above. No count is kept anywhere, so the
# structure cannot disagree with one; the cost is a scan on unmap, short when the table is in use near its start.
# Never freed: the top table, tables inside the kernel image (the boot stub's), and on x86_64 the kernel half's
# PDPTs.
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
.if ARCH_X86_64
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

# vmm_table_for(vaddr) -> 1 when the page table holding vaddr's PTE exists (made now, with any missing level
# above it, if it did not), 0 when out of memory
vmm_table_for:
    push xbx
    push xdi
    mov ebx, 0x1                                    # the level whose table must exist
.Lfor_level:
    cmp ebx, LEAF_LEVEL
    ja .Lfor_done
    lea xax, [xbx - 1]
    push xax
    push xword ptr [xsp + 4*WORD_SIZE]
    call paging_entry                               # the entry one level up
    add xsp, 2*WORD_SIZE
    test xword ptr [xax], PTE_P
    jnz .Lfor_next
    push xbx
    push xword ptr [xsp + 4*WORD_SIZE]
    call paging_entry                               # the table's entry for vaddr: its page is the table
    add xsp, 2*WORD_SIZE
    mov xdi, xax
    and xdi, -PAGE_SIZE
.if VMM_TABLE_USER
    # Build variant: the entry one level up, pointing at the new table, carries U/S. Ring 3 is then let through
    # at that level for everything the table will map; only the level below still stops it.
    push PTE_P | PTE_RW | PTE_US
.else
    push PTE_P | PTE_RW
.endif
    push xdi
    call pmm_map_top                                # writes the entry one level up
    add xsp, 2*WORD_SIZE
    test xax, xax
    jz .Lfor_no_memory
.if VMM_SKIP_TABLE_CLEAR
    # Build variant: the new table keeps whatever its frame held, and stale words there read as entries.
.else
    xor eax, eax
    mov ecx, PAGE_SIZE / 4
    rep stosd
.endif
.if ARCH_I386
    mov eax, [esp + 0xc]
    cmp eax, KERNEL_HALF_START
    jb .Lfor_next
    inc dword ptr [vmm_kernel_pde_generation]
.endif
.Lfor_next:
    inc ebx
    jmp .Lfor_level
.Lfor_done:
    mov eax, 0x1
    pop xdi
    pop xbx
    ret
.Lfor_no_memory:                                    # give back the levels made for this call
    push xword ptr [xsp + 3*WORD_SIZE]
    call vmm_tables_put
    add xsp, WORD_SIZE
    xor eax, eax
    pop xdi
    pop xbx
    ret

# vmm_tables_put(vaddr): vaddr's page went away; give back every table on its path that is now empty, bottom up
vmm_tables_put:
    push xbx
    push xdi
    mov ebx, LEAF_LEVEL
.Lput_level:
    test ebx, ebx
    jz .Lput_done                                   # the top table stays
.if ARCH_X86_64
    cmp ebx, 0x1
    jne .Lput_table
    mov rdx, KERNEL_HALF_START                      # the kernel half's PDPTs are shared: they stay
    cmp [rsp + 3*WORD_SIZE], rdx
    jae .Lput_done
.Lput_table:
.endif
    push xbx
    push xword ptr [xsp + 4*WORD_SIZE]
    call paging_entry
    add xsp, 2*WORD_SIZE
    mov xdi, xax
    and xdi, -PAGE_SIZE                             # the table, through its window page
    push xdi
    xor eax, eax
    mov ecx, PAGE_SIZE / 4
    repe scasd
    pop xdi
    jne .Lput_done                                  # still in use: so are the tables above
    lea xax, [xbx - 1]
    push xax
    push xword ptr [xsp + 4*WORD_SIZE]
    call paging_entry
    add xsp, 2*WORD_SIZE
    mov xax, [xax]
    mov xdx, PTE_FRAME_MASK
    and xax, xdx
    cmp xax, KERNEL_LOAD_ADDRESS                    # a boot table, inside the image: it stays
    jb .Lput_free
    cmp xax, offset __kernel_end - KERNEL_VIRTUAL_BASE
    jb .Lput_done
.Lput_free:
    push xdi
    call pmm_free_at                                # pushes the table's frame while mapped; clears the entry above
    add xsp, WORD_SIZE
    mov xax, [xsp + 3*WORD_SIZE]
    invlpg [xax]                                    # drop cached entries of the path (INVLPG flushes them)
.if ARCH_I386
    cmp ebx, 0x1
    jne .Lput_next
    cmp dword ptr [esp + 0xc], KERNEL_HALF_START
    jb .Lput_next
    inc dword ptr [vmm_kernel_pde_generation]
.Lput_next:
.endif
    dec ebx
    jmp .Lput_level
.Lput_done:
    pop xdi
    pop xbx
    ret

# vmm_pte_flags(vaddr, flags) -> flags to store: G added in the kernel half (NX kept where entries have it)
vmm_pte_flags:
    mov xax, [xsp + 2*WORD_SIZE]
    mov xdx, PTE_FLAGS_MASK
    and xax, xdx
    mov xdx, KERNEL_HALF_START
    cmp [xsp + WORD_SIZE], xdx
    jb .Lpte_flags_done
    or xax, PTE_G
.Lpte_flags_done:
    ret

# vmm_map(vaddr, phys, flags) -> 1, or 0 when refused (already mapped) or out of memory for a page table
vmm_map:
    push xbx
    mov xbx, [xsp + 2*WORD_SIZE]
    and xbx, -PAGE_SIZE
    push xbx
    call vmm_table_for
    add xsp, WORD_SIZE
    test eax, eax
    jz .Lmap_done
    mov xcx, xbx
    ENTRY_OF xcx, xdx, PAGE_SHIFT, LEAF_ENTRIES
.if VMM_MAP_WRONG_INDEX
    # Build variant: off by one entry. The frame is mapped at vaddr + PAGE_SIZE (or, for a table's last entry, in
    # the next table's window page), vaddr stays unmapped, and vmm_unmap(vaddr) finds nothing to take back.
    add xcx, ENTRY_SIZE
.endif
    test xword ptr [xcx], PTE_P
    jnz .Lmap_present
    push xcx
    push xword ptr [xsp + 5*WORD_SIZE]
    push xbx
    call vmm_pte_flags
    add xsp, 2*WORD_SIZE
    pop xcx
    mov xdx, [xsp + 3*WORD_SIZE]
    and xdx, -PAGE_SIZE
    or xax, xdx
    or xax, PTE_P
    mov [xcx], xax
    invlpg [xbx]
    mov eax, 0x1
.Lmap_done:
    pop xbx
    ret
.Lmap_present:
    push offset str_map_present
    call serial_puts
    push xbx
    call serial_puthex
    push offset str_newline
    call serial_puts
    add xsp, 3*WORD_SIZE
    xor eax, eax
    pop xbx
    ret

# vmm_unmap(vaddr) -> the frame that was mapped there, or VMM_NONE
vmm_unmap:
    push xbx
    mov xbx, [xsp + 2*WORD_SIZE]
    and xbx, -PAGE_SIZE
    push xbx
    call paging_table_present
    add xsp, WORD_SIZE
    test eax, eax
    jz .Lunmap_none
    mov xcx, xbx
    ENTRY_OF xcx, xdx, PAGE_SHIFT, LEAF_ENTRIES
    mov xax, [xcx]
    test eax, PTE_P
    jz .Lunmap_none
    mov xword ptr [xcx], 0x0
.if VMM_UNMAP_SKIP_INVLPG
    # Build variant: no INVLPG. The TLB may keep the old translation, so the CPU still reaches the unmapped frame
    # through vaddr, and after a new vmm_map there it reads and writes the old frame instead of the new one (until
    # something else flushes vaddr: a table given back does).
.else
    invlpg [xbx]
.endif
    mov xdx, PTE_FRAME_MASK
    and xax, xdx
    push xax
    push xbx
    call vmm_tables_put
    add xsp, WORD_SIZE
    pop xax
    pop xbx
    ret
.Lunmap_none:
    mov xax, VMM_NONE
    pop xbx
    ret

# vmm_translate(vaddr) -> physical address, or VMM_NONE. Walks down from the top; an entry with PS maps a large
# page (4 MiB on i386; 2 MiB or 1 GiB on x86_64), whose offset bits come from vaddr.
vmm_translate:
    push xbx
    xor ebx, ebx
.Ltranslate_level:
    push xbx
    push xword ptr [xsp + 3*WORD_SIZE]
    call paging_entry
    add xsp, 2*WORD_SIZE
    mov xax, [xax]
    test eax, PTE_P
    jz .Ltranslate_none
    mov ecx, PAGE_SHIFT
    cmp ebx, LEAF_LEVEL
    je .Ltranslate_page
    inc ebx
    test eax, PTE_PS
    jz .Ltranslate_level
    movzx ecx, byte ptr [paging_level_shift + xbx - 1]
.Ltranslate_page:                                   # xax: the entry, cl: log2 of the page size
    mov xdx, PTE_FRAME_MASK
    and xax, xdx
    shr xax, cl                                     # the frame, without PAT or the low bits of a large page
    shl xax, cl
    mov xdx, -1
    shl xdx, cl
    not xdx
    and xdx, [xsp + 2*WORD_SIZE]                    # the offset within the page
    or xax, xdx
    pop xbx
    ret
.Ltranslate_none:
    mov xax, VMM_NONE
    pop xbx
    ret

# vmm_back_page(vaddr, flags) -> phys, or 0 when out of memory: a cleared frame at vaddr (tables made if needed)
vmm_back_page:
    push xbx
    mov xbx, [xsp + 2*WORD_SIZE]
    and xbx, -PAGE_SIZE
    push xbx
    call vmm_table_for
    add xsp, WORD_SIZE
    test eax, eax
    jz .Lback_done
    push xword ptr [xsp + 3*WORD_SIZE]
    push xbx
    call vmm_pte_flags
    add xsp, 2*WORD_SIZE
    push xax
    push xbx
    call pmm_alloc_at
    add xsp, 2*WORD_SIZE
    test xax, xax
    jnz .Lback_done
    push xbx                                        # no frame for the page: give back tables made for it
    call vmm_tables_put
    add xsp, WORD_SIZE
    xor eax, eax
.Lback_done:
    pop xbx
    ret

# vmm_release_page(vaddr) -> phys: give the frame mapped at vaddr back to the allocator (pushed while still
# mapped), unmap it, and free the tables on its path that this left empty. vaddr must be mapped.
vmm_release_page:
    push xbx
    push xword ptr [xsp + 2*WORD_SIZE]
    call pmm_free_at
    mov xbx, xax
    call vmm_tables_put                             # same argument, still on the stack
    add xsp, WORD_SIZE
    mov xax, xbx
    pop xbx
    ret

# vmm_report_fault(error): "kgen: page fault: not-present write supervisor" (plus "reserved-bit", "fetch")
vmm_report_fault:
    push xbx
    mov xbx, [xsp + 2*WORD_SIZE]
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
    mov xax, [xsp + WORD_SIZE]
    mov eax, [xax]
    ret

# kmem_write32(vaddr, value)
kmem_write32:
    mov xax, [xsp + WORD_SIZE]
    mov xcx, [xsp + 2*WORD_SIZE]
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
