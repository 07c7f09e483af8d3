"""Multiboot kernels written for GNU as and linked with GNU ld, i.e. built outside kgen: what `kgen test --kernel`
and the failure diagnosis must handle. Each is built by `build(tmp_path, name, source, linker_script, **defsyms)`.

The kernels are composed of the named pieces below (the Multiboot header, the page-table setup, the jump to the
higher half, the GDT and timer, serial output, the halt loops), so each kernel's text reads as what makes it
different. The tests that boot them share `outcomes` (pytest's verdicts in `kgen test -- -v`) from here too."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def outcomes(stdout: str) -> dict[str, str]:
    """test name -> PASSED/FAILED/SKIPPED/ERROR from pytest's -v lines ("path::test PASSED [ 4%]")."""
    found = {}
    for line in stdout.splitlines():
        parts = line.split()
        if len(parts) >= 2 and "::" in parts[0] and parts[1] in ("PASSED", "FAILED", "SKIPPED", "ERROR"):
            found[parts[0].split("::")[-1]] = parts[1]
    return found


def build(out: Path, name: str, source: str, linker_script: str | None = None, *, bits: int = 32,
          **defsyms: int) -> Path:
    """Assemble and link one kernel into out/name.elf (an ELF32, or an ELF64 with bits=64); with no linker script
    its text is linked at 1 MiB."""
    if shutil.which("as") is None or shutil.which("ld") is None:
        pytest.skip("GNU as/ld not installed (Debian package binutils)")
    src, obj, elf = out / f"{name}.S", out / f"{name}.o", out / f"{name}.elf"
    src.write_text(source)
    syms = [arg for sym, value in defsyms.items() for arg in ("--defsym", f"{sym}={value}")]
    subprocess.run(["as", f"--{bits}", *syms, "-o", obj, src], check=True)
    if linker_script is None:
        link = ["-Ttext", "0x100000"]
    else:
        (out / f"{name}.ld").write_text(linker_script)
        link = ["-T", out / f"{name}.ld", "-z", "max-page-size=0x1000"]
    subprocess.run(["ld", "-m", "elf_i386" if bits == 32 else "elf_x86_64", *link, "-o", elf, obj], check=True)
    return elf


# ---- the pieces: GNU as text shared by the kernels -----------------------------------------------------------
# Each piece is a run of whole lines without the last newline, to stand on a line of its own in a kernel's text.
# The higher-half pieces assume `.set KBASE, 0xC0000000` (the entries below set it), a page directory `pd` and one
# page table `pt` in .bss (names a kernel can change), and a kernel linked at KBASE above where it is loaded.


def _line(code: str, comment: str) -> str:
    """One instruction with its comment at column 40, as the kernels lay them out."""
    return f"    {code}".ljust(40) + f"/* {comment} */"


# The Multiboot (version 1) header: magic, flags (bit 0: modules page-aligned, bit 1: memory information), a checksum
# that makes the three sum to 0. The loader looks for it 4-aligned in the first 8 KiB of the file.
MULTIBOOT_HEADER = r""".align 4
    .long 0x1BADB002, 0x3, -(0x1BADB002 + 0x3)"""

# Entry of a flat kernel (linked where it is loaded, paging off): the header at the start of .text.
FLAT_ENTRY = rf""".text
.globl _start
{MULTIBOOT_HEADER}
_start:
    cli"""

# Entry of a kernel linked whole at KBASE + its load address: the header in a section of its own, first in .text
# (HIGHER_HALF_LDS). `_start` runs at its load address with paging off, so until the jump high it must subtract
# KBASE from every address it uses.
HIGH_ENTRY = rf""".set KBASE, 0xC0000000
.section .multiboot, "a"
{MULTIBOOT_HEADER}
.text
.globl _start
_start:
    cli"""

# Entry of a kernel in the OSDev "Higher Half Bare Bones" layout: a boot segment (`.multiboot.data` with the header,
# `.multiboot.text` with `_start`) linked and loaded at 1 MiB, the rest linked high (boot_segment_lds).
BOOT_SEGMENT_ENTRY = rf""".set KBASE, 0xC0000000
.section .multiboot.data, "aw"
{MULTIBOOT_HEADER}
.section .multiboot.text, "ax"
.globl _start
_start:
    cli"""

# NEEDS_MIB=n (a --defsym): triple-fault unless Multiboot reports about n MiB of RAM. %ebx holds the Multiboot info.
NEEDS_MIB_CHECK = r""".if NEEDS_MIB
    cmpl $((NEEDS_MIB - 2) * 1024), 8(%ebx)     /* Multiboot mem_upper: KiB above 1 MiB, less firmware's */
    jae 1f
    ud2                                 /* too little RAM: no IDT of its own, so a triple fault */
1:
.endif"""

# Zero `pd` and the `pt` after it (the loader does not clear .bss for us, and the tests poison RAM).
CLEAR_PD_PT = r"""    mov $(pd - KBASE), %edi
    xor %eax, %eax
    mov $2048, %ecx                     /* pd and pt: RAM may be poisoned */
    rep stosl"""


def map_image(*, boot_segment: bool = False, pt: str = "pt", also: str = "") -> str:
    """Fill page table `pt` with the image's pages at their physical frames, indexed by their linked address's
    bits 12-21 (one table covers 4 MiB, so the same table serves PD[0] and PD[768]): present, and writable from
    `__data_start` on (text and rodata read-only, which CR0.WP enforces on the kernel too). A kernel linked whole
    high walks its linked addresses from `__image_start`; with `boot_segment`, the walk starts at the physical
    1 MiB, so the boot segment is mapped too. `also`: lines run before each entry is stored (%eax is the entry)."""
    if boot_segment:
        first = _line("mov $0x100000, %esi", "physical: the boot segment, then the higher-half image")
        to_frame, data, end = "", "$(__data_start - KBASE)", "$(__image_end - KBASE)"
    else:
        first = "    mov $__image_start, %esi"
        to_frame, data, end = "\n    sub $KBASE, %eax", "$__data_start", "$__image_end"
    also = f"\n{also}" if also else ""
    return rf"""{first}
map_page:
    mov %esi, %eax{to_frame}
    or $1, %eax
    cmp {data}, %esi
    jb 1f
    or $2, %eax
1:{also}
    mov %esi, %edx
    shr $12, %edx
    and $0x3ff, %edx
    mov %eax, {pt} - KBASE(,%edx,4)
    add $0x1000, %esi
    cmp {end}, %esi
    jb map_page"""


def map_low_and_high(pd: str = "pd", pt: str = "pt") -> str:
    """Point PD[0] (identity: the code runs there until the jump high) and PD[768] (KBASE) at the same table."""
    return (f"    mov $({pt} - KBASE + 3), %eax\n" + _line(f"mov %eax, {pd} - KBASE", "identity, for the jump high")
            + f"\n    mov %eax, {pd} - KBASE + 768 * 4")


