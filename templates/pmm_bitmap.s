# The physical frame allocator, bitmap kind (pmm.kind = "bitmap"): one bit per frame of RAM, set while the frame
# is in use. The routines and counters are the free-page stack's (templates/pmm.s), so the VMM, the heap, address
# spaces and tasks call the same labels whichever allocator the config chose.
#
# Bits. The Multiboot memory map gives ranges of available RAM (at or above 1 MiB; on i386 below 4 GiB), read as
# pmm.s reads them. Bit b stands for the b-th frame of those ranges taken one after the other: holes in the map
# (the PCI hole below 4 GiB) cost no bits, so the bitmap is total/8 bytes, sized at boot from the RAM present and
# not from the 4 GiB an address can reach. pmm_bit_of and pmm_frame_of convert by walking the few ranges.
#
# Where it lives. The bitmap needs RAM of its own before any allocator exists: pmm_init takes the first run of
# frames of the ranges that holds it and lies clear of the image and the Multiboot information, records that run as
# a third reserved interval (so it counts as reserved, and pmm_free refuses its frames), and maps it at
# PMM_BITMAP_BASE: the last pages of the temp-map window's page table, a table the boot stub made (kgen/build/
# layout.py, pmm_bitmap_window). The window has room for the most RAM the architecture takes; RAM beyond that
# many bits is left out of the ranges.
#
# Allocation scans the bitmap a dword at a time for one that is not all ones, from a next-free hint: pmm_hint is
# the index of the first dword that may hold a clear bit (all dwords below it are full). An allocation moves the
# hint up to the dword it took from; a free moves it down to the freed bit's dword. A frame freed while its bit is
# already clear is a double free: refused, as the stack refuses the frame on its top. The scan's cost grows with
# the frames in use below the first free one: the worst case reads every dword (a full machine).
#
# Accounting: total = frames in the ranges; reserved = frames of the ranges inside reserved intervals (their bits
# set at init and never cleared); free = pmm_count, the clear bits; live = total - reserved - free.
#
# Bits past `total` in the last dword are set at init, so the scan never hands out a frame that is not there.

.section .text
pmm_init:
    push xbx
    push xsi
    push xdi
    rdtsc
    mov [pmm_init_tsc], eax
    mov [pmm_init_tsc + 0x4], edx
    # Ranges: available entries, shrunk to whole frames and starting at 1 MiB (on i386: below 4 GiB), as long as
    # the window has bits for them.
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
    cmp xax, PMM_LOWEST
    jae .Lpmm_start_ok
    mov xax, PMM_LOWEST
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
    sub xcx, xax
    shr xcx, PAGE_SHIFT                             # frames in the range
    mov edx, PMM_BITMAP_MAX_FRAMES
    sub edx, [pmm_total]                            # bits the window has left
    cmp xcx, xdx                                    # a word: a range may hold more frames than a dword counts
    jbe .Lpmm_fits
    mov ecx, edx
.Lpmm_fits:
    test ecx, ecx
    jz .Lpmm_next_entry
    add [pmm_total], ecx
    mov [xdi], xax
    shl xcx, PAGE_SHIFT
    add xcx, xax
    mov [xdi + WORD_SIZE], xcx
    add xdi, 2*WORD_SIZE
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
    # included) and the Multiboot information block the loader left in RAM; the bitmap's own frames come third.
    mov xword ptr [pmm_reserved], KERNEL_LOAD_ADDRESS
    mov xword ptr [pmm_reserved + WORD_SIZE], offset __kernel_end - KERNEL_VIRTUAL_BASE
    mov eax, [boot_mbi_start]
    and xax, -PAGE_SIZE
    mov [pmm_reserved + 2*WORD_SIZE], xax
    mov eax, [boot_mbi_end]
    add xax, PAGE_SIZE - 1
    and xax, -PAGE_SIZE
    mov [pmm_reserved + 3*WORD_SIZE], xax
    mov dword ptr [pmm_reserved_count], PMM_RESERVED_INTERVALS - 1
    # The bitmap: a bit per frame, whole dwords, whole pages.
    mov eax, [pmm_total]
    add eax, 0x1f
    shr eax, 0x5
    mov [pmm_bitmap_dwords], eax
    shl xax, 0x2
    add xax, PAGE_SIZE - 1
    and xax, -PAGE_SIZE
    push xax
    call pmm_place_bitmap
    add xsp, WORD_SIZE
    mov [pmm_reserved + 4*WORD_SIZE], xax
    mov [pmm_reserved + 5*WORD_SIZE], xdx
    mov dword ptr [pmm_reserved_count], PMM_RESERVED_INTERVALS
    # Map it page by page at PMM_BITMAP_BASE: the PTEs are in the temp-map window's page table, present from boot.
    mov xsi, xax                                    # the next frame of the bitmap
    mov xdi, PMM_BITMAP_BASE                        # its page in the window
