"""The VMM on a running kernel (poisoned RAM), on the i386 and the x86_64 kernel alike (ids [i386] / [x86_64]):
mappings seen by the walker, by QEMU and by the CPU; page tables of every level made on demand, clean, visible at
their own recursive-window address and given back; large pages translated; lazy ranges backed on first touch; faults
outside any range reported; NX where the architecture has it; the range allocator and the whole VMM against models;
no frame lost. Sizes, spans, entry widths and levels come from the layout and the architecture record.

A KVM subset (x86_64: this host's kvm_pvm runs long mode, not 32-bit paging) repeats the model run, the frame
accounting and the every-level create/free check; it is skipped with the probe's reason where KVM cannot run it.
"""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kgen.arch import hw
from kgen.guest.calls import CallError
from kgen.build.config import Config
from kgen.guest.diagnose import find_exception
from kgen.guest.pagewalk import Walker, WalkError
from kgen.guest.pmmview import PmmView

from conftest import KVM_ONLY, POISON, X86_64_ONLY, DrivenModel, op_lists, open_session, run_model, shared_build, walker

pytestmark = [pytest.mark.vm]
FLAGS = hw.PTE_P | hw.PTE_RW


# ---- reading the tables ----------------------------------------------------------------------------------------
def hexword(s, value: int) -> str:
    """A word as serial_puthex prints it: all of its digits (8 on i386, 16 on x86_64)."""
    return f"0x{value:0{2 * s.word_size}x}"


def index(layout, vaddr: int, level: int) -> int:
    arch = layout.arch
    return (vaddr & arch.va_mask) >> arch.shift(level) & (arch.entries_per_table - 1)


def table_path(layout, vaddr: int, level: int) -> tuple[int, ...]:
    """The index path (as Walker.page_tables names tables) of the level-`level` table on vaddr's walk (1 = the
    table below the top one): vaddr's indices at the levels above it."""
    return tuple(index(layout, vaddr, lv) for lv in range(level))


def paths_of(layout, vaddr: int) -> list[tuple[int, ...]]:
    """Every table below the top one that vaddr's walk goes through, top down (the last is its page table)."""
    return [table_path(layout, vaddr, level) for level in range(1, layout.arch.levels)]


def tables(s, w: Walker | None = None) -> dict[tuple[int, ...], int]:
    """Index path -> frame of every table below the top one."""
    return dict((w or walker(s)).page_tables())


def describe_path(layout, path: tuple[int, ...]) -> str:
    names = layout.arch.paging.level_names
    return " → ".join(f"{names[level]}[{i}]" for level, i in enumerate(path)) + f" → {names[len(path)]}"


def entries(s, frame: int) -> list[int]:
    size = s.layout.arch.entry_size
    data = s.machine.read_phys(frame, hw.PAGE_SIZE)
    return [int.from_bytes(data[i:i + size], "little") for i in range(0, hw.PAGE_SIZE, size)]


def poisoned_tables(s) -> list[str]:
    """Every table holding the poison pattern in one of its entries: a table nobody cleared. A poisoned entry of a
    table above the last level reads as present with reserved bits (0xA5 has P and PS), so the walk skips
    what is below it: that is reported too, with the entry's value."""
    size = s.layout.arch.entry_size
    poison = int.from_bytes(bytes([POISON]) * size, "little")
    try:
        w = walker(s)
        found = w.page_tables()
    except WalkError as err:
        return [f"the walk cannot go on: {err}"]
    bad = [f"the walk cannot go on below: {m}" for m in w.malformed()]
    for path, frame in found:
        values = entries(s, frame)
        if poison in values:
            bad.append(f"{describe_path(s.layout, path)} at {frame:#x} holds {poison:#x} at entry "
                       f"{values.index(poison)}")
    return bad


