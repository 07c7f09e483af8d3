"""A kgen kernel's memory managers driven through the call channel, the machine checked after every stage.

The invariant tests look at the kernel once it has booted; most bugs of a memory manager show only once it works:
a table made later and never cleared, an entry written one slot off, a translation left in the TLB, a frame pushed
twice, a range merged wrongly, a block too small. Each test here boots the kernel and runs one stage (page tables
made and given back across several leaf-table spans, temp-map and allocate-at round trips, a double free, lazy ranges
backed on first touch, pages unmapped or freed while in the TLB, range releases that merge, heap blocks, the heap's NX
pages and its double free, the PMM against the memory map, the boot report against the machine, every routine's
refusals, the damage the allocators check for, memory exhausted and recovered, the user half's edge in vmm_map_in,
ring-3 tasks and their faults), and after each part of it checks

- every invariant of kgen.guest.invariants on the stopped machine (poisoned RAM: a table never cleared shows);
- what the stage did, by the walker, the kernel and the CPU: the page maps the frame asked for, with the flags
  asked for, through table entries that are present, writable and supervisor-only; the kernel's vmm_translate finds
  that frame at every offset class; the CPU reads what lies in that frame;
- the frame accounting: free frames = the free frames at the start of the stage, less the frames now mapped and the
  tables now present that were not at the start (plus those gone since), less the frames the test holds; the free
  stack is a chain of exactly `pmm_count` frames (a bitmap kernel's bitmap has exactly `pmm_count` clear bits),
  none of them mapped, a table or held;
- the range allocator's free list: sorted, merged, inside the vmm window, clear of live allocations and mapped
  pages;
- after every step that narrows a page's rights or unmaps it, the CPU itself: the access the tables now forbid
  (a read of an unmapped page, a write to a page made read-only, a fetch from a page made NX) must fault, through
  probe_access (templates/peek.s). The entries can be right while the TLB still holds the old translation (a
  missing INVLPG); only an access by the CPU shows that, and QEMU's TCG caches translations as hardware does.

Every address comes from the layout (the vmm window, the leaf-table span, the top-level slots of the user half), so
any config the rules accept is exercised, with bounded loops: the suite stays fast on a good kernel. A kernel that
kgen did not build has no call channel: these tests are skipped for it. Address spaces have their stage in
test_aspaces.py.
"""
from __future__ import annotations

import pytest

from kgen import protocol
from kgen.arch import hw
from kgen.guest import invariants
from kgen.errors import KgenError
from kgen.guest.bootreport import MemoryRegion
from kgen.guest.bootreport import parse as parse_boot_report
from kgen.guest.diagnose import RunFailed
from kgen.guest.findings import Finding, failures
from kgen.guest.pmmview import ChainError, PmmView, overlap_frames, ranges_from_mmap
from kgen.guest.pmmview import parse_report as parse_pmm_line

PAGE = hw.PAGE_SIZE
FLAGS = hw.PTE_P | hw.PTE_RW
# Leaf-table spans of the vmm window each stage makes a table in (fewer where the window has no room), and pages
# used in each span.
SPANS = 3
PAGES_PER_SPAN = 3
# A sub-page offset for markers, so a translation that drops or garbles the low bits shows.
OFFSET = 0x124
# Offsets the kernel's own vmm_translate is asked at on every page a stage maps: none and every offset bit set, so
# a translation that mixes the entry's flags into the address, or keeps too few offset bits, shows.
TRANSLATE_OFFSETS = (0x0, OFFSET, 0xFFF)
# Frames the temp-map stage reaches through one slot after another, and the free-stack stage allocates.
ROUND_TRIPS = 4
STACK_FRAMES = 6
# Pages of the lazy range touched (spread over it) and of the ranges released in merging order.
LAZY_TOUCHES = 6
MERGE_PAGES = (2, 3, 4)
# Heap requests: (size, align) three times each, so blocks of one class lie side by side; a class one size too
# small then hands out overlapping blocks.
HEAP_REQUESTS = ((1, 1), (16, 1), (17, 1), (24, 8), (32, 1), (33, 1), (100, 64), (500, 1), (2048, 1),
                 (2049, 1), (5000, 1), (24, 4096), (3000, 16384))
HEAP_COPIES = 3
# Where the narrowing stage puts a `ret` for the CPU to fetch (away from OFFSET's marker).
FETCH_OFFSET = 0x3F0
RET = b"\xc3"


@pytest.fixture
def kernel(kgen_layout, kgen_machine):
    """A kgen kernel freshly booted to serve calls (skipped, before any boot, for anyone else's ELF)."""
    if kgen_machine.channel is None:
        pytest.skip("this kernel has no call channel")
    return Exercise(kgen_machine)