def paging_on_and_jump_high(pd: str = "pd") -> str:
    """Load CR3, turn on paging with write protection, and jump to `higher_half` by its linked address (a relative
    jump would stay low)."""
    return rf"""    mov $({pd} - KBASE), %eax
    mov %eax, %cr3
    mov %cr0, %eax
    or $0x80010000, %eax                /* PG | WP */
    mov %eax, %cr0
    lea higher_half, %eax
    jmp *%eax"""


# Reloading CR3 drops every non-global TLB entry: a page-table entry just cleared is gone for the CPU too.
FLUSH_TLB = r"""    mov %cr3, %eax
    mov %eax, %cr3"""


def unmap_identity(pd: str = "pd", why: str = "the identity entry") -> str:
    """Clear PD[0], the identity map the boot code ran in, once running high; then flush the TLB."""
    return _line(f"movl $0, {pd}", why) + "\n" + FLUSH_TLB


# Load the kernel's own GDT and its selectors (code 0x08, data 0x10): the loader's GDT lies in low memory, which the
# kernel unmaps, and the Multiboot spec says not to rely on it anyway.
LOAD_GDT = r"""    lgdt gdtr                           /* the loader's GDT lies in low memory, which goes unmapped */
    ljmp $0x08, $1f
1:  mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss"""

# The flat 4 GiB ring-0 GDT LOAD_GDT loads (with `descriptor_pointer("gdtr", "gdt", "3 * 8")`).
FLAT_GDT = r""".align 8
gdt:  .quad 0, 0x00CF9A000000FFFF, 0x00CF92000000FFFF     /* flat code 0x08, data 0x10 */"""


def descriptor_pointer(name: str, table: str, size: str) -> str:
    """The 6-byte operand of lgdt/lidt: limit (`size` - 1), then the table's (linked) address."""
    return f"{name}: .word {size} - 1\n      .long {table}"


# Interrupts from the BIOS's timer (PIT channel 0, ~18.2 Hz) with the PIC as the BIOS left it (IRQ0 at vector 8):
# unmask IRQ0 only and point IDT entry 8 (an interrupt gate, code 0x08) at `tick`. Needs LOAD_GDT, an `idt` of
# 9 entries in .bss and `descriptor_pointer("idtr", "idt", "8 * 9")`.
SETUP_TIMER = r"""setup_timer:
    mov $0xFE, %al                      /* every IRQ masked but IRQ0 */
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
    ret"""


def timer_tick(counted: bool) -> str:
    """The IRQ0 handler: `incl ticks` if `counted`, then the end-of-interrupt to the PIC."""
    count = "\n    incl ticks" if counted else ""
    return rf"""tick:
    push %eax{count}
    mov $0x20, %al
    out %al, $0x20
    pop %eax
    iret"""


# Serial output: the NUL-terminated string at %esi to COM1 (no FIFO check: QEMU's UART takes every byte at once).
SERIAL_PUTS = r"""puts:
    lodsb
    test %al, %al
    jz 1f
    mov $0x3F8, %dx
    out %al, %dx
    jmp puts
1:  ret"""


def halt_loop(label: str = "halt") -> str:
    """Halt for good (with interrupts off; an NMI or SMI would wake the hlt, hence the loop)."""
    return f"{label}:\n    hlt\n    jmp {label}"


# Idle with interrupts on: each interrupt wakes the hlt, its handler returns here, and it halts again.
IDLE = r"""idle:
    sti
    hlt
    jmp idle"""

# The page directory and the one page table of the higher-half kernels, page-aligned in .bss.
PAGE_TABLES = r""".bss
.align 4096
pd: .skip 4096
pt: .skip 4096"""

STACK = r"""stack: .skip 4096
stack_top:"""


def _high_half_rest(rodata_phdr: str = "", data_phdr: str = "") -> str:
    """The linker script after .text for a higher-half kernel: rodata and data+bss each page-aligned (their own
    permissions), linked at KBASE above their load address, `__data_start` and `__image_end` for map_image."""
    return ("  . = ALIGN(0x1000);\n"
            "  .rodata : AT(ADDR(.rodata) - 0xC0000000) { *(.rodata) }" + rodata_phdr + "\n"
            "  . = ALIGN(0x1000);\n"
            "  __data_start = .;\n"
            "  .data : AT(ADDR(.data) - 0xC0000000) { *(.data) }" + data_phdr + "\n"
            "  .bss : AT(ADDR(.bss) - 0xC0000000) { *(.bss) }" + data_phdr + "\n"
            "  __image_end = ALIGN(0x1000);\n"
            "}\n")


def boot_segment_lds(after_text: str = "") -> str:
    """The Higher Half Bare Bones linker script (BOOT_SEGMENT_ENTRY): `.multiboot.*` linked and loaded at 1 MiB,
    everything else linked at 0xC0000000 above its load address. `after_text`: lines after the .text output."""
    return ("\nENTRY(_start)\n"
            "SECTIONS {\n"
            "  . = 1M;\n"
            "  .multiboot.data : { *(.multiboot.data) }\n"
            "  .multiboot.text : { *(.multiboot.text) }\n"
            "  . = ALIGN(0x1000) + 0xC0000000;\n"
            "  .text : AT(ADDR(.text) - 0xC0000000) { *(.text) }\n" + after_text + _high_half_rest())


# ---- the kernels -----------------------------------------------------------------------------------------------
HIGHER_HALF_READY = "mini: ready\n"

# A higher-half kernel: loaded at 1 MiB, linked at 0xC0100000. It maps its image through one page table (text and
# rodata read-only, data and bss writable), identity and high, plus a supervisor recursive PD slot 1023, turns on
# paging with CR0.WP, drops the identity entry, prints the marker and halts.
# WRITABLE_TEXT=1 maps every page writable: the segment-permission invariant must catch it.
HIGHER_HALF = rf"""
{HIGH_ENTRY}
    mov $(stack_top - KBASE), %esp
{CLEAR_PD_PT}
{map_image(also='''.if WRITABLE_TEXT
    or $2, %eax
.endif''')}
{map_low_and_high()}
    mov $(pd - KBASE + 3), %eax
    mov %eax, pd - KBASE + 1023 * 4
{paging_on_and_jump_high()}
higher_half:
    mov $stack_top, %esp
{unmap_identity()}
    mov $ready, %esi
    call puts
{halt_loop("idle")}
{SERIAL_PUTS}
.section .rodata
ready: .asciz "mini: ready\n"
.data
counter: .long 0
{PAGE_TABLES}
{STACK}
"""

HIGHER_HALF_LDS = """
ENTRY(_start)
SECTIONS {
  . = 0xC0100000;
  __image_start = .;
  .text : AT(ADDR(.text) - 0xC0000000) { *(.multiboot) *(.text) }
""" + _high_half_rest()

