# Virtual memory: map, unmap and translate through the recursive page directory; page tables straight from the
# frame allocator; a kernel virtual-range allocator; demand paging.
#
# Every paging structure is edited through the recursive window: the PD is at RECURSIVE_PD and the page table of
# PD[i] at RECURSIVE_BASE + i*4K, so the PTE of a virtual address v is the dword at RECURSIVE_BASE + (v >> 12)*4.
#
# A missing page table is allocated *at its own address in that window*: the window's page for table i is mapped
# by PD[i] itself, so pmm_map_top(RECURSIVE_BASE + i*4K) writes the new frame into PD[i], and the frame is then
# cleared through the same window. No temp slot and no heap are involved, so table growth cannot deadlock on the
# heap that will later grow through it.
#
# vmm_pt_used[i] counts the present PTEs of table i; when the last goes, the table is pushed back onto the free
# stack while still mapped (pmm_free_at at its window address) and PD[i] cleared. Tables the boot stub built are
# pinned and never freed.
#
# Sharing the kernel half: a kernel page table is referenced by a PDE of index >= KERNEL_PDE_KERNEL_HALF and is
# only ever reached through such PDEs, never through user ones. Another address space shares the kernel half by
# copying those PDEs; every change to one (a table created or freed) bumps vmm_kernel_pde_generation, so an
# address space whose copy is older re-copies the kernel half before it runs. Kernel-half PTEs carry G, so a CR3
# switch keeps them in the TLB.
#
# The range allocator keeps the free part of [VMM_BASE, VMM_END) as a sorted array of (start, pages) ranges,
# merged on release, and live allocations in a second array: fixed-size metadata in .bss, no heap. Releasing
# what overlaps a free range (a double release, or a range never reserved) is reported and refused.

.section .text
vmm_init:
    xor ecx, ecx
.Lvmm_init_pin:
    test dword ptr [RECURSIVE_PD + ecx*4], PTE_P
    jz .Lvmm_init_next
    mov dword ptr [vmm_pt_used + ecx*4], VMM_TABLE_PINNED
.Lvmm_init_next:
    inc ecx
    cmp ecx, I386_ENTRIES
    jb .Lvmm_init_pin
    mov dword ptr [vmm_free_ranges], VMM_BASE
    mov dword ptr [vmm_free_ranges + 0x4], VMM_PAGES
    mov dword ptr [vmm_free_range_count], 0x1
    ret

# vmm_table_for(vaddr) -> 1 when vaddr's page table exists (made now if it did not), 0 when out of memory
vmm_table_for:
    mov eax, [esp + 0x4]
    shr eax, I386_PDE_SHIFT
    test dword ptr [RECURSIVE_PD + eax*4], PTE_P
    jnz .Ltable_exists
    push ebx
    push edi
    mov ebx, eax
    mov edi, ebx
    shl edi, PAGE_SHIFT
    add edi, RECURSIVE_BASE                         # the table's own page in the recursive window
    push PTE_P | PTE_RW
    push edi
    call pmm_map_top                                # writes PD[ebx]
    add esp, 0x8
    test eax, eax
    jz .Ltable_done
.if VMM_CLEAR_TABLES
    xor eax, eax
    mov ecx, PAGE_SIZE / 4
    rep stosd
.endif
    mov dword ptr [vmm_pt_used + ebx*4], 0x0
    cmp ebx, KERNEL_PDE_KERNEL_HALF
    jb .Ltable_user_half
    inc dword ptr [vmm_kernel_pde_generation]
.Ltable_user_half:
    mov eax, 0x1
.Ltable_done:
    pop edi
    pop ebx
    ret
.Ltable_exists:
    mov eax, 0x1
    ret

