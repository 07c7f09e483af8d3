"""The document `kgen inspect` prints: a stopped kernel's virtual address space, physical memory, invariants and
(with --va) one translation, as one dict of plain values (docs/inspect.md is its schema).

Nothing here decides an address. Regions come from the layout (`kgen/build/layout.py`) for a kgen kernel and from
the ELF (segments, page-sized symbols) for any kernel; mappings from the `Walker`; the free stack from `PmmView`;
findings from the checks of `kgen/guest/invariants.py`, attached to the virtual ranges and frames they carry
(`kgen.guest.findings.Finding`: never by the numbers in their text).
Addresses are lower-case hex strings (JavaScript loses precision above 2**53); `end` is exclusive.
"""
from __future__ import annotations

from dataclasses import dataclass

from kgen import protocol
from kgen.arch import Arch, hw
from kgen.guest import invariants
from kgen.guest.findings import failures
from kgen.guest.invariants import GuestView, NotApplicable
from kgen.guest import dwarfspaces
from kgen.guest.addrspaces import SpaceArray, space_name
from kgen.guest.pmmview import ChainError, PmmView
from kgen.guest.pagewalk import PTE_NX, PTE_P, PTE_RW, PTE_US, PTE_G, Walker, WalkError
from kgen.inspect.explain import explain_translation
from kgen.machine.ram import RamWindow, clip_legacy_hole

SCHEMA_VERSION = 1
PAGE = hw.PAGE_SIZE
MIB = 1 << 20
# Physical roles that are information, not a failure (a frame mapped twice may be meant: a buffer shared on
# purpose): reports show them in the information colour, never as a failed invariant.
INFO_ROLES = frozenset({"mapped twice"})


def hexa(value: int) -> str:
    return f"{value:#x}"


@dataclass(frozen=True)
class Region:
    name: str
    start: int
    end: int
    source: str         # "layout", "elf" or "symbol"
    description: str

    def as_dict(self) -> dict:
        return {"name": self.name, "start": hexa(self.start), "end": hexa(self.end), "source": self.source,
                "description": self.description}


# ---- regions ---------------------------------------------------------------------------------------------------

def kernel_word(view: GuestView, name: str, index: int = 0) -> int | None:
    """A word variable of a kgen kernel, read at its physical address (the image's fixed offset); None if absent."""
    if view.layout is None or name not in view.elf.symbols:
        return None
    return PmmView(view.read_phys, view.elf, view.layout).word(name, index)


def layout_regions(view: GuestView) -> list[Region]:
    """The kgen layout's regions, and those the running kernel placed inside them (heap slabs, large blocks)."""
    layout = view.layout
    regions = [Region("user half", 0, layout.user_half_end, "layout",
                      "one address space's own pages (user programs, user stacks); shared by no other space"),
               Region("user lazy range", layout.user_lazy_window.start, layout.user_lazy_window.end, "layout",
                      "a task's data and stack top, backed on first touch")]
    described = {
        "kernel image window": "the kernel's code, data, boot page tables and stack (kernel.max_size)",
        "boot identity window": "the image identity-mapped while paging is switched on; unmapped after boot",
        "recursive window": f"{view.mode.level_names[0]}[{layout.recursive_slot}] points at its own table: every "
                            "page table of this space appears here as a page",
        "temp-map window": "slots the kernel maps a frame into for a moment (temp_map/temp_unmap); empty when idle",
        "vmm range window": "vmm_alloc's kernel ranges, the heap's slab window among them",
        "foreign window": f"{view.mode.level_names[0]}[{layout.foreign_slot}] points at an attached space's top "
                          "table while one is attached (as_attach): its page tables appear here",
        "pmm bitmap window": "the bitmap allocator's bitmap, a bit per frame of RAM (pmm.kind = \"bitmap\"); pages "
                             "mapped for the RAM present",
    }
    regions += [Region(r.name, r.start, r.end, "layout", described.get(r.name, "")) for r in layout.regions()]
    slabs = kernel_word(view, "heap_slab_base")
    if slabs:
        regions.append(Region("heap slab window", slabs, slabs + layout.heap_slab_pages * PAGE, "layout",
                              "slab pages of kmalloc's size classes (heap_slab_base, heap.slab_pages)"))
    if "heap_large" in view.elf.symbols:
        for slot in range(layout.heap_large_slots):
            start, pages = kernel_word(view, "heap_large", 2 * slot), kernel_word(view, "heap_large", 2 * slot + 1)
            if start and pages:
                regions.append(Region("heap large block", start, start + pages * PAGE, "layout",
                                      f"a kmalloc block of {pages} whole pages (heap_large[{slot}])"))
    return regions