# Paging off, flat. FAILURE=0: print, then fault in `crash` with an empty IDT (a triple fault);
# FAILURE=1: print, then spin in `spin_forever` (a hang).
FLAT = rf"""
{FLAT_ENTRY}
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
{SERIAL_PUTS}
empty_idtr: .word 0
            .long 0
hello: .asciz "flat: hello\n"
"""


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
PROCESS = rf"""
{BOOT_SEGMENT_ENTRY}
    mov $(tables - KBASE), %edi
    xor %eax, %eax
    mov $(6 * 1024), %ecx               /* every table: RAM may be poisoned */
    rep stosl
{map_image(boot_segment=True, pt="kpt")}
{map_low_and_high(pd="kpd", pt="kpt")}
{paging_on_and_jump_high(pd="kpd")}

.text
higher_half:
    mov $stack_top, %esp
{unmap_identity(pd="kpd")}
{LOAD_GDT}
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
{SERIAL_PUTS}
page_fault:                             /* drops the error code and retries the same access: nothing mapped */
    add $4, %esp
    iret
.section .rodata
ready: .asciz "proc: ready\n"
{descriptor_pointer("gdtr", "gdt", "5 * 8")}
{descriptor_pointer("idtr", "idt", "15 * 8")}
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
{STACK}
"""

PROCESS_LDS = boot_segment_lds()


def process_kernel(out: Path, name: str, **flags: int) -> Path:
    """The two-space kernel above, built with its flags (CURRENT, FLAW, RING3, FAULT_LOOP; 0 unless given)."""
    values = {"CURRENT": 0, "FLAW": 0, "RING3": 0, "FAULT_LOOP": 0, **flags,
              "USER_CODE": PROCESS_USER_CODE, "USER_STACK": PROCESS_USER_STACK, "USER_FRAME": PROCESS_USER_FRAME,
              "FAULT_ADDRESS": PROCESS_FAULT_ADDRESS}
    return build(out, name, PROCESS, PROCESS_LDS, **values)


# --- when to look: kernels only --ready-vga / --ready-at judge right (tests/harness/test_foreign_ready.py) -----------------

# Higher-half like HIGHER_HALF: `_start` is linked at 0xC010000C but runs at its load address 0x10000C (paging is
# off there). It maps its image and the VGA text page (0xB8000 at KBASE + 0xB8000), turns paging on, loads its own
# GDT, starts the BIOS's timer (IRQ0 at vector 8, 18.2 Hz) and waits READY_ZOO_TICKS ticks in `hlt` with interrupts
# on: in that wait it looks idle (halted, paging on, the same `hlt`) while its identity map is still there. Then it
# drops the identity map and calls `main_loop` (reached once, late), which sets `reached_main` and idles in `hlt`
# with interrupts on. Nothing is written to COM1.
# VGA=1: "zoo: booting" on screen row 10 before the wait, "zoo: ready" on row 11 after it (before main_loop).
# PANIC=1 (with VGA=1): after the wait, "zoo: panic: out of frames" on row 11 instead, then `cli; hlt` for good.
def vga_print(text: str, row: int) -> str:
    """Call READY_ZOO's `vga_puts` with the string at `text`, written from the first cell of screen row `row`."""
    return f"    mov ${text}, %esi\n    mov $(KBASE + VGA_PHYS + {row} * ROW), %edi\n    call vga_puts"


READY_ZOO_TICKS = 18
READY_ZOO_BOOTING, READY_ZOO_READY, READY_ZOO_PANIC = "zoo: booting", "zoo: ready", "zoo: panic: out of frames"
READY_ZOO = rf"""
{HIGH_ENTRY}
.set VGA_PHYS, 0xB8000
.set ROW, 160                           /* bytes per screen row: 80 cells of character + attribute */
    mov $(stack_top - KBASE), %esp
{CLEAR_PD_PT}
{map_image()}
    movl $(VGA_PHYS + 3), pt - KBASE + (VGA_PHYS >> 12) * 4
{map_low_and_high()}
{paging_on_and_jump_high()}
higher_half:
    mov $stack_top, %esp
{LOAD_GDT}
.if VGA
{vga_print("booting", 10)}
.endif
    call setup_timer
    sti
wait_ticks:                             /* looks idle to a sampler: halted at this hlt, interrupts and paging on */
    hlt
    cmpl $TICKS, ticks
    jb wait_ticks
{unmap_identity(why="the identity entry: boot is over")}
.if PANIC
{vga_print("panic_text", 11)}
    cli
{halt_loop("dead")}
.endif
.if VGA
{vga_print("ready_text", 11)}
.endif
    call main_loop
.globl main_loop
main_loop:                              /* reached once, late */
    movl $1, reached_main
{IDLE}
vga_puts:                               /* %esi: string, %edi: first cell; white on black */
    mov $0x0F, %ah
1:  lodsb
    test %al, %al
    jz 2f
    stosw
    jmp 1b
2:  ret
{SETUP_TIMER}
{timer_tick(counted=True)}
.section .rodata
booting: .asciz "@BOOTING@"
ready_text: .asciz "@READY@"
panic_text: .asciz "@PANIC@"
{descriptor_pointer("idtr", "idt", "8 * 9")}
{descriptor_pointer("gdtr", "gdt", "3 * 8")}
.data
.globl ticks, reached_main
ticks: .long 0
reached_main: .long 0
{FLAT_GDT}
{PAGE_TABLES}
idt: .skip 8 * 9
.align 16
{STACK}
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


# --- [foreign], boot-only segments and a final spin (tests/harness/test_foreign_config.py) ---------------------------------
# Higher-half like HIGHER_HALF (`_start` linked at 0xC0100000 + runs at its load address), its program headers placed
# by PHDRS: 0 `text` (Multiboot header, boot code, text), 1 `init` (.init.text, linked high like the rest: code run
# once at boot, as a kernel's __init code), 2 `rodata`, 3 `data`. It maps its image, turns paging on with CR0.WP,
# jumps high, calls `init_once` in the init segment, then drops the identity entry and unmaps the init segment's pages
# (given back, as a kernel frees its __init code), prints INIT_SPIN_READY and, with interrupts off, ends in:
# SPIN=0: `hlt`. SPIN=1: `jmp .` at `spin_here` as a short jump (EB FE). SPIN=2: the same as a near jump (E9 and -5).
# NEEDS_MIB=n: triple-fault unless Multiboot reports about n MiB of RAM (mem_upper at least n - 2 MiB).
INIT_SPIN_READY = "init: ready\n"
INIT_SPIN_SEGMENT = 1                   # the `init` program header
INIT_SPIN = rf"""
{HIGH_ENTRY}
{NEEDS_MIB_CHECK}
    mov $(stack_top - KBASE), %esp
{CLEAR_PD_PT}
{map_image()}
{map_low_and_high()}
{paging_on_and_jump_high()}
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
{FLUSH_TLB}
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
{halt_loop()}
.endif
{SERIAL_PUTS}
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
{PAGE_TABLES}
{STACK}
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
""" + _high_half_rest(rodata_phdr=" :rodata", data_phdr=" :data")


def init_spin(out: Path, name: str, *, spin: int = 0, needs_mib: int = 0) -> Path:
    """The kernel above: `spin` 0 (halts), 1 (`jmp .` short) or 2 (`jmp .` near); below `needs_mib` MiB it
    triple-faults."""
    return build(out, name, INIT_SPIN.replace("@READY@", INIT_SPIN_READY.replace("\n", "\\n")), INIT_SPIN_LDS,
                 SPIN=spin, NEEDS_MIB=needs_mib)


# --- an ELF64 kernel (tests/harness/test_foreign_kernels.py, tests/harness/test_foreign_ready.py) ---------------------------------
# An ELF64 booted by QEMU's -kernel through the Multiboot header's address fields (flag bit 16): 32-bit entry, PAE
# with EFER.LME, one 2 MiB identity page (writable, so its text is too: a true finding), PML4[511] recursive, long
# mode, print and halt.
# From 32-bit protected mode with `pml4` built: PAE, CR3, EFER.LME, paging with WP, the 64-bit GDT (`gdtr`), and a far
# jump to the label long_mode that follows.
ENTER_LONG_MODE = r"""    mov %cr4, %eax
    or $0x20, %eax                      /* PAE */
    mov %eax, %cr4
    mov $pml4, %eax
    mov %eax, %cr3
    mov $0xC0000080, %ecx               /* EFER.LME */
    rdmsr
    or $0x100, %eax
    wrmsr
    mov %cr0, %eax
    or $0x80010001, %eax                /* PG | WP | PE */
    mov %eax, %cr0
    lgdt gdtr
    ljmp $0x08, $long_mode
