"""A kernel booted from a disk image with a boot block of its own (issue 21, `--image`): a 512-byte MBR boot sector
(tests/minikernels.py, BOOT_BLOCK) reads the kernel's sectors with BIOS int 13h, enters protected mode and jumps to
the higher-half kernel, which turns paging on, prints its ready line on COM1 and halts. The image holds no ELF, so
`--kernel` names the kernel's ELF, built beside it; the image is never written. UEFI cannot boot an MBR boot block
(OVMF boots EFI applications only), so this is BIOS alone."""
from __future__ import annotations

import hashlib

import pytest

from conftest import needs_qemu, run_kgen
from minikernels import HIGHER_HALF_READY, boot_block_disk, outcomes

SEGMENTS = "test_elf_segments_map_vaddr_to_paddr_no_wider_than_their_flags"
READY = HIGHER_HALF_READY.rstrip("\n")


@pytest.fixture(scope="module")
def disks(tmp_path_factory):
    out = tmp_path_factory.mktemp("bootblock")
    return {"good": boot_block_disk(out), "writable": boot_block_disk(out, "bootblock-rw", writable_text=1)}


@needs_qemu
def test_a_boot_block_disk_gives_a_verdict_and_is_left_as_it_was(disks):
    disk, kernel = disks["good"]
    before = hashlib.sha256(disk.read_bytes()).hexdigest()
    result = run_kgen("test", "--image", str(disk), "--kernel", str(kernel), "--ready", READY, "-j", "1",
                  "-k", "invariants or oracles", "--", "-v")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "through its own image bootblock.img as the first disk, BIOS" in result.stderr, result.stderr
    seen = outcomes(result.stdout)
    assert seen[SEGMENTS] == "PASSED" and "FAILED" not in seen.values(), seen
    assert hashlib.sha256(disk.read_bytes()).hexdigest() == before


@needs_qemu
def test_the_verdict_is_about_the_kernel_the_boot_block_loaded(disks):
    # The same kernel with its text mapped writable: the segment check names its text pages.
    disk, kernel = disks["writable"]
    result = run_kgen("test", "--image", str(disk), "--kernel", str(kernel), "--ready", READY, "-j", "1",
                  "-k", "segments", "--", "-v")
    assert result.returncode == 1, result.stdout + result.stderr
    assert outcomes(result.stdout)[SEGMENTS] == "FAILED"
    assert "page 0xc0010000 <__image_start> (segment R-X, loaded at 0x10000): writable" in result.stdout, \
        result.stdout


def test_without_kernel_the_image_holds_none_to_find(disks):
    disk, _ = disks["good"]
    result = run_kgen("test", "--image", str(disk))
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"kgen: error: --image {disk}: found no kernel in it"), result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr
