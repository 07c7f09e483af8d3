"""What a correctly booted kernel's paging looks like, checked on a snapshot of the machine.

Each `check_*` takes a `GuestView` and returns the problems it found, one line per page or entry at fault, naming
the virtual address (symbolised from the ELF), the entry that decides it and why it is wrong; an empty list means
the invariant holds. The checks never change the machine, so a test can tamper with a stopped guest and call them
again. Checks that need to know the kernel's intent beyond its ELF (where the PD is, where the temp-map window is)
read it from the `Layout`; without one (anyone's Multiboot ELF) they raise `NotApplicable`.
"""
from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace

from kgen.arch import hw
from kgen.guest.elfinfo import ElfInfo
from kgen.guest.findings import Finding, failures
from kgen.errors import KgenError
from kgen.build.layout import Layout
from kgen.arch.paging import I386, PAE, X86_64, PagingMode
from kgen.guest.pagewalk import Attrs, EntryRef, Mapping, ReadPhys, Walker, WalkError
from kgen.machine.registers import Registers

# The boot stub's page directory (templates/boot.s): CR3 must hold its physical address.
BOOT_PD_SYMBOL = "boot_top_table"
# Messages beyond this many per check add nothing a person reads; the count of the rest is given.
MAX_PROBLEMS = 20
# x86 physical addresses have at most 52 bits: a p_paddr at or above this is no load address but a copy of p_vaddr
# (a Limine kernel linked without AT(): the loader chooses where it goes).
PHYS_LIMIT = 1 << 52


class NotApplicable(KgenError):
    """The check needs something this kernel does not have (a layout, a poisoned boot, paging)."""


@dataclass
class GuestView:
    """A stopped guest: its registers, its physical memory and what the kernel meant (ELF, and layout if kgen's)."""

    regs: Registers
    read_phys: ReadPhys
    elf: ElfInfo
    layout: Layout | None = None
    poison: bytes | None = None     # the pattern RAM was filled with before boot, tiled from address 0
    space: str | None = None        # which address space CR3 stands for when it is not the CPU's (`in_space`)
    # Program-header indices of the segments the user named boot-only (--boot-only-segment); None: the default rule.
    boot_only: tuple[int, ...] | None = None
    # Where the kernel half starts, as the user said (--kernel-base, for 32-bit paging); None: the ELF's base.
    kernel_base_given: int | None = None
    # What a check learnt that holds and still matters to a reader (where the loader put the kernel): said beside
    # the verdict, pass or fail (`assert_holds`).
    notes: list[str] = field(default_factory=list, compare=False)
    # The CPU's MAXPHYADDR (`Machine.phys_bits`): entry address bits at and above it are reserved. None: unknown,
    # the widest the paging mode allows.
    phys_bits: int | None = None
    # Where the guest has RAM, [start, end) each (`Machine.ram_windows`): a page table elsewhere is no table (QEMU
    # reads zeros there, which would look like an empty one). Empty: unknown, every read trusted.
    ram: tuple[tuple[int, int], ...] = ()

    def in_space(self, top: int, name: str) -> GuestView:
        """The same machine seen through another address space: its top-level table at physical `top` in place of
        CR3, so every check walks that space (kgen test --address-spaces)."""
        return replace(self, regs=replace(self.regs, cr3=top), space=name)

    @property
    def walker(self) -> Walker | None:
        """The walk from CR3, None with paging off. Built on first use, inside the check that asks: a top-level
        table the walker cannot read (CR3 outside RAM) is that check's finding, and checks that need no walk (CR0)
        still run. Malformed entries below the top do not stop it (`check_entries_well_formed` names them)."""
        if "_walker" not in self.__dict__:
            self.__dict__["_walker"] = self.walker_of(self.regs.cr3) if self.regs.cr0 & hw.CR0_PG else None
        return self.__dict__["_walker"]

    def walker_of(self, top: int, read_phys: ReadPhys | None = None) -> Walker:
        """A walk of the space whose top-level table `top` locates (a CR3 value), as this CPU walks it: its paging
        mode, CR4.PSE, EFER.NXE and MAXPHYADDR."""
        read = read_phys or self.read_phys
        if self.ram:
            read = _tables_in_ram(read, self.ram)
        return Walker(read, top, self.mode, pse=bool(self.regs.cr4 & hw.CR4_PSE),
                      nxe=bool((self.regs.efer or 0) & hw.EFER_NXE), maxphyaddr=self.phys_bits)

    @property
    def mode(self) -> PagingMode:
        """The paging mode the CPU is in, from its own registers: EFER.LMA, else CR4.PAE, else 32-bit paging."""
        if (self.regs.efer or 0) & hw.EFER_LMA:
            return X86_64
        return PAE if self.regs.cr4 & hw.CR4_PAE else I386

    @classmethod
    def capture(cls, machine, elf: ElfInfo, layout: Layout | None = None, poison: bytes | None = None) -> GuestView:
        """Snapshot a machine; stop it first, or the registers and tables may belong to different moments."""
        phys_bits = getattr(machine, "phys_bits", None)
        return cls(machine.registers(), machine.read_phys, elf, layout, poison,
                   phys_bits=phys_bits() if callable(phys_bits) else None,
                   ram=tuple((w.start, w.end) for w in getattr(machine, "ram_windows", None) or ()))

    @property
    def kernel_base(self) -> int | None:
        """Lowest kernel virtual address: the layout's, or for a foreign higher-half ELF the vaddr - paddr of its
        higher-half segments. A segment linked where it is loaded (the Higher Half Bare Bones boot segment at 1 MiB)
        is boot code, not the kernel's base (`boot_segments`), and so is a segment the user named boot-only."""
        if self.layout is not None:
            return self.layout.kernel_half_start
        named = self.boot_only or ()
        offsets = {seg.vaddr - seg.paddr for seg in self.elf.segments
                   if seg.memsz and seg.vaddr > seg.paddr and seg.index not in named}
        if offsets:
            return min(offsets)
        # Linked high with no load address (p_paddr = p_vaddr, beyond any physical address): its lowest segment.
        unplaced = [seg.vaddr for seg in self.elf.segments if seg.memsz and seg.paddr >= PHYS_LIMIT
                    and seg.index not in named]
        return min(unplaced) if unplaced else None

    @property
    def kernel_half(self) -> int | None:
        """Where the kernel half starts: what the paging mode says. kgen's layout says it for its own kernel; in long
        mode it is the upper canonical half (x86-64 defines it, whatever the ELF is linked at); under 32-bit and PAE
        paging the kernel chooses, so it is --kernel-base when given, else the ELF's higher-half base
        (`kernel_base`), else None: a kernel linked where it is loaded, whose half kgen cannot tell from its
        processes'. Everything from here up is the kernel's; below it, the user half."""
        if self.layout is not None:
            return self.layout.kernel_half_start
        if self.mode.upper_half is not None:
            return self.mode.upper_half
        return self.kernel_base_given if self.kernel_base_given is not None else self.kernel_base

    def image_frames(self) -> list[tuple[int, int]]:
        """[start, end) of the kernel image's frames, where the loader really put them (`placement`)."""
        shift = self.placement.offset
        return [(seg.paddr + shift, seg.paddr + seg.memsz + shift) for seg in self.elf.segments if seg.memsz]

    @property
    def boot_segments(self) -> tuple:
        """Boot code the kernel may unmap once it runs high: the segments the user named (`boot_only`), or by
        default those linked at their load address in a kernel whose other segments are higher-half (empty for a
        kgen kernel and for a kernel that is not higher-half)."""
        if self.layout is not None:
            return ()
        if self.boot_only is not None:
            return tuple(seg for seg in self.elf.segments if seg.index in self.boot_only)
        if self.kernel_base is None:
            return ()
        return tuple(seg for seg in self.elf.segments
                     if seg.memsz and seg.vaddr == seg.paddr and seg.vaddr < self.kernel_base)

    @property
    def placement(self) -> Placement:
        """Where the page tables put the kernel's segments (`find_placement`), learnt on first use."""
        if "_placement" not in self.__dict__:
            self.__dict__["_placement"] = find_placement(self)
        return self.__dict__["_placement"]

    def page(self, vaddr: int) -> str:
        return self.elf.symbolize(vaddr)

    def need_walker(self) -> Walker:
        if self.walker is None:
            raise NotApplicable(f"paging is off (CR0={self.regs.cr0:#010x}): there are no page tables to check")
        return self.walker

    def need_layout(self) -> Layout:
        if self.layout is None:
            raise NotApplicable(f"{self.elf.path.name} is not a kgen kernel: its layout is unknown")
        return self.layout

    def entry(self, table: int, index: int) -> int:
        size = self.mode.entry_size
        return int.from_bytes(self.read_phys(table + size * index, size), "little")

    def entry_text(self, table: int, index: int, level: int = 0) -> str:
        """"PML4[510] @ 0x103ff0 = 0x0000000000103003", the way messages name an entry."""
        size = self.mode.entry_size
        value = self.entry(table, index)
        return f"{self.mode.level_names[level]}[{index}] @ {table + size * index:#x} = {value:#0{2 * size + 2}x}"


def _tables_in_ram(read_phys: ReadPhys, ram: tuple[tuple[int, int], ...]) -> ReadPhys:
    """`read_phys` for the walker: a table that does not lie whole in one RAM window cannot be read."""
    def read(addr: int, size: int) -> bytes:
        if not any(lo <= addr and addr + size <= hi for lo, hi in ram):
            raise ValueError(f"{addr:#x}-{addr + size:#x} is not in the guest's RAM (QEMU's memory map)")
        return read_phys(addr, size)
    return read


@dataclass(frozen=True)
class Placement:
    """Where a loader really put the kernel: physical address minus p_paddr, the same for every PT_LOAD of a kernel
    loaded whole (Limine chooses its physical base; so does GRUB for a Multiboot 2 relocatable header). 0: where
    the ELF says."""

    offset: int
    elf_base: int                                   # the lowest p_paddr of the loaded segments
    # segment index -> the offset its pages lie at, for the segments that do not lie at `offset`: a finding.
    strays: dict[int, int] = field(default_factory=dict)

    @property
    def base(self) -> int:
        return self.elf_base + self.offset

    def describe(self) -> str:
        return (f"the page tables put the kernel at physical base {self.base:#x}, where its ELF's p_paddr say "
                f"{self.elf_base:#x}: every segment is judged there")


def find_placement(view: GuestView) -> Placement:
    """The offset from p_paddr to the physical address the live tables map each PT_LOAD page to: the one most of
    the kernel's mapped pages share (ties: the ELF's own, else the lowest segment's). A segment whose pages lie
    elsewhere is a stray."""
    walker = view.need_walker()
    loaded = [seg for seg in view.elf.segments if seg.memsz]
    elf_base = min((seg.paddr for seg in loaded), default=0)
    per_segment: dict[int, Counter] = {}
    for seg in loaded:
        first = seg.vaddr & ~(hw.PAGE_SIZE - 1)
        seen = Counter()
        for vaddr in range(first, seg.vaddr + seg.memsz, hw.PAGE_SIZE):
            t = walker.translate(vaddr)
            if t is not None:
                seen[t.paddr - ((seg.paddr & ~(hw.PAGE_SIZE - 1)) + vaddr - first)] += 1
        per_segment[seg.index] = seen
    pages = sum(per_segment.values(), Counter())
    if not pages:
        return Placement(0, elf_base)
    most = max(pages.values())
    tied = [offset for offset, count in pages.items() if count == most]
    offset = 0 if 0 in tied else tied[0]
    strays = {index: seen.most_common(1)[0][0] for index, seen in per_segment.items()
              if seen and seen.most_common(1)[0][0] != offset}
    return Placement(offset, elf_base, strays)


