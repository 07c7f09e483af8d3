"""Multiboot kernels written for GNU as and linked with GNU ld, i.e. built outside kgen: what `kgen test --kernel`
and the failure diagnosis must handle. Each is built by `build(tmp_path, name, **defsyms)`."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

HIGHER_HALF_READY = "mini: ready\n"

# A higher-half kernel: loaded at 1 MiB, linked at 0xC0100000. It maps its image through one page table (text and
# rodata read-only, data and bss writable), identity and high, plus a supervisor recursive PD slot 1023, turns on
# paging with CR0.WP, drops the identity entry, prints the marker and halts.
# WRITABLE_TEXT=1 maps every page writable: the segment-permission invariant must catch it.
HIGHER_HALF = r"""
.set KBASE, 0xC0000000
.section .multiboot, "a"
.align 4
    .long 0x1BADB002, 0x3, -(0x1BADB002 + 0x3)
.text
.globl _start
_start:
    cli
    mov $(stack_top - KBASE), %esp
    mov $(pd - KBASE), %edi
    xor %eax, %eax
    mov $2048, %ecx                     /* pd and pt: RAM may be poisoned */
    rep stosl
    mov $__image_start, %esi
map_page:
    mov %esi, %eax
    sub $KBASE, %eax
    or $1, %eax
    cmp $__data_start, %esi
    jb read_only
    or $2, %eax
read_only:
.if WRITABLE_TEXT
    or $2, %eax
.endif
    mov %esi, %edx
    shr $12, %edx
    and $0x3ff, %edx
    mov %eax, pt - KBASE(,%edx,4)
    add $0x1000, %esi
    cmp $__image_end, %esi
    jb map_page
    mov $(pt - KBASE + 3), %eax
    mov %eax, pd - KBASE
    mov %eax, pd - KBASE + 768 * 4
    mov $(pd - KBASE + 3), %eax
    mov %eax, pd - KBASE + 1023 * 4
    mov $(pd - KBASE), %eax
    mov %eax, %cr3
    mov %cr0, %eax
    or $0x80010000, %eax                /* PG | WP */
    mov %eax, %cr0
    lea higher_half, %eax
    jmp *%eax
higher_half:
    mov $stack_top, %esp
    movl $0, pd                         /* the identity entry */
    mov %cr3, %eax
    mov %eax, %cr3
    mov $ready, %esi
    call puts
idle:
    hlt
    jmp idle
puts:
    lodsb
    test %al, %al
    jz 1f
    mov $0x3F8, %dx
    out %al, %dx
    jmp puts
1:  ret
.section .rodata
ready: .asciz "mini: ready\n"
.data
counter: .long 0
.bss
.align 4096
pd: .skip 4096
pt: .skip 4096
stack: .skip 4096
stack_top:
"""

HIGHER_HALF_LDS = """
ENTRY(_start)
SECTIONS {
  . = 0xC0100000;
  __image_start = .;
  .text : AT(ADDR(.text) - 0xC0000000) { *(.multiboot) *(.text) }
  . = ALIGN(0x1000);
  .rodata : AT(ADDR(.rodata) - 0xC0000000) { *(.rodata) }
  . = ALIGN(0x1000);
  __data_start = .;
  .data : AT(ADDR(.data) - 0xC0000000) { *(.data) }
  .bss : AT(ADDR(.bss) - 0xC0000000) { *(.bss) }
  __image_end = ALIGN(0x1000);
}
"""

# Paging off, flat. FAILURE=0: print, then fault in `crash` with an empty IDT (a triple fault);
# FAILURE=1: print, then spin in `spin_forever` (a hang).
FLAT = r"""
.text
.globl _start
.align 4
    .long 0x1BADB002, 0x3, -(0x1BADB002 + 0x3)
_start:
    cli
    mov $0x80000, %esp
    mov $hello, %esi
    call puts
.if FAILURE == 0
    lidt empty_idtr
    call crash
.else
    call spin_forever
.endif
crash:
    nop
    movl $0, 0xdead0000
    ud2
spin_forever:
    jmp spin_forever
puts:
    lodsb
    test %al, %al
    jz 1f
    mov $0x3F8, %dx
    out %al, %dx
    jmp puts
