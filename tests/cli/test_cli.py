"""The command line as a user meets it: every bad input is one line on stderr with a documented exit status, the
same in `kgen build`, `kgen run` and `kgen test`, and leaves nothing behind; `kgen test` maps pytest's own statuses
onto kgen's; nothing is left in TMPDIR. Each test runs the installed `kgen` as a subprocess."""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from kgen import errors

from conftest import needs_qemu, one_line, run_kgen, start_kgen

ROOT = Path(__file__).resolve().parents[2]
COMMANDS = ("build", "run", "test")


def tree(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*")}


# --- exit codes: distinct, documented ---------------------------------------------------------------------------

def test_exit_codes_are_distinct_and_in_every_help_and_the_docs():
    codes = [code for code, _ in errors.EXIT_CODES]
    assert len(codes) == len(set(codes))
    assert {errors.EXIT_OK, errors.EXIT_CHECKS_FAILED, errors.EXIT_USAGE, errors.EXIT_TOOL_MISSING,
            errors.EXIT_KERNEL_FAILED, errors.EXIT_INTERNAL, errors.EXIT_INTERRUPTED, errors.EXIT_TERMINATED} == set(codes)
    table = (ROOT / "docs" / "exit-status.md").read_text()
    for command in ((), *((c,) for c in COMMANDS)):
        result = run_kgen(*command, "--help")
        assert result.returncode == 0, result.stderr
        for code, meaning in errors.EXIT_CODES:
            assert re.search(rf"^  {code} +{re.escape(meaning)}$", result.stdout, re.MULTILINE), (command, code)
    for code, _ in errors.EXIT_CODES:
        assert re.search(rf"^\| `{code}` \|", table, re.MULTILINE), f"docs/exit-status.md's table lacks {code}"


def test_pytest_statuses_map_onto_kgens():
    """`kgen test` never returns pytest's 2 (interrupted: kgen's config code) or 3 (internal: kgen's missing tool)."""
    from kgen.cli.test import PYTEST_EXIT
    assert {int(code) for code in pytest.ExitCode} <= set(PYTEST_EXIT)
    assert PYTEST_EXIT[pytest.ExitCode.OK] == errors.EXIT_OK
    assert PYTEST_EXIT[pytest.ExitCode.TESTS_FAILED] == errors.EXIT_CHECKS_FAILED
    assert PYTEST_EXIT[pytest.ExitCode.INTERRUPTED] == errors.EXIT_INTERRUPTED
    assert PYTEST_EXIT[pytest.ExitCode.INTERNAL_ERROR] == errors.EXIT_INTERNAL
    assert PYTEST_EXIT[pytest.ExitCode.USAGE_ERROR] == errors.EXIT_USAGE
    assert PYTEST_EXIT[pytest.ExitCode.NO_TESTS_COLLECTED] == errors.EXIT_USAGE


# --- the command line itself ------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, fragment", [
    (("build", "--no-such-option"), "unrecognized arguments: --no-such-option"),
    (("build", "--arch", "arm"), "argument --arch: invalid choice: 'arm'"),
    (("frobnicate",), "invalid choice: 'frobnicate'"),
    ((), "the following arguments are required"),
    (("run", "--memory", "lots"), "argument --memory: 'lots' is not a whole number"),
    (("run", "--memory", "0"), "argument --memory: '0': must be above 0"),
    (("test", "-k", "foo("), "-k 'foo(': expected identifier"),
    (("test", "-j", "many"), "argument -j/--jobs: 'many': give a number of parallel machines, or auto"),
    (("test", "-j", "-1"), "argument -j/--jobs: '-1'"),
])
def test_a_bad_command_line_is_one_line_exit_2(tmp_path, args, fragment):
    result = run_kgen(*args, cwd=tmp_path)
    assert result.returncode == errors.EXIT_USAGE
    assert fragment in one_line(result)
    assert tree(tmp_path) == set()


@pytest.mark.parametrize("value", ["nan", "-1", "0", "inf", "-inf", "1e999", "soon"])
def test_a_timeout_must_be_finite_and_positive(tmp_path, value):
    result = run_kgen("run", "--out", tmp_path / "out", f"--timeout={value}", cwd=tmp_path)
    assert result.returncode == errors.EXIT_USAGE
    line = one_line(result)
    assert line.startswith("kgen: error: kgen run: argument --timeout: ") and repr(value) in line, line
    assert tree(tmp_path) == set()


# --- --out that cannot be written -------------------------------------------------------------------------------

