"""Every address space of a kernel kgen did not build, found where the kernel keeps them.

A kernel with processes has one top-level table per process, and CR3 holds whichever process happened to run last:
judged on CR3 alone, its verdicts would change from run to run, and a flaw in a space that is not current would go
unseen. Such a kernel keeps its spaces somewhere; `--address-spaces SYMBOL[,COUNT]` names an array in its ELF holding
the physical address of each space's top-level table, one word of the kernel each (4 bytes for an i386 kernel, 8 for
a 64-bit one, in an ELF64 or wrapped in an ELF32: `Arch.for_elf`), 0 for an unused slot. COUNT defaults to the symbol's size over the word size. The checks then run once per slot, each
on the machine seen through that space (`GuestView.in_space`).

Any other form, `--address-spaces EXPR`, is an expression over the kernel's globals evaluated with its DWARF
(kgen/guest/dwarfspaces.py: `ptable.proc[state != UNUSED].pgdir`, `task_list[->next].cr3`): the checks then run once
per space it yields on the booted machine, each named by the expression with its element (and the element's name
member): `ptable.proc[2].pgdir "cat"`. A bare SYMBOL, or SYMBOL,COUNT, keeps the array meaning above.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from kgen.arch import Arch
from kgen.errors import KgenError
from kgen.guest import dwarfspaces
from kgen.guest.elfinfo import ElfInfo

# SYMBOL or SYMBOL,COUNT: the array of physical addresses; anything else is an expression.
_ARRAY_FORM = re.compile(r"^\s*[A-Za-z_$][\w$]*\s*(,.*)?$")


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


def is_array_form(spec: str) -> bool:
    """`SYMBOL[,COUNT]`: the array of physical top-level table addresses; else an expression (dwarfspaces)."""
    return bool(_ARRAY_FORM.match(spec))


def parse_spec(spec: str, elf: ElfInfo) -> SpaceArray | dwarfspaces.Plan:
    """--address-spaces SPEC checked against the ELF before anything boots: the array of `SYMBOL[,COUNT]`, or an
    expression checked against the DWARF's types; what does not fit is one line (KgenError)."""
    if is_array_form(spec):
        return SpaceArray.parse(spec, elf)
    try:
        types = dwarfspaces.KernelTypes.load(elf)
    except KgenError as err:
        raise KgenError(f"--address-spaces {spec}: {err}") from None
    return dwarfspaces.plan(types, spec)


@dataclass(frozen=True)
class NamedSpace:
    """One space an expression yields, by the name it had when the tests were collected: what a test parametrised
    over the spaces is given for `--address-spaces EXPR`. `find` evaluates the expression again on the view."""
    expression: str
    name: str

    def find(self, view) -> dwarfspaces.Space | None:
        return next((space for space in dwarfspaces.spaces_in_view(view, self.expression)
                     if space.name == self.name), None)


@dataclass(frozen=True)
class NoSpaces:
    """What a test parametrised over an expression's spaces is given when there are none to check: `reason` says
    why (every element skipped, or the kernel could not be booted to evaluate it); `failed`: a finding, not a skip."""
    expression: str
    reason: str
    failed: bool = False

    @property
    def name(self) -> str:
        return self.expression


def space_name(view, top: int, spaces: SpaceArray | dwarfspaces.Plan | None = None) -> str | None:
    """Which space the top-level table at physical `top` is, when the kernel says: the slot of the array or the
    space of the expression --address-spaces gave (`parse_spec`) that holds it, or for a kgen kernel "the boot
    space" (record 0 of its `as_spaces`) or another space it lists; None when nothing names it."""
    mask = view.mode.cr3_mask
    if isinstance(spaces, SpaceArray):
        for index, slot in enumerate(spaces.tops(view.read_phys)):
            if slot and slot & mask == top:
                return spaces.name(index)
    elif spaces is not None:
        try:
            found = dwarfspaces.spaces_in_view(view, spaces)
        except (KgenError, dwarfspaces.Unreadable):     # the expression cannot be followed now: no name, no error
            found = []
        for space in found:
            if space.top is not None and space.top & mask == top:
                return space.name
    if view.layout is None:
        return None
    from kgen.guest import invariants      # here: invariants' own imports need not load for a foreign kernel
    try:
        spaces = invariants.live_spaces(view)
    except invariants.NotApplicable:
        return None
    for index, (space, _) in enumerate(spaces):     # record 0 is the boot space; the other live ones follow, packed
        if space & mask == top:
            return "the boot space" if index == 0 else f"a space the kernel lists in {invariants.SPACES_SYMBOL}"
    return None


def cr3_space_text(view, spaces: SpaceArray | dwarfspaces.Plan | None = None) -> str:
    """"the space in CR3: PD at 0x106000 (spaces[1])": the space a check judged when it was given no other."""
    top = view.regs.cr3 & view.mode.cr3_mask
    name = space_name(view, top, spaces)
    return f"the space in CR3: {view.mode.level_names[0]} at {top:#x}" + (f" ({name})" if name else "")