# vmm_table_put(vaddr): one PTE of vaddr's table went away; free the table when it was the last
vmm_table_put:
    mov eax, [esp + 0x4]
    shr eax, I386_PDE_SHIFT
    dec dword ptr [vmm_pt_used + eax*4]
    jnz .Lput_done
    push ebx
    mov ebx, eax
    shl eax, PAGE_SHIFT
    add eax, RECURSIVE_BASE
    push eax
    call pmm_free_at                                # pushes the table's frame while mapped; clears PD[ebx]
    add esp, 0x4
    mov eax, ebx
    shl eax, I386_PDE_SHIFT
    invlpg [eax]                                    # drop any cached PDE for the region
    cmp ebx, KERNEL_PDE_KERNEL_HALF
    jb .Lput_user_half
    inc dword ptr [vmm_kernel_pde_generation]
.Lput_user_half:
    pop ebx
.Lput_done:
    ret

# vmm_pte_flags(vaddr, flags) -> flags to store: G added in the kernel half
vmm_pte_flags:
    mov eax, [esp + 0x8]
    and eax, PAGE_SIZE - 1
    cmp dword ptr [esp + 0x4], KERNEL_VIRTUAL_BASE
    jb .Lpte_flags_done
    or eax, PTE_G
.Lpte_flags_done:
    ret

# vmm_map(vaddr, phys, flags) -> 1, or 0 when refused (already mapped) or out of memory for a page table
vmm_map:
    push ebx
    mov ebx, [esp + 0x8]
    and ebx, PTE_FRAME_MASK
    push ebx
    call vmm_table_for
    add esp, 0x4
    test eax, eax
    jz .Lmap_done
    mov ecx, ebx
    shr ecx, PAGE_SHIFT
    test dword ptr [RECURSIVE_BASE + ecx*4], PTE_P
    jnz .Lmap_present
    push dword ptr [esp + 0x10]
    push ebx
    call vmm_pte_flags
    add esp, 0x8
    mov edx, [esp + 0xc]
    and edx, PTE_FRAME_MASK
    or eax, edx
    or eax, PTE_P
    mov ecx, ebx
    shr ecx, PAGE_SHIFT
    mov [RECURSIVE_BASE + ecx*4], eax
    invlpg [ebx]
    mov eax, ebx
    shr eax, I386_PDE_SHIFT
    inc dword ptr [vmm_pt_used + eax*4]
    mov eax, 0x1
.Lmap_done:
    pop ebx
    ret
.Lmap_present:
    push offset str_map_present
    call serial_puts
    push ebx
    call serial_puthex
    push offset str_newline
    call serial_puts
    add esp, 0xc
    xor eax, eax
    pop ebx
    ret

# vmm_unmap(vaddr) -> the frame that was mapped there, or VMM_NONE
vmm_unmap:
    push ebx
    mov ebx, [esp + 0x8]
    and ebx, PTE_FRAME_MASK
    mov eax, ebx
    shr eax, I386_PDE_SHIFT
    test dword ptr [RECURSIVE_PD + eax*4], PTE_P
    jz .Lunmap_none
    mov ecx, ebx
    shr ecx, PAGE_SHIFT
    mov eax, [RECURSIVE_BASE + ecx*4]
    test eax, PTE_P
    jz .Lunmap_none
    mov dword ptr [RECURSIVE_BASE + ecx*4], 0x0
    invlpg [ebx]
    and eax, PTE_FRAME_MASK
    push eax
    push ebx
    call vmm_table_put
    add esp, 0x4
    pop eax
    pop ebx
    ret
.Lunmap_none:
    mov eax, VMM_NONE
    pop ebx
    ret

# vmm_translate(vaddr) -> physical address, or VMM_NONE
vmm_translate:
    mov edx, [esp + 0x4]
    mov eax, edx
    shr eax, I386_PDE_SHIFT
    mov eax, [RECURSIVE_PD + eax*4]
    test eax, PTE_P
    jz .Ltranslate_none
    test eax, PTE_PS
    jnz .Ltranslate_large
    mov eax, edx
    shr eax, PAGE_SHIFT
    mov eax, [RECURSIVE_BASE + eax*4]
    test eax, PTE_P
    jz .Ltranslate_none
    and eax, PTE_FRAME_MASK
    and edx, PAGE_SIZE - 1
    or eax, edx
    ret
