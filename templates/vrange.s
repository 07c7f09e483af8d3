# Kernel virtual ranges: which parts of the vmm window [VMM_BASE, VMM_END) are free, allocations made of them
# (backed by frames at once, or lazily on first touch), and the page-fault path that backs a lazy page.
#
# The range allocator keeps the free part of the window as a sorted array of (start, pages) ranges, merged on
# release, and live allocations in a second array: fixed-size metadata in .bss, no heap. Releasing what overlaps a
# free range (a double release, or a range never reserved) is reported and refused. Pages are mapped and unmapped
# through templates/vmm.s.
#
# One source for both word sizes: every field is a word. A free range is (start, pages), 2*WORD_SIZE bytes; an
# allocation record is (start, pages, flags, lazy), 4*WORD_SIZE bytes (flags carry NX, bit 63, on x86_64). Both
# strides exceed what an index scale can express on x86_64, so the arrays are walked with pointers. On x86_64 the
# window's bounds (VMM_BASE...) are no sign-extended 32-bit values: they go through a register, never into an
# immediate or a displacement.

.section .text
# vrange_init(): the whole window is one free range
vrange_init:
    mov xax, VMM_BASE
    mov [vmm_free_ranges], xax
    mov xax, VMM_PAGES
    mov [vmm_free_ranges + WORD_SIZE], xax
    mov dword ptr [vmm_free_range_count], 0x1
    ret

# ---- the range allocator -------------------------------------------------------------------------------------

# vrange_reserve(pages) -> start of a free range of that many pages, or 0 (first fit)
vrange_reserve:
    FRAME 0x0
    mov xdx, [xsp + ARG1]
    test xdx, xdx
    jz .Lreserve_none
    mov xax, offset vmm_free_ranges
    mov ecx, [vmm_free_range_count]
.Lreserve_scan:
    test ecx, ecx
    jz .Lreserve_none
    cmp [xax + WORD_SIZE], xdx
    jae .Lreserve_fit
    add xax, 2*WORD_SIZE
    dec ecx
    jmp .Lreserve_scan
.Lreserve_fit:
    mov xcx, [xax]                                  # the range's start is the answer
    sub [xax + WORD_SIZE], xdx
    jz .Lreserve_remove
    shl xdx, PAGE_SHIFT
    add [xax], xdx
    mov xax, xcx
    ret
.Lreserve_remove:                                   # the range is used up: close the gap in the array
    PUSHW xcx
    PUSHW xax
    call vrange_remove_slot
    DROP 0x1
    pop xax
    ret
.Lreserve_none:
    xor eax, eax
    ret

# vrange_remove_slot(range): drop one entry (its address in vmm_free_ranges) of the free array
vrange_remove_slot:
    FRAME 0x0
    mov xcx, [xsp + ARG1]
    dec dword ptr [vmm_free_range_count]
    mov edx, [vmm_free_range_count]
    shl xdx, WORD_SHIFT + 1
    add xdx, offset vmm_free_ranges                 # the last entry, which moves down by one
.Lremove_shift:
    cmp xcx, xdx
    jae .Lremove_done
    mov xax, [xcx + 2*WORD_SIZE]
    mov [xcx], xax
    mov xax, [xcx + 3*WORD_SIZE]
    mov [xcx + WORD_SIZE], xax
    add xcx, 2*WORD_SIZE
    jmp .Lremove_shift
.Lremove_done:
    ret

# vrange_release(start, pages) -> 1, or 0 when refused: outside the window, unaligned, overlapping a free range
# (released twice, or never reserved), or no room left in the free array. Merges with both neighbours.
vrange_release:
    push xbx
    push xsi
    push xdi
    FRAME 0x3
    mov xbx, [xsp + ARG1]                           # start
    mov xsi, [xsp + ARG2]                           # pages
    test ebx, PAGE_SIZE - 1
    jnz .Lrelease_bad
    test xsi, xsi
    jz .Lrelease_bad
    mov xax, VMM_BASE
    cmp xbx, xax
    jb .Lrelease_bad
    mov xax, VMM_PAGES
    cmp xsi, xax
    ja .Lrelease_bad
    mov xdi, xsi
    shl xdi, PAGE_SHIFT
    add xdi, xbx                                    # end
    jc .Lrelease_bad
    mov xax, VMM_END
    cmp xdi, xax
    ja .Lrelease_bad
    mov xcx, offset vmm_free_ranges                 # xcx = the first free range starting after start
    mov edx, [vmm_free_range_count]
    shl xdx, WORD_SHIFT + 1
    add xdx, xcx                                    # xdx = the end of the array
.Lrelease_find:
    cmp xcx, xdx
    jae .Lrelease_found
    cmp [xcx], xbx
    ja .Lrelease_found
    add xcx, 2*WORD_SIZE
    jmp .Lrelease_find
