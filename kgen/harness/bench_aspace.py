"""Costs of address spaces, the foreign slot and system calls, per architecture: `python -m kgen.harness.bench_aspace`.

Each figure is the call channel's rdtsc delta around one kernel call (kgen/guest/calls.py): executed instructions
under TCG with -icount (deterministic), cycles under KVM (kvm_pvm here: not bare-metal cycles). Each case is repeated
and the smallest delta kept. The foreign map+unmap is measured in a space that is attached but not running, at a
user address whose page table exists (another page keeps it), against the same local vmm_map+vmm_unmap in the
running space; the issue's target is a ratio within 1.2. The system-call round trip is (task_run of a program making
USER_NULL_CALLS empty calls - task_run of one that exits at once) / USER_NULL_CALLS; kvm_pvm does not deliver
system calls from ring 3 (docs/toolchain.md), so under KVM that row is absent.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from kgen.arch import ARCHES, hw
from kgen.build.config import Config
from kgen.build.pipeline import build
from kgen.errors import OneLineParser
from kgen.guest.bootreport import BOOT_OK
from kgen.harness.session import KernelSession
from kgen.machine import kvm_usable_for

REPEATS = 5
USER_RW = hw.PTE_P | hw.PTE_RW | hw.PTE_US


def _cost(s: KernelSession, routine: str, *args: int) -> int:
    return s.call_full(routine, *args, timeout=120).cycles


def _best(s: KernelSession, body) -> int:
    return min(body() for _ in range(REPEATS))


def measure(s: KernelSession, *, system_calls: bool = True) -> dict[str, float]:
    layout = s.layout
    arch = layout.arch
    results: dict[str, float] = {}
    boot = s.call("as_current")

    def create_destroy() -> int:
        created = s.call_full("as_create", timeout=120)
        return created.cycles + _cost(s, "as_destroy", created.eax)
    results["as_create + as_destroy (empty space)"] = _best(s, create_destroy)

    space = s.call("as_create")
    v = arch.span(0) + 3 * hw.PAGE_SIZE              # top-level slot 1: user half
    pin = v + hw.PAGE_SIZE                           # keeps v's tables alive in both spaces
    frame = s.call("pmm_alloc")
    assert s.call("as_attach", space) == 1
    assert s.call("vmm_map_in", space, pin, s.call("pmm_alloc"), USER_RW) == 1
    assert s.call("vmm_map", pin, s.call("pmm_alloc"), USER_RW) == 1

    def foreign() -> int:
        cost = _cost(s, "vmm_map_in", space, v, frame, USER_RW)
        return cost + _cost(s, "vmm_unmap_in", space, v)

    def local() -> int:
        cost = _cost(s, "vmm_map", v, frame, USER_RW)
        return cost + _cost(s, "vmm_unmap", v)
    results["vmm_map_in + vmm_unmap_in (foreign, table exists)"] = _best(s, foreign)
    results["vmm_map + vmm_unmap (local, table exists)"] = _best(s, local)
    results["ratio foreign / local"] = (results["vmm_map_in + vmm_unmap_in (foreign, table exists)"]
                                        / results["vmm_map + vmm_unmap (local, table exists)"])
    s.call("as_detach")

    def attach_detach() -> int:
        return _cost(s, "as_attach", space) + _cost(s, "as_detach")
    results["as_attach + as_detach"] = _best(s, attach_detach)

    def switch() -> int:
        return _cost(s, "as_switch", space) + _cost(s, "as_switch", boot)
    results["as_switch, one way (a CR3 load)"] = _best(s, switch) / 2

    if system_calls:
        def task_cost(program: str) -> int:
            top = s.call("as_create")
            entry = s.call("user_load", top, s.symbol(program), s.symbol(program + "_end"))
            task = s.call("task_create", top, entry, layout.user_lazy_window.end)
            cost = _cost(s, "task_run", task)
            s.call("task_release", task)
            return cost
        calls = layout.user_null_calls
        with_calls = _best(s, lambda: task_cost("user_null_calls"))
        without = _best(s, lambda: task_cost("user_exit"))
        results["system call round trip (write of 0 bytes)"] = (with_calls - without) / calls
    return results


def bench(arch: str, work: Path, accel: str) -> dict[str, float] | None:
    """One architecture's costs under `accel`; None (and a line saying why) where this host's KVM cannot run its
    kernel (kvm_pvm triple-faults 32-bit paging)."""
    out = build(Config.for_arch(arch), work / arch, iso=False)
    if accel == "kvm":
        usable, why = kvm_usable_for(out.elf, BOOT_OK, qemu=out.kernel.layout.arch.qemu)
        if not usable:
            print(f"{arch} KVM: skipped: {why}")
            return None
    with KernelSession(out.elf, out.kernel.layout, accel=accel, icount=accel == "tcg") as s:
        return measure(s, system_calls=accel == "tcg")


def main(argv=None) -> int:
    parser = OneLineParser(prog="kgen.harness.bench_aspace", description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=(*ARCHES, "all"), default="all")
    parser.add_argument("--kvm", action="store_true", help="also under KVM, each architecture it can run")
    args = parser.parse_args(argv)
    arches = tuple(ARCHES) if args.arch == "all" else (args.arch,)
    runs = []
    with tempfile.TemporaryDirectory(prefix="kgen-bench-aspace-") as tmp:
        for arch in arches:
            runs.append((f"{arch} TCG (instructions)", bench(arch, Path(tmp), "tcg")))
        for arch in arches if args.kvm else ():
            if (costs := bench(arch, Path(tmp), "kvm")) is not None:
                runs.append((f"{arch} KVM (cycles)", costs))
    rows = list(dict.fromkeys(k for _, r in runs for k in r))
    print("| operation | " + " | ".join(title for title, _ in runs) + " |")
    print("|---|" + "---:|" * len(runs))
    for row in rows:
        cells = []
        for _, r in runs:
            value = r.get(row)
            cells.append("—" if value is None else f"{value:.2f}" if row.startswith("ratio") else f"{value:,.0f}")
        print(f"| {row} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