.Ltranslate_large:
    and eax, -I386_LARGE_PAGE                       # the 4 MiB frame
    and edx, I386_LARGE_PAGE - 1
    or eax, edx
    ret
.Ltranslate_none:
    mov eax, VMM_NONE
    ret

# vmm_back_page(vaddr, flags) -> phys, or 0 when out of memory: a cleared frame at vaddr (table made if needed)
vmm_back_page:
    push ebx
    mov ebx, [esp + 0x8]
    and ebx, PTE_FRAME_MASK
    push ebx
    call vmm_table_for
    add esp, 0x4
    test eax, eax
    jz .Lback_done
    push dword ptr [esp + 0xc]
    push ebx
    call vmm_pte_flags
    add esp, 0x8
    push eax
    push ebx
    call pmm_alloc_at
    add esp, 0x8
    test eax, eax
    jz .Lback_unused_table
    mov ecx, ebx
    shr ecx, I386_PDE_SHIFT
    inc dword ptr [vmm_pt_used + ecx*4]
.Lback_done:
    pop ebx
    ret
.Lback_unused_table:                                # no frame for the page: give back a table made for it
    mov ecx, ebx
    shr ecx, I386_PDE_SHIFT
    cmp dword ptr [vmm_pt_used + ecx*4], 0x0
    jne .Lback_done
    inc dword ptr [vmm_pt_used + ecx*4]
    push ebx
    call vmm_table_put
    add esp, 0x4
    xor eax, eax
    pop ebx
    ret

# vmm_release_page(vaddr) -> phys: give the frame mapped at vaddr back to the allocator (pushed while still
# mapped), unmap it, and free its page table if that was the table's last page. vaddr must be mapped.
vmm_release_page:
    push ebx
    push dword ptr [esp + 0x8]
    call pmm_free_at
    mov ebx, eax
    call vmm_table_put                              # same argument, still on the stack
    add esp, 0x4
    mov eax, ebx
    pop ebx
    ret

# ---- the range allocator -------------------------------------------------------------------------------------

# vrange_reserve(pages) -> start of a free range of that many pages, or 0 (first fit)
vrange_reserve:
    mov edx, [esp + 0x4]
    test edx, edx
    jz .Lreserve_none
    xor ecx, ecx
.Lreserve_scan:
    cmp ecx, [vmm_free_range_count]
    jae .Lreserve_none
    cmp [vmm_free_ranges + ecx*8 + 0x4], edx
    jae .Lreserve_fit
    inc ecx
    jmp .Lreserve_scan
.Lreserve_fit:
    mov eax, [vmm_free_ranges + ecx*8]
    sub [vmm_free_ranges + ecx*8 + 0x4], edx
    jz .Lreserve_remove
    shl edx, PAGE_SHIFT
    add [vmm_free_ranges + ecx*8], edx
    ret
.Lreserve_remove:                                   # the range is used up: close the gap in the array
    push eax
    push ecx
    call vrange_remove_slot
    add esp, 0x4
    pop eax
    ret
.Lreserve_none:
    xor eax, eax
    ret

# vrange_remove_slot(index): drop one entry of the free array
vrange_remove_slot:
    mov ecx, [esp + 0x4]
    dec dword ptr [vmm_free_range_count]
.Lremove_shift:
    cmp ecx, [vmm_free_range_count]
    jae .Lremove_done
    mov eax, [vmm_free_ranges + ecx*8 + 0x8]
    mov [vmm_free_ranges + ecx*8], eax
    mov eax, [vmm_free_ranges + ecx*8 + 0xc]
    mov [vmm_free_ranges + ecx*8 + 0x4], eax
    inc ecx
    jmp .Lremove_shift
.Lremove_done:
    ret

