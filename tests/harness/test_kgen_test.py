"""`kgen test` and the pytest plugin: the packaged suite on kgen's kernel and on a higher-half kernel built with GNU
as (generic part only), its exit status, -k/--junitxml/parallel workers, and fixtures in a user's own tests."""
import importlib.metadata
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

import minikernels

from conftest import KGEN, kgen_env, needs_qemu, run_kgen

pytestmark = [pytest.mark.vm, needs_qemu]


def python(*args, cwd=None):
    """This Python, not kgen's command line, in the environment kgen's subprocesses get."""
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=kgen_env(), cwd=cwd,
                          timeout=300)


@pytest.fixture(scope="module")
def higher_half(tmp_path_factory):
    out = tmp_path_factory.mktemp("higher-half")
    return {name: minikernels.build(out, name, minikernels.HIGHER_HALF, minikernels.HIGHER_HALF_LDS,
                                    WRITABLE_TEXT=writable)
            for writable, name in enumerate(("good", "writable-text"))}


def test_generic_suite_passes_on_a_gnu_as_higher_half_kernel(higher_half):
    result = run_kgen("test", "--kernel", str(higher_half["good"]), "-j", "1", "--", "-rs")
    assert result.returncode == 0, result.stdout + result.stderr
    passed = [line for line in result.stdout.splitlines() if " passed" in line]
    assert passed and "failed" not in passed[-1]
    assert "test_cr3_is_the_boot_page_directory" not in result.stdout     # skipped, with the reason:
    assert "good.elf was not built by kgen: its layout and call channel are unknown" in result.stdout


def test_generic_suite_fails_naming_the_page_and_pytest_status_is_the_exit_status(higher_half):
    result = run_kgen("test", "--kernel", str(higher_half["writable-text"]), "-j", "1")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "FAILED" in result.stdout and "test_elf_segments_map_vaddr_to_paddr_no_wider_than_their_flags" in result.stdout
    assert ("page 0xc0100000 <__image_start> (segment R-X, loaded at 0x100000): writable (P RW A) via PD[768]"
            in result.stdout), result.stdout
    assert qemus_booting(higher_half["writable-text"]) == []


def qemus_booting(kernel: Path) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0") if entry.name.isdigit() else [b""]
            if b"qemu-system" in argv[0] and (b"-kernel", str(kernel).encode()) in zip(argv, argv[1:]):
                pids.append(int(entry.name))
        except OSError:
            pass    # exited while we looked
    return pids


def test_ctrl_c_leaves_no_qemu(higher_half):
    kernel = higher_half["good"]
    # As a terminal's Ctrl-C: SIGINT to the whole process group, pytest's and its QEMUs'.
    child = subprocess.Popen([sys.executable, "-c", "import os, signal, sys; "
                              "signal.signal(signal.SIGINT, signal.SIG_DFL); os.execv(sys.argv[1], sys.argv[1:])",
                              *KGEN, "test", "--kernel", str(kernel), "-j", "1"],
                             env=kgen_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not qemus_booting(kernel):
            assert child.poll() is None and time.monotonic() < deadline, "the suite never booted the kernel"
            time.sleep(0.01)
        os.killpg(child.pid, signal.SIGINT)
        output = child.communicate(timeout=60)[0].decode()
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
    assert child.returncode == 130 and "kgen: interrupted" in output, output
    assert qemus_booting(kernel) == []


def test_kgen_test_builds_filters_runs_in_parallel_and_writes_junit(tmp_path):
    report = tmp_path / "report.xml"
    result = run_kgen("test", "--out", str(tmp_path / "build"), "-k", "recursive or slots_are_empty",
                      "-j", "2", "--junitxml", str(report))
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "build" / "kernel.elf").is_file()
    assert "2 workers" in result.stdout
    cases = {case.get("name") for case in ET.parse(report).iter("testcase")}
    assert cases == {"test_recursive_slot_maps_the_pd_supervisor_only", "test_temp_map_slots_are_empty_while_idle"}


