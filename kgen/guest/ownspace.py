"""The kernel's own address space: the top-level table the kernel set up for itself at boot, whose kernel half every
process's space copies, as opposed to whichever space happens to be live when the machine is stopped.

Why it matters: a kernel with processes switches CR3 as it schedules them, on its timer. A ready point that stops
the machine when a text appears on COM1 (`--ready TEXT`) stops it some milliseconds later, in whichever space was
live then: judged on CR3 alone, a flaw of the kernel's own space is found in one run and not in the next. So the
page-table checks judge the kernel's own space every run, and the live one beside it (`judged_spaces`).

How kgen learns it, the same way every run: from the symbol the kernel keeps it under (`OWN_SPACE_SYMBOLS`: xv6's
`kpgdir`, JOS's `kern_pgdir`, Linux's `swapper_pg_dir`...), read from the stopped machine: a value the kernel wrote
once at boot and keeps, whatever runs at the moment. Cheap (a word read and a walk or two) and the same every run.
A kernel with none of these symbols is judged in the live space only, and the run's last line says so.
Other ways, and why they are not used:
- the first CR3 with paging on at boot: QEMU's gdbstub watches memory, not control registers, and stepping the boot
  an instruction at a time costs a round trip each (a teaching kernel's boot runs millions); sampling CR3 while it
  boots is timing again. And that first table is often a boot-only one (xv6's `entrypgdir`: 4 MiB pages mapped twice,
  low and high) the kernel leaves for the one it builds in `main`, not the space it keeps;
- QEMU's `-d int` log shows CR3 at each interrupt only: which of those is the kernel's is a guess again;
- the space whose kernel half all others share: it needs the others (`--address-spaces`), and a freed process table
  shares it too.
A symbol either is the table (an object of a page or more: the top is where it is loaded; an assembly label, of no
size, at a page boundary may be it too) or holds its address (a word: a kernel virtual address, at or above the
kernel half, translated through the live space, whose kernel half every space shares; below it, a physical address,
as a CR3 value). What it names must be a top-level table of this
kernel (dwarfspaces.implausible: it maps the kernel where the live space does), else it is not used and `find`
says why.
"""
from __future__ import annotations

from dataclasses import dataclass

from kgen.arch import Arch
from kgen.arch.hw import PAGE_SIZE
from kgen.errors import KgenError
from kgen.guest.invariants import PHYS_LIMIT, GuestView

# Names kernels keep their own top-level table under, the most telling first (a kernel has one of them at most).
# Names of a boot table (`boot_page_directory`, `boot_pml4`, `entrypgdir`) are not among them: many kernels leave
# that table for one they build later, and judging a table no longer used would be findings about nothing.
OWN_SPACE_SYMBOLS = ("kpgdir", "kern_pgdir", "kernel_pgdir", "kernel_pgd", "kernel_page_directory", "kernel_pml4",
                     "kernel_pml4t", "kpml4", "kernel_cr3", "kernel_top_table", "swapper_pg_dir", "init_top_pgt",
                     "init_level4_pgt")


@dataclass(frozen=True)
class OwnSpace:
    """The kernel's own space: its top-level table's physical address and the symbol it was found by."""
    top: int
    symbol: str
    is_table: bool          # the symbol is the table itself, not a word holding its address

    def describe(self, view: GuestView) -> str:
        """"the kernel's own space (PD at 0x400000, kpgdir)"."""
        return f"the kernel's own space ({view.mode.level_names[0]} at {self.top:#x}, {self.symbol})"


def own_space_symbol(elf) -> str | None:
    """The symbol of `elf` that names the kernel's own top-level table, or None (no such symbol, or stripped)."""
    return next((name for name in OWN_SPACE_SYMBOLS if name in elf.symbols), None)


def find(view: GuestView) -> tuple[OwnSpace | None, str | None]:
    """The kernel's own space on the stopped machine `view`, and None; or None and why not (no symbol names it, the
    symbol holds 0 or no table of this kernel). Needs paging on (a walk of the live space)."""
    name = own_space_symbol(view.elf)
    if name is None:
        return None, (f"{view.elf.path.name} has no symbol kgen knows a kernel's own top-level table by "
                      f"({', '.join(OWN_SPACE_SYMBOLS[:4])}...)")
    sym = view.elf.symbols[name]
    live = view.need_walker()
    # An assembly label has no size (0): page-aligned, it may be the table itself (mios's `kernel_page_directory:
    # .space 4096`) as well as a word holding its address; the table is tried first, then the word.
    if sym.size >= PAGE_SIZE:
        readings = (True,)
    elif sym.size == 0 and sym.value % PAGE_SIZE == 0:
        readings = (True, False)
    else:
        readings = (False,)
    problems = []
    for is_table in readings:
        top, problem = _top_named(view, live, name, sym, is_table)
        if problem is None:
            return OwnSpace(top, name, is_table), None
        problems.append(problem if len(readings) == 1 else
                        f"{'as the table itself' if is_table else 'as a word holding its address'}: {problem}")
    return None, "; ".join(problems)