# vrange_release(start, pages) -> 1, or 0 when refused: outside the window, unaligned, overlapping a free range
# (released twice, or never reserved), or no room left in the free array. Merges with both neighbours.
vrange_release:
    push ebx
    push esi
    push edi
    mov ebx, [esp + 0x10]                           # start
    mov esi, [esp + 0x14]                           # pages
    test ebx, PAGE_SIZE - 1
    jnz .Lrelease_bad
    test esi, esi
    jz .Lrelease_bad
    cmp ebx, VMM_BASE
    jb .Lrelease_bad
    cmp esi, VMM_PAGES
    ja .Lrelease_bad
    mov edi, esi
    shl edi, PAGE_SHIFT
    add edi, ebx                                    # end
    jc .Lrelease_bad
    cmp edi, VMM_END
    ja .Lrelease_bad
    xor ecx, ecx                                    # ecx = first free range starting after start
.Lrelease_find:
    cmp ecx, [vmm_free_range_count]
    jae .Lrelease_found
    cmp [vmm_free_ranges + ecx*8], ebx
    ja .Lrelease_found
    inc ecx
    jmp .Lrelease_find
.Lrelease_found:
    test ecx, ecx                                   # the previous range must end at or before start
    jz .Lrelease_no_prev_overlap
    mov eax, [vmm_free_ranges + ecx*8 - 0x4]
    shl eax, PAGE_SHIFT
    add eax, [vmm_free_ranges + ecx*8 - 0x8]
    cmp eax, ebx
    ja .Lrelease_twice
.Lrelease_no_prev_overlap:
    cmp ecx, [vmm_free_range_count]                       # the next range must start at or after end
    jae .Lrelease_no_next_overlap
    cmp [vmm_free_ranges + ecx*8], edi
    jb .Lrelease_twice
.Lrelease_no_next_overlap:
    test ecx, ecx
    jz .Lrelease_try_next
    cmp eax, ebx                                    # previous ends exactly at start: grow it
    jne .Lrelease_try_next
    add [vmm_free_ranges + ecx*8 - 0x4], esi
    cmp ecx, [vmm_free_range_count]
    jae .Lrelease_ok
    cmp [vmm_free_ranges + ecx*8], edi                     # ...and swallow the next one if it touches too
    jne .Lrelease_ok
    mov eax, [vmm_free_ranges + ecx*8 + 0x4]
    add [vmm_free_ranges + ecx*8 - 0x4], eax
    push ecx
    call vrange_remove_slot
    add esp, 0x4
    jmp .Lrelease_ok
.Lrelease_try_next:
    cmp ecx, [vmm_free_range_count]
    jae .Lrelease_insert
    cmp [vmm_free_ranges + ecx*8], edi                     # next starts exactly at end: extend it downwards
    jne .Lrelease_insert
    mov [vmm_free_ranges + ecx*8], ebx
    add [vmm_free_ranges + ecx*8 + 0x4], esi
    jmp .Lrelease_ok
.Lrelease_insert:
    mov edx, [vmm_free_range_count]
    cmp edx, VMM_FREE_SLOTS
    jae .Lrelease_full
.Lrelease_shift_up:
    cmp edx, ecx
    jbe .Lrelease_store
    mov eax, [vmm_free_ranges + edx*8 - 0x8]
    mov [vmm_free_ranges + edx*8], eax
    mov eax, [vmm_free_ranges + edx*8 - 0x4]
    mov [vmm_free_ranges + edx*8 + 0x4], eax
    dec edx
    jmp .Lrelease_shift_up
.Lrelease_store:
    mov [vmm_free_ranges + ecx*8], ebx
    mov [vmm_free_ranges + ecx*8 + 0x4], esi
    inc dword ptr [vmm_free_range_count]
.Lrelease_ok:
    mov eax, 0x1
    jmp .Lrelease_done
.Lrelease_twice:
    push offset str_release_twice
    jmp .Lrelease_report
.Lrelease_full:
    push offset str_release_full
    jmp .Lrelease_report
.Lrelease_bad:
    push offset str_release_bad
.Lrelease_report:
    call serial_puts
    add esp, 0x4
    push ebx
    call serial_puthex
    push offset str_newline
    call serial_puts
    add esp, 0x8
    xor eax, eax
.Lrelease_done:
    pop edi
    pop esi
    pop ebx
    ret