.code64
long_mode:"""

ELF64_MULTIBOOT = rf"""
.set FLAGS, 0x00010003
.text
.code32
.globl _start
.align 4
mb_header:
    .long 0x1BADB002, FLAGS, -(0x1BADB002 + FLAGS)
    .long mb_header, mb_header, __load_end, __bss_end, _start
_start:
    cli
    mov $stack_top, %esp
    mov $pml4, %edi
    xor %eax, %eax
    mov $3072, %ecx
    rep stosl
    movl $(pdpt + 3), pml4
    movl $(pd + 3), pdpt
    movl $0x83, pd                      /* 2 MiB at 0: P RW PS */
    movl $(pml4 + 3), pml4 + 511 * 8
{ENTER_LONG_MODE}
    lea ready64(%rip), %rsi
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
ready64: .asciz "x64: ready\n"
.data
.align 8
gdt:  .quad 0, 0x00AF9A000000FFFF
{descriptor_pointer("gdtr", "gdt", "2 * 8")}
.bss
.align 4096
pml4: .skip 4096
pdpt: .skip 4096
pd:   .skip 4096
stack: .skip 4096
stack_top:
"""

ELF64_LDS = """
ENTRY(_start)
PHDRS { text PT_LOAD FLAGS(5); rodata PT_LOAD FLAGS(4); data PT_LOAD FLAGS(6); }
SECTIONS {
  . = 1M;
  .text : { *(.text) } :text
  .rodata : ALIGN(0x1000) { *(.rodata) } :rodata
  .data : ALIGN(0x1000) { *(.data) } :data
  __load_end = .;
  .bss : { *(.bss) } :data
  __bss_end = .;
}
"""


def elf64_multiboot(out: Path, name: str = "mb64") -> Path:
    """The ELF64 above, built."""
    return build(out, name, ELF64_MULTIBOOT, ELF64_LDS, bits=64)


# --- ways in through GRUB: Multiboot 2 and GRUB's own Multiboot 1 (tests/machine/test_grub_boot.py) -----------------------

def multiboot2_header(tags: str = "") -> str:
    """The Multiboot 2 header: magic, architecture 0 (i386: entered in 32-bit protected mode), its length, a checksum
    that makes the four sum to 0, then `tags` (whole lines, each tag starting 8-aligned) and the end tag. The loader
    looks for it 8-aligned in the first 32 KiB of the file."""
    tags = f"\n{tags}" if tags else ""
    return rf""".balign 8
mb2_header:
    .long 0xE85250D6, 0, mb2_header_end - mb2_header
    .long -(0xE85250D6 + 0 + (mb2_header_end - mb2_header)){tags}
    .balign 8
    .word 0, 0                          /* the end tag: type 0, flags 0, size 8 */
    .long 8
mb2_header_end:"""


def relocatable_tag(min_addr: str, max_addr: str, align: str, preference: int) -> str:
    """Multiboot 2 header tag 10: the loader may put the image anywhere from `min_addr` to `max_addr`, `align`ed,
    as low (preference 1) or as high (2) as it can."""
    return rf"""    .balign 8
    .word 10, 0                         /* relocatable, required */
    .long 24
    .long {min_addr}, {max_addr}, {align}, {preference}"""


# Serial output of %eax as 8 hex digits (flat kernels: `hexdigits` by its linked address).
PRINT_HEX = r"""print_hex:
    push %ebx
    mov %eax, %ebx
    mov $8, %ecx
1:  rol $4, %ebx
    mov %ebx, %eax
    and $0xF, %eax
    mov hexdigits(%eax), %al
    mov $0x3F8, %dx
    out %al, %dx
    loop 1b
    pop %ebx
    ret
hexdigits: .ascii """ + '"0123456789abcdef"'


# The entry of MB2_I386: HIGH_ENTRY with the Multiboot 2 header instead of the v1 one, and the loader's magic (EAX)
# kept in `boot_magic` (by its physical address: paging is off) for the check once running high.
MB2_HIGH_ENTRY = rf""".set KBASE, 0xC0000000
.section .multiboot, "a"
{multiboot2_header()}
.text
.globl _start
_start:
    cli
    mov %eax, boot_magic - KBASE"""

# Prints `ready` if the loader's magic was Multiboot 2's (0x36D76289), `wrong` if not.
MB2_MAGIC_REPORT = r"""    mov $ready, %esi
    cmpl $0x36D76289, boot_magic
    je 1f
    mov $wrong, %esi