def unused_addresses(s, count: int) -> list[int]:
    """Pages in the vmm window, each where no page table exists yet (one per leaf_table_span: 4 MiB on i386, 2 MiB
    on x86_64), so mapping one must make a table."""
    layout = s.layout
    span, leaf = layout.leaf_table_span, layout.arch.levels - 1
    present = tables(s)
    regions = range(layout.vmm_base // span, (layout.vmm_window.end - 1) // span + 1)
    found = [r * span + 5 * hw.PAGE_SIZE for r in regions if table_path(layout, r * span, leaf) not in present]
    if len(found) < count:
        pytest.fail(f"fewer than {count} page-table-less {span >> 20} MiB regions in the vmm window")
    return found[:count]


def unused_address(s) -> int:
    return unused_addresses(s, 1)[0]


def empty_user_slot(s) -> int:
    """A top-level slot in the user half that no layout region touches (the middle one), checked empty."""
    layout, arch = s.layout, s.layout.arch
    first_kernel = (layout.kernel_half_start & arch.va_mask) >> arch.shift(0)
    slot = first_kernel // 2
    base = arch.canonical(slot << arch.shift(0))
    for region in layout.regions():
        assert region.end <= base or base + arch.span(0) <= region.start, f"{region} reaches slot {slot}"
    w = walker(s)
    assert entries(s, w.top)[slot] == 0, f"{arch.paging.level_names[0]}[{slot}] is not empty after boot"
    return slot


def address_in_slot(s, slot: int) -> int:
    """A page in top-level slot `slot` whose index at every level below is non-zero and different (3, 5, 7...)."""
    arch = s.layout.arch
    return arch.canonical(slot << arch.shift(0)) + sum((2 * level + 1) * arch.span(level)
                                                     for level in range(1, arch.levels))


def free_stack(s) -> list[int]:
    return PmmView.of(s).free_stack()


# ---- one mapping -------------------------------------------------------------------------------------------------
def test_mapping_is_visible_to_walker_qemu_and_cpu(kernel):
    s = kernel
    frame = s.call("pmm_alloc")
    v = unused_address(s)
    assert s.call("vmm_map", v, frame, FLAGS) == 1
    s.machine.stop()
    s.machine.write_phys(frame + 0x10, (0x1234ABCD).to_bytes(4, "little"))
    s.machine.cont()
    t = walker(s).translate(v + 0x10)
    assert t is not None and t.paddr == frame + 0x10 and t.size == hw.PAGE_SIZE
    assert t.attrs & hw.PTE_RW and not t.attrs & hw.PTE_US
    assert t.attrs & hw.PTE_G, "a kernel-half page is global"
    assert not t.attrs & hw.PTE_NX, "NX was not asked for"
    assert s.machine.gva2gpa(v + 0x10) == frame + 0x10
    assert s.call("kmem_read32", v + 0x10) == 0x1234ABCD
    assert s.call("vmm_translate", v + 0x10) == frame + 0x10

    assert s.call("vmm_unmap", v) == frame
    assert walker(s).translate(v) is None
    assert s.machine.gva2gpa(v) is None
    assert s.call("vmm_translate", v) == s.layout.vmm_none
    with pytest.raises(CallError, match=f"CR2={hexword(s, v)}"):
        s.call("kmem_read32", v)


def test_mapping_twice_is_refused(kernel):
    s = kernel
    frame = s.call("pmm_alloc")
    v = unused_address(s)
    assert s.call("vmm_map", v, frame, FLAGS) == 1
    assert s.call("vmm_map", v, frame, FLAGS) == 0
    s.machine.wait_for(f"vmm_map: already mapped at {hexword(s, v)}", 5)


def test_tables_made_on_demand_are_clean_and_given_back(kernel):
    s = kernel
    layout = s.layout
    frame = s.call("pmm_alloc")
    v = unused_address(s)
    before = tables(s)
    missing = [p for p in paths_of(layout, v) if p not in before]
    assert missing and missing[-1] == table_path(layout, v, layout.arch.levels - 1)
    free = s.call("pmm_stats_free")
    assert s.call("vmm_map", v, frame, FLAGS) == 1
    after = tables(s)
    assert set(after) == set(before) | set(missing), "vmm_map made other tables than those missing on v's path"
    assert {p: after[p] for p in before} == before, "a table that existed moved"
    assert free - s.call("pmm_stats_free") == len(missing), "one frame per table made"
    assert poisoned_tables(s) == []
    made = [after[p] for p in missing]                 # top down
    for path, table in zip(missing, made):
        used = [i for i, e in enumerate(entries(s, table)) if e]
        assert used == [index(layout, v, len(path))], f"{describe_path(layout, path)} at {table:#x}: entries {used}"
    assert s.call("vmm_unmap", v) == frame
    assert tables(s) == before, "an empty table stayed"
    # Given back bottom up: the highest table made is the free stack's top, the page table below it.
    assert free_stack(s)[:len(made)] == made, "the empty tables' frames went back onto the free stack"
    assert s.call("pmm_stats_free") == free


def check_every_level_made_and_freed(s) -> None:
    """One page where the top-level entry is empty: the frame and one table per level below the top are taken,
    the walk goes top -> ... -> PTE -> frame through exactly those tables, and unmapping gives every one back."""
    layout, arch = s.layout, s.layout.arch
    mode, size = arch.paging, arch.entry_size
    slot = empty_user_slot(s)
    v = address_in_slot(s, slot)
    before = tables(s)
    start_free = s.call("pmm_stats_free")
    frame = s.call("pmm_alloc")
    assert s.call("vmm_map", v, frame, FLAGS) == 1
    levels_below_top = arch.levels - 1                 # PDPT, PD, PT on x86_64; PT on i386
    assert start_free - s.call("pmm_stats_free") == levels_below_top + 1, "the frame and one table per level"

    w = walker(s)
    t = w.translate(v + 0x123)
    assert t is not None and t.paddr == frame + 0x123 and t.size == hw.PAGE_SIZE, t
    assert [ref.table for ref in t.chain] == list(mode.level_names)
    assert [ref.index for ref in t.chain] == [index(layout, v, level) for level in range(arch.levels)]
    assert t.chain[0].addr == w.top + slot * size
    made = [ref.value & mode.frame_mask for ref in t.chain[:-1]]   # the tables below the top, top down
    after = tables(s, w)
    assert {p: after[p] for p in set(after) - set(before)} == dict(zip(paths_of(layout, v), made))
    assert t.entry & mode.frame_mask == frame
    assert t.attrs & hw.PTE_RW and not t.attrs & (hw.PTE_US | hw.PTE_G | hw.PTE_NX), \
        f"a user-half kernel page: RW, not user, not global, executable; got {t.attrs}"
    for level, table in enumerate(made, start=1):
        used = [(i, e) for i, e in enumerate(entries(s, table)) if e]
        assert [i for i, _ in used] == [index(layout, v, level)], f"{mode.level_names[level]} at {table:#x}: {used}"
    assert poisoned_tables(s) == []

    assert s.call("vmm_unmap", v) == frame
    w = walker(s)
    assert w.translate(v) is None
    assert entries(s, w.top)[slot] == 0, f"{mode.level_names[0]}[{slot}] still points somewhere"
    assert tables(s, w) == before
    assert free_stack(s)[:levels_below_top] == made, "every level's table went back, bottom up"
    assert s.call("pmm_stats_free") == start_free - 1
    assert s.call("pmm_free", frame) == 1
    assert s.call("pmm_stats_free") == start_free


def test_one_page_in_an_empty_top_level_slot_makes_every_level_and_gives_it_back(kernel):
    check_every_level_made_and_freed(kernel)


@X86_64_ONLY
@KVM_ONLY
def test_pdpt_pd_pt_made_and_given_back_under_kvm(kernel):
    check_every_level_made_and_freed(kernel)


def test_tables_appear_at_their_recursive_window_address(kernel):
    s = kernel
    layout, arch = s.layout, s.layout.arch
    size = arch.entry_size
    v = address_in_slot(s, empty_user_slot(s))
    frame = s.call("pmm_alloc")
    assert s.call("vmm_map", v, frame, FLAGS) == 1
    w = walker(s)
    chain = w.translate(v).chain
    frames = [w.top] + [ref.value & arch.paging.frame_mask for ref in chain[:-1]]
    for level, (ref, table) in enumerate(zip(chain, frames)):
        where = layout.entry_address(v, level)
        assert where == layout.level_window(level) + ((v & arch.va_mask) >> arch.shift(level)) * size
        page = where & ~(hw.PAGE_SIZE - 1)
        t = w.translate(page)
        assert t is not None and t.paddr == table, \
            f"level {level}: {page:#x} maps {t and hex(t.paddr)}, not the {arch.paging.level_names[level]} {table:#x}"
        assert s.machine.gva2gpa(where) == ref.addr
        assert w.read_virtual(where, size) == ref.value.to_bytes(size, "little")
        assert s.call("kmem_read32", where) == ref.value & 0xFFFFFFFF, f"the CPU reads another entry at {where:#x}"
    assert layout.entry_address(layout.recursive_top, 0) == layout.recursive_top + layout.recursive_slot * size
    assert s.call("vmm_unmap", v) == frame
    w = walker(s)
    for level in range(1, arch.levels):
        page = layout.entry_address(v, level) & ~(hw.PAGE_SIZE - 1)
        assert w.translate(page) is None, f"level {level}'s window page {page:#x} still maps a freed table"
    assert w.translate(layout.entry_address(v, 0)).paddr & ~(hw.PAGE_SIZE - 1) == w.top


def test_vmm_translate_of_large_pages(kernel):
    """A large page written by hand (PS, and the PAT bit the translation must drop) into a table the kernel made:
    4 MiB on i386; 2 MiB (PD) and 1 GiB (PDPT) on x86_64. vmm_translate takes the offset bits from the address."""
    s = kernel
    layout, arch = s.layout, s.layout.arch
    size = arch.entry_size
    v = address_in_slot(s, empty_user_slot(s))
    assert s.call("vmm_map", v, s.call("pmm_alloc"), FLAGS) == 1
    chain = walker(s).translate(v).chain
    levels = sorted(arch.paging.large_levels)
    assert levels == ([0] if arch.levels == 2 else [1, 2])
    for level in levels:
        span = arch.span(level)
        large = arch.canonical(((v & arch.va_mask) >> arch.shift(level)) + 1 << arch.shift(level))
        assert index(layout, large, level) == index(layout, v, level) + 1
        entry_at = chain[level].addr + size                          # the next entry of the same table
        assert entries(s, entry_at & ~(hw.PAGE_SIZE - 1))[(entry_at % hw.PAGE_SIZE) // size] == 0
        phys = 2 * span                                              # aligned to the page size, PAT bit set below
        s.machine.stop()
        s.machine.write_phys(entry_at, (phys | hw.PTE_P | hw.PTE_RW | hw.PTE_PS | hw.PAGE_SIZE)
                             .to_bytes(size, "little"))
        s.machine.cont()
        offset = span >> 1 | 0x3EDCBA98 & (span - 1)                # the top offset bit and a pattern below it
        for off in (0, 0x123, offset, span - 1):
            assert s.call("vmm_translate", large + off) == phys + off, \
                f"{span >> 20} MiB page: vmm_translate({large + off:#x})"
        frame = s.call("pmm_alloc")       # no table lies below a large page: mapping into it is refused
        assert s.call("vmm_map", large + offset, frame, FLAGS) == 0, f"vmm_map inside a {span >> 20} MiB page"
        assert s.call("vmm_translate", large + offset) == phys + offset
        s.call("pmm_free", frame)
        cpu = walker(s)
        honoured = cpu.pse or not arch.paging.large_needs_pse
        # The i386 kernel leaves CR4.PSE off, so the CPU reads PS in a PDE as nothing and the entry as a page
        # table's: there the translation is checked against a walker that honours PS, not against the CPU.
        w = cpu if honoured else Walker(s.machine.read_phys, cpu.top, arch.paging, pse=True)
        t = w.translate(large + offset)
        assert t is not None and (t.paddr, t.size) == (phys + offset, span)
        if honoured and span <= layout.memory_bytes // 2:     # the CPU and QEMU reach the page: it is guest RAM
            assert s.machine.gva2gpa(large + offset) == phys + offset
            s.machine.stop()
            s.machine.write_phys(phys + offset - 0x18, (0x600DF00D).to_bytes(4, "little"))
            s.machine.cont()
            assert s.call("kmem_read32", large + offset - 0x18) == 0x600DF00D
        assert s.call("vmm_translate", large + span) == layout.vmm_none, "the entry after the large page is empty"
        assert s.call("vmm_unmap", large + offset) == layout.vmm_none, "vmm_unmap must not take a large page apart"
        assert entries(s, entry_at & ~(hw.PAGE_SIZE - 1))[(entry_at % hw.PAGE_SIZE) // size] & hw.PTE_PS
        s.machine.stop()
        s.machine.write_phys(entry_at, bytes(size))
        s.machine.cont()


# ---- lazy ranges and faults --------------------------------------------------------------------------------------
def test_touching_3_of_100_lazy_pages_takes_3_frames(kernel):
    s = kernel
    layout = s.layout
    before_free = s.call("pmm_stats_free")
    before = tables(s)
    start = s.call("vmm_alloc", 100, FLAGS, 1)
    assert layout.vmm_base <= start < layout.vmm_window.end
    assert s.call("pmm_stats_free") == before_free, "a lazy allocation took frames up front"
    touched = [start + page * hw.PAGE_SIZE for page in (0, 41, 99)]
    for page, v in zip((0, 41, 99), touched):
        s.call("kmem_write32", v + 8, page)
    new_tables = {p for v in touched for p in paths_of(layout, v)} - set(before)
    assert set(tables(s)) - set(before) == new_tables
    assert before_free - s.call("pmm_stats_free") == 3 + len(new_tables)
    assert s.variable("vmm_demand_faults", 4) == 3
    w = walker(s)
    mapped = [m for m in w.mappings() if start <= m.vstart < start + 100 * hw.PAGE_SIZE]
    assert sum(m.size for m in mapped) == 3 * hw.PAGE_SIZE
    assert sorted(m.vstart for m in mapped) == touched
    for m in mapped:
        assert m.attrs & hw.PTE_RW and m.attrs & hw.PTE_G and not m.attrs & (hw.PTE_US | hw.PTE_NX), str(m)
    for page, v in zip((0, 41, 99), touched):
        assert s.call("kmem_read32", v + 8) == page
        assert s.call("kmem_read32", v) == 0, "a demand-paged frame must be cleared"
    assert s.variable("vmm_demand_faults", 4) == 3, "a backed page faulted again"
    assert poisoned_tables(s) == []


@pytest.mark.parametrize("write, words", [(False, "not-present read supervisor"),
                                          (True, "not-present write supervisor")])
def test_fault_outside_any_range_is_reported(kernel, write, words):
    s = kernel
    v = unused_address(s) + 0x123
    routine = s.elf.symbols["kmem_write32" if write else "kmem_read32"]
    with pytest.raises(CallError) as info:
        s.call(routine.name, v, 1) if write else s.call(routine.name, v)
    message = str(info.value)
    assert f"CR2={hexword(s, v)}" in message and f"<{routine.name}+" in message
    assert ("write" if write else "read") in message
    assert s.machine.wait_exit(5) == s.layout.failure_status
    assert f"kgen: page fault: {words}\n" in s.machine.serial
    report = find_exception(s.machine.serial)
    assert report is not None and report.vector == hw.VECTOR_PAGE_FAULT
    assert report.fields["error"] == (hw.PF_W if write else 0), f"error code {report.fields['error']:#x}"
    assert report.fields["cr2"] == v and routine.value <= report.ip < routine.end


# ---- NX (x86_64) and the shared kernel half ----------------------------------------------------------------------
@X86_64_ONLY
def test_vmm_alloc_with_nx_gives_nx_pages(kernel):
    s = kernel
    nx = hw.PTE_NX | FLAGS
    eager_nx = s.call("vmm_alloc", 3, nx, 0)
    lazy_nx = s.call("vmm_alloc", 3, nx, 1)
    plain = s.call("vmm_alloc", 3, FLAGS, 0)
    assert eager_nx and lazy_nx and plain
    s.call("kmem_write32", lazy_nx + hw.PAGE_SIZE, 1)            # backed by the fault handler, with the record's flags
    w = walker(s)
    for start, pages, want_nx in ((eager_nx, range(3), True), (lazy_nx, [1], True), (plain, range(3), False)):
        for page in pages:
            t = w.translate(start + page * hw.PAGE_SIZE)
            assert t is not None and bool(t.attrs & hw.PTE_NX) == want_nx, f"{start:#x} page {page}: {t.attrs}"
            assert bool(t.entry & hw.PTE_NX) == want_nx and t.attrs & hw.PTE_RW and t.attrs & hw.PTE_G
    assert w.translate(lazy_nx) is None and w.translate(lazy_nx + 2 * hw.PAGE_SIZE) is None
    for start in (eager_nx, lazy_nx, plain):
        assert s.call("vmm_free", start) == 3


@X86_64_ONLY
def test_kernel_half_top_level_entries_are_all_present_after_boot(kernel):
    """PML4[256..511] all present from boot, so another address space shares the kernel half by copying them once;
    they stay while kernel-half tables come and go. The user half is empty, and so is the foreign slot
    (templates/aspace.s), which only holds a space while one is attached."""
    s = kernel
    layout, arch = s.layout, s.layout.arch
    mode = arch.paging
    w = walker(s)
    top = entries(s, w.top)
    first = (layout.kernel_half_start & arch.va_mask) >> arch.shift(0)
    assert first == arch.entries_per_table // 2
    assert top[:first] == [0] * first, "the user half is empty after boot"
    missing = [i for i in range(first, arch.entries_per_table) if not top[i] & hw.PTE_P and i != layout.foreign_slot]
    assert missing == [], f"kernel-half {mode.level_names[0]} entries not present: {missing}"
    assert top[layout.foreign_slot] == 0, "the foreign slot holds a space while none is attached"
    assert all(not e & hw.PTE_US for e in top[first:]), "a kernel-half entry is user-accessible"
    slot_of = {name: (addr & arch.va_mask) >> arch.shift(0) for name, addr in (
        ("image", layout.kernel_virtual_start), ("temp-map", layout.tempmap_base), ("vmm", layout.vmm_base))}
    assert top[layout.recursive_slot] & mode.frame_mask == w.top, "the recursive entry points at the top table"
    image = (layout.kernel_load_address, s.symbol("__kernel_end") - layout.kernel_virtual_base)
    for name, slot in slot_of.items():
        assert top[slot] & hw.PTE_P, f"the {name} slot {slot}"
    made_at_boot = [i for i in range(first, arch.entries_per_table)
                    if i not in (layout.recursive_slot, layout.foreign_slot)
                    and not image[0] <= top[i] & mode.frame_mask < image[1]]
    assert len(made_at_boot) == layout.vmm_init_tables
    for i in made_at_boot:
        if i != slot_of["vmm"]:
            assert entries(s, top[i] & mode.frame_mask) == [0] * arch.entries_per_table, f"PDPT of slot {i}"
    start = s.call("vmm_alloc", 600, FLAGS, 0)       # kernel-half tables made...
    assert start and s.call("vmm_free", start) == 600   # ...and given back
    assert [e & ~(hw.PTE_A | hw.PTE_D) for e in entries(s, w.top)] == [e & ~(hw.PTE_A | hw.PTE_D) for e in top], \
        "the top table changed: a kernel-half PDPT went away"


# ---- accounting ----------------------------------------------------------------------------------------------------
def check_no_frame_lost(s) -> None:
    start_free = s.call("pmm_stats_free")
    start_tables = tables(s)
    eager = [s.call("vmm_alloc", n, FLAGS, 0) for n in (1, 7, 1030)]
    assert all(eager)
    lazy = s.call("vmm_alloc", 300, FLAGS, 1)
    for page in range(0, 300, 37):
        s.call("kmem_write32", lazy + page * hw.PAGE_SIZE, page)
    frames = [s.call("pmm_alloc") for _ in range(3)]
    low = unused_addresses(s, 2) + [address_in_slot(s, empty_user_slot(s))]
    for v, f in zip(low, frames):
        assert s.call("vmm_map", v, f, FLAGS) == 1
    assert s.call("pmm_stats_free") < start_free - (1 + 7 + 1030 + 9 + 3)
    for v, f in zip(low, frames):
        assert s.call("vmm_unmap", v) == f
    for f in frames:
        assert s.call("pmm_free", f) == 1
    for a, pages in zip(eager + [lazy], (1, 7, 1030, 300)):
        assert s.call("vmm_free", a) == pages
    assert s.call("pmm_stats_free") == start_free
    assert s.variable("vmm_free_range_count", 4) == 1
    assert tables(s) == start_tables


def test_no_frame_lost_after_everything_is_unmapped(kernel):
    check_no_frame_lost(kernel)


@X86_64_ONLY
@KVM_ONLY
def test_no_frame_lost_under_kvm(kernel):
    check_no_frame_lost(kernel)


# ---- the range allocator against a model -------------------------------------------------------------------------
def free_ranges(s) -> list[tuple[int, int]]:
    """The free array: (start, pages) pairs of words; the count is a dword."""
    base, word = s.symbol("vmm_free_ranges"), s.word_size
    count = s.variable("vmm_free_range_count", 4)
    return [(s.read_word(base + 2 * word * i), s.read_word(base + 2 * word * i + word)) for i in range(count)]


class RangeModel:
    """vrange: a sorted free list, first fit from the lowest range, merged with both neighbours on release."""

    def __init__(self, free):
        self.free = list(free)

    def reserve(self, pages: int) -> int:
        for i, (start, n) in enumerate(self.free):
            if n >= pages:
                self.free[i:i + 1] = [] if n == pages else [(start + pages * hw.PAGE_SIZE, n - pages)]
                return start
        return 0

    def release(self, start: int, pages: int) -> None:
        ranges = sorted(self.free + [(start, pages)])
        merged = [ranges[0]]
        for a, n in ranges[1:]:
            b, m = merged[-1]
            assert b + m * hw.PAGE_SIZE <= a, "the model released an overlapping range"
            merged[-1:] = [(b, m + n)] if b + m * hw.PAGE_SIZE == a else [(b, m), (a, n)]
        self.free = merged


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 64), st.integers(0, 1000)), min_size=1, max_size=60))
def test_random_reserve_release_match_the_model(kernel_build, ops):
    layout = kernel_build.kernel.layout
    with open_session(kernel_build, poison=None) as s:
        initial = free_ranges(s)          # the heap has reserved its slab window by now
        assert len(initial) == 1
        model = RangeModel(initial)
        live: dict[int, int] = {}
        for reserve, pages, pick in ops:
            if reserve or not live:
                start = s.call("vrange_reserve", pages)
                assert start == model.reserve(pages), "not the lowest free range that fits"
                end = start + pages * hw.PAGE_SIZE
                assert layout.vmm_base <= start and end <= layout.vmm_window.end
                for other, n in live.items():
                    assert end <= other or other + n * hw.PAGE_SIZE <= start, "two live ranges overlap"
                live[start] = pages
            else:
                start = sorted(live)[pick % len(live)]
                pages = live.pop(start)
                assert s.call("vrange_release", start, pages) == 1
                model.release(start, pages)
            ranges = free_ranges(s)
            assert ranges == model.free
            for (a, n), (b, _) in zip(ranges, ranges[1:]):
                assert a + n * hw.PAGE_SIZE < b, "free ranges that touch must have been merged"
        for start in sorted(live, reverse=True):
            assert s.call("vrange_release", start, live.pop(start)) == 1
        assert free_ranges(s) == initial


