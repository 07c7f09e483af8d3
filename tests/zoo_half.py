"""Zoo kernels that show what a kernel half is (issue 22, point 2): mappings that are right where the paging mode puts
the kernel half or the user half, which kgen once reported as flaws. Built like every zoo kernel (tests/minikernels.py,
whose pieces they are made of); tests/guest/test_kernel_half.py boots them.

- `half64`: an x86_64 kernel linked at -2 GiB that keeps, in the upper canonical half, a direct map of RAM at
  HALF64_DIRECT_MAP and an MMIO window (uncached, not RAM) at HALF64_MMIO, below its own base.
- `guard_page`: the two-space process kernel (PROCESS) whose user stack has a supervisor-only guard page below it.
- `low64`: an x86_64 kernel linked where it is loaded (1 MiB), its whole first GiB identity-mapped RWX with 2 MiB
  pages, and a user page of a process in the low half.
"""
from __future__ import annotations

from pathlib import Path

from minikernels import (ELF64_LDS, ELF64_MULTIBOOT, ENTER_LONG_MODE, MB2_X86_64_LDS, PROCESS, PROCESS_LDS,
                         PROCESS_USER_CODE, PROCESS_USER_FRAME, PROCESS_USER_STACK, SERIAL_PUTS64, build,
                         descriptor_pointer, halt_loop, multiboot2_header, process_kernel)

# ---- half64 ----------------------------------------------------------------------------------------------------
# Multiboot 2 (through GRUB), like MB2_X86_64: its boot part at 1 MiB builds 4-level tables, enters long mode and
# jumps to its text at 0xFFFFFFFF80100000+ (PML4[511] -> PDPT[510] -> one 2 MiB page at physical 0). Besides, in the
# kernel half: PML4[256] -> PDPT -> PD of HALF64_DIRECT_MAP_PAGES 2 MiB pages mapping physical 0 up (a direct map of
# RAM, as Limine's at 0xffff800000000000), and PDPT[509] -> PD[0]: one uncached 2 MiB page at HALF64_MMIO mapping
# the IOAPIC's physical 0xFEC00000 (no RAM there). Once high, it drops the boot identity map (PML4[0]) through the
# high alias of its tables, prints its ready line and halts.
HALF64_READY = "half64: ready\n"
HALF64_BASE = 0xFFFFFFFF80000000
HALF64_MMIO = 0xFFFFFFFF40000000
HALF64_MMIO_FRAME = 0xFEC00000
HALF64_DIRECT_MAP = 0xFFFF800000000000
HALF64_DIRECT_MAP_PAGES = 32                    # 64 MiB: RAM in any guest kgen boots (128 MiB by default)
HALF64 = rf"""
.section .multiboot, "a"
{multiboot2_header()}
.section .boot, "ax"
.code32
.globl _start
_start:
    cli
    mov $boot_stack_top, %esp
    mov $pml4, %edi
    xor %eax, %eax
    mov $(8 * 1024), %ecx               /* every table: RAM may be poisoned */
    rep stosl
    movl $(pdpt_low + 3), pml4
    movl $(pdpt_high + 3), pml4 + 511 * 8
    movl $(pdpt_direct + 3), pml4 + 256 * 8
    movl $(pd_low + 3), pdpt_low
    movl $(pd_high + 3), pdpt_high + 510 * 8
    movl $(pd_mmio + 3), pdpt_high + 509 * 8
    movl $(pd_direct + 3), pdpt_direct
    movl $0x83, pd_low                  /* 2 MiB at physical 0: P RW PS, the boot identity map */
    movl $0x83, pd_high                 /* the same 2 MiB at the kernel's base */
    movl $(MMIO_FRAME + 0x9B), pd_mmio  /* P RW PWT PCD PS: an uncached device window */
    mov $pd_direct, %edi
    mov $0x83, %eax
    mov $DIRECT_MAP_PAGES, %ecx
1:  mov %eax, (%edi)                    /* the direct map: 2 MiB pages of RAM from physical 0 */
    add $0x200000, %eax
    add $8, %edi
    loop 1b
{ENTER_LONG_MODE}
    movabs $higher_half, %rax           /* by its linked address: a relative jump would stay low */
    jmp *%rax
.section .boot.data, "aw"
.balign 8
gdt:  .quad 0, 0x00AF9A000000FFFF     /* 64-bit code 0x08 */
{descriptor_pointer("gdtr", "gdt", "2 * 8")}
.balign 4096
pml4: .skip 4096
pdpt_low: .skip 4096
pdpt_high: .skip 4096
pdpt_direct: .skip 4096
pd_low: .skip 4096
pd_high: .skip 4096
pd_mmio: .skip 4096
pd_direct: .skip 4096
boot_stack: .skip 4096
boot_stack_top:
.text
higher_half:
    movabs $stack_top, %rsp
    movabs $(pml4 + KBASE), %rax        /* the PML4 through the kernel's alias of low memory */
    movq $0, (%rax)                     /* PML4[0]: the identity map, not needed once high */
    mov %cr3, %rax
    mov %rax, %cr3
    lea ready(%rip), %rsi
    call puts
{halt_loop()}
{SERIAL_PUTS64}
.section .rodata
hexdigits: .ascii "0123456789abcdef"
ready: .asciz "half64: ready\n"
.bss
.balign 16
stack: .skip 4096
stack_top:
"""


