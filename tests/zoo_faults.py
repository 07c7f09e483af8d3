"""Zoo kernels whose failure has a cause kgen must name first (issue 22, "the cause first"), built from the pieces of
tests/minikernels.py by GNU as/ld:

- a triple fault whose first fault is a #PF: the IDT lies on a page that is not mapped, so the #PF at `fault_here`
  (CR2 = FAULT_ADDRESS) cannot be delivered (its gate read faults at IDT_BASE + 14 * gate size: a #DF), nor can the
  #DF (its gate read faults too: the CPU resets). The registers QEMU keeps are the last fault's: CR2 is the #DF
  gate's address, not FAULT_ADDRESS. i386 (higher half) and x86_64 (long mode, identity-mapped).
- a kernel that relies on zeroed RAM: it reads a word at UNWRITTEN_WORD, physical memory nothing wrote, and says it
  is ready only when that word is 0 (else it panics and halts). CLEARS=1 writes the word first: the same kernel,
  right.
- a kernel that resets the machine on purpose (the keyboard controller's reset line): to QEMU the same "guest-reset"
  as a triple fault, told apart by the exception log.
"""
from __future__ import annotations

from pathlib import Path

from minikernels import (CLEAR_PD_PT, ELF64_LDS, ELF64_MULTIBOOT, FLAT_ENTRY, HIGH_ENTRY, HIGHER_HALF_LDS,
                         PAGE_TABLES, SERIAL_PUTS, STACK, build, halt_loop, map_image, map_low_and_high,
                         paging_on_and_jump_high, unmap_identity)

FAULT_ADDRESS = 0xDEAD0000
IDT_BASE = 0xE0000000                   # mapped in no page table of these kernels
GATE_SIZE = {32: 8, 64: 16}
DOUBLE_FAULT_GATE = {bits: IDT_BASE + 8 * size for bits, size in GATE_SIZE.items()}


def _fault_through_unmapped_idt(bits: int) -> str:
    """Load an IDT at IDT_BASE (unmapped), then write to FAULT_ADDRESS (unmapped) at `fault_here`."""
    pointer = ".long" if bits == 32 else ".quad"
    reg = "eax" if bits == 32 else "rax"
    return rf"""    lidt unmapped_idtr
    mov ${FAULT_ADDRESS:#x}, %{reg}
.globl fault_here
fault_here:
    movl $1, (%{reg})                   /* #PF, CR2 = FAULT_ADDRESS; its gate is unreadable: #DF, then reset */
{halt_loop()}
.pushsection .data
unmapped_idtr: .word 256 * {GATE_SIZE[bits]} - 1
    {pointer} {IDT_BASE:#x}
.popsection"""


# Higher half as minikernels.HIGHER_HALF (paging on, identity dropped), then the fault.
TRIPLE_FROM_PF = rf"""
{HIGH_ENTRY}
    mov $(stack_top - KBASE), %esp
{CLEAR_PD_PT}
{map_image()}
{map_low_and_high()}
{paging_on_and_jump_high()}
higher_half:
    mov $stack_top, %esp
{unmap_identity()}
{_fault_through_unmapped_idt(32)}
{SERIAL_PUTS}
{PAGE_TABLES}
{STACK}
"""

# minikernels.ELF64_MULTIBOOT (long mode, 2 MiB identity-mapped), faulting before it prints its ready line.
_PRINT64 = "    lea ready64(%rip), %rsi\n"
assert ELF64_MULTIBOOT.count(_PRINT64) == 1
TRIPLE_FROM_PF_64 = ELF64_MULTIBOOT.replace(_PRINT64, _fault_through_unmapped_idt(64) + "\n" + _PRINT64)


def triple_from_pf(out: Path, bits: int = 32) -> Path:
    """The triple-faulting kernel of `bits` (32: i386 higher half, 64: x86_64 long mode), built."""
    if bits == 32:
        return build(out, "triple-from-pf", TRIPLE_FROM_PF, HIGHER_HALF_LDS)
    return build(out, "triple-from-pf-64", TRIPLE_FROM_PF_64, ELF64_LDS, bits=64)


ZEROED_READY = "zero: ready"
ZEROED_PANIC = "zero: panic: the free list is not empty at boot"
UNWRITTEN_WORD = 0x300000                # 3 MiB: above the image, below any RAM size a test boots with
RELIES_ON_ZEROED_RAM = rf"""
{FLAT_ENTRY}
    mov $0x80000, %esp
.if CLEARS
    movl $0, {UNWRITTEN_WORD:#x}
.endif
    mov $ready, %esi
    cmpl $0, {UNWRITTEN_WORD:#x}         /* "the free list head": never written unless CLEARS */
    je 1f
    mov $panic, %esi
1:  call puts
{halt_loop()}
{SERIAL_PUTS}
ready: .asciz "{ZEROED_READY}\n"
panic: .asciz "{ZEROED_PANIC}\n"
"""


def relies_on_zeroed_ram(out: Path, *, clears: bool = False) -> Path:
    """The kernel above; `clears`: it writes the word before reading it."""
    return build(out, "zero-clears" if clears else "zero-relies", RELIES_ON_ZEROED_RAM, CLEARS=int(clears))


RESETS_SAYS = "reset: asking the keyboard controller"
RESETS = rf"""
{FLAT_ENTRY}
    mov $0x80000, %esp
    mov $says, %esi
    call puts
    mov $0xFE, %al                      /* pulse the reset line */
    out %al, $0x64
{halt_loop()}
{SERIAL_PUTS}
says: .asciz "{RESETS_SAYS}\n"
"""


def resets(out: Path) -> Path:
    return build(out, "resets", RESETS)