1:  ret
empty_idtr: .word 0
            .long 0
hello: .asciz "flat: hello\n"
"""


def build(out: Path, name: str, source: str, linker_script: str | None = None, **defsyms: int) -> Path:
    """Assemble and link one kernel into out/name.elf."""
    if shutil.which("as") is None or shutil.which("ld") is None:
        pytest.skip("GNU as/ld not installed (Debian package binutils)")
    src, obj, elf = out / f"{name}.S", out / f"{name}.o", out / f"{name}.elf"
    src.write_text(source)
    syms = [arg for sym, value in defsyms.items() for arg in ("--defsym", f"{sym}={value}")]
    subprocess.run(["as", "--32", *syms, "-o", obj, src], check=True)
    if linker_script is None:
        link = ["-Ttext", "0x100000"]
    else:
        (out / f"{name}.ld").write_text(linker_script)
        link = ["-T", out / f"{name}.ld", "-z", "max-page-size=0x1000"]
    subprocess.run(["ld", "-m", "elf_i386", *link, "-o", elf, obj], check=True)
    return elf


# ---- a kernel with processes: two address spaces, user pages (REPORT) --------------------------------------------
# The Higher Half Bare Bones layout (boot segment identity-loaded at 1 MiB, the rest at 0xC0000000 + 1 MiB) with a
# GDT of its own (kernel code 0x08, data 0x10, user code 0x1b, user data 0x23) and two address spaces listed in the
# array `spaces` (top-level table physical addresses, 0 = unused slot): the kernel's page directory `kpd` and a
# process's `ppd`, which shares the kernel half (the same PDE) and adds two user pages (U/S, RW) outside the image: a
# code page at PROCESS_USER_CODE and a stack page at PROCESS_USER_STACK, on frames at 4 MiB and 4 MiB + 4 KiB.
# CURRENT=0|1: the space in CR3 when it halts (`cli; hlt` in ring 0, after printing PROCESS_READY).
# FLAW=1: the process's space (only) keeps a supervisor identity map of the image at PD[0], a page table of its own:
# the stray identity map the user pages must be told apart from.
# RING3=1: instead of halting, run the process: `jmp .` at PROCESS_USER_CODE in ring 3, interrupts off.
# FAULT_LOOP=1: instead of halting, touch the unmapped PROCESS_FAULT_ADDRESS with a #PF handler that returns without
# mapping it: the same page fault at the same instruction over and over.
PROCESS_READY = "proc: ready\n"
PROCESS_USER_CODE = 0x08048000
PROCESS_USER_STACK = 0xBFFFF000
PROCESS_USER_FRAME = 0x00400000
PROCESS_FAULT_ADDRESS = 0xDEAD0000
PROCESS_SPACES = "spaces"
PROCESS_SPACE_SLOTS = 4
PROCESS = r"""
.set KBASE, 0xC0000000
.section .multiboot.data, "aw"
.align 4
    .long 0x1BADB002, 0x3, -(0x1BADB002 + 0x3)
.section .multiboot.text, "ax"
.globl _start
_start:
    cli
    mov $(tables - KBASE), %edi
    xor %eax, %eax
    mov $(6 * 1024), %ecx               /* every table: RAM may be poisoned */
    rep stosl
    mov $0x100000, %esi                 /* physical: the boot segment, then the higher-half image */
1:  mov %esi, %eax
    or $1, %eax
    cmp $(__data_start - KBASE), %esi
    jb 2f
    or $2, %eax
2:  mov %esi, %edx
    shr $12, %edx
    and $0x3ff, %edx
    mov %eax, kpt - KBASE(,%edx,4)
    add $0x1000, %esi
    cmp $(__image_end - KBASE), %esi
    jb 1b
    mov $(kpt - KBASE + 3), %eax
    mov %eax, kpd - KBASE               /* identity, for the jump high */
    mov %eax, kpd - KBASE + 768 * 4
    mov $(kpd - KBASE), %eax
    mov %eax, %cr3
    mov %cr0, %eax
    or $0x80010000, %eax                /* PG | WP */
    mov %eax, %cr0
    lea higher_half, %eax
    jmp *%eax

