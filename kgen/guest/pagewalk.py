"""Walk x86 page tables in guest physical memory, the way the MMU would.

The walker sees memory only through `read_phys(addr, size) -> bytes`, so the same code checks tables read out of a
running QEMU and tables a test built in a bytearray. Paging modes differ only in numbers (entry width, index bits,
which levels may map large pages), so a mode is data
(`kgen.arch.paging`) and the walk is written once over it.

A Walker is a snapshot: each table is read once, in one piece, and cached. Make a new Walker after the guest changes
its tables.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Callable, Iterator

from kgen.arch.paging import I386, PagingMode
from kgen.errors import KgenError
from kgen.arch.hw import (PAGE_SIZE, PTE_A, PTE_D, PTE_FRAME_MASK, PTE_G, PTE_NX, PTE_P, PTE_PCD, PTE_PS, PTE_PWT,
                     PTE_RW, PTE_US)

ReadPhys = Callable[[int, int], bytes]

# Bits that only the entry mapping the page decides; RW and US are decided by every level on the way down (each
# level can withdraw them), and so is NX (each level can impose it).
_LEAF_BITS = PTE_PWT | PTE_PCD | PTE_A | PTE_D | PTE_G
_RIGHTS = PTE_RW | PTE_US
_ATTR_NAMES = ((PTE_P, "P"), (PTE_RW, "RW"), (PTE_US, "US"), (PTE_PWT, "PWT"), (PTE_PCD, "PCD"),
               (PTE_A, "A"), (PTE_D, "D"), (PTE_PS, "PS"), (PTE_G, "G"), (PTE_NX, "NX"))


class WalkError(KgenError):
    """Page tables the walker cannot follow: an unreadable table or reserved bits set. Names the entry."""


class Attrs(int):
    """Page attribute bits (PTE_* values) that print as "P RW G"; NX (PTE_NX, bit 63) when the page is not
    executable."""

    __slots__ = ()

    def __str__(self) -> str:
        return " ".join(name for bit, name in _ATTR_NAMES if self & bit) or "-"

    def __repr__(self) -> str:
        return f"Attrs({self})"


@dataclass(frozen=True)
class EntryRef:
    """One entry the walk read, printed as "PD[768] @ 0x105c00"."""
    table: str      # level name
    index: int
    addr: int       # physical address of the entry
    value: int

    def __str__(self) -> str:
        return f"{self.table}[{self.index}] @ {self.addr:#x}"


def describe(chain: tuple[EntryRef, ...]) -> str:
    return " → ".join(map(str, chain))


@dataclass(frozen=True)
class Translation:
    vaddr: int
    paddr: int
    size: int                       # size of the page holding vaddr
    entry: int                      # raw value of the entry that maps the page
    attrs: Attrs                    # effective attributes
    chain: tuple[EntryRef, ...]     # entries read, top level first

    @property
    def path(self) -> str:
        return describe(self.chain)


@dataclass(frozen=True)
class Mapping:
    vstart: int
    pstart: int
    size: int
    attrs: Attrs

    def __str__(self) -> str:
        return f"{self.vstart:#x}-{self.vstart + self.size:#x} → {self.pstart:#x} {self.attrs}"


@dataclass(frozen=True)
class RecursiveWindow:
    """A top-level entry pointing at its own table: the virtual range where the tables appear as pages."""
    slot: int
    vstart: int
    size: int
    attrs: Attrs    # of the self-referencing entry
    entry_addr: int


class Walker:
    def __init__(self, read_phys: ReadPhys, cr3: int, mode: PagingMode = I386, *, pse: bool = True,
                 recursive_slot: int | None = None, nxe: bool = True):
        """Read the top-level table now. `recursive_slot` is a claim: WalkError if that entry is no self-reference.

        Self-referencing top-level entries are found whether or not a slot is named. `nxe` is EFER.NXE: with it on,
        bit 63 of a 64-bit entry (PAE, x86-64) makes everything below it NX; with it off, that bit is reserved.
        i386 entries have no bit 63: there `nxe` changes nothing.
        """
        self.read_phys = read_phys
        self.cr3 = cr3
        self.mode = mode
        self.pse = pse
        self.nxe = nxe
        self.top = cr3 & mode.cr3_mask
        self._format = "<%d" + {4: "I", 8: "Q"}[mode.entry_size]
        self._cache: dict[tuple[int, int], tuple[int, ...]] = {}

        top = self._table(0, self.top, ())
        self._self_slots = frozenset(i for i, e in enumerate(top)
                                     if e & PTE_P and self._decode((), 0, self.top, i, e) == (self.top, 0))
        if recursive_slot is not None and recursive_slot not in self._self_slots:
            if not 0 <= recursive_slot < len(top):
                raise ValueError(f"recursive_slot {recursive_slot} outside the {mode.level_names[0]}")
            ref = self._ref(0, self.top, recursive_slot, top[recursive_slot])
            raise WalkError(f"{ref} = {ref.value:#x}: expected the recursive entry, pointing at the "
                            f"{mode.level_names[0]} at {self.top:#x}")

    def translate(self, vaddr: int) -> Translation | None:
        """What the MMU would make of `vaddr`, or None where it would raise a not-present fault."""
        return self.walk(vaddr)[1]

    def walk(self, vaddr: int) -> tuple[tuple[EntryRef, ...], Translation | None]:
        """The entries the MMU reads for `vaddr`, top level first, and the translation; where it would raise a
        not-present fault, (entries read, the last one not present, None)."""
        mode = self.mode
        if not mode.contains(vaddr):
            raise ValueError(f"{vaddr:#x} is not a {mode.name} virtual address")
        level, base, rights, chain = 0, self.top, _RIGHTS, ()
        while True:     # ends at the last level at the latest, where every present entry maps a page
            index = vaddr >> mode.shift(level) & ((1 << mode.index_bits[level]) - 1)
            entry = self._table(level, base, chain)[index]
            if not entry & PTE_P:
                return chain + (self._ref(level, base, index, entry),), None
            frame, size = self._decode(chain, level, base, index, entry)
            rights = self._restrict(level, rights, entry)
            chain += (self._ref(level, base, index, entry),)
            if size:
                return chain, Translation(vaddr, frame | vaddr & (size - 1), size, entry,
                                          self._attrs(entry, rights, size), chain)
            level, base = level + 1, frame

    def physical_spans(self, vaddr: int, size: int) -> list[tuple[int, int]]:
        """The (physical address, length) pieces that `size` bytes at `vaddr` occupy, page by page."""
        spans = []
        while size > 0:
            t = self.translate(vaddr)
            if t is None:
                raise WalkError(f"{vaddr:#x} is not mapped: an access there would fault")
            chunk = min(size, t.size - (vaddr & (t.size - 1)))
            spans.append((t.paddr, chunk))
            vaddr, size = vaddr + chunk, size - chunk
        return spans

    def read_virtual(self, vaddr: int, size: int) -> bytes:
        """`size` bytes at `vaddr` as the CPU would read them through these tables."""
        return b"".join(self.read_phys(paddr, n) for paddr, n in self.physical_spans(vaddr, size))

    def mappings(self) -> list[Mapping]:
        """Every mapped range outside the recursive windows, merged where virtual and physical addresses both
        continue and the attributes agree."""
        runs: list[list[int]] = []
        for vaddr, paddr, size, attrs in self._leaves(0, self.top, 0, _RIGHTS, ()):
            last = runs[-1] if runs else None
            if last and last[0] + last[2] == vaddr and last[1] + last[2] == paddr and last[3] == attrs:
                last[2] += size
            else:
                runs.append([vaddr, paddr, size, attrs])
        return [Mapping(v, p, size, attrs) for v, p, size, attrs in runs]

    def recursive_windows(self) -> list[RecursiveWindow]:
        shift = self.mode.shift(0)
        top = self._table(0, self.top, ())
        bits = PTE_P | _RIGHTS | PTE_PWT | PTE_PCD | PTE_A | (PTE_NX if self._nx_at(0) else 0)
        return [RecursiveWindow(slot, self.mode.sign_extend(slot << shift), 1 << shift, Attrs(top[slot] & bits),
                                self.top + slot * self.mode.entry_size)
                for slot in sorted(self._self_slots)]

    def page_tables(self) -> list[tuple[tuple[int, ...], int]]:
        """(index path, physical address) of every table below the top level, in walk order."""
        found: list[tuple[tuple[int, ...], int]] = []

        def visit(level: int, base: int, path: tuple[int, ...], chain: tuple[EntryRef, ...]) -> None:
            for index, entry in enumerate(self._table(level, base, chain)):
                if not entry & PTE_P or level == 0 and index in self._self_slots:
                    continue
                frame, size = self._decode(chain, level, base, index, entry)
                if size:
                    continue
                found.append((path + (index,), frame))
                # Tables at the last level hold only pages; there is no need to read them.
                if level + 2 < self.mode.levels:
                    visit(level + 1, frame, path + (index,), chain + (self._ref(level, base, index, entry),))

        visit(0, self.top, (), ())
        return found

    def _leaves(self, level: int, base: int, vbase: int, rights: int,
                chain: tuple[EntryRef, ...]) -> Iterator[tuple[int, int, int, Attrs]]:
        mode = self.mode
        shift = mode.shift(level)
        for index, entry in enumerate(self._table(level, base, chain)):
            if not entry & PTE_P or level == 0 and index in self._self_slots:
                continue
            frame, size = self._decode(chain, level, base, index, entry)
            here = self._restrict(level, rights, entry)
            vaddr = vbase | index << shift
            if size:
                yield mode.sign_extend(vaddr), frame, size, self._attrs(entry, here, size)
            else:
                yield from self._leaves(level + 1, frame, vaddr, here,
                                        chain + (self._ref(level, base, index, entry),))

    def _table(self, level: int, base: int, chain: tuple[EntryRef, ...]) -> tuple[int, ...]:
        count = 1 << self.mode.index_bits[level]
        table = self._cache.get((base, count))
        if table is None:
            size = count * self.mode.entry_size
            where = (f"{describe(chain)} = {chain[-1].value:#x}" if chain else f"CR3 {self.cr3:#x}")
            what = f"{where}: {self.mode.level_names[level]} at {base:#x}"
            try:
                data = self.read_phys(base, size)
            except Exception as err:
                # Whatever the reader raises (a bytearray, QMP), the user needs the entry that led here.
                raise WalkError(f"{what} cannot be read: {err}") from err
            if len(data) != size:
                raise WalkError(f"{what} cannot be read: got {len(data)} of {size} bytes")
            table = struct.unpack(self._format % count, data)
            self._cache[base, count] = table
        return table

    def _decode(self, chain: tuple[EntryRef, ...], level: int, base: int, index: int,
                entry: int) -> tuple[int, int]:
        """Where a present entry leads: (frame, page size) if it maps a page, (table address, 0) if not."""
        mode = self.mode
        size = 0
        if level == mode.levels - 1:
            size = PAGE_SIZE
        elif entry & PTE_PS and level in mode.large_levels and (self.pse or not mode.large_needs_pse):
            size = 1 << mode.shift(level)
        reserved = mode.reserved[level]
        if level in mode.nx_levels and not self.nxe:
            reserved |= PTE_NX
        frame = entry & mode.frame_mask
        if size > PAGE_SIZE:
            # Bit 12 of a large entry is PAT; the bits from 13 up to the frame must be clear. In a 4 MiB PDE they
            # are PSE-36 address bits above 4 GiB, which kgen never maps, so they count as reserved too.
            reserved |= (size - 1) & ~(2 * PAGE_SIZE - 1)
            frame &= ~(size - 1)
        if entry & reserved:
            ref = self._ref(level, base, index, entry)
            why = (" (XD, bit 63, is reserved with EFER.NXE off)"
                   if entry & reserved & PTE_NX and level in mode.nx_levels else "")
            raise WalkError(f"{describe(chain + (ref,))} = {entry:#x}: reserved bits {entry & reserved:#x} set{why}")
        return frame, size

    def _nx_at(self, level: int) -> bool:
        return self.nxe and level in self.mode.nx_levels

    def _restrict(self, level: int, rights: int, entry: int) -> int:
        """`rights` (RW, US and NX so far on the way down) after the entry at `level`: a level can withdraw RW or
        US, and impose NX, never the reverse."""
        if level in self.mode.rights_levels:
            rights &= entry | ~_RIGHTS
        if self._nx_at(level):
            rights |= entry & PTE_NX
        return rights

    def _ref(self, level: int, base: int, index: int, entry: int) -> EntryRef:
        return EntryRef(self.mode.level_names[level], index, base + index * self.mode.entry_size, entry)

    @staticmethod
    def _attrs(entry: int, rights: int, size: int) -> Attrs:
        return Attrs(PTE_P | rights | entry & _LEAF_BITS | (PTE_PS if size > PAGE_SIZE else 0))
