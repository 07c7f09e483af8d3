"""Zoo kernels for what reports say (issue 22: findings carry their addresses, less noise, which space): built
with GNU as/ld like tests/minikernels.py, from its pieces.

LARGE_PAGE_KERNEL, in the Higher Half Bare Bones layout (a boot segment loaded and linked at 1 MiB, the rest linked
at 0xC0000000 above its load address), maps the first 4 MiB of RAM at KBASE with one writable 4 MiB page: its
read-only text and rodata are writable through that one entry. Beside it:
- a user page at virtual 0 (PD[0] -> `upt`), on the frame USER_FRAME outside the image;
- the frame TWICE_FRAME at TWICE_VADDR and the page after it, supervisor pages in the kernel half: a frame mapped
  twice; their page table `tpt` is reached from PD entries 769 and 770 alike, so the same two pages appear at
  TWICE_VADDR + 4 MiB too (a table reached twice: a finding about a frame, which names both virtual addresses);
- `idt_init`, a function that crosses a page boundary 0x208 bytes in, so the page after its start is named
  `<idt_init+0x208>`: the text of the segment finding holds a number (0x208) that lies in the user page at 0.
It prints LARGE_PAGE_READY and halts with interrupts off, its page directory `pd` in CR3.
"""
from __future__ import annotations

from pathlib import Path

from minikernels import (BOOT_SEGMENT_ENTRY, CLEAR_PD_PT, FLUSH_TLB, SERIAL_PUTS, STACK, boot_segment_lds, build,
                         halt_loop, map_image, map_low_and_high, paging_on_and_jump_high, unmap_identity)

KBASE = 0xC0000000
LARGE_PAGE_READY = "large: ready\n"
USER_FRAME = 0x00500000
TWICE_VADDR = 0xC0400000
TWICE_FRAME = 0x00600000
IDT_INIT_OFFSET = 0x208         # where idt_init crosses into its second page

LARGE_PAGE = rf"""
{BOOT_SEGMENT_ENTRY}
{CLEAR_PD_PT}
    mov $(upt - KBASE), %edi
    mov $2048, %ecx                     /* upt and tpt: RAM may be poisoned */
    rep stosl
{map_image(boot_segment=True)}
{map_low_and_high()}
    mov %cr4, %eax
    or $0x10, %eax                      /* PSE: 4 MiB pages */
    mov %eax, %cr4
    movl $0x00000083, pd - KBASE + 768 * 4      /* KBASE..KBASE + 4 MiB -> 0..4 MiB: P RW PS, text writable too */
{paging_on_and_jump_high()}

.text
higher_half:
    mov $stack_top, %esp
{unmap_identity()}
    movl $(USER_FRAME + 7), upt                 /* virtual 0: a user page (P RW US) */
    movl $(upt - KBASE + 7), pd
    movl $(TWICE_FRAME + 3), tpt                /* TWICE_VADDR and the page after: one frame (P RW) */
    movl $(TWICE_FRAME + 3), tpt + 4
    movl $(tpt - KBASE + 3), pd + (TWICE_VADDR >> 22) * 4
    movl $(tpt - KBASE + 3), pd + (TWICE_VADDR >> 22) * 4 + 4   /* the same table again, 4 MiB higher */
{FLUSH_TLB}
    call idt_init
    mov $ready, %esi
    call puts
    cli
{halt_loop()}
{SERIAL_PUTS}
.balign 4096
.skip 4096 - IDT_INIT_OFFSET
.globl idt_init
.type idt_init, @function
idt_init:                               /* crosses into the next page IDT_INIT_OFFSET bytes in */
    .fill IDT_INIT_OFFSET + 0x100, 1, 0x90
    ret
.size idt_init, . - idt_init
.section .rodata
ready: .asciz "large: ready\n"
.data
counter: .long 0
.bss
.align 4096
pd: .skip 4096
pt: .skip 4096
upt: .skip 4096
tpt: .skip 4096
.align 16
{STACK}
"""


def large_page_kernel(out: Path, name: str = "large-page") -> Path:
    return build(out, name, LARGE_PAGE, boot_segment_lds(), USER_FRAME=USER_FRAME, TWICE_VADDR=TWICE_VADDR,
                 TWICE_FRAME=TWICE_FRAME, IDT_INIT_OFFSET=IDT_INIT_OFFSET)
