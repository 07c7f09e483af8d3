"""Where a kernel's address spaces come from: one interface for every way of finding them.

A check of "every space" asks a `SpaceSource` for the spaces of the machine as it is now (`spaces(view)`: a name a
person reads and the physical address of the top-level table, each), whatever the source is:
- `ArraySource`: `--address-spaces SYMBOL[,COUNT]`, an array of physical top-table addresses in the kernel's data
  (kgen/guest/addrspaces.py `SpaceArray`), unused slots (0) left out;
- `ExpressionSource` (kgen/guest/dwarfspaces.py): `--address-spaces EXPR`, an expression over the kernel's globals
  evaluated with its DWARF (`ptable.proc[state != UNUSED].pgdir`), each space named by its element and process;
- `KgenSpaces`: kgen's own kernel, its `as_spaces` records (templates/aspace.s, `invariants.live_spaces`), each
  named `space 0x...` by its top table as the kernel's messages name it.
Another way of finding them plugs in the same way: a class with `describe()`, `spaces(view)` and `problems(view)`,
picked by `source_for`.

The sources are read again at every moment they are asked (a process created since the last look is there, one
that exited is gone), so `kgen test --check-at` (kgen/harness/checkat.py) can ask at each hit.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from kgen.guest.addrspaces import SpaceArray, is_array_form, parse_spec
from kgen.guest.dwarfspaces import ExpressionSource
from kgen.guest.elfinfo import ElfInfo


@dataclass(frozen=True)
class Space:
    """One address space: `name` as reports show it (`spaces[2]`, `space 0x1d000`), `top` its top-level table's
    physical address."""
    name: str
    top: int


class SpaceSource(Protocol):
    def describe(self) -> str:
        """Where the spaces come from, for a report: "--address-spaces spaces,3"."""

    def spaces(self, view) -> list[Space]:
        """Every space the kernel keeps, read from the stopped machine `view` (a GuestView)."""

    def problems(self, view) -> list[str]:
        """What could not be followed at this moment (a pointer into unmapped memory while a list is changed): the
        spaces `spaces` left out, one line each; [] when it read every one."""


@dataclass(frozen=True)
class ArraySource:
    """`--address-spaces SYMBOL[,COUNT]`: each non-zero slot of the array is a space."""
    array: SpaceArray
    spec: str

    def describe(self) -> str:
        return f"--address-spaces {self.spec}"

    def spaces(self, view) -> list[Space]:
        mask = view.mode.cr3_mask
        return [Space(self.array.name(i), top & mask) for i, top in enumerate(self.array.tops(view.read_phys))
                if top & mask]

    def problems(self, view) -> list[str]:
        return []


@dataclass(frozen=True)
class KgenSpaces:
    """kgen's own kernel: every live record of `as_spaces`, record 0 the boot space."""

    def describe(self) -> str:
        from kgen.guest.invariants import SPACES_SYMBOL
        return f"{SPACES_SYMBOL} (kgen's kernel)"

    def spaces(self, view) -> list[Space]:
        from kgen.guest.invariants import SPACES_SYMBOL, live_spaces
        # Named by the top table, as the kernel's own messages and check_space name a space.
        tops = [top for top, _ in live_spaces(view)]
        return [Space(f"space {top:#x}" + (" (boot)" if i == 0 else ""), top) for i, top in enumerate(tops)]

    def problems(self, view) -> list[str]:
        return []


def source_for(elf: ElfInfo, spec: str | None, *, kgen_kernel: bool = False) -> SpaceSource | None:
    """The source of `elf`'s spaces: kgen's own kernel keeps them in `as_spaces`; another kernel's are named by
    `spec` (--address-spaces: SYMBOL[,COUNT], or an expression), or unknown (None: only the space in CR3 is seen). A
    spec that does not fit the ELF (or its DWARF's types) raises KgenError (one line)."""
    if kgen_kernel:
        return KgenSpaces()
    if spec is None:
        return None
    if not is_array_form(spec):
        parse_spec(spec, elf)       # an expression that does not fit the DWARF's types: one line
        return ExpressionSource(spec)
    return ArraySource(SpaceArray.parse(spec, elf), spec)
