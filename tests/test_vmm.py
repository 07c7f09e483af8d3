"""The VMM on a running kernel (poisoned RAM): mappings seen by the walker, by QEMU and by the CPU; page tables
made on demand, clean and given back; lazy ranges backed on first touch; faults outside any range reported;
the range allocator against a model; no frame lost."""
import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kgen import hw
from kgen.build import build
from kgen.calls import CallError
from kgen.config import Config
from kgen.pagewalk import Walker
from kgen.session import KernelSession

from conftest import POISON

pytestmark = [pytest.mark.vm, pytest.mark.skipif(shutil.which("qemu-system-i386") is None,
                                                  reason="qemu-system-i386 not installed")]
POISON_WORD = bytes([POISON]) * 4
FLAGS = hw.PTE_P | hw.PTE_RW


def walker(s) -> Walker:
    s.machine.stop()
    try:
        cr3 = s.machine.registers().cr3 & hw.PTE_FRAME_MASK
        return Walker(s.machine.read_phys, cr3, recursive_slot=s.layout.recursive_slot)
    finally:
        s.machine.cont()


def table_frames(s) -> dict[int, int]:
    """PD index -> page-table frame, for every table the walker finds."""
    return {path[0]: phys for path, phys in walker(s).page_tables()}


def poisoned_tables(s) -> list[str]:
    """Every present page table whose entries still hold the poison pattern: a table nobody cleared."""
    bad = []
    for path, phys in walker(s).page_tables():
        data = s.machine.read_phys(phys, hw.PAGE_SIZE)
        words = [data[i:i + 4] for i in range(0, hw.PAGE_SIZE, 4)]
        if POISON_WORD in words:
            bad.append(f"page table PD[{path[0]}] at {phys:#x} holds {POISON_WORD.hex()} at entry "
                       f"{words.index(POISON_WORD)}")
    return bad


def unused_addresses(s, count: int) -> list[int]:
    """Pages in the vmm window, each in a 4 MiB region with no page table yet, so mapping one must grow a table."""
    tables = table_frames(s)
    first, last = s.layout.vmm_base >> 22, (s.layout.vmm_window.end - 1) >> 22
    found = [(pde << 22) + 5 * hw.PAGE_SIZE for pde in range(first, last + 1) if pde not in tables][:count]
    if len(found) < count:
        pytest.fail(f"fewer than {count} page-table-less 4 MiB regions in the vmm window")
    return found


def unused_address(s) -> int:
    return unused_addresses(s, 1)[0]


def test_mapping_is_visible_to_walker_qemu_and_cpu(session):
    s = session
    frame = s.call("pmm_alloc")
    v = unused_address(s)
    assert s.call("vmm_map", v, frame, FLAGS) == 1
    s.machine.write_phys(frame + 0x10, (0x1234ABCD).to_bytes(4, "little"))
    t = walker(s).translate(v + 0x10)
    assert t is not None and t.paddr == frame + 0x10 and t.attrs & hw.PTE_RW and not t.attrs & hw.PTE_US
    assert t.attrs & hw.PTE_G, "a kernel-half page is global"
    assert s.machine.gva2gpa(v + 0x10) == frame + 0x10
    assert s.call("kmem_read32", v + 0x10) == 0x1234ABCD
    assert s.call("vmm_translate", v + 0x10) == frame + 0x10

    assert s.call("vmm_unmap", v) == frame
    assert walker(s).translate(v) is None
    assert s.machine.gva2gpa(v) is None
    assert s.call("vmm_translate", v) == s.layout.vmm_none
    with pytest.raises(CallError, match=f"CR2={v:#010x}"):
        s.call("kmem_read32", v)


def test_mapping_twice_is_refused(session):
    s = session
    frame = s.call("pmm_alloc")
    v = unused_address(s)
    assert s.call("vmm_map", v, frame, FLAGS) == 1
    assert s.call("vmm_map", v, frame, FLAGS) == 0
    s.machine.wait_for(f"vmm_map: already mapped at {v:#010x}", 5)


def test_tables_made_on_demand_are_clean_and_given_back(session):
    s = session
    frame = s.call("pmm_alloc")
    v = unused_address(s)
    pde = v >> 22
    assert pde not in table_frames(s)
    assert s.call("vmm_map", v, frame, FLAGS) == 1
    tables = table_frames(s)
    assert pde in tables, "vmm_map made no page table"
    assert poisoned_tables(s) == []
    table = tables[pde]
    assert s.call("vmm_unmap", v) == frame
    assert pde not in table_frames(s), "an empty page table stayed in the PD"
    assert s.variable("pmm_top") == table, "the empty table's frame went back onto the free stack"


def test_touching_3_of_100_lazy_pages_takes_3_frames(session):
    s = session
    before_free = s.call("pmm_stats_free")
    tables_before = table_frames(s)
    start = s.call("vmm_alloc", 100, FLAGS, 1)
    assert s.layout.vmm_base <= start < s.layout.vmm_window.end
    assert s.call("pmm_stats_free") == before_free, "a lazy allocation took frames up front"
    for page in (0, 41, 99):
        s.call("kmem_write32", start + page * hw.PAGE_SIZE + 8, page)
    new_tables = len(table_frames(s)) - len(tables_before)
    assert before_free - s.call("pmm_stats_free") == 3 + new_tables
    assert s.variable("vmm_demand_faults") == 3
    mapped = [m for m in walker(s).mappings() if start <= m.vstart < start + 100 * hw.PAGE_SIZE]
    assert sum(m.size for m in mapped) == 3 * hw.PAGE_SIZE
    for page in (0, 41, 99):
        assert s.call("kmem_read32", start + page * hw.PAGE_SIZE + 8) == page
        assert s.call("kmem_read32", start + page * hw.PAGE_SIZE) == 0, "a demand-paged frame must be cleared"
    assert poisoned_tables(s) == []