class Exercise:
    """One booted kernel, what it looked like when the current stage began, and the checks run after each step."""

    def __init__(self, live):
        self.live = live
        self.layout = live.kernel.layout
        self.elf = live.kernel.elf
        self.arch = self.layout.arch
        self.mode = self.arch.paging
        self.pmm = PmmView(live.machine.read_phys, self.elf, self.layout)
        self.stack = self.layout.pmm_kind == "stack"      # else the bitmap (templates/pmm_bitmap.s)
        self.held: set[int] = set()         # frames the test took with pmm_alloc and has not mapped or freed
        self.mapped: dict[int, int] = {}    # vaddr -> frame of the pages the test mapped with vmm_map
        self._poison_pages: dict[int, bytes] = {}
        self._walked = None                 # (view, its walk): the walk of the machine as last stopped
        self.begin("boot")

    # ---- the kernel --------------------------------------------------------------------------------------------
    def call(self, routine: str, *args: int) -> int:
        return self.live.call(routine, *args)

    def u32(self, name: str) -> int:
        self.live.stop()
        return self.pmm.u32(name)

    def word(self, name: str, index: int = 0) -> int:
        self.live.stop()
        return self.pmm.word(name, index)

    def phys32(self, paddr: int) -> int:
        self.live.stop()
        return int.from_bytes(self.live.machine.read_phys(paddr, 4), "little")

    def write_phys32(self, paddr: int, value: int) -> None:
        self.live.write_phys(paddr, value.to_bytes(4, "little"))

    def alloc_frame(self) -> int:
        frame = self.call("pmm_alloc")
        assert frame, "pmm_alloc found no frame in a freshly booted kernel"
        self.held.add(frame)
        return frame

    def map(self, vaddr: int, frame: int, flags: int = FLAGS) -> None:
        assert self.call("vmm_map", vaddr, frame, flags) == 1, f"vmm_map({vaddr:#x}, {frame:#x}) refused"
        self.held.discard(frame)
        self.mapped[vaddr] = frame

    def unmap(self, vaddr: int) -> None:
        frame = self.mapped.pop(vaddr)
        got = self.call("vmm_unmap", vaddr)
        assert got == frame, f"vmm_unmap({vaddr:#x}) returned {got:#x}, not the frame {frame:#x} mapped there"
        self.held.add(frame)

    def free_frame(self, frame: int) -> None:
        assert self.call("pmm_free", frame) == 1, f"pmm_free({frame:#x}) refused a frame pmm_alloc handed out"
        self.held.discard(frame)

    # ---- what the machine holds ------------------------------------------------------------------------------
    def walk(self, view):
        """(mappings, (path, frame) of every table below the top one) of a stopped machine, walked once per stop."""
        if self._walked is None or self._walked[0] is not view:
            self._walked = (view, (view.walker.mappings(), view.walker.page_tables()))
        return self._walked[1]

    def snapshot(self):
        """(frames mapped where the stages work, tables below the top one, free count)."""
        view = self.live.view()
        mappings, page_tables = self.walk(view)
        frames = {m.pstart + o for m in mappings if self.in_play(m.vstart) for o in range(0, m.size, PAGE)}
        tables = {frame for _, frame in page_tables}
        return frames, tables, self.pmm.free_count()

    def in_play(self, vaddr: int) -> bool:
        """Where the stages map pages: the user half, the temp-map window and the vmm window (the kernel image and
        the recursive window do not change)."""
        layout = self.layout
        return vaddr < layout.kernel_half_start or any(
            region.start <= vaddr < region.end for region in (layout.tempmap_window, layout.vmm_window))

    def begin(self, stage: str) -> None:
        """Remember the machine as the stage starts: the accounting is checked against it."""
        self.stage = stage
        self.start_frames, self.start_tables, self.start_free = self.snapshot()
        self.start_ranges = self.free_ranges()
        self.start_held = set(self.held)

    def free_ranges(self) -> list[tuple[int, int]]:
        self.live.stop()
        return list(self.pmm.pairs("vmm_free_ranges", "vmm_free_range_count", self.layout.vmm_free_slots))

    def live_ranges(self) -> list[tuple[int, int, str]]:
        """(start, pages, owner) of every range taken from the vmm window that the kernel records."""
        self.live.stop()
        layout, found = self.layout, []
        for i in range(layout.vmm_alloc_slots):
            start = self.pmm.word("vmm_allocs", 4 * i)
            if start:
                found.append((start, self.pmm.word("vmm_allocs", 4 * i + 1), "vmm_alloc"))
        for i in range(layout.heap_large_slots):
            start = self.pmm.word("heap_large", 2 * i)
            if start:
                found.append((start, self.pmm.word("heap_large", 2 * i + 1), "heap large block"))
        slab = self.pmm.word("heap_slab_base")
        if slab:
            found.append((slab, layout.heap_slab_pages, "heap slab window"))
        return found

    # ---- the checks --------------------------------------------------------------------------------------------
    def check(self, step: str) -> None:
        """Every invariant, the frame accounting, the free stack and the range list, after `step`."""
        view = self.live.view()
        problems = []
        for check in invariants.GENERIC_CHECKS + invariants.KGEN_CHECKS:
            if check is invariants.check_tables_unpoisoned:
                problems += self.new_table_problems(view)   # the tables of the boot were checked while idle
                continue
            if check is invariants.check_nothing_below_kernel_base and self.user_pages():
                problems += self.user_half_problems(view)       # the test's own pages are there, and only they
                continue
            try:
                found = check(view)
            except invariants.NotApplicable:
                continue
            problems += [f"{check.__doc__.splitlines()[0]} {line}" for line in failures(found)]
        problems += self.accounting_problems()
        problems += self.range_problems(view)
        if problems:
            pytest.fail(f"after {self.stage}: {step}:\n" + "\n".join(f"  {p}" for p in problems[:30]),
                        pytrace=False)

    def new_table_problems(self, view) -> list[str]:
        """check_tables_unpoisoned for the tables made since the stage began (on x86_64 the whole check reads the
        kernel half's 256 PDPTs entry by entry: too slow to repeat after every step)."""
        if view.poison is None:
            return []
        size = self.arch.entry_size
        problems = []
        for path, frame in self.walk(view)[1]:
            if frame in self.start_tables:
                continue
            data = view.read_phys(frame, PAGE)
            poison = self.poison_page(view.poison, frame)
            hits = [i // size for i in range(0, PAGE, size) if data[i:i + size] == poison[i:i + size]]
            if hits:
                names = self.mode.level_names
                steps = " -> ".join(f"{names[level]}[{index}]" for level, index in enumerate(path))
                problems.append(f"the table at {frame:#x} ({steps} -> {names[len(path)]}): {len(hits)} of "
                                f"{PAGE // size} entries still hold the poison RAM was filled with (first: index "
                                f"{hits[0]}): the table was never cleared")
        return problems

    def poison_page(self, pattern: bytes, frame: int) -> bytes:
        """What a page at `frame` holds if nobody wrote it: the poison pattern, tiled from address 0."""
        phase = frame % len(pattern)
        if phase not in self._poison_pages:
            tile = pattern[phase:] + pattern[:phase]
            self._poison_pages[phase] = (tile * (PAGE // len(tile) + 1))[:PAGE]
        return self._poison_pages[phase]

    def user_pages(self) -> dict[int, int]:
        return {v: f for v, f in self.mapped.items() if v < self.layout.kernel_half_start}

    def user_half_problems(self, view) -> list[str]:
        found = {m.vstart + o: m.pstart + o for m in self.walk(view)[0] if m.vstart < self.layout.kernel_half_start
                 for o in range(0, m.size, PAGE)}
        want = self.user_pages()
        return [f"{v:#x} maps {found.get(v, 'nothing')!s:>8} in the user half, the test mapped "
                f"{want[v]:#x} there" if v in want else f"{v:#x} is mapped in the user half, the test mapped nothing "
                f"there" for v in sorted(found.keys() | want.keys()) if found.get(v) != want.get(v)]

    def accounting_problems(self) -> list[str]:
        frames, tables, free = self.snapshot()
        mapped = len(frames - self.start_frames) - len(self.start_frames - frames)
        made = len(tables - self.start_tables) - len(self.start_tables - tables)
        held = len(self.held) - len(self.start_held)
        expected = self.start_free - mapped - made - held
        problems = []
        if free != expected:
            problems.append(f"{free} frames free, expected {expected}: {self.start_free} at the start of the stage, "
                            f"{mapped:+} mapped, {made:+} page tables, {held:+} held by the test")
        state = self.pmm.state()
        if state.live != state.total - state.reserved_frames - state.free:
            problems.append(f"pmm counts disagree: {state}")
        try:
            free = self.pmm.free_frames(state)
        except ChainError as err:
            return problems + [f"the free stack: {err}"]
        if len(free) != state.count:
            holds = (f"the free stack holds {len(free)} frames" if self.stack
                     else f"the bitmap has {len(free)} clear bits")
            problems.append(f"{holds}, pmm_count says {state.count}")
        where = "on the free stack" if self.stack else "free in the bitmap"
        for frame in free:
            what = ("mapped" if frame in frames else "a page table" if frame in tables else
                    "held by the test" if frame in self.held else None)
            if what:
                problems.append(Finding(f"frame {frame:#x} is {where} and {what}", frames=(frame,)))
        return problems

    def range_problems(self, view) -> list[str]:
        layout = self.layout
        ranges, owned = self.free_ranges(), self.live_ranges()
        problems = []
        for start, pages in ranges:
            end = start + pages * PAGE
            if start % PAGE or not pages or start < layout.vmm_base or end > layout.vmm_window.end:
                problems.append(f"free range {start:#x} + {pages} pages is not a page range inside the "
                                f"{layout.vmm_window}")
            for other, n, owner in owned:
                if start < other + n * PAGE and other < end:
                    problems.append(f"free range {start:#x} + {pages} pages overlaps the {owner} at {other:#x} + "
                                    f"{n} pages")
        for (a, n), (b, _) in zip(ranges, ranges[1:]):
            if a + n * PAGE >= b:
                problems.append(f"free ranges {a:#x} + {n} pages and {b:#x} are out of order, overlap or touch "
                                f"without being merged")
        window = layout.vmm_window
        mappings = [m for m in self.walk(view)[0] if window.start <= m.vstart < window.end]
        for start, pages in ranges:
            for m in mappings:
                if m.vstart < start + pages * PAGE and start < m.vstart + m.size:
                    problems.append(f"free range {start:#x} + {pages} pages holds the mapped page(s) {m}")
                    break
        return problems

    def check_page(self, vaddr: int, frame: int, flags: int = FLAGS) -> None:
        """vaddr maps frame with `flags` (RW as asked, never U/S), through entries present, writable and
        supervisor-only at every level above; the CPU reads what lies in the frame."""
        walker = self.live.view().walker
        t = walker.translate(vaddr + OFFSET)
        where = f"after {self.stage}: {vaddr:#x}"
        if t is None or t.paddr != frame + OFFSET:
            pytest.fail(f"{where} should map frame {frame:#x}, the walker finds "
                        f"{'nothing' if t is None else f'{t.paddr - OFFSET:#x} via {t.path}'}", pytrace=False)
        bad = [f"{ref} = {ref.value:#x}" for ref in t.chain[:-1]
               if not ref.value & hw.PTE_RW or ref.value & hw.PTE_US]
        if bad:
            pytest.fail(f"{where}: an entry above the page is not writable-supervisor: {', '.join(bad)}",
                        pytrace=False)
        if bool(t.entry & hw.PTE_RW) != bool(flags & hw.PTE_RW) or t.entry & hw.PTE_US:
            pytest.fail(f"{where}: the page's entry {t.entry:#x} via {t.path}, asked for flags {flags:#x}",
                        pytrace=False)
        for offset in TRANSLATE_OFFSETS:
            got = self.call("vmm_translate", vaddr + offset)
            if got != frame + offset:
                pytest.fail(f"{where}: the kernel's vmm_translate({vaddr + offset:#x}) gives {got:#x}, the page "
                            f"maps frame {frame:#x}", pytrace=False)
        marker = 0x5EED0000 | vaddr >> 12 & 0xFFFF
        self.write_phys32(frame + OFFSET, marker)
        got = self.call("kmem_read32", vaddr + OFFSET)
        if got != marker:
            pytest.fail(f"{where}: the CPU reads {got:#010x} at {vaddr + OFFSET:#x}, frame {frame:#x} holds "
                        f"{marker:#010x}", pytrace=False)

    def check_unmapped(self, vaddr: int) -> None:
        """No entry maps vaddr, and the CPU faults on a read there (no translation left in the TLB)."""
        t = self.live.view().walker.translate(vaddr)
        if t is not None:
            pytest.fail(f"after {self.stage}: {vaddr:#x} should be unmapped, it maps {t.paddr:#x} via {t.path}",
                        pytrace=False)
        self.must_fault(vaddr + OFFSET, "read", "it is unmapped")

    def must_fault(self, vaddr: int, kind: str, why: str, present: bool = False) -> None:
        """The CPU must refuse a `kind` access at vaddr (`why`), with a fault of the right cause: not-present, or a
        protection fault on a page still `present`."""
        probe = self.live.probe(vaddr, kind)
        if not probe.faulted:
            pytest.fail(f"after {self.stage}: {vaddr:#x}: {why}, yet {probe.describe()}: the CPU still uses the "
                        f"old translation from its TLB (an INVLPG missing?)", pytrace=False)
        if bool(probe.error & hw.PF_P) != present:
            pytest.fail(f"after {self.stage}: {vaddr:#x}: {why}, and {probe.describe()}: expected a "
                        f"{'protection' if present else 'not-present'} fault", pytrace=False)

    def must_go_through(self, vaddr: int, kind: str, why: str) -> None:
        """The CPU carries out a `kind` access at vaddr (`why`); it also caches the translation, so a later
        narrowing must flush it."""
        probe = self.live.probe(vaddr, kind)
        if probe.faulted:
            pytest.fail(f"after {self.stage}: {vaddr:#x}: {why}, yet {probe.describe()}", pytrace=False)

    def must_fault_where_unmapped(self, vaddrs, why: str) -> None:
        """Every page of `vaddrs` the walker finds unmapped must fault for the CPU too (once per page)."""
        walker = self.live.view().walker
        pages = sorted({v & ~(PAGE - 1) for v in vaddrs})
        for page in [p for p in pages if walker.translate(p) is None]:
            self.must_fault(page + OFFSET, "read", why)

    def check_released(self, step: str) -> None:
        """Everything the stage took is back: free count, tables and free ranges as at its start."""
        self.check(step)
        frames, tables, free = self.snapshot()
        if (free, tables) != (self.start_free, self.start_tables):
            pytest.fail(f"after {self.stage}: {step}: {free} frames free and {len(tables)} tables, at the start "
                        f"{self.start_free} and {len(self.start_tables)}", pytrace=False)
        ranges = self.free_ranges()
        if ranges != self.start_ranges:
            pytest.fail(f"after {self.stage}: {step}: the free ranges are {_ranges(ranges)}, at the start "
                        f"{_ranges(self.start_ranges)}", pytrace=False)

    # ---- where the stages work ---------------------------------------------------------------------------------
    def leaf_spans(self) -> tuple[list[list[int]], tuple[int, int] | None]:
        """Pages grouped by leaf-table span: up to SPANS spans of a range reserved in the vmm window ((start, pages)
        of it is returned, to be released), and one or two spans of an empty top-level slot of the user half, where
        every level below the top is made (on x86_64 a PDPT and a PD as well as the page tables)."""
        layout, arch = self.layout, self.arch
        span = layout.leaf_table_span
        groups: list[list[int]] = []
        largest = max((pages for _, pages in self.free_ranges()), default=0)
        pages = min(largest, (SPANS + 1) * span // PAGE)
        start = self.call("vrange_reserve", pages) if pages else 0
        if start:
            end = start + pages * PAGE
            base = start - start % span
            while base < end and len(groups) < SPANS:
                lo, hi = max(base, start), min(base + span, end)
                first = lo + min(PAGES_PER_SPAN, (hi - lo) // PAGE - PAGES_PER_SPAN) * PAGE   # index not 0 if room
                if hi - lo >= PAGES_PER_SPAN * PAGE:
                    groups.append([max(first, lo) + i * PAGE for i in range(PAGES_PER_SPAN)])
                base += span
        slot = self.empty_user_slot()
        if slot is not None:
            top = arch.canonical(slot << arch.shift(0))
            # Index 3, 5, 7... at every level below the top one, so an index off by one shows at any level.
            base = top + sum((2 * level + 1) * arch.span(level) for level in range(1, arch.levels - 1))
            for k in range(min(2, arch.span(0) // span)):
                first = base + k * span + 3 * PAGE
                groups.append([first + i * PAGE for i in range(PAGES_PER_SPAN)])
        if not groups:
            pytest.skip(f"neither the {layout.vmm_window} nor the user half has room for a page table's span")
        return groups, (start, pages) if start else None

    def empty_user_slot(self) -> int | None:
        """The middle top-level slot of the user half, if no region of the layout reaches it and it is empty."""
        layout, arch = self.layout, self.arch
        first_kernel = (layout.kernel_half_start & arch.va_mask) >> arch.shift(0)
        slot = first_kernel // 2
        if slot == 0:
            return None
        base = arch.canonical(slot << arch.shift(0))
        if any(r.start < base + arch.span(0) and base < r.end for r in layout.regions()):
            return None
        view = self.live.view()
        return slot if not view.entry(view.walker.top, slot) & hw.PTE_P else None


def _ranges(ranges) -> str:
    return ", ".join(f"{start:#x}+{pages}" for start, pages in ranges) or "none"


# ---- the stages ------------------------------------------------------------------------------------------------
def test_page_tables_made_and_given_back_across_leaf_spans(kernel):
    k = kernel
    k.begin("mapping one page in each of several leaf-table spans")
    groups, reserved = k.leaf_spans()
    for pages in groups:
        frame = k.alloc_frame()
        k.map(pages[0], frame)
        k.check_page(pages[0], frame)
    k.check(f"vmm_map of {', '.join(hex(pages[0]) for pages in groups)}")
    k.stage = "a second page in each span (its table exists), read-only"
    for pages in groups:
        frame = k.alloc_frame()
        k.map(pages[1], frame, hw.PTE_P)
        k.check_page(pages[1], frame, hw.PTE_P)
        k.check_page(pages[0], k.mapped[pages[0]])
    k.check("the second pages mapped")
    k.stage = "unmapping every page, tables given back"
    for vaddrs in ([pages[1] for pages in groups], [pages[0] for pages in groups]):
        for vaddr in vaddrs:
            frame = k.mapped[vaddr]
            k.unmap(vaddr)
            k.check_unmapped(vaddr)
            assert k.call("vmm_translate", vaddr) == k.layout.vmm_none, f"vmm_translate({vaddr:#x}) after the unmap"
            k.free_frame(frame)
        k.check(f"vmm_unmap of {', '.join(map(hex, vaddrs))}")
    if reserved:
        assert k.call("vrange_release", *reserved) == 1, f"vrange_release{reserved} refused its own reservation"
    k.check_released("everything unmapped and freed, the range released")


def test_temp_map_slots_reach_each_new_frame(kernel):
    """Frames mapped one after another into the same temp-map slot: the CPU must read and write each one's own
    memory (INVLPG on every remap); a slot given back leaves nothing mapped, for the CPU too (INVLPG on unmap)."""
    k = kernel
    k.begin("temp-map round trips")
    frames = [k.alloc_frame() for _ in range(ROUND_TRIPS)]
    for i, frame in enumerate(frames):
        k.write_phys32(frame + OFFSET, 0x7E570000 + i)
    for i, frame in enumerate(frames):
        slot = k.call("temp_map", frame)
        assert slot == k.layout.tempmap_base, f"temp_map({frame:#x}) gave {slot:#x}, not the first slot"
        got = k.call("kmem_read32", slot + OFFSET)
        k.call("kmem_write32", slot + 2 * OFFSET, 0x5107_0000 + i)
        k.call("temp_unmap", slot)
        k.must_fault(slot + OFFSET, "read", "temp_unmap gave the slot back")
        if got != 0x7E570000 + i:
            pytest.fail(f"after {k.stage}: frame {frame:#x} through temp-map slot {slot:#x}: the CPU read "
                        f"{got:#010x}, the frame holds {0x7E570000 + i:#010x}", pytrace=False)
    k.check(f"temp_map, temp_unmap of {', '.join(map(hex, frames))}")
    wrote = {frame: k.phys32(frame + 2 * OFFSET) for frame in frames}
    wrong = {f: v for (f, v), i in zip(wrote.items(), range(ROUND_TRIPS)) if v != 0x5107_0000 + i}
    assert not wrong, f"writes through the temp-map slot landed elsewhere: {wrong}"
    for frame in frames:
        k.free_frame(frame)
    k.check_released("every frame freed (its link written through a temp-map slot)")


def test_free_stack_is_last_in_first_out_and_refuses_a_double_free(kernel):
    k = kernel
    if not k.stack:
        pytest.skip("a bitmap kernel has no free stack (test_bitmap_hands_out_the_lowest_free_frame...)")
    k.begin("frames allocated and freed")
    frames = [k.alloc_frame() for _ in range(STACK_FRAMES)]
    assert len(set(frames)) == STACK_FRAMES, f"pmm_alloc handed out a frame twice: {[hex(f) for f in frames]}"
    k.check("frames allocated")
    for frame in frames[::2] + frames[1::2]:
        k.free_frame(frame)
        assert k.word("pmm_top") == frame, f"pmm_free({frame:#x}) did not put it on top of the free stack"
    k.check("frames freed")
    top = frames[-1] if STACK_FRAMES % 2 == 0 else frames[-2]
    assert k.call("pmm_free", top) == 0, f"pmm_free({top:#x}) accepted the frame already on top (a double free)"
    k.check(f"a double free of {top:#x}")
    again = [k.alloc_frame() for _ in range(STACK_FRAMES)]
    assert again == (frames[::2] + frames[1::2])[::-1], "pmm_alloc did not take the frames back last in, first out"
    for frame in again:
        k.free_frame(frame)
    k.check_released("the frames allocated again and freed")


def test_bitmap_hands_out_the_lowest_free_frame_and_refuses_a_double_free(kernel):
    """pmm.kind = "bitmap": pmm_alloc takes the lowest free frame (the next-free hint never skips one), sets its bit;
    pmm_free clears it, and refuses a frame whose bit is already clear."""
    k = kernel
    if k.stack:
        pytest.skip("a stack kernel has no bitmap (test_free_stack_is_last_in_first_out...)")
    k.begin("frames allocated and freed")
    k.live.stop()
    lowest = k.pmm.free_frames()[:STACK_FRAMES]
    frames = [k.alloc_frame() for _ in range(STACK_FRAMES)]
    assert frames == lowest, f"pmm_alloc handed out {[hex(f) for f in frames]}, not the lowest free frames " \
                             f"{[hex(f) for f in lowest]}"
    k.check("frames allocated")
    for frame in frames[::2] + frames[1::2]:
        k.free_frame(frame)
    k.check("frames freed")
    assert k.call("pmm_free", frames[0]) == 0, f"pmm_free({frames[0]:#x}) accepted a frame already free (a double free)"
    k.check(f"a double free of {frames[0]:#x}")
    again = [k.alloc_frame() for _ in range(STACK_FRAMES)]
    assert again == frames, "pmm_alloc did not take the freed frames back lowest first"
    for frame in again:
        k.free_frame(frame)
    k.check_released("the frames allocated again and freed")


def test_allocate_at_round_trips(kernel):
    """pmm_alloc_at maps a cleared frame with the flags asked for, pmm_free_at pushes it back while mapped; in a page
    table the test keeps alive with a page of its own."""
    k = kernel
    k.begin("allocate-at round trips")
    groups, reserved = k.leaf_spans()
    anchor, *pages = groups[0]
    frame = k.alloc_frame()
    k.map(anchor, frame)
    for vaddr, flags in zip(pages, (FLAGS, hw.PTE_P)):
        phys = k.call("pmm_alloc_at", vaddr, flags)
        assert phys, f"pmm_alloc_at({vaddr:#x}) failed with plenty of frames"
        below = k.word("pmm_top") if k.stack else None
        k.check(f"pmm_alloc_at({vaddr:#x}, {flags:#x})")
        k.live.stop()
        assert k.live.machine.read_phys(phys, PAGE) == bytes(PAGE), f"pmm_alloc_at({vaddr:#x}): {phys:#x} not cleared"
        k.check_page(vaddr, phys, flags)
        assert k.call("pmm_free_at", vaddr) == phys, f"pmm_free_at({vaddr:#x}) did not give back {phys:#x}"
        k.check_unmapped(vaddr)
        if k.stack:
            assert k.word("pmm_top") == phys and k.pmm.link(phys) == below, \
                f"pmm_free_at({vaddr:#x}): {phys:#x} is not on top of the free stack, linked to {below:#x}"
        else:
            k.live.stop()
            assert phys in k.pmm.free_frames(), f"pmm_free_at({vaddr:#x}): {phys:#x} is not free in the bitmap"
        k.check(f"pmm_free_at({vaddr:#x})")
    k.unmap(anchor)
    k.free_frame(frame)
    if reserved:
        assert k.call("vrange_release", *reserved) == 1
    k.check_released("the anchor page unmapped and freed, the range released")


def test_lazy_range_backed_on_first_touch(kernel):
    """A lazy range spanning several leaf tables: no frame until a page is touched; each touch takes one frame (and
    the tables it needs), reads zero first; an eager range takes its frames at once; vmm_free gives all back."""
    k = kernel
    k.begin("a lazy range touched here and there")
    span_pages = k.layout.leaf_table_span // PAGE
    largest = max((pages for _, pages in k.free_ranges()), default=0)
    pages = min(2 * span_pages + 3, largest // 2)
    assert pages >= 3, f"the {k.layout.vmm_window} has no room for a lazy range"
    faults = k.u32("vmm_demand_faults")
    lazy = k.call("vmm_alloc", pages, FLAGS, 1)
    assert lazy, f"vmm_alloc({pages}, lazy) failed"
    k.check(f"vmm_alloc({pages}, lazy) = {lazy:#x}")
    touched = sorted({(pages - 1) * i // (LAZY_TOUCHES - 1) for i in range(LAZY_TOUCHES)})
    for n, page in enumerate(touched, 1):
        vaddr = lazy + page * PAGE
        assert k.call("kmem_read32", vaddr + OFFSET) == 0, f"page {page} of the lazy range is not cleared"
        k.call("kmem_write32", vaddr + OFFSET, 0x1A2F0000 + page)
        assert k.u32("vmm_demand_faults") == faults + n, "a touch of a lazy page did not fault it in exactly once"
        t = k.live.view().walker.translate(vaddr)
        assert t is not None, f"page {page} of the lazy range, touched, is not mapped"
        k.check_page(vaddr, t.paddr & ~(PAGE - 1))
    k.check(f"pages {touched} of the lazy range touched")
    k.stage = "an eager range beside the lazy one"
    eager = k.call("vmm_alloc", 3, FLAGS, 0)
    assert eager
    k.check(f"vmm_alloc(3, eager) = {eager:#x}")
    walker = k.live.view().walker
    for page in range(3):
        t = walker.translate(eager + page * PAGE)
        assert t is not None, f"page {page} of an eager range is not mapped"
        k.check_page(eager + page * PAGE, t.paddr & ~(PAGE - 1))
    assert k.call("vmm_free", eager) == 3
    k.check("the eager range freed")
    assert k.call("vmm_free", lazy) == pages
    k.check_released("the lazy range freed")


def test_unmapped_and_freed_pages_leave_the_tlb(kernel):
    """A page the CPU has just used, unmapped by vmm_unmap or given back by vmm_free, must be gone for the CPU too
    (INVLPG): in a lazy range, the next touch faults and gets a fresh cleared frame, instead of reaching the old frame
    through a stale TLB entry. Another range's pages keep the page table alive, so nothing else flushes the page."""
    k = kernel
    k.begin("a page unmapped while the CPU has it in its TLB")
    lazy = k.call("vmm_alloc", 3, FLAGS, 1)
    assert lazy
    for page in range(3):
        k.call("kmem_write32", lazy + page * PAGE + OFFSET, 0x0DD00000 + page)
    middle = lazy + PAGE
    faults = k.u32("vmm_demand_faults")
    old = k.call("vmm_unmap", middle)
    assert old not in (0, k.layout.vmm_none), f"vmm_unmap({middle:#x}) found nothing"
    k.held.add(old)
    k.check_unmapped(middle)        # the probe does not back the lazy page: its fault goes to the probe
    k.check(f"vmm_unmap({middle:#x})")
    got = k.call("kmem_read32", middle + OFFSET)
    if got != 0 or k.u32("vmm_demand_faults") != faults + 1:
        pytest.fail(f"after {k.stage}: the CPU read {got:#010x} at {middle + OFFSET:#x} after vmm_unmap, "
                    f"{k.u32('vmm_demand_faults') - faults} demand faults: the old frame {old:#x} "
                    f"(holding {0x0DD00001:#010x}) is still reached through the TLB", pytrace=False)
    k.check("the unmapped page touched again (faulted in afresh)")
    k.free_frame(old)

    # The same through vmm_free (pmm_free_at): a range freed and taken again (first fit: the same place) must fault
    # its pages in afresh, not reach the freed frames. `lazy` keeps the page table alive.
    k.stage = "a range freed while the CPU has its pages in its TLB, and allocated again"
    freed = k.call("vmm_alloc", 2, FLAGS, 1)
    assert freed, "vmm_alloc(2, lazy) failed"
    for page in range(2):
        k.call("kmem_write32", freed + page * PAGE + OFFSET, 0x0DF00000 + page)
    assert k.call("vmm_free", freed) == 2
    for page in range(2):
        k.must_fault(freed + page * PAGE + OFFSET, "read", "vmm_free gave its frame back")
    k.check(f"vmm_free({freed:#x})")
    again = k.call("vmm_alloc", 2, FLAGS, 1)
    assert again == freed, f"vmm_alloc(2) after vmm_free({freed:#x}) gave {again:#x}, not the first fit {freed:#x}"
    faults = k.u32("vmm_demand_faults")
    got = k.call("kmem_read32", again + OFFSET)
    if got != 0 or k.u32("vmm_demand_faults") != faults + 1:
        pytest.fail(f"after {k.stage}: the CPU read {got:#010x} at {again + OFFSET:#x}, "
                    f"{k.u32('vmm_demand_faults') - faults} demand faults: the frame vmm_free gave back (it held "
                    f"{0x0DF00000:#010x}) is still reached through the TLB", pytrace=False)
    k.check("the page of the range allocated again touched (faulted in afresh)")
    assert k.call("vmm_free", again) == 2
    assert k.call("vmm_free", lazy) == 3
    k.check_released("the ranges freed")


def test_narrowed_rights_leave_the_tlb(kernel):
    """A page whose rights narrow while the CPU has it in its TLB must be refused at once: vmm_protect makes it
    read-only (a write faults), then NX where entries have the bit (a fetch faults), and vmm_unmap takes it away (a
    read faults). The CPU uses the page the old way just before each step, so a translation left cached (no INVLPG)
    would let the access through while the entry says otherwise."""
    k = kernel
    k.begin("a page's rights narrowed while the CPU has it in its TLB")
    groups, reserved = k.leaf_spans()
    vaddr = groups[0][0]
    frame = k.alloc_frame()
    k.map(vaddr, frame)
    k.live.write_phys(frame + FETCH_OFFSET, RET)
    k.must_go_through(vaddr + OFFSET, "write", "it is mapped writable")
    k.must_go_through(vaddr + FETCH_OFFSET, "fetch", "it is mapped executable")
    assert k.call("vmm_protect", vaddr, hw.PTE_P) == 1, f"vmm_protect({vaddr:#x}) found no page"
    k.check_page(vaddr, frame, hw.PTE_P)
    k.must_fault(vaddr + OFFSET, "write", "vmm_protect made it read-only", present=True)
    k.check(f"vmm_protect({vaddr:#x}, read-only)")
    if k.arch.has_nx:
        k.must_go_through(vaddr + FETCH_OFFSET, "fetch", "it is read-only, still executable")
        assert k.call("vmm_protect", vaddr, hw.PTE_P | hw.PTE_NX) == 1
        k.check_page(vaddr, frame, hw.PTE_P)
        if not k.live.view().walker.translate(vaddr).entry & hw.PTE_NX:
            pytest.fail(f"after {k.stage}: vmm_protect({vaddr:#x}, NX) left the entry executable", pytrace=False)
        k.must_fault(vaddr + FETCH_OFFSET, "fetch", "vmm_protect made it NX", present=True)
        k.check(f"vmm_protect({vaddr:#x}, read-only, NX)")
    k.must_go_through(vaddr + OFFSET, "read", "it is mapped")
    k.unmap(vaddr)
    k.check_unmapped(vaddr)
    k.free_frame(frame)
    if reserved:
        assert k.call("vrange_release", *reserved) == 1, f"vrange_release{reserved} refused its own reservation"
    k.check_released("the page unmapped and freed, the range released")


def test_released_ranges_merge_with_their_neighbours(kernel):
    """Three ranges side by side released in the order that merges with the next range, then inserts, then merges
    with both sides: the free list must end as it began."""
    k = kernel
    k.begin("ranges released in merging order")
    starts = []
    for pages in MERGE_PAGES:
        start = k.call("vmm_alloc", pages, FLAGS, 1)
        assert start, f"vmm_alloc({pages}) failed"
        starts.append(start)
    k.check(f"vmm_alloc of {MERGE_PAGES} pages at {', '.join(map(hex, starts))}")
    for i in (2, 0, 1):
        assert k.call("vmm_free", starts[i]) == MERGE_PAGES[i]
        k.check(f"vmm_free({starts[i]:#x}) ({MERGE_PAGES[i]} pages)")
    k.check_released("all three released")
    k.stage = "a reserved range released"
    start = k.call("vrange_reserve", 5)
    assert start and k.call("vrange_release", start, 5) == 1
    k.check_released("vrange_reserve(5) released again")


def test_heap_blocks_are_whole_and_given_back(kernel):
    """kmalloc / kmalloc_aligned of every class, side by side: each block is aligned, inside the vmm window, overlaps
    no other and keeps what was written to its first and last word; kfree gives every page back."""
    k = kernel
    k.begin("heap blocks")
    start_slabs = k.u32("heap_slabs")
    word = k.arch.word_size
    blocks: dict[int, int] = {}
    for copy in range(HEAP_COPIES):
        for size, align in HEAP_REQUESTS:
            ptr = k.call("kmalloc", size) if align == 1 else k.call("kmalloc_aligned", size, align)
            assert ptr, f"kmalloc_aligned({size}, {align}) failed"
            assert ptr % align == 0, f"kmalloc_aligned({size}, {align}) = {ptr:#x}: not aligned"
            assert k.layout.vmm_base <= ptr and ptr + size <= k.layout.vmm_window.end, f"{ptr:#x} outside the window"
            for other, n in blocks.items():
                assert ptr + size <= other or other + n <= ptr, \
                    f"kmalloc({size}) = {ptr:#x} overlaps the live block {other:#x} of {n} bytes"
            blocks[ptr] = size
            _stamp(k, ptr, size, word)
        k.check(f"round {copy + 1} of allocations")
    for ptr, size in blocks.items():
        _check_stamp(k, ptr, size, word)
    for ptr in sorted(blocks)[::2] + sorted(blocks)[1::2]:
        k.call("kfree", ptr)
    k.must_fault_where_unmapped(blocks, "kfree gave the block's pages back")
    k.check("every block freed")
    assert k.u32("heap_slabs") == start_slabs, "slab pages stayed after their last block was freed"
    k.check_released("every block freed")


def _stamp(k, ptr: int, size: int, word: int) -> None:
    """The block's own address in its first and (if it has room for two) last word, written by the CPU."""
    for at in {ptr, ptr + max(0, size - 4) & ~3}:
        if at + 4 <= ptr + size:
            k.call("kmem_write32", at, (ptr ^ at) & 0xFFFFFFFF ^ 0xB10C0000)


def _check_stamp(k, ptr: int, size: int, word: int) -> None:
    for at in {ptr, ptr + max(0, size - 4) & ~3}:
        if at + 4 <= ptr + size:
            got = k.call("kmem_read32", at)
            assert got == (ptr ^ at) & 0xFFFFFFFF ^ 0xB10C0000, \
                f"block {ptr:#x} of {size} bytes: {at:#x} holds {got:#010x}: another block was written over it"



# ---- more of the kernel: the heap's refusals, the PMM against the memory map, exhaustion, the user-half edge ----
# Largest amount of free memory the exhaustion stage takes (frames): above it (a guest of more than 1 GiB) clearing
# every frame under TCG would cost more than the rest of the suite, and the stage is skipped, saying so.
EXHAUST_MAX_FRAMES = 1 << 18
# Frames the exhaustion stage takes one pmm_alloc call at a time at most, after its eager ranges took the rest.
EXHAUST_SINGLE_CALLS = 4096


def test_heap_pages_are_nx_and_a_double_free_stops_the_kernel(kernel):
    """Slab and whole-page blocks map NX where the architecture has it (a heap page the CPU may run is a way in);
    freeing a block twice stops the kernel with its report instead of handing the block out twice."""
    k = kernel
    k.begin("heap blocks, NX, freed twice")
    small, keep, large = k.call("kmalloc", 40), k.call("kmalloc", 40), k.call("kmalloc", 3 * PAGE)
    assert small and keep and large, "kmalloc failed in a freshly booted kernel"
    k.check("two small blocks and a large one")
    walker = k.live.view().walker
    for block in (small, large, large + 2 * PAGE):
        t = walker.translate(block)
        assert t is not None, f"heap block {block:#x} is not mapped"
        if k.arch.has_nx and not t.entry & hw.PTE_NX:
            pytest.fail(f"after {k.stage}: heap page {block & -PAGE:#x} is executable: its entry {t.entry:#x} via "
                        f"{t.path} has no NX", pytrace=False)
        if not t.entry & hw.PTE_RW or t.entry & hw.PTE_US:
            pytest.fail(f"after {k.stage}: heap page {block & -PAGE:#x}: entry {t.entry:#x} via {t.path}, not "
                        "writable-supervisor", pytrace=False)
    k.call("kfree", large)
    k.call("kfree", small)
    k.check("the large block and one small block freed")
    try:
        k.call("kfree", small)
    except RunFailed as stopped:
        if stopped.failure.kind != "panic" or "freed twice" not in str(stopped):
            pytest.fail(f"after {k.stage}: kfree({small:#x}) of a block freed before stopped the kernel, but not "
                        f"with its report: {stopped}", pytrace=False)
    else:
        again = [k.call("kmalloc", 40) for _ in range(2)]
        pytest.fail(f"after {k.stage}: kfree({small:#x}) of a block freed before returned; the next two kmalloc(40) "
                    f"gave {again[0]:#x} and {again[1]:#x}", pytrace=False)


def must_stop(k, why: str, report: str, routine: str, *args: int) -> None:
    """Calling routine(*args) on the damage done (`why`) must stop the kernel with a panic whose report holds
    `report`: a kernel that goes on hands out a frame or a block twice."""
    try:
        got = k.call(routine, *args)
    except RunFailed as stopped:
        if stopped.failure.kind != "panic" or report not in str(stopped):
            pytest.fail(f"after {k.stage}: {routine}({', '.join(map(hex, args))}) on {why} stopped the kernel, but "
                        f"not with its report ({report!r}): {stopped}", pytrace=False)
    else:
        pytest.fail(f"after {k.stage}: {routine}({', '.join(map(hex, args))}) on {why} returned {got:#x}: the "
                    f"kernel went on", pytrace=False)


@pytest.mark.parametrize("damage", ["free-stack link", "free-stack count", "heap free list", "a pointer into a block",
                                    "the kernel image freed"])
def test_damage_the_kernel_checks_for_stops_it(kernel, damage):
    """What the allocators check on every call (templates/pmm.s pmm_check_link, templates/heap.s): a free frame's
    link that is no frame address, a count that says the bottom is reached above it, a slab's free list leading to a
    live block, kfree of a pointer inside a block, pmm_free_at of the kernel's own image.
    Each stops the kernel with its report, on a machine booted for it alone."""
    k = kernel
    k.begin(f"{damage} damaged")
    if damage.startswith("free-stack"):
        if not k.stack:
            pytest.skip("the bitmap allocator keeps no links")
        below, top = k.alloc_frame(), k.alloc_frame()
        k.free_frame(below)
        k.free_frame(top)                                   # on top now, its first word the link to `below`
        if damage == "free-stack link":                     # not a frame address, with frames left below it
            k.live.write_phys(top, (below + 8).to_bytes(k.arch.word_size, "little"))
            why = f"a link {below + 8:#x} in free frame {top:#x}"
        else:                                               # the count says this is the bottom, the link disagrees
            poke = k.elf.symbols["pmm_count"].value - k.layout.kernel_virtual_base
            k.live.write_phys(poke, (1).to_bytes(4, "little"))
            why = f"pmm_count 1 with free frame {top:#x} linking to {below:#x}"
        must_stop(k, why, "free-frame stack corrupt", "pmm_alloc")
    elif damage == "heap free list":
        first, second = k.call("kmalloc", 40), k.call("kmalloc", 40)
        assert first and second, "kmalloc failed in a freshly booted kernel"
        k.call("kfree", first)                              # the head of its slab's free list
        link = k.live.view().walker.translate(first).paddr
        k.live.write_phys(link, second.to_bytes(k.arch.word_size, "little"))
        assert k.call("kmalloc", 40) == first, "kmalloc did not hand out the block freed last"
        must_stop(k, f"a free list leading to the live block {second:#x}", "free list is corrupt", "kmalloc", 40)
    elif damage == "a pointer into a block":
        block = k.call("kmalloc", 40)
        assert block, "kmalloc failed in a freshly booted kernel"
        must_stop(k, f"a pointer 8 bytes into block {block:#x}", "not a block the heap handed out", "kfree",
                  block + 8)
    else:
        must_stop(k, "the kernel image's first page", "belongs to the kernel image", "pmm_free_at",
                  k.layout.kernel_virtual_start)


def test_pmm_totals_match_the_memory_map(kernel):
    """The PMM's ranges and frame counts are what the Multiboot memory map makes of RAM (kgen/guest/pmmview.py
    ranges_from_mmap, written apart from the template), inside the RAM QEMU has; reserved frames are the overlap of
    those ranges with the reserved intervals, the image and the Multiboot information among them."""
    k = kernel
    k.begin("the PMM at rest")
    state = k.pmm.state()
    copied = _boot_mmap(k)
    ranges = ranges_from_mmap(copied, k.arch)
    problems = []
    given = _loader_mmap(k)
    if given is not None and copied != given[:k.layout.boot_mmap_max_entries]:
        problems.append(f"the kernel's copy of the memory map (boot_mmap) is {_regions(copied)}; the loader gave "
                        f"{_regions(given)}")
    if list(state.ranges) != ranges:
        problems.append(f"the PMM's ranges {_spans(state.ranges)}, the memory map gives {_spans(ranges)}")
    total = sum(hi - lo for lo, hi in ranges) // PAGE
    if state.total != total:
        problems.append(f"pmm_total = {state.total} frames, the memory map's available RAM holds {total}")
    if state.reserved_frames != overlap_frames(ranges, state.reserved):
        problems.append(f"pmm_reserved_frames = {state.reserved_frames}, its intervals {_spans(state.reserved)} "
                        f"overlap the ranges by {overlap_frames(ranges, state.reserved)} frames")
    image = (k.layout.kernel_load_address, k.elf.symbols["__kernel_end"].value - k.layout.kernel_virtual_base)
    if not any(lo <= image[0] and -(-image[1] // PAGE) * PAGE <= hi for lo, hi in state.reserved):
        problems.append(f"no reserved interval covers the image {_spans([image])}: {_spans(state.reserved)}")
    ram = k.live.machine.ram_windows
    outside = [(lo, hi) for lo, hi in ranges if ram and not any(w.start <= lo and hi <= w.end for w in ram)]
    if outside:
        problems.append(f"ranges {_spans(outside)} of the memory map lie outside QEMU's RAM {ram}")
    if problems:
        pytest.fail(f"after {k.stage}:\n" + "\n".join(f"  {p}" for p in problems), pytrace=False)


def test_the_boot_report_says_what_the_machine_holds(kernel):
    """The kernel's boot report (templates/report.s, the first thing a learner reads) against the machine: the
    Multiboot flags and memory map the loader handed over, the image's physical and virtual extent from the ELF, CR3,
    the recursive slot and where the top table sees itself, and the PMM's counts as the idle kernel holds them."""
    k = kernel
    k.begin("the boot report")
    layout, serial = k.layout, k.live.machine.serial
    try:
        report, pmm_line = parse_boot_report(serial), parse_pmm_line(serial)
    except KgenError as err:
        pytest.fail(f"{err}; COM1 holds:\n{serial[-1500:]}", pytrace=False)
    k.live.stop()
    read = k.live.machine.read_phys
    mbi = k.pmm.u32("boot_mbi_phys")
    end = k.elf.symbols["__kernel_end"].value
    state = k.pmm.state()
    loader = _loader_mmap(k) or []
    flags = int.from_bytes(read(mbi, 4), "little")
    # The kernel's copy of its command line (the loader's may be reused memory by now).
    given = read(k.elf.symbols["boot_cmdline"].value - layout.kernel_virtual_base,
                 layout.boot_cmdline_max).split(b"\0", 1)[0]
    lines = [line[len("cmdline: "):] for line in serial.splitlines() if line.startswith("cmdline: ")]
    said_and_true = [
        ("multiboot flags", report.multiboot_flags, flags),
        ("command line", lines[:1], [given.decode("ascii", "replace")] if given else []),
        ("mem_upper", report.mem_upper_kib, int.from_bytes(read(mbi + 8, 4), "little")),
        ("memory map", _regions(report.mmap), _regions(loader[:layout.boot_mmap_max_entries])),
        ("kernel phys", report.kernel_phys, (layout.kernel_load_address, end - layout.kernel_virtual_base)),
        ("kernel virt", report.kernel_virt, (layout.kernel_virtual_start, end)),
        ("cr3", report.cr3, k.live.view().regs.cr3 & ~(PAGE - 1)),
        ("recursive slot", report.recursive_slot, layout.recursive_slot),
        ("recursive window", report.recursive_pd, layout.recursive_top),
        ("pmm total", pmm_line.total, state.total),
        ("pmm reserved", pmm_line.reserved, state.reserved_frames),
        ("pmm free", pmm_line.free, k.start_free),
    ]
    wrong = [f"{what}: the report says {said}, the machine holds {true}" for what, said, true in said_and_true
             if said != true]
    if wrong or not report.ok:
        pytest.fail(f"after {k.stage}:\n" + "\n".join(f"  {w}" for w in wrong + ["no boot-ok line"] * (not report.ok)),
                    pytrace=False)


def test_memory_exhausted_refused_and_recovered(kernel):
    """Nearly every free frame taken by eager ranges; an eager range one page larger than what is left is refused
    with nothing kept; the rest taken one frame at a time until pmm_alloc returns 0, and kmalloc and vmm_alloc
    refuse; every frame handed out is one of the memory map's, outside the reserved intervals, none twice; all
    given back, the kernel goes on."""
    k = kernel
    # A space made first (the stage's accounting starts with it), for a program to be loaded into with no frame left.
    space = k.call("as_create") if "user_load" in k.elf.symbols else 0
    k.begin("every free frame taken")
    free = k.start_free
    if free > EXHAUST_MAX_FRAMES:
        pytest.skip(f"{free} free frames: clearing them all under TCG costs more than the suite (at most "
                    f"{EXHAUST_MAX_FRAMES}; a smaller machine.memory_mib runs this stage)")
    ranges, frames = [], []
    for _ in range(k.layout.vmm_alloc_slots // 2):
        left = _free_now(k)
        largest = max((pages for _, pages in k.free_ranges()), default=0)
        # Room for the page tables the range needs: one per leaf span it touches, and the levels above.
        pages = min(largest, left - left * PAGE // k.layout.leaf_table_span - 2 * k.arch.levels)
        if pages < EXHAUST_SINGLE_CALLS // 4:
            break
        start = k.call("vmm_alloc", pages, FLAGS, 0)
        assert start, f"vmm_alloc({pages}, eager) with {left} frames free"
        ranges.append((start, pages))
    left = _free_now(k)
    before = k.free_ranges()
    assert k.call("vmm_alloc", left + 1, FLAGS, 0) == 0, f"vmm_alloc({left + 1}, eager) with {left} frames free"
    kept = left - _free_now(k)
    if kept or k.free_ranges() != before:
        pytest.fail(f"after {k.stage}: vmm_alloc({left + 1}, eager) refused with {left} frames free, and kept "
                    f"{kept} frames; free ranges {_ranges(k.free_ranges())}, before {_ranges(before)}",
                    pytrace=False)
    for _ in range(EXHAUST_SINGLE_CALLS):
        frame = k.call("pmm_alloc")
        if not frame:
            break
        frames.append(frame)
        k.held.add(frame)
    else:
        pytest.skip(f"{EXHAUST_SINGLE_CALLS} frames taken one at a time and memory not exhausted yet")
    assert _free_now(k) == 0, "pmm_alloc returned 0 with frames free"
    assert k.call("kmalloc", 3 * PAGE) == 0, "kmalloc of whole pages succeeded with no free frame"
    assert k.call("vmm_alloc", 1, FLAGS, 0) == 0, "vmm_alloc(1, eager) succeeded with no free frame"
    # A page whose page table would need a frame: refused, nothing mapped (the frame stays the test's).
    slot = k.empty_user_slot()
    if slot is not None:
        vaddr = k.arch.canonical(slot << k.arch.shift(0))
        assert k.call("vmm_map", vaddr, frames[-1], FLAGS) == 0, \
            f"vmm_map({vaddr:#x}) succeeded with no frame for its page table"
    if "as_create" in k.elf.symbols:
        assert k.call("as_create") == 0, "as_create succeeded with no frame for its top-level table"
    if space:
        program = k.elf.symbols["user_hello"].value, k.elf.symbols["user_hello_end"].value
        assert k.call("user_load", space, *program) == 0, "user_load succeeded with no frame for the program's text"
    # One full check here: with every frame mapped the walk is the suite's largest (≈1 s on a 128 MiB guest).
    k.check(f"{len(ranges)} eager ranges and {len(frames)} frames taken, then kmalloc and vmm_alloc refused")
    mappings = k.walk(k.live.view())[0]
    handed = frames + [m.pstart + o for m in mappings for start, pages in ranges
                       if start <= m.vstart < start + pages * PAGE for o in range(0, m.size, PAGE)]
    state = k.pmm.state()
    bad = [f for f in handed if not state.in_ram(f) or state.in_reserved(f)]
    twice = len(handed) - len(set(handed))
    if bad or twice:
        pytest.fail(f"after {k.stage}: {len(bad)} frames handed out outside the memory map's ranges or inside a "
                    f"reserved interval (first: {[hex(f) for f in bad[:4]]}); {twice} handed out twice", pytrace=False)
    k.stage = "memory given back"
    for start, pages in ranges:
        assert k.call("vmm_free", start) == pages, f"vmm_free({start:#x}) did not free its {pages} pages"
    for frame in frames:
        k.free_frame(frame)
    k.check_released("every range and frame given back")
    block = k.call("kmalloc", 3 * PAGE)
    assert block, "kmalloc failed after memory was given back: the kernel did not recover"
    k.call("kfree", block)
    # Counts only: the full check just walked the free frames, every frame of RAM among them now.
    free = _free_now(k)
    assert free == k.start_free, f"{free} frames free after a block of the recovered heap came and went, " \
                                 f"{k.start_free} at the start"
    if space:
        assert k.call("as_destroy", space) == 1, f"as_destroy({space:#x}) refused"


def test_vmm_map_in_stops_at_the_user_half_edge(kernel):
    """vmm_map_in maps the first and the last page of the user half of an attached space, and refuses the first page
    past it (on x86_64 the non-canonical hole; on i386 the kernel base) and the first page of the kernel half:
    one page too far there and a space's map writes into the kernel half every space shares."""
    k = kernel
    if "as_create" not in k.elf.symbols:
        pytest.skip("this kernel has no address spaces")
    layout = k.layout
    k.begin("a space mapped at the edges of its user half")
    space = k.call("as_create")
    assert space and k.call("as_attach", space) == 1, "as_create/as_attach failed"
    edges = [0, layout.user_half_end - PAGE]
    frames = {v: k.alloc_frame() for v in edges}
    for vaddr, frame in frames.items():
        assert k.call("vmm_map_in", space, vaddr, frame, USER_FLAGS) == 1, f"vmm_map_in({vaddr:#x}) refused"
        k.held.discard(frame)
    for vaddr in (layout.user_half_end, layout.kernel_half_start):
        spare = k.alloc_frame()
        if k.call("vmm_map_in", space, vaddr, spare, USER_FLAGS) != 0:
            pytest.fail(f"after {k.stage}: vmm_map_in({vaddr:#x}) accepted a page past the user half "
                        f"(it ends at {layout.user_half_end:#x})", pytrace=False)
        k.free_frame(spare)
    walker = invariants.space_walker(k.live.view(), space)
    for vaddr, frame in frames.items():
        t = walker.translate(vaddr + OFFSET)
        if t is None or t.paddr != frame + OFFSET or not t.attrs & hw.PTE_US:
            pytest.fail(f"after {k.stage}: in space {space:#x}, {vaddr:#x} should map frame {frame:#x} for ring 3, "
                        f"the walker finds {t}", pytrace=False)
    problems = invariants.check_address_spaces(k.live.view(), idle=False)
    if problems:
        pytest.fail(f"after {k.stage}:\n" + "\n".join(f"  {p}" for p in failures(problems)), pytrace=False)
    k.call("as_detach")
    assert k.call("as_destroy", space) == 1, f"as_destroy({space:#x}) refused"
    k.check_released("the space destroyed, its frames with it")


USER_FLAGS = hw.PTE_P | hw.PTE_RW | hw.PTE_US


def test_every_routine_refuses_what_it_must(kernel):
    """The refusals every routine documents (templates/*.s, the line above each routine), each asked for once: a
    frame that is unaligned, outside RAM or the kernel's own; a page already mapped, or none there; a range outside
    the window, unaligned or released twice; an address that starts no allocation; a value that is no address space;
    the boot space destroyed; a foreign page with nothing attached or in the kernel half; a task id out of range or
    a task in no space; a temp-map slot when all are taken; a heap request of nothing or beyond the heap; and flag
    bits beyond an entry's dropped. A missing check leaks a frame, maps twice or edits the
    wrong space, so after each group the machine is checked, and at the end everything is as it was."""
    k = kernel
    layout = k.layout
    none = layout.vmm_none
    k.begin("asking every routine for what it must refuse")
    refused: list[str] = []

    def expect(routine: str, *args: int, want: int = 0, why: str) -> None:
        got = k.call(routine, *args)
        if got != want:
            refused.append(f"{routine}({', '.join(hex(a) for a in args)}) = {got:#x}, expected {want:#x}: {why}")

    frame = k.alloc_frame()
    expect("pmm_free", frame + 1, why="an unaligned frame")
    expect("pmm_free", layout.memory_bytes + 16 * PAGE, why="a frame beyond RAM")
    expect("pmm_free", layout.kernel_load_address, why="the kernel image's first frame")
    groups, reserved = k.leaf_spans()
    vaddr = groups[0][0]
    k.map(vaddr, frame)
    other = k.alloc_frame()
    expect("vmm_map", vaddr, other, FLAGS, why="a page already mapped")
    # An address inside the frame and flags beyond an entry's flag bits are the caller's mistakes: the address is
    # taken down to its frame, the extra bits dropped, neither or-ed into the other.
    stray = groups[0][1]
    expect("vmm_map", stray, other | 0x7FF, FLAGS | 0x5000, want=1, why="a frame's address with offset bits")
    k.mapped[stray] = other
    k.held.discard(other)
    k.check_page(stray, other)
    k.unmap(stray)
    expect("vmm_unmap", vaddr + PAGE, want=none, why="no page mapped there")
    expect("pmm_alloc_at", vaddr, FLAGS, why="a page already mapped")
    expect("pmm_free_at", vaddr + PAGE, why="no page mapped there")
    expect("vmm_protect", vaddr + PAGE, hw.PTE_P, why="no page mapped there (its table exists)")
    no_table = next((v for v in (g[0] for g in groups[1:]) if not k.call("paging_table_present", v)), None)
    if no_table is not None:
        expect("vmm_protect", no_table, hw.PTE_P, why="no page table there")
        expect("vmm_unmap", no_table, want=none, why="no page table there")
        expect("pmm_alloc_at", no_table, FLAGS, why="no page table there")
    k.check_page(vaddr, frame)
    k.check("pages refused: mapped twice, unmapped or protected where nothing is")
    if reserved:
        start, pages = reserved
        expect("vrange_release", start + 1, 1, why="an unaligned start")
        if any(free_start == start + pages * PAGE for free_start, _ in k.free_ranges()):
            expect("vrange_release", start + (pages - 1) * PAGE, 2, why="a range running into the free range after it")
        expect("vrange_release", layout.vmm_base - PAGE, 1, why="a page below the vmm window")
        expect("vrange_release", layout.vmm_base + layout.vmm_size, 1, why="a page past the vmm window")
    for free_start, _ in k.free_ranges()[-1:]:     # none when the stage's reservation took the whole window
        expect("vrange_release", free_start, 1, why="a range already free (released twice)")
    expect("vmm_free", vaddr, why="an address that starts no allocation")
    expect("vrange_reserve", 0, why="a range of no pages")
    for lazy in (1, 0):
        expect("vmm_alloc", layout.vmm_size // PAGE + 1, FLAGS, lazy, why="a range larger than the window")
    k.check("ranges refused")
    if "as_create" in k.elf.symbols:
        boot = k.call("as_current")
        expect("as_attach", other, why="a frame that is no address space")
        expect("as_switch", other, why="a frame that is no address space")
        expect("as_destroy", other, why="a frame that is no address space")
        expect("as_destroy", boot, why="the boot space (running)")
        elsewhere = k.call("as_create")
        assert elsewhere and k.call("as_switch", elsewhere) == 1, "as_create/as_switch failed"
        expect("as_destroy", boot, why="the boot space (not running)")
        expect("as_destroy", elsewhere, why="the running space")
        assert k.call("as_switch", boot) == 1 and k.call("as_destroy", elsewhere) == 1, "as_switch/as_destroy failed"
        expect("vmm_map_in", 0, 0, other, USER_FLAGS, why="nothing attached (space 0)")
        space = k.call("as_create")
        assert space and k.call("as_attach", space) == 1, "as_create/as_attach failed"
        expect("vmm_map_in", other, 0, other, USER_FLAGS, why="a space that is not the attached one")
        image = layout.kernel_virtual_start     # a kernel-half page every space maps (the kernel's first)
        expect("vmm_unmap_in", space, image, want=none, why="the kernel half")
        expect("vmm_translate_in", space, image, want=none, why="the kernel half")
        expect("vmm_unmap_in", space, 0, want=none, why="no page mapped there")
        expect("as_destroy", space, want=1, why="a live space, attached: destroyed and detached")
        attached = k.word("as_attached")
        if attached:
            refused.append(f"as_destroy of the attached space {space:#x} left as_attached = {attached:#x}")
        expect("as_attach", space, why="a space destroyed")
        k.must_fault(layout.foreign_level_window(0), "read", "the attached space was destroyed: the foreign slot "
                     "is empty")
        expect("as_current", want=boot, why="destroying another space leaves the running one")
        k.check("address spaces refused")
    if "task_create" in k.elf.symbols:
        expect("task_record", 0, why="task id 0 (ids start at 1)")
        expect("task_record", layout.task_max + 1, why=f"a task id past TASK_MAX {layout.task_max}")
        expect("task_create", other, layout.user_text_base, layout.user_lazy_window.end, why="no address space")
        expect("task_run", layout.task_max + 1, want=layout.task_killed_status, why="no such task")
    slots = [k.call("temp_map", frame) for _ in range(layout.tempmap_slots)]
    expect("temp_map", frame, why=f"all {layout.tempmap_slots} temp-map slots taken")
    for slot in reversed(slots):
        if slot:
            k.call("temp_unmap", slot)
    expect("kmalloc", 0, why="a request of no bytes")
    expect("kmalloc", layout.heap_slab_pages * PAGE + layout.vmm_size, why="a request beyond the heap")
    k.unmap(vaddr)
    k.free_frame(frame)
    k.free_frame(other)
    if reserved:
        assert k.call("vrange_release", *reserved) == 1, f"vrange_release{reserved} refused its own reservation"
    # Whole-page blocks (two pages each) until the table that records them is full: every slot to its last, then one
    # refused; where the vmm window has room for them all in one free range.
    slots = layout.heap_large_slots
    if max((pages for _, pages in k.free_ranges()), default=0) >= 2 * slots:
        large = [k.call("kmalloc", PAGE + 1) for _ in range(slots)]
        if all(large):
            expect("kmalloc", PAGE + 1, why=f"a whole-page block with all {slots} large-block slots taken")
        else:
            refused.append(f"kmalloc({PAGE + 1:#x}) failed after {large.index(0)} of {slots} large blocks, the "
                           "vmm window having room for them all")
        for block in filter(None, large):
            k.call("kfree", block)
    if refused:
        pytest.fail(f"after {k.stage}:\n" + "\n".join(f"  {line}" for line in refused), pytrace=False)
    k.check_released("every refusal asked, the stage's pages given back")


def _free_now(k) -> int:
    k.live.stop()
    return k.pmm.free_count()


def _boot_mmap(k) -> list[MemoryRegion]:
    """The Multiboot memory map as the boot code copied it (templates/bootinfo.s), entries of base, length, type."""
    k.live.stop()
    count = k.pmm.u32("boot_mmap_count")
    size = k.layout.boot_mmap_entry_size
    if count > k.layout.boot_mmap_max_entries:
        pytest.fail(f"boot_mmap_count = {count}: more than the {k.layout.boot_mmap_max_entries} entries boot_mmap "
                    "holds", pytrace=False)
    at = k.elf.symbols["boot_mmap"].value - k.layout.kernel_virtual_base
    data = k.live.machine.read_phys(at, count * size)
    return [MemoryRegion(int.from_bytes(data[i:i + 8], "little"), int.from_bytes(data[i + 8:i + 16], "little"),
                         int.from_bytes(data[i + 16:i + 20], "little")) for i in range(0, count * size, size)]


def _loader_mmap(k) -> list[MemoryRegion] | None:
    """The memory map as the loader handed it over, read from the Multiboot information itself (the kernel keeps
    it: its frames are reserved), or None when the loader gave none."""
    read = k.live.machine.read_phys
    mbi = k.pmm.u32("boot_mbi_phys")
    if not mbi or not int.from_bytes(read(mbi, 4), "little") & hw.MULTIBOOT_INFO_MMAP:
        return None
    length = int.from_bytes(read(mbi + hw.MULTIBOOT_INFO_MMAP_LENGTH, 4), "little")
    at = int.from_bytes(read(mbi + hw.MULTIBOOT_INFO_MMAP_ADDR, 4), "little")
    data, regions, offset = read(at, min(length, 64 * 1024)), [], 0
    while offset + 24 <= len(data):
        size = int.from_bytes(data[offset:offset + 4], "little")
        regions.append(MemoryRegion(int.from_bytes(data[offset + 4:offset + 12], "little"),
                                    int.from_bytes(data[offset + 12:offset + 20], "little"),
                                    int.from_bytes(data[offset + 20:offset + 24], "little")))
        offset += size + 4
    return regions


def _regions(regions) -> str:
    return ", ".join(f"{r.base:#x}+{r.length:#x} type {r.type}" for r in regions) or "none"


def _spans(spans) -> str:
    return ", ".join(f"[{lo:#x}, {hi:#x})" for lo, hi in spans) or "none"


# Ring-3 programs (templates/user/programs.s) the ring-3 stage runs, with the status task_run returns (None: killed by
# a fault, one report line) and whether it needs system calls (kvm_pvm delivers none from ring 3: docs/toolchain.md).
USER_PROGRAMS = (("user_hello", 0x33333333, True), ("user_bad_write", 1, True), ("user_touch_kernel", None, False),
                 ("user_write_text", None, False), ("user_cli", None, False), ("user_exec_data", None, False))
USER_FAULT = "kgen: user fault: task="
# The fault each faulting program makes, as its report must name it: the vector and the page-fault error's words
# (templates/task.s user_fault_bits). A read of the kernel and a write to the text hit present pages; a `cli` in
# ring 3 is a #GP.
USER_FAULT_CAUSES = {
    "user_touch_kernel": (hw.VECTOR_PAGE_FAULT, "protection read user"),
    "user_write_text": (hw.VECTOR_PAGE_FAULT, "protection write user"),
    "user_cli": (hw.VECTOR_GENERAL_PROTECTION, ""),
    "user_exec_data": (hw.VECTOR_PAGE_FAULT, "protection read user fetch"),
}


def _fault_said(report: str) -> tuple[int, str]:
    """(vector, the words after the error code) of one user-fault report line (what follows USER_FAULT)."""
    line = report.splitlines()[0]
    vector = int(line.split(" vector=", 1)[1].split()[0], 16)
    words = line.split(" error=", 1)[1].split()[1:]
    return vector, " ".join(words)


def test_ring_3_tasks_run_and_their_faults_are_contained(kernel):
    """Programs run in ring 3, each in a space of its own: one makes system calls and demand-pages its data (under
    TCG), one passes a kernel buffer to a system call (refused), others read the kernel, write their text, run a
    privileged instruction or (x86_64) fetch from NX data: each fault stops its task with one report line, its space
    destroyed with every frame, and the kernel goes on to the next."""
    k = kernel
    if "task_run" not in k.elf.symbols:
        pytest.skip("this kernel has no ring-3 tasks")
    k.begin("ring-3 tasks run one after another")
    layout, killed = k.layout, k.layout.task_killed_status
    syscalls = k.live.machine.accel != "kvm"
    programs = []
    for name, status, calls in USER_PROGRAMS:
        if name == "user_exec_data" and not k.arch.has_nx:
            status, calls = 7, True         # no NX (i386): it runs its data and exits by a system call
        if syscalls or not calls:
            programs.append((name, status))
    seen, wrong = len(_com1(k).split(USER_FAULT)), []
    for name, status in programs:
        task = _load_task(k, name)
        got = k.call("task_run", task)
        k.call("task_release", task)
        com1 = _com1(k)
        reports = com1.split(USER_FAULT)[seen:]
        seen += len(reports)
        want = killed if status is None else status
        if got != want or len(reports) != (status is None) or reports and int(reports[0].split()[0], 16) != task:
            wrong.append(f"{name} (task {task:#x}): task_run returned {got:#x}, expected {want:#x}; fault reports: "
                         f"{[USER_FAULT + r.splitlines()[0] for r in reports]}")
        elif reports and _fault_said(reports[0]) != USER_FAULT_CAUSES[name]:
            wrong.append(f"{name} (task {task:#x}): its fault report says vector {_fault_said(reports[0])[0]:#x}, "
                         f"cause {_fault_said(reports[0])[1]!r}; the fault is vector "
                         f"{USER_FAULT_CAUSES[name][0]:#x}, {USER_FAULT_CAUSES[name][1]!r}")
        if name == "user_hello" and com1.count(USER_GREETING) != 1:
            wrong.append(f"{name}: its system call wrote {com1.count(USER_GREETING)} greetings "
                         f"{USER_GREETING!r} on COM1, not one")
        k.check(f"{name} finished")
    # The whole scheduler: two tasks that fault (no system call, so under any accelerator), run by task_run_all.
    tasks = [_load_task(k, name) for name in ("user_touch_kernel", "user_cli")]
    ran = k.call("task_run_all")
    states = [k.word("task_table", (task - 1) * layout.task_record_words) for task in tasks]
    for task in tasks:
        k.call("task_release", task)
    if ran != len(tasks):
        wrong.append(f"task_run_all ran {ran} tasks with {len(tasks)} ready")
    if any(state == layout.task_ready for state in states):
        wrong.append(f"task_run_all returned with tasks {tasks} in states {states}: some still ready")
    # Back in the kernel after ring 3: its own selectors in every segment register it loads (i386: all of them).
    regs = k.live.view().regs
    selectors = {"cs": layout.kernel_cs, "ss": layout.kernel_ds}
    if not k.arch.long_mode:
        selectors |= {name: layout.kernel_ds for name in ("ds", "es", "fs", "gs")}
    wrong += [f"after the tasks the kernel runs with {name} = {getattr(regs, name):#x}, not {want:#x}"
              for name, want in selectors.items() if getattr(regs, name) != want]
    # The buffer check of the write system call, called by the kernel itself (the boot space has no user page).
    for buf, length in ((layout.user_text_base, 0x10), (layout.user_half_end - 8, 0x10),
                        (PAGE, (1 << 8 * k.arch.word_size) - PAGE // 2)):
        got = k.call("user_write", buf, length)
        if got != (1 << 8 * k.arch.word_size) - 1:
            wrong.append(f"user_write({buf:#x}, {length:#x}) in the boot space returned {got:#x}, not -1: a buffer "
                         "that is not all mapped user pages")
    if wrong:
        pytest.fail(f"after {k.stage}:\n" + "\n".join(f"  {w}" for w in wrong), pytrace=False)
    k.check_released("every task finished, its space destroyed")


USER_GREETING = "hello from ring 3\n"


def _load_task(k, name: str) -> int:
    """A ready task running program `name` (templates/user/programs.s) in a new space. Its text must be the
    program's bytes, read-only for ring 3 and zero to the end of the page: nothing of the kernel beyond the program
    copied out to user mode."""
    layout = k.layout
    space = k.call("as_create")
    start, end = k.elf.symbols[name].value, k.elf.symbols[name + "_end"].value
    entry = k.call("user_load", space, start, end)
    task = k.call("task_create", space, entry, layout.user_lazy_window.end)
    assert space and entry == layout.user_text_base and task, f"{name}: as_create, user_load or task_create failed"
    walker = invariants.space_walker(k.live.view(), space)
    want = k.live.machine.read_phys(start - layout.kernel_virtual_base, end - start)
    size = -(-len(want) // PAGE) * PAGE
    want += bytes(size - len(want))
    for offset in range(0, size, PAGE):
        t = walker.translate(layout.user_text_base + offset)
        if t is None or not t.attrs & hw.PTE_US or t.attrs & hw.PTE_RW:
            pytest.fail(f"after {k.stage}: {name}'s text page {layout.user_text_base + offset:#x} in space "
                        f"{space:#x}: {t}, not read-only for ring 3", pytrace=False)
        got = k.live.machine.read_phys(t.paddr, PAGE)
        if got != want[offset:offset + PAGE]:
            at = next(i for i in range(PAGE) if got[i] != want[offset + i])
            pytest.fail(f"after {k.stage}: {name}'s text in space {space:#x} differs from the program at offset "
                        f"{offset + at:#x} ({got[at]:#04x}, the program {want[offset + at]:#04x}; past its "
                        f"{end - start} bytes the page must be zero)", pytrace=False)
    return task


def _com1(k) -> str:
    """COM1 up to now: the kernel prints a line the harness waits for, so nothing printed before is in transit."""
    k.call("serial_puts", k.elf.symbols["str_serving"].value)
    return k.live.machine.wait_for(protocol.SERVING + "\n", 10.0)
