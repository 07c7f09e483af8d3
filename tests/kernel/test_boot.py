"""The kernel of every architecture booted for real: through GRUB from the ISO and through QEMU's -kernel, its report
checked against the layout and the ELF that produced it; and a kernel that faults on purpose reported as what it
is."""
import re
import shutil

import pytest

from kgen.guest import bootreport

from kgen.arch import hw
from kgen.guest.diagnose import find_exception
from kgen.guest.elfinfo import ElfInfo
from kgen.machine import Machine

from conftest import ARCH_BUILDS, needs_grub, needs_qemu, run_kgen

pytestmark = [pytest.mark.vm, needs_qemu]
BOOT_TIMEOUT = 60


def boot(out, *, iso: bool):
    layout = out.kernel.layout
    qemu = layout.arch.qemu
    if shutil.which(qemu) is None:
        pytest.skip(f"{qemu} not installed (Debian package qemu-system-x86)")
    target = {"iso": out.iso} if iso else {"kernel": out.elf}
    # An ISO boots with -icount, as `kgen run` does: GRUB can crash under TCG on a loaded host otherwise.
    with Machine(**target, memory_mib=layout.memory_mib, icount=iso,
                 qemu=qemu) as m:
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
    assert report.recursive_pd == layout.recursive_top
    # The line names the top table as the architecture does: PD on i386, PML4 on x86_64.
    top = layout.arch.paging.level_names[0]
    assert re.search(rf"^recursive: {top}\[0x0*{layout.recursive_slot:x}\] at 0x0*{layout.recursive_top:x} "
                     rf"maps the {top} at CR3; all entries match$", serial, re.MULTILINE), serial
    ram = [r for r in report.mmap if r.type == hw.MULTIBOOT_MMAP_AVAILABLE]
    assert ram, "no available RAM in the memory map"
    # QEMU's map: low RAM, then one region from 1 MiB up to (guest RAM - firmware's reserve).
    high = [r for r in ram if r.base == 0x100000]
    assert high and high[0].base + high[0].length <= layout.memory_bytes
    assert high[0].length > layout.memory_bytes // 2


def test_the_x86_64_kernel_is_the_one_booted(x86_64_build):
    """The parametrised boots below really run a 64-bit kernel in qemu-system-x86_64, its image in the top 2 GiB
    and its top table a PML4 reached through slot 510."""
    layout = x86_64_build.kernel.layout
    assert layout.arch.qemu == "qemu-system-x86_64"
    assert ElfInfo.load(x86_64_build.elf).bits == 64
    assert layout.kernel_virtual_start == 0xFFFFFFFF80100000 and layout.recursive_slot == 510


@needs_grub
def test_iso_boots_through_grub(arch_build):
    status, serial = boot(arch_build, iso=True)
    assert status == arch_build.kernel.layout.success_status, serial
    check_report(arch_build, serial)


def test_elf_boots_through_qemu_kernel(arch_build):
    status, serial = boot(arch_build, iso=False)
    assert status == arch_build.kernel.layout.success_status, serial
    check_report(arch_build, serial)


def test_fault_is_reported_with_vector_and_address(arch_fault_build):
    status, serial = boot(arch_fault_build, iso=False)
    layout = arch_fault_build.kernel.layout
    long_mode = layout.arch.word_size == 8
    assert status == layout.failure_status, serial
    fault = find_exception(serial)
    assert fault is not None, serial
    assert fault.vector == hw.VECTOR_PAGE_FAULT == 14
    # kmain writes to the image's physical load address, which nothing maps once the boot identity map is gone.
    assert fault.fields["cr2"] == layout.asm_constants()["BOOT_FAULT_ADDRESS"] == layout.kernel_load_address
    assert fault.fields["error"] & hw.PF_W and not fault.fields["error"] & hw.PF_P
    assert not fault.fields["error"] & (hw.PF_U | hw.PF_RSVD | hw.PF_I)
    # The 64-bit kernel reports rip=, the i386 one eip=.
    assert fault.long_mode == long_mode and ("rip" in fault.fields) == long_mode
    assert ("eip" in fault.fields) != long_mode
    kmain = arch_fault_build.kernel.image.symbol("kmain")
    assert kmain.value <= fault.ip < kmain.value + kmain.size
    name, digits = ("RIP", 16) if long_mode else ("EIP", 8)
    assert re.search(rf"{name}=0x[0-9a-f]{{{digits}}} <kmain(\+0x[0-9a-f]+)?>",
                     fault.describe(ElfInfo.load(arch_fault_build.elf)))


def arch_of(out) -> str:
    return out.kernel.layout.arch.name


def test_kgen_run_exits_0_on_success(arch_build):
    result = run_kgen("run", "--arch", arch_of(arch_build), "--kernel", str(arch_build.elf))
    assert result.returncode == 0, result.stderr
    assert bootreport.BOOT_OK in result.stdout


@pytest.mark.parametrize("arch", tuple(ARCH_BUILDS))
def test_kgen_run_direct_builds_and_boots(arch, tmp_path):
    """`kgen run --arch ARCH --direct`: build the ELF, boot it with -kernel, exit 0 on the kernel's success."""
    result = run_kgen("run", "--arch", arch, "--direct", "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert bootreport.BOOT_OK in result.stdout
    top = "PML4" if arch == "x86_64" else "PD"
    assert f"recursive: {top}[" in result.stdout
    assert (tmp_path / "out" / "kernel.elf").is_file() and not (tmp_path / "out" / "kernel.iso").exists()


def test_kgen_run_names_the_fault(arch_fault_build):
    result = run_kgen("run", "--arch", arch_of(arch_fault_build), "--kernel", str(arch_fault_build.elf))
    assert result.returncode == 4          # the kernel failed (kgen/errors.py)
    last = result.stderr.strip().splitlines()[-1]
    name = "RIP" if arch_fault_build.kernel.layout.arch.word_size == 8 else "EIP"
    assert "#PF page fault (vector 14)" in last and re.search(rf"{name}=0x[0-9a-f]+ <kmain(\+0x[0-9a-f]+)?>", last)
    assert "Traceback" not in result.stderr


def test_missing_qemu_is_one_line(arch_build, tmp_path):
    result = run_kgen("run", "--arch", arch_of(arch_build), "--kernel", str(arch_build.elf),
                      env={"PATH": str(tmp_path)})
    assert result.returncode == 3
    assert result.stderr.strip() == (f"kgen: error: {arch_build.kernel.layout.arch.qemu} not found: "
                                     "install the Debian package qemu-system-x86")


@pytest.mark.parametrize("arch", tuple(ARCH_BUILDS))
def test_missing_grub_is_one_line_and_leaves_no_iso(arch, tmp_path):
    out = tmp_path / "out"
    result = run_kgen("build", "--arch", arch, "--out", str(out), env={"PATH": str(tmp_path)})
    assert result.returncode == 3
    assert result.stderr.strip() == ("kgen: error: grub-mkrescue not found: install the Debian packages "
                                     "grub-common grub-pc-bin xorriso")
    assert not (out / "kernel.iso").exists()
