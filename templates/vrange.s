# Kernel virtual ranges: which parts of the vmm window [VMM_BASE, VMM_END) are free, allocations made of them
# (backed by frames at once, or lazily on first touch), and the page-fault path that backs a lazy page.
#
# The range allocator keeps the free part of the window as a sorted array of (start, pages) ranges, merged on
# release, and live allocations in a second array: fixed-size metadata in .bss, no heap. Releasing what overlaps a
# free range (a double release, or a range never reserved) is reported and refused. Pages are mapped and unmapped
# through templates/vmm.s.

.section .text
# vrange_init(): the whole window is one free range
vrange_init:
    mov dword ptr [vmm_free_ranges], VMM_BASE
    mov dword ptr [vmm_free_ranges + 0x4], VMM_PAGES
    mov dword ptr [vmm_free_range_count], 0x1
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

.section .rodata
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

.section .bss
.balign 4
vmm_free_range_count:
    .skip 0x4
vmm_free_ranges:
    .skip VMM_FREE_SLOTS * 8
vmm_allocs:
    .skip VMM_ALLOC_SLOTS * 0x10
vmm_demand_faults:
    .skip 0x4
