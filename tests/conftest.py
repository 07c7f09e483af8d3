"""Shared fixtures: kernels built once per session from the layouts the tests then read; `run_kgen`, the command
line as a user runs it."""
import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import strategies as st

from kgen.build import iso
from kgen.build.pipeline import BuildOutput, build, fingerprint
from kgen.machine import firmware
from kgen.build.config import Config
from kgen.harness.session import KernelSession

# Guest RAM starts as this byte everywhere the loader did not write, so a structure nobody cleared shows up.
POISON = 0xA5

needs_qemu = pytest.mark.skipif(shutil.which("qemu-system-i386") is None,
                                reason="qemu-system-i386 not installed (Debian package qemu-system-x86)")
needs_efi = pytest.mark.skipif(not iso.GRUB_EFI_MODULES.is_dir() or not any(c.is_file() for c, _ in
                                                                        firmware.OVMF_CANDIDATES),
                               reason="UEFI needs the Debian packages grub-efi-amd64-bin and ovmf")
needs_grub = pytest.mark.skipif(shutil.which("grub-mkrescue") is None,
                                reason="grub-mkrescue not installed (Debian packages grub-common grub-pc-bin)")

# ---- kgen on the command line ------------------------------------------------------------------------------------
def one_line(result) -> str:
    """The single stderr line of a refused command; no traceback, nothing on stdout."""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr and result.stdout == "", result.stdout + result.stderr
    assert lines[0].startswith("kgen: error: "), lines[0]
    return lines[0]


