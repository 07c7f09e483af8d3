"""kgen.harness.bench on both architectures: its cases are placed by the layout's geometry, it runs and returns numbers, and
PMM init under -icount (deterministic) does not grow with guest RAM. No timing is asserted."""
import math
import shutil

import pytest

from kgen.harness import bench
from kgen.build.config import Config
from kgen.build.layout import compute
from kgen.harness.session import KernelSession

from conftest import ARCH_BUILDS

ARCHES = ("i386", "x86_64")


@pytest.mark.parametrize("arch", ARCHES)
def test_vmm_cases_follow_the_layout(arch):
    layout = compute(Config.for_arch(arch))
    span = layout.leaf_table_span
    kept, cases = bench.vmm_cases(layout)
    by_label = {label: (vaddr, made) for label, vaddr, made in cases}
    exists, _ = by_label[bench.TABLE_EXISTS]
    bare, made = by_label[bench.TABLE_MADE]
    assert made == 1
    assert kept % span == 0 and bare % span == 0 and bare == kept + span
    assert exists // span == kept // span and exists != kept
    assert layout.vmm_window.start <= kept and bare + span <= layout.vmm_window.end
    if arch == "x86_64":
        (label, vaddr, made), = [case for case in cases if case[0] not in (bench.TABLE_EXISTS, bench.TABLE_MADE)]
        assert "PDPT+PD+PT" in label and made == 3 and 0 < vaddr < layout.kernel_half_start
    else:
        assert len(cases) == 2


needs_qemu = pytest.mark.skipif(shutil.which("qemu-system-i386") is None or shutil.which("qemu-system-x86_64") is None,
                                reason="QEMU not installed (Debian package qemu-system-x86)")


@pytest.mark.vm
@needs_qemu
@pytest.mark.parametrize("arch", ARCHES)
def test_bench_runs_and_returns_numbers(arch, request, monkeypatch):
    monkeypatch.setattr(bench, "LOOPS", 50)      # the numbers are not checked: a short loop keeps the test quick
    out = request.getfixturevalue(ARCH_BUILDS[arch])
    with KernelSession(out.elf, out.kernel.layout, icount=True) as s:
        pmm = bench.per_op(s, 1)
        vmm = bench.vmm_heap_ops(s, 1)      # raises when a case makes other than the page tables it names
    assert {label for label, *_ in bench.OPERATIONS} <= set(pmm)
    assert {bench.TABLE_EXISTS, bench.TABLE_MADE, bench.VRANGE, bench.DEMAND_FAULT} <= set(vmm)
    assert any("PDPT+PD+PT" in label for label in vmm) == (arch == "x86_64")
    for value in (*pmm.values(), *vmm.values()):
        assert math.isfinite(value) and value > 0


@pytest.mark.vm
@needs_qemu
@pytest.mark.parametrize("arch, guests", [("i386", (64, 3072)), ("x86_64", (64, 3072, 8192))])
def test_pmm_init_does_not_grow_with_ram(arch, guests, tmp_path):
    """Under -icount the init cost is an exact instruction count: equal for guests whose memory maps have the same
    RAM ranges, whatever their size. (At 8 GiB QEMU puts RAM above 4 GiB, one range more for the x86_64 PMM.)"""
    rows = bench.init_costs(arch, tmp_path, "tcg", guests)
    assert [r.mib for r in rows] == list(guests)
    assert [r.frames for r in rows] == sorted(r.frames for r in rows) and rows[0].frames < rows[-1].frames
    by_ranges = {}
    for row in rows:
        by_ranges.setdefault(row.ram_ranges, set()).add(row.ticks)
    assert all(len(ticks) == 1 for ticks in by_ranges.values()), rows
    if arch == "x86_64":
        assert rows[-1].ram_ranges == rows[0].ram_ranges + 1, "8 GiB should add one RAM range above 4 GiB"


@pytest.mark.vm
@needs_qemu
def test_the_allocator_figures_measure_what_they_say(tmp_path_factory, monkeypatch):
    """The allocator comparison on a small i386 bitmap kernel (the fill is the kernel's own vmm_alloc): every figure
    is a count, the machine ends full, the bitmap's own RAM is its one page, and under -icount its worst case is a
    scan, many times an allocation at the hint. Instruction counts, never times."""
    from conftest import shared_build
    monkeypatch.setattr(bench, "LOOPS", 50)
    out = shared_build(tmp_path_factory, Config(pmm_kind="bitmap", machine_memory_mib=16))
    with KernelSession(out.elf, out.kernel.layout, icount=True) as s:
        ops = bench.allocator_ops(s, 1)
        assert bench.free_frames(s) <= 1, "the machine was not filled"
        assert bench.allocator_bytes(s) == 4096
    assert set(ops) == {bench.ALLOC_EMPTY, bench.ALLOC_FULL, bench.ALLOC_AT, bench.ALLOC_WORST}
    assert all(math.isfinite(v) and v > 0 for v in ops.values()), ops
    assert ops[bench.ALLOC_WORST] > 5 * ops[bench.ALLOC_FULL], ops