def half64(out: Path, name: str = "half64") -> Path:
    return build(out, name, HALF64, MB2_X86_64_LDS, bits=64, KBASE=HALF64_BASE, MMIO_FRAME=HALF64_MMIO_FRAME,
                 DIRECT_MAP_PAGES=HALF64_DIRECT_MAP_PAGES)


# ---- guard_page ------------------------------------------------------------------------------------------------
# PROCESS with the process's space in CR3 (CURRENT=1) and, in the page table of its user stack, the page below the
# stack present but supervisor-only (P RW, no U/S) on a frame of its own past the user pages: a guard page, as
# teaching kernels put under a user stack so that a stack overflow faults.
GUARD_PAGE = PROCESS_USER_STACK - 0x1000
GUARD_FRAME = PROCESS_USER_FRAME + 0x2000
_USER_STACK_LINE = "    movl $(spt - KBASE + 7), ppd + (USER_STACK >> 22) * 4\n"
GUARD_PROCESS = PROCESS.replace(_USER_STACK_LINE, _USER_STACK_LINE +
                                "    movl $(GUARD_FRAME + 3), spt + (((USER_STACK - 0x1000) >> 12) & 0x3ff) * 4\n")
assert GUARD_PROCESS != PROCESS


def guard_page(out: Path, name: str = "guard-page") -> Path:
    return build(out, name, GUARD_PROCESS, PROCESS_LDS, CURRENT=1, FLAW=0, RING3=0, FAULT_LOOP=0,
                 USER_CODE=PROCESS_USER_CODE, USER_STACK=PROCESS_USER_STACK, USER_FRAME=PROCESS_USER_FRAME,
                 FAULT_ADDRESS=0, GUARD_FRAME=GUARD_FRAME)


# ---- low64 -----------------------------------------------------------------------------------------------------
# ELF64_MULTIBOOT (linked and loaded at 1 MiB, booted by QEMU's -kernel through its header's address fields) with its
# one 2 MiB identity page widened to the whole first GiB (512 pages of 2 MiB, P RW PS: read, write and execute) and a
# process's user page: PDPT[1] -> PD[0], one 2 MiB page U/S at LOW64_USER (1 GiB) on the frames at LOW64_USER_FRAME
# (PML4[0] grants U/S, the identity map's PDPT[0] withholds it).
LOW64_READY = "x64: ready\n"
LOW64_USER = 0x40000000
LOW64_USER_FRAME = 0x00400000
_ONE_PAGE = "    movl $0x83, pd                      /* 2 MiB at 0: P RW PS */\n"
LOW64 = ELF64_MULTIBOOT.replace(_ONE_PAGE, r"""    mov $pd, %edi
    mov $0x83, %eax
    mov $512, %ecx
1:  mov %eax, (%edi)                    /* 1 GiB identity: 2 MiB pages, P RW PS */
    add $0x200000, %eax
    add $8, %edi
    loop 1b
    movl $(user_pd + 7), pdpt + 8       /* PDPT[1]: the process's first GiB of its own, P RW US */
    movl $(USER_FRAME + 0x87), user_pd  /* one 2 MiB user page: P RW US PS */
""").replace("pd:   .skip 4096\n", "pd:   .skip 4096\nuser_pd: .skip 4096\n").replace(
    "    mov $3072, %ecx\n", "    mov $4096, %ecx\n").replace(
    "    movl $(pdpt + 3), pml4\n", "    movl $(pdpt + 7), pml4\n")     # U/S at the top: the PDPT entries decide
assert LOW64.count("user_pd") == 3 and "$4096, %ecx" in LOW64 and "$(pdpt + 7)" in LOW64


def low64(out: Path, name: str = "low64") -> Path:
    return build(out, name, LOW64, ELF64_LDS, bits=64, USER_FRAME=LOW64_USER_FRAME)