def _capped(problems: list[str]) -> list[str]:
    """At most MAX_PROBLEMS findings, those that fail first; the count of the rest is itself information when
    none of the rest fails."""
    if len(problems) <= MAX_PROBLEMS:
        return problems
    failing = failures(problems)
    ordered = failing + [p for p in problems if getattr(p, "info", False)]
    rest = ordered[MAX_PROBLEMS:]
    more = f"... and {len(rest)} more"
    return ordered[:MAX_PROBLEMS] + [more if failures(rest) else Finding(more, info=True)]


def _walk_errors_reported(check):
    # A top-level table the walker cannot read at all (CR3 outside RAM) is itself a finding of the check that met
    # it, not a crash of the harness. Malformed entries below it do not stop the walk: check_entries_well_formed
    # names them, and every other check judges the rest.
    def guarded(view: GuestView, *args, **kwargs) -> list[str]:
        try:
            return _capped(check(view, *args, **kwargs))
        except WalkError as err:
            return [f"the page tables cannot be walked: {err}"]
    guarded.__name__ = check.__name__
    guarded.__doc__ = check.__doc__
    return guarded


def mapped_pages(walker: Walker, start: int, end: int):
    """Translations of every mapped page in [start, end), one per page (a large page once)."""
    vaddr = start
    while vaddr < end:
        t = walker.translate(vaddr)
        if t is None:
            vaddr += hw.PAGE_SIZE
            continue
        yield vaddr, t
        vaddr = (vaddr & ~(t.size - 1)) + t.size


@_walk_errors_reported
def check_paging_enabled(view: GuestView) -> list[str]:
    """CR0.PG (paging) and CR0.WP (supervisor writes honour read-only pages) are set."""
    cr0 = view.regs.cr0
    return [Finding(f"CR0={cr0:#010x}: CR0.{name} is clear ({why})")
            for bit, name, why in ((hw.CR0_PG, "PG", "paging is off"),
                                   (hw.CR0_WP, "WP", "the kernel can write its own read-only pages"))
            if not cr0 & bit]


@_walk_errors_reported
def check_entries_well_formed(view: GuestView) -> list[str]:
    """Every present entry is one the CPU accepts: no reserved bit set (per the paging mode, EFER.NXE and the CPU's
    MAXPHYADDR) and every table it points at in RAM.

    A malformed entry makes its whole range a page fault (error code RSVD); the walk skips that range, so the other
    checks judge the rest of the tables and leave these entries to this one."""
    walker = view.need_walker()
    return [Finding(str(bad), vrange=bad.vrange, chain=bad.chain, frames=(bad.entry.addr & ~(hw.PAGE_SIZE - 1),),
                    space=view.space)
            for bad in walker.malformed()]


@_walk_errors_reported
def check_cr3(view: GuestView) -> list[str]:
    """CR3 holds the page directory the layout placed: the boot PD, at its link address minus the kernel base."""
    layout = view.need_layout()
    pd = view.elf.symbols[BOOT_PD_SYMBOL].value - layout.kernel_virtual_base
    cr3 = view.regs.cr3 & view.mode.cr3_mask
    if cr3 == pd:
        return []
    top = {"PD": "page directory"}.get(view.mode.level_names[0], view.mode.level_names[0])
    return [Finding(f"CR3={view.regs.cr3:#010x}: expected the boot {top} {BOOT_PD_SYMBOL} at physical "
                    f"{pd:#x} (link address {view.page(view.elf.symbols[BOOT_PD_SYMBOL].value)})", frames=(cr3,))]


@_walk_errors_reported
def check_recursive_slot(view: GuestView) -> list[str]:
    """The PD entry of the recursive slot maps the PD itself, supervisor-only; no other slot does.

    Without a layout, every self-referencing PD entry found must be supervisor-only (a kernel need have none)."""
    walker = view.need_walker()
    top = view.mode.level_names[0]
    problems = []
    windows = walker.recursive_windows()
    if view.layout is not None:
        slot = view.layout.recursive_slot
        entry = view.entry(walker.top, slot)
        where = view.entry_text(walker.top, slot)
        frame = entry & view.mode.frame_mask
        window = view.layout.recursive_window
        place = dict(vrange=(window.start, window.end), chain=(_top_ref(view, walker.top, slot),))
        if not entry & hw.PTE_P:
            problems.append(Finding(f"{where}: the recursive slot is not present; the {window} shows nothing",
                                    **place))
        elif frame != walker.top:
            problems.append(Finding(f"{where}: the recursive slot points at {frame:#x}, not at the {top} "
                                    f"{walker.top:#x}; {view.layout.recursive_top:#x} would show that frame as the "
                                    f"{top}", frames=(frame,), **place))
        problems += [Finding(f"{top}[{w.slot}] @ {w.entry_addr:#x}: also points at the {top}, but the recursive "
                             f"slot is {slot}", vrange=(w.vstart, w.vstart + w.size),
                             chain=(_top_ref(view, walker.top, w.slot),)) for w in windows if w.slot != slot]
    if view.layout is None and not windows:
        raise NotApplicable(f"no {top} entry points at the {top} itself: this kernel has no recursive slot")
    problems += [Finding(f"{top}[{w.slot}] @ {w.entry_addr:#x} ({w.attrs}): the recursive window {w.vstart:#x}-"
                         f"{w.vstart + w.size:#x} is user-accessible: ring 3 could rewrite every page table",
                         vrange=(w.vstart, w.vstart + w.size), chain=(_top_ref(view, walker.top, w.slot),))
                 for w in windows if w.attrs & hw.PTE_US]
    return problems


def _top_ref(view: GuestView, top: int, index: int) -> EntryRef:
    """The top-level entry `index` of the table at `top`, as a finding's entry chain names it."""
    return EntryRef(view.mode.level_names[0], index, top + view.mode.entry_size * index, view.entry(top, index))


