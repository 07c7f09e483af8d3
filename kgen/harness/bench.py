"""`python -m kgen.harness.bench` (`make bench`): what the memory managers cost, measured inside the kernel, on i386 and x86_64.

Loops in templates/bench.s run each operation n times between two rdtsc reads; the empty loop's delta is
subtracted. Under TCG with `-icount shift=0,sleep=off` the guest clock advances one tick per executed instruction,
so the figures are instruction counts and repeat exactly; under KVM (where it can run the kernel) they are TSC
cycles, of whatever hypervisor /dev/kvm is (kvm_pvm, a software hypervisor, on the development machines: its cycles
are not bare-metal cycles).

The VMM cases are placed by the layout's geometry (`Layout.leaf_table_span`, the architecture record), and each is
checked against the free-frame count before it is timed: "table exists" makes no table, "PT made" makes exactly
one, and on x86_64 "PDPT+PD+PT made", at a user-half address whose PML4 entry is empty, makes three.

The two frame allocators (pmm.kind = "stack" and "bitmap") are measured side by side on kernels that differ only in
that key: alloc+free on an empty machine and on one 90 % full, alloc_at+free_at, one allocation at its worst (a full
machine whose bitmap hint was pulled to the bottom: the bitmap scans every dword), pmm_init per guest size and the
RAM the allocator's own state takes (the bitmap's pages; the stack keeps its links inside the free frames).

PMM init is read from the boot report for guests of several sizes (on x86_64 also 8 GiB, whose RAM above 4 GiB the
memory map reports and the PMM uses), next to QEMU's peak resident memory: booted without a RAM file, guest RAM is
anonymous memory that only becomes resident when touched, so an init that touched every frame would show up there.
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from kgen.arch import hw
from kgen.arch import ARCHES, X86_64, named
from kgen.guest.bootreport import BOOT_OK
from kgen.guest.bootreport import parse as parse_boot_report
from kgen.build.pipeline import build
from kgen.build.config import PMM_KINDS, Config
from kgen.build.layout import Layout
from kgen.machine import kvm_usable_for
from kgen.guest.pmmview import PmmView, alloc_at_pages, parse_report, ranges_from_mmap
from kgen.errors import OneLineParser, UsageError
from kgen.harness.outputs import check_report_path, write_report
from kgen.harness.session import KernelSession

LOOPS = 1000
KVM_REPEATS = 5
KVM_INIT_BOOTS = 3    # kvm_pvm's pmm_init cycles vary from boot to boot: the best of a few
INIT_GUESTS_MIB = (64, 1024, 3072, 8192)   # those up to the architecture's max_memory_mib
TARGET_RATIO = 1.10   # issue 4: alloc_at+free_at within about 10% of map+unmap
UNITS = {"tcg": "instructions", "kvm": "TSC cycles"}
RW = hw.PTE_P | hw.PTE_RW

# (label, routine, whether it takes vaddr, whether it takes an owned frame)
OPERATIONS = (
    ("alloc + free via temp map", "bench_alloc_free", False, False),
    ("alloc_at + free_at", "bench_alloc_at_free_at", True, False),
    ("map + unmap (PTE, INVLPG x2)", "bench_map_unmap", True, True),
    ("map + clear + unmap", "bench_map_clear_unmap", True, True),
    ("INVLPG", "bench_invlpg", True, False),
)
HEAP_CASES = ((16, 1), (64, 1), (512, 1), (4096, 1), (4096, 4096))
TABLE_EXISTS = "vmm_map + vmm_unmap, table exists"
TABLE_MADE = "vmm_map + vmm_unmap, PT made+freed"
DEMAND_FAULT = "demand-paging fault"
VRANGE = "vrange reserve + release (1 page)"


@dataclass
class Run:
    """One architecture under one accelerator: per-operation costs and, unless skipped, PMM init per guest size."""
    arch: str
    accel: str
    pmm: dict[str, float]
    vmm: dict[str, float]
    init: list["InitRow"] | None = None

    @property
    def unit(self) -> str:
        return UNITS[self.accel]

    @property
    def title(self) -> str:
        return f"{self.arch} {self.accel.upper()}"


@dataclass(frozen=True)
class InitRow:
    mib: int            # guest RAM
    frames: int         # frames in the PMM's ranges
    mmap_entries: int   # entries of the Multiboot memory map
    ram_ranges: int     # of those, the ranges the PMM keeps (available RAM above 1 MiB; below 4 GiB on i386)
    ticks: int          # pmm_init's rdtsc delta
    hwm_kib: int        # QEMU's VmHWM once booted
    pmm_bytes: int = 0  # RAM the allocator's own state takes: the bitmap's pages (the stack's links are in free frames)


def _timed(session: KernelSession, routine: str, n: int, *args: int) -> int:
    return session.call_full(routine, n, *args, timeout=120).value64


def per_op(session: KernelSession, repeats: int) -> dict[str, float]:
    """PMM costs per operation, empty loop subtracted."""
    vaddr = alloc_at_pages(session.layout)[0]
    frame = session.call("pmm_alloc")
    results = {}
    empty = min(_timed(session, "bench_empty", LOOPS) for _ in range(repeats))
    results["empty loop (subtracted)"] = empty / LOOPS
    for label, routine, takes_vaddr, takes_frame in OPERATIONS:
        args = ((vaddr,) if takes_vaddr else ()) + ((frame,) if takes_frame else ())
        _timed(session, routine, 1, *args)   # puts a frame on the free stack: every timed pass then pops and pushes
        best = min(_timed(session, routine, LOOPS, *args) for _ in range(repeats))
        results[label] = (best - empty) / LOOPS
    return results


def free_frames(session: KernelSession) -> int:
    return PmmView.of(session).state().free


def tables_made(session: KernelSession, vaddr: int, frame: int) -> int:
    """Page tables one vmm_map at `vaddr` makes, counted from the free frames; vmm_unmap must give them all back."""
    before = free_frames(session)
    if session.call("vmm_map", vaddr, frame, RW) != 1:
        raise RuntimeError(f"vmm_map({vaddr:#x}) refused")
    made = before - free_frames(session)
    session.call("vmm_unmap", vaddr)
    if free_frames(session) != before:
        raise RuntimeError(f"vmm_unmap({vaddr:#x}) left {before - free_frames(session)} of {made} table frames taken")
    return made


def vmm_cases(layout: Layout) -> tuple[int, list[tuple[str, int, int]]]:
    """The page that keeps a leaf table alive, and (label, vaddr, tables one vmm_map there makes) per case.

    The last two leaf-table spans of the vmm window (4 MiB each on i386, 2 MiB on x86_64): a pinned page keeps the
    first's table, and with it every level above, so a map in the second makes just the PT. On x86_64 also a
    user-half address whose PML4 entry is empty (the user half is after boot), so a map there makes a PDPT, a PD
    and a PT, and the unmap gives all three back (user-half PDPTs are not pinned like the kernel half's)."""
    arch = layout.arch
    span = layout.leaf_table_span
    end = layout.vmm_window.end & ~(span - 1)
    kept, bare = end - 2 * span, end - span
    cases = [(TABLE_EXISTS, kept + hw.PAGE_SIZE, 0), (TABLE_MADE, bare, 1)]
    if arch.levels > 2:
        below_top = arch.paging.level_names[1:]
        user_half = arch.span(0)     # PML4[1]: well inside the user half, empty after boot
        assert user_half < layout.kernel_half_start
        cases.append((f"vmm_map + vmm_unmap, {'+'.join(below_top)} made+freed", user_half, len(below_top)))
    return kept, cases


def vmm_heap_ops(session: KernelSession, repeats: int) -> dict[str, float]:
    """VMM and heap costs per operation, empty loop subtracted."""
    def best(routine: str, n: int, *args: int) -> float:
        return (min(_timed(session, routine, n, *args) for _ in range(repeats)) - empty * n) / n

    empty = min(_timed(session, "bench_empty", LOOPS) for _ in range(repeats)) / LOOPS
    frame = session.call("pmm_alloc")
    kept, cases = vmm_cases(session.layout)
    if session.call("vmm_map", kept, session.call("pmm_alloc"), RW) != 1:
        raise RuntimeError(f"vmm_map({kept:#x}) refused")
    results = {}
    for label, vaddr, expected in cases:
        made = tables_made(session, vaddr, frame)
        if made != expected:
            raise RuntimeError(f"{label}: vmm_map({vaddr:#x}) made {made} page tables, not {expected}: the case "
                               "would not measure what it says")
        results[label] = best("bench_vmm_map_unmap", LOOPS, vaddr, frame)
    results[VRANGE] = best("bench_range", LOOPS, 1)
    faults = []
    for _ in range(repeats):
        start = session.call("vmm_alloc", LOOPS, RW, 1)
        faults.append(_timed(session, "bench_demand_fault", LOOPS, start))
        session.call("vmm_free", start)
    results[DEMAND_FAULT] = (min(faults) - empty * LOOPS) / LOOPS
    for size, align in HEAP_CASES:
        pin = session.call("kmalloc_aligned", size, align)   # keeps the class's slab: no page churn per block
        label = f"kmalloc+kfree {size} B" + (f", aligned {align}" if align > 1 else "")
        results[label] = best("bench_kmalloc_kfree", LOOPS, size, align)
        session.call("kfree", pin)
    return results


def vm_hwm_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmHWM in /proc/{pid}/status")


def init_costs(arch: str, work: Path, accel: str, guests_mib=None, boots: int = 1,
               pmm_kind: str = PMM_KINDS[0]) -> list[InitRow]:
    """PMM init and QEMU's peak resident memory per guest size, booted without a RAM file (the best of `boots`)."""
    rows = []
    for mib in guests_mib or [m for m in INIT_GUESTS_MIB if m <= named(arch).max_memory_mib]:
        config = Config.for_arch(arch, machine_memory_mib=mib, pmm_kind=pmm_kind)
        out = build(config, work / f"init-{arch}-{pmm_kind}-{mib}", iso=False)
        samples = []
        for _ in range(boots):
            with KernelSession(out.elf, out.kernel.layout, accel=accel, icount=accel == "tcg", ram_file=False) as s:
                serial = s.machine.serial
                report, mmap = parse_report(serial), parse_boot_report(serial).mmap
                samples.append(InitRow(mib, report.total, len(mmap), len(ranges_from_mmap(mmap, named(arch))),
                                       report.init_ticks, vm_hwm_kib(s.machine.pid), allocator_bytes(s)))
        rows.append(min(samples, key=lambda row: row.ticks))
    return rows


def allocator_bytes(session: KernelSession) -> int:
    """RAM the frame allocator keeps for itself: the bitmap's pages; 0 for the stack."""
    view = PmmView.of(session)
    return len(view.bitmap_frames(view.state())) * hw.PAGE_SIZE if view.kind == "bitmap" else 0


# ---- the two allocators side by side ------------------------------------------------------------------------------
ALLOC_EMPTY = "alloc + free, empty machine"
ALLOC_FULL = "alloc + free, 90 % full"
ALLOC_AT = "alloc_at + free_at"
ALLOC_WORST = "one alloc + free, full, hint at the bottom"
FULL_FRACTION = 0.9


@dataclass
class AllocatorRun:
    """One frame allocator on one architecture under one accelerator."""
    arch: str
    accel: str
    kind: str
    ops: dict[str, float]
    init: list[InitRow] | None = None

    @property
    def unit(self) -> str:
        return UNITS[self.accel]

    @property
    def title(self) -> str:
        return f"{self.arch} {self.accel.upper()} {self.kind}"


def fill(session: KernelSession, frames: int) -> int:
    """Take `frames` frames (less the page tables they need) into one eager vmm range; its start. Made by the kernel
    itself, the way a loaded machine gets full: lowest frames first on the bitmap, the bump pointer's on the stack."""
    tables = -(-frames // session.layout.arch.entries_per_table) + session.layout.arch.levels
    start = session.call("vmm_alloc", frames - tables, RW, 0, timeout=600)
    if not start:
        raise RuntimeError(f"vmm_alloc({frames - tables}) found no room to fill the machine")
    return start


def allocator_ops(session: KernelSession, repeats: int) -> dict[str, float]:
    """The allocator's costs on one freshly booted kernel, from empty to full (per operation, empty loop
    subtracted)."""
    empty = min(_timed(session, "bench_empty", LOOPS) for _ in range(repeats)) / LOOPS

    def best(routine: str, n: int, *args: int) -> float:
        return (min(_timed(session, routine, n, *args) for _ in range(repeats)) - empty * n) / n

    results = {ALLOC_EMPTY: best("bench_alloc_free", LOOPS),
               ALLOC_AT: best("bench_alloc_at_free_at", LOOPS, alloc_at_pages(session.layout)[0])}
    start = fill(session, int(free_frames(session) * FULL_FRACTION))
    results[ALLOC_FULL] = best("bench_alloc_free", LOOPS)
    fill(session, free_frames(session))
    while free_frames(session) > 1:
        if not session.call("pmm_alloc"):
            break
    # The lowest frame of the range given back and taken again: the bitmap's hint moves down to it and stays, so
    # the next allocation scans every dword above it to the one free frame left at the top.
    low = session.call("vmm_unmap", start)
    worst = []
    for _ in range(repeats):
        if session.call("pmm_free", low) != 1 or session.call("pmm_alloc") != low:
            raise RuntimeError(f"the frame {low:#x} freed was not the next one handed out")
        worst.append(_timed(session, "bench_alloc_free", 1) - empty)
    results[ALLOC_WORST] = float(min(worst))
    return results


def bench_allocators(arch: str, work: Path, accel: str, *, init: bool = True) -> list[AllocatorRun]:
    """Both allocators of `arch` under `accel`: kernels that differ only in pmm.kind."""
    runs = []
    for kind in PMM_KINDS:
        out = build(Config.for_arch(arch, pmm_kind=kind), work / f"{arch}-{kind}", iso=False)
        repeats = 1 if accel == "tcg" else KVM_REPEATS
        with KernelSession(out.elf, out.kernel.layout, accel=accel, icount=accel == "tcg") as s:
            run = AllocatorRun(arch, accel, kind, allocator_ops(s, repeats))
        if init:
            run.init = init_costs(arch, work, accel, boots=1 if accel == "tcg" else KVM_INIT_BOOTS, pmm_kind=kind)
        runs.append(run)
    return runs


def print_allocators(runs: list[AllocatorRun]) -> None:
    if not runs:
        return
    width = max(len(f"{r.title} [{r.unit}]") for r in runs)
    print("\nThe frame allocators side by side (pmm.kind), per operation, empty loop subtracted")
    print(f"  {'':<44}" + "".join(f" {r.title + ' [' + r.unit + ']':>{width}}" for r in runs))
    for label in (ALLOC_EMPTY, ALLOC_FULL, ALLOC_AT, ALLOC_WORST):
        print(f"  {label:<44}" + "".join(f" {r.ops[label]:>{width}.1f}" for r in runs))
    for mib in sorted({row.mib for r in runs for row in r.init or ()}):
        rows = [next((x for x in r.init or () if x.mib == mib), None) for r in runs]
        print(f"  {f'pmm_init at {mib} MiB':<44}" + "".join(f" {'-' if x is None else x.ticks:>{width}}" for x in rows))
        print(f"  {f'  its own RAM at {mib} MiB [KiB]':<44}"
              + "".join(f" {'-' if x is None else x.pmm_bytes // 1024:>{width}}" for x in rows))


def init_verdict(rows: list[InitRow], unit: str) -> str:
    """Whether pmm_init at the largest guest costs what it does at the smallest, and if not, by how much and why."""
    small, large = rows[0], rows[-1]
    head = f"pmm_init at {large.mib} MiB vs {small.mib} MiB:"
    if large.ticks == small.ticks:
        return f"{head} equal ({small.ticks} {unit}): the cost does not grow with RAM"
    delta = large.ticks - small.ticks
    extra = large.ram_ranges - small.ram_ranges
    why = (f"{large.mmap_entries} memory-map entries ({large.ram_ranges} RAM ranges) against {small.mmap_entries} "
           f"({small.ram_ranges})")
    if extra > 0:
        why += f": {delta / extra:g} {unit} per extra RAM range, not per frame"
    return f"{head} NOT equal, {delta:+d} {unit}; {why}"


# ---- printing ---------------------------------------------------------------------------------------------------

def print_ops(title: str, unit: str, results: dict[str, float]) -> None:
    print(f"\n{title}")
    print(f"  {'operation':<32} {'per operation [' + unit + ']':>28}")
    for label, value in results.items():
        print(f"  {label:<32} {value:>28.1f}")
    plain = results["map + unmap (PTE, INVLPG x2)"]
    cleared = results["map + clear + unmap"]
    ours = results["alloc_at + free_at"]
    if plain > 0:
        print(f"  alloc_at+free_at / map+unmap:         {ours / plain:6.2f}  (target <= {TARGET_RATIO:.2f})")
    print(f"  alloc_at+free_at / map+clear+unmap:   {ours / cleared:6.2f}")


def print_plain(title: str, unit: str, results: dict[str, float]) -> None:
    print(f"\n{title}")
    for label, value in results.items():
        print(f"  {label:<48} {value:>12.1f} {unit}")


def print_init(title: str, unit: str, rows: list[InitRow]) -> None:
    print(f"\n{title}")
    print(f"  {'guest RAM [MiB]':>15} {'frames [4 KiB]':>15} {'mmap entries':>12} {'RAM ranges':>10} "
          f"{'pmm_init [' + unit + ']':>26} {'QEMU VmHWM [MiB]':>17}")
    for r in rows:
        print(f"  {r.mib:>15} {r.frames:>15} {r.mmap_entries:>12} {r.ram_ranges:>10} {r.ticks:>26} "
              f"{r.hwm_kib / 1024:>17.1f}")


def print_run(run: Run) -> None:
    how = ("TCG, -icount shift=0,sleep=off: rdtsc counts executed instructions (exact, repeatable)"
           if run.accel == "tcg" else f"KVM: rdtsc counts TSC cycles (best of {KVM_REPEATS})")
    print_ops(f"{run.arch} PMM, {how}", run.unit, run.pmm)
    print_plain(f"{run.arch} VMM and heap, {run.accel.upper()} ({run.unit} per operation)", run.unit, run.vmm)
    if run.init is not None:
        best = "" if run.accel == "tcg" else f", best of {KVM_INIT_BOOTS} boots"
        print_init(f"{run.arch} PMM init, {run.accel.upper()} ({run.unit}{best}); guest RAM without a file, so VmHWM "
                   "shows what was touched", run.unit, run.init)
        if run.accel == "tcg":
            print("  " + init_verdict(run.init, run.unit))


def print_side_by_side(runs: list[Run]) -> None:
    if not runs:
        return
    width = max(14, *(len(f"{r.title} [{r.unit}]") for r in runs))
    header = "".join(f" {r.title + ' [' + r.unit + ']':>{width}}" for r in runs)

    def table(title: str, rows: list[tuple[str, list]]) -> None:
        print(f"\n{title}")
        print(f"  {'':<48}{header}")
        for label, values in rows:
            cells = "".join(f" {'-' if v is None else format(v, '.1f') if isinstance(v, float) else v:>{width}}"
                            for v in values)
            print(f"  {label:<48}{cells}")

    fullest_first = sorted(runs, key=lambda r: -(len(r.pmm) + len(r.vmm)))   # x86_64 has the PDPT+PD+PT case
    labels = list(dict.fromkeys(label for r in fullest_first for label in (*r.pmm, *r.vmm)))
    table("Side by side, per operation (empty loop subtracted)",
          [(label, [r.pmm.get(label, r.vmm.get(label)) for r in runs]) for label in labels])
    guests = sorted({row.mib for r in runs for row in r.init or ()})
    rows = []
    for mib in guests:
        cells = []
        for r in runs:
            row = next((x for x in r.init or () if x.mib == mib), None)
            cells.append(None if row is None else f"{row.ticks} ({row.hwm_kib / 1024:.1f})")
        rows.append((f"{mib} MiB", cells))
    if rows:
        table("Side by side, pmm_init per guest RAM (QEMU VmHWM in MiB)", rows)


def host_description() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        qemu = subprocess.run([X86_64.qemu, "--version"], capture_output=True, text=True,
                              timeout=10).stdout.splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        qemu = "QEMU version unknown"
    kvm = (" KVM here is kvm_pvm, a software hypervisor: its TSC cycles are not bare-metal cycles."
           if Path("/sys/module/kvm_pvm").is_dir() else "")
    return f"host: {os.cpu_count()} cores, {model}; {qemu}.{kvm}"


# ---- the runs -----------------------------------------------------------------------------------------------------

def bench_arch(arch: str, work: Path, *, init: bool = True, kvm: bool = True) -> list[Run]:
    """Every measurement of one architecture: TCG always, KVM where it can run the kernel."""
    out = build(Config.for_arch(arch), work / arch, iso=False)
    layout = out.kernel.layout
    with KernelSession(out.elf, layout, icount=True) as s:
        run = Run(arch, "tcg", per_op(s, 1), vmm_heap_ops(s, 1))
    if init:
        run.init = init_costs(arch, work, "tcg")
    print_run(run)
    runs = [run]
    if not kvm:
        return runs
    usable, why = kvm_usable_for(out.elf, BOOT_OK, qemu=layout.arch.qemu)
    if not usable:
        print(f"\n{arch} KVM: skipped: {why}")
        return runs
    print(f"\n{arch} KVM: {why}")
    with KernelSession(out.elf, layout, accel="kvm") as s:
        run = Run(arch, "kvm", per_op(s, KVM_REPEATS), vmm_heap_ops(s, KVM_REPEATS))
    if init:
        run.init = init_costs(arch, work, "kvm", boots=KVM_INIT_BOOTS)
    print_run(run)
    runs.append(run)
    return runs


def figures(runs: list[Run], host: str, allocators: list[AllocatorRun] = ()) -> dict:
    """What `kgen bench --json` prints and `--html` draws (kgen.inspect.html.bench_charts): every figure, by run;
    the allocators side by side under "allocators"."""
    return {"kgen_bench": 1, "host": host, "loops": LOOPS, "runs": [
        {"arch": r.arch, "accel": r.accel, "unit": r.unit, "pmm": r.pmm, "vmm": r.vmm,
         "init": None if r.init is None else [vars(row) for row in r.init],
         "init_verdict": init_verdict(r.init, r.unit) if r.init and r.accel == "tcg" else None} for r in runs],
        "allocators": [{"arch": r.arch, "accel": r.accel, "kind": r.kind, "unit": r.unit, "ops": r.ops,
                        "init": None if r.init is None else [vars(row) for row in r.init]} for r in allocators]}


def load_figures(path: Path, option: str = "--from-json") -> dict:
    """Figures `kgen bench --json` wrote, or one line naming the option that gave the file."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UsageError(f"{option} {path}: {getattr(e, 'strerror', None) or e}: give a file `kgen bench --json` "
                         "wrote") from None
    if not isinstance(data, dict) or data.get("kgen_bench") != 1:
        raise UsageError(f"{option} {path}: not the output of `kgen bench --json` (no \"kgen_bench\": 1)")
    return data


def _write_html(path: Path, data: dict, render_html) -> None:
    page = render_html(data)
    try:
        write_report(path, page)
    except OSError as e:
        raise UsageError(f"--html {path}: {e.strerror}: give a writable file path") from None
    print(f"kgen: wrote {path}", file=sys.stderr)


def main(argv=None, render_html=None) -> int:
    """The benchmarks' command line; `render_html(figures) -> str` draws --html's page (kgen.inspect's, handed in by
    `kgen bench`: the harness does not reach up to inspect)."""
    parser = OneLineParser(prog="kgen bench", description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=(*ARCHES, "all"), default="all", help="architecture(s) to measure")
    parser.add_argument("--no-init", action="store_true", help="skip the PMM init runs (64 MiB .. 3 or 8 GiB guests)")
    parser.add_argument("--no-kvm", action="store_true", help="TCG only: do not probe or use KVM")
    parser.add_argument("--no-allocators", action="store_true", help="skip the two frame allocators (pmm.kind) side "
                        "by side")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON on stdout (the tables go to "
                        "stderr)")
    parser.add_argument("--html", type=Path, metavar="FILE", help="also write the figures as a page of charts")
    parser.add_argument("--from-json", type=Path, metavar="FILE", help="measure nothing: take the figures from a "
                        "file `--json` wrote (to draw them with --html)")
    args = parser.parse_args(argv)
    if args.html and render_html is None:
        raise UsageError("--html draws the page with kgen inspect's renderer: run `kgen bench --html FILE`")
    if args.html:
        check_report_path("--html", args.html)      # before measuring, not after
    if args.from_json:
        data = load_figures(args.from_json)
    else:
        arches = tuple(ARCHES) if args.arch == "all" else (args.arch,)
        runs, allocators = [], []
        with contextlib.redirect_stdout(sys.stderr if args.json else sys.stdout):
            print(f"kgen bench: {host_description()}")
            print(f"{LOOPS} loops per operation; architectures: {', '.join(arches)}")
            with tempfile.TemporaryDirectory(prefix="kgen-bench-") as tmp:
                for arch in arches:
                    runs += bench_arch(arch, Path(tmp), init=not args.no_init, kvm=not args.no_kvm)
                    if not args.no_allocators:
                        # Under KVM where bench_arch found it usable: its KVM run is the probe's answer.
                        accels = ["tcg"] + ["kvm" for r in runs if r.arch == arch and r.accel == "kvm"]
                        for accel in accels:
                            allocators += bench_allocators(arch, Path(tmp), accel, init=not args.no_init)
            print_side_by_side(runs)
            print_allocators(allocators)
        data = figures(runs, host_description(), allocators)
    if args.json:
        print(json.dumps(data, indent=2))
    if args.html:
        _write_html(args.html, data, render_html)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