.text
higher_half:
    mov $stack_top, %esp
    movl $0, kpd                        /* the identity entry */
    mov %cr3, %eax
    mov %eax, %cr3
    lgdt gdtr
    ljmp $0x08, $1f
1:  mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov kpd + 768 * 4, %eax             /* the process shares the kernel half */
    mov %eax, ppd + 768 * 4
    movl $(USER_FRAME + 7), upt + ((USER_CODE >> 12) & 0x3ff) * 4
    movl $(upt - KBASE + 7), ppd + (USER_CODE >> 22) * 4
    movl $(USER_FRAME + 0x1000 + 7), spt + ((USER_STACK >> 12) & 0x3ff) * 4
    movl $(spt - KBASE + 7), ppd + (USER_STACK >> 22) * 4
.if FLAW
    mov $kpt, %esi                      /* the image's entries, supervisor, at their physical addresses */
    mov $ipt, %edi
    mov $1024, %ecx
    rep movsl
    movl $(ipt - KBASE + 3), ppd
.endif
.if CURRENT
    mov $(ppd - KBASE), %eax
    mov %eax, %cr3
.endif
    mov $ready, %esi
    call puts
.if FAULT_LOOP
    movl $page_fault, %eax
    mov %ax, idt + 14 * 8
    movw $0x08, idt + 14 * 8 + 2
    movw $0x8E00, idt + 14 * 8 + 4
    shr $16, %eax
    mov %ax, idt + 14 * 8 + 6
    lidt idtr
fault_here:
    movl $1, FAULT_ADDRESS
.endif
.if RING3
    mov $(ppd - KBASE), %eax
    mov %eax, %cr3
    movw $0xFEEB, USER_CODE             /* jmp . */
    mov $0x23, %ax
    mov %ax, %ds
    mov %ax, %es
    push $0x23
    push $(USER_STACK + 0x1000)
    push $0x2                           /* EFLAGS: interrupts off */
    push $0x1b
    push $USER_CODE
    iret
.endif
halt:
    cli
    hlt
    jmp halt
puts:
    lodsb
    test %al, %al
    jz 1f
    mov $0x3F8, %dx
    out %al, %dx
    jmp puts
1:  ret
page_fault:                             /* drops the error code and retries the same access: nothing mapped */
    add $4, %esp
    iret
.section .rodata
ready: .asciz "proc: ready\n"
gdtr: .word 5 * 8 - 1
      .long gdt
idtr: .word 15 * 8 - 1
      .long idt