.Lrelease_found:
    cmp xcx, offset vmm_free_ranges                 # the previous range must end at or before start
    je .Lrelease_no_prev_overlap
    mov xax, [xcx - WORD_SIZE]
    shl xax, PAGE_SHIFT
    add xax, [xcx - 2*WORD_SIZE]                    # xax = the previous range's end
    cmp xax, xbx
    ja .Lrelease_twice
.Lrelease_no_prev_overlap:
    cmp xcx, xdx                                    # the next range must start at or after end
    jae .Lrelease_no_next_overlap
    cmp [xcx], xdi
    jb .Lrelease_twice
.Lrelease_no_next_overlap:
    cmp xcx, offset vmm_free_ranges
    je .Lrelease_try_next
    cmp xax, xbx                                    # previous ends exactly at start: grow it
    jne .Lrelease_try_next
    add [xcx - WORD_SIZE], xsi
    cmp xcx, xdx
    jae .Lrelease_ok
    cmp [xcx], xdi                                  # ...and swallow the next one if it touches too
    jne .Lrelease_ok
    mov xax, [xcx + WORD_SIZE]
    add [xcx - WORD_SIZE], xax
    PUSHW xcx
    call vrange_remove_slot
    DROP 0x1
    jmp .Lrelease_ok
.Lrelease_try_next:
    cmp xcx, xdx
    jae .Lrelease_insert
    cmp [xcx], xdi                                  # next starts exactly at end: extend it downwards
    jne .Lrelease_insert
.if VRANGE_BAD_MERGE
    # Build variant: the next range takes the released pages' count but keeps its start, so it claims pages past
    # its own end (beyond the window, or inside a live allocation) while the released pages are lost.
.else
    mov [xcx], xbx
.endif
    add [xcx + WORD_SIZE], xsi
    jmp .Lrelease_ok
.Lrelease_insert:
    cmp dword ptr [vmm_free_range_count], VMM_FREE_SLOTS
    jae .Lrelease_full
.Lrelease_shift_up:                                 # move the ranges from xcx on up by one, last first
    cmp xdx, xcx
    jbe .Lrelease_store
    mov xax, [xdx - 2*WORD_SIZE]
    mov [xdx], xax
    mov xax, [xdx - WORD_SIZE]
    mov [xdx + WORD_SIZE], xax
    sub xdx, 2*WORD_SIZE
    jmp .Lrelease_shift_up
.Lrelease_store:
    mov [xcx], xbx
    mov [xcx + WORD_SIZE], xsi
    inc dword ptr [vmm_free_range_count]
.Lrelease_ok:
    mov eax, 0x1
    jmp .Lrelease_done
.Lrelease_twice:
    PUSHW offset str_release_twice
    jmp .Lrelease_report
.Lrelease_full:
    FRAME 0x3
    PUSHW offset str_release_full
    jmp .Lrelease_report
.Lrelease_bad:
    FRAME 0x3
    PUSHW offset str_release_bad
.Lrelease_report:
    call serial_puts
    DROP 0x1
    PUSHW xbx
    call serial_puthex
    PUSHW offset str_newline
    call serial_puts
    DROP 0x2
    xor eax, eax
.Lrelease_done:
    pop xdi
    pop xsi
    pop xbx
    ret

# ---- allocations: ranges backed now or on first touch ----------------------------------------------------------

# vmm_alloc(pages, flags, lazy) -> start address, or 0 (no range, no record slot, or out of memory). flags are
# the pages' entry flags: the low 12 bits and, on x86_64, NX.
vmm_alloc:
    push xbx
    push xsi
    push xdi
    FRAME 0x3
    mov xbx, offset vmm_allocs                      # find an empty record
.Lalloc_slot:
    cmp xbx, offset vmm_allocs + VMM_ALLOC_SLOTS * 4 * WORD_SIZE
    jae .Lalloc_no_slot
    cmp xword ptr [xbx], 0x0
    je .Lalloc_slot_found
    add xbx, 4*WORD_SIZE
    jmp .Lalloc_slot
.Lalloc_slot_found:
    PUSHW xword ptr [xsp + ARG1]
    call vrange_reserve
    DROP 0x1
    test xax, xax
    jz .Lalloc_done
    mov [xbx], xax
    mov xcx, [xsp + ARG1]
    mov [xbx + WORD_SIZE], xcx
    mov xcx, [xsp + ARG2]
    mov [xbx + 2*WORD_SIZE], xcx
    mov xcx, [xsp + ARG3]
    mov [xbx + 3*WORD_SIZE], xcx
    test xcx, xcx
    jnz .Lalloc_ok                                  # lazy: the page-fault handler backs each page
    mov xsi, xax                                    # back every page now
    mov xdi, [xbx + WORD_SIZE]
.Lalloc_back:
    PUSHW xword ptr [xbx + 2*WORD_SIZE]
    PUSHW xsi
    call vmm_back_page
    DROP 0x2
    test xax, xax
    jz .Lalloc_unwind
    add xsi, PAGE_SIZE
    dec xdi
    jnz .Lalloc_back