def test_double_release_and_release_never_reserved_are_refused(kernel):
    s = kernel
    start = s.call("vrange_reserve", 4)
    assert s.call("vrange_release", start, 4) == 1
    assert s.call("vrange_release", start, 4) == 0
    free_start, _ = free_ranges(s)[0]
    assert s.call("vrange_release", free_start + 0x100000, 2) == 0
    for what in (start, free_start + 0x100000):  # COM1 is read by a thread: wait for the lines
        s.machine.wait_for(f"vrange_release: overlaps a free range (released twice, or never reserved) at "
                           f"{hexword(s, what)}", 5)
    assert s.call("vmm_free", s.layout.vmm_base + 0x5000) == 0
    s.machine.wait_for(f"vmm_free: not the start of an allocation: {hexword(s, s.layout.vmm_base + 0x5000)}", 5)


# ---- the whole VMM against a model -------------------------------------------------------------------------------
class VmmModel(DrivenModel):
    """What the VMM should hold: raw mappings (vmm_map of pmm_alloc'd frames) at a pool of user-half pages spread
    over two top-level slots and two tables at every level, and vmm_alloc ranges with the pages backed so far.
    The free count must equal the start's minus the frames held and the tables every mapped page needs that were
    not there at the start (tables are given back as soon as they empty); the walker must find exactly those
    tables and pages."""

    def __init__(self, s):
        self.s = s
        self.layout = layout = s.layout
        arch = layout.arch
        slot = empty_user_slot(s)
        assert entries(s, walker(s).top)[slot + 1] == 0
        choices = [(slot, slot + 1)] + [(1, 300)] * (arch.levels - 2) + [(0, 5, arch.entries_per_table - 1)]
        self.pool = [0]
        for level, picks in enumerate(choices):
            self.pool = [v + (i << arch.shift(level)) for v in self.pool for i in picks]
        self.pool = [arch.canonical(v) for v in self.pool]
        self.start_free = s.call("pmm_stats_free")
        self.start_tables = tables(s)
        self.start_faults = s.variable("vmm_demand_faults", 4)
        self.start_ranges = s.variable("vmm_free_range_count", 4)
        self.nx = hw.PTE_NX if arch.paging.nx_levels else 0
        self.mapped: dict[int, int] = {}                      # vaddr -> frame
        self.allocs: dict[int, tuple[int, int, set[int]]] = {}   # start -> (pages, flags, backed page numbers)
        self.faults = 0

    def pages(self) -> dict[int, int | None]:
        """Every page the model has mapped: vaddr -> frame (None: a frame the kernel chose)."""
        pages: dict[int, int | None] = dict(self.mapped)
        for start, (_, _, backed) in self.allocs.items():
            pages.update((start + p * hw.PAGE_SIZE, None) for p in backed)
        return pages

    def needed_tables(self) -> set[tuple[int, ...]]:
        return {p for v in self.pages() for p in paths_of(self.layout, v)} | set(self.start_tables)

    def expected_free(self) -> int:
        return self.start_free - len(self.pages()) - len(self.needed_tables() - set(self.start_tables))

    # ---- operations -----------------------------------------------------------------------------------------
    def map(self, pick: int) -> None:
        v = self.pool[pick % len(self.pool)]
        frame = self.s.call("pmm_alloc")
        assert frame
        if v in self.mapped:
            assert self.s.call("vmm_map", v, frame, FLAGS) == 0, f"mapped twice at {v:#x}"
            assert self.s.call("pmm_free", frame) == 1
        else:
            assert self.s.call("vmm_map", v, frame, FLAGS) == 1, f"vmm_map({v:#x}) refused"
            self.mapped[v] = frame

    def unmap(self, pick: int) -> None:
        if not self.mapped:
            v = self.pool[pick % len(self.pool)]
            assert self.s.call("vmm_unmap", v) == self.layout.vmm_none
            return
        v = sorted(self.mapped)[pick % len(self.mapped)]
        frame = self.mapped.pop(v)
        assert self.s.call("vmm_unmap", v) == frame
        assert self.s.call("vmm_translate", v) == self.layout.vmm_none
        assert self.s.call("pmm_free", frame) == 1

    def alloc(self, pick: int, bits: int) -> None:
        pages, lazy = 1 + pick % 24, bits & 1
        flags = FLAGS | (self.nx if bits & 2 else 0)
        start = self.s.call("vmm_alloc", pages, flags, lazy)
        assert start, f"vmm_alloc({pages}) failed with plenty of room"
        end = start + pages * hw.PAGE_SIZE
        assert self.layout.vmm_base <= start and end <= self.layout.vmm_window.end
        for other, (n, _, _) in self.allocs.items():
            assert end <= other or other + n * hw.PAGE_SIZE <= start, "two allocations overlap"
        self.allocs[start] = (pages, flags, set() if lazy else set(range(pages)))

    def touch(self, pick: int, bits: int) -> None:
        if not self.allocs:
            return
        start = sorted(self.allocs)[pick % len(self.allocs)]
        pages, _, backed = self.allocs[start]
        page = bits % pages
        v = start + page * hw.PAGE_SIZE + 4 * (bits % 1000)
        if page not in backed:
            backed.add(page)
            self.faults += 1
            assert self.s.call("kmem_read32", v) == 0, "a page backed on first touch is cleared"
        self.s.call("kmem_write32", v, bits)
        assert self.s.call("kmem_read32", v) == bits

    def free(self, pick: int) -> None:
        if not self.allocs:
            return
        start = sorted(self.allocs)[pick % len(self.allocs)]
        assert self.s.call("vmm_free", start) == self.allocs.pop(start)[0]

    def release_all(self) -> None:
        for v in sorted(self.mapped):
            frame = self.mapped.pop(v)
            assert self.s.call("vmm_unmap", v) == frame
            assert self.s.call("pmm_free", frame) == 1
        for start in sorted(self.allocs):
            assert self.s.call("vmm_free", start) == self.allocs.pop(start)[0]

    # ---- checks ---------------------------------------------------------------------------------------------
    def check_counts(self) -> None:
        assert self.s.call("pmm_stats_free") == self.expected_free(), "frames taken or given back unexpectedly"
        assert self.s.variable("vmm_demand_faults", 4) == self.start_faults + self.faults

    def check_machine(self) -> None:
        w = walker(self.s)
        found = tables(self.s, w)
        assert set(found) == self.needed_tables(), (
            f"tables beyond those the mapped pages need: {sorted(set(found) - self.needed_tables())}; "
            f"missing: {sorted(self.needed_tables() - set(found))}")
        assert {p: found[p] for p in self.start_tables} == self.start_tables
        expected = self.pages()
        layout = self.layout
        heap = self.s.variable("heap_slab_base")
        heap_end = heap + layout.heap_slab_pages * hw.PAGE_SIZE
        seen: dict[int, int] = {}
        for m in w.mappings():
            if m.vstart < layout.kernel_half_start or layout.vmm_base <= m.vstart < layout.vmm_window.end:
                seen.update((m.vstart + o, m.pstart + o) for o in range(0, m.size, hw.PAGE_SIZE)
                            if not heap <= m.vstart + o < heap_end)
        extra, absent = set(seen) - set(expected), set(expected) - set(seen)
        assert not extra and not absent, (f"mapped but not in the model: {sorted(map(hex, extra))}; "
                                          f"in the model, not mapped: {sorted(map(hex, absent))}")
        for v, frame in self.mapped.items():
            assert seen[v] == frame, f"{v:#x} maps {seen[v]:#x}, not {frame:#x}"
        for start, (pages, flags, backed) in self.allocs.items():
            for p in backed:
                t = w.translate(start + p * hw.PAGE_SIZE)
                assert bool(t.attrs & hw.PTE_NX) == bool(flags & hw.PTE_NX), f"{start:#x} page {p}: {t.attrs}"
        assert len(set(seen.values())) == len(seen), "one frame mapped twice"
        assert poisoned_tables(self.s) == []

    def check_released(self) -> None:
        assert self.s.call("pmm_stats_free") == self.start_free, "frames lost after everything was released"
        assert tables(self.s) == self.start_tables
        assert self.s.variable("vmm_free_range_count", 4) == self.start_ranges

    # ---- run_model's checks ------------------------------------------------------------------------------------
    def after_step(self) -> None:
        self.check_counts()

    def check(self) -> None:
        self.check_machine()

    def release(self) -> None:
        self.release_all()
        self.check_released()