# ---- allocations: ranges backed now or on first touch ----------------------------------------------------------

# vmm_alloc(pages, flags, lazy) -> start address, or 0 (no range, no record slot, or out of memory)
vmm_alloc:
    push ebx
    push esi
    push edi
    xor ebx, ebx                                    # find an empty record
.Lalloc_slot:
    cmp ebx, VMM_ALLOC_SLOTS
    jae .Lalloc_no_slot
    mov eax, ebx
    shl eax, 0x4
    cmp dword ptr [vmm_allocs + eax], 0x0
    je .Lalloc_slot_found
    inc ebx
    jmp .Lalloc_slot
.Lalloc_slot_found:
    lea ebx, [vmm_allocs + eax]
    push dword ptr [esp + 0x10]
    call vrange_reserve
    add esp, 0x4
    test eax, eax
    jz .Lalloc_done
    mov [ebx], eax
    mov ecx, [esp + 0x10]
    mov [ebx + 0x4], ecx
    mov ecx, [esp + 0x14]
    mov [ebx + 0x8], ecx
    mov ecx, [esp + 0x18]
    mov [ebx + 0xc], ecx
    test ecx, ecx
    jnz .Lalloc_ok                                  # lazy: the page-fault handler backs each page
    mov esi, eax                                    # back every page now
    mov edi, [ebx + 0x4]
.Lalloc_back:
    push dword ptr [ebx + 0x8]
    push esi
    call vmm_back_page
    add esp, 0x8
    test eax, eax
    jz .Lalloc_unwind
    add esi, PAGE_SIZE
    dec edi
    jnz .Lalloc_back
.Lalloc_ok:
    mov eax, [ebx]
.Lalloc_done:
    pop edi
    pop esi
    pop ebx
    ret
.Lalloc_unwind:                                     # out of memory part way: give back what was taken
    push dword ptr [ebx]
    call vmm_free
    add esp, 0x4
    xor eax, eax
    jmp .Lalloc_done
.Lalloc_no_slot:
    push offset str_alloc_no_slot
    call serial_puts
    add esp, 0x4
    xor eax, eax
    jmp .Lalloc_done

# vmm_find(vaddr) -> the allocation record containing vaddr, or 0
vmm_find:
    mov edx, [esp + 0x4]
    mov eax, offset vmm_allocs
.Lfind_record:
    cmp eax, offset vmm_allocs + VMM_ALLOC_SLOTS * 0x10
    jae .Lfind_none
    mov ecx, [eax]
    test ecx, ecx
    jz .Lfind_next
    cmp edx, ecx
    jb .Lfind_next
    mov ecx, [eax + 0x4]
    shl ecx, PAGE_SHIFT
    add ecx, [eax]
    cmp edx, ecx
    jb .Lfind_done
.Lfind_next:
    add eax, 0x10
    jmp .Lfind_record
.Lfind_none:
    xor eax, eax
.Lfind_done:
    ret

# vmm_free(vaddr) -> pages given back, or 0 when vaddr is not the start of an allocation (reported)
vmm_free:
    push ebx
    push esi
    push edi
    push dword ptr [esp + 0x10]
    call vmm_find
    add esp, 0x4
    test eax, eax
    jz .Lfree_not_allocation
    mov ebx, eax
    mov esi, [ebx]
    cmp esi, [esp + 0x10]
    jne .Lfree_not_allocation
    mov edi, [ebx + 0x4]
.Lfree_page:
    mov eax, esi
    shr eax, I386_PDE_SHIFT
    test dword ptr [RECURSIVE_PD + eax*4], PTE_P
    jz .Lfree_next_page
    mov eax, esi
    shr eax, PAGE_SHIFT
    test dword ptr [RECURSIVE_BASE + eax*4], PTE_P
    jz .Lfree_next_page
    push esi
    call vmm_release_page
    add esp, 0x4
.Lfree_next_page:
    add esi, PAGE_SIZE
    dec edi
    jnz .Lfree_page
    push dword ptr [ebx + 0x4]
    push dword ptr [ebx]
    call vrange_release
    add esp, 0x8
    mov eax, [ebx + 0x4]
    mov dword ptr [ebx], 0x0
    jmp .Lfree_done
