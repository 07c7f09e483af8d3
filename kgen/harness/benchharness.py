"""What the machine harness costs, measured here: `kgen bench --harness [--runs N] [--arch A] [--no-kvm] [--suite]
[--hypothesis] [--json]`.

The figure that matters is what a test pays for its fresh machine: booted cold (QEMU start, firmware, the kernel's
boot, and QEMU's end) or restored from a snapshot of the serving kernel (kgen/machine/snapshot.py: `loadvm` into
the QEMU the last test gave back, RAM copied back). Both are measured in the same run, per architecture, under TCG
and under KVM where this host's KVM runs the kernel; the ratio restore/cold is printed. Also: how long a failing
hypothesis test that boots a machine per example takes to report its shrunk example, the wall time of `kgen test`,
physical-read throughput and a full page walk. A script, not a timed test: the figures depend on the host and
belong in docs/benchmarks.md with the machine they came from.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from kgen.arch import ARCHES
from kgen.errors import OneLineParser
from kgen.harness.kernel import KernelUnderTest
from kgen.harness.kvmprobe import probe_kvm
from kgen.harness.live import boot
from kgen.harness.session import KernelSession


def _median_seconds(action, runs: int) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        action()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def fresh_machine_costs(kernel, accel: str, runs: int) -> dict:
    """Median seconds for a test's machine from start to shut down, cold and by restore, with a call in each so a
    machine that does not serve cannot look fast."""

    def session(cold: bool):
        with KernelSession(kernel.elf_path, kernel.layout, accel=accel, poison=b"\xcc", cold=cold) as s:
            assert s.call("pmm_alloc") != 0
    session(False)          # the boot that makes the snapshot is not a restore
    cold = _median_seconds(lambda: session(True), runs)
    restore = _median_seconds(lambda: session(False), runs)
    return {"cold_ms": cold * 1000, "restore_ms": restore * 1000, "ratio": restore / cold}


FAILING_HYPOTHESIS_TEST = textwrap.dedent('''
    from hypothesis import given, settings, strategies as st, HealthCheck
    from kgen.harness.session import KernelSession
    from kgen.harness.kernel import KernelUnderTest

    KERNEL = KernelUnderTest.built(None, __import__("pathlib").Path({out!r}), {arch!r})

    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(st.lists(st.integers(1, 4), max_size=12))
    def test_fails_once_six_frames_are_taken(counts):
        with KernelSession(KERNEL.elf_path, KERNEL.layout, poison=b"\\xcc") as s:
            taken = 0
            for n in counts:
                for _ in range(n):
                    assert s.call("pmm_alloc") != 0
                    taken += 1
            assert taken < 6, "a bug on purpose: six frames are too many"
''')


def failing_hypothesis_report(out: Path, arch: str, cold: bool) -> tuple[float, str]:
    """Seconds until pytest reports the shrunk example of a hypothesis test that fails on purpose."""
    with tempfile.TemporaryDirectory(prefix="kgen-bench-hyp-") as tmp:
        test = Path(tmp) / "test_failing.py"
        test.write_text(FAILING_HYPOTHESIS_TEST.format(out=str(out), arch=arch))
        env = dict(os.environ, **({"KGEN_COLD_BOOT": "1"} if cold else {}))
        env.pop("KGEN_COLD_BOOT", None) if not cold else None
        started = time.perf_counter()
        result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(test),
                                 "--basetemp", str(Path(tmp) / "t")],
                                capture_output=True, text=True, env=env, cwd=tmp)
        elapsed = time.perf_counter() - started
    shrunk = next((line.strip() for line in result.stdout.splitlines() if "counts=" in line), "no example shown")
    if result.returncode == 0:
        shrunk = "the test passed: it was meant to fail"
    return elapsed, shrunk


def suite_wall_time(out: Path, jobs: str, cold: bool) -> tuple[float, str]:
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "kgen.cli", "test", "--out", str(out), "-j", jobs]
                            + (["--cold-boot"] if cold else []), capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    lines = result.stdout.strip().splitlines()
    return elapsed, (lines[-1].strip("= ") if lines else f"exit status {result.returncode}")


def read_throughput(machine, size: int, runs: int) -> float:
    """MiB/s of `read_phys` for `size`-byte reads spread over guest RAM above 1 MiB."""
    top = machine.memory_mib << 20
    addresses = [(1 << 20) + (i * size) % (top - (1 << 20) - size) for i in range(runs)]
    started = time.perf_counter()
    for addr in addresses:
        machine.read_phys(addr, size)
    return size * runs / (time.perf_counter() - started) / (1 << 20)


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(prog="kgen bench --harness", description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=15, help="machines per median (default 15)")
    p.add_argument("--arch", choices=(*ARCHES, "all"), default="all")
    p.add_argument("--no-kvm", action="store_true", help="TCG only")
    p.add_argument("--suite", action="store_true", help="also time whole `kgen test` runs, cold and restored")
    p.add_argument("--hypothesis", action="store_true",
                   help="also time a failing hypothesis test until it reports its shrunk example")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = p.parse_args(argv)
    arches = tuple(ARCHES) if args.arch == "all" else (args.arch,)
    figures: dict = {"host": {"cores": os.cpu_count()}, "fresh machine": [], "hypothesis": [], "suite": []}
    say = (lambda *a: None) if args.json else print
    say(f"host: {os.cpu_count()} cores; medians of {args.runs}; guest RAM poisoned")
    with tempfile.TemporaryDirectory(prefix="kgen-bench-") as tmp:
        for arch in arches:
            out = Path(tmp) / arch
            kernel = KernelUnderTest.built(None, out, arch)
            accels = ["tcg"]
            if not args.no_kvm:
                usable, why = probe_kvm(kernel)
                if usable:
                    accels.append("kvm")
                else:
                    say(f"{arch} kvm: not measured ({why.splitlines()[0][:120]})")
            for accel in accels:
                costs = fresh_machine_costs(kernel, accel, args.runs)
                figures["fresh machine"].append({"arch": arch, "accel": accel,
                                                 "memory_mib": kernel.layout.memory_mib, **costs})
                say(f"{arch} {accel} {kernel.layout.memory_mib} MiB: fresh machine per test: cold boot "
                    f"{costs['cold_ms']:.0f} ms, restore {costs['restore_ms']:.1f} ms, ratio {costs['ratio']:.3f}")
            if args.hypothesis:
                for cold in (False, True):
                    elapsed, shrunk = failing_hypothesis_report(out, arch, cold)
                    how = "cold boots" if cold else "restores"
                    figures["hypothesis"].append({"arch": arch, "cold": cold, "seconds": elapsed, "shrunk": shrunk})
                    say(f"{arch} failing hypothesis test, {how}: reported in {elapsed:.1f} s ({shrunk})")
            if args.suite:
                for cold in (True, False):
                    elapsed, summary = suite_wall_time(out, "1", cold)
                    figures["suite"].append({"arch": arch, "cold": cold, "seconds": elapsed, "summary": summary})
                    say(f"{arch} kgen test -j 1, {'cold boots' if cold else 'restores'}: {elapsed:.1f} s ({summary})")
        kernel = KernelUnderTest.built(None, Path(tmp) / arches[0], arches[0])
        with boot(kernel) as live:
            live.stop()
            for size, runs in ((4096, 20000), (1 << 20, 500)):
                rate = read_throughput(live.machine, size, runs)
                figures.setdefault("read_phys MiB/s", {})[f"{size >> 10} KiB"] = rate
                say(f"read_phys {size >> 10:>6} KiB blocks: {rate:,.0f} MiB/s")
            view = live.view()
            # A fresh walker each time: a Walker keeps its whole walk once made.
            walk = _median_seconds(lambda: view.walker_of(view.regs.cr3).mappings(), 20)
            figures["full walk ms"] = walk * 1000
            say(f"full walk of the {arches[0]} address space ({len(view.walker.mappings())} ranges): "
                f"{walk * 1000:.2f} ms")
    if args.json:
        print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