.data
.align 8
gdt:  .quad 0, 0x00CF9A000000FFFF, 0x00CF92000000FFFF, 0x00CFFA000000FFFF, 0x00CFF2000000FFFF
.globl spaces
.type spaces, @object
spaces: .long kpd - KBASE, ppd - KBASE, 0, 0
.size spaces, . - spaces
.bss
.align 4096
tables:
kpd: .skip 4096
kpt: .skip 4096
ppd: .skip 4096
upt: .skip 4096
spt: .skip 4096
ipt: .skip 4096
idt: .skip 15 * 8
.align 16
stack: .skip 4096
stack_top:
"""

PROCESS_LDS = """
ENTRY(_start)
SECTIONS {
  . = 1M;
  .multiboot.data : { *(.multiboot.data) }
  .multiboot.text : { *(.multiboot.text) }
  . = ALIGN(0x1000) + 0xC0000000;
  .text : AT(ADDR(.text) - 0xC0000000) { *(.text) }
  . = ALIGN(0x1000);
  .rodata : AT(ADDR(.rodata) - 0xC0000000) { *(.rodata) }
  . = ALIGN(0x1000);
  __data_start = .;
  .data : AT(ADDR(.data) - 0xC0000000) { *(.data) }
  .bss : AT(ADDR(.bss) - 0xC0000000) { *(.bss) }
  __image_end = ALIGN(0x1000);
}
"""


def process_kernel(out: Path, name: str, **flags: int) -> Path:
    """The two-space kernel above, built with its flags (CURRENT, FLAW, RING3, FAULT_LOOP; 0 unless given)."""
    values = {"CURRENT": 0, "FLAW": 0, "RING3": 0, "FAULT_LOOP": 0, **flags,
              "USER_CODE": PROCESS_USER_CODE, "USER_STACK": PROCESS_USER_STACK, "USER_FRAME": PROCESS_USER_FRAME,
              "FAULT_ADDRESS": PROCESS_FAULT_ADDRESS}
    return build(out, name, PROCESS, PROCESS_LDS, **values)


# --- when to look: kernels only --ready-vga / --ready-at judge right (tests/test_foreign_ready.py) -----------------

# Higher-half like HIGHER_HALF: `_start` is linked at 0xC010000C but runs at its load address 0x10000C (paging is
# off there). It maps its image and the VGA text page (0xB8000 at KBASE + 0xB8000), turns paging on, loads its own
# GDT, starts the BIOS's timer (IRQ0 at vector 8, 18.2 Hz) and waits READY_ZOO_TICKS ticks in `hlt` with interrupts
# on: in that wait it looks idle (halted, paging on, the same `hlt`) while its identity map is still there. Then it
# drops the identity map and calls `main_loop` (reached once, late), which sets `reached_main` and idles in `hlt`
# with interrupts on. Nothing is written to COM1.
# VGA=1: "zoo: booting" on screen row 10 before the wait, "zoo: ready" on row 11 after it (before main_loop).
# PANIC=1 (with VGA=1): after the wait, "zoo: panic: out of frames" on row 11 instead, then `cli; hlt` for good.
READY_ZOO_TICKS = 18
READY_ZOO_BOOTING, READY_ZOO_READY, READY_ZOO_PANIC = "zoo: booting", "zoo: ready", "zoo: panic: out of frames"
READY_ZOO = r"""
.set KBASE, 0xC0000000
.set VGA_PHYS, 0xB8000
.set ROW, 160                           /* bytes per screen row: 80 cells of character + attribute */
.section .multiboot, "a"
.align 4
    .long 0x1BADB002, 0x3, -(0x1BADB002 + 0x3)
.text
.globl _start
_start:
    cli
    mov $(stack_top - KBASE), %esp
    mov $(pd - KBASE), %edi
    xor %eax, %eax
    mov $2048, %ecx                     /* pd and pt: RAM may be poisoned */
    rep stosl
    mov $__image_start, %esi
map_page:
    mov %esi, %eax
    sub $KBASE, %eax
    or $1, %eax
    cmp $__data_start, %esi
    jb 1f
    or $2, %eax
1:  mov %esi, %edx
    shr $12, %edx
    and $0x3ff, %edx
    mov %eax, pt - KBASE(,%edx,4)
    add $0x1000, %esi
    cmp $__image_end, %esi
    jb map_page
    movl $(VGA_PHYS + 3), pt - KBASE + (VGA_PHYS >> 12) * 4
    mov $(pt - KBASE + 3), %eax
    mov %eax, pd - KBASE
    mov %eax, pd - KBASE + 768 * 4
    mov $(pd - KBASE), %eax
    mov %eax, %cr3
    mov %cr0, %eax
    or $0x80010000, %eax                /* PG | WP */
    mov %eax, %cr0
    lea higher_half, %eax
    jmp *%eax
higher_half:
    mov $stack_top, %esp
    lgdt gdtr                           /* the loader's GDT lies in low memory, unmapped later */
    ljmp $0x08, $1f
1:  mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
.if VGA
    mov $booting, %esi
    mov $(KBASE + VGA_PHYS + 10 * ROW), %edi
    call vga_puts
.endif
    call setup_timer
    sti
wait_ticks:                             /* looks idle to a sampler: halted at this hlt, interrupts and paging on */
    hlt
    cmpl $TICKS, ticks
    jb wait_ticks
    movl $0, pd                         /* the identity entry: boot is over */
    mov %cr3, %eax
    mov %eax, %cr3
.if PANIC
    mov $panic_text, %esi
    mov $(KBASE + VGA_PHYS + 11 * ROW), %edi
    call vga_puts
    cli
dead:
    hlt
    jmp dead
.endif
.if VGA
    mov $ready_text, %esi
    mov $(KBASE + VGA_PHYS + 11 * ROW), %edi
    call vga_puts