1:  call puts"""

# A Multiboot 2 kernel for i386, higher half like HIGHER_HALF (loaded at 1 MiB, linked at 0xC0100000): GRUB's
# `multiboot2` enters it in 32-bit protected mode, paging off; it maps its image, runs high and reports the magic.
MB2_I386_READY = "mb2-i386: ready\n"
MB2_I386 = rf"""
{MB2_HIGH_ENTRY}
    mov $(stack_top - KBASE), %esp
{CLEAR_PD_PT}
{map_image()}
{map_low_and_high()}
{paging_on_and_jump_high()}
higher_half:
    mov $stack_top, %esp
{unmap_identity()}
{MB2_MAGIC_REPORT}
{halt_loop()}
{SERIAL_PUTS}
.section .rodata
ready: .asciz "mb2-i386: ready\n"
wrong: .asciz "mb2-i386: not entered by a Multiboot 2 loader\n"
.data
boot_magic: .long 0
{PAGE_TABLES}
{STACK}
"""


def mb2_i386(out: Path, name: str = "mb2-i386") -> Path:
    return build(out, name, MB2_I386, HIGHER_HALF_LDS)


# A Multiboot 2 kernel for x86_64 (an ELF64), higher half: its boot part (header and 32-bit entry; page tables, GDT) is
# linked and loaded at 1 MiB, the rest linked at 0xFFFFFFFF80100000 and loaded at the physical address after it
# (MB2_X86_64_LDS). Entered in 32-bit protected mode, it builds 4-level tables (one 2 MiB page at physical 0, seen
# at 0 and at 0xFFFFFFFF80000000: PML4[0] and PML4[511] -> PDPT[510]), turns on PAE, EFER.LME and paging, enters
# long mode in its boot part, jumps to the higher half by absolute address and reports the magic from there.
MB2_X86_64_READY = "mb2-x86_64: ready\n"
MB2_X86_64 = rf"""
.section .multiboot, "a"
{multiboot2_header()}
.section .boot, "ax"
.code32
.globl _start
_start:
    cli
    mov %eax, %ebp                      /* the loader's magic, checked once in long mode */
    mov $boot_stack_top, %esp
    mov $pml4, %edi
    xor %eax, %eax
    mov $(4 * 1024), %ecx               /* pml4, both pdpts, pd: RAM may be poisoned */
    rep stosl
    movl $(pdpt_low + 3), pml4
    movl $(pdpt_high + 3), pml4 + 511 * 8
    movl $(pd + 3), pdpt_low
    movl $(pd + 3), pdpt_high + 510 * 8
    movl $0x83, pd                      /* 2 MiB at physical 0: P RW PS */
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
pd: .skip 4096
boot_stack: .skip 4096
boot_stack_top:
.text
higher_half:
    movabs $stack_top, %rsp
    lea ready(%rip), %rsi
    cmp $0x36D76289, %ebp
    je 1f
    lea wrong(%rip), %rsi
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
ready: .asciz "mb2-x86_64: ready\n"
wrong: .asciz "mb2-x86_64: not entered by a Multiboot 2 loader\n"
.bss
.balign 16
stack: .skip 4096
stack_top:
"""

MB2_X86_64_LDS = """
ENTRY(_start)
SECTIONS {
  . = 1M;
  .boot : { *(.multiboot) *(.boot) }
  .boot.data : ALIGN(0x1000) { *(.boot.data) }
  . = ALIGN(0x1000);
  . += 0xFFFFFFFF80000000;
  .text : AT(ADDR(.text) - 0xFFFFFFFF80000000) { *(.text) }
  .rodata : ALIGN(0x1000) { *(.rodata) }
  .bss : ALIGN(0x1000) { *(.bss) }
}
"""


def mb2_x86_64(out: Path, name: str = "mb2-x86_64") -> Path:
    return build(out, name, MB2_X86_64, MB2_X86_64_LDS, bits=64)


# A Multiboot 2 kernel with the relocatable header tag: flat (paging off), linked at 1 MiB but asking to be put
# between 4 MiB and 16 MiB, as low as possible, so a loader that honours the tag must move it. All its code is
# position-independent (addresses from a `call`/`pop` base in %ebp). It looks up the boot information's "load base
# address" tag (type 21) and prints its ready line only if that says where it really runs, at 4 MiB or above.
MB2_RELOCATABLE_READY = "mb2-reloc: ready\n"
MB2_RELOCATABLE_MIN, MB2_RELOCATABLE_MAX = 0x400000, 0x1000000
MB2_RELOCATABLE = rf"""
.text
.globl _start
{multiboot2_header(relocatable_tag("MIN_ADDR", "MAX_ADDR", "0x1000", 1))}
_start:
    cli
    call 1f
1:  pop %ebp                            /* where label 1 runs: every address below is %ebp + (X - 1b) */
    lea (stack_top - 1b)(%ebp), %esp
    lea (wrong - 1b)(%ebp), %esi
    cmp $0x36D76289, %eax
    jne report
    lea 8(%ebx), %edi                   /* the first tag of the boot information */
find_base:
    mov (%edi), %eax
    test %eax, %eax
    jz report                           /* the end tag: no load base address */
    cmp $21, %eax
    je found_base
    mov 4(%edi), %eax                   /* its size, rounded up to 8 */
    add $7, %eax
    and $~7, %eax
    add %eax, %edi
    jmp find_base
found_base:
    lea (__image_start - 1b)(%ebp), %eax
    cmp 8(%edi), %eax
    jne report
    cmp $MIN_ADDR, %eax                 /* and it was moved, as the tag asks */
    jb report
    lea (ready - 1b)(%ebp), %esi
report:
    lodsb
    test %al, %al
    jz 2f
    mov $0x3F8, %dx
    out %al, %dx
    jmp report
2:  hlt
    jmp 2b
ready: .asciz "mb2-reloc: ready\n"
wrong: .asciz "mb2-reloc: not at the load base address the loader reported\n"
.balign 16
stack: .skip 1024
stack_top:
"""

MB2_RELOCATABLE_LDS = """
ENTRY(_start)
SECTIONS {
  . = 1M;
  __image_start = .;
  .text : { *(.text) }
}
"""


def mb2_relocatable(out: Path, name: str = "mb2-reloc") -> Path:
    return build(out, name, MB2_RELOCATABLE, MB2_RELOCATABLE_LDS, MIN_ADDR=MB2_RELOCATABLE_MIN,
                 MAX_ADDR=MB2_RELOCATABLE_MAX)


# A Multiboot 1 kernel that needs GRUB: it finds its module by the module's command line, which GRUB gives as the
# words after the file name (`module /modules/x zoo.initrd` -> "zoo.initrd"), while QEMU's -kernel gives the file
# name first ("x zoo.initrd"): under -kernel it says it has no such module and halts. The module is a NUL-terminated
# text, printed after the ready line.
GRUB_MODULE_NAME = "zoo.initrd"
GRUB_MODULE_READY = "grubmod: ready: "
GRUB_MODULE_MISSING = "grubmod: no module named zoo.initrd\n"
GRUB_MODULE = rf"""
{FLAT_ENTRY}
    mov $0x80000, %esp
    testl $(1 << 3), (%ebx)             /* Multiboot info flags bit 3: mods_count and mods_addr are valid */
    jz missing
    mov 20(%ebx), %ecx                  /* mods_count */
    mov 24(%ebx), %edi                  /* mods_addr: 16 bytes a module: start, end, command line, reserved */