@pytest.fixture
def short_tmpdir():
    """A TMPDIR of the test's own to look into afterwards; short, as QEMU's unix socket paths live in it (at most
    108 bytes: under pytest's long tmp_path a boot fails at launch)."""
    path = Path(tempfile.mkdtemp(prefix="kgen-t-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


ROOT = Path(__file__).resolve().parent.parent
# What a user runs: the venv's console script; without one (no venv), the module it calls.
KGEN = [str(Path(sys.executable).with_name("kgen"))]
if not Path(KGEN[0]).exists():
    KGEN = [sys.executable, "-m", "kgen.cli"]


def kgen_env(**changes: str) -> dict[str, str]:
    """The environment of a kgen subprocess: this process's, with this checkout first on PYTHONPATH (the kgen under
    test, wherever the venv's editable install points), and `changes` on top."""
    return {**os.environ, "PYTHONPATH": str(ROOT), **changes}


def run_kgen(*args, env: dict[str, str] | None = None, timeout: float = 300,
             **options) -> subprocess.CompletedProcess:
    """`kgen ARGS` in a new process, as a user runs it, stdout and stderr captured as text. `env`: variables set on
    top of `kgen_env()`; `options` go to subprocess.run (cwd, stdin...)."""
    return subprocess.run([*KGEN, *map(str, args)], capture_output=True, text=True, env=kgen_env(**(env or {})),
                          timeout=timeout, **options)


def start_kgen(*args, env: dict[str, str] | None = None, **options) -> subprocess.Popen:
    """`kgen ARGS` started, for a test that reads or signals it while it runs: stdout and stderr piped as text
    unless `options` (for subprocess.Popen) say otherwise."""
    options = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True, **options}
    return subprocess.Popen([*KGEN, *map(str, args)], env=kgen_env(**(env or {})), **options)


def suite_node_ids(*options: str) -> list[str]:
    """The node ids of the checks `kgen test OPTIONS` runs, in collection order: kgen's own pytest command line for
    them, collected in this process (nothing is built or booted by collecting; ~0.1 s)."""
    from kgen.cli import parser
    from kgen.cli.test import pytest_args

    class Recorder:
        ids: list[str] = []

        def pytest_collection_finish(self, session):
            Recorder.ids = [item.nodeid for item in session.items]
    args = parser().parse_args(["test", "-j", "1", *options])
    if args.out is None:
        args.out = Path("out")          # what kgen's main fills in; nothing is written while collecting
    status = pytest.main(pytest_args(args, []) + ["--collect-only", "-q"], plugins=[Recorder()])
    assert status in (0, 5), f"collecting the suite failed: pytest status {status}"     # 5: nothing selected
    return Recorder.ids


# ---- kernels built once per test run ------------------------------------------------------------------------------
def run_dir(tmp_path_factory) -> Path:
    """A directory every xdist worker of this test run shares: the parent of the workers' own temporary directories
    (pytest-N/ beside popen-gw0/...), or this process's when the run has no workers."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def shared_build(tmp_path_factory, config: Config, *, iso: bool = False) -> BuildOutput:
    """`build(config)` once per test run, by whichever worker asks first, into a directory named by the build's
    fingerprint (and whether it holds an ISO) in `run_dir`. Another worker asking meanwhile waits on the directory's
    build lock, then finds its stamp current and takes the files as they are (kgen/build/pipeline.py): an ELF is
    never rewritten while a worker boots it. Each worker still links the kernel itself, for its layout and image."""
    out = run_dir(tmp_path_factory) / "kgen-builds" / f"{fingerprint(config)[:20]}-{'iso' if iso else 'elf'}"
    return build(config, out, iso=iso, force=False)


HAVE_GRUB = shutil.which("grub-mkrescue") is not None


@pytest.fixture(scope="session")
def default_build(tmp_path_factory):
    """The default kernel: ELF and ISO."""
    return shared_build(tmp_path_factory, Config(), iso=HAVE_GRUB)


@pytest.fixture(scope="session")
def fault_build(tmp_path_factory):
    """A kernel that touches an unmapped page right after boot."""
    return shared_build(tmp_path_factory, Config(fault_at_boot=True))


@pytest.fixture(scope="session")
def x86_64_build(tmp_path_factory):
    """The default x86_64 kernel: ELF64 and ISO."""
    return shared_build(tmp_path_factory, Config.for_arch("x86_64"), iso=HAVE_GRUB)


@pytest.fixture(scope="session")
def x86_64_fault_build(tmp_path_factory):
    """An x86_64 kernel whose kmain writes to the physical load address, unmapped once the boot stub is done."""
    return shared_build(tmp_path_factory, Config.for_arch("x86_64", fault_at_boot=True))


# Every architecture's default kernel and fault variant, by the fixture that builds it.
ARCH_BUILDS = {"i386": "default_build", "x86_64": "x86_64_build"}
ARCH_FAULT_BUILDS = {"i386": "fault_build", "x86_64": "x86_64_fault_build"}


@pytest.fixture(params=tuple(ARCH_BUILDS))
def arch_build(request):
    """The default kernel of each architecture in turn (test ids end in [i386] / [x86_64])."""
    return request.getfixturevalue(ARCH_BUILDS[request.param])


@pytest.fixture(params=tuple(ARCH_FAULT_BUILDS))
def arch_fault_build(request):
    """The fault_at_boot kernel of each architecture in turn."""
    return request.getfixturevalue(ARCH_FAULT_BUILDS[request.param])


@pytest.fixture
def session(default_build):
    """The default kernel booted to serve calls, on poisoned RAM; a fresh machine per test."""
    with KernelSession(default_build.elf, default_build.kernel.layout, poison=POISON) as s:
        yield s


# ---- the memory-manager tests (test_pmm, test_vmm, test_heap, test_aspace): every architecture, TCG, KVM where it can
_KVM_PROBES: dict[str, tuple[bool, str]] = {}
KVM_PROBE_LOCK = ".kvm-probe.lock"


def require_kvm(out) -> None:
    """Skip unless KVM on this host runs this kernel (kvm_pvm here runs long mode, not the i386 kernel's 32-bit
    paging): one probe boot per ELF and test run, its answer kept beside the ELF for the other workers (a build of
    `shared_build`: its directory lives as long as the run), a probe at a time."""
    from kgen.guest.elfinfo import ElfInfo
    from kgen.harness.kernel import KernelUnderTest
    from kgen.harness.kvmprobe import probe_kvm
    key = str(out.elf)
    if key not in _KVM_PROBES:
        with open(out.elf.parent / KVM_PROBE_LOCK, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            _KVM_PROBES[key] = probe_kvm(KernelUnderTest(out.elf, ElfInfo.load(out.elf), out.kernel.layout),
                                         out.elf.parent)
    usable, why = _KVM_PROBES[key]
    if not usable:
        pytest.skip(f"KVM cannot run the {out.kernel.layout.arch} kernel here: {why}")


def open_session(out, accel: str = "tcg", **options) -> KernelSession:
    """A session on `out` (a BuildOutput) with its architecture's QEMU, on RAM poisoned with POISON unless
    `poison=` says otherwise; skipped where that QEMU is missing."""
    qemu = out.kernel.layout.arch.qemu
    if shutil.which(qemu) is None:
        pytest.skip(f"{qemu} not installed (Debian package qemu-system-x86)")
    return KernelSession(out.elf, out.kernel.layout, accel=accel, **{"poison": POISON, **options})


@pytest.fixture(scope="module", params=tuple(ARCH_BUILDS))
def arch(request) -> str:
    """Each architecture in turn: test ids carry [i386] / [x86_64]. `X86_64_ONLY` narrows a test to one."""
    return request.param


@pytest.fixture(scope="module")
def kernel_build(request, arch):
    """The default kernel of `arch` (the session-wide build)."""
    return request.getfixturevalue(ARCH_BUILDS[arch])


@pytest.fixture(scope="module")
def bitmap_build(tmp_path_factory, arch):
    """`arch`'s kernel with the bitmap frame allocator (pmm.kind = "bitmap"), built once per test run."""
    return shared_build(tmp_path_factory, Config.for_arch(arch, pmm_kind="bitmap"))


@pytest.fixture(scope="module")
def accel(request, kernel_build):
    """TCG (or --kgen-accel), unless a test asks for its own (`KVM_ONLY`, indirect); KVM is probed first and the
    test skipped with the probe's reason where this host's KVM cannot run the kernel."""
    accel = getattr(request, "param", None) or request.config.getoption("kgen_accel", default="tcg")
    if accel == "kvm":
        require_kvm(kernel_build)
    return accel


@pytest.fixture
def kernel(kernel_build, accel):
    """`arch`'s default kernel booted on poisoned RAM to serve calls: a fresh machine per test."""
    with open_session(kernel_build, accel) as s:
        yield s


KVM_ONLY = pytest.mark.parametrize("accel", ["kvm"], indirect=True)
X86_64_ONLY = pytest.mark.parametrize("arch", ["x86_64"], indirect=True)


def walker(s: KernelSession):
    """A fresh walk of the kernel's page tables, in the paging mode the CPU says it is in (EFER.LMA, CR4.PAE:
    `GuestView.mode`, which must be the layout's), from the CR3 it holds; checks the recursive slot on the way.
    A stopped machine stays stopped. Once QEMU has exited (a test that made the kernel fault) its RAM file still
    holds the tables: they are walked from the boot report's CR3, in the layout's mode."""
    from kgen.guest import bootreport
    from kgen.guest.invariants import GuestView
    from kgen.guest.pagewalk import Walker
    paging = s.layout.arch.paging
    state = s.machine.status()
    if state not in ("running", "paused"):
        cr3, mode, pse, nxe = bootreport.parse(s.machine.serial).cr3, paging, True, bool(paging.nx_levels)
    else:
        if state == "running":
            s.machine.stop()
        try:
            view = GuestView.capture(s.machine, s.elf, s.layout)
        finally:
            if state == "running":
                s.machine.cont()
        assert view.mode == paging, f"the CPU runs {view.mode.name} paging, the layout says {paging.name}"
        cr3, mode, pse, nxe = view.regs.cr3, view.mode, view.walker.pse, view.walker.nxe
    return Walker(s.machine.read_phys, cr3 & mode.cr3_mask, mode, pse=pse, nxe=nxe,
                  recursive_slot=s.layout.recursive_slot)


# ---- model-based runs: a kernel and a model of it, driven through operations hypothesis draws ---------------------
def op_lists(*ops: tuple, min_size: int, max_size: int):
    """Lists of operations `(name, *draws)`; each of `ops` is `(name, *strategies for its arguments)`, and a name
    given twice is drawn about twice as often."""
    return st.lists(st.one_of([st.tuples(st.just(name), *draws) for name, *draws in ops]),
                    min_size=min_size, max_size=max_size)


class DrivenModel:
    """What `run_model` asks of a model besides one method per operation, which makes the kernel's calls and
    checks their answers against the model's prediction."""

    def after_step(self) -> None:
        """Cheap checks after every operation."""

    def check(self) -> None:
        """The whole machine against the model."""

    def release(self) -> None:
        """Give back everything the operations took, and check that nothing leaked."""


def run_model(model: DrivenModel, ops, *, check_every: int | None = None) -> None:
    """Each operation in turn (`model.<name>(*draws)`), `model.after_step()` after each, `model.check()` every
    `check_every` operations and at the end, then `model.release()`. A failed example skips the release: the next
    example starts from whatever the machine holds, unless each boots its own."""
    for i, (name, *draws) in enumerate(ops):
        getattr(model, name)(*draws)
        model.after_step()
        if check_every and i % check_every == check_every - 1:
            model.check()
    model.check()
    model.release()
