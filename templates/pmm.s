# The physical frame allocator: a stack of free frames whose links live inside the free frames themselves.
#
# The only state outside the frames is the top frame's physical address (pmm_top, 0 when empty) and a count: the
# first word of each free frame holds the physical address of the next one down. With paging on the kernel has
# no mapping for a free frame, so pmm_alloc/pmm_free reach that word through a temp-map slot.
#
# pmm_alloc_at/pmm_free_at avoid the temp slot entirely: the frame on top is mapped straight into the PTE where
# it is wanted and its link read through that mapping; a frame being freed is pushed while still mapped.
#
# Init must not touch every frame (cost would grow with RAM). Free RAM starts out as a list of ranges from the
# Multiboot memory map (available RAM at or above 1 MiB; on i386 below 4 GiB); frames never used yet are handed out from those ranges
# by a bump pointer once the stack is empty, skipping reserved intervals (the kernel image, the Multiboot
# information). Only freed frames are ever pushed. Init cost grows with the number of map entries only.
#
# Accounting: total = frames in the ranges; reserved = frames of the ranges inside reserved intervals;
# free = pmm_count (stack) + pmm_untouched (bump); live = total - reserved - free.

# One source for both word sizes: physical addresses, links and the [start, end) pairs are words; frame counts are
# dwords. A pair is 2*WORD_SIZE bytes, more than an index scale can express on x86_64, so arrays of pairs are walked
# with pointers or with an offset shifted by WORD_SHIFT + 1.

.section .text
pmm_init:
    push xbx
    push xsi
    push xdi
    rdtsc
    mov [pmm_init_tsc], eax
    mov [pmm_init_tsc + 0x4], edx
    # Ranges: available entries, shrunk to whole frames and starting at 1 MiB (on i386: below 4 GiB).
    mov xsi, offset boot_mmap
    mov ebx, [boot_mmap_count]
    mov xdi, offset pmm_ranges                      # where the next range goes
.Lpmm_entry:
    test ebx, ebx
    jz .Lpmm_entries_done
    cmp dword ptr [xsi + 0x10], MULTIBOOT_MMAP_AVAILABLE
    jne .Lpmm_next_entry
.if CLIPS_RAM_AT_4G
    cmp dword ptr [esi + 0x4], 0x0                  # starts at or above 4 GiB: out of reach without PAE
    jne .Lpmm_next_entry
.endif
    mov xax, [xsi]                                  # start = max(align_up(base), 1 MiB)
    add xax, PAGE_SIZE - 1
    jc .Lpmm_next_entry
    and xax, -PAGE_SIZE
.if PMM_BELOW_1MIB
    # Build variant: the range starts where the map's entry does, so the frames below 1 MiB (the real-mode IVT and
    # BIOS data, frame 0 among them) are handed out as free RAM.
.else
    cmp xax, PMM_LOWEST
    jae .Lpmm_start_ok
    mov xax, PMM_LOWEST
.endif
.Lpmm_start_ok:
.if CLIPS_RAM_AT_4G
    mov ecx, [esi]                                  # end = align_down(base + length), clipped below 4 GiB
    mov edx, [esi + 0x4]
    add ecx, [esi + 0x8]
    adc edx, [esi + 0xc]
    test edx, edx
    jz .Lpmm_end_low
    mov ecx, PMM_HIGHEST_END
.Lpmm_end_low:
.else
    mov rcx, [rsi]                                  # end = align_down(base + length)
    add rcx, [rsi + 0x8]
.endif
    and xcx, -PAGE_SIZE
    cmp xax, xcx
    jae .Lpmm_next_entry
    mov [xdi], xax
    mov [xdi + WORD_SIZE], xcx
    add xdi, 2*WORD_SIZE
    sub xcx, xax
    shr xcx, PAGE_SHIFT
    add [pmm_total], ecx
.Lpmm_next_entry:
    add xsi, BOOT_MMAP_ENTRY_SIZE
    dec ebx
    jmp .Lpmm_entry
.Lpmm_entries_done:
    mov xax, offset pmm_ranges
    sub xdi, xax
    shr edi, WORD_SHIFT + 1
    mov [pmm_range_count], edi
    # Reserved intervals: the image (from its load address to its page-aligned end, boot tables and stack
    # included) and the Multiboot information block the loader left in RAM.
    mov xword ptr [pmm_reserved], KERNEL_LOAD_ADDRESS
    mov xword ptr [pmm_reserved + WORD_SIZE], offset __kernel_end - KERNEL_VIRTUAL_BASE
    mov eax, [boot_mbi_start]
    and xax, -PAGE_SIZE
    mov [pmm_reserved + 2*WORD_SIZE], xax
    mov eax, [boot_mbi_end]
    add xax, PAGE_SIZE - 1
    and xax, -PAGE_SIZE
    mov [pmm_reserved + 3*WORD_SIZE], xax
    mov dword ptr [pmm_reserved_count], PMM_RESERVED_INTERVALS
    # reserved frames = sum over ranges and intervals of their overlap
    mov xdx, offset pmm_ranges
    mov ebx, [pmm_range_count]