PICK = st.integers(0, 1 << 16)
VMM_OPS = op_lists(("map", PICK), ("map", PICK), ("unmap", PICK), ("alloc", PICK, PICK), ("touch", PICK, PICK),
                   ("touch", PICK, PICK), ("free", PICK), min_size=20, max_size=60)
VMM_BATCH = 15
VMM_SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@settings(max_examples=6, **VMM_SETTINGS)
@given(ops=VMM_OPS)
def test_random_vmm_sequences_match_the_model(kernel_build, ops):
    with open_session(kernel_build) as s:
        run_model(VmmModel(s), ops, check_every=VMM_BATCH)


@settings(max_examples=2, **VMM_SETTINGS)
@given(ops=VMM_OPS)
def test_random_vmm_sequences_match_the_model_on_a_bitmap_kernel(bitmap_build, ops):
    """The same VMM over the bitmap frame allocator (pmm.kind = "bitmap")."""
    with open_session(bitmap_build) as s:
        run_model(VmmModel(s), ops, check_every=VMM_BATCH)


# Under KVM a boot costs seconds (≈2.6 s here against ≈0.2 s under TCG): the examples share one machine, each
# starting from what the last one gave back (a failed example skips that, and the next starts from what it left).
@settings(max_examples=4, **VMM_SETTINGS)
@given(ops=VMM_OPS)
@X86_64_ONLY
@KVM_ONLY
def test_random_vmm_sequences_match_the_model_under_kvm(kernel, ops):
    run_model(VmmModel(kernel), ops, check_every=VMM_BATCH)


# ---- a kernel that forgets to clear its tables ---------------------------------------------------------------------
def test_unzeroed_page_table_variant_is_caught(tmp_path_factory, arch):
    """The check that keeps the real kernel green turns red on a kernel that forgets to clear new tables: the first
    table vmm_map makes (i386: the page table; x86_64: the vmm window's PD, its PDPT being made at boot) keeps the
    poison. i386 then refuses the map (the poisoned PTE looks present); on x86_64 the poisoned PD entry looks like a
    present large page with reserved bits, and the kernel faults on its own PTE. Either way the poison is found."""
    variant = shared_build(tmp_path_factory, Config.for_arch(arch, vmm_skip_table_clear=True))
    with open_session(variant) as s:
        assert poisoned_tables(s) == [], "the tables made at boot are clean even here"
        try:
            s.call("vmm_map", unused_address(s), s.call("pmm_alloc"), FLAGS)
        except CallError:
            pass
        found = poisoned_tables(s)
        poison = bytes([POISON]).hex() * s.layout.arch.entry_size
        assert found and poison in "\n".join(found), f"poisoned RAM should show the table was never cleared: {found}"