def _large_page_runs(faults: list) -> list[list]:
    """Per-page faults grouped: consecutive pages in the same large page at fault for the same reason (the same
    text, but for the physical address a "maps physical" names) are one run; others one each."""
    runs: list[list] = []
    for vaddr, t, why in faults:
        last = runs[-1][-1] if runs else None
        if (last is not None and t is not None and last[1] is not None and t.size > hw.PAGE_SIZE
                and last[0] + hw.PAGE_SIZE == vaddr and last[1].size == t.size
                and last[0] & ~(t.size - 1) == vaddr & ~(t.size - 1)
                and (last[2] == why or last[2].startswith("maps physical") and why.startswith("maps physical"))):
            runs[-1].append((vaddr, t, why))
        else:
            runs.append([(vaddr, t, why)])
    return runs


def _size_text(size: int) -> str:
    return f"{size >> 30} GiB" if size >= 1 << 30 else f"{size >> 20} MiB" if size >= 1 << 20 else f"{size >> 10} KiB"


@_walk_errors_reported
def check_segments(view: GuestView) -> list[str]:
    """Every page of every PT_LOAD maps p_vaddr -> p_paddr + the one offset the loader put the whole kernel at, is
    writable only if a segment there is, and, where the paging mode has NX, executable only if a segment there is
    (and executable where one is).

    The offset is learnt from the tables (`find_placement`): a loader may choose the kernel's physical base, but not
    move its segments apart. i386 paging has no NX, so there "no wider than the segment flags" comes down to: a page
    holding no writable segment must not be RW."""
    walker = view.need_walker()
    placement = view.placement
    has_nx = bool(walker.mode.nx_levels) and walker.nxe
    expected: dict[int, int] = {}
    writable: dict[int, bool] = defaultdict(bool)
    executable: dict[int, bool] = defaultdict(bool)
    flags: dict[int, str] = {}
    segment_of: dict[int, int] = {}
    boot_only: set[int] = set()
    for seg in view.elf.segments:
        if not seg.memsz:
            continue
        first = seg.vaddr & ~(hw.PAGE_SIZE - 1)
        if seg in view.boot_segments:
            boot_only.update(range(first, seg.vaddr + seg.memsz, hw.PAGE_SIZE))
        for vaddr in range(first, seg.vaddr + seg.memsz, hw.PAGE_SIZE):
            expected[vaddr] = (seg.paddr & ~(hw.PAGE_SIZE - 1)) + vaddr - first + placement.offset
            writable[vaddr] |= seg.writable
            executable[vaddr] |= seg.executable
            flags[vaddr] = "".join(c if on else "-" for c, on in
                                   (("R", seg.readable), ("W", seg.writable), ("X", seg.executable)))
            segment_of[vaddr] = seg.index
    problems = []
    by_index = {seg.index: seg for seg in view.elf.segments}
    for index, offset in placement.strays.items():
        seg = by_index[index]
        problems.append(Finding(
            f"segment {index} ({view.page(seg.vaddr)}) is mapped at physical {seg.paddr + offset:#x}, not "
            f"{seg.paddr + placement.offset:#x} where the rest of the kernel puts it (physical base "
            f"{placement.base:#x}): a kernel's segments keep their distances wherever it is loaded",
            vrange=(seg.vaddr & ~(hw.PAGE_SIZE - 1), seg.vaddr + seg.memsz)))
    # Each page at fault: (vaddr, its translation or None, what is wrong), grouped by large page below.
    faults = []
    for vaddr, paddr in sorted(expected.items()):
        t = walker.translate(vaddr)
        stray = placement.strays.get(segment_of[vaddr])
        if t is None:
            # Boot code the kernel unmapped once it ran high: as meant. Below a malformed entry: that entry is
            # check_entries_well_formed's finding, not one per page here.
            if vaddr not in boot_only and walker.malformed_at(vaddr) is None:
                faults.append((vaddr, t, "not mapped"))
        elif t.paddr != paddr and (stray is None or t.paddr != paddr - placement.offset + stray):
            faults.append((vaddr, t, f"maps physical {t.paddr:#x} via {t.path}"))
        elif t.attrs & hw.PTE_RW and not writable[vaddr]:
            faults.append((vaddr, t, f"writable ({t.attrs}) via {t.path}, but no writable segment lies there"))
        elif has_nx and not t.attrs & hw.PTE_NX and not executable[vaddr]:
            faults.append((vaddr, t, f"executable ({t.attrs}, no NX) via {t.path}, but no executable segment lies "
                                     f"there"))
        elif has_nx and t.attrs & hw.PTE_NX and executable[vaddr]:
            faults.append((vaddr, t, f"NX via {t.path}, but an executable segment lies there"))
    for run in _large_page_runs(faults):
        first, t, why = run[0]
        last = run[-1][0]
        if len(run) == 1:
            text = f"page {view.page(first)} (segment {flags[first]}, loaded at {expected[first]:#x}): {why}"
        else:
            # One entry decides them all: one finding for the large page, not one per 4 KiB page of it.
            pages: dict[int, list[int]] = defaultdict(list)       # segment -> its pages in the run
            for vaddr, _, _ in run:
                pages[segment_of[vaddr]].append(vaddr)
            spans = ", ".join(
                (view.page(p[0]) if len(p) == 1 else f"{view.page(p[0])} to {view.page(p[-1])}")
                + f" (segment {flags[p[0]]}, loaded at {expected[p[0]]:#x})" for p in pages.values())
            text = (f"{len(run)} pages of the {_size_text(t.size)} page at {first & ~(t.size - 1):#x}, {spans}: "
                    f"{why}")
        problems.append(Finding(text, vrange=(first, last + hw.PAGE_SIZE), chain=t.chain if t else ()))
    if placement.offset:
        view.notes.append(placement.describe())
        if problems:
            problems.insert(0, placement.describe())
    return problems


