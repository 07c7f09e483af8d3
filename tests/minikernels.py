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
