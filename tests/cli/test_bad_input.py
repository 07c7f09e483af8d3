"""Bad input found by trying kgen as a new user would (issue 24): each is one line naming what and where, a documented
status, no traceback, nothing left behind — and nothing runs before the refusal."""
from __future__ import annotations

import errno
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from kgen import errors
from kgen.build.config import Config

from conftest import KGEN, kgen_env, one_line, run_kgen, shared_build

LONG_NAME = "a" * 300       # longer than any Linux file system's 255-byte names


@pytest.fixture(scope="module")
def elf(tmp_path_factory) -> Path:
    return shared_build(tmp_path_factory, Config()).elf


@pytest.mark.parametrize("args", [
    ("build", "--no-iso", "--out", "{dir}/" + LONG_NAME),
    ("test", "-k", "nothing", "--junitxml", "{dir}/" + LONG_NAME + ".xml"),
    ("test", "-k", "nothing", "--json", "{dir}/" + LONG_NAME + ".json"),
    ("inspect", "--html", "{dir}/" + LONG_NAME + ".html"),
    ("run", "--kernel", "{dir}/" + LONG_NAME),
    ("test", "--kernel", "{dir}/" + LONG_NAME),
    ("test", "--config", "{dir}/" + LONG_NAME),
])
def test_a_name_too_long_for_the_file_system_is_one_line(tmp_path, args):
    result = run_kgen(*(a.format(dir=tmp_path) for a in args), cwd=tmp_path)
    line = one_line(result)
    assert result.returncode == errors.EXIT_USAGE, line
    assert LONG_NAME not in line, "the 300-character name is echoed whole"
    assert "too long" in line or "longer than" in line, line
    assert os.listdir(tmp_path) == []


def test_a_report_in_a_directory_not_yet_made_is_written_there(tmp_path, elf):
    """`--json nodir/r.json` ran the whole suite and then crashed; pytest's --junitxml makes the directory, so does
    kgen for its own reports."""
    result = run_kgen("test", "--kernel", elf, "-k", "paging_enabled", "--json", "nodir/r.json", "-j", "1",
                      cwd=tmp_path)
    assert "Traceback" not in result.stderr, result.stderr
    assert (tmp_path / "nodir" / "r.json").is_file(), result.stderr
    assert [p.name for p in (tmp_path / "nodir").iterdir()] == ["r.json"]      # no temporary file beside it


def test_a_report_that_cannot_be_written_leaves_nothing_partial(tmp_path):
    with pytest.raises(OSError) as raised:
        _write_to_full_disk(tmp_path / "page.html")
    assert raised.value.errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == []


def _write_to_full_disk(target: Path) -> None:
    """write_report on a file system that fills up at once: the write fails like a full disk's."""
    from kgen.harness import outputs
    real_fdopen = os.fdopen

    class Full:
        def __init__(self, fd, *args, **kwargs):
            self.file = real_fdopen(fd, *args, **kwargs)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

        def write(self, text):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    outputs.os.fdopen, saved = Full, outputs.os.fdopen
    try:
        outputs.write_report(target, "<html>" + "x" * 100_000)
    finally:
        outputs.os.fdopen = saved


def test_stdout_on_a_full_disk_is_one_line_status_5(tmp_path):
    with open("/dev/full", "w") as full:
        result = subprocess.run([*KGEN, "build", "--no-iso", "--out", str(tmp_path / "out")], stdout=full,
                                stderr=subprocess.PIPE, text=True, env=kgen_env(), timeout=300)
    stderr = result.stderr
    assert result.returncode == errors.EXIT_INTERNAL, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "no space left" in lines[0] and "Traceback" not in stderr, stderr


def test_too_many_parallel_machines_is_refused_before_anything_runs(tmp_path):
    result = run_kgen("test", "-j", "99999999999", cwd=tmp_path)
    assert result.returncode == errors.EXIT_USAGE
    assert "at most 256 parallel machines" in one_line(result)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("make", ["fifo", "device", "directory"])