@_walk_errors_reported
def check_nothing_below_kernel_base(view: GuestView) -> list[str]:
    """Nothing but user pages is mapped below the kernel half: the boot identity map is gone, no stray low page.

    The kernel half is what the paging mode says (`GuestView.kernel_half`): a supervisor mapping there (a direct
    map, an MMIO window) is the kernel's business, never "below the kernel base". In the user half, a page ring 3
    may use (U/S at every level) is a process's code, data or stack, reported only when its frame lies in the kernel
    image (ring 3 would see the kernel); a supervisor-only page is reported when it maps a frame of the kernel image
    (a boot identity map left behind), and is information otherwise (a guard page: ring 3 faults on it). A kernel
    linked in the user half (x86-64 linked low) owns its image's link addresses there: the segment check judges
    those pages."""
    walker = view.need_walker()
    half = view.kernel_half
    if half is None:
        raise NotApplicable(f"{view.elf.path.name} is not a higher-half kernel (p_vaddr == p_paddr): kgen cannot "
                            "tell its kernel half from its processes'; give --kernel-base ADDR where the kernel half "
                            "starts")
    image = view.image_frames()
    boot = view.boot_segments
    own = sorted((seg.vaddr & ~(hw.PAGE_SIZE - 1), _page_up(seg.vaddr + seg.memsz)) for seg in view.elf.segments
                 if seg.memsz and seg.vaddr < half and seg not in boot)
    if own:
        view.notes.append(f"{view.elf.path.name} is not linked in the higher half: its image {own[0][0]:#x}-"
                          f"{own[-1][1]:#x} lies in the user half, below the kernel half at {half:#x}; those pages "
                          "are the kernel's own, judged by the segment check")
    problems = []
    for m in whole_mappings(walker):
        if m.vstart >= half:
            break
        end = min(m.vstart + m.size, half)
        # The kernel's own link addresses are its business, unless ring 3 may use them.
        pieces = [(m.vstart, end)] if m.attrs & hw.PTE_US else _without(m.vstart, end, own)
        before = len(problems)
        for lo, hi in pieces:
            plo = m.pstart + lo - m.vstart
            phi = plo + hi - lo
            overlap = [(max(a, plo), min(b, phi)) for a, b in image if a < phi and plo < b]
            if overlap:
                a, b = overlap[0]
                t = walker.translate(lo + a - plo)
                where = dict(vrange=(lo, hi), frames=_frames(a, b), chain=t.chain)
                if m.attrs & hw.PTE_US:
                    problems.append(Finding(f"{lo:#010x}-{hi:#010x} is a user page ({m.attrs}) on the kernel "
                                            f"image's frames {a:#x}-{b:#x}: ring 3 sees the kernel, first such page "
                                            f"via {t.path}", **where))
                else:
                    kind = "identity-mapped" if lo == plo else f"mapped to {plo:#x}"
                    problems.append(Finding(f"{lo:#010x}-{hi:#010x} is {kind} ({m.attrs}) below the kernel base "
                                            f"{half:#x}, first page via {walker.translate(lo).path}", **where))
        if len(problems) == before and not m.attrs & hw.PTE_US and pieces:
            problems.append(_supervisor_in_user_half(walker, m, end, half, own))
    return problems


def _supervisor_in_user_half(walker: Walker, m: Mapping, end: int, half: int, own: list[tuple[int, int]]) -> Finding:
    """A supervisor-only mapping of the user half that maps no frame of the kernel image (but where the kernel is
    linked, for a kernel linked low): information, ring 3 faults on it. A guard page when a user page is its
    neighbour."""
    lo, hi = m.vstart, end
    where = dict(vrange=(lo, hi), frames=_frames(m.pstart, m.pstart + hi - lo), chain=walker.translate(lo).chain,
                 info=True)
    span = f"{lo:#010x}-{hi:#010x}"
    for neighbour, side in ((hi, "below"), (lo - hw.PAGE_SIZE, "above")) if hi - lo <= GUARD_MAX else ():
        t = walker.translate(neighbour) if 0 <= neighbour < half else None
        if t is not None and t.attrs & hw.PTE_US:
            return Finding(f"{span} is a guard page: supervisor-only ({m.attrs}) {side} the user page "
                           f"{neighbour:#x}, on no frame of the kernel image; ring 3 faults on it", **where)
    kind = "identity-mapped" if m.vstart == m.pstart else f"mapped to {m.pstart:#x}"
    inside = [f"{a:#x}-{b:#x}" for a, b in own if lo <= a and b <= hi]
    holds = f", around the kernel's own image at {', '.join(inside)} (linked there)" if inside else ""
    return Finding(f"{span} is {kind}, supervisor-only ({m.attrs}), in the user half (below the kernel half at "
                   f"{half:#x}){holds}; it maps no other frame of the kernel image and ring 3 faults on it",
                   **where)


# The most a guard page spans: a few 4 KiB pages (a larger supervisor range beside user pages is named as a range).
GUARD_MAX = 16 * hw.PAGE_SIZE
# Bits the CPU sets in an entry as it uses the page: two neighbouring pages that differ in these alone are one
# mapping for whoever reads the tables.
CPU_BITS = hw.PTE_A | hw.PTE_D


def whole_mappings(walker: Walker) -> list[Mapping]:
    """`Walker.mappings` merged across Accessed/Dirty differences (attributes shown without them): the ranges the
    kernel made, not the pages the CPU happened to touch."""
    merged: list[Mapping] = []
    for m in walker.mappings():
        attrs = Attrs(m.attrs & ~CPU_BITS)
        last = merged[-1] if merged else None
        if (last and last.vstart + last.size == m.vstart and last.pstart + last.size == m.pstart
                and last.attrs == attrs):
            merged[-1] = Mapping(last.vstart, last.pstart, last.size + m.size, attrs)
        else:
            merged.append(Mapping(m.vstart, m.pstart, m.size, attrs))
    return merged


