"""The linked kernel image: what the linker produces and the ELF writer consumes.

Kept apart from both so the ELF writer knows nothing of templates and the linker nothing of LIEF.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Section:
    name: str            # ".multiboot", ".text", ".rodata", ".data", ".bss"
    vaddr: int           # where the kernel sees it (higher half)
    paddr: int           # where the loader puts it (load address + offset)
    data: bytes          # file contents; empty for a NOBITS section
    size: int            # size in memory (== len(data) unless nobits)
    perms: str           # "rx", "r" or "rw": what the segment holding it may do
    nobits: bool = False
    align: int = 0x10


@dataclass(frozen=True)
class Symbol:
    name: str
    value: int           # virtual address
    section: str         # name of the section it lies in
    size: int = 0
    kind: str = "func"   # "func" (in an executable section) or "object"


@dataclass(frozen=True)
class LinkedImage:
    entry: int                      # virtual address of the entry label (e_entry)
    sections: tuple[Section, ...]   # in address order
    symbols: tuple[Symbol, ...] = field(default=())
    # (name, contents) of sections nothing loads, written as they are after the segments: the DWARF line table
    # (kgen/build/dwarf.py)
    unloaded: tuple[tuple[str, bytes], ...] = field(default=())

    def segments(self) -> list[list[Section]]:
        """Consecutive sections with the same permissions share one PT_LOAD segment."""
        groups: list[list[Section]] = []
        for sec in self.sections:
            if groups and groups[-1][-1].perms == sec.perms:
                groups[-1].append(sec)
            else:
                groups.append([sec])
        return groups

    def symbol(self, name: str) -> Symbol:
        for sym in self.symbols:
            if sym.name == name:
                return sym
        raise KeyError(name)