.Lpmm_map_bitmap:
    cmp xsi, xdx
    jae .Lpmm_bitmap_mapped
    mov xbx, xdi
    ENTRY_OF xbx, xcx, PAGE_SHIFT, LEAF_ENTRIES
    mov xax, xsi
    or xax, PTE_P | PTE_RW | PTE_G                  # kernel data, the same in every space
    SET_NX xax
    mov [xbx], xax
    invlpg [xdi]
    add xsi, PAGE_SIZE
    add xdi, PAGE_SIZE
    jmp .Lpmm_map_bitmap
.Lpmm_bitmap_mapped:
    # Every bit clear (every frame free), then the bits past `total` set...
    mov xdi, PMM_BITMAP_BASE
    mov ecx, [pmm_bitmap_dwords]
    xor eax, eax
    rep stosd
    mov ecx, [pmm_total]
    and ecx, 0x1f
    jz .Lpmm_no_tail
    mov eax, -1
    shl eax, cl
    or dword ptr [xdi - 0x4], eax
.Lpmm_no_tail:
    # ...and the bits of every reserved frame in RAM set, each counted once.
    mov xsi, offset pmm_reserved
    mov ebx, [pmm_reserved_count]
.Lpmm_reserve_interval:
    test ebx, ebx
    jz .Lpmm_reserved_done
    mov xdi, [xsi]
.Lpmm_reserve_frame:
    cmp xdi, [xsi + WORD_SIZE]
    jae .Lpmm_reserve_next
    push xdi
    call pmm_bit_of
    add xsp, WORD_SIZE
    cmp eax, -1
    je .Lpmm_reserve_skip                           # not RAM of the ranges
    mov xdx, PMM_BITMAP_BASE
    bts dword ptr [xdx], eax
    jc .Lpmm_reserve_skip                           # already reserved by an interval before
    inc dword ptr [pmm_reserved_frames]
.Lpmm_reserve_skip:
    add xdi, PAGE_SIZE
    jmp .Lpmm_reserve_frame
.Lpmm_reserve_next:
    add xsi, 2*WORD_SIZE
    dec ebx
    jmp .Lpmm_reserve_interval
.Lpmm_reserved_done:
    mov eax, [pmm_total]
    sub eax, [pmm_reserved_frames]
    mov [pmm_count], eax
    mov dword ptr [pmm_hint], 0x0
    rdtsc
    sub eax, [pmm_init_tsc]
    sbb edx, [pmm_init_tsc + 0x4]
    mov [pmm_init_tsc], eax
    mov [pmm_init_tsc + 0x4], edx
    pop xdi
    pop xsi
    pop xbx
    ret

# pmm_place_bitmap(bytes) -> xax = start, xdx = end of the first run of whole frames of the ranges that holds
# `bytes` and overlaps no reserved interval yet recorded. No such run: the kernel stops, it has nowhere to count.
pmm_place_bitmap:
    push xbx
    push xsi
    push xdi
    FRAME 0x3
    mov xbx, offset pmm_ranges
    mov edi, [pmm_range_count]
