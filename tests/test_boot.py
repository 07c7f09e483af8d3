"""The kernel booted for real: through GRUB from the ISO and through QEMU's -kernel, its report checked against
the layout and the ELF that produced it; and a kernel that faults on purpose reported as what it is."""
import os
import re
import subprocess
import sys

import pytest

from kgen import bootreport, hw
from kgen.diagnose import find_exception
from kgen.elfinfo import ElfInfo
from kgen.machine import Machine

from conftest import needs_grub, needs_qemu

pytestmark = [pytest.mark.vm, needs_qemu]
BOOT_TIMEOUT = 60


def boot(out, *, iso: bool):
    layout = out.kernel.layout
    target = {"iso": out.iso} if iso else {"kernel": out.elf}
    # An ISO boots with -icount, as `kgen run` does: GRUB can crash under TCG on a loaded host otherwise.
    with Machine(**target, memory_mib=layout.memory_mib, debug_exit_port=layout.debug_exit_port, icount=iso) as m:
        status = m.wait_exit(BOOT_TIMEOUT)
        return status, m.serial


def check_report(out, serial: str):
    layout, image = out.kernel.layout, out.kernel.image
    report = bootreport.parse(serial)
    assert report.ok
    start, end = image.symbol("__kernel_start").value, image.symbol("__kernel_end").value
    assert report.kernel_virt == (start, end)
    assert report.kernel_phys == (start - layout.kernel_virtual_base, end - layout.kernel_virtual_base)
    assert report.cr3 == image.symbol("boot_top_table").value - layout.kernel_virtual_base
    assert report.recursive_slot == layout.recursive_slot
    assert report.recursive_pd == layout.recursive_pd
    ram = [r for r in report.mmap if r.type == hw.MULTIBOOT_MMAP_AVAILABLE]
    assert ram, "no available RAM in the memory map"
    # QEMU's map: low RAM, then one region from 1 MiB up to (guest RAM - firmware's reserve).
    high = [r for r in ram if r.base == 0x100000]
    assert high and high[0].base + high[0].length <= layout.memory_bytes
    assert high[0].length > layout.memory_bytes // 2


@needs_grub
def test_iso_boots_through_grub(default_build):
    status, serial = boot(default_build, iso=True)
    assert status == default_build.kernel.layout.success_status, serial
    check_report(default_build, serial)


def test_elf_boots_through_qemu_kernel(default_build):
    status, serial = boot(default_build, iso=False)
    assert status == default_build.kernel.layout.success_status, serial
    check_report(default_build, serial)


def test_fault_is_reported_with_vector_and_address(fault_build):
    status, serial = boot(fault_build, iso=False)
    layout = fault_build.kernel.layout
    assert status == layout.failure_status, serial
    fault = find_exception(serial)
    assert fault is not None, serial
    assert fault.vector == 14
    assert fault.fields["cr2"] == layout.asm_constants()["BOOT_FAULT_ADDRESS"]
    assert fault.fields["error"] & hw.PF_W and not fault.fields["error"] & hw.PF_P
    kmain = fault_build.kernel.image.symbol("kmain")
    assert kmain.value <= fault.fields["eip"] < kmain.value + kmain.size
    assert re.search(r"EIP=0x[0-9a-f]{8} <kmain(\+0x[0-9a-f]+)?>", fault.describe(ElfInfo.load(fault_build.elf)))


def kgen(*args, env=None):
    return subprocess.run([sys.executable, "-m", "kgen.cli", *args], capture_output=True, text=True, env=env,
                          timeout=120)


def test_kgen_run_exits_0_on_success(default_build):
    result = kgen("run", "--kernel", str(default_build.elf))
    assert result.returncode == 0, result.stderr
    assert bootreport.BOOT_OK in result.stdout


def test_kgen_run_names_the_fault(fault_build):
    result = kgen("run", "--kernel", str(fault_build.elf))
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert "#PF page fault (vector 14)" in last and re.search(r"<kmain(\+0x[0-9a-f]+)?>", last)
    assert "Traceback" not in result.stderr


def test_missing_qemu_is_one_line(default_build, tmp_path):
    env = dict(os.environ, PATH=str(tmp_path))
    result = kgen("run", "--kernel", str(default_build.elf), env=env)
    assert result.returncode == 3
    assert result.stderr.strip() == ("kgen: error: qemu-system-i386 not found: install the Debian package "
                                     "qemu-system-x86")


def test_missing_grub_is_one_line_and_leaves_no_iso(tmp_path):
    env = dict(os.environ, PATH=str(tmp_path))
    out = tmp_path / "out"
    result = kgen("build", "--out", str(out), env=env)
    assert result.returncode == 3
    assert result.stderr.strip() == ("kgen: error: grub-mkrescue not found: install the Debian packages "
                                     "grub-common grub-pc-bin xorriso")
    assert not (out / "kernel.iso").exists()
