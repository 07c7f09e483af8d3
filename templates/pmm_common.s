# What the two frame allocators (templates/pmm.s, the free-page stack; templates/pmm_bitmap.s, the bitmap) share:
# the search of [start, end) intervals, allocate-at around each one's pmm_map_top, the boot report's pmm line and
# the messages of both. Either allocator's unit comes with this one (kgen/build/pipeline.py, MEMORY_UNITS).

.section .text
# pmm_interval_of(addr, intervals, count) -> the address of the [start, end) pair holding addr, or 0
pmm_interval_of:
    FRAME 0x0
    mov xax, [xsp + ARG1]
    mov xdx, [xsp + ARG2]
    mov xcx, [xsp + ARG3]
.Linterval_next:
    test xcx, xcx
    jz .Linterval_none
    cmp xax, [xdx]
    jb .Linterval_skip
    cmp xax, [xdx + WORD_SIZE]
    jb .Linterval_found
.Linterval_skip:
    add xdx, 2*WORD_SIZE
    dec xcx
    jmp .Linterval_next
.Linterval_found:
    mov xax, xdx
    ret
.Linterval_none:
    xor eax, eax
    ret

# pmm_alloc_at(vaddr, flags) -> phys, or 0. Maps a cleared frame at vaddr with the given PTE flags and clears it
# through vaddr: no temp slot. The frame comes from the allocator's pmm_map_top (the free stack's top frame, its link
# read through vaddr; or the bitmap's next clear bit). vaddr's page table must exist (vmm_map grows tables); mapping
# over a present page is refused.
pmm_alloc_at:
    push xdi
    FRAME 0x1
    mov xdi, [xsp + ARG1]
    and xdi, -PAGE_SIZE
    mov xax, [xsp + ARG2]
    or xax, PTE_RW                                  # writable until cleared
    PUSHW xax
    PUSHW xdi
    call pmm_map_top
    DROP 0x2
    test xax, xax
    jz .Lalloc_at_done
    mov xdx, xax
    xor eax, eax
    mov ecx, PAGE_SIZE / 4
    rep stosd
    mov xax, xdx
    test xword ptr [xsp + ARG2], PTE_RW
    jnz .Lalloc_at_done
    sub xdi, PAGE_SIZE
    PUSHW xax
    mov xcx, xdi
    ENTRY_OF xcx, xax, PAGE_SHIFT, LEAF_ENTRIES
    and xword ptr [xcx], ~PTE_RW
    invlpg [xdi]
    POPW xax
.Lalloc_at_done:
    pop xdi
    ret

# "pmm: total=N reserved=N free=N frames, init took N rdtsc ticks"
report_pmm:
    push offset str_pmm_total
    call serial_puts
    mov eax, [pmm_total]
    push xax
    call serial_putdec
    push offset str_pmm_reserved
    call serial_puts
    mov eax, [pmm_reserved_frames]
    push xax
    call serial_putdec
    push offset str_pmm_free
    call serial_puts
    call pmm_stats_free
    push xax
    call serial_putdec
    push offset str_pmm_init
    call serial_puts
    push xword ptr [pmm_init_tsc]
    call serial_putdec
    push offset str_pmm_ticks
    call serial_puts
    add xsp, 9*WORD_SIZE
    ret

.section .rodata
str_pmm_refused:
    .asciz "kgen: pmm_free: refused "
str_refuse_unaligned:
    .asciz ": not page-aligned"
str_refuse_not_ram:
    .asciz ": not in available RAM at or above 1 MiB"
str_alloc_at_no_table:
    .asciz "kgen: pmm_alloc_at: no page table for that address\n"
str_alloc_at_present:
    .asciz "kgen: pmm_alloc_at: a page is already mapped there\n"
str_free_at_image:
    .asciz "pmm_free_at: the frame belongs to the kernel image"
str_pmm_total:
    PMM_REPORT_TEXT0                                # the report line's texts: kgen/protocol.py, PMM_REPORT_PARTS
    .byte 0x0
str_pmm_reserved:
    PMM_REPORT_TEXT1
    .byte 0x0
str_pmm_free:
    PMM_REPORT_TEXT2
    .byte 0x0
str_pmm_init:
    PMM_REPORT_TEXT3
    .byte 0x0
str_pmm_ticks:
    PMM_REPORT_TEXT4
    .asciz "\n"