def test_a_config_or_module_that_is_no_regular_file_is_refused_at_once(tmp_path, elf, make):
    """A fifo blocked for ever; /dev/zero was read until the OOM killer."""
    path = {"fifo": tmp_path / "fifo", "device": Path("/dev/zero"), "directory": tmp_path / "dir"}[make]
    if make == "fifo":
        os.mkfifo(path)
    elif make == "directory":
        path.mkdir()
    for args in (("build", "--no-iso", "--config", path, "--out", tmp_path / "out"),
                 ("test", "--kernel", elf, "--module", path, "-k", "x")):
        result = run_kgen(*args, cwd=tmp_path, timeout=60)
        line = one_line(result)
        assert result.returncode == errors.EXIT_USAGE, line
        assert "not a file" in line or "not a regular file" in line, line
    assert not (tmp_path / "out").exists()


def test_a_config_far_larger_than_a_config_is_refused(tmp_path):
    big = tmp_path / "big.toml"
    big.write_text("# x\n" * 400_000)
    result = run_kgen("build", "--no-iso", "--config", big, "--out", tmp_path / "out", cwd=tmp_path)
    assert result.returncode == errors.EXIT_USAGE
    assert "a kgen config is a few lines" in one_line(result)


def test_long_keys_and_dates_are_echoed_as_toml_cut_to_a_line(tmp_path):
    config = tmp_path / "k.toml"
    config.write_text(f"[kernel]\n{'k' * 5000} = 1\n")
    line = one_line(run_kgen("build", "--no-iso", "--config", config, "--out", tmp_path / "o", cwd=tmp_path))
    assert "k" * 5000 not in line and "(5000 characters)" in line
    config.write_text("arch = 1979-05-27\n")
    line = one_line(run_kgen("build", "--no-iso", "--config", config, "--out", tmp_path / "o", cwd=tmp_path))
    assert "arch = 1979-05-27: must be a string" in line and "datetime" not in line


@pytest.mark.parametrize("option", ["--ready", "--ready-symbol", "--ready-at", "--ready-vga"])
def test_an_empty_ready_option_is_refused_as_the_config_refuses_it(tmp_path, elf, option):
    result = run_kgen("test", "--kernel", elf, f"{option}=", cwd=tmp_path)
    assert result.returncode == errors.EXIT_USAGE
    assert f"argument {option}: must not be empty" in one_line(result)


def test_ready_at_beyond_any_address_is_refused_not_a_hang(tmp_path, elf):
    result = run_kgen("test", "--kernel", elf, "--ready-at", "0x10000000000000000", cwd=tmp_path)
    assert result.returncode == errors.EXIT_USAGE
    assert "wider than 64 bits" in one_line(result)


def test_run_iso_of_a_file_that_is_no_iso_is_refused(tmp_path, elf):
    empty = tmp_path / "empty.iso"
    empty.write_bytes(b"")
    for iso in (empty, elf):
        result = run_kgen("run", "--iso", iso, "--timeout", "5", cwd=tmp_path)
        assert result.returncode == errors.EXIT_USAGE
        assert "not an ISO 9660 image" in one_line(result)


def test_an_option_value_beginning_with_a_dash_says_to_use_equals(tmp_path, elf):
    result = run_kgen("run", "--kernel", elf, "--qemu-arg", "-S", cwd=tmp_path)
    assert result.returncode == errors.EXIT_USAGE
    assert "--option=-value" in one_line(result)


def test_bench_errors_are_one_line(tmp_path):
    for args in (("bench", "--bogus"), ("bench", "--harness", "--bogus")):
        result = run_kgen(*args, cwd=tmp_path)
        assert result.returncode == errors.EXIT_USAGE
        assert "unrecognized arguments: --bogus" in one_line(result)


def test_gdb_that_is_a_directory_is_named_so(tmp_path, elf):
    result = run_kgen("debug", "--kernel", elf, "--gdb", "/tmp", cwd=tmp_path)
    assert result.returncode == errors.EXIT_USAGE
    assert one_line(result) == "kgen: error: --gdb /tmp: a directory; give the path of the gdb program"