.endif
    call main_loop
.globl main_loop
main_loop:                              /* reached once, late */
    movl $1, reached_main
idle:
    sti
    hlt
    jmp idle
vga_puts:                               /* %esi: string, %edi: first cell; white on black */
    mov $0x0F, %ah
1:  lodsb
    test %al, %al
    jz 2f
    stosw
    jmp 1b
2:  ret
setup_timer:                            /* IRQ0 at vector 8 as the BIOS left the PIC; every other IRQ masked */
    mov $0xFE, %al
    out %al, $0x21
    mov $0xFF, %al
    out %al, $0xA1
    mov $tick, %eax
    mov %ax, idt + 8 * 8
    movw $0x8E00, idt + 8 * 8 + 4
    shr $16, %eax
    mov %ax, idt + 8 * 8 + 6
    movw $0x08, idt + 8 * 8 + 2
    lidt idtr
    ret
tick:
    push %eax
    incl ticks
    mov $0x20, %al
    out %al, $0x20
    pop %eax
    iret
.section .rodata
booting: .asciz "@BOOTING@"
ready_text: .asciz "@READY@"
panic_text: .asciz "@PANIC@"
idtr: .word 8 * 9 - 1
      .long idt
gdtr: .word 3 * 8 - 1
      .long gdt
.data
.globl ticks, reached_main
ticks: .long 0
reached_main: .long 0
.align 8
gdt:  .quad 0, 0x00CF9A000000FFFF, 0x00CF92000000FFFF     /* flat code 0x08, data 0x10 */
.bss
.align 4096
pd: .skip 4096
pt: .skip 4096
idt: .skip 8 * 9
.align 16
stack: .skip 4096
stack_top:
"""


def ready_zoo(out: Path, name: str, *, vga: bool = False, panic: bool = False, ticks: int = READY_ZOO_TICKS) -> Path:
    """The kernel above: VGA-only output (`vga`), a VGA panic (`panic`), `ticks` timer ticks of seemingly idle boot."""
    source = (READY_ZOO.replace("@BOOTING@", READY_ZOO_BOOTING).replace("@READY@", READY_ZOO_READY)
              .replace("@PANIC@", READY_ZOO_PANIC))
    return build(out, name, source, HIGHER_HALF_LDS, VGA=int(vga or panic), PANIC=int(panic), TICKS=ticks)


def vga_only(out: Path, name: str = "vga-only", **flags) -> Path:
    """Prints only to the VGA text screen, then idles with interrupts on: `--ready-vga "zoo: ready"`."""
    return ready_zoo(out, name, vga=True, **flags)


def late_symbol(out: Path, name: str = "late-symbol", **flags) -> Path:
    """Silent, idles with the timer running, reaches `main_loop` late: `--ready-at main_loop`."""
    return ready_zoo(out, name, **flags)


# --- [foreign], boot-only segments and a final spin (tests/test_foreign_config.py) ---------------------------------
# Higher-half like HIGHER_HALF (`_start` linked at 0xC0100000 + runs at its load address), its program headers placed
# by PHDRS: 0 `text` (Multiboot header, boot code, text), 1 `init` (.init.text, linked high like the rest: code run
# once at boot, as a kernel's __init code), 2 `rodata`, 3 `data`. It maps its image, turns paging on with CR0.WP,
# jumps high, calls `init_once` in the init segment, then drops the identity entry and unmaps the init segment's pages
# (given back, as a kernel frees its __init code), prints INIT_SPIN_READY and, with interrupts off, ends in:
# SPIN=0: `hlt`. SPIN=1: `jmp .` at `spin_here` as a short jump (EB FE). SPIN=2: the same as a near jump (E9 and -5).
# NEEDS_MIB=n: triple-fault unless Multiboot reports about n MiB of RAM (mem_upper at least n - 2 MiB).
INIT_SPIN_READY = "init: ready\n"
INIT_SPIN_SEGMENT = 1                   # the `init` program header
INIT_SPIN = r"""
.set KBASE, 0xC0000000
.section .multiboot, "a"
.align 4
    .long 0x1BADB002, 0x3, -(0x1BADB002 + 0x3)