@pytest.mark.parametrize("write, words", [(False, "not-present read supervisor"),
                                          (True, "not-present write supervisor")])
def test_fault_outside_any_range_is_reported(session, write, words):
    s = session
    v = unused_address(s) + 0x123
    routine = s.elf.symbols["kmem_write32" if write else "kmem_read32"]
    with pytest.raises(CallError) as info:
        s.call(routine.name, v, 1) if write else s.call(routine.name, v)
    message = str(info.value)
    assert f"CR2={v:#010x}" in message and f"<{routine.name}+" in message
    assert ("write" if write else "read") in message
    assert f"kgen: page fault: {words}" in s.machine.serial
    assert s.machine.wait_exit(5) == s.layout.failure_status


def test_no_frame_lost_after_everything_is_unmapped(session):
    s = session
    start_free = s.call("pmm_stats_free")
    eager = [s.call("vmm_alloc", n, FLAGS, 0) for n in (1, 7, 1030)]
    assert all(eager)
    lazy = s.call("vmm_alloc", 300, FLAGS, 1)
    for page in range(0, 300, 37):
        s.call("kmem_write32", lazy + page * hw.PAGE_SIZE, page)
    frames = [s.call("pmm_alloc") for _ in range(3)]
    low = unused_addresses(s, 2)
    for v, f in zip(low, frames):
        assert s.call("vmm_map", v, f, FLAGS) == 1
    assert s.call("pmm_stats_free") < start_free
    for v, f in zip(low, frames):
        assert s.call("vmm_unmap", v) == f
    for f in frames:
        assert s.call("pmm_free", f) == 1
    for a in eager + [lazy]:
        assert s.call("vmm_free", a) > 0
    assert s.call("pmm_stats_free") == start_free
    assert s.variable("vmm_free_range_count") == 1


def free_ranges(s) -> list[tuple[int, int]]:
    """The free array: (start, pages) pairs of words; the count is a dword."""
    base, word = s.symbol("vmm_free_ranges"), s.layout.architecture.word_size
    count = s.read_u32(s.symbol("vmm_free_range_count"))
    return [(s.read_word(base + 2 * word * i), s.read_word(base + 2 * word * i + word)) for i in range(count)]


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 64), st.integers(0, 1000)), min_size=1, max_size=60))
def test_random_reserve_release_never_overlap_and_merge_back(default_build, ops):
    layout = default_build.kernel.layout
    with KernelSession(default_build.elf, layout) as s:
        initial = free_ranges(s)          # the heap has reserved its slab window by now
        assert len(initial) == 1
        live: dict[int, int] = {}
        for reserve, pages, pick in ops:
            if reserve or not live:
                start = s.call("vrange_reserve", pages)
                assert start, "the window has room for every request here"
                end = start + pages * hw.PAGE_SIZE
                assert layout.vmm_base <= start and end <= layout.vmm_window.end
                for other, n in live.items():
                    assert end <= other or other + n * hw.PAGE_SIZE <= start, "two live ranges overlap"
                live[start] = pages
            else:
                start = sorted(live)[pick % len(live)]
                assert s.call("vrange_release", start, live.pop(start)) == 1
            ranges = free_ranges(s)
            assert ranges == sorted(ranges)
            for (a, n), (b, _) in zip(ranges, ranges[1:]):
                assert a + n * hw.PAGE_SIZE < b, "free ranges that touch must have been merged"
        for start in sorted(live, reverse=True):
            assert s.call("vrange_release", start, live.pop(start)) == 1
        assert free_ranges(s) == initial


def test_double_release_and_release_never_reserved_are_refused(session):
    s = session
    start = s.call("vrange_reserve", 4)
    assert s.call("vrange_release", start, 4) == 1
    assert s.call("vrange_release", start, 4) == 0
    free_start, _ = free_ranges(s)[0]
    assert s.call("vrange_release", free_start + 0x100000, 2) == 0
    for _ in range(2):     # COM1 is read by a thread: wait for the lines rather than assume they arrived
        s.machine.wait_for("vrange_release: overlaps a free range", 5)
    assert s.call("vmm_free", s.layout.vmm_base + 0x5000) == 0
    s.machine.wait_for("vmm_free: not the start of an allocation", 5)


def test_unzeroed_page_table_variant_is_caught(tmp_path):
    """The check that keeps the real kernel green turns red on a kernel that forgets to clear new tables."""
    variant = build(Config(vmm_skip_table_clear=True), tmp_path, iso=False)
    with KernelSession(variant.elf, variant.kernel.layout, poison=POISON) as s:
        s.call("vmm_map", unused_address(s), s.call("pmm_alloc"), FLAGS)   # may be refused: poison looks present
        assert poisoned_tables(s), "poisoned RAM should show the table was never cleared"