.Lpmm_overlap_range:
    test ebx, ebx
    jz .Lpmm_overlap_done
    mov xsi, offset pmm_reserved
    mov edi, [pmm_reserved_count]
.Lpmm_overlap_interval:
    test edi, edi
    jz .Lpmm_overlap_next_range
    mov xax, [xdx]                                  # lo = max(starts)
    cmp xax, [xsi]
    jae .Lpmm_lo
    mov xax, [xsi]
.Lpmm_lo:
    mov xcx, [xdx + WORD_SIZE]                      # hi = min(ends)
    cmp xcx, [xsi + WORD_SIZE]
    jbe .Lpmm_hi
    mov xcx, [xsi + WORD_SIZE]
.Lpmm_hi:
    cmp xax, xcx
    jae .Lpmm_no_overlap
    sub xcx, xax
    shr xcx, PAGE_SHIFT
    add [pmm_reserved_frames], ecx
.Lpmm_no_overlap:
    add xsi, 2*WORD_SIZE
    dec edi
    jmp .Lpmm_overlap_interval
.Lpmm_overlap_next_range:
    add xdx, 2*WORD_SIZE
    dec ebx
    jmp .Lpmm_overlap_range
.Lpmm_overlap_done:
    mov eax, [pmm_total]
    sub eax, [pmm_reserved_frames]
    mov [pmm_untouched], eax
    mov dword ptr [pmm_bump_range], 0x0
    mov xax, [pmm_ranges]
    mov [pmm_bump_next], xax
    rdtsc
    sub eax, [pmm_init_tsc]
    sbb edx, [pmm_init_tsc + 0x4]
    mov [pmm_init_tsc], eax
    mov [pmm_init_tsc + 0x4], edx
    pop xdi
    pop xsi
    pop xbx
    ret

# pmm_bump() -> the next never-used frame, or 0 when the ranges are used up
pmm_bump:
    push xbx
.Lbump_again:
    mov ecx, [pmm_bump_range]
    cmp ecx, [pmm_range_count]
    jae .Lbump_empty
    shl xcx, WORD_SHIFT + 1                         # the current range's offset in pmm_ranges
    mov xax, [pmm_bump_next]
    cmp xax, [pmm_ranges + xcx + WORD_SIZE]
    jae .Lbump_next_range
    mov xbx, xax
    mov eax, [pmm_reserved_count]
    push xax
    push offset pmm_reserved
    push xbx
    call pmm_interval_of
    add xsp, 3*WORD_SIZE
    test xax, xax
    jz .Lbump_take
    mov xax, [xax + WORD_SIZE]                      # inside a reserved interval: jump past its end
    mov [pmm_bump_next], xax
    jmp .Lbump_again
.Lbump_take:
    lea xdx, [xbx + PAGE_SIZE]
    mov [pmm_bump_next], xdx
    dec dword ptr [pmm_untouched]
    mov xax, xbx
    pop xbx
    ret
.Lbump_next_range:
    mov ecx, [pmm_bump_range]
    inc ecx
    mov [pmm_bump_range], ecx
    cmp ecx, [pmm_range_count]
    jae .Lbump_empty
    shl xcx, WORD_SHIFT + 1
    mov xax, [pmm_ranges + xcx]
    mov [pmm_bump_next], xax
    jmp .Lbump_again
.Lbump_empty:
    xor eax, eax
    pop xbx
    ret

# pmm_check_link(next): the link just read from a frame must be a frame address, and 0 exactly at the bottom.
# A corrupt stack is reported and stops the kernel rather than handing out a wrong frame.
pmm_check_link:
    FRAME 0x0
    mov xax, [xsp + ARG1]
    test eax, PAGE_SIZE - 1
    jnz .Lcheck_link_bad
    cmp dword ptr [pmm_count], 0x1
    je .Lcheck_link_bottom
    test xax, xax
    jz .Lcheck_link_bad
    ret
.Lcheck_link_bottom:
    test xax, xax
    jnz .Lcheck_link_bad
    ret