next_module:
    jecxz missing
    mov 8(%edi), %esi
    mov $wanted, %edx
    call streq
    je found
    add $16, %edi
    dec %ecx
    jmp next_module
found:
    mov $ready, %esi
    call puts
    mov (%edi), %esi                    /* mod_start: the module's text */
    call puts
    mov $newline, %esi
    jmp report
missing:
    mov $nomodule, %esi
report:
    call puts
{halt_loop()}
streq:                                  /* ZF set if the strings at %esi and %edx are equal */
    push %esi
    push %edx
1:  mov (%esi), %al
    cmp (%edx), %al
    jne 2f
    inc %esi
    inc %edx
    test %al, %al
    jnz 1b
2:  pop %edx
    pop %esi
    ret
{SERIAL_PUTS}
wanted: .asciz "@NAME@"
ready: .asciz "@READY@"
nomodule: .asciz "@MISSING@"
newline: .asciz "\n"
"""


def grub_module(out: Path, name: str = "grubmod") -> Path:
    source = (GRUB_MODULE.replace("@NAME@", GRUB_MODULE_NAME).replace("@READY@", GRUB_MODULE_READY)
              .replace("@MISSING@", GRUB_MODULE_MISSING.replace("\n", "\\n")))
    return build(out, name, source)


# --- the Limine boot protocol (tests/harness/test_limine.py) --------------------------------------------------------------
# Limine (tests/limine/: its prebuilt BIOS CD and UEFI loaders) loads an ELF64 linked at or above 0xffffffff80000000
# at a physical address of its own choosing, maps each PT_LOAD with its rights, and enters it in long mode. The kernel
# asks for what it wants with requests: 8-aligned structures in its image, each starting with an ID Limine scans
# for, that Limine answers by filling in their response pointer. IDs are Limine's `limine.h` (v8) values.
LIMINE_DIR = ROOT / "tests" / "limine"
LIMINE_COMMON_MAGIC = "0xc7b1dd30df4c8b88, 0x0a82e883a194f07b"


def limine_requests(*requests: str) -> str:
    """The requests area: a start marker, the base-revision tag asking for revision 2 (Limine sets its third word to
    0 when it honours it), `requests` (whole lines), an end marker. In a writable section: Limine writes into it."""
    body = "\n".join(requests)
    return rf""".section .data
.balign 8
limine_requests_start:
    .quad 0xf6b8f4b39de7d1ae, 0xfab91a6940fcb9cf, 0x785c6ed015d3e316, 0x181e920a7852b9d9
