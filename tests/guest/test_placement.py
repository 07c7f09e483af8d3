"""Where the kernel really is (issue 21): a loader may put a kernel at a physical address of its own choosing, so the
ELF's p_paddr are not where it is. The segment check learns the base from the live tables (every PT_LOAD at one
offset) and judges rights there. Here GRUB moves a Multiboot 2 kernel with the relocatable header tag (and paging:
MB2_RELOCATED_PAGED maps its link addresses to where it really is); tests/harness/test_limine.py does the same for Limine."""
from __future__ import annotations

import re

import pytest

from conftest import needs_grub, needs_qemu, run_kgen
from minikernels import (MB2_RELOCATABLE_MAX, MB2_RELOCATABLE_MIN, MB2_RELOCATED_PAGED_READY,
                         mb2_relocated_paged, outcomes)

pytestmark = [needs_qemu, needs_grub]
SEGMENTS = "test_elf_segments_map_vaddr_to_paddr_no_wider_than_their_flags"
ELF_BASE = 0x100000         # MB2_RELOCATED_PAGED_LDS: linked and "loaded" at 1 MiB
READY = MB2_RELOCATED_PAGED_READY.rstrip("\n")


def found_base(stdout: str) -> int:
    match = re.search(rf"the page tables put the kernel at physical base (0x[0-9a-f]+), where its ELF's p_paddr say "
                      rf"{ELF_BASE:#x}: every segment is judged there", stdout)
    assert match, stdout
    return int(match.group(1), 16)


@pytest.fixture(scope="module")
def kernels(tmp_path_factory):
    out = tmp_path_factory.mktemp("placement")
    return {"good": mb2_relocated_paged(out), "writable": mb2_relocated_paged(out, "mb2-paged-rw", writable_text=1)}


def test_a_kernel_grub_moved_is_judged_where_grub_put_it(kernels):
    result = run_kgen("test", "--kernel", str(kernels["good"]), "--boot", "grub", "--ready", READY, "-j", "1",
                      "-k", "segments or paging_and_write_protect", "--", "-v", "-rP")
    assert result.returncode == 0, result.stdout + result.stderr
    assert outcomes(result.stdout)[SEGMENTS] == "PASSED"
    base = found_base(result.stdout)
    assert MB2_RELOCATABLE_MIN <= base < MB2_RELOCATABLE_MAX and base % 0x1000 == 0, hex(base)


def test_rights_are_judged_at_the_base_found(kernels):
    # Its text is mapped writable: each text page is named, loaded where GRUB put it, the base said first.
    result = run_kgen("test", "--kernel", str(kernels["writable"]), "--boot", "grub", "--ready", READY, "-j", "1",
                      "-k", "segments", "--", "-v", "-rP")
    assert result.returncode == 1, result.stdout + result.stderr
    assert outcomes(result.stdout)[SEGMENTS] == "FAILED"
    base = found_base(result.stdout)
    lines = [line.strip() for line in result.stdout.splitlines() if line.startswith("  ")]
    assert lines[0].startswith(f"the page tables put the kernel at physical base {base:#x}"), lines
    assert re.match(rf"page {ELF_BASE:#010x} <__image_start> \(segment R-X, loaded at {base:#x}\): writable "
                    r"\(P RW[A-Z ]*\) "
                    r"via PD\[0\] @ 0x[0-9a-f]+ → PT\[256\] @ 0x[0-9a-f]+, but no writable segment lies there",
                    lines[1]), lines
    assert not [line for line in lines if "maps physical" in line or "is mapped at physical" in line], lines
