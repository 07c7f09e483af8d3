# The temp-map window: TEMPMAP_SLOTS virtual pages at TEMPMAP_BASE through which the kernel reaches any physical
# frame for a moment (to read or write the "next" word of a free frame, to clear a new page table...).
#
# The slots' PTEs are reachable at TEMPMAP_PTES through the recursive mapping (slot i's at TEMPMAP_PTES +
# i*ENTRY_SIZE), so mapping a frame is one PTE store plus an INVLPG: the TLB may still hold the slot's previous frame, and without the INVLPG a read through
# the slot can return the old frame's data (QEMU's TCG keeps such stale entries just as hardware does).
#
# Slots are handed out as a stack, so nested users each get their own and must give them back newest first.
# Running out of slots is reported on COM1 and returns 0; giving back any slot but the newest is a panic.

.section .text
# temp_map(phys) -> virtual address of a slot now mapping the frame holding phys, or 0 when all slots are in use
temp_map:
    FRAME 0x0
    mov ecx, [tempmap_used]
    cmp ecx, TEMPMAP_SLOTS
    jae .Ltemp_map_exhausted
    mov xax, [xsp + ARG1]
    and xax, -PAGE_SIZE
    or xax, PTE_P | PTE_RW
    SET_NX xax                                      # a window onto data: never executable
    mov xdx, TEMPMAP_PTES
    mov [xdx + xcx*ENTRY_SIZE], xax
    mov eax, ecx
    inc ecx
    mov [tempmap_used], ecx
    shl xax, PAGE_SHIFT
    mov xdx, TEMPMAP_BASE
    add xax, xdx
.if TEMPMAP_SKIP_INVLPG
    # Build variant: no INVLPG. A read through the slot may still reach the frame it mapped before.
.else
    invlpg [xax]
.endif
    ret
.Ltemp_map_exhausted:
    inc dword ptr [tempmap_exhausted]
    push offset str_tempmap_exhausted
    call serial_puts
    add xsp, WORD_SIZE
    xor eax, eax
    ret

# temp_unmap(vaddr): give back the newest slot
temp_unmap:
    FRAME 0x0
    mov ecx, [tempmap_used]
    test ecx, ecx
    jz .Ltemp_unmap_bad
    dec ecx
    mov eax, ecx
    shl xax, PAGE_SHIFT
    mov xdx, TEMPMAP_BASE
    add xax, xdx
    cmp xax, [xsp + ARG1]
    jne .Ltemp_unmap_bad
    mov xdx, TEMPMAP_PTES
    mov xword ptr [xdx + xcx*ENTRY_SIZE], 0x0
    mov [tempmap_used], ecx
.if TEMPMAP_UNMAP_SKIP_INVLPG
    # Build variant: no INVLPG when a slot is given back. The next temp_map of the slot flushes it, but until then
    # the CPU still reaches the frame through a slot that maps nothing.
.else
.if TEMPMAP_SKIP_INVLPG
.else
    invlpg [xax]
.endif
.endif
    ret
.Ltemp_unmap_bad:
    push offset str_tempmap_order
    call panic

.section .rodata
str_tempmap_exhausted:
    .asciz "kgen: temp-map: all slots in use\n"
str_tempmap_order:
    .asciz "temp_unmap: not the newest temp-map slot"

.section .bss
.balign 4
tempmap_used:
    .skip 0x4
tempmap_exhausted:
    .skip 0x4
