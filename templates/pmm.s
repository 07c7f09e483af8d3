# The physical frame allocator: a stack of free frames whose links live inside the free frames themselves.
#
# The only state outside the frames is the top frame's physical address (pmm_top, 0 when empty) and a count: the
# first dword of each free frame holds the physical address of the next one down. With paging on the kernel has
# no mapping for a free frame, so pmm_alloc/pmm_free reach that dword through a temp-map slot.
#
# pmm_alloc_at/pmm_free_at avoid the temp slot entirely: the frame on top is mapped straight into the PTE where
# it is wanted and its link read through that mapping; a frame being freed is pushed while still mapped.
#
# Init must not touch every frame (cost would grow with RAM). Free RAM starts out as a list of ranges from the
# Multiboot memory map (available RAM at or above 1 MiB); frames never used yet are handed out from those ranges
# by a bump pointer once the stack is empty, skipping reserved intervals (the kernel image, the Multiboot
# information). Only freed frames are ever pushed. Init cost grows with the number of map entries only.
#
# Accounting: total = frames in the ranges; reserved = frames of the ranges inside reserved intervals;
# free = pmm_count (stack) + pmm_untouched (bump); live = total - reserved - free.

.section .text
pmm_init:
    push ebx
    push esi
    push edi
    rdtsc
    mov [pmm_init_tsc], eax
    mov [pmm_init_tsc + 0x4], edx
    # Ranges: available entries, clipped to [1 MiB, 4 GiB) and to whole frames.
    mov esi, offset boot_mmap
    mov ebx, [boot_mmap_count]
    xor edi, edi                                    # ranges so far
.Lpmm_entry:
    test ebx, ebx
    jz .Lpmm_entries_done
    cmp dword ptr [esi + 0x10], MULTIBOOT_MMAP_AVAILABLE
    jne .Lpmm_next_entry
    cmp dword ptr [esi + 0x4], 0x0                  # starts at or above 4 GiB: out of reach without PAE
    jne .Lpmm_next_entry
    mov eax, [esi]                                  # start = max(align_up(base), 1 MiB)
    add eax, PAGE_SIZE - 1
    jc .Lpmm_next_entry
    and eax, PTE_FRAME_MASK
    cmp eax, PMM_LOWEST
    jae .Lpmm_start_ok
    mov eax, PMM_LOWEST
.Lpmm_start_ok:
    mov ecx, [esi]                                  # end = align_down(base + length), clipped below 4 GiB
    mov edx, [esi + 0x4]
    add ecx, [esi + 0x8]
    adc edx, [esi + 0xc]
    test edx, edx
    jz .Lpmm_end_low
    mov ecx, PMM_HIGHEST_END
.Lpmm_end_low:
    and ecx, PTE_FRAME_MASK
    cmp eax, ecx
    jae .Lpmm_next_entry
    mov [pmm_ranges + edi*8], eax
    mov [pmm_ranges + edi*8 + 0x4], ecx
    sub ecx, eax
    shr ecx, PAGE_SHIFT
    add [pmm_total], ecx
    inc edi
.Lpmm_next_entry:
    add esi, BOOT_MMAP_ENTRY_SIZE
    dec ebx
    jmp .Lpmm_entry
.Lpmm_entries_done:
    mov [pmm_range_count], edi
    # Reserved intervals: the image (from its load address to its page-aligned end, boot tables and stack
    # included) and the Multiboot information block the loader left in RAM.
    mov dword ptr [pmm_reserved], KERNEL_LOAD_ADDRESS
    mov dword ptr [pmm_reserved + 0x4], offset __kernel_end - KERNEL_VIRTUAL_BASE
    mov eax, [boot_mbi_start]
    and eax, PTE_FRAME_MASK
    mov [pmm_reserved + 0x8], eax
    mov eax, [boot_mbi_end]
    add eax, PAGE_SIZE - 1
    and eax, PTE_FRAME_MASK
    mov [pmm_reserved + 0xc], eax
    mov dword ptr [pmm_reserved_count], PMM_RESERVED_INTERVALS
    # reserved frames = sum over ranges and intervals of their overlap
    xor ebx, ebx
.Lpmm_overlap_range:
    cmp ebx, [pmm_range_count]
    jae .Lpmm_overlap_done
    xor esi, esi
.Lpmm_overlap_interval:
    cmp esi, [pmm_reserved_count]
    jae .Lpmm_overlap_next_range
    mov eax, [pmm_ranges + ebx*8]                   # lo = max(starts)
    cmp eax, [pmm_reserved + esi*8]
    jae .Lpmm_lo
    mov eax, [pmm_reserved + esi*8]