def elf_regions(view: GuestView) -> list[Region]:
    """PT_LOAD segments, named by the sections of the symbols they hold, and the symbols a page or more long (a
    sized object, or a page-aligned label up to the next symbol): the stacks and tables a kernel keeps in .bss."""
    elf = view.elf
    regions = []
    for number, seg in enumerate(elf.segments):
        if not seg.memsz:
            continue
        sections = []
        for sym in elf.by_address:
            if seg.vaddr <= sym.value < seg.vaddr + seg.memsz and sym.section and sym.section not in sections:
                sections.append(sym.section)
        rights = "".join(c if on else "-" for c, on in (("r", seg.readable), ("w", seg.writable),
                                                       ("x", seg.executable)))
        name = " ".join(sections) if sections else f"segment {number}"
        regions.append(Region(f"{name} ({rights})", seg.vaddr, seg.vaddr + seg.memsz, "elf",
                              f"PT_LOAD {number}: {rights}, loaded at physical {seg.paddr:#x}"))
    symbols = [s for s in elf.by_address if s.section is not None]
    for i, sym in enumerate(symbols):
        if sym.size:
            end = sym.value + sym.size
        elif sym.value % PAGE == 0 and not sym.name.startswith("__"):     # not a linker script's section mark
            # Up to the next symbol, but not past its own segment: the label that ends a boot segment at 1 MiB is
            # not a region reaching up to the higher half.
            segment_end = next((seg.vaddr + seg.memsz for seg in elf.segments
                                if seg.vaddr <= sym.value < seg.vaddr + seg.memsz), sym.value)
            end = min(segment_end, next((s.value for s in symbols[i + 1:] if s.value > sym.value), sym.value))
        else:
            continue
        if end - sym.value >= PAGE:
            regions.append(Region(sym.name, sym.value, end, "symbol", f"{sym.kind} in {sym.section}"))
    return regions


def all_regions(view: GuestView) -> list[Region]:
    regions = layout_regions(view) if view.layout is not None else []
    return regions + elf_regions(view)


# A run of supervisor pages at one virtual-to-physical offset is a direct map of RAM when it maps at least this much
# of the guest's RAM (or half of it, in a small guest): more than a kernel image, which its ELF names anyway.
DIRECT_MAP_MIN = 16 * MIB


def _mib(size: int) -> str:
    return f"{size // MIB} MiB" if size % MIB == 0 else f"{size / MIB:.1f} MiB"