.Lalloc_ok:
    mov xax, [xbx]
.Lalloc_done:
    pop xdi
    pop xsi
    pop xbx
    ret
.Lalloc_unwind:                                     # out of memory part way: give back what was taken
.if VMM_ALLOC_KEEP_ON_OOM
    # Build variant: the refusal keeps what was taken: the record and the pages backed so far stay, out of reach of
    # a caller who got 0.
.else
    PUSHW xword ptr [xbx]
    call vmm_free
    DROP 0x1
.endif
    xor eax, eax
    jmp .Lalloc_done
.Lalloc_no_slot:
    PUSHW offset str_alloc_no_slot
    call serial_puts
    DROP 0x1
    xor eax, eax
    jmp .Lalloc_done

# vmm_find(vaddr) -> the allocation record containing vaddr, or 0
vmm_find:
    FRAME 0x0
    mov xdx, [xsp + ARG1]
    mov xax, offset vmm_allocs
.Lfind_record:
    cmp xax, offset vmm_allocs + VMM_ALLOC_SLOTS * 4 * WORD_SIZE
    jae .Lfind_none
    mov xcx, [xax]
    test xcx, xcx
    jz .Lfind_next
    cmp xdx, xcx
    jb .Lfind_next
    mov xcx, [xax + WORD_SIZE]
    shl xcx, PAGE_SHIFT
    add xcx, [xax]
    cmp xdx, xcx
    jb .Lfind_done
.Lfind_next:
    add xax, 4*WORD_SIZE
    jmp .Lfind_record
.Lfind_none:
    xor eax, eax
.Lfind_done:
    ret

# vrange_page_mapped(vaddr) -> 1 when a page is mapped at vaddr, else 0 (its page table may be missing too)
vrange_page_mapped:
    FRAME 0x0
    PUSHW xword ptr [xsp + ARG1]
    call paging_table_present
    DROP 0x1
    test eax, eax
    jz .Lmapped_done
    mov xax, [xsp + ARG1]
    ENTRY_OF xax, xcx, PAGE_SHIFT, LEAF_ENTRIES
    mov xax, [xax]
    and eax, PTE_P
.Lmapped_done:
    ret

# vmm_free(vaddr) -> pages given back, or 0 when vaddr is not the start of an allocation (reported)
vmm_free:
    push xbx
    push xsi
    push xdi
    FRAME 0x3
    PUSHW xword ptr [xsp + ARG1]
    call vmm_find
    DROP 0x1
    test xax, xax
    jz .Lfree_not_allocation
    mov xbx, xax
    mov xsi, [xbx]
    cmp xsi, [xsp + ARG1]
    jne .Lfree_not_allocation
    mov xdi, [xbx + WORD_SIZE]
.Lfree_page:
    PUSHW xsi
    call vrange_page_mapped
    DROP 0x1
    test eax, eax
    jz .Lfree_next_page
    PUSHW xsi
    call vmm_release_page
    DROP 0x1
.Lfree_next_page:
    add xsi, PAGE_SIZE
    dec xdi
    jnz .Lfree_page
    PUSHW xword ptr [xbx + WORD_SIZE]
    PUSHW xword ptr [xbx]
    call vrange_release
    DROP 0x2
    mov xax, [xbx + WORD_SIZE]
    mov xword ptr [xbx], 0x0
    jmp .Lfree_done
.Lfree_not_allocation:
    PUSHW offset str_free_not_allocation
    call serial_puts
    PUSHW xword ptr [xsp + ARG1]
    call serial_puthex
    PUSHW offset str_newline
    call serial_puts
    DROP 0x3
    xor eax, eax
.Lfree_done:
    pop xdi
    pop xsi
    pop xbx
    ret

# ---- page faults ----------------------------------------------------------------------------------------------

# vmm_page_fault(cr2, error) -> 1 when the fault was a first touch of a lazy allocation and is now backed
vmm_page_fault:
    FRAME 0x0
    test dword ptr [xsp + ARG2], PF_P               # a protection fault is never a missing lazy page
    jnz .Lfault_not_ours
    PUSHW xword ptr [xsp + ARG1]
    call vmm_find
    DROP 0x1
    test xax, xax
    jz .Lfault_not_ours
    cmp xword ptr [xax + 3*WORD_SIZE], 0x0
    je .Lfault_not_ours
    PUSHW xword ptr [xax + 2*WORD_SIZE]
    PUSHW xword ptr [xsp + ARG1]
    call vmm_back_page
    DROP 0x2
    test xax, xax
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
.balign 8, 0
vmm_free_ranges:
    .skip VMM_FREE_SLOTS * 2 * WORD_SIZE
vmm_allocs:
    .skip VMM_ALLOC_SLOTS * 4 * WORD_SIZE
vmm_free_range_count:
    .skip 0x4
vmm_demand_faults:
    .skip 0x4