.Lpmm_lo:
    mov ecx, [pmm_ranges + ebx*8 + 0x4]             # hi = min(ends)
    cmp ecx, [pmm_reserved + esi*8 + 0x4]
    jbe .Lpmm_hi
    mov ecx, [pmm_reserved + esi*8 + 0x4]
.Lpmm_hi:
    cmp eax, ecx
    jae .Lpmm_no_overlap
    sub ecx, eax
    shr ecx, PAGE_SHIFT
    add [pmm_reserved_frames], ecx
.Lpmm_no_overlap:
    inc esi
    jmp .Lpmm_overlap_interval
.Lpmm_overlap_next_range:
    inc ebx
    jmp .Lpmm_overlap_range
.Lpmm_overlap_done:
    mov eax, [pmm_total]
    sub eax, [pmm_reserved_frames]
    mov [pmm_untouched], eax
    mov dword ptr [pmm_bump_range], 0x0
    mov eax, [pmm_ranges]
    mov [pmm_bump_next], eax
    rdtsc
    sub eax, [pmm_init_tsc]
    sbb edx, [pmm_init_tsc + 0x4]
    mov [pmm_init_tsc], eax
    mov [pmm_init_tsc + 0x4], edx
    pop edi
    pop esi
    pop ebx
    ret

# pmm_bump() -> the next never-used frame, or 0 when the ranges are used up
pmm_bump:
    push ebx
.Lbump_again:
    mov ecx, [pmm_bump_range]
    cmp ecx, [pmm_range_count]
    jae .Lbump_empty
    mov eax, [pmm_bump_next]
    cmp eax, [pmm_ranges + ecx*8 + 0x4]
    jae .Lbump_next_range
    mov ebx, eax
    push dword ptr [pmm_reserved_count]
    push offset pmm_reserved
    push ebx
    call pmm_interval_of
    add esp, 0xc
    test eax, eax
    jz .Lbump_take
    mov eax, [pmm_reserved + eax*8 - 0x4]           # inside a reserved interval: jump past its end
    mov [pmm_bump_next], eax
    jmp .Lbump_again
.Lbump_take:
    lea edx, [ebx + PAGE_SIZE]
    mov [pmm_bump_next], edx
    dec dword ptr [pmm_untouched]
    mov eax, ebx
    pop ebx
    ret
.Lbump_next_range:
    inc ecx
    mov [pmm_bump_range], ecx
    cmp ecx, [pmm_range_count]
    jae .Lbump_empty
    mov eax, [pmm_ranges + ecx*8]
    mov [pmm_bump_next], eax
    jmp .Lbump_again
.Lbump_empty:
    xor eax, eax
    pop ebx
    ret

# pmm_check_link(next): the link just read from a frame must be a frame address, and 0 exactly at the bottom.
# A corrupt stack is reported and stops the kernel rather than handing out a wrong frame.
pmm_check_link:
    mov eax, [esp + 0x4]
    test eax, PAGE_SIZE - 1
    jnz .Lcheck_link_bad
    cmp dword ptr [pmm_count], 0x1
    je .Lcheck_link_bottom
    test eax, eax
    jz .Lcheck_link_bad
    ret
.Lcheck_link_bottom:
    test eax, eax
    jnz .Lcheck_link_bad
    ret
.Lcheck_link_bad:
    push offset str_pmm_corrupt
    call panic

# pmm_alloc() -> physical address of a frame (contents undefined), or 0 when memory is exhausted
pmm_alloc:
    mov eax, [pmm_top]
    test eax, eax
    jz pmm_bump
    push ebx
    push esi
    mov ebx, eax
    push eax
    call temp_map
    add esp, 0x4
    test eax, eax
    jz .Lalloc_no_slot
    mov esi, [eax]                                  # the link to the next free frame
    push eax
    call temp_unmap
    add esp, 0x4
    push esi
    call pmm_check_link
    add esp, 0x4
    mov [pmm_top], esi
    dec dword ptr [pmm_count]
    mov eax, ebx
    pop esi
    pop ebx
    ret
.Lalloc_no_slot:
    push offset str_pmm_no_slot
    call panic

# pmm_free(phys) -> 1, or 0 when the frame is refused (unaligned, outside RAM, reserved, already on top)
pmm_free:
    push ebx
    mov ebx, [esp + 0x8]
    push ebx
    call pmm_frame_refusal
    add esp, 0x4
    test eax, eax
    jnz .Lfree_refused
    push ebx
    call temp_map
    add esp, 0x4
    test eax, eax
    jz .Lalloc_no_slot
    mov ecx, [pmm_top]
    mov [eax], ecx
    push eax
    call temp_unmap
    add esp, 0x4
    mov [pmm_top], ebx
    inc dword ptr [pmm_count]
    mov eax, 0x1
    pop ebx
    ret
