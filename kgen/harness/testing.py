"""Kernels under test: booting one to the state the invariant suite inspects, and `kgen test`, which runs that
suite (kgen/suite, shipped in the package) on pytest.

A kgen kernel is booted to serve calls (`kgen.serve`); it then sleeps in `hlt`, changing no memory, so it can be
stopped, inspected, and continued for the next call. Anyone else's Multiboot ELF has no call channel: it counts as
booted when it prints its ready marker, or, without one, when the CPU sits halted with paging on.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from kgen.guest.elfinfo import ElfInfo
from kgen.errors import (EXIT_CHECKS_FAILED, EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, KgenError,
                         MachineError, ToolMissing, UsageError)
from kgen.build.layout import Layout

# int3 in every byte of RAM the kernel did not write: code run from such memory traps at once, and as a paging
# entry 0xcccccccc is not present, so a table that was never cleared shows up as poison rather than as garbage
# mappings the walk would have to survive.
POISON = b"\xcc"
BOOT_TIMEOUT = 60.0
IDLE_POLL = 0.01
PLUGIN_ENTRY_POINT = "kgen"
KVM_PROBE_CACHE = ".kgen-kvm-probe.json"
SUITE = Path(__file__).resolve().parent / "suite"


@dataclass(frozen=True)
class KernelUnderTest:
    """The ELF and, for a kernel kgen built, the layout it was built from (None for anyone else's ELF)."""
    elf_path: Path
    elf: ElfInfo
    layout: Layout | None = None
    ready: str | None = None        # COM1 text a foreign kernel prints once booted

    @classmethod
    def built(cls, config_path: Path | None, out_dir: Path, arch: str | None = None) -> KernelUnderTest:
        from kgen.build import config as configmod
        from kgen.build.pipeline import build, current_elf
        from kgen.build.layout import compute
        config = configmod.load(config_path, arch)
        # Each parallel worker asks; linking again (~0.4 s) only to find the ELF up to date is the common case. The
        # stamp names the ELF's bytes too, so an ELF another build left beside it is not taken for this config's.
        elf = current_elf(config, out_dir) or build(config, out_dir, iso=False, force=False).elf
        return cls(elf, ElfInfo.load(elf), compute(config))

    @classmethod
    def foreign(cls, elf_path: Path, ready: str | None = None) -> KernelUnderTest:
        elf = ElfInfo.load(elf_path)
        if elf.bits != 32:
            raise KgenError(f"{elf_path}: an ELF{elf.bits}; QEMU's -kernel boots 32-bit Multiboot ELFs only")
        return cls(Path(elf_path), elf, None, ready)

    @property
    def qemu(self) -> str:
        """The QEMU binary for this kernel: its architecture's; a foreign (32-bit) ELF gets qemu-system-i386."""
        from kgen.arch import I386
        return (self.layout.architecture if self.layout is not None else I386).qemu

    @property
    def probe_marker(self) -> str | None:
        """COM1 text that shows a boot got far enough, for the KVM probe."""
        from kgen.guest.bootreport import BOOT_OK
        return BOOT_OK if self.layout is not None else self.ready


class LiveKernel:
    """A booted kernel. `view()` stops the guest and snapshots it; `call()` continues it and runs a routine."""

    def __init__(self, kernel: KernelUnderTest, machine, channel=None, poison: bytes | None = None):
        self.kernel = kernel
        self.machine = machine
        self.channel = channel
        self.poison = poison
        self._view = None

    def stop(self) -> None:
        if self.machine.status() == "running":
            self.machine.stop()

    def cont(self) -> None:
        self._view = None
        if self.machine.status() == "paused":
            self.machine.cont()

    def view(self):
        """The stopped guest as the invariant checks see it; taken again after anything continued the guest."""
        from kgen.guest.invariants import GuestView
        if self._view is None:
            self.stop()
            self._view = GuestView.capture(self.machine, self.kernel.elf, self.kernel.layout, self.poison)
        return self._view

    def write_phys(self, addr: int, data: bytes) -> None:
        self.stop()
        self._view = None
        self.machine.write_phys(addr, data)

    def call(self, routine: str | int, *args: int, timeout: float | None = None) -> int:
        """Run a kernel routine; one that faults or never returns raises `RunFailed` saying which and where."""
        from kgen.guest.calls import CallError
        from kgen.guest.diagnose import RunFailed, explain
        if self.channel is None:
            raise KgenError(f"{self.kernel.elf_path.name} has no kgen call channel: routines cannot be called")
        self.cont()
        try:
            return self.channel.call(routine, *args, **({} if timeout is None else {"timeout": timeout}))
        except CallError as err:
            # The channel appends COM1's tail; the diagnosis shows that in its details already.
            why = str(err).split("; last output", 1)[0]
            raise RunFailed(explain(self.machine, self.kernel.elf, why)) from err


@contextmanager
def boot(kernel: KernelUnderTest, accel: str = "tcg", *, poison: bytes | None = POISON,
         timeout: float = BOOT_TIMEOUT, cold: bool | None = None):
    """Boot to the inspectable state; a boot that fails raises `RunFailed` saying what the kernel did instead.

    The machine comes from a snapshot of that state when one exists (kgen/machine/snapshot.py; `cold=True` or
    `--kgen-cold-boot` boots every time)."""
    from kgen.guest.diagnose import RunFailed, explain
    from kgen.harness.session import KernelSession
    from kgen.machine.snapshot import fresh_machine

    if kernel.layout is not None:
        with KernelSession(kernel.elf_path, kernel.layout, accel=accel, poison=poison, cold=cold) as session:
            yield LiveKernel(kernel, session.machine, session.channel, poison)
        return

    def ready(machine) -> None:
        try:
            if kernel.ready is not None:
                machine.wait_for(kernel.ready, timeout)
            else:
                _wait_idle(machine, timeout)
        except MachineError as err:
            raise RunFailed(explain(machine, kernel.elf, err)) from err

    options = dict(kernel=kernel.elf_path, accel=accel, poison=poison, qemu=kernel.qemu)
    machine = fresh_machine(options, ready, f"ready: {kernel.ready}" if kernel.ready else "halted, paging on",
                            cold=cold)
    try:
        yield LiveKernel(kernel, machine, None, poison)
    finally:
        machine.shutdown()


def _wait_idle(machine, timeout: float) -> None:
    from kgen.arch.hw import CR0_PG
    deadline = time.monotonic() + timeout
    while True:
        state = machine.status()
        if state != "running":
            raise MachineError(f"the guest stopped in runstate {state} before it sat halted with paging on")
        regs = machine.registers()
        if regs.halted and regs.cr0 & CR0_PG:
            return
        if time.monotonic() >= deadline:
            raise MachineError(f"the guest did not halt with paging on within {timeout:g} s")
        time.sleep(IDLE_POLL)


def probe_kvm(kernel: KernelUnderTest, cache_dir: Path | None = None) -> tuple[bool, str]:
    """Whether KVM on this host can run this kernel (kvm_pvm cannot run 32-bit paging): one short boot.

    The boot costs seconds where KVM is a software hypervisor (≈3 s here), more than the rest of the suite, so the
    answer is kept in `cache_dir` for the same kernel bytes, QEMU binary and host kernel."""
    from kgen.machine import kvm_usable_for
    marker = kernel.probe_marker
    if marker is None:
        return False, "no ready marker for this kernel, so KVM cannot be probed (pass --kgen-ready)"
    cache = key = None
    if cache_dir is not None:
        qemu = shutil.which(kernel.qemu)
        key = hashlib.sha256(kernel.elf_path.read_bytes() + repr(
            (os.uname().release, qemu, qemu and os.stat(qemu).st_mtime_ns, os.access("/dev/kvm", os.R_OK | os.W_OK))
        ).encode()).hexdigest()
        cache = cache_dir / KVM_PROBE_CACHE
        try:
            saved = json.loads(cache.read_text())
            if saved["key"] == key:
                return saved["usable"], saved["why"] + " (probed earlier, answer kept in " + str(cache) + ")"
        except (OSError, ValueError, KeyError, TypeError):
            pass    # no answer kept, or not one we wrote: probe
    usable, why = kvm_usable_for(kernel.elf_path, marker, qemu=kernel.qemu)
    if cache is not None:
        cache.write_text(json.dumps({"key": key, "usable": usable, "why": why}))
    return usable, why


# --- `kgen test` ------------------------------------------------------------------------------------------------

def pytest_args(args, extra: list[str]) -> list[str]:
    """The pytest command line that runs the packaged suite as `kgen test` was asked to."""
    argv = [str(SUITE), "-c", str(SUITE / "pytest.ini"), "--rootdir", str(SUITE),
            # The suite may live in site-packages: write no cache there.
            "-p", "no:cacheprovider", "--kgen-accel", args.accel]
    if importlib.metadata.entry_points(group="pytest11", name=PLUGIN_ENTRY_POINT):
        # pytest would rewrite the asserts of the plugin's package, but `kgen test` has imported kgen already.
        argv += ["-W", "ignore::pytest.PytestAssertRewriteWarning"]
    else:
        argv += ["-p", "kgen.harness.pytest_plugin"]      # a checkout on PYTHONPATH: the entry point is not installed
    if args.kernel is not None:
        argv += ["--kgen-kernel", str(args.kernel.resolve())]
    else:
        if args.config is not None:
            argv += ["--kgen-config", str(args.config.resolve())]
        if args.arch is not None:
            argv += ["--kgen-arch", args.arch]
        argv += ["--kgen-out", str(args.out.resolve())]
    if getattr(args, "cold_boot", False):
        argv.append("--kgen-cold-boot")
    if args.keyword:
        argv += ["-k", args.keyword]
    if args.exitfirst:
        argv.append("-x")
    if args.junitxml is not None:
        argv.append(f"--junitxml={args.junitxml.resolve()}")
    if str(args.jobs) not in ("0", "1"):
        if importlib.util.find_spec("xdist") is None:
            raise ToolMissing("parallel machines need pytest-xdist: pip install 'kgen[test]', or pass -j 1")
        # By module: a module's machine booted for looking (kgen_idle) and the KVM probe then happen once.
        argv += ["-n", str(args.jobs), "--dist", "loadscope"]
    return argv + list(extra)


# pytest's exit codes (pytest.ExitCode) as kgen's (kgen/errors.py): pytest's 2 (interrupted) would read as a config
# error and its 3 (internal error) as a missing tool. 5 is "no tests collected" (a -k that selects nothing), 6 more
# warnings than a --max-warnings the user set.
PYTEST_EXIT = {0: EXIT_OK, 1: EXIT_CHECKS_FAILED, 2: EXIT_INTERRUPTED, 3: EXIT_INTERNAL, 4: EXIT_USAGE, 5: EXIT_USAGE,
               6: EXIT_CHECKS_FAILED}


def check_keyword(expression: str) -> None:
    """Refuse a -k expression pytest would refuse, before anything is built."""
    try:
        from _pytest.mark.expression import Expression     # pytest's own parser; private, so only if it is there
    except ImportError:
        return
    try:
        Expression.compile(expression)
    except Exception as err:  # noqa: BLE001 - ParseError, whose home module is private too
        raise UsageError(f"-k {expression!r}: {err}") from None


def check_report_path(option: str, path: Path) -> None:
    """A report file pytest will write at the very end: refuse now, in one line, a path it could not write (pytest
    would fail after the whole run, with a traceback)."""
    def refuse(why: str) -> UsageError:
        return UsageError(f"{option} {path}: {why}; choose another path")

    if path.is_dir():
        raise refuse("is a directory")
    parent = path.parent
    while not (parent.exists() or parent.is_symlink()):
        parent = parent.parent
    if not parent.is_dir():
        raise refuse(f"{parent} is not a directory")
    probe = parent / f".kgen-probe.{os.getpid()}.{time.monotonic_ns()}"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError as err:
        raise refuse(f"cannot create files in {parent} ({err.strerror or err})") from None
    finally:
        probe.unlink(missing_ok=True)


def require_qemu(binary: str) -> None:
    """The suite boots every kernel it checks: without QEMU say so once, as `kgen run` does, not in every test."""
    if shutil.which(binary) is None:
        from kgen.machine import QEMU_PACKAGE
        raise ToolMissing(f"{binary} not found: install the Debian package {QEMU_PACKAGE}")


def run_suite(args, extra: list[str]) -> int:
    """`kgen test`: build the kernel (unless --kernel), run the suite; pytest's exit status mapped onto kgen's.

    pytest's temporary directories go in a directory of this run's, removed at the end, so nothing is left in the
    user's TMPDIR (pytest would keep `pytest-of-USER/` there)."""
    if importlib.util.find_spec("pytest") is None:
        raise ToolMissing("kgen test needs pytest: pip install 'kgen[test]'")
    if args.keyword:
        check_keyword(args.keyword)
    if args.junitxml is not None:
        check_report_path("--junitxml", args.junitxml)
    if args.kernel is not None:
        if not args.kernel.is_file():
            raise UsageError(f"--kernel {args.kernel}: no such file" if not args.kernel.exists()
                             else f"--kernel {args.kernel}: not a file")
        try:
            kernel = KernelUnderTest.foreign(args.kernel)    # a file that is no usable ELF fails here, in one line
        except KgenError as err:
            raise UsageError(f"--kernel {err}") from None
        require_qemu(kernel.qemu)
    else:
        from kgen.build import config as configmod
        from kgen.build.layout import compute
        from kgen.build.pipeline import check_out_dir
        check_out_dir(args.out)
        require_qemu(compute(configmod.load(args.config, args.arch)).architecture.qemu)
        # Built once here, so parallel workers find it up to date instead of each writing it.
        KernelUnderTest.built(args.config, args.out, args.arch)
    argv = pytest_args(args, extra)
    import pytest

    scratch = None
    if not any(arg == "--basetemp" or arg.startswith("--basetemp=") for arg in extra):
        scratch = Path(tempfile.mkdtemp(prefix="kgen-test-"))
        argv += ["--basetemp", str(scratch / "pytest")]
    try:
        status = int(pytest.main(argv))
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    code = PYTEST_EXIT.get(status, EXIT_INTERNAL)
    if code == EXIT_INTERRUPTED:
        raise KeyboardInterrupt         # one line and 130, as anywhere else in kgen
    if status == 5:
        raise UsageError("no test was selected" + (f" by -k {args.keyword!r}" if args.keyword else "")
                         + "; `kgen test -- --collect-only -q` lists them")
    if status == 3:
        raise KgenError("pytest stopped with an internal error (its report is above)")
    return code