.Lplace_range:
    test edi, edi
    jz .Lplace_none
    mov xax, [xbx]                                  # the candidate start
.Lplace_try:
    mov xdx, xax
    add xdx, [xsp + ARG1]
    cmp xdx, [xbx + WORD_SIZE]
    ja .Lplace_next_range
    mov xsi, offset pmm_reserved
    mov ecx, [pmm_reserved_count]
.Lplace_interval:
    test ecx, ecx
    jz .Lplace_found
    cmp xax, [xsi + WORD_SIZE]                      # overlap: start < its end and its start < end
    jae .Lplace_clear
    cmp [xsi], xdx
    jae .Lplace_clear
    mov xax, [xsi + WORD_SIZE]                      # try again just past it
    jmp .Lplace_try
.Lplace_clear:
    add xsi, 2*WORD_SIZE
    dec ecx
    jmp .Lplace_interval
.Lplace_next_range:
    add xbx, 2*WORD_SIZE
    dec edi
    jmp .Lplace_range
.Lplace_found:
    pop xdi
    pop xsi
    pop xbx
    ret
.Lplace_none:
    PUSHW offset str_pmm_no_room
    call panic

# pmm_bit_of(phys) -> the bit of the frame holding phys, or -1 (0xffffffff) when phys is in no range
pmm_bit_of:
    push xbx
    push xsi
    FRAME 0x2
    mov xax, [xsp + ARG1]
    mov xdx, offset pmm_ranges
    mov ecx, [pmm_range_count]
    xor ebx, ebx                                    # the bits of the ranges before this one
.Lbit_of_range:
    test ecx, ecx
    jz .Lbit_of_none
    cmp xax, [xdx]
    jb .Lbit_of_next
    cmp xax, [xdx + WORD_SIZE]
    jb .Lbit_of_found
.Lbit_of_next:
    mov xsi, [xdx + WORD_SIZE]
    sub xsi, [xdx]
    shr xsi, PAGE_SHIFT
    add ebx, esi
    add xdx, 2*WORD_SIZE
    dec ecx
    jmp .Lbit_of_range
.Lbit_of_found:
    sub xax, [xdx]
    shr xax, PAGE_SHIFT
    add eax, ebx
    pop xsi
    pop xbx
    ret
.Lbit_of_none:
    mov eax, -1
    pop xsi
    pop xbx
    ret

# pmm_frame_of(bit) -> the physical address of the frame bit `bit` stands for (bit < pmm_total)
pmm_frame_of:
    FRAME 0x0
    mov eax, [xsp + ARG1]
    mov xdx, offset pmm_ranges
.Lframe_of_range:
    mov xcx, [xdx + WORD_SIZE]
    sub xcx, [xdx]
    shr xcx, PAGE_SHIFT                             # frames in this range
    cmp xax, xcx
    jb .Lframe_of_found
    sub xax, xcx
    add xdx, 2*WORD_SIZE
    jmp .Lframe_of_range
.Lframe_of_found:
    shl xax, PAGE_SHIFT
    add xax, [xdx]
    ret

# pmm_alloc() -> physical address of a frame (contents undefined), or 0 when memory is exhausted: the lowest free
# frame at or above the hint
pmm_alloc:
    mov xdx, PMM_BITMAP_BASE
    mov ecx, [pmm_hint]
.Lalloc_scan:
    cmp ecx, [pmm_bitmap_dwords]
    jae .Lalloc_none
    mov eax, [xdx + xcx*4]
    not eax
    test eax, eax
    jnz .Lalloc_found                               # a clear bit in this dword
    inc ecx
    jmp .Lalloc_scan
.Lalloc_found:
    mov [pmm_hint], ecx                             # every dword below is full
    bsf eax, eax                                    # the lowest clear bit
    bts dword ptr [xdx + xcx*4], eax
    shl ecx, 0x5
    add eax, ecx
    dec dword ptr [pmm_count]
    push xax
    call pmm_frame_of
    add xsp, WORD_SIZE
    ret
