"""What the machine harness costs, measured here: `python -m kgen.harness.benchharness [--runs N] [--skip-suite]`.

Prints the median per-test overhead (a fresh kernel booted to serve calls, RAM poisoned, then shut down), the wall
time of `kgen test` (first and later runs, one worker and parallel), physical-read throughput through the mapped
RAM file, and how long a walk of the whole 4 GiB address space of the idle kernel takes. A script, not a timed
test: the figures depend on the host and belong in the README with the machine they came from.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kgen.guest.pagewalk import I386, Walker
from kgen.harness.testing import KernelUnderTest, boot


def _median_seconds(action, runs: int) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        action()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def per_test_overhead(kernel: KernelUnderTest, runs: int) -> float:
    def one():
        with boot(kernel):
            pass
    return _median_seconds(one, runs)


def suite_wall_time(out: Path, jobs: str) -> tuple[float, str]:
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "kgen.cli", "test", "--out", str(out), "-j", jobs],
                            capture_output=True, text=True)
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
    p = argparse.ArgumentParser(prog="python -m kgen.harness.benchharness", description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=15, help="boots for the per-test median (default 15)")
    p.add_argument("--skip-suite", action="store_true", help="do not time a whole `kgen test` run")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="kgen-bench-") as tmp:
        out = Path(tmp) / "build"
        kernel = KernelUnderTest.built(None, out)
        print(f"host: {os.cpu_count()} cores, accel tcg, guest {kernel.layout.memory_mib} MiB")
        print(f"per-test overhead (boot to serving + shutdown, median of {args.runs}): "
              f"{per_test_overhead(kernel, args.runs) * 1000:.0f} ms")
        if not args.skip_suite:
            # The first run probes KVM with a boot of its own (seconds under a software KVM); later runs reuse the
            # answer kept in the build directory.
            for jobs, when in (("1", "first run, KVM probe included"), ("1", "again"), ("auto", "again")):
                elapsed, summary = suite_wall_time(out, jobs)
                print(f"kgen test -j {jobs} ({when}): {elapsed:.2f} s wall ({summary})")
        with boot(kernel) as live:
            live.stop()
            machine = live.machine
            for size, runs in ((4096, 20000), (1 << 20, 500), (machine.memory_mib << 20, 5)):
                print(f"read_phys {size >> 10:>6} KiB blocks: {read_throughput(machine, size, runs):,.0f} MiB/s")
            cr3 = machine.registers().cr3

            def walk():
                Walker(machine.read_phys, cr3, I386).mappings()
            walk_time = _median_seconds(walk, 50)
            mapped = Walker(machine.read_phys, cr3, I386).mappings()
        print(f"full 4 GiB walk (fresh walker, {len(mapped)} ranges): {walk_time * 1000:.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
