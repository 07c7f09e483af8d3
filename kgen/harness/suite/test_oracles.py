"""The page walker against two other judges on the running kernel: QEMU's own translation (`gva2gpa`, and
`info tlb`, its walk from CR3) and the CPU itself (a guest read through a virtual address returns what the walker
says lies at the physical address), under TCG and, where the KVM probe says it can run the kernel, under KVM.
Translations are compared at every offset class (each offset bit alone, the last byte, seeded draws), in 4 KiB pages
and in large ones: a foreign kernel's own, and on kgen's kernel (which maps none) pages of every size the paging
mode has, planted by hand.

The ranges below a malformed entry (reserved bits set, a table outside RAM: `Walker.malformed`) are left out of the
comparison with QEMU's monitor: its debug walk (`gva2gpa`, `info tlb`) does not check reserved bits, so it reads on
where the CPU raises a reserved-bit page fault. Those entries are check_entries_well_formed's finding; the oracles
judge the rest of the tables."""
import random
import re

import pytest

from kgen.arch import hw
from kgen.build.layout import FOUR_GIB
from kgen.guest.invariants import NotApplicable, mapped_pages
from kgen.guest.pagewalk import WalkError
from kgen.harness.pytest_plugin import kgen_boot, skip_kgen_only

# A sub-page offset, so a translation that drops or garbles the low bits shows.
OFFSET = 0x124
# info tlb, one line per page: "00000000c0100000: 0000000000100000 -G--A----", flags XGPDACTUW.
TLB_LINE = re.compile(r"^([0-9a-f]+): ([0-9a-f]+) ([-X][-G][-P][-D][-A][-C][-T][-U][-W])$", re.MULTILINE)
TLB_FLAGS = (hw.PTE_G, hw.PTE_PS, hw.PTE_D, hw.PTE_A, hw.PTE_PCD, hw.PTE_PWT, hw.PTE_US, hw.PTE_RW)
TEMP_MAP_FRAMES = 8
# Translations at every offset class: each page of the sample is translated at offset 0, its last byte, each offset
# bit alone (4 KiB: 0x1..0x800; a 2 MiB page up to bit 20...) and OFFSET_DRAWS offsets drawn at random. The sample is
# every large page and OFFSET_PAGES of the 4 KiB ones, drawn by a generator seeded with OFFSET_SEED: the same pages
# on every run of one kernel, so the verdict does not change from run to run.
OFFSET_PAGES = 24
OFFSET_DRAWS = 4
OFFSET_SEED = 24


def walker_of(view):
    """The view's walker; skipped with paging off, failed in one line on a top-level table it cannot read (the
    invariant checks name it too)."""
    try:
        return view.need_walker()
    except NotApplicable as why:
        skipped = str(why)
    except WalkError as err:
        unwalkable(err)
    pytest.skip(skipped)


def unwalkable(err: WalkError):
    """Fail in one line; a fresh exception, so pytest shows no chain from the WalkError being handled."""
    raise pytest.fail.Exception(f"the page tables cannot be walked, so there is nothing to compare: {err}",
                                pytrace=False) from None


