"""Ways in through GRUB and OVMF (issue 21): the zoo's Multiboot 2 kernels and a Multiboot 1 kernel that needs GRUB,
booted from the ISO kgen makes around them (kgen/build/iso.py `make_boot_iso`), under SeaBIOS and under OVMF
(kgen/machine/firmware.py); kgen's own hybrid ISO under OVMF; what the ELF probe finds; UEFI machines restored from
a snapshot."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from conftest import ARCH_BUILDS, needs_efi, needs_grub
from kgen.build.iso import GRUB_EFI_MODULES, grub_config, make_boot_iso
from kgen.errors import ToolMissing
from kgen.guest.elfinfo import ElfInfo, multiboot2_header_offset
from kgen.guest.bootreport import EXIT_SUCCESS
from kgen.harness.bootpath import grub_icount
from kgen.machine import Machine, firmware
from kgen.machine.snapshot import MachinePool
from minikernels import (GRUB_MODULE_MISSING, GRUB_MODULE_NAME, GRUB_MODULE_READY, MB2_I386_READY,
                         MB2_RELOCATABLE_MAX, MB2_RELOCATABLE_MIN, MB2_RELOCATABLE_READY, MB2_X86_64_READY, build,
                         grub_module, mb2_i386, mb2_relocatable, mb2_x86_64)

QEMU = "qemu-system-x86_64"     # OVMF is x86_64 firmware; SeaBIOS boots the same ISOs in it
BOOT_TIMEOUT = 120              # GRUB under TCG on a loaded host: ≈10 s with -icount (SeaBIOS), ≈12 s under OVMF
MODULE_TEXT = "zoo-module-payload"

FIRMWARES = ("bios", pytest.param("uefi", marks=needs_efi))


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """name -> (ELF, GRUB protocol, modules as --module takes them, ready text on COM1)."""
    out = tmp_path_factory.mktemp("zoo")
    module = out / "payload.txt"
    module.write_bytes(MODULE_TEXT.encode() + b"\0")
    return {
        "mb2-i386": (mb2_i386(out), "multiboot2", (), MB2_I386_READY),
        "mb2-x86_64": (mb2_x86_64(out), "multiboot2", (), MB2_X86_64_READY),
        "mb2-reloc": (mb2_relocatable(out), "multiboot2", (), MB2_RELOCATABLE_READY),
        "grubmod": (grub_module(out), "multiboot", (f"{module},{GRUB_MODULE_NAME}",),
                    f"{GRUB_MODULE_READY}{MODULE_TEXT}\n"),
    }


@pytest.fixture(scope="module")
def zoo_isos(zoo, tmp_path_factory):
    out = tmp_path_factory.mktemp("zoo-isos")
    return {name: make_boot_iso(elf, out, protocol=protocol, modules=modules, name=f"{name}.iso")
            for name, (elf, protocol, modules, _) in zoo.items()}


def boot_to_ready(ready: str, firmware: str = "bios", **target) -> str:
    with Machine(**target, firmware=firmware, qemu=QEMU, icount=grub_icount(True, firmware, "tcg")) as m:
        return m.wait_for(ready, BOOT_TIMEOUT)


# --- the ELF probe -------------------------------------------------------------------------------------------------

def test_the_probe_finds_each_zoo_kernels_header(zoo):
    found = {name: ElfInfo.load(elf).multiboot_headers() for name, (elf, *_) in zoo.items()}
    assert {name: h.protocols for name, h in found.items()} == {
        "mb2-i386": ("multiboot2",), "mb2-x86_64": ("multiboot2",), "mb2-reloc": ("multiboot2",),
        "grubmod": ("multiboot",)}
    assert found["mb2-i386"].v2_relocatable is None and found["mb2-i386"].v2_architecture == 0
    reloc = found["mb2-reloc"].v2_relocatable
    assert (reloc.min_addr, reloc.max_addr, reloc.align, reloc.preference) == (
        MB2_RELOCATABLE_MIN, MB2_RELOCATABLE_MAX, 0x1000, 1)
    assert found["mb2-reloc"].v2_tags == (10,)
    assert found["grubmod"].v1_flags == 0x3 and not found["grubmod"].v1_addresses
    assert found["mb2-x86_64"].describe() == ("Multiboot 2 header at file offset 0x1000 (architecture i386, "
                                              "tags: none)")
    assert found["mb2-reloc"].describe().endswith("tags: relocatable), relocatable to 0x400000-0x1000000, aligned to "
                                                  "0x1000, lowest")


def test_a_plain_elf_has_no_header_and_the_line_says_what_was_looked_for(tmp_path):
    elf = build(tmp_path, "plain", ".text\n.globl _start\n_start:\n    hlt\n")
    headers = ElfInfo.load(elf).multiboot_headers()
    assert headers.protocols == () and headers.v2_relocatable is None
    assert headers.describe() == (
        "no Multiboot header: looked for a Multiboot 1 header (magic 0x1badb002, 4-byte aligned, in the first 8 KiB) "
        "and a Multiboot 2 header (magic 0xe85250d6, 8-byte aligned, in the first 32 KiB)")


def test_a_multiboot2_header_with_a_bad_checksum_or_past_32_kib_is_not_found(tmp_path):
    header = bytes.fromhex("d65052e8" "00000000" "18000000") + (
        (-(0xE85250D6 + 0x18)) & 0xFFFFFFFF).to_bytes(4, "little") + bytes.fromhex("0000000008000000")
    assert multiboot2_header_offset(bytes(0x100) + header) == 0x100
    assert multiboot2_header_offset(bytes(0x104) + header) is None                 # not 8-aligned
    assert multiboot2_header_offset(bytes(0x100) + header[:12] + bytes(4) + header[16:]) is None
    assert multiboot2_header_offset(bytes(0x8000 - 0x10) + header) is None         # runs past 32 KiB


# --- the ISO around a kernel ---------------------------------------------------------------------------------------

def test_the_grub_config_loads_by_protocol_and_quotes_every_word():
    cfg = grub_config("multiboot2", "/kernel/k.elf", "root=/dev/x it's", [("/modules/0-m", "initrd")])
    assert "    multiboot2 '/kernel/k.elf' 'root=/dev/x' 'it'\\''s'\n    module2 '/modules/0-m' 'initrd'\n" in cfg
    assert "    multiboot '/kernel/k.elf'\n    boot" in grub_config("multiboot", "/kernel/k.elf")


@needs_grub
@pytest.mark.parametrize("fw", FIRMWARES)
@pytest.mark.parametrize("name", ("mb2-i386", "mb2-x86_64", "mb2-reloc", "grubmod"))
def test_a_zoo_kernel_boots_through_the_iso(zoo, zoo_isos, name, fw):
    ready = zoo[name][3]
    text = boot_to_ready(ready, iso=zoo_isos[name], firmware=fw)
    assert ready in text


def test_the_kernel_that_needs_grub_finds_no_module_under_qemus_kernel_loader(zoo):
    elf, _, modules, _ = zoo["grubmod"]
    path, _, args = modules[0].partition(",")
    # QEMU's -kernel hands the module's file name with its arguments: "payload.txt zoo.initrd", not "zoo.initrd".
    with Machine(kernel=elf, extra_args=("-initrd", f"{path} {args}")) as m:
        assert GRUB_MODULE_MISSING in m.wait_for(GRUB_MODULE_MISSING, BOOT_TIMEOUT)


@needs_grub
def test_a_hybrid_iso_boots_as_a_disk_and_the_file_is_not_written(zoo_isos):
    iso = zoo_isos["mb2-i386"]
    before = hashlib.sha256(iso.read_bytes()).hexdigest()
    assert MB2_I386_READY in boot_to_ready(MB2_I386_READY, disk=iso)
    assert hashlib.sha256(iso.read_bytes()).hexdigest() == before


# --- kgen's own ISO under OVMF -------------------------------------------------------------------------------------

@needs_grub
@needs_efi
@pytest.mark.parametrize("arch", tuple(ARCH_BUILDS))
def test_kgens_own_iso_boots_under_uefi(request, arch):
    out = request.getfixturevalue(ARCH_BUILDS[arch])
    layout = out.kernel.layout
    with Machine(iso=out.iso, firmware="uefi", qemu=QEMU, icount=grub_icount(True, "uefi", "tcg"),
                 memory_mib=layout.memory_mib) as m:
        status = m.wait_exit(BOOT_TIMEOUT)
        assert status == layout.success_status, m.serial
        assert m.serial.rstrip().endswith(EXIT_SUCCESS), m.serial


# --- UEFI machines: refusals, snapshots ----------------------------------------------------------------------------

def test_uefi_without_ovmf_is_tool_missing_naming_the_package(monkeypatch, zoo_isos):
    monkeypatch.setattr(firmware, "OVMF_CANDIDATES", ((Path("/nonexistent/CODE.fd"), Path("/nonexistent/VARS.fd")),))
    with pytest.raises(ToolMissing, match="install the Debian package ovmf"):
        Machine(iso=zoo_isos["mb2-i386"], firmware="uefi", qemu=QEMU).launch()


@pytest.mark.parametrize("options, why", [
    (dict(kernel="k.elf", firmware="uefi", qemu=QEMU), "not a -kernel"),
    (dict(iso="x.iso", firmware="uefi"), "qemu-system-x86_64"),
    (dict(iso="x.iso", firmware="coreboot", qemu=QEMU), "firmware must be one of bios, uefi"),
    (dict(iso="x.iso", disk="x.img"), "exactly one of"),
])
def test_impossible_machines_are_refused(options, why):
    with pytest.raises(ValueError, match=why):
        Machine(**options)


@needs_grub
@needs_efi
def test_a_uefi_machine_is_restored_from_its_snapshot_and_relaunched(zoo_isos):
    pool = MachinePool()
    options = dict(iso=zoo_isos["mb2-i386"], firmware="uefi", qemu=QEMU, icount=grub_icount(True, "uefi", "tcg"))

    def ready(m):
        m.wait_for(MB2_I386_READY, BOOT_TIMEOUT)

    try:
        first = pool.fresh(options, ready, "mb2")
        first.shutdown()
        again = pool.fresh(options, ready, "mb2")       # the same QEMU, loadvm'd: OVMF's variable store included
        assert again.serial.endswith(MB2_I386_READY) and again.registers().halted
        again.quit()                                    # gone: the next one is a new QEMU restoring the snapshot
        third = pool.fresh(options, ready, "mb2")
        assert third.serial.endswith(MB2_I386_READY) and third.registers().halted
        third.shutdown()
        assert pool.counts == {"cold": 0, "saved": 1, "restored": 1, "relaunched": 1}
    finally:
        pool.close()
