"""Every address space of a kernel kgen did not build, found where the kernel keeps them.

A kernel with processes has one top-level table per process, and CR3 holds whichever process happened to run last:
judged on CR3 alone, its verdicts would change from run to run, and a flaw in a space that is not current would go
unseen. Such a kernel keeps its spaces somewhere; `--address-spaces SYMBOL[,COUNT]` names an array in its ELF holding
the physical address of each space's top-level table, one word of the kernel each (4 bytes for an i386 kernel, 8 for
a 64-bit one, in an ELF64 or wrapped in an ELF32: `Arch.for_elf`), 0 for an unused slot. COUNT defaults to the symbol's size over the word size. The checks then run once per slot, each
on the machine seen through that space (`GuestView.in_space`).
"""
from __future__ import annotations

from dataclasses import dataclass

from kgen.arch import Arch
from kgen.errors import KgenError
from kgen.guest.elfinfo import ElfInfo


@dataclass(frozen=True)
class SpaceArray:
    """The array of top-level table addresses: its symbol, slot count, word size and physical address."""
    symbol: str
    count: int
    entry_size: int
    paddr: int

    @classmethod
    def parse(cls, spec: str, elf: ElfInfo) -> SpaceArray:
        """`SYMBOL[,COUNT]` against the ELF; a spec that cannot name an array there raises KgenError (one line)."""
        symbol, _, count_text = spec.partition(",")
        symbol = symbol.strip()
        where = f"--address-spaces {spec}"
        if not symbol:
            raise KgenError(f"{where}: give the symbol of the array of top-level table addresses, SYMBOL[,COUNT]")
        if symbol not in elf.symbols:
            raise KgenError(f"{where}: {elf.path.name} has no symbol {symbol!r} (a stripped ELF has none)")
        sym = elf.symbols[symbol]
        entry_size = Arch.for_elf(elf).word_size
        if count_text.strip():
            try:
                count = int(count_text, 0)
            except ValueError:
                raise KgenError(f"{where}: {count_text!r} is not a number of slots") from None
            if count <= 0:
                raise KgenError(f"{where}: the slot count must be above 0")
        elif sym.size >= entry_size:
            count = sym.size // entry_size
        else:
            raise KgenError(f"{where}: {symbol} has no size in the symbol table; give the slot count, "
                            f"{symbol},COUNT")
        end = sym.value + count * entry_size
        segment = next((seg for seg in elf.segments
                        if seg.memsz and seg.vaddr <= sym.value and end <= seg.vaddr + seg.memsz), None)
        if segment is None:
            raise KgenError(f"{where}: {count} slots of {entry_size} bytes at {sym.value:#x} do not lie inside one "
                            f"loaded segment of {elf.path.name}")
        return cls(symbol, count, entry_size, segment.paddr + sym.value - segment.vaddr)

    def name(self, index: int) -> str:
        return f"{self.symbol}[{index}]"

    def tops(self, read_phys) -> list[int]:
        """The value of every slot, as the kernel left it in RAM."""
        data = read_phys(self.paddr, self.count * self.entry_size)
        return [int.from_bytes(data[i:i + self.entry_size], "little") for i in range(0, len(data), self.entry_size)]


@dataclass(frozen=True)
class SpaceSlot:
    """One slot of the array: what a test parametrised over the spaces is given."""
    array: SpaceArray
    index: int

    @property
    def name(self) -> str:
        return self.array.name(self.index)

    def top(self, read_phys) -> int:
        return self.array.tops(read_phys)[self.index]