.Lfree_refused:
    push eax
    push offset str_pmm_refused
    call serial_puts
    add esp, 0x4
    push ebx
    call serial_puthex
    add esp, 0x4
    call serial_puts                                # the reason, still on the stack
    add esp, 0x4
    push offset str_newline
    call serial_puts
    add esp, 0x4
    xor eax, eax
    pop ebx
    ret

# pmm_interval_of(addr, intervals, count) -> 1 + the index of the [start, end) pair holding addr, or 0
pmm_interval_of:
    mov eax, [esp + 0x4]
    mov edx, [esp + 0x8]
    xor ecx, ecx
.Linterval_next:
    cmp ecx, [esp + 0xc]
    jae .Linterval_none
    cmp eax, [edx + ecx*8]
    jb .Linterval_skip
    cmp eax, [edx + ecx*8 + 0x4]
    jb .Linterval_found
.Linterval_skip:
    inc ecx
    jmp .Linterval_next
.Linterval_found:
    lea eax, [ecx + 0x1]
    ret
.Linterval_none:
    xor eax, eax
    ret

# pmm_frame_refusal(phys) -> 0 when phys may be freed, else the reason as a string
pmm_frame_refusal:
    mov eax, [esp + 0x4]
    test eax, PAGE_SIZE - 1
    jnz .Lrefuse_unaligned
    push dword ptr [pmm_range_count]
    push offset pmm_ranges
    push eax
    call pmm_interval_of
    add esp, 0xc
    test eax, eax
    jz .Lrefuse_not_ram
    push dword ptr [pmm_reserved_count]
    push offset pmm_reserved
    push dword ptr [esp + 0xc]
    call pmm_interval_of
    add esp, 0xc
    test eax, eax
    jnz .Lrefuse_reserved
    mov eax, [esp + 0x4]
    cmp eax, [pmm_top]
    je .Lrefuse_top
    xor eax, eax
    ret
.Lrefuse_unaligned:
    mov eax, offset str_refuse_unaligned
    ret
.Lrefuse_not_ram:
    mov eax, offset str_refuse_not_ram
    ret
.Lrefuse_reserved:
    mov eax, offset str_refuse_reserved
    ret
.Lrefuse_top:
    mov eax, offset str_refuse_top
    ret

# pmm_alloc_at(vaddr, flags) -> phys, or 0. Maps a cleared frame at vaddr with the given PTE flags. The frame on
# top of the stack goes straight into vaddr's PTE and its link is read through vaddr: no temp slot. vaddr's page
# table must exist (vmm_map grows tables); mapping over a present page is refused.
pmm_alloc_at:
    push edi
    mov edi, [esp + 0x8]
    and edi, PTE_FRAME_MASK
    mov eax, [esp + 0xc]
    or eax, PTE_RW                                  # writable until cleared
    push eax
    push edi
    call pmm_map_top
    add esp, 0x8
    test eax, eax
    jz .Lalloc_at_done
    mov edx, eax
    xor eax, eax
    mov ecx, PAGE_SIZE / 4
    rep stosd
    mov eax, edx
    test dword ptr [esp + 0xc], PTE_RW
    jnz .Lalloc_at_done
    sub edi, PAGE_SIZE
    mov ecx, edi
    shr ecx, PAGE_SHIFT
    and dword ptr [RECURSIVE_BASE + ecx*4], ~PTE_RW
    invlpg [edi]
.Lalloc_at_done:
    pop edi
    ret

# pmm_map_top(vaddr, flags) -> phys, or 0: the allocate-at core. Maps the frame on top of the free stack (or a
# never-used one) at vaddr and pops it, leaving its contents as they are: the caller clears it.
pmm_map_top:
    push ebx
    push edi
    mov edi, [esp + 0xc]                            # vaddr
    and edi, PTE_FRAME_MASK
    mov eax, edi
    shr eax, I386_PDE_SHIFT
    test dword ptr [RECURSIVE_PD + eax*4], PTE_P
    jz .Lmap_top_no_table
    mov ebx, edi
    shr ebx, PAGE_SHIFT
    lea ebx, [RECURSIVE_BASE + ebx*4]               # the PTE, through the recursive window
    test dword ptr [ebx], PTE_P
    jnz .Lmap_top_present
    mov eax, [pmm_top]
    test eax, eax
    jz .Lmap_top_bump
    mov ecx, [esp + 0x10]
    and ecx, PAGE_SIZE - 1
    or ecx, PTE_P
    or ecx, eax
    mov [ebx], ecx
    invlpg [edi]
    push eax                                        # the frame, returned below
    push dword ptr [edi]                            # the link, read through its new home
    call pmm_check_link
    pop dword ptr [pmm_top]
    dec dword ptr [pmm_count]
    pop eax
    jmp .Lmap_top_done