.text
.globl _start
_start:
    cli
.if NEEDS_MIB
    cmpl $((NEEDS_MIB - 2) * 1024), 8(%ebx)     /* Multiboot mem_upper: KiB above 1 MiB */
    jae 1f
    ud2                                 /* too little RAM: no IDT, so a triple fault */
1:
.endif
    mov $(stack_top - KBASE), %esp
    mov $(pd - KBASE), %edi
    xor %eax, %eax
    mov $2048, %ecx                     /* pd and pt: RAM may be poisoned */
    rep stosl
    mov $__image_start, %esi
map_page:
    mov %esi, %eax
    sub $KBASE, %eax
    or $1, %eax
    cmp $__data_start, %esi
    jb 1f
    or $2, %eax
1:  mov %esi, %edx
    shr $12, %edx
    and $0x3ff, %edx
    mov %eax, pt - KBASE(,%edx,4)
    add $0x1000, %esi
    cmp $__image_end, %esi
    jb map_page
    mov $(pt - KBASE + 3), %eax
    mov %eax, pd - KBASE
    mov %eax, pd - KBASE + 768 * 4
    mov $(pd - KBASE), %eax
    mov %eax, %cr3
    mov %cr0, %eax
    or $0x80010000, %eax                /* PG | WP */
    mov %eax, %cr0
    lea higher_half, %eax
    jmp *%eax
higher_half:
    mov $stack_top, %esp
    call init_once
    movl $0, pd                         /* the identity entry */
    mov $__init_start, %esi             /* the init segment's pages: boot is over */
1:  mov %esi, %edx
    shr $12, %edx
    and $0x3ff, %edx
    movl $0, pt(,%edx,4)
    add $0x1000, %esi
    cmp $__init_end, %esi
    jb 1b
    mov %cr3, %eax
    mov %eax, %cr3
    mov $ready, %esi
    call puts
    cli
.if SPIN == 1
spin_here:
    jmp spin_here
.elseif SPIN == 2
spin_here:
    .byte 0xE9
    .long -5
.else
halt:
    hlt
    jmp halt
.endif
puts:
    lodsb
    test %al, %al
    jz 1f
    mov $0x3F8, %dx
    out %al, %dx
    jmp puts
1:  ret
.section .init.text, "ax"
.globl init_once
init_once:
    movl $1, init_done
    ret
.section .rodata
ready: .asciz "@READY@"
.data
.globl init_done
init_done: .long 0
.bss
.align 4096
pd: .skip 4096
pt: .skip 4096
stack: .skip 4096
stack_top:
"""

INIT_SPIN_LDS = """
ENTRY(_start)
PHDRS { text PT_LOAD FLAGS(5); init PT_LOAD FLAGS(5); rodata PT_LOAD FLAGS(4); data PT_LOAD FLAGS(6); }
SECTIONS {
  . = 0xC0100000;
  __image_start = .;
  .text : AT(ADDR(.text) - 0xC0000000) { *(.multiboot) *(.text) } :text
  . = ALIGN(0x1000);
  __init_start = .;
  .init.text : AT(ADDR(.init.text) - 0xC0000000) { *(.init.text) } :init
  . = ALIGN(0x1000);
  __init_end = .;
  .rodata : AT(ADDR(.rodata) - 0xC0000000) { *(.rodata) } :rodata
  . = ALIGN(0x1000);
  __data_start = .;
  .data : AT(ADDR(.data) - 0xC0000000) { *(.data) } :data
  .bss : AT(ADDR(.bss) - 0xC0000000) { *(.bss) } :data
  __image_end = ALIGN(0x1000);
}
"""


def init_spin(out: Path, name: str, *, spin: int = 0, needs_mib: int = 0) -> Path:
    """The kernel above: `spin` 0 (halts), 1 (`jmp .` short) or 2 (`jmp .` near); below `needs_mib` MiB it
    triple-faults."""
    return build(out, name, INIT_SPIN.replace("@READY@", INIT_SPIN_READY.replace("\n", "\\n")), INIT_SPIN_LDS,
                 SPIN=spin, NEEDS_MIB=needs_mib)
