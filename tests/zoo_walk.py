"""Zoo kernels for the page walk (issue 22, "the walk goes on"): kernels that run correctly while their live page
tables hold entries the CPU would refuse, in a range they never touch. Built with GNU as/ld like the kernels of
tests/minikernels.py, from its pieces.
"""
from __future__ import annotations

from pathlib import Path

from minikernels import ENTER_LONG_MODE, build, descriptor_pointer

# ---- an x86_64 kernel whose live space stores kernel virtual addresses in two PD entries --------------------------
# As a 64-bit hobby port did: it keeps, in two page-directory entries of a process's space, the *virtual* address of
# a kernel structure where a table's physical address belongs. Marked present, such an entry has address bits above
# MAXPHYADDR set (reserved: an access below it is a page fault with error code RSVD); the kernel never touches that
# range, so it runs.
#
# Linked and loaded at 1 MiB (ELF64, Multiboot 1 with the a.out kludge so QEMU's -kernel loads it). In 32-bit
# protected mode it builds 4-level tables: PML4[0] -> PDPT[0] -> PD[0] -> PT, one 4 KiB page per image page at its
# own address (text read-only, rodata read-only NX, data and bss writable NX), a supervisor recursive slot
# PML4[WALK64_RECURSIVE_SLOT], and PD[5], PD[6] (0xa00000-0xe00000) holding WALK64_BAD_PDE plus 8 * index. It turns
# on EFER.NXE, enters long mode with CR0.WP, prints WALK64_READY and halts with interrupts off.
WALK64_READY = "walk64: ready\n"
WALK64_BAD_PDE = 0xFFFF_FFFF_8010_5003          # a kernel virtual address | P | RW
WALK64_BAD_SLOTS = (5, 6)                       # PD indices: 2 MiB each from 0
WALK64_RECURSIVE_SLOT = 510
WALK64 = rf"""
.set FLAGS, 0x00010003
.text
.code32
.globl _start
.align 4
mb_header:
    .long 0x1BADB002, FLAGS, -(0x1BADB002 + FLAGS)
    .long mb_header, mb_header, __load_end, __image_end, _start
_start:
    cli
    mov $stack_top, %esp
    mov $pml4, %edi
    xor %eax, %eax
    mov $(4 * 1024), %ecx               /* pml4, pdpt, pd, pt: RAM may be poisoned */
    rep stosl
    movl $(pdpt + 3), pml4
    movl $(pml4 + 3), pml4 + {WALK64_RECURSIVE_SLOT} * 8     /* recursive, supervisor */
    movl $(pd + 3), pdpt
    movl $(pt + 3), pd
    mov $__image_start, %esi            /* each image page at its own address */
map_page:
    mov %esi, %eax
    or $1, %eax                         /* P; text: read-only, executable */
    xor %edx, %edx
    cmp $__rodata_start, %esi
    jb 1f
    mov $0x80000000, %edx               /* NX from rodata on */
    cmp $__data_start, %esi
    jb 1f
    or $2, %eax                         /* RW from data on */
1:  mov %esi, %ebx
    shr $12, %ebx
    and $511, %ebx
    mov %eax, pt(,%ebx,8)
    mov %edx, pt + 4(,%ebx,8)
    add $0x1000, %esi
    cmp $__image_end, %esi
    jb map_page
    /* The flaw: a kernel virtual address where a PD entry's table address belongs. */
    movl $(BAD_PDE_LOW + 5 * 8), pd + 5 * 8
    movl $BAD_PDE_HIGH, pd + 5 * 8 + 4
    movl $(BAD_PDE_LOW + 6 * 8), pd + 6 * 8
    movl $BAD_PDE_HIGH, pd + 6 * 8 + 4
    mov $0xC0000080, %ecx               /* EFER.NXE: bit 63 of an entry is NX */
    rdmsr
    or $0x800, %eax
    wrmsr
{ENTER_LONG_MODE}
    lea ready(%rip), %rsi
1:  lodsb
    test %al, %al
    jz 2f
    mov $0x3F8, %dx
    out %al, %dx
    jmp 1b
2:  cli
    hlt
    jmp 2b
.section .rodata
ready: .asciz "walk64: ready\n"
.data
.align 8
gdt:  .quad 0, 0x00AF9A000000FFFF     /* in .data: the CPU sets the accessed bit of the descriptor it loads */
{descriptor_pointer("gdtr", "gdt", "2 * 8")}
.bss
.align 4096
pml4: .skip 4096
pdpt: .skip 4096
pd:   .skip 4096
pt:   .skip 4096
stack: .skip 4096
stack_top:
"""

WALK64_LDS = """
ENTRY(_start)
PHDRS { text PT_LOAD FLAGS(5); rodata PT_LOAD FLAGS(4); data PT_LOAD FLAGS(6); }
SECTIONS {
  . = 1M;
  __image_start = .;
  .text : { *(.text) } :text
  . = ALIGN(0x1000);
  __rodata_start = .;
  .rodata : { *(.rodata) } :rodata
  . = ALIGN(0x1000);
  __data_start = .;
  .data : { *(.data) } :data
  __load_end = .;
  .bss : { *(.bss) } :data
  __image_end = ALIGN(0x1000);
}
"""


def walk64(out: Path, name: str = "walk64") -> Path:
    """The kernel above, built."""
    return build(out, name, WALK64, WALK64_LDS, bits=64, BAD_PDE_LOW=WALK64_BAD_PDE & 0xFFFF_FFFF,
                 BAD_PDE_HIGH=WALK64_BAD_PDE >> 32)