.Lmap_top_bump:
    call pmm_bump
    test eax, eax
    jz .Lmap_top_done
    mov ecx, [esp + 0x10]
    and ecx, PAGE_SIZE - 1
    or ecx, PTE_P
    or ecx, eax
    mov [ebx], ecx
    invlpg [edi]
.Lmap_top_done:
    pop edi
    pop ebx
    ret
.Lmap_top_no_table:
    push offset str_alloc_at_no_table
    jmp .Lmap_top_refuse
.Lmap_top_present:
    push offset str_alloc_at_present
.Lmap_top_refuse:
    call serial_puts
    add esp, 0x4
    xor eax, eax
    pop edi
    pop ebx
    ret

# pmm_free_at(vaddr) -> phys, or 0 when nothing is mapped there. Pushes the frame mapped at vaddr onto the free
# stack while it is still mapped (the link is written through vaddr), then unmaps it.
pmm_free_at:
    push ebx
    mov edx, [esp + 0x8]
    and edx, PTE_FRAME_MASK
    mov eax, edx
    shr eax, I386_PDE_SHIFT
    test dword ptr [RECURSIVE_PD + eax*4], PTE_P
    jz .Lfree_at_nothing
    mov ebx, edx
    shr ebx, PAGE_SHIFT
    lea ebx, [RECURSIVE_BASE + ebx*4]
    mov eax, [ebx]
    test eax, PTE_P
    jz .Lfree_at_nothing
    test eax, PTE_RW                                # the link is written through vaddr: make it writable
    jnz .Lfree_at_writable
    or dword ptr [ebx], PTE_RW
    invlpg [edx]
.Lfree_at_writable:
    and eax, PTE_FRAME_MASK
    cmp eax, KERNEL_LOAD_ADDRESS                    # never the kernel's own image
    jb .Lfree_at_ok
    cmp eax, offset __kernel_end - KERNEL_VIRTUAL_BASE
    jb .Lfree_at_image
.Lfree_at_ok:
    mov ecx, [pmm_top]
    mov [edx], ecx
    mov [pmm_top], eax
    inc dword ptr [pmm_count]
    mov dword ptr [ebx], 0x0
    invlpg [edx]
    pop ebx
    ret
.Lfree_at_image:
    push offset str_free_at_image
    call panic
.Lfree_at_nothing:
    xor eax, eax
    pop ebx
    ret

# pmm_stats_free() -> frames free now (stack + never used)
pmm_stats_free:
    mov eax, [pmm_count]
    add eax, [pmm_untouched]
    ret

# "pmm: total=N reserved=N free=N frames, init took N rdtsc ticks"
report_pmm:
    push offset str_pmm_total
    call serial_puts
    push dword ptr [pmm_total]
    call serial_putdec
    push offset str_pmm_reserved
    call serial_puts
    push dword ptr [pmm_reserved_frames]
    call serial_putdec
    push offset str_pmm_free
    call serial_puts
    call pmm_stats_free
    push eax
    call serial_putdec
    push offset str_pmm_init
    call serial_puts
    push dword ptr [pmm_init_tsc]
    call serial_putdec
    push offset str_pmm_ticks
    call serial_puts
    add esp, 0x24
    ret

.section .rodata
str_pmm_corrupt:
    .asciz "pmm: free-frame stack corrupt (a link is not a frame address, or the count disagrees)"
str_pmm_no_slot:
    .asciz "pmm: no temp-map slot free"
str_pmm_refused:
    .asciz "kgen: pmm_free: refused "
str_refuse_unaligned:
    .asciz ": not page-aligned"
str_refuse_not_ram:
    .asciz ": not in available RAM at or above 1 MiB"
str_refuse_reserved:
    .asciz ": inside the kernel image or the Multiboot information"
str_refuse_top:
    .asciz ": already on top of the free stack (double free)"
str_alloc_at_no_table:
    .asciz "kgen: pmm_alloc_at: no page table for that address\n"
str_alloc_at_present:
    .asciz "kgen: pmm_alloc_at: a page is already mapped there\n"
str_free_at_image:
    .asciz "pmm_free_at: the frame belongs to the kernel image"
str_pmm_total:
    .asciz "pmm: total="
str_pmm_reserved:
    .asciz " reserved="
str_pmm_free:
    .asciz " free="
str_pmm_init:
    .asciz " frames; init "
str_pmm_ticks:
    .asciz " rdtsc ticks\n"

.section .bss
.balign 4
pmm_top:
    .skip 0x4
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
pmm_bump_next:
    .skip 0x4
pmm_range_count:
    .skip 0x4
pmm_ranges:
    .skip BOOT_MMAP_MAX_ENTRIES * 8
pmm_reserved_count:
    .skip 0x4
pmm_reserved:
    .skip PMM_RESERVED_INTERVALS * 8
pmm_init_tsc:
    .skip 0x8