.Lfree_not_allocation:
    push offset str_free_not_allocation
    call serial_puts
    push dword ptr [esp + 0x14]
    call serial_puthex
    push offset str_newline
    call serial_puts
    add esp, 0xc
    xor eax, eax
.Lfree_done:
    pop edi
    pop esi
    pop ebx
    ret

# ---- page faults ----------------------------------------------------------------------------------------------

# vmm_page_fault(cr2, error) -> 1 when the fault was a first touch of a lazy allocation and is now backed
vmm_page_fault:
    test dword ptr [esp + 0x8], PF_P                # a protection fault is never a missing lazy page
    jnz .Lfault_not_ours
    push dword ptr [esp + 0x4]
    call vmm_find
    add esp, 0x4
    test eax, eax
    jz .Lfault_not_ours
    cmp dword ptr [eax + 0xc], 0x0
    je .Lfault_not_ours
    push dword ptr [eax + 0x8]
    push dword ptr [esp + 0x8]
    call vmm_back_page
    add esp, 0x8
    test eax, eax
    jz .Lfault_not_ours
    inc dword ptr [vmm_demand_faults]
    mov eax, 0x1
    ret
.Lfault_not_ours:
    xor eax, eax
    ret

# vmm_report_fault(error): "kgen: page fault: not-present write supervisor" (plus "reserved-bit", "fetch")
vmm_report_fault:
    push ebx
    mov ebx, [esp + 0x8]
    push offset str_pf
    call serial_puts
    mov eax, offset str_pf_not_present
    test ebx, PF_P
    jz .Lpf_p
    mov eax, offset str_pf_protection
.Lpf_p:
    push eax
    call serial_puts
    mov eax, offset str_pf_read
    test ebx, PF_W
    jz .Lpf_w
    mov eax, offset str_pf_write
.Lpf_w:
    push eax
    call serial_puts
    mov eax, offset str_pf_supervisor
    test ebx, PF_U
    jz .Lpf_u
    mov eax, offset str_pf_user
.Lpf_u:
    push eax
    call serial_puts
    add esp, 0x10
    test ebx, PF_RSVD
    jz .Lpf_rsvd
    push offset str_pf_reserved
    call serial_puts
    add esp, 0x4
.Lpf_rsvd:
    test ebx, PF_I
    jz .Lpf_fetch
    push offset str_pf_fetch
    call serial_puts
    add esp, 0x4
.Lpf_fetch:
    push offset str_newline
    call serial_puts
    add esp, 0x4
    pop ebx
    ret

# kmem_read32(vaddr) -> the dword the CPU reads at vaddr (through the page tables, faults included)
kmem_read32:
    mov eax, [esp + 0x4]
    mov eax, [eax]
    ret

# kmem_write32(vaddr, value)
kmem_write32:
    mov eax, [esp + 0x4]
    mov ecx, [esp + 0x8]
    mov [eax], ecx
    ret

.section .rodata
str_map_present:
    .asciz "kgen: vmm_map: already mapped at "
str_release_twice:
    .asciz "kgen: vrange_release: overlaps a free range (released twice, or never reserved) at "
str_release_full:
    .asciz "kgen: vrange_release: free-range table full at "
str_release_bad:
    .asciz "kgen: vrange_release: not a page range inside the vmm window at "
str_alloc_no_slot:
    .asciz "kgen: vmm_alloc: allocation table full\n"
str_free_not_allocation:
    .asciz "kgen: vmm_free: not the start of an allocation: "
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
.balign 4
vmm_pt_used:
    .skip I386_ENTRIES * 4
vmm_free_range_count:
    .skip 0x4
vmm_free_ranges:
    .skip VMM_FREE_SLOTS * 8
vmm_allocs:
    .skip VMM_ALLOC_SLOTS * 0x10
vmm_kernel_pde_generation:
    .skip 0x4
vmm_demand_faults:
    .skip 0x4