.Lcheck_link_bad:
    PUSHW offset str_pmm_corrupt
    call panic

# pmm_alloc() -> physical address of a frame (contents undefined), or 0 when memory is exhausted
pmm_alloc:
    mov xax, [pmm_top]
    test xax, xax
    jz pmm_bump
    push xbx
    push xsi
    mov xbx, xax
    push xax
    call temp_map
    add xsp, WORD_SIZE
    test xax, xax
    jz .Lalloc_no_slot
    mov xsi, [xax]                                  # the link to the next free frame
    push xax
    call temp_unmap
    add xsp, WORD_SIZE
    push xsi
    call pmm_check_link
    add xsp, WORD_SIZE
    mov [pmm_top], xsi
    dec dword ptr [pmm_count]
    mov xax, xbx
    pop xsi
    pop xbx
    ret
.Lalloc_no_slot:
    push offset str_pmm_no_slot
    call panic

# pmm_free(phys) -> 1, or 0 when the frame is refused (unaligned, outside RAM, reserved, already on top)
pmm_free:
    push xbx
    FRAME 0x1
    mov xbx, [xsp + ARG1]
    PUSHW xbx
    call pmm_frame_refusal
    DROP 0x1
    test xax, xax
    jnz .Lfree_refused
    PUSHW xbx
    call temp_map
    DROP 0x1
    test xax, xax
    jz .Lalloc_no_slot
    mov xcx, [pmm_top]
    mov [xax], xcx
    PUSHW xax
    call temp_unmap
    DROP 0x1
    mov [pmm_top], xbx
    inc dword ptr [pmm_count]
    mov eax, 0x1
    pop xbx
    ret
.Lfree_refused:
    PUSHW xax
    PUSHW offset str_pmm_refused
    call serial_puts
    DROP 0x1
    PUSHW xbx
    call serial_puthex
    DROP 0x1
    call serial_puts                                # the reason, still on the stack
    DROP 0x1
    PUSHW offset str_newline
    call serial_puts
    DROP 0x1
    xor eax, eax
    pop xbx
    ret

# pmm_frame_refusal(phys) -> 0 when phys may be freed, else the reason as a string
pmm_frame_refusal:
    FRAME 0x0
    mov xax, [xsp + ARG1]
    test eax, PAGE_SIZE - 1
    jnz .Lrefuse_unaligned
    mov ecx, [pmm_range_count]
    PUSHW xcx
    PUSHW offset pmm_ranges
    PUSHW xax
    call pmm_interval_of
    DROP 0x3
    test xax, xax
    jz .Lrefuse_not_ram
    mov ecx, [pmm_reserved_count]
    PUSHW xcx
    PUSHW offset pmm_reserved
    PUSHW xword ptr [xsp + ARG1]
    call pmm_interval_of
    DROP 0x3
    test xax, xax
    jnz .Lrefuse_reserved
.if PMM_DOUBLE_PUSH
    # Build variant: the frame on top of the stack is not refused. A double free pushes it twice: its link then
    # points at itself, the frames below are lost, and the count says one frame more than the stack holds.
.else
    mov xax, [xsp + ARG1]
    cmp xax, [pmm_top]
    je .Lrefuse_top
.endif
    xor eax, eax
    ret
.Lrefuse_unaligned:
    mov xax, offset str_refuse_unaligned
    ret
.Lrefuse_not_ram:
    mov xax, offset str_refuse_not_ram
    ret
.Lrefuse_reserved:
    mov xax, offset str_refuse_reserved
    ret
.Lrefuse_top:
    mov xax, offset str_refuse_top
    ret

# pmm_map_top(vaddr, flags) -> phys, or 0: the allocate-at core. Maps the frame on top of the free stack (or a
# never-used one) at vaddr and pops it, leaving its contents as they are: the caller clears it. flags are the
# entry's low 12 bits and, on x86_64, NX.
pmm_map_top:
    push xbx
    push xdi
    FRAME 0x2
    mov xdi, [xsp + ARG1]                           # vaddr
    and xdi, -PAGE_SIZE
    PUSHW xdi
    call paging_table_present
    DROP 0x1
    test eax, eax
    jz .Lmap_top_no_table
    mov xbx, xdi
    ENTRY_OF xbx, xcx, PAGE_SHIFT, LEAF_ENTRIES     # the PTE, through the recursive window
    test xword ptr [xbx], PTE_P
    jnz .Lmap_top_present
    mov xax, [pmm_top]
    test xax, xax
    jz .Lmap_top_bump
    call pmm_entry_for
    mov [xbx], xcx
    invlpg [xdi]
    PUSHW xax                                       # the frame, returned below
    PUSHW xword ptr [xdi]                           # the link, read through its new home
    call pmm_check_link
    POPW xword ptr [pmm_top]
    dec dword ptr [pmm_count]
    POPW xax
    jmp .Lmap_top_done