def bad_outs(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """Each kind of unusable --out: the path and what the line must say."""
    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory\n")
    elf_dir = tmp_path / "elf-is-dir"
    (elf_dir / "kernel.elf").mkdir(parents=True)
    iso_dir = tmp_path / "iso-is-dir"
    (iso_dir / "kernel.iso" / "inside").mkdir(parents=True)
    return {
        "regular file": (a_file, "exists and is not a directory"),
        "under a file": (a_file / "out", f"{a_file} is not a directory"),
        "deep under a file": (a_file / "x" / "y", f"{a_file} is not a directory"),
        "kernel.elf is a directory": (elf_dir, "kernel.elf is a directory or special file"),
        "kernel.iso is a directory": (iso_dir, "kernel.iso is a directory or special file"),
        "/dev/null": (Path("/dev/null"), "exists and is not a directory"),
        "under /dev/null": (Path("/dev/null/out"), "/dev/null is not a directory"),
        "/proc": (Path("/proc/kgen-out"), "cannot create files in /proc"),
        "read-only directory": (Path("/sys"), "cannot create files in /sys"),
        "under a read-only directory": (Path("/sys/kgen-out/deeper"), "cannot create files in /sys"),
    }


BAD_OUT_KINDS = ("regular file", "under a file", "deep under a file", "kernel.elf is a directory",
                 "kernel.iso is a directory", "/dev/null", "under /dev/null", "/proc", "read-only directory",
                 "under a read-only directory")


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("kind", BAD_OUT_KINDS)
def test_an_unusable_out_is_one_line_exit_2_and_leaves_nothing(tmp_path, command, kind):
    out, says = bad_outs(tmp_path)[kind]
    if kind == "read-only directory" and os.access("/sys", os.W_OK) and not os.path.ismount("/sys"):
        pytest.skip("/sys is not read-only here")
    before = tree(tmp_path)
    result = run_kgen(command, "--out", out, "-j", "1") if command == "test" else run_kgen(command, "--out", out)
    assert result.returncode == errors.EXIT_USAGE, result.stderr
    line = one_line(result)
    assert line.startswith(f"kgen: error: --out {out}: ") and says in line and "choose another --out" in line, line
    assert tree(tmp_path) == before
    assert not Path("/proc/kgen-out").exists() and not Path("/sys/kgen-out").exists()


@pytest.mark.parametrize("kind", ["/dev/null/x.xml", "a directory", "/sys/x.xml", "/proc/kgen/x.xml"])
def test_an_unwritable_junitxml_is_one_line_exit_2_before_any_test(tmp_path, kind):
    """pytest found out only after the whole run, with a traceback and status 1."""
    path = tmp_path if kind == "a directory" else Path(kind)
    result = run_kgen("test", "--out", tmp_path / "out", "-j", "1", "--junitxml", path)
    assert result.returncode == errors.EXIT_USAGE
    line = one_line(result)
    assert line.startswith(f"kgen: error: --junitxml {path}: ") and line.endswith("; choose another path"), line
    assert tree(tmp_path) == set()


def test_an_image_larger_than_max_size_names_the_file_key_and_sizes(tmp_path):
    config = tmp_path / "small.toml"
    config.write_text("[kernel]\nmax_size = 0x8000\nstack_size = 0x1000\n")
    result = run_kgen("build", "--config", config, "--out", tmp_path / "out")
    assert result.returncode == errors.EXIT_USAGE
    line = one_line(result)
    m = re.fullmatch(rf"kgen: error: {re.escape(str(config))}: kernel\.max_size = 0x8000: the kernel image needs "
                     r"(0x[0-9a-f]+) bytes; set kernel\.max_size to at least (0x[0-9a-f]+)", line)
    assert m, line
    needed, suggested = int(m[1], 16), int(m[2], 16)
    assert needed > 0x8000 and suggested >= needed and suggested % 0x1000 == 0
    assert not (tmp_path / "out").exists()
    # The suggestion is enough (the stack and boot tables are inside the image, so it is the whole need).
    config.write_text(f"[kernel]\nmax_size = {suggested:#x}\nstack_size = 0x1000\n")
    result = run_kgen("build", "--no-iso", "--config", config, "--out", tmp_path / "out")
    assert result.returncode == 0, result.stderr


# --- missing tools ----------------------------------------------------------------------------------------------

def test_kgen_test_without_qemu_is_one_line_exit_3(tmp_path):
    empty = tmp_path / "bin"
    empty.mkdir()
    result = run_kgen("test", "--out", tmp_path / "out", "-j", "1", env={"PATH": str(empty), "TMPDIR": str(tmp_path)})
    assert result.returncode == errors.EXIT_TOOL_MISSING
    assert one_line(result) == ("kgen: error: qemu-system-i386 not found: install the Debian package "
                                "qemu-system-x86")
    assert not list(tmp_path.glob("pytest-of-*"))


def test_kgen_run_with_kvm_missing_is_a_missing_tool(tmp_path, monkeypatch):
    from kgen.harness import run as runmod
    from kgen.machine import kvm
    monkeypatch.setattr(kvm, "KVM_DEVICE", str(tmp_path / "no-kvm"))
    with pytest.raises(errors.ToolMissing) as missing:
        runmod.require_kvm()
    assert missing.value.exit_code == errors.EXIT_TOOL_MISSING


# --- kgen test: pytest's statuses, TMPDIR --------------------------------------------------------------------------

@needs_qemu
def test_kgen_test_leaves_nothing_in_tmpdir_and_a_k_that_selects_nothing_is_usage(tmp_path, short_tmpdir):
    tmpdir = short_tmpdir
    env = {"TMPDIR": str(tmpdir)}
    out = tmp_path / "out"
    result = run_kgen("test", "--out", out, "-j", "1", "-k", "recursive_slot_maps", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert " passed" in result.stdout
    assert tree(tmpdir) == set(), "kgen test left this in TMPDIR"
    result = run_kgen("test", "--out", out, "-j", "1", "-k", "no_test_is_called_this", env=env)
    assert result.returncode == errors.EXIT_USAGE
    assert result.stderr.strip().splitlines() == [
        "kgen: error: no test was selected by -k 'no_test_is_called_this'; "
        "`kgen test -- --collect-only -q` lists them"]
    assert tree(tmpdir) == set()


@needs_qemu
def test_kgen_run_leaves_nothing_in_tmpdir(tmp_path, short_tmpdir):
    tmpdir = short_tmpdir
    result = run_kgen("run", "--direct", "--out", tmp_path / "out", env={"TMPDIR": str(tmpdir)})
    assert result.returncode == 0, result.stderr
    assert tree(tmpdir) == set()
    # kgen's kernel succeeds by the protocol `kgen run` wants: its success line last, then the status.
    from kgen.guest.bootreport import BOOT_OK, EXIT_SUCCESS
    assert result.stdout.strip().splitlines()[-2:] == [BOOT_OK, EXIT_SUCCESS]


@pytest.mark.parametrize("command, option", [("run", "--kernel"), ("run", "--iso"), ("test", "--kernel")])
def test_a_kernel_or_iso_that_is_not_there_or_not_an_elf_is_one_line_exit_2(tmp_path, command, option):
    missing = tmp_path / "missing.elf"
    result = run_kgen(command, option, missing, cwd=tmp_path)
    assert result.returncode == errors.EXIT_USAGE
    assert one_line(result) == f"kgen: error: {option} {missing}: no such file"
    result = run_kgen(command, option, tmp_path, cwd=tmp_path)
    assert result.returncode == errors.EXIT_USAGE
    assert one_line(result) == f"kgen: error: {option} {tmp_path}: not a file (a directory)"
    if option == "--kernel":
        text = tmp_path / "notes.txt"
        text.write_text("not an ELF\n")
        result = run_kgen(command, option, text, cwd=tmp_path)
        assert result.returncode == errors.EXIT_USAGE
        assert one_line(result).startswith(f"kgen: error: --kernel {text}: not a readable ELF file")
    assert tree(tmp_path) <= {"notes.txt"}


def test_no_pointer_to_notes_users_do_not_have():
    """The README, docs and code point at docs/, never at the developers' shared notes."""
    texts = [ROOT / "README.md", *(ROOT / "docs").rglob("*.md"), *(ROOT / "kgen").rglob("*.py"),
             *(ROOT / "templates").rglob("*.s")]
    offenders = [str(p.relative_to(ROOT)) for p in texts if "TOOLCHAIN-NOTES" in p.read_text()
                 or "shared/" in p.read_text()]
    assert offenders == []
    toolchain = (ROOT / "docs" / "toolchain.md").read_text()
    # The facts the code's comments send readers there for.
    for fact in ("lgdt", "iretd", "isa-debug-exit", "kvm_pvm", "-icount", "add(Segment)", "grub-mkrescue"):
        assert fact in toolchain, fact


@needs_qemu
@pytest.mark.parametrize("command", [("build", "--no-iso"), ("run", "--direct")])
def test_a_reader_that_goes_away_is_no_failure(tmp_path, command):
    """`kgen run | head -1`: the broken pipe stopped QEMU's serial pump, the success line was lost and a good run
    was reported as a failure; `kgen build | true` ended in a traceback."""
    proc = start_kgen(*command, "--out", tmp_path / "out")
    if command[0] == "run":
        assert proc.stdout.readline() == "kgen: boot report\n"
    proc.stdout.close()
    stderr = proc.stderr.read()
    assert proc.wait(timeout=300) == 0, stderr
    assert stderr == ""
