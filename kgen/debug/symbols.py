"""Where gdb must put a kernel's symbols a second time so the boot stub has names too.

A higher-half kernel is linked at its virtual addresses but loaded, and entered, at physical ones: until the stub
turns paging on, EIP is the load address (`0x100010` for `_start`, linked at `0xc0100010`) and gdb, holding only
the link-time symbols, shows `?? ()` and cannot break there. The fix is a second copy of the same symbol table,
placed where each section is loaded: `add-symbol-file ELF -s .text 0x100010 -s .rodata 0x103000 ...`. Every
breakpoint then has two locations (`break kmain`: 0xc01007c8 and 0x1007c8), the one the CPU reaches is hit.

Why per-section addresses and not `add-symbol-file -o OFFSET`: the offset of the i386 kernel is -0xc0000000, which
gdb 13 takes as +0x40000000 and adds in 64 bits, so `_start` lands at 0x100100010. The breakpoint is still sent
truncated to 32 bits and stops, but gdb cannot find the symbol or step off the breakpoint (`continue` stops at the
same place again). Per-section addresses have no arithmetic to overflow and also serve a kernel whose segments are
loaded at different offsets.

Everything comes from the ELF's own headers: each allocated section is placed by the PT_LOAD that holds it (its
p_paddr - p_vaddr). Sections of segments linked where they are loaded (a foreign kernel's low boot segment) already
have their names at the right place and are left out.
"""
from __future__ import annotations

import shlex
from pathlib import Path

from elftools.common.exceptions import ELFError
from elftools.elf.constants import SH_FLAGS
from elftools.elf.elffile import ELFFile

from kgen.errors import KgenError


def physical_sections(elf_path: Path) -> list[tuple[str, int]]:
    """(name, load address) of every allocated section whose segment is loaded away from its link address."""
    try:
        with Path(elf_path).open("rb") as stream:
            elf = ELFFile(stream)
            segments = [(seg["p_vaddr"], seg["p_paddr"], seg["p_memsz"]) for seg in elf.iter_segments()
                        if seg["p_type"] == "PT_LOAD"]
            sections = [(sec.name, sec["sh_addr"], sec["sh_size"]) for sec in elf.iter_sections()
                        if sec["sh_flags"] & SH_FLAGS.SHF_ALLOC and sec.name]
    except OSError as err:
        raise KgenError(f"{elf_path}: cannot read: {err.strerror or err}") from err
    except ELFError as err:
        raise KgenError(f"{elf_path}: not a readable ELF file ({' '.join(str(err).split())})") from err
    placed = []
    for name, addr, size in sections:
        for vaddr, paddr, memsz in segments:
            # A section lies in the segment that contains its first byte (an empty one: its address, up to the end).
            if vaddr <= addr < vaddr + memsz or (size == 0 and vaddr <= addr <= vaddr + memsz):
                if paddr != vaddr:
                    placed.append((name, addr - vaddr + paddr))
                break
    return placed


def add_symbol_file_command(elf_path: Path) -> str | None:
    """The gdb command that loads the ELF's symbols a second time at the physical addresses its sections are
    loaded at; None when every section runs where it is loaded (nothing to add)."""
    placed = physical_sections(elf_path)
    if not placed:
        return None
    parts = " ".join(f"-s {name} {addr:#x}" for name, addr in placed)
    return f"add-symbol-file {_gdb_quote(str(elf_path))} {parts}"


def _gdb_quote(text: str) -> str:
    """A file name as one gdb argument (gdb splits add-symbol-file's arguments like a shell, minus expansions)."""
    return shlex.quote(text)