def test_importing_the_plugin_loads_nothing_of_kgen_or_qemu():
    result = python("-c", "import sys, kgen.harness.pytest_plugin; "
                          "print(sorted(m for m in sys.modules if m.split('.')[0] in "
                          "('kgen', 'qemu', 'elftools', 'lief', 'keystone')))")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "['kgen', 'kgen.harness', 'kgen.harness.pytest_plugin']"


USER_TEST = '''
from kgen.guest import invariants


def test_my_own_machine_state(kgen_kernel, kgen_machine):
    layout = kgen_kernel.layout
    slot = kgen_machine.call("temp_map", layout.kernel_load_address)
    assert invariants.check_tempmap_empty(kgen_machine.view())      # stopped: the slot is still mapped
    kgen_machine.call("temp_unmap", slot)                             # continued for the call
    assert invariants.check_tempmap_empty(kgen_machine.view()) == []
    first = int.from_bytes(kgen_machine.machine.read_phys(layout.kernel_load_address, 4), "little")
    assert kgen_machine.call("peek32", layout.kernel_virtual_start) == first
'''


def plugin_installed() -> bool:
    """Whether pytest loads kgen's plugin by itself (kgen installed), or it must be named with -p (a checkout)."""
    return any(ep.name == "kgen" for ep in importlib.metadata.entry_points(group="pytest11"))


def test_users_write_their_own_tests_with_the_fixtures(tmp_path):
    (tmp_path / "test_mine.py").write_text(USER_TEST)
    load = [] if plugin_installed() else ["-p", "kgen.harness.pytest_plugin"]
    result = python("-m", "pytest", *load, "-p", "no:cacheprovider", "-q",
                    "--kgen-out", str(tmp_path / "build"), str(tmp_path / "test_mine.py"), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed" in result.stdout


@pytest.mark.parametrize("to_group", [False, True], ids=["to-kgen", "to-group"])
def test_sigterm_cleans_up_and_ends_with_its_status(higher_half, short_tmpdir, to_group):
    """A CI runner cancelling a job sends SIGTERM, to kgen alone or to its process group: kgen-test-* and kgen-iso-*
    directories stayed behind and nothing swept them. Now kgen unwinds as for Ctrl-C and ends with 143."""
    kernel = higher_half["good"]
    child = subprocess.Popen([*KGEN, "test", "--kernel", str(kernel), "-j", "2"],
                             env=kgen_env(TMPDIR=str(short_tmpdir)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not qemus_booting(kernel):
            assert child.poll() is None and time.monotonic() < deadline, "the suite never booted the kernel"
            time.sleep(0.01)
        if to_group:
            os.killpg(child.pid, signal.SIGTERM)
        else:
            child.send_signal(signal.SIGTERM)
        output = child.communicate(timeout=60)[0].decode()
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
    assert child.returncode == 143 and output.strip().splitlines()[-1] == "kgen: terminated", output
    assert "Traceback" not in output, output
    deadline = time.monotonic() + 20      # pytest-xdist's workers finish their own shutdown a moment later
    while (qemus_booting(kernel) or os.listdir(short_tmpdir)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert qemus_booting(kernel) == []
    assert os.listdir(short_tmpdir) == []


def test_directories_of_a_killed_kgen_are_swept_by_the_next(tmp_path):
    """SIGKILL leaves no chance to clean up: the next kgen removes what a gone process left (named by its pid)."""
    from kgen.scratch import scratch_dir, sweep_stale_dirs
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = [tmp_path / f"kgen-{kind}-{dead.pid}-x1" for kind in ("test", "iso", "qemu", "json")]
    for path in stale:
        (path / "inside").mkdir(parents=True)
    alive = tmp_path / "kgen-test-1-x2"     # pid 1 is always alive
    alive.mkdir()
    other = tmp_path / "kgen-notes"         # not ours by its name
    other.mkdir()
    assert sorted(sweep_stale_dirs(tmp_path)) == sorted(stale)
    mine = scratch_dir("test", tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([alive.name, other.name, mine.name])