def every_page(view) -> dict[int, object]:
    """vaddr -> Translation for every mapped page (a large page once), the recursive window's pages included."""
    walker = walker_of(view)
    pages = {}
    for m in walker.mappings():
        pages.update(mapped_pages(walker, m.vstart, m.vstart + m.size))
    # Through a recursive slot, each present entry above the last level shows what it points at as one page: the
    # top table at the address whose indices all equal the slot, whatever the entry at indices (i0, .. ik) points
    # at (a table, or a large page's first 4 KiB) at (slot, .., slot, i0, .., ik). Walking the window page by page
    # would take 2**27 steps on x86_64.
    mode = walker.mode
    paths = [()]
    for path, frame in [((), walker.top)] + walker.page_tables():
        if len(path) < mode.levels - 1:
            size = mode.entry_size
            data = view.read_phys(frame, size << mode.index_bits[len(path)])
            paths += [path + (i,) for i in range(len(data) // size)
                      if int.from_bytes(data[i * size:(i + 1) * size], "little") & hw.PTE_P]
    for window in walker.recursive_windows():
        for path in paths:
            indices = (window.slot,) * (mode.levels - len(path)) + path
            vaddr = mode.sign_extend(sum(i << mode.shift(level) for level, i in enumerate(indices)))
            t = walker.translate(vaddr)
            if t is not None:
                pages[vaddr] = t
    return pages


def unmapped_samples(view, pages) -> list[int]:
    """The page on either side of every mapped range, where nothing is mapped, and the start of every sixteenth of
    the address space (256 MiB on i386); none below a malformed entry (QEMU's debug walk reads on there)."""
    walker = walker_of(view)
    mode = walker.mode
    space = 1 << mode.va_bits
    candidates = {0, *range(0, space, space >> 4)}
    for vaddr, t in pages.items():
        candidates |= {(vaddr - hw.PAGE_SIZE) % space, (vaddr + t.size) % space}
    return sorted({v for v in map(mode.sign_extend, candidates)
                   if walker.translate(v) is None and walker.malformed_at(v) is None})


def test_walker_agrees_with_qemu_gva2gpa(kgen_idle):
    view = kgen_idle.view()
    try:
        pages = every_page(view)
    except WalkError as err:
        unwalkable(err)
    assert pages, "the walker found no mapped page at all"
    wrong = []
    for vaddr, t in pages.items():
        qemu = kgen_idle.machine.gva2gpa(vaddr + OFFSET)
        if qemu != t.paddr + OFFSET:
            wrong.append(f"{view.page(vaddr + OFFSET)}: walker {t.paddr + OFFSET:#x} via {t.path}, QEMU {qemu}")
    for vaddr in unmapped_samples(view, pages):
        qemu = kgen_idle.machine.gva2gpa(vaddr)
        if qemu is not None:
            wrong.append(f"{vaddr:#010x}: walker says unmapped, QEMU translates it to {qemu:#x}")
    assert not wrong, "\n".join(wrong)


def offset_classes(size: int, rng: random.Random) -> list[int]:
    """Offsets into a page of `size` bytes that tell a translation which keeps every offset bit from one that drops
    some or mixes them into the frame."""
    bits = size.bit_length() - 1
    return sorted({0, size - 1, *(1 << b for b in range(bits)), *(rng.randrange(size) for _ in range(OFFSET_DRAWS))})


def offset_sample(pages: dict[int, object]) -> list[int]:
    """The virtual addresses the offset test translates: every large page and a seeded draw of the 4 KiB ones, each
    at its offset classes."""
    rng = random.Random(OFFSET_SEED)
    small = sorted(v for v, t in pages.items() if t.size == hw.PAGE_SIZE)
    chosen = sorted(v for v, t in pages.items() if t.size > hw.PAGE_SIZE)
    chosen += rng.sample(small, min(OFFSET_PAGES, len(small)))
    return [vaddr + offset for vaddr in chosen for offset in offset_classes(pages[vaddr].size, rng)]


def test_walker_agrees_with_qemu_at_every_offset(kgen_idle):
    """The walker translates an address *with* its page offset (not a page, then the offset added): it must agree
    with QEMU at every offset bit of 4 KiB and of large pages, where the frame's low bits and the offset's meet."""
    view = kgen_idle.view()
    try:
        pages = every_page(view)
    except WalkError as err:
        unwalkable(err)
    walker = walker_of(view)
    wrong = []
    for vaddr in offset_sample(pages):
        t = walker.translate(vaddr)
        ours = None if t is None else t.paddr
        qemu = kgen_idle.machine.gva2gpa(vaddr)
        if ours != qemu:
            wrong.append(f"{vaddr:#x}: walker {'unmapped' if ours is None else hex(ours)}"
                         f"{f' via {t.path}' if t else ''}, QEMU {'unmapped' if qemu is None else hex(qemu)}")
    assert not wrong, f"{len(wrong)} translations differ:\n" + "\n".join(wrong[:20])


def plant_large_pages(live) -> list[tuple[int, int, int]]:
    """(vaddr, size, paddr) of a 4 KiB page kgen's kernel maps in an empty top-level slot of the user half, and of a
    large page of every size the paging mode has (4 MiB on i386; 2 MiB and 1 GiB on x86_64) written by hand into the
    entry after that page's at the large page's level: kgen's kernel maps no large page of its own. A large page's
    frame is twice its size, with the PAT bit (12) set, which a translation must not take for an address bit."""
    layout = live.kernel.layout
    arch = layout.arch
    view = live.view()
    first_kernel = (layout.kernel_half_start & arch.va_mask) >> arch.shift(0)
    free = [i for i in range(1, first_kernel - 1)
            if not any(view.entry(view.walker.top, j) & hw.PTE_P for j in (i, i + 1))
            and not any(r.start < arch.canonical((i + 2) << arch.shift(0)) and arch.canonical(i << arch.shift(0)) < r.end
                        for r in layout.regions())]
    if not free:
        pytest.skip("the user half has no two empty top-level slots side by side")
    vaddr = arch.canonical(free[len(free) // 2] << arch.shift(0))
    frame = live.call("pmm_alloc")
    assert frame and live.call("vmm_map", vaddr, frame, hw.PTE_P | hw.PTE_RW) == 1, f"vmm_map({vaddr:#x}) refused"
    chain = live.view().walker.translate(vaddr).chain
    planted = [(vaddr, hw.PAGE_SIZE, frame)]
    for level in sorted(arch.paging.large_levels):
        span = 1 << arch.shift(level)
        large = arch.canonical(((vaddr & arch.va_mask) >> arch.shift(level)) + 1 << arch.shift(level))
        phys = 2 * span
        live.write_phys(chain[level].addr + arch.entry_size,
                        (phys | hw.PTE_P | hw.PTE_RW | hw.PTE_PS | hw.PAGE_SIZE).to_bytes(arch.entry_size, "little"))
        planted.append((large, span, phys))
    return planted


def test_walker_qemu_and_cpu_agree_in_large_pages(kgen_machine):
    """Large pages on kgen's kernel (planted by hand, plant_large_pages), at every offset class: the walker and the
    kernel's own vmm_translate against QEMU, and against the CPU (a read through the page) where the page's frame is
    guest RAM."""
    if kgen_machine.channel is None:
        pytest.skip("planting pages in tables the kernel made needs kgen's call channel")
    live = kgen_machine
    planted = plant_large_pages(live)
    rng = random.Random(OFFSET_SEED)
    wrong = []
    for vaddr, size, paddr in planted:
        offsets = offset_classes(size, rng)
        walker = live.view().walker
        for offset in offsets:
            t = walker.translate(vaddr + offset)
            ours = None if t is None else t.paddr
            qemu = live.machine.gva2gpa(vaddr + offset)
            if (ours, qemu) != (paddr + offset,) * 2:
                wrong.append(f"{size:#x}-byte page {vaddr:#x} + {offset:#x}: walker "
                             f"{'unmapped' if ours is None else hex(ours)}, QEMU "
                             f"{'unmapped' if qemu is None else hex(qemu)}, planted at {paddr + offset:#x}")
            kernels = live.call("vmm_translate", vaddr + offset)    # the kernel's own walk (templates/paging.s)
            if kernels != paddr + offset:
                wrong.append(f"{size:#x}-byte page {vaddr:#x} + {offset:#x}: the kernel's vmm_translate gives "
                             f"{kernels:#x}, planted at {paddr + offset:#x}")
        if paddr + size > live.kernel.layout.memory_bytes:
            continue        # not guest RAM: the CPU would read nothing there
        for offset in sorted({o & ~3 for o in offsets}):
            marker = 0x0FF5E700 ^ offset
            live.write_phys(paddr + offset, marker.to_bytes(4, "little"))
            got = live.call("peek32", vaddr + offset)
            if got != marker:
                wrong.append(f"{size:#x}-byte page {vaddr:#x} + {offset:#x}: the CPU read {got:#010x}, "
                             f"{paddr + offset:#x} holds {marker:#010x}")
    assert not wrong, f"{len(wrong)} translations differ:\n" + "\n".join(wrong[:20])


def test_walker_agrees_with_qemu_info_tlb(kgen_idle):
    view = kgen_idle.view()
    try:
        pages = every_page(view)
    except WalkError as err:
        unwalkable(err)
    # Bit 7 of a 4 KiB page's entry is PAT, not PS; info tlb masks it. It is set where the recursive slot shows a
    # 4 MiB PDE as a page.
    ours = {vaddr: (t.paddr, t.entry & sum(TLB_FLAGS) & ~(hw.PTE_PS if t.size == hw.PAGE_SIZE else 0))
            for vaddr, t in pages.items()}
    walker = walker_of(view)
    theirs = {}
    for vaddr, paddr, flags in TLB_LINE.findall(kgen_idle.machine.info_tlb()):
        if walker.malformed_at(walker.mode.sign_extend(int(vaddr, 16))) is not None:
            continue        # QEMU's monitor walked on below an entry the CPU refuses
        bits = sum(bit for bit, flag in zip(TLB_FLAGS, flags[1:]) if flag != "-")
        theirs[int(vaddr, 16)] = (int(paddr, 16), bits)
    assert theirs, "info tlb listed no pages"
    differ = [f"{view.page(v)}: walker {_show(ours.get(v))}, info tlb {_show(theirs.get(v))}"
              for v in sorted(ours.keys() | theirs.keys()) if ours.get(v) != theirs.get(v)]
    assert not differ, "\n".join(differ)


def _show(page) -> str:
    if page is None:
        return "unmapped"
    paddr, bits = page
    return f"{paddr:#x} entry bits {bits:#x}"


@pytest.fixture(params=["tcg", "kvm"])
def cpu(request, kgen_kernel):
    """A kgen kernel serving calls, under each accelerator; KVM only where the probe boot showed it works."""
    if kgen_kernel.layout is None:     # the CPU oracle calls kernel routines
        skip_kgen_only(kgen_kernel)
    if request.param == "kvm":
        usable, why = request.getfixturevalue("kgen_kvm")
        if not usable:
            pytest.skip(f"KVM cannot run this kernel here: {why}")
    with kgen_boot(kgen_kernel, request.param) as live:
        yield live


def test_cpu_reads_what_the_walker_predicts(cpu):
    view = cpu.view()
    targets = [(vaddr + OFFSET, t.paddr + OFFSET) for vaddr, t in every_page(view).items()]
    wrong = []
    for vaddr, paddr in targets:
        before = _phys32(cpu, paddr)
        got = cpu.call("peek32", vaddr)
        after = _phys32(cpu, paddr)
        # The call machinery itself writes a few kernel variables; the CPU saw one of the two states.
        if got not in (before, after):
            wrong.append(f"{view.page(vaddr)}: the CPU read {got:#010x}, physical {paddr:#x} holds {before:#010x}")
    assert not wrong, "\n".join(wrong)


def test_cpu_reads_through_a_fresh_temp_map(cpu):
    """Frames mapped one after another into the same slot: each read must see its own frame (INVLPG done)."""
    if "temp_map" not in cpu.kernel.elf.symbols:
        pytest.skip("this kernel has no temp-map routines (the x86_64 kernel gets them with its memory units)")
    layout = cpu.kernel.layout
    frames = frames_across_ram(cpu.machine.ram_windows, layout.kernel_load_address + layout.kernel_max_size,
                               FOUR_GIB if layout.arch.clips_ram_at_4g else None)
    saved = {f: cpu.machine.read_phys(f + OFFSET, 4) for f in frames}
    for i, frame in enumerate(frames):
        cpu.write_phys(frame + OFFSET, (0x7E57_0000 + i).to_bytes(4, "little"))
    try:
        for i, frame in enumerate(frames):
            slot = cpu.call("temp_map", frame)
            assert slot, f"temp_map({frame:#x}) found no free slot"
            got = cpu.call("peek32", slot + OFFSET)
            cpu.call("temp_unmap", slot)
            assert got == 0x7E57_0000 + i, (f"frame {frame:#x} through temp-map slot {slot:#x}: the CPU read "
                                            f"{got:#010x}, expected {0x7E57_0000 + i:#010x}")
    finally:
        for frame, data in saved.items():
            cpu.write_phys(frame + OFFSET, data)


def frames_across_ram(windows, lowest: int, limit: int | None) -> list[int]:
    """TEMP_MAP_FRAMES frames spread evenly over the guest's RAM at or above `lowest` (and below `limit`, for a
    kernel that reaches no higher), plus the first and last frame of each stretch: where QEMU put the RAM
    (`Machine.ram_windows`), not [0, memory size), which with more than 3.5 GiB has the PCI hole in it and RAM
    above 4 GiB."""
    stretches = []
    for w in windows:
        lo = max(w.start, lowest) + hw.PAGE_SIZE - 1 & ~(hw.PAGE_SIZE - 1)
        hi = min(w.end, limit or w.end) & ~(hw.PAGE_SIZE - 1)
        if lo < hi:
            stretches.append((lo, hi))
    pages = sum(hi - lo for lo, hi in stretches) // hw.PAGE_SIZE
    assert pages, f"no RAM at or above {lowest:#x} in the guest's RAM windows {windows}"
    wanted = {i * (pages - 1) // max(TEMP_MAP_FRAMES - 1, 1) for i in range(TEMP_MAP_FRAMES)}
    frames, before = set(), 0
    for lo, hi in stretches:
        n = (hi - lo) // hw.PAGE_SIZE
        frames |= {lo, hi - hw.PAGE_SIZE}
        frames |= {lo + (i - before) * hw.PAGE_SIZE for i in wanted if before <= i < before + n}
        before += n
    return sorted(frames)


def _phys32(live, paddr: int) -> int:
    return int.from_bytes(live.machine.read_phys(paddr, 4), "little")