def mapped_regions(view: GuestView, walker: Walker, ram: list[tuple[int, int]],
                   named: list[Region]) -> list[Region]:
    """What kgen recognises in the page tables where the layout names no range: a direct map of RAM (supervisor
    pages at one offset covering much of the guest's RAM, whatever their page sizes and caching; the ELF's segments
    inside it keep their names, the smaller regions) and an MMIO window (supervisor pages of which none is RAM in
    QEMU's memory map: a device's registers). The recursive windows are named where they are drawn
    (`virtual_ranges`)."""
    runs: list[list[int]] = []          # [vstart, vend, pstart] at one offset, supervisor pages only
    for m in walker.mappings():
        if m.attrs & PTE_US:
            continue
        last = runs[-1] if runs else None
        if last and last[1] == m.vstart and last[2] + (last[1] - last[0]) == m.pstart:
            last[1] = m.vstart + m.size
        else:
            runs.append([m.vstart, m.vstart + m.size, m.pstart])
    total = sum(hi - lo for lo, hi in ram)
    found = []
    for vlo, vhi, plo in runs:
        if any(r.source == "layout" and r.start < vhi and vlo < r.end for r in named):
            continue
        phi = plo + vhi - vlo
        in_ram = sum(max(0, min(hi, phi) - max(lo, plo)) for lo, hi in ram)
        where = f"physical {plo:#x}-{phi:#x}"
        if not in_ram:
            found.append(Region("MMIO window", vlo, vhi, "mapping",
                                f"maps {where}, none of it RAM in QEMU's memory map: a device's registers"))
        elif in_ram >= min(DIRECT_MAP_MIN, total // 2):
            how = "identity-mapped" if vlo == plo else f"at offset {vlo - plo:#x}"
            share = "all" if in_ram == total else f"{_mib(in_ram)} of the {_mib(total)}"
            found.append(Region("direct map of RAM", vlo, vhi, "mapping",
                                f"maps {where} {how}: {share} of the guest's RAM"
                                + (" and the holes between" if in_ram < phi - plo else "")))
    return found


def region_of(regions: list[Region], vaddr: int) -> Region | None:
    """The most specific region holding `vaddr`: the smallest."""
    holding = [r for r in regions if r.start <= vaddr < r.end]
    return min(holding, key=lambda r: (r.end - r.start, r.source != "symbol")) if holding else None


# ---- the virtual address space ---------------------------------------------------------------------------------

# What makes two neighbouring pages one range: the CPU sets Accessed and Dirty page by page, so those do not count.
MERGE_BITS = PTE_P | PTE_RW | PTE_US | hw.PTE_PWT | hw.PTE_PCD | hw.PTE_PS | PTE_G | PTE_NX
# What a recognised range (a direct map) keeps the same along one row: the rights.
RIGHTS_BITS = PTE_P | PTE_RW | PTE_US | PTE_NX


def flags_text(attrs: int, mode_has_nx: bool) -> str:
    return "r" + ("w" if attrs & PTE_RW else "-") + ("-" if mode_has_nx and attrs & PTE_NX else "x")


def virtual_ranges(view: GuestView, walker: Walker, regions: list[Region], problems: list[str]) -> list[dict]:
    """Mapped ranges merged while the attributes and the region stay the same, never across the start of the kernel
    half (a process's pages below it and the kernel's above are two rows even with the same rights); a large page
    one range, named by the regions it holds; the recursive windows as one range each (their pages are the page
    tables)."""
    has_nx = bool(walker.mode.nx_levels) and walker.nxe
    half = view.kernel_half
    cuts = sorted({r.start for r in regions} | {r.end for r in regions} | ({half} if half is not None else set()))
    pieces = []
    for m in walker.mappings():
        page_size = walker.translate(m.vstart).size
        start, end = m.vstart, m.vstart + m.size
        inner = [c for c in cuts if start < c < end and c % page_size == 0]
        for lo, hi in zip([start] + inner, inner + [end]):
            region = region_of(regions, lo) if page_size == PAGE else large_page_region(regions, lo, hi)
            pieces.append((lo, hi, m.pstart + lo - start, m.attrs, page_size, region))
    runs: list[list] = []
    for lo, hi, phys, attrs, size, region in pieces:
        last = runs[-1] if runs else None
        # A range kgen recognised from the tables (a direct map) is one row as long as its rights hold: its page
        # sizes and caching may change along the way (a framebuffer written through in Limine's direct map).
        whole = region is not None and region.source == "mapping"
        bits = RIGHTS_BITS if whole else MERGE_BITS
        if last and last[1] == lo and last[3] & bits == attrs & bits and (whole or last[4] == size) \
                and last[5] == region and lo != half:
            last[6] &= last[2] + (last[1] - last[0]) == phys
            last[1] = hi
            last[4] = min(last[4], size)        # a row of mixed page sizes counts in its smallest
        else:
            runs.append([lo, hi, phys, attrs, size, region, True])
    ranges = [{
        "start": hexa(lo), "end": hexa(hi), "pages": (hi - lo) // size, "page_size": size, "phys": hexa(phys),
        "phys_contiguous": contiguous, "writable": bool(attrs & PTE_RW), "user": bool(attrs & PTE_US),
        "nx": bool(has_nx and attrs & PTE_NX), "global": bool(attrs & PTE_G), "flags": flags_text(attrs, has_nx),
        "region": region.name if region else None, "problems": [], "info": [],
    } for lo, hi, phys, attrs, size, region, contiguous in runs]
    top_entries = sum(1 for _ in _present_top_entries(view, walker))
    for w in walker.recursive_windows():
        region = region_of(regions, w.vstart)
        ranges.append({
            "start": hexa(w.vstart), "end": hexa(w.vstart + w.size), "pages": top_entries, "page_size": PAGE,
            "phys": hexa(walker.top), "phys_contiguous": False, "writable": bool(w.attrs & PTE_RW),
            "user": bool(w.attrs & PTE_US), "nx": bool(has_nx and w.attrs & PTE_NX), "global": False,
            "flags": flags_text(w.attrs, has_nx),
            "region": region.name if region and region.start == w.vstart else
            f"recursive window ({walker.mode.level_names[0]}[{w.slot}])", "problems": [], "info": [],
        })
    ranges.sort(key=lambda r: int(r["start"], 16))
    attach_problems(ranges, problems, view.space)
    return ranges


def large_page_region(regions: list[Region], lo: int, hi: int) -> Region | None:
    """What a large page [lo, hi) holds: the smallest region holding all of it, else the outermost regions inside
    it, named together (a 4 MiB page holding the kernel's segments: ".text (r-x) + .data .bss (rw-)")."""
    holding = [r for r in regions if r.start <= lo and hi <= r.end]
    if holding:
        return min(holding, key=lambda r: (r.end - r.start, r.source != "symbol"))
    inside = [r for r in regions if lo < r.end and r.start < hi]
    # Segments and the layout's regions name it; symbols only where neither lies there.
    inside = [r for r in inside if r.source != "symbol"] or inside
    outer = sorted((r for r in inside if not any(o is not r and o.start <= r.start and r.end <= o.end
                                                  and (o.start, o.end) != (r.start, r.end) for o in inside)),
                   key=lambda r: (r.start, -r.end))
    outer = list({(r.start, r.end): r for r in outer}.values())       # one name per stretch
    if not outer:
        return None
    if len(outer) == 1:
        return outer[0]
    return Region(" + ".join(r.name for r in outer), lo, hi, outer[0].source,
                  "; ".join(f"{r.name}: {r.description}" for r in outer))


def _present_top_entries(view: GuestView, walker: Walker):
    size = walker.mode.entry_size
    data = view.read_phys(walker.top, PAGE)
    for i in range(0, PAGE, size):
        if int.from_bytes(data[i:i + size], "little") & PTE_P:
            yield i // size


def attach_problems(ranges: list[dict], findings: list[str], space: str | None = None) -> None:
    """Each finding on the virtual ranges its `vrange` overlaps: a failure under "problems", information under
    "info". A finding of another address space than the one drawn (`space`), and a plain string, go nowhere: they
    are listed with their check."""
    bounds = [(int(r["start"], 16), int(r["end"], 16), r) for r in ranges]
    for finding in findings:
        vrange = getattr(finding, "vrange", None)
        if vrange is None or getattr(finding, "space", None) not in (None, space):
            continue
        key = "info" if finding.info else "problems"
        for lo, hi, r in bounds:
            if lo < vrange[1] and vrange[0] < hi and finding not in r[key]:
                r[key].append(str(finding))


def attach_to_frames(runs: list[dict], findings: list[str]) -> None:
    """Each finding on the physical runs holding its `frames` (physical memory is one for every space)."""
    bounds = [(int(r["start"], 16), int(r["end"], 16), r) for r in runs]
    for finding in findings:
        key = "info" if getattr(finding, "info", False) else "problems"
        for frame in getattr(finding, "frames", ()):
            for lo, hi, r in bounds:
                if lo <= frame < hi and finding not in r[key]:
                    r[key].append(str(finding))


# ---- invariants ------------------------------------------------------------------------------------------------

def run_invariants(view: GuestView) -> tuple[list[dict], list[str]]:
    """The suite's checks (kgen/guest/invariants.py) on this snapshot: the generic ones, and kgen's own with a
    layout. A check that needs what this kernel lacks is skipped with its reason; one whose findings are all
    information holds. Returns the results and every finding, to attach to ranges and frames."""
    checks = list(invariants.GENERIC_CHECKS)
    if view.layout is not None:
        checks += list(invariants.KGEN_CHECKS) + [invariants.check_address_spaces]
    results, found = [], []
    for check in checks:
        try:
            messages = check(view)
        except NotApplicable as why:
            results.append({"name": check.__name__, "outcome": "skipped", "messages": [str(why)], "findings": []})
            continue
        found += messages
        results.append({"name": check.__name__, "outcome": "failed" if failures(messages) else "passed",
                        "messages": [str(m) for m in messages], "findings": [finding_record(m) for m in messages]})
    return results, found


def finding_record(finding: str) -> dict:
    """A finding as the document holds it: its text and where it applies (docs/inspect.md)."""
    vrange = getattr(finding, "vrange", None)
    return {"text": str(finding), "info": bool(getattr(finding, "info", False)),
            "vrange": [hexa(vrange[0]), hexa(vrange[1])] if vrange is not None else None,
            "frames": [hexa(f) for f in getattr(finding, "frames", ())],
            "chain": [{"table": e.table, "index": e.index, "addr": hexa(e.addr), "value": hexa(e.value)}
                      for e in getattr(finding, "chain", ())],
            "space": getattr(finding, "space", None)}


# ---- physical memory -------------------------------------------------------------------------------------------

class FrameMap:
    """A role (and an optional detail) per 4 KiB frame below `end`; a role is only set over one of lower
    priority (a page table stays a page table when it is also mapped somewhere)."""

    PRIORITY = ("page table", "boot tables", "temp-mapped", "pmm bitmap", "free (on the stack)", "free (in the bitmap)",
                "kernel image", "heap",
                "user page", "mapped twice", "mapped", "reserved", "never allocated", "allocated, unmapped",
                "unreferenced", "not RAM")

    def __init__(self, end: int, default: str):
        self.frames = end // PAGE
        self.not_ram_detail = "outside the PMM's RAM ranges: below 1 MiB, a hole, or beyond the memory map"
        self.role: list[str] = [default] * self.frames
        self.detail: dict[int, str] = {}

    @classmethod
    def rank(cls, role: str) -> int:
        for i, prefix in enumerate(cls.PRIORITY):
            if role.startswith(prefix):
                return i
        raise ValueError(role)

    def set(self, frame: int, role: str, detail: str | None = None) -> None:
        n = frame // PAGE
        if 0 <= n < self.frames and self.rank(role) <= self.rank(self.role[n]):
            if self.rank(role) < self.rank(self.role[n]) or n not in self.detail:
                self.role[n] = role
                if detail is None:
                    self.detail.pop(n, None)
                else:
                    self.detail[n] = detail

    def set_range(self, start: int, end: int, role: str, detail: str | None = None) -> None:
        for frame in range(start - start % PAGE, end, PAGE):
            self.set(frame, role, detail)

    def runs(self) -> list[dict]:
        out: list[dict] = []
        for n in range(self.frames):
            role, detail = self.role[n], self.detail.get(n)
            if out and out[-1]["role"] == role and out[-1]["detail"] == detail:
                out[-1]["frames"] += 1
                continue
            out.append({"start": n * PAGE, "frames": 1, "role": role, "detail": detail})
        for run in out:
            if run["role"] == "not RAM" and run["detail"] is None:
                run["detail"] = self.not_ram_detail
            run["end"] = hexa(run["start"] + run["frames"] * PAGE)
            run["start"] = hexa(run["start"])
        return [{"start": r["start"], "end": r["end"], "frames": r["frames"], "role": r["role"],
                 "detail": r["detail"], "problems": [], "info": []} for r in out]


def table_role(walker: Walker, depth: int) -> str:
    return f"page table ({walker.mode.level_names[depth]})"


def guest_ram(machine, ram_bytes: int) -> list[tuple[int, int]]:
    """Where the guest's RAM is, [start, end) each: QEMU's own answer (`Machine.ram_windows`, from `info mtree`:
    the legacy hole 0xA0000-0xFFFFF left out, and with 3.5 GiB or more the part above 3 GiB moved to 4 GiB);
    without a RAM file, [0, ram_bytes) less the legacy hole."""
    windows = [(w.start, w.end) for w in getattr(machine, "ram_windows", None) or ()]
    if windows:
        return sorted(windows)
    return [(w.start, w.end) for w in clip_legacy_hole(RamWindow(0, ram_bytes, 0))]


def physical_runs(view: GuestView, walker: Walker | None, regions: list[Region], ram_bytes: int,
                  problems: list[str], ram: list[tuple[int, int]] | None = None) -> list[dict]:
    """Each frame's role, merged into runs. `ram` is the guest's RAM (`guest_ram`): a foreign kernel's frames
    outside it are not RAM (a kgen kernel's PMM says where its RAM is)."""
    layout = view.layout
    pmm = state = None
    if layout is not None and "pmm_total" in view.elf.symbols:
        pmm = PmmView(view.read_phys, view.elf, layout)
        state = pmm.state()
    if ram is None:
        ram = [(0, ram_bytes)]
    end = max([ram_bytes] + [hi for _, hi in state.ranges]) if state else max(hi for _, hi in ram)
    frames = FrameMap(end, "not RAM")
    if state:
        for lo, hi in state.ranges:
            frames.set_range(lo, hi, "allocated, unmapped", "taken from the PMM, mapped nowhere in this space")
        for lo, hi in state.reserved:
            frames.set_range(lo, hi, "reserved", "a reserved interval of the PMM (image, Multiboot information)")
        for frame in _untouched_frames(pmm, state) if pmm.kind == "stack" else ():
            frames.set(frame, "never allocated")
        try:
            for frame in pmm.free_frames(state):
                frames.set(frame, "free (on the stack)" if pmm.kind == "stack" else "free (in the bitmap)")
        except ChainError as err:      # the chain itself is a finding
            problems.append(f"the free stack cannot be followed: {err}")
    else:
        frames.not_ram_detail = "not the guest's RAM (QEMU's memory map): the legacy VGA/BIOS hole, a PCI hole"
        for lo, hi in ram:
            frames.set_range(lo, hi, "unreferenced")
    for seg in view.elf.segments:
        if seg.memsz:
            rights = "".join(c if on else "-" for c, on in (("r", seg.readable), ("w", seg.writable),
                                                           ("x", seg.executable)))
            frames.set_range(seg.paddr, seg.paddr + seg.memsz, "kernel image", f"segment {rights}")
    if walker is None:
        return frames.runs()
    boot_tables = [(r.start, r.end) for r in regions if r.source == "symbol"
                   and r.name in ("boot_top_table", "boot_page_tables")]
    image_offset = layout.kernel_virtual_base if layout is not None else None
    if image_offset is not None:
        for lo, hi in boot_tables:
            frames.set_range(lo - image_offset, hi - image_offset, "boot tables",
                             "the boot stub's page-table pool in the image, not in use")

    def table_detail(frame: int, what: str) -> str:
        if image_offset is not None and any(lo <= frame + image_offset < hi for lo, hi in boot_tables):
            return f"{what}; a boot table in the image"
        return what

    # Mapped frames: who maps them, and how often (the recursive windows aside: they show the tables).
    tempmap = layout.tempmap_window if layout is not None else None
    bitmap = layout.pmm_bitmap_window if layout is not None and layout.pmm_kind == "bitmap" else None
    heap = [r for r in regions if r.name.startswith("heap")]
    seen: dict[int, int] = {}
    for m in walker.mappings():
        if layout is not None and layout.foreign_window.start <= m.vstart < layout.foreign_window.end:
            continue
        for off in range(0, m.size, PAGE):
            frame, vaddr = m.pstart + off, m.vstart + off
            if frame >= end:
                break
            seen.setdefault(frame, 0)
            seen[frame] += 1
            if tempmap is not None and tempmap.start <= vaddr < tempmap.end:
                frames.set(frame, "temp-mapped", f"temp-map slot {(vaddr - tempmap.start) // PAGE}")
            elif bitmap is not None and bitmap.start <= vaddr < bitmap.end:
                frames.set(frame, "pmm bitmap", f"page {(vaddr - bitmap.start) // PAGE} of the allocator's bitmap")
            elif any(r.start <= vaddr < r.end for r in heap):
                frames.set(frame, "heap")
            elif m.attrs & PTE_US:
                frames.set(frame, "user page", "in the running space")
            else:
                frames.set(frame, "mapped")
    for frame, count in seen.items():
        if count > 1:
            frames.set(frame, "mapped twice", f"mapped at {count} virtual pages")
    # Page tables, by level: the running space's, and every other live space's user half (kgen kernels).
    frames.set(walker.top, table_role(walker, 0), table_detail(walker.top, "top-level table, in CR3"))
    for path, frame in walker.page_tables():
        frames.set(frame, table_role(walker, len(path)), table_detail(frame, "running space"))
    if layout is not None:
        try:
            spaces = invariants.live_spaces(view)
        except (NotApplicable, WalkError):
            spaces = []
        first_kernel = (layout.kernel_half_start & layout.arch.va_mask) >> walker.mode.shift(0)
        for top, _ in spaces:
            if top == walker.top:
                continue
            other = invariants.space_walker(view, top)
            frames.set(top, table_role(walker, 0), f"top-level table of space {top:#x}")
            for path, frame in other.page_tables():
                if path[0] < first_kernel:
                    frames.set(frame, table_role(walker, len(path)), f"space {top:#x}")
            for m in other.mappings():
                if m.vstart < layout.user_half_end:
                    frames.set_range(m.pstart, m.pstart + m.size, "user page", f"space {top:#x}")
    return frames.runs()


def _untouched_frames(pmm, state) -> list[int]:
    """Frames the bump allocator has not reached yet: from pmm_bump_next in range pmm_bump_range on, reserved
    intervals skipped (templates/pmm.s, pmm_bump)."""
    index, nxt = pmm.u32("pmm_bump_range"), pmm.word("pmm_bump_next")
    found = []
    for i, (lo, hi) in enumerate(state.ranges):
        if i < index:
            continue
        for frame in range(max(lo, nxt) if i == index else lo, hi, PAGE):
            if not state.in_reserved(frame):
                found.append(frame)
    return found


# ---- the document ----------------------------------------------------------------------------------------------

def paging_info(view: GuestView, walker: Walker | None) -> dict:
    mode = view.mode
    slots = []
    if walker is not None:
        for w in walker.recursive_windows():
            own = view.layout is None or w.slot == view.layout.recursive_slot
            slots.append({"slot": w.slot, "base": hexa(w.vstart), "role": "own" if own else None})
    if view.layout is not None:
        slots.append({"slot": view.layout.foreign_slot, "base": hexa(view.layout.foreign_window.start),
                      "role": "foreign"})
    return {"enabled": bool(view.regs.cr0 & hw.CR0_PG), "mode": mode.title, "levels": mode.levels,
            "va_bits": mode.va_bits, "recursive_slots": slots}


def space_info(view: GuestView, spaces: SpaceArray | dwarfspaces.Plan | None = None) -> dict:
    """The address space drawn and judged: the one in CR3, named by the slot or element of `spaces`
    (--address-spaces) or of a kgen kernel's own table of spaces that holds it."""
    top = view.regs.cr3 & view.mode.cr3_mask
    return {"cr3": hexa(view.regs.cr3), "top": hexa(top), "name": view.space or space_name(view, top, spaces)}


def symbol_name(view: GuestView, addr: int) -> str | None:
    sym = view.elf.symbol_at(addr)
    if sym is None:
        return None
    return sym.name + (f"+{addr - sym.value:#x}" if addr != sym.value else "")


def collect(live, *, accel: str = "tcg", va: int | None = None, how: str | None = None,
            spaces: SpaceArray | dwarfspaces.Plan | None = None) -> dict:
    """The document of a booted kernel (`kgen.harness.live.LiveKernel`), stopped now if it still runs; `spaces`
    (--address-spaces) names the space in CR3 by its slot."""
    view = live.view()
    kernel = live.kernel
    layout = view.layout
    regs = view.regs
    ram_bytes = layout.memory_bytes if layout is not None else kernel.memory_mib * MIB
    ram = guest_ram(live.machine, ram_bytes)
    problems_of_walk: list[str] = []
    try:
        walker = view.walker
    except WalkError as err:
        walker = None
        problems_of_walk.append(f"the page tables cannot be walked: {err}")
    regions = all_regions(view)
    if walker is not None:
        try:
            regions += mapped_regions(view, walker, ram, regions)
        except WalkError:
            pass        # said below, where the ranges are drawn
    results, found = run_invariants(view)
    problems = found + problems_of_walk
    checked = len(problems)
    virtual: list[dict] = []
    if walker is not None:
        try:
            virtual = virtual_ranges(view, walker, regions, problems)
        except WalkError as err:
            problems.append(f"the page tables cannot be walked: {err}")
    try:
        physical = physical_runs(view, walker, regions, ram_bytes, problems, ram)
    except WalkError as err:
        problems.append(f"the page tables cannot be walked: {err}")
        physical = physical_runs(view, None, regions, ram_bytes, problems, ram)
    attach_to_frames(physical, problems)
    if problems[checked:] or problems_of_walk:
        # What inspect itself could not follow (the page tables, the free stack) is a finding too.
        own = problems_of_walk + problems[checked:]
        results.append({"name": "kgen inspect", "outcome": "failed", "messages": [str(m) for m in own],
                        "findings": [finding_record(m) for m in own]})
    arch = (layout.arch if layout is not None else Arch.for_elf(view.elf)).name
    return {
        "kgen_inspect": SCHEMA_VERSION,
        "kernel": {"elf": str(kernel.elf_path), "arch": arch, "kind": "kgen" if layout is not None else "foreign",
                   "accel": accel},
        "stopped": {"how": how or stopped_how(kernel, regs), "ip": hexa(regs.eip),
                    "symbol": symbol_name(view, regs.eip)},
        "registers": {"cr0": hexa(regs.cr0), "cr3": hexa(regs.cr3), "cr4": hexa(regs.cr4),
                      "efer": hexa(regs.efer or 0), "cs": hexa(regs.cs), "cpl": regs.cpl if regs.cpl is not None
                      else regs.cs & 3},
        "paging": paging_info(view, walker),
        "space": space_info(view, spaces),
        "regions": [r.as_dict() for r in sorted(regions, key=lambda r: (r.start, -r.end))],
        "virtual": virtual,
        "physical": physical,
        "ram": {"bytes": ram_bytes},
        "invariants": results,
        "translation": explain_translation(view, walker, va, walk_error=problems_of_walk[0] if problems_of_walk
                                           else None) if va is not None else None,
        "bench": None,
    }


def stopped_how(kernel, regs) -> str:
    """The ready point the kernel was booted to (kgen/harness/live.py `boot`, kgen/harness/ready.py)."""
    if kernel.layout is not None:
        return f"serving calls: idle in hlt between calls ({protocol.SERVING})"
    if kernel.ready.kind is not None:
        return kernel.ready.reached()
    if regs.halted and not regs.eflags & hw.EFLAGS_IF:
        return "halted with interrupts off"
    return "idle in hlt with interrupts on" if regs.halted else "running (stopped by kgen)"