def test_run_and_test_of_anyones_kernel_take_the_same_memory(tmp_path, elf):
    """`kgen run --kernel --memory 8` was refused by kgen's own layout rule that `kgen test --kernel` does not
    apply: anyone's kernel gets the RAM asked for under both."""
    result = run_kgen("run", "--kernel", elf, "--memory", "8", "--timeout", "20", cwd=tmp_path)
    assert "must be in 16..3072" not in result.stderr, result.stderr
    # kgen's own kernel built by kgen keeps its layout's rule.
    result = run_kgen("run", "--memory", "8", "--out", tmp_path / "o", cwd=tmp_path)
    assert result.returncode == errors.EXIT_USAGE
    assert "machine.memory_mib = 8: must be in 16..3072" in one_line(result)


def test_a_kernel_in_a_deep_directory_keeps_its_command_line(tmp_path):
    """QEMU puts the -kernel path first on the Multiboot command line; a path of ~250 bytes filled the kernel's
    256-byte buffer and cut off `kgen.serve`: a good kernel went red."""
    deep = tmp_path
    while len(str(deep)) < 300:
        deep = deep / ("d" * 60)
    result = run_kgen("test", "--out", deep / "out", "-k", "recursive", "-j", "1", cwd=tmp_path)
    assert result.returncode == errors.EXIT_OK, result.stdout[-3000:] + result.stderr
    assert len(str(deep / "out" / "kernel.elf")) > 300


def test_grub_mkrescue_failing_says_why_and_leaves_nothing_in_tmpdir(tmp_path, short_tmpdir):
    """A full TMPDIR made grub-mkrescue fail with "grub-mkrescue failed with status 1: ." and leave its grub.*
    directories behind. Here xorriso fails as it does on a full disk."""
    fake = tmp_path / "bin"
    fake.mkdir()
    xorriso = fake / "xorriso"
    real = shutil.which("xorriso")
    # grub-mkrescue asks xorriso for its help first: the real one answers that; the writing fails.
    xorriso.write_text(f"#!/bin/sh\ncase \"$*\" in *-help*|*-version*) exec {real} \"$@\";; esac\n"
                       "echo 'xorriso : FAILURE : Cannot write: No space left on device' >&2\necho '.' >&2\nexit 5\n")
    xorriso.chmod(0o755)
    result = run_kgen("build", "--out", tmp_path / "out", cwd=tmp_path,
                      env={"PATH": f"{fake}:{os.environ['PATH']}", "TMPDIR": str(short_tmpdir)})
    line = one_line(result)
    assert result.returncode == errors.EXIT_INTERNAL, line
    assert "No space left on device" in line, line
    assert os.listdir(short_tmpdir) == []


@pytest.fixture
def full_tmpdir(short_tmpdir):
    """A TMPDIR on a file system with 16 MiB: too small for a 128 MiB guest's RAM file (root mounts a tmpfs; where
    mounting is not allowed the test is skipped, saying so). Short: a long TMPDIR would send the machines to /tmp."""
    mount = short_tmpdir
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], capture_output=True,
                            text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {result.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_a_full_tmpdir_is_the_hosts_failure_in_one_line_not_a_verdict(tmp_path, elf, full_tmpdir):
    """A full TMPDIR gave 23 errors (status 1) under kgen test, and under kgen run --kernel "QEMU exited (exit
    status -7)" (QEMU's SIGBUS) as the kernel's failure (status 4)."""
    env = {"TMPDIR": str(full_tmpdir)}
    for args in (("test", "--out", tmp_path / "out", "-j", "1"), ("test", "--kernel", elf, "-j", "1")):
        result = run_kgen(*args, env=env, cwd=tmp_path)
        line = result.stderr.strip().splitlines()[-1]
        assert result.returncode == errors.EXIT_INTERNAL, result.stdout[-2000:] + result.stderr
        assert "no space left for the machine's files" in line and "not the kernel" in line, line
        assert " error" not in result.stdout, result.stdout[-2000:]
    # A sparse RAM file that runs out of room under the guest: QEMU's SIGBUS, said as the host's failure.
    (full_tmpdir / "filler").write_bytes(b"\0" * (15 << 20))
    result = run_kgen("run", "--kernel", elf, "--timeout", "20", env=env, cwd=tmp_path)
    assert result.returncode == errors.EXIT_INTERNAL, result.stderr
    assert "QEMU died of SIGBUS" in result.stderr.strip().splitlines()[-1], result.stderr
    assert sorted(p.name for p in full_tmpdir.iterdir()) == ["filler"]