def _top_named(view: GuestView, live, name: str, sym, is_table: bool) -> tuple[int | None, str | None]:
    """The top-level table `sym` names read one way (the table itself, or a word holding its address), and None;
    or None and why it names no top-level table of this kernel that way."""
    try:
        if is_table:
            at = live.translate(sym.value)
            top = at.paddr if at is not None else _loaded_at(view, sym.value)
        else:
            size = Arch.for_elf(view.elf).word_size
            data = (live.read_virtual(sym.value, size) if live.translate(sym.value) is not None else
                    view.read_phys(_loaded_at(view, sym.value), size))
            value = int.from_bytes(data, "little")
            if value == 0:
                return None, f"{name} is 0: the kernel has not set its own space up"
            half = view.kernel_half
            if value >= PHYS_LIMIT or (half is not None and value >= half):    # a kernel virtual address
                at = live.translate(value)
                if at is None:
                    return None, f"{name} = {value:#x}, an address the live space does not map"
                top = at.paddr
            else:
                top = value     # a physical address, as CR3 takes it
    except (KgenError, ValueError, OSError) as err:
        return None, f"{name} cannot be read: {err}"
    if top is None:
        return None, f"{name} ({sym.value:#x}) lies in no loaded segment and the live space does not map it"
    top &= view.mode.cr3_mask
    if view.ram and not any(start <= top and top + PAGE_SIZE <= end for start, end in view.ram):
        return None, f"{name} names {top:#x}, outside the guest's RAM: no top-level table"
    from kgen.guest.dwarfspaces import implausible     # here: dwarfspaces loads pyelftools' DWARF reader
    why = implausible(view, top)
    if why is not None:
        return None, f"{name} names {top:#x}, no top-level table of this kernel: {why}"
    return top, None


def _loaded_at(view: GuestView, vaddr: int) -> int | None:
    """Where the ELF loads `vaddr` (its segment's physical address), or None outside every segment."""
    return next((seg.paddr + vaddr - seg.vaddr for seg in view.elf.segments
                 if seg.memsz and seg.vaddr <= vaddr < seg.vaddr + seg.memsz), None)


@dataclass(frozen=True)
class Judged:
    """One space a page-table check judges: its view (the machine seen through it) and what it is, in words."""
    view: GuestView
    role: str


def judged_spaces(view: GuestView) -> tuple[list[Judged], str | None]:
    """The spaces a page-table check judges when it is given none (no --address-spaces slot), and what a report says
    of them: the kernel's own space (`find`) and the live one (CR3) when they differ, the own space first; the live
    one alone when they are the same, or when the kernel's own space cannot be told (and the text says why). For a
    kernel kgen did not build with paging on; kgen's own is judged in CR3 (check_cr3 holds it to its boot table), and
    the text is then None."""
    if view.layout is not None or view.walker is None:
        return [Judged(view, "")], None
    try:
        own, why = find(view)
    except KgenError as err:        # a live space that cannot be walked: the checks of it say so
        own, why = None, str(err)
    live_top = view.regs.cr3 & view.mode.cr3_mask
    live = f"{view.mode.level_names[0]} at {live_top:#x}"
    if own is None:
        return [Judged(view, "")], f"judged the live space only ({live}): kgen cannot tell the kernel's own space: {why}"
    mine = own.describe(view)
    if own.top == live_top:     # the one space in CR3, as a check of CR3 names it (the report's last line says whose)
        return ([Judged(view, "own")],
                f"the ready point came while {mine} was live: judged it")
    return ([Judged(view.in_space(own.top, mine), "own"),
             Judged(view.in_space(live_top, f"the live space: {live} (the ready point came while it was live, not "
                                  f"the kernel's own)"), "live")],
            f"the ready point came while {live} was live, not {mine}: judged both")


@dataclass(frozen=True)
class OwnSpaceSlot:
    """What a test parametrised over `--address-spaces SPEC`'s spaces is given besides them, for a kernel with a symbol
    for its own space (`own_space_symbol`): the kernel's own space, which a list of processes seldom holds (xv6's
    `kpgdir` is in no `struct proc`), and the live one when it is none of the listed spaces."""
    spec: str

    name = "the kernel's own space"

    def judged(self, view: GuestView) -> tuple[list[GuestView], str | None]:
        """The views to judge (none: the own space cannot be told, and why) and the report's text."""
        judged, said = judged_spaces(view)
        if not any(j.role == "own" for j in judged):
            return [], said
        listed = self.listed_tops(view)
        return [j.view for j in judged if j.role == "own" or j.view.regs.cr3 not in listed], said

    def listed_tops(self, view: GuestView) -> set[int]:
        """The top-level tables `spec` lists on this machine (what cannot be read lists none)."""
        from kgen.guest import addrspaces, dwarfspaces
        mask = view.mode.cr3_mask
        try:
            if addrspaces.is_array_form(self.spec):
                return {top & mask for top in addrspaces.SpaceArray.parse(self.spec, view.elf).tops(view.read_phys)}
            return {space.top & mask for space in dwarfspaces.spaces_in_view(view, self.spec)
                    if space.top is not None}
        except (KgenError, ValueError, OSError):
            return set()