limine_base_revision:
    .quad 0xf9562b2d5c95a6c8, 0x6a7b384944536bdc, 2
{body}
limine_requests_end:
    .quad 0xadc0e0531bb10d03, 0x9572709f31764c62"""


def limine_request(label: str, id_words: str) -> str:
    """One request of revision 0: its ID (the common magic, then the request's own two words), its revision, and
    the response pointer Limine fills in (at `label` + 40)."""
    return rf"""{label}:
    .quad {LIMINE_COMMON_MAGIC}, {id_words}
    .quad 0                             /* revision */
    .quad 0                             /* response: set by Limine */"""


# The kernel address request: its response gives the physical and virtual base Limine loaded the kernel at.
LIMINE_KERNEL_ADDRESS_REQUEST = limine_request("kernel_address", "0x71ba76863cc55f63, 0xb2644a48c516a487")

# Serial output in long mode: the NUL-terminated string at %rsi to COM1; %rax as 16 hex digits.
SERIAL_PUTS64 = r"""puts:
    lodsb
    test %al, %al
    jz 1f
    mov $0x3F8, %dx
    out %al, %dx
    jmp puts
1:  ret
print_hex64:
    mov %rax, %rbx
    mov $16, %ecx
1:  rol $4, %rbx
    mov %ebx, %eax
    and $0xF, %eax
    lea hexdigits(%rip), %rdi
    mov (%rdi,%rax), %al
    mov $0x3F8, %dx
    out %al, %dx
    loop 1b
    ret"""

# A Limine-protocol kernel: checks Limine honoured base revision 2, prints the physical base its kernel address
# response gives, then its ready line, and halts. Text, rodata and data each a PT_LOAD with its own rights
# (LIMINE_LDS), linked at 0xffffffff80000000 with no load address (p_paddr = p_vaddr), as Limine's templates link.
LIMINE_READY = "limine-zoo: ready"
LIMINE_LOADED_AT = "limine-zoo: loaded at physical 0x"
LIMINE_KERNEL = rf"""
.text
.globl _start
_start:
    cli
    lea wrong_revision(%rip), %rsi
    cmpq $0, limine_base_revision + 16(%rip)
    jne report
    lea no_address(%rip), %rsi
    mov kernel_address + 40(%rip), %rbx
    test %rbx, %rbx
    jz report
    lea loaded_at(%rip), %rsi
    call puts
    mov 8(%rbx), %rax                   /* the response's physical_base */
    call print_hex64
    lea ready(%rip), %rsi
report:
    call puts
{halt_loop()}
{SERIAL_PUTS64}
.section .rodata
hexdigits: .ascii "0123456789abcdef"
loaded_at: .asciz "{LIMINE_LOADED_AT}"
ready: .asciz "\n{LIMINE_READY}\n"
wrong_revision: .asciz "limine-zoo: Limine did not honour base revision 2\n"
no_address: .asciz "limine-zoo: no kernel address response\n"
{limine_requests(LIMINE_KERNEL_ADDRESS_REQUEST)}
"""

LIMINE_LDS = """
ENTRY(_start)
PHDRS { text PT_LOAD FLAGS(5); rodata PT_LOAD FLAGS(4); data PT_LOAD FLAGS(6); }
SECTIONS {
  . = 0xffffffff80000000;
  .text : { *(.text) } :text
  .rodata : ALIGN(0x1000) { *(.rodata) } :rodata
  .data : ALIGN(0x1000) { *(.data) } :data
  .bss : { *(.bss) } :data
}
"""


def limine_kernel(out: Path, name: str = "limine-zoo") -> Path:
    return build(out, name, LIMINE_KERNEL, LIMINE_LDS, bits=64)


# limine.conf (Limine 8's syntax): boot the one entry at once, by the Limine protocol.
LIMINE_CONF = """timeout: {timeout}

/kgen zoo
    protocol: limine
    kernel_path: boot():/boot/{kernel}
"""


def limine_iso(out: Path, kernel: Path, name: str = "limine.iso", *, timeout: int = 0) -> Path:
    """A BIOS + UEFI ISO as Limine's USAGE.md makes one (tests/limine/README.md): limine.conf, limine-bios.sys and
    the El Torito images in /boot/limine, BOOTX64.EFI in /EFI/BOOT, the kernel in /boot. The UEFI El Torito image is
    a FAT holding BOOTX64.EFI, made with mtools in place of Limine's five-architecture limine-uefi-cd.bin.
    `timeout`: seconds Limine's menu waits (its templates ship 3)."""
    missing = [tool for tool in ("xorriso", "mformat", "mmd", "mcopy") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (Debian packages xorriso, mtools)")
    root = out / f"{name}.root"
    shutil.rmtree(root, ignore_errors=True)
    (root / "boot" / "limine").mkdir(parents=True)
    (root / "EFI" / "BOOT").mkdir(parents=True)
    shutil.copy(kernel, root / "boot" / kernel.name)
    for binary in ("limine-bios.sys", "limine-bios-cd.bin"):
        shutil.copy(LIMINE_DIR / binary, root / "boot" / "limine" / binary)
    shutil.copy(LIMINE_DIR / "BOOTX64.EFI", root / "EFI" / "BOOT" / "BOOTX64.EFI")
    (root / "boot" / "limine" / "limine.conf").write_text(LIMINE_CONF.format(kernel=kernel.name, timeout=timeout))
    fat = root / "boot" / "limine" / "limine-uefi-cd.bin"
    for command in (["mformat", "-i", fat, "-C", "-f", "1440", "::"], ["mmd", "-i", fat, "::/EFI", "::/EFI/BOOT"],
                    ["mcopy", "-i", fat, LIMINE_DIR / "BOOTX64.EFI", "::/EFI/BOOT/BOOTX64.EFI"]):
        subprocess.run(command, check=True, capture_output=True)
    iso = out / name
    subprocess.run(["xorriso", "-as", "mkisofs", "-R", "-r", "-J", "-b", "boot/limine/limine-bios-cd.bin",
                    "-no-emul-boot", "-boot-load-size", "4", "-boot-info-table", "-hfsplus", "-apm-block-size", "2048",
                    "--efi-boot", "boot/limine/limine-uefi-cd.bin", "-efi-boot-part", "--efi-boot-image",
                    "--protective-msdos-label", root, "-o", iso], check=True, capture_output=True)
    return iso


# --- a relocated kernel with paging (tests/guest/test_placement.py) -----------------------------------------------------
# MB2_RELOCATABLE with paging: linked at 1 MiB (text R-X, data RW- each a PT_LOAD), asking to be put from 4 MiB on.
# Running where GRUB put it (paging off, position-independent: %ebp holds runtime - link address), it maps its link
# addresses to where it really is, text read-only, data writable, plus its running pages identity-mapped for the
# instructions right after paging goes on; jumps to its link address, drops the identity entry, and prints its ready
# line only if it was moved and entered by a Multiboot 2 loader. The checks must find it at its real base.
# WRITABLE_TEXT=1 maps its text writable too: the segment check must name those pages where they really are.
MB2_RELOCATED_PAGED_READY = "mb2-paged: ready\n"
MB2_RELOCATED_PAGED = rf"""
.text
.globl _start
{multiboot2_header(relocatable_tag("MIN_ADDR", "MAX_ADDR", "0x1000", 1))}
_start:
    cli
    call 1f
1:  pop %ebp
    sub $1b, %ebp                       /* runtime - link address: add it to a linked address to reach it */
    lea stack_top(%ebp), %esp
    mov %eax, boot_magic(%ebp)
    lea pd(%ebp), %edi                  /* pd, pt_link and pt_here: three pages, RAM may be poisoned */
    xor %eax, %eax
    mov $(3 * 1024), %ecx
    rep stosl
    mov $__image_start, %esi            /* each page of the image, by its link address */
map_page:
    lea (%esi,%ebp), %eax               /* where it really is */
    mov %eax, %ebx
    or $1, %eax                         /* present, read-only */
.if WRITABLE_TEXT
    or $2, %eax                         /* every page writable: a true finding */
.endif
    cmp $__data_start, %esi
    jb 2f
    or $2, %eax                         /* data and bss: writable */
2:  mov %esi, %edx
    shr $12, %edx
    and $0x3FF, %edx
    mov %eax, pt_link(%ebp,%edx,4)      /* link address -> where it is */
    mov %ebx, %edx
    shr $12, %edx
    and $0x3FF, %edx
    or $3, %ebx
    mov %ebx, pt_here(%ebp,%edx,4)      /* where it is -> itself, until it runs at its link address */
    add $0x1000, %esi
    cmp $__image_end, %esi
    jb map_page
    lea pt_link + 3(%ebp), %eax
    mov %eax, pd(%ebp)                  /* PD[0]: the link addresses (below 4 MiB) */
    lea __image_start(%ebp), %edx
    shr $22, %edx                       /* the PD slot of where it runs (4 MiB or above: not slot 0) */
    lea pt_here + 3(%ebp), %eax
    mov %eax, pd(%ebp,%edx,4)
    lea pd(%ebp), %eax
    mov %eax, %cr3
    mov %cr0, %eax
    or $0x80010000, %eax                /* PG | WP */
    mov %eax, %cr0
    mov $linked, %eax                   /* by its link address: a relative jump would stay where it runs */
    jmp *%eax
linked:
    mov $stack_top, %esp
    movl $0, pd(,%edx,4)                /* drop the running pages' identity entry */
    mov %cr3, %eax
    mov %eax, %cr3
    mov $wrong, %esi
    cmpl $0x36D76289, boot_magic
    jne 3f
    test %ebp, %ebp
    jz 3f                               /* not moved: the loader ignored the relocatable tag */
    mov $ready, %esi
3:  call puts
{halt_loop()}
{SERIAL_PUTS}
ready: .asciz "mb2-paged: ready\n"
wrong: .asciz "mb2-paged: not moved by a Multiboot 2 loader\n"
.data
boot_magic: .long 0
.bss
.balign 4096
pd: .skip 4096
pt_link: .skip 4096
pt_here: .skip 4096
stack: .skip 4096
stack_top:
"""

MB2_RELOCATED_PAGED_LDS = """
ENTRY(_start)
PHDRS { text PT_LOAD FLAGS(5); data PT_LOAD FLAGS(6); }
SECTIONS {
  . = 1M;
  __image_start = .;
  .text : { *(.text) } :text
  . = ALIGN(0x1000);
  __data_start = .;
  .data : { *(.data) } :data
  .bss : { *(.bss) } :data
  __image_end = ALIGN(0x1000);
}
"""


def mb2_relocated_paged(out: Path, name: str = "mb2-paged", *, writable_text: int = 0) -> Path:
    return build(out, name, MB2_RELOCATED_PAGED, MB2_RELOCATED_PAGED_LDS, MIN_ADDR=MB2_RELOCATABLE_MIN,
                 MAX_ADDR=MB2_RELOCATABLE_MAX, WRITABLE_TEXT=writable_text)


# ---- a loader stage that carries the real kernel (issue 21: --symbols) ------------------------------------------
def flat_binary(elf: Path) -> Path:
    """The ELF's loadable bytes as one flat file from its lowest load address (`objcopy -O binary`; .bss, having
    no bytes in the file, left out): what a loader copies to the load address."""
    flat = elf.with_suffix(".bin")
    subprocess.run(["objcopy", "-O", "binary", elf, flat], check=True)
    return flat


def entry_and_load(elf: Path) -> tuple[int, int]:
    """The physical address `_start` runs at (e_entry less its segment's vaddr - paddr) and the lowest p_paddr."""
    from kgen.guest.elfinfo import ElfInfo
    info = ElfInfo.load(elf)
    home = next(seg for seg in info.segments if seg.vaddr <= info.entry < seg.vaddr + seg.memsz)
    return info.entry - home.vaddr + home.paddr, min(seg.paddr for seg in info.segments)


# The real kernel of the stage: HIGHER_HALF again, loaded at 2 MiB (out of the stage's way at 1 MiB) and linked at
# 0xC0200000. Its own Multiboot header stays (a kernel booted either way), unused when the stage starts it.
STAGED_KERNEL_LDS = HIGHER_HALF_LDS.replace(". = 0xC0100000;", ". = 0xC0200000;")
LOADER_STAGE_SAYS = "stage: starting the real kernel\n"

# A Multiboot 1 loader stage (i386, paging off, linked flat at 1 MiB) that carries the real kernel's flat image
# (.incbin REAL_BIN, a path set by `loader_stage`), copies it to its load address REAL_LOAD and jumps to its physical
# entry REAL_ENTRY: what QEMU's -kernel loads is the stage, what runs and builds the page tables is the real kernel.
LOADER_STAGE = rf"""
{FLAT_ENTRY}
    mov $0x80000, %esp
    mov $says, %esi
    call puts
    mov $real_image, %esi
    mov $REAL_LOAD, %edi
    mov $(real_image_end - real_image), %ecx
    cld
    rep movsb                           /* the real kernel to where it is loaded */
    mov $REAL_ENTRY, %eax
    jmp *%eax                           /* its _start, at its load address: paging is off */
{SERIAL_PUTS}
says: .asciz "stage: starting the real kernel\n"
.align 16
real_image: .incbin "REAL_BIN"
real_image_end:
"""


def loader_stage(out: Path, name: str = "stage") -> tuple[Path, Path]:
    """(the loader stage's ELF, which boots; the real kernel's ELF, which runs): the real kernel built on its own,
    its flat image embedded in the stage."""
    real = build(out, f"{name}-real", HIGHER_HALF, STAGED_KERNEL_LDS, WRITABLE_TEXT=0)
    entry, load = entry_and_load(real)
    source = LOADER_STAGE.replace("REAL_BIN", str(flat_binary(real)))
    return build(out, name, source, REAL_ENTRY=entry, REAL_LOAD=load), real


# ---- a kernel booted from a disk image with a boot block of its own (issue 21: --image) -------------------------
# The real kernel: HIGHER_HALF loaded at 64 KiB (below 1 MiB: real mode reaches it, no A20 gate to open), linked at
# 0xC0010000. Its ELF is built beside the disk image, for the checks; the image holds only its flat bytes.
BOOT_BLOCK_KERNEL_LDS = HIGHER_HALF_LDS.replace(". = 0xC0100000;", ". = 0xC0010000;")
BOOT_BLOCK_LOAD_SEGMENT = 0x1000            # real-mode segment of the load address 0x10000

# A 512-byte MBR boot sector, loaded by the BIOS at 0x7C00 in 16-bit real mode with the boot drive in %dl: it reads
# SECTORS sectors from LBA 1 to 0x10000 (int 13h, AH=42h extended read), loads a flat GDT, enters protected mode and
# jumps to the kernel's physical entry KERNEL_ENTRY (paging is the kernel's to turn on). A failed read says so on
# COM1 and halts.
BOOT_BLOCK = rf"""
.code16
.text
.globl _start
_start:
    cli
    xor %ax, %ax
    mov %ax, %ds
    mov %ax, %ss
    mov $0x7C00, %sp
    mov $0x42, %ah
    mov $dap, %si
    int $0x13                           /* the kernel's sectors, %dl still the boot drive */
    jc read_failed
    lgdt gdtr
    mov %cr0, %eax
    or $1, %eax                         /* PE */
    mov %eax, %cr0
    ljmp $0x08, $protected
read_failed:
    mov $failed, %si
    mov $0x3F8, %dx
1:  lodsb
    test %al, %al
    jz 2f
    out %al, %dx
    jmp 1b
2:  hlt
    jmp 2b
.code32
protected:
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov $KERNEL_ENTRY, %eax
    jmp *%eax
failed: .asciz "boot block: disk read failed\n"
.align 4
dap: .byte 0x10, 0                      /* disk address packet: its size, reserved */
     .word SECTORS                      /* sectors to read */
     .word 0, {BOOT_BLOCK_LOAD_SEGMENT:#x}                /* to segment:offset */
     .quad 1                            /* from LBA 1, the sector after this one */
{FLAT_GDT}
{descriptor_pointer("gdtr", "gdt", "3 * 8")}
. = _start + 510
.word 0xAA55                            /* the BIOS boots a sector that ends so */
"""

BOOT_BLOCK_LDS = """
ENTRY(_start)
SECTIONS {
  . = 0x7C00;
  .text : { *(.text) }
}
"""


def boot_block_disk(out: Path, name: str = "bootblock", *, writable_text: int = 0) -> tuple[Path, Path]:
    """(the disk image: boot sector, then the kernel's flat bytes padded to whole sectors; the kernel's ELF).
    `writable_text`: the kernel maps its text writable (HIGHER_HALF's WRITABLE_TEXT), a finding."""
    kernel = build(out, f"{name}-kernel", HIGHER_HALF, BOOT_BLOCK_KERNEL_LDS, WRITABLE_TEXT=writable_text)
    entry, load = entry_and_load(kernel)
    assert load == BOOT_BLOCK_LOAD_SEGMENT * 16, hex(load)
    body = flat_binary(kernel).read_bytes()
    body += bytes(-len(body) % 512)
    sector = flat_binary(build(out, f"{name}-mbr", BOOT_BLOCK, BOOT_BLOCK_LDS, KERNEL_ENTRY=entry,
                               SECTORS=len(body) // 512)).read_bytes()
    assert len(sector) == 512 and sector.endswith(b"\x55\xaa"), len(sector)
    disk = out / f"{name}.img"
    disk.write_bytes(sector + body)
    return disk, kernel