def _page_up(addr: int) -> int:
    return (addr + hw.PAGE_SIZE - 1) & ~(hw.PAGE_SIZE - 1)


def _without(lo: int, hi: int, holes: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """[lo, hi) less the sorted `holes`, as the pieces left."""
    pieces = []
    for a, b in holes:
        if b <= lo or a >= hi:
            continue
        if a > lo:
            pieces.append((lo, a))
        lo = max(lo, b)
    if lo < hi:
        pieces.append((lo, hi))
    return pieces


# A finding names its frames one by one only up to this many: a 1 GiB mapping is named by its range alone.
MAX_FRAMES = 1024


def _frames(start: int, end: int) -> tuple[int, ...]:
    first = start & ~(hw.PAGE_SIZE - 1)
    count = (end - first + hw.PAGE_SIZE - 1) // hw.PAGE_SIZE
    return tuple(range(first, end, hw.PAGE_SIZE)) if count <= MAX_FRAMES else ()


@_walk_errors_reported
def check_no_user_pages(view: GuestView) -> list[str]:
    """No entry leading to a kernel page carries U/S.

    Kernel pages are those of the kernel half (`GuestView.kernel_half`); for a kernel whose half kgen cannot tell
    (32-bit, linked where it is loaded, no --kernel-base), those that map a frame of its image, wherever they lie:
    a process's pages elsewhere are its own. The CPU grants ring 3 access only if every level does, but a U/S bit in
    a kernel PTE is still a fault one entry change away, so each offending entry is reported, saying whether the
    page is reachable from ring 3. kgen's own kernel keeps U/S off at every level of its half. Another kernel may
    set U/S on its table entries and deny at the leaf (xv6 and Linux do: one PDE then serves user and kernel pages
    alike), so there only the leaf entry counts."""
    walker = view.need_walker()
    half = view.kernel_half
    strict = view.layout is not None
    if half is not None:
        judged = [(max(m.vstart, half), m.vstart + m.size) for m in walker.mappings() if m.vstart + m.size > half]
    else:
        view.notes.append(f"{view.elf.path.name} has no kernel half kgen can tell (linked where it is loaded): only "
                          "pages on its image's frames are judged as kernel pages; give --kernel-base ADDR to judge "
                          "a kernel half")
        image = view.image_frames()
        judged = [(m.vstart + max(a, m.pstart) - m.pstart, m.vstart + min(b, m.pstart + m.size) - m.pstart)
                  for m in walker.mappings() for a, b in image if a < m.pstart + m.size and m.pstart < b]
    offenders: dict[int, list] = {}
    for lo, hi in judged:
        for vaddr, t in mapped_pages(walker, lo, hi):
            for ref in (t.chain if strict else t.chain[-1:]):
                if ref.value & hw.PTE_US:
                    first = offenders.setdefault(ref.addr, [ref, vaddr, t, 0, vaddr + t.size])
                    first[3] += 1
                    first[4] = max(first[4], (vaddr & ~(t.size - 1)) + t.size)
    problems = []
    for ref, vaddr, t, count, end in offenders.values():
        reach = ("user-accessible" if t.attrs & hw.PTE_US else
                 "not yet user-accessible, another level still denies it")
        pages = f"page {view.page(vaddr)}" + (f" and {count - 1} more" if count > 1 else "")
        problems.append(Finding(f"{ref} = {ref.value:#010x} has U/S set for kernel {pages} ({reach}; path {t.path})",
                                vrange=(vaddr, end), frames=(t.paddr & ~(hw.PAGE_SIZE - 1),), chain=t.chain))
    return problems


@_walk_errors_reported
def check_tempmap_empty(view: GuestView) -> list[str]:
    """While the kernel is idle no temp-map slot holds a frame: every slot's PTE is zero."""
    walker = view.need_walker()
    layout = view.need_layout()
    mode = view.mode
    table, level = walker.top, 0
    while level < mode.levels - 1:          # down to the page table that holds the slots' entries
        index = (layout.tempmap_base >> mode.shift(level)) & ((1 << mode.index_bits[level]) - 1)
        entry = view.entry(table, index)
        if not entry & hw.PTE_P or entry & hw.PTE_PS:
            window = layout.tempmap_window
            return [Finding(f"{view.entry_text(table, index, level)}: the {window} has no page table",
                            vrange=(window.start, window.end))]
        table, level = entry & mode.frame_mask, level + 1
    size = mode.entry_size
    first = layout.tempmap_base >> hw.PAGE_SHIFT & ((1 << mode.index_bits[-1]) - 1)
    problems = []
    for slot in range(layout.tempmap_slots):
        vaddr = layout.tempmap_slot_address(slot)
        pte = view.entry(table, first + slot)
        if pte:
            state = (f"maps frame {pte & mode.frame_mask:#x}" if pte & hw.PTE_P else "is not present but not zero")
            problems.append(Finding(
                f"temp-map slot {slot} at {vaddr:#x}: PT[{first + slot}] @ {table + size * (first + slot):#x} = "
                f"{pte:#0{2 * size + 2}x} {state} while the kernel is idle (a temp_map without temp_unmap?)",
                vrange=(vaddr, vaddr + hw.PAGE_SIZE), frames=(pte & mode.frame_mask,) if pte & hw.PTE_P else (),
                chain=(EntryRef(mode.level_names[-1], first + slot, table + size * (first + slot), pte),)))
    return problems


def _tables(walker: Walker) -> list[tuple[str, int]]:
    """(how it is reached, physical address) of the top-level table and every table below it."""
    names = walker.mode.level_names
    found = [(f"CR3 -> {names[0]}", walker.top)]
    for path, frame in walker.page_tables():
        vaddr = sum(index << walker.mode.shift(level) for level, index in enumerate(path))
        steps = " -> ".join(f"{names[level]}[{index}]" for level, index in enumerate(path))
        found.append((f"{steps} (for {walker.mode.sign_extend(vaddr):#010x})", frame))
    return found


@_walk_errors_reported
def check_tables_referenced_once(view: GuestView) -> list[str]:
    """Every present page table is reached from the PD through exactly one entry (the recursive slot aside)."""
    walker = view.need_walker()
    holders: dict[int, list[str]] = defaultdict(list)
    for how, frame in _tables(walker):
        holders[frame].append(how)
    return [Finding(f"page table at {frame:#x} is reached {len(hows)} times: {', '.join(hows)}; a change made for "
                    f"one range silently changes the other", frames=(frame,))
            for frame, hows in holders.items() if len(hows) > 1]


@_walk_errors_reported
def check_tables_unpoisoned(view: GuestView) -> list[str]:
    """No entry of any present page table still holds the poison RAM was filled with: every table was cleared."""
    walker = view.need_walker()
    if view.poison is None:
        raise NotApplicable("the machine was not booted with poisoned RAM")
    size = walker.mode.entry_size
    count = hw.PAGE_SIZE // size
    problems = []
    for how, frame in _tables(walker):
        data = view.read_phys(frame, hw.PAGE_SIZE)
        hits = [i for i in range(count) if data[i * size:(i + 1) * size] == _poison_at(view.poison, frame + i * size,
                                                                                    size)]
        if hits:
            value = int.from_bytes(data[hits[0] * size:(hits[0] + 1) * size], "little")
            problems.append(Finding(f"table at {frame:#x} ({how}): {len(hits)} of {count} entries hold the poison "
                                    f"{value:#0{2 * size + 2}x}, first index {hits[0]}: the table was never cleared",
                                    frames=(frame,)))
    return problems


def _poison_at(pattern: bytes, addr: int, size: int) -> bytes:
    return bytes(pattern[(addr + k) % len(pattern)] for k in range(size))


# What a running machine and an ELF show, for any Multiboot kernel; then what needs kgen's layout.
GENERIC_CHECKS = (check_paging_enabled, check_entries_well_formed, check_recursive_slot, check_segments, check_nothing_below_kernel_base,
                  check_no_user_pages, check_tables_referenced_once, check_tables_unpoisoned)
KGEN_CHECKS = (check_cr3, check_tempmap_empty)


# ---- every address space, not only the one in CR3 (templates/aspace.s) -----------------------------------------
# The kernel keeps its live spaces in `as_spaces`: a (top-level table, kernel-half generation) pair of words per
# record, record 0 the boot space; `vmm_kernel_pde_generation` counts kernel-half PDE changes on i386.
SPACES_SYMBOL = "as_spaces"
GENERATION_SYMBOL = "vmm_kernel_pde_generation"
ATTACHED_SYMBOL = "as_attached"


def _kernel_word(view: GuestView, name: str, index: int = 0, size: int | None = None) -> int:
    layout = view.need_layout()
    size = size or layout.arch.word_size
    phys = view.elf.symbols[name].value - layout.kernel_virtual_base + index * size
    return int.from_bytes(view.read_phys(phys, size), "little")


def live_spaces(view: GuestView) -> list[tuple[int, int]]:
    """(top-level table, generation) of every live address space the kernel records, the boot space first."""
    layout = view.need_layout()
    if SPACES_SYMBOL not in view.elf.symbols:
        raise NotApplicable(f"{view.elf.path.name} keeps no address-space table ({SPACES_SYMBOL})")
    records = [(_kernel_word(view, SPACES_SYMBOL, 2 * i), _kernel_word(view, SPACES_SYMBOL, 2 * i + 1))
               for i in range(layout.as_max_spaces)]
    return [r for r in records if r[0]]


def space_walker(view: GuestView, top: int) -> Walker:
    """A walk of the space whose top-level table is at physical `top`, in the CPU's paging mode."""
    view.need_walker()
    return view.walker_of(top)


def _top_entries(view: GuestView, top: int) -> list[int]:
    size = view.mode.entry_size
    data = view.read_phys(top, hw.PAGE_SIZE)
    return [int.from_bytes(data[i:i + size], "little") for i in range(0, hw.PAGE_SIZE, size)]


def _top_slot(view: GuestView, vaddr: int) -> int:
    return (vaddr & ((1 << view.mode.va_bits) - 1)) >> view.mode.shift(0)


def check_space(view: GuestView, top: int, *, idle: bool = True) -> list[str]:
    """One address space, given by its top-level table: recursive slot to itself and supervisor-only, foreign slot
    empty (while idle), no kernel page user-accessible, user pages only in the user half, and (when its copy is
    current) the kernel half the same entries as the running space's.

    The recursive and foreign windows are skipped when pages are listed: they show page tables, not kernel pages."""
    layout = view.need_layout()
    mode = view.mode
    names = mode.level_names
    problems = []
    where = f"space {top:#x}"
    entries = _top_entries(view, top)
    first = _top_slot(view, layout.kernel_half_start)
    running = view.regs.cr3 & mode.cr3_mask
    fresh = True
    if top != running and GENERATION_SYMBOL in view.elf.symbols and layout.arch.kernel_half_generation:
        generation = _kernel_word(view, GENERATION_SYMBOL, size=4)
        fresh = dict(live_spaces(view)).get(top, generation) == generation
    # A stale kernel half (i386: a kernel table made or freed since the copy; as_switch re-copies it before the space
    # runs) may point at a frame used for something else by now: such a space is walked through its user half only.
    w = space_walker(view, top) if fresh else _user_half_walker(view, top, first)
    shift = mode.shift(0)

    def found(text: str, *, slot: int | None = None, **place) -> Finding:
        # A finding of this space (named unless it is the running one), placed on a top-level slot's span or `place`.
        if slot is not None:
            start = mode.sign_extend(slot << shift)
            place = dict(vrange=(start, start + (1 << shift)), chain=(_top_ref(view, top, slot),), **place)
        return Finding(f"{where}: {text}", space=where if top != running else None, **place)

    recursive = entries[layout.recursive_slot]
    if not recursive & hw.PTE_P or recursive & mode.frame_mask != top:
        problems.append(found(f"{names[0]}[{layout.recursive_slot}] = {recursive:#x} is not its recursive slot",
                              slot=layout.recursive_slot))
    elif recursive & hw.PTE_US:
        problems.append(found(f"{names[0]}[{layout.recursive_slot}] = {recursive:#x}: the recursive window is "
                              f"user-accessible; ring 3 could rewrite every page table", slot=layout.recursive_slot))
    foreign = entries[layout.foreign_slot]
    if foreign and idle:
        problems.append(found(f"{names[0]}[{layout.foreign_slot}] = {foreign:#x}: the foreign slot holds a space "
                              f"while the kernel is idle (as_attach without as_detach?)", slot=layout.foreign_slot))
    elif foreign & hw.PTE_US:
        problems.append(found(f"{names[0]}[{layout.foreign_slot}] = {foreign:#x}: the foreign window is "
                              f"user-accessible", slot=layout.foreign_slot))
    windows = {layout.recursive_slot, layout.foreign_slot}
    problems += [found(f"kernel-half {names[0]}[{i}] = {entries[i]:#x} has U/S: one entry below it away from "
                       f"a user-accessible kernel page", slot=i) for i in range(first, len(entries))
                 if i not in windows and entries[i] & hw.PTE_P and entries[i] & hw.PTE_US]
    for m in w.mappings():
        if _top_slot(view, m.vstart) in windows:
            continue
        if m.vstart >= layout.user_half_end and m.attrs & hw.PTE_US:
            t = w.translate(m.vstart)
            problems.append(found(f"kernel page {view.page(m.vstart)} is user-accessible ({m.attrs}) via {t.path}",
                                  vrange=(m.vstart, m.vstart + m.size), frames=(m.pstart,), chain=t.chain))
        elif m.vstart < layout.user_half_end < m.vstart + m.size:      # one ending there is the last user page
            problems.append(found(f"a mapping at {m.vstart:#x} reaches over the user half's end",
                                  vrange=(m.vstart, m.vstart + m.size)))
    if top != running and fresh:
        mine = entries
        theirs = _top_entries(view, running)
        differ = [i for i in range(first, len(mine))         # A and D: set by the CPU in whichever copy it walked
                  if i not in windows and mine[i] & ~CPU_BITS != theirs[i] & ~CPU_BITS]
        problems += [found(f"kernel-half {names[0]}[{i}] = {mine[i]:#x}, the running space's {theirs[i]:#x}: the "
                           f"kernel half is not shared", slot=i) for i in differ]
    else:
        differ = []
    if top != running:      # the running space's are check_entries_well_formed's
        # Last, and not below a kernel-half entry already found unshared: what such an entry leads to is whatever
        # the frame holds now, and its garbage would bury the one finding that says why.
        problems += [Finding(f"{where}: {bad}", vrange=bad.vrange, chain=bad.chain, space=where)
                     for bad in w.malformed() if _top_slot(view, bad.vstart) not in differ]
    return problems


def _user_half_walker(view: GuestView, top: int, first_kernel_slot: int) -> Walker:
    """A walk of a space that sees its top-level table's kernel-half entries as empty."""
    size = view.mode.entry_size
    hidden = (top + first_kernel_slot * size, top + hw.PAGE_SIZE)

    def read_phys(addr: int, length: int) -> bytes:
        data = bytearray(view.read_phys(addr, length))
        start, end = max(addr, hidden[0]), min(addr + length, hidden[1])
        if start < end:
            data[start - addr:end - addr] = bytes(end - start)
        return bytes(data)
    view.need_walker()
    return view.walker_of(top, read_phys)


def _space_frames(view: GuestView, top: int) -> dict[int, str]:
    """Frame -> what it is for, of everything a space's user half holds: tables of every level and pages."""
    layout = view.need_layout()
    w = space_walker(view, top)
    first = _top_slot(view, layout.kernel_half_start)
    frames = {top: f"the top-level table of space {top:#x}"}
    for path, frame in w.page_tables():
        if path[0] < first:
            frames[frame] = f"a table of space {top:#x} ({' -> '.join(map(str, path))})"
    for m in w.mappings():
        if m.vstart < layout.user_half_end:
            for off in range(0, m.size, hw.PAGE_SIZE):
                frames[m.pstart + off] = f"the page at {m.vstart + off:#x} of space {top:#x}"
    return frames


@_walk_errors_reported
def check_address_spaces(view: GuestView, idle: bool = True) -> list[str]:
    """Every live address space: its own checks (check_space), and no frame of one space's user half (table or
    page) held by another space as well."""
    problems = []
    owner: dict[int, str] = {}
    for top, _ in live_spaces(view):
        problems += check_space(view, top, idle=idle)
        for frame, what in _space_frames(view, top).items():
            if frame in owner and owner[frame] != what:
                problems.append(Finding(f"frame {frame:#x} is {what} and also {owner[frame]}", frames=(frame,)))
            owner.setdefault(frame, what)
    return problems


@_walk_errors_reported
def check_frames_unreferenced(view: GuestView, frames: set[int]) -> list[str]:
    """None of `frames` (those of a destroyed space) is still a table or a page of any live space."""
    problems = []
    for top, _ in live_spaces(view):
        w = space_walker(view, top)
        held = {top} | {frame for _, frame in w.page_tables()} | {
            m.pstart + off for m in w.mappings() for off in range(0, m.size, hw.PAGE_SIZE)}
        problems += [Finding(f"frame {frame:#x} of a destroyed space is still referenced by space {top:#x}",
                             frames=(frame,)) for frame in sorted(frames & held)]
    return problems


def space_frames(view: GuestView, top: int) -> set[int]:
    """Every frame a space's user half holds, its top-level table included (what as_destroy must give back)."""
    return set(_space_frames(view, top))