.Lmap_top_bump:
    call pmm_bump
    test xax, xax
    jz .Lmap_top_done
    call pmm_entry_for
    mov [xbx], xcx
    invlpg [xdi]
.Lmap_top_done:
    pop xdi
    pop xbx
    ret
.Lmap_top_no_table:
    PUSHW offset str_alloc_at_no_table
    jmp .Lmap_top_refuse
.Lmap_top_present:
    FRAME 0x2
    PUSHW offset str_alloc_at_present
.Lmap_top_refuse:
    call serial_puts
    DROP 0x1
    xor eax, eax
    pop xdi
    pop xbx
    ret

# pmm_entry_for, inside pmm_map_top only (its caller's flags argument at [xsp + 5*WORD_SIZE]): xcx = the present
# entry mapping frame xax with those flags; xdx is clobbered.
pmm_entry_for:
    mov xcx, [xsp + 5*WORD_SIZE]
    mov xdx, PTE_FLAGS_MASK
    and xcx, xdx
    or xcx, PTE_P
    or xcx, xax
    ret

# pmm_free_at(vaddr) -> phys, or 0 when nothing is mapped there. Pushes the frame mapped at vaddr onto the free
# stack while it is still mapped (the link is written through vaddr), then unmaps it.
pmm_free_at:
    push xbx
    FRAME 0x1
    mov xdx, [xsp + ARG1]
    and xdx, -PAGE_SIZE
    PUSHW xdx
    call paging_table_present
    POPW xdx
    test eax, eax
    jz .Lfree_at_nothing
    mov xbx, xdx
    ENTRY_OF xbx, xcx, PAGE_SHIFT, LEAF_ENTRIES
    mov xax, [xbx]
    test eax, PTE_P
    jz .Lfree_at_nothing
    test eax, PTE_RW                                # the link is written through vaddr: make it writable
    jnz .Lfree_at_writable
    or xword ptr [xbx], PTE_RW
    invlpg [xdx]
.Lfree_at_writable:
    mov xcx, PTE_FRAME_MASK
    and xax, xcx
    cmp xax, KERNEL_LOAD_ADDRESS                    # never the kernel's own image
    jb .Lfree_at_ok
    cmp xax, offset __kernel_end - KERNEL_VIRTUAL_BASE
    jb .Lfree_at_image
.Lfree_at_ok:
    mov xcx, [pmm_top]
    mov [xdx], xcx
    mov [pmm_top], xax
    inc dword ptr [pmm_count]
    mov xword ptr [xbx], 0x0
.if PMM_FREE_AT_SKIP_INVLPG
    # Build variant: no INVLPG. The TLB may keep vaddr's old translation, so after vmm_free or kfree the CPU still
    # reaches the freed frame, now on the free stack and soon someone else's, through vaddr.
.else
    invlpg [xdx]
.endif
    pop xbx
    ret
.Lfree_at_image:
    PUSHW offset str_free_at_image
    call panic
.Lfree_at_nothing:
    xor eax, eax
    pop xbx
    ret

# pmm_stats_free() -> frames free now (stack + never used)
pmm_stats_free:
    mov eax, [pmm_count]
    add eax, [pmm_untouched]
    ret

.section .rodata
str_pmm_corrupt:
    .asciz "pmm: free-frame stack corrupt (a link is not a frame address, or the count disagrees)"
str_pmm_no_slot:
    .asciz "pmm: no temp-map slot free"
str_refuse_reserved:
    .asciz ": inside the kernel image or the Multiboot information"
str_refuse_top:
    .asciz ": already on top of the free stack (double free)"

.section .bss
.balign 8, 0
pmm_top:
    .skip WORD_SIZE
pmm_bump_next:
    .skip WORD_SIZE
pmm_ranges:
    .skip BOOT_MMAP_MAX_ENTRIES * 2 * WORD_SIZE
pmm_reserved:
    .skip PMM_RESERVED_INTERVALS * 2 * WORD_SIZE
pmm_init_tsc:
    .skip 0x8
pmm_count:
    .skip 0x4
pmm_total:
    .skip 0x4
pmm_reserved_frames:
    .skip 0x4
pmm_untouched:
    .skip 0x4
pmm_bump_range:
    .skip 0x4
pmm_range_count:
    .skip 0x4
pmm_reserved_count:
    .skip 0x4