.Lalloc_none:
    mov [pmm_hint], ecx
    xor eax, eax
    ret

# pmm_free(phys) -> 1, or 0 when the frame is refused (unaligned, outside RAM, reserved, already free)
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
    call pmm_bit_of
    DROP 0x1
.if PMM_BITMAP_FREE_KEEPS_BIT
    # Build variant: the bit stays set. The frame is counted free but never handed out again (a leak), and a second
    # free of it is not seen as one.
.else
    mov xdx, PMM_BITMAP_BASE
    btr dword ptr [xdx], eax
.endif
    shr eax, 0x5                                    # the freed bit's dword: the hint moves down to it
    cmp eax, [pmm_hint]
    jae .Lfree_hint_kept
    mov [pmm_hint], eax
.Lfree_hint_kept:
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
    PUSHW xax
    call pmm_bit_of
    DROP 0x1
    cmp eax, -1
    je .Lrefuse_not_ram
    mov xdx, PMM_BITMAP_BASE
    bt dword ptr [xdx], eax
    jnc .Lrefuse_free
    mov ecx, [pmm_reserved_count]
    PUSHW xcx
    PUSHW offset pmm_reserved
    PUSHW xword ptr [xsp + ARG1]
    call pmm_interval_of
    DROP 0x3
    test xax, xax
    jnz .Lrefuse_reserved
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
.Lrefuse_free:
    mov xax, offset str_refuse_free
    ret

# pmm_map_top(vaddr, flags) -> phys, or 0: the allocate-at core, under the name the paging code calls (templates/
# pmm.s maps the stack's top frame). Maps a frame from pmm_alloc at vaddr, leaving its contents as they are: the
# caller clears it. flags are the entry's low 12 bits and, on x86_64, NX.
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
    call pmm_alloc
    test xax, xax
    jz .Lmap_top_done
    mov xcx, [xsp + ARG2]
    mov xdx, PTE_FLAGS_MASK
    and xcx, xdx
    or xcx, PTE_P
    or xcx, xax
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

# pmm_free_at(vaddr) -> phys, or 0 when nothing is mapped there. Unmaps the frame mapped at vaddr, then frees it
# (pmm_free: its bit cleared).
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
    mov xcx, PTE_FRAME_MASK
    and xax, xcx
    cmp xax, KERNEL_LOAD_ADDRESS                    # never the kernel's own image
    jb .Lfree_at_ok
    cmp xax, offset __kernel_end - KERNEL_VIRTUAL_BASE
    jb .Lfree_at_image
.Lfree_at_ok:
    mov xword ptr [xbx], 0x0
.if PMM_FREE_AT_SKIP_INVLPG
    # Build variant: no INVLPG. The TLB may keep vaddr's old translation, so after vmm_free or kfree the CPU still
    # reaches the freed frame, free in the bitmap and soon someone else's, through vaddr.
.else
    invlpg [xdx]
.endif
    mov xbx, xax
    PUSHW xax
    call pmm_free
    DROP 0x1
    mov xax, xbx
    pop xbx
    ret
.Lfree_at_image:
    PUSHW offset str_free_at_image
    call panic
.Lfree_at_nothing:
    xor eax, eax
    pop xbx
    ret

# pmm_stats_free() -> frames free now (the clear bits)
pmm_stats_free:
    mov eax, [pmm_count]
    ret

.section .rodata
str_pmm_no_room:
    .asciz "pmm: no run of free RAM holds the bitmap"
str_refuse_reserved:
    .asciz ": inside the kernel image, the Multiboot information or the bitmap"
str_refuse_free:
    .asciz ": its bit is already clear (double free)"

.section .bss
.balign 8, 0
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
pmm_hint:
    .skip 0x4
pmm_bitmap_dwords:
    .skip 0x4
pmm_range_count:
    .skip 0x4
pmm_reserved_count:
    .skip 0x4
