"""`kgen doctor`: every tool listed with its Debian package, status 0 when `kgen test` can run, 3 and one line when
something it needs is missing; nothing booted unless --probe-kvm."""
import os
from pathlib import Path

import pytest

from kgen.build import iso
from kgen.cli import doctor as doctormod
from kgen.cli import main
from kgen.errors import EXIT_OK, EXIT_TOOL_MISSING
from kgen.machine import QEMU_PACKAGE, firmware

from conftest import run_kgen


def rows(stdout: str) -> dict[str, tuple[str, str]]:
    """tool name -> (state, the rest of its line)."""
    found = {}
    for tool in doctormod.tools():
        (line,) = [line for line in stdout.splitlines() if line[9:].startswith(tool.name + " ")]
        found[tool.name] = (line.split()[0], line)
    return found


def path_with(tmp_path: Path, *programs: str) -> str:
    """A PATH holding only these programs (symlinks to this host's)."""
    import shutil
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for program in programs:
        (bin_dir / program).symlink_to(shutil.which(program))
    return str(bin_dir)


def test_lists_every_tool_with_its_package_and_passes_here():
    result = run_kgen("doctor")
    assert result.returncode == EXIT_OK, result.stdout + result.stderr
    assert result.stderr == ""
    found = rows(result.stdout)
    # The packages are the modules' own facts, not a second list.
    assert QEMU_PACKAGE in found["qemu-system-i386"][1] and QEMU_PACKAGE in found["qemu-system-x86_64"][1]
    assert iso.GRUB_PC_PACKAGE in found["GRUB for BIOS"][1] and iso.GRUB_EFI_PACKAGE in found["GRUB for UEFI"][1]
    assert firmware.OVMF_PACKAGE in found["OVMF"][1] and iso.MTOOLS_PACKAGE in found[iso.MFORMAT][1]
    for tool in doctormod.tools():
        # What make system-deps installs is here; gcc (the user's compiler, which kgen does not use) may not be.
        expected = "ok" if tool.name != doctormod.GCC or tool.find() else "missing"
        assert found[tool.name][0] == expected, f"{tool.name}: {found[tool.name][1]}"
    kvm = [line for line in result.stdout.splitlines() if line.startswith("KVM")]
    assert kvm and "--probe-kvm" in kvm[0] or "not accessible" in kvm[0], kvm    # said, not probed: no boot


def test_a_missing_qemu_is_status_3_naming_the_package(tmp_path):
    result = run_kgen("doctor", env={"PATH": path_with(tmp_path)})
    assert result.returncode == EXIT_TOOL_MISSING, result.stdout + result.stderr
    (line,) = result.stderr.splitlines()        # the table on stdout, one line on stderr: what to install
    assert line.startswith("kgen: error: ") and "Traceback" not in result.stderr
    assert "qemu-system-i386" in line and f"apt-get install {QEMU_PACKAGE}" in line, line
    found = rows(result.stdout)
    assert found["qemu-system-i386"][0] == "MISSING" and found["gdb"][0] == "missing"


def test_missing_optional_tools_leave_status_0(tmp_path):
    result = run_kgen("doctor", env={"PATH": path_with(tmp_path, "qemu-system-i386", "qemu-system-x86_64")})
    assert result.returncode == EXIT_OK, result.stdout + result.stderr
    found = rows(result.stdout)
    assert found["qemu-system-i386"][0] == "ok"
    assert {found[name][0] for name in ("gdb", "xorriso", iso.GRUB_MKRESCUE, "chromium")} == {"missing"}


def test_probe_kvm_asks_the_probe_for_each_architecture(monkeypatch, capsys, tmp_path):
    """--probe-kvm boots kgen's kernel of each architecture through the harness's probe (here a stand-in, so the
    test costs two builds, not two KVM boots)."""
    import kgen.harness.kvmprobe as kvmprobe
    asked = []

    def probe(kernel, cache_dir=None):
        asked.append(kernel.layout.arch.name)
        return kernel.layout.arch.long_mode, "stand-in answer"
    monkeypatch.setattr(kvmprobe, "probe_kvm", probe)
    monkeypatch.setattr(doctormod, "kvm_accessible", lambda: True)
    monkeypatch.chdir(tmp_path)         # a kgen.toml here would not change the kernels probed
    (tmp_path / "kgen.toml").write_text('arch = "x86_64"\n')
    assert main(["doctor", "--probe-kvm"]) == EXIT_OK
    out = capsys.readouterr().out
    assert sorted(asked) == ["i386", "x86_64"]
    assert "KVM      no for kgen's i386 kernel: stand-in answer" in out
    assert "KVM      yes for kgen's x86_64 kernel: stand-in answer" in out
    assert os.listdir(tmp_path) == ["kgen.toml"]        # the kernels were built in a scratch directory
