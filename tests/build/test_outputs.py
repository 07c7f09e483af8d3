"""Outputs that cannot lie and success that cannot be faked: Ctrl-C at any moment of a build is one line and 130,
LIEF's import included; an ELF and ISO in one --out are a pair named by the stamp, also when a build is interrupted
between them or two builds share the directory; `kgen run` succeeds only on the kernel's own success line and the
success status, never on a stray write to the debug-exit port."""
from __future__ import annotations

import fcntl
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import minikernels
from kgen import errors
from kgen.build import config as configmod
from kgen.build.pipeline import FINGERPRINT_NAME, LOCK_NAME, _current, _digest, _read_stamp, current_elf
from kgen.guest.bootreport import EXIT_SUCCESS

from conftest import needs_grub, needs_qemu, run_kgen, start_kgen

TEMP_NAMES = re.compile(r"^\.kernel\.(elf|iso)\..*(tmp|partial)$|^\.kgen-build\..*\.tmp$|^\.kgen-probe")


def wait_until(proc: subprocess.Popen, ready, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"kgen ended before {what}: {proc.communicate()}"
        assert time.monotonic() < deadline, f"kgen never got to {what}"
        time.sleep(0.002)


def lief_loaded(pid: int) -> bool:
    try:
        return "lief" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def interrupted(proc: subprocess.Popen) -> str:
    """SIGINT, as Ctrl-C sends it; the process must end with 130 and the one line."""
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == errors.EXIT_INTERRUPTED, (proc.returncode, stderr)
    assert stderr.strip().splitlines() == ["kgen: interrupted"], stderr
    return stdout


def config_file(tmp_path: Path, name: str, text: str) -> tuple[Path, configmod.Config]:
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    return path, configmod.load(path)


def no_temp_files(out: Path) -> None:
    left = [p.name for p in out.iterdir() if TEMP_NAMES.match(p.name)] if out.exists() else []
    assert left == [], left


def elf_in_iso(iso: Path) -> bytes:
    """The kernel.elf GRUB boots from the ISO (xorriso, which grub-mkrescue needs anyway)."""
    target = iso.with_name(f".test-elf-from-iso-{os.getpid()}")
    try:
        subprocess.run(["xorriso", "-osirrox", "on", "-indev", str(iso), "-extract", "/boot/kernel.elf", str(target)],
                       check=True, capture_output=True, timeout=60)
        return target.read_bytes()
    finally:
        target.unlink(missing_ok=True)


def pair_is_honest(out: Path) -> bool:
    """Whatever state a build left: an ISO beside an ELF holds exactly that ELF, and a stamp names the bytes of the
    files beside it (and an ISO only if there is one). True when a stamp claims the outputs are current.

    Which config a stamp names is not asked here: its fingerprint covers kgen's own source, which other work in a
    shared checkout may change while a test runs."""
    elf, iso = out / "kernel.elf", out / "kernel.iso"
    if iso.exists():
        assert elf.exists() and elf_in_iso(iso) == elf.read_bytes(), "the ISO holds another ELF than kernel.elf"
    stamp = _read_stamp(out)
    if not stamp:
        return False
    assert stamp["elf"] == _digest(elf), "the stamp names another ELF"
    assert stamp["iso"] == (_digest(iso) if iso.exists() else None), "the stamp names another ISO, or none"
    return True


# --- Ctrl-C -------------------------------------------------------------------------------------------------------

def test_ctrl_c_while_lief_loads_is_one_line_and_130(tmp_path):
    """LIEF's C++ extension aborted the process (std::terminate, ~20 lines, SIGABRT) when Ctrl-C came while it
    was being imported."""
    for round_ in range(4):
        out = tmp_path / f"out{round_}"
        proc = start_kgen("build", "--no-iso", "--out", out)
        wait_until(proc, lambda: lief_loaded(proc.pid), "importing LIEF")
        interrupted(proc)
        assert not out.exists()


@needs_grub
@pytest.mark.parametrize("delay", [0.0, 0.1, 0.3, 0.6, 1.0])
def test_ctrl_c_at_any_moment_of_a_build_leaves_no_lying_pair(tmp_path, delay):
    """Interrupted wherever it is (linking, the ELF, GRUB, the stamp), a build over an older config's outputs leaves
    them either whole and stamped, or unstamped: never an ELF and ISO claiming to be a pair they are not."""
    old_path, _ = config_file(tmp_path, "old", "[tempmap]\nslots = 8\n")
    new_path, _ = config_file(tmp_path, "new", "")
    out = tmp_path / "out"
    assert run_kgen("build", "--config", old_path, "--out", out).returncode == 0
    proc = start_kgen("build", "--config", new_path, "--out", out)
    wait_until(proc, lambda: lief_loaded(proc.pid), "importing LIEF")
    time.sleep(delay)
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    if proc.returncode == 0:            # it finished first: then the new pair is there
        assert pair_is_honest(out)
    else:
        assert proc.returncode == errors.EXIT_INTERRUPTED, stderr
        assert stderr.strip().splitlines() == ["kgen: interrupted"], stderr
        pair_is_honest(out)
    no_temp_files(out)


def fake_grub(tmp_path: Path) -> tuple[dict, Path]:
    """A grub-mkrescue that says it started and then takes its time, first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    started = tmp_path / "grub-started"
    script = bin_dir / "grub-mkrescue"
    script.write_text(f"#!/bin/sh\ntouch {started}\nexec sleep 60\n")
    script.chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}"}, started


@needs_grub
def test_an_iso_step_interrupted_leaves_no_elf_beside_the_old_iso(tmp_path):
    """The reproducer: Ctrl-C while GRUB makes the ISO left the new kernel.elf beside the previous config's
    kernel.iso, whole and bootable, and the stamp that a later `kgen test` trusted."""
    old_path, old = config_file(tmp_path, "old", "[tempmap]\nslots = 8\n")
    new_path, new = config_file(tmp_path, "new", "")
    out = tmp_path / "out"
    assert run_kgen("build", "--config", old_path, "--out", out).returncode == 0
    assert pair_is_honest(out)
    env, started = fake_grub(tmp_path)
    proc = start_kgen("build", "--config", new_path, "--out", out, env=env)
    wait_until(proc, started.exists, "making the ISO")
    interrupted(proc)
    assert not (out / "kernel.iso").exists(), "the old config's ISO is still there beside the new ELF"
    assert not (out / FINGERPRINT_NAME).exists()
    assert current_elf(new, out) is None and current_elf(old, out) is None
    no_temp_files(out)
    # The next build makes the pair.
    assert run_kgen("build", "--config", new_path, "--out", out).returncode == 0
    assert pair_is_honest(out)


def test_an_elf_swapped_in_behind_the_stamp_is_not_current(tmp_path):
    a_path, a = config_file(tmp_path, "a", "")
    b_path, b = config_file(tmp_path, "b", "[tempmap]\nslots = 8\n")
    for name, path in (("a", a_path), ("b", b_path)):
        assert run_kgen("build", "--no-iso", "--config", path, "--out", tmp_path / name).returncode == 0
    stamp = _read_stamp(tmp_path / "a")
    assert _current(tmp_path / "a", stamp["fingerprint"], iso=False)
    (tmp_path / "a" / "kernel.elf").write_bytes((tmp_path / "b" / "kernel.elf").read_bytes())
    assert not _current(tmp_path / "a", stamp["fingerprint"], iso=False)
    assert current_elf(a, tmp_path / "a") is None


def test_the_fingerprint_is_the_same_in_every_process():
    """The stamp's fingerprint names the config the same way whatever PYTHONHASHSEED a process drew: the `repr` of
    the set of keys the user wrote follows the string hash, so pytest-xdist workers of `kgen test --config` each saw
    another stamp for a config with two or more keys and rebuilt kernel.elf while another worker booted it."""
    script = ("import sys; from kgen.build.config import Config; from kgen.build.pipeline import fingerprint; "
              "print(fingerprint(Config.for_arch('x86_64', tempmap_slots=8, vmm_size=0x800000, kernel_stack_size="
              "0x8000, machine_memory_mib=64, paging_foreign_slot=300)))")
    prints = {seed: subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                                   env=dict(os.environ, PYTHONHASHSEED=seed)).stdout for seed in ("1", "2", "3")}
    assert len(set(prints.values())) == 1, prints


# --- two builds, one --out ----------------------------------------------------------------------------------------

def proc_locks_waiter(lock: Path) -> bool:
    """/proc/locks shows a process blocked (`->`) on this file's flock."""
    inode = os.stat(lock).st_ino
    return any("->" in line and "FLOCK" in line and f":{inode} " in line
               for line in Path("/proc/locks").read_text().splitlines())


def test_a_build_waits_for_the_one_holding_the_out_lock(tmp_path):
    _, config = config_file(tmp_path, "c", "")
    out = tmp_path / "out"
    out.mkdir()
    lock = out / LOCK_NAME
    fd = os.open(lock, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        proc = start_kgen("build", "--no-iso", "--out", out)
        wait_until(proc, lambda: proc_locks_waiter(lock), "waiting on the lock")
        assert not (out / "kernel.elf").exists()
    finally:
        os.close(fd)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert pair_is_honest(out)


@needs_grub
def test_concurrent_builds_of_two_configs_leave_one_honest_pair(tmp_path):
    """Two builds of different configs in one --out: before the lock they shared `.kernel.iso.partial`, and the
    stamp could name one config while the ELF was the other's."""
    a_path, _ = config_file(tmp_path, "a", "")
    b_path, _ = config_file(tmp_path, "b", "[tempmap]\nslots = 8\n")
    out = tmp_path / "out"
    for _ in range(2):
        procs = [start_kgen("build", "--config", path, "--out", out) for path in (a_path, b_path)]
        for proc in procs:
            stdout, stderr = proc.communicate(timeout=300)
            assert proc.returncode == 0, stderr
        assert pair_is_honest(out)
        no_temp_files(out)


# --- success that cannot be faked ---------------------------------------------------------------------------------

# Paging off, flat. Prints LINE_BEFORE's text (the success line, or not), then maybe more, then writes VALUE to the
# debug-exit port as a dword and halts.
EXITER = r"""
.text
.globl _start
.align 4
    .long 0x1BADB002, 0x3, -(0x1BADB002 + 0x3)
_start:
    cli
    mov $0x80000, %esp
.if SAY_SUCCESS
    mov $success, %esi
    call puts
.endif
.if SAY_MORE
    mov $more, %esi
    call puts
.endif
    mov $VALUE, %eax
    mov $0xf4, %dx
    out %eax, %dx
1:  cli
    hlt
    jmp 1b
puts:
    lodsb
    test %al, %al
    jz 2f
    mov $0x3F8, %dx
    out %al, %dx
    jmp puts
2:  ret
success: .asciz "kgen: exit success\n"
more: .asciz "and then something else\n"
"""


@needs_qemu
@pytest.mark.parametrize("value, say_success, say_more, code, says", [
    # The reproducers: the status is 8 bits of (value << 1) | 1, so these give the success status 33.
    (0x90, False, False, errors.EXIT_KERNEL_FAILED, "the success status, but the kernel's last COM1 line is not"),
    (0xDEAD0010, False, False, errors.EXIT_KERNEL_FAILED, "the success status, but the kernel's last COM1 line"),
    (0x10, False, False, errors.EXIT_KERNEL_FAILED, "the success status, but the kernel's last COM1 line is not"),
    (0x10, True, True, errors.EXIT_KERNEL_FAILED, "the success status, but the kernel's last COM1 line is not"),
    (0x11, True, False, errors.EXIT_KERNEL_FAILED, "exit status 35, the kernel's failure status"),
    (0x10, True, False, errors.EXIT_OK, None),      # the protocol, followed: success
])
def test_success_needs_the_line_and_the_status(tmp_path, value, say_success, say_more, code, says):
    assert EXIT_SUCCESS == "kgen: exit success"     # the text the mini kernel prints
    elf = minikernels.build(tmp_path, "exiter", EXITER, VALUE=value, SAY_SUCCESS=int(say_success),
                            SAY_MORE=int(say_more))
    result = run_kgen("run", "--kernel", elf, "--timeout", "60")
    assert result.returncode == code, result.stdout + result.stderr
    if says is None:
        assert result.stdout.strip().splitlines()[-1] == EXIT_SUCCESS and result.stderr == ""
    else:
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith("kgen: ") and says in last, result.stderr
        assert "Traceback" not in result.stderr


# --- Ctrl-C in kgen run and kgen test: the terminal sends it to QEMU and pytest's workers too ----------------------

def qemus_of(session_leader: int) -> list[int]:
    """QEMU processes in the process group (session) of a kgen started with start_new_session."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv0 = (entry / "cmdline").read_bytes().split(b"\0")[0]
            if b"qemu-system" in argv0 and os.getsid(int(entry.name)) == session_leader:
                pids.append(int(entry.name))
        except OSError:
            pass        # exited while we looked
    return pids


def group_interrupted(proc: subprocess.Popen, tmpdir: Path) -> None:
    os.killpg(proc.pid, signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == errors.EXIT_INTERRUPTED, (proc.returncode, stderr)
    assert stderr.strip().splitlines() == ["kgen: interrupted"], stderr
    assert qemus_of(proc.pid) == []
    assert list(tmpdir.iterdir()) == [], "left in TMPDIR"


def start_group(*args, tmpdir: Path) -> subprocess.Popen:
    return start_kgen(*args, env={"TMPDIR": str(tmpdir)}, start_new_session=True)


@needs_qemu
def test_ctrl_c_during_kgen_run_is_one_line_and_130(tmp_path, short_tmpdir):
    tmpdir = short_tmpdir
    elf = minikernels.build(tmp_path, "hang", minikernels.FLAT, FAILURE=1)
    proc = start_group("run", "--kernel", elf, "--timeout", "300", tmpdir=tmpdir)
    wait_until(proc, lambda: qemus_of(proc.pid), "booting the kernel")
    group_interrupted(proc, tmpdir)


@needs_qemu
@pytest.mark.parametrize("jobs", ["1", "2"])
@pytest.mark.parametrize("moment", ["building", "testing"])
def test_ctrl_c_during_kgen_test_is_one_line_and_130(tmp_path, short_tmpdir, jobs, moment):
    tmpdir = short_tmpdir
    proc = start_group("test", "--out", tmp_path / "out", "-j", jobs, tmpdir=tmpdir)
    if moment == "building":
        wait_until(proc, lambda: lief_loaded(proc.pid), "building the kernel")
    else:
        wait_until(proc, lambda: qemus_of(proc.pid), "booting the kernel")
    group_interrupted(proc, tmpdir)


def test_the_default_output_folder_is_out_and_an_old_build_folder_is_still_used_with_a_note(tmp_path):
    # Item 6 of issue 20: the default --out was build/, which read as the package kgen/build; a checkout's old
    # build/ keeps working for a release, with one note line.
    fresh = kgen_in(tmp_path / "fresh", "build", "--no-iso")
    assert fresh.returncode == 0, fresh.stderr
    assert (tmp_path / "fresh" / "out" / "kernel.elf").is_file() and not (tmp_path / "fresh" / "build").exists()
    assert "note" not in fresh.stderr
    old = tmp_path / "old"
    assert kgen_in(old, "build", "--no-iso", "--out", "build").returncode == 0
    again = kgen_in(old, "build", "--no-iso")
    assert again.returncode == 0, again.stderr
    assert not (old / "out").exists()
    notes = [line for line in again.stderr.splitlines() if line.startswith("kgen: note:")]
    assert notes == ["kgen: note: using build/, the old default output folder (the default is out/ now; pass "
                     "--out build to keep it, or remove it)"], again.stderr
    (old / "out").mkdir()        # once out/ exists, it is the one
    third = kgen_in(old, "build", "--no-iso")
    assert third.returncode == 0 and "note" not in third.stderr and (old / "out" / "kernel.elf").is_file()


def kgen_in(directory, *args):
    directory.mkdir(parents=True, exist_ok=True)
    return run_kgen(*args, cwd=directory)
