"""Walk x86 page tables in guest physical memory, the way the MMU would.

The walker sees memory only through `read_phys(addr, size) -> bytes`, so the same code checks tables read out of a
running QEMU and tables a test built in a bytearray. Paging modes differ only in numbers (entry width, index bits,
which levels may map large pages), so a mode is data
(`kgen.arch.paging`) and the walk is written once over it.

A Walker is a snapshot: each table is read once, in one piece, and cached. Make a new Walker after the guest changes
its tables.

A present entry the CPU refuses (reserved bits set, a table it points at that cannot be read) does not stop the walk:
it is recorded as a `Malformed` entry, the range below it is not mapped (the CPU raises a reserved-bit page fault
there), and the rest of the tables are walked. Only a top-level table that cannot be read is a WalkError.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Callable

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
    """Page tables the walker cannot follow at all (a top-level table that cannot be read), or a claim about them
    that does not hold. Names the entry."""


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
class Malformed:
    """A present entry the CPU refuses, and the virtual range below it, which is not mapped: every access there is a
    page fault (error code RSVD for reserved bits). Printed as one line naming the entry, its value, what is wrong
    and the range."""
    chain: tuple[EntryRef, ...]     # the entries read to get there, top level first, the malformed one last
    vstart: int                     # the virtual range the entry covers
    size: int
    bits: int                       # the reserved bits set; 0 when the table the entry points at cannot be read
    why: str

    @property
    def entry(self) -> EntryRef:
        return self.chain[-1]

    @property
    def vrange(self) -> tuple[int, int]:
        return self.vstart, self.vstart + self.size

    @property
    def fault(self) -> str:
        """What the CPU does with an address below the entry."""
        if self.bits:
            return "any access there is a page fault with error code RSVD (reserved bit)"
        return "the walk cannot read the table it points at, so nothing below this entry is mapped"

    def __str__(self) -> str:
        return (f"{describe(self.chain)} = {self.entry.value:#x}: {self.why}; {self.vstart:#x}-"
                f"{self.vstart + self.size:#x} is not mapped: {self.fault}")


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
                 recursive_slot: int | None = None, nxe: bool = True, maxphyaddr: int | None = None):
        """Read the top-level table now (WalkError if it cannot be read). `recursive_slot` is a claim: WalkError if
        that entry is no self-reference.

        Self-referencing top-level entries are found whether or not a slot is named. `nxe` is EFER.NXE: with it on,
        bit 63 of a 64-bit entry (PAE, x86-64) makes everything below it NX; with it off, that bit is reserved.
        i386 entries have no bit 63: there `nxe` changes nothing. `maxphyaddr` is the CPU's physical-address width
        (CPUID 0x80000008 EAX[7:0]; `Machine.phys_bits`): the address bits of an entry at and above it are reserved.
        None: the widest the mode allows (`PagingMode.max_phys_bits`), which finds fewer malformed entries.
        """
        self.read_phys = read_phys
        self.cr3 = cr3
        self.mode = mode
        self.pse = pse
        self.nxe = nxe
        self.maxphyaddr = min(maxphyaddr or mode.max_phys_bits, mode.max_phys_bits)
        self.top = cr3 & mode.cr3_mask
        self._format = "<%d" + {4: "I", 8: "Q"}[mode.entry_size]
        self._cache: dict[tuple[int, int], tuple[int, ...]] = {}
        # The malformed entries met so far, by the chain that reached them: what `malformed_at` answers.
        self._faults: dict[tuple[EntryRef, ...], Malformed] = {}
        self._walked: tuple[list, list, list] | None = None     # the whole walk, once (`_walk_all`)

        top = self._table(0, self.top, ())
        self._self_slots = frozenset(
            i for i, e in enumerate(top)
            if e & PTE_P and self._decode((self._ref(0, self.top, i, e),), 0, self._slot_vaddr(i)) == (self.top, 0))
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
        """The entries the MMU reads for `vaddr`, top level first, and the translation; where it would raise a page
        fault, (entries read, the last one not present or malformed, None): `malformed_at` says which."""
        mode = self.mode
        if not mode.contains(vaddr):
            raise ValueError(f"{vaddr:#x} is not a {mode.name} virtual address")
        level, base, rights, chain = 0, self.top, _RIGHTS, ()
        table = self._table(0, self.top, ())
        while True:     # ends at the last level at the latest, where every present entry maps a page
            index = vaddr >> mode.shift(level) & ((1 << mode.index_bits[level]) - 1)
            entry = table[index]
            chain += (self._ref(level, base, index, entry),)
            if not entry & PTE_P:
                return chain, None
            covers = vaddr & ~((1 << mode.shift(level)) - 1)
            decoded = self._decode(chain, level, covers)
            if isinstance(decoded, Malformed):
                return chain, None
            frame, size = decoded
            rights = self._restrict(level, rights, entry)
            if size:
                return chain, Translation(vaddr, frame | vaddr & (size - 1), size, entry,
                                          self._attrs(entry, rights, size), chain)
            table = self._lower_table(level + 1, frame, chain, covers)
            if isinstance(table, Malformed):
                return chain, None
            level, base = level + 1, frame

    def malformed_at(self, vaddr: int) -> Malformed | None:
        """Why `vaddr` does not translate when the reason is a malformed entry on its way (None otherwise)."""
        chain, t = self.walk(vaddr)
        return None if t is not None else self._faults.get(chain)

    def malformed(self) -> list[Malformed]:
        """Every malformed entry of the tables (the recursive windows aside: they show the same entries again), in
        walk order."""
        return list(self._walk_all()[2])

    def physical_spans(self, vaddr: int, size: int) -> list[tuple[int, int]]:
        """The (physical address, length) pieces that `size` bytes at `vaddr` occupy, page by page."""
        spans = []
        while size > 0:
            t = self.translate(vaddr)
            if t is None:
                bad = self.malformed_at(vaddr)
                raise WalkError(f"{vaddr:#x} is not mapped: an access there would fault"
                                + (f" ({bad})" if bad is not None else ""))
            chunk = min(size, t.size - (vaddr & (t.size - 1)))
            spans.append((t.paddr, chunk))
            vaddr, size = vaddr + chunk, size - chunk
        return spans

    def read_virtual(self, vaddr: int, size: int) -> bytes:
        """`size` bytes at `vaddr` as the CPU would read them through these tables."""
        return b"".join(self.read_phys(paddr, n) for paddr, n in self.physical_spans(vaddr, size))

    def mappings(self) -> list[Mapping]:
        """Every mapped range outside the recursive windows, merged where virtual and physical addresses both
        continue and the attributes agree. The ranges below malformed entries are not mapped (`malformed`)."""
        runs: list[list[int]] = []
        for vaddr, paddr, size, attrs in self._walk_all()[0]:
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
        return [RecursiveWindow(slot, self._slot_vaddr(slot), 1 << shift, Attrs(top[slot] & bits),
                                self.top + slot * self.mode.entry_size)
                for slot in sorted(self._self_slots)]

    def page_tables(self) -> list[tuple[tuple[int, ...], int]]:
        """(index path, physical address) of every table below the top level that the walk reads, in walk order
        (a table a malformed entry points at is none)."""
        return list(self._walk_all()[1])

    def _walk_all(self) -> tuple[list[tuple[int, int, int, Attrs]], list[tuple[tuple[int, ...], int]],
                                 list[Malformed]]:
        """(every page: vaddr, frame, size, attributes; every table below the top: index path, address; every
        malformed entry), from one walk of all the tables, made once."""
        if self._walked is not None:
            return self._walked
        mode = self.mode
        leaves: list[tuple[int, int, int, Attrs]] = []
        tables: list[tuple[tuple[int, ...], int]] = []
        bad: list[Malformed] = []

        def visit(level: int, base: int, table: tuple[int, ...], vbase: int, rights: int,
                  chain: tuple[EntryRef, ...]) -> None:
            shift = mode.shift(level)
            for index, entry in enumerate(table):
                if not entry & PTE_P or level == 0 and index in self._self_slots:
                    continue
                here = chain + (self._ref(level, base, index, entry),)
                vaddr = mode.sign_extend(vbase | index << shift)
                decoded = self._decode(here, level, vaddr)
                if isinstance(decoded, Malformed):
                    bad.append(decoded)
                    continue
                frame, size = decoded
                allowed = self._restrict(level, rights, entry)
                if size:
                    leaves.append((vaddr, frame, size, self._attrs(entry, allowed, size)))
                    continue
                lower = self._lower_table(level + 1, frame, here, vaddr)
                if isinstance(lower, Malformed):
                    bad.append(lower)
                    continue
                tables.append((tuple(ref.index for ref in here), frame))
                visit(level + 1, frame, lower, vaddr & ((1 << mode.va_bits) - 1), allowed, here)

        visit(0, self.top, self._table(0, self.top, ()), 0, _RIGHTS, ())
        self._walked = leaves, tables, bad
        return self._walked

    def _slot_vaddr(self, slot: int) -> int:
        return self.mode.sign_extend(slot << self.mode.shift(0))

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

    def _lower_table(self, level: int, base: int, chain: tuple[EntryRef, ...],
                     vstart: int) -> tuple[int, ...] | Malformed:
        """The table the last entry of `chain` points at, or that entry as Malformed when the table cannot be read
        (outside RAM): the walk of the rest goes on."""
        try:
            return self._table(level, base, chain)
        except WalkError as err:
            why = str(err).split(": ", 1)[1]
            return self._record(Malformed(chain, vstart, 1 << self.mode.shift(level - 1), 0, why))

    def _record(self, bad: Malformed) -> Malformed:
        self._faults[bad.chain] = bad
        return bad

    def _decode(self, chain: tuple[EntryRef, ...], level: int, vstart: int) -> tuple[int, int] | Malformed:
        """Where the present entry last in `chain` leads: (frame, page size) if it maps a page, (table address, 0)
        if not; Malformed (recorded) if the CPU would refuse it. `vstart`: the virtual address it covers first."""
        mode = self.mode
        entry = chain[-1].value
        size = 0
        if level == mode.levels - 1:
            size = PAGE_SIZE
        elif entry & PTE_PS and level in mode.large_levels and (self.pse or not mode.large_needs_pse):
            size = 1 << mode.shift(level)
        name = mode.level_names[level]
        # (bits, why they are wrong), each checked on its own so the finding says which rule each bit breaks.
        rules = [(mode.reserved[level], f"reserved in a {name} entry")]
        if level in mode.nx_levels and not self.nxe:
            rules.append((PTE_NX, "XD, bit 63, is reserved with EFER.NXE off"))
        frame = entry & mode.frame_mask
        if mode.entry_size == 8:
            rules.append((mode.frame_mask & ~((1 << self.maxphyaddr) - 1),
                          f"address bits above MAXPHYADDR {self.maxphyaddr}"))
        if size > PAGE_SIZE:
            # Bit 12 of a large entry is PAT; the bits from 13 up to the frame must be clear, but in a 4 MiB PDE
            # (PSE-36) bits 13 and up hold address bits 32 and up, as many as MAXPHYADDR allows.
            low = (size - 1) & ~(2 * PAGE_SIZE - 1)
            high = 0
            if mode.entry_size == 4:
                high = ((1 << max(self.maxphyaddr - 32, 0)) - 1) << 13
                rules.append((low & ~high, f"reserved in a 4 MiB {name} entry with MAXPHYADDR {self.maxphyaddr}"))
            else:
                rules.append((low, f"a {size >> 20} MiB page's frame must be aligned to its size"))
            frame = (frame & ~(size - 1)) | (entry & high) >> 13 << 32
        wrong = [(entry & bits, why) for bits, why in rules if entry & bits]
        if wrong:
            bits = 0
            for b, _ in wrong:
                bits |= b
            why = f"reserved bits {bits:#x} set (" + "; ".join(f"{b:#x}: {w}" for b, w in wrong) + ")"
            if mode.canonical and entry >> (mode.va_bits - 1) == (1 << (65 - mode.va_bits)) - 1:
                why += ": the entry holds what looks like a kernel virtual address, not a physical one"
            return self._record(Malformed(chain, vstart, 1 << mode.shift(level), bits, why))
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
