"""Whether the ELF the checks are judged against is the kernel the machine runs: its code is in guest memory where
the ELF says it runs. QEMU's -kernel and the GRUB ISO kgen makes load the very file; an image of the author's or
their own QEMU command line may boot another build, and every verdict would then be about the wrong file.
"""
from __future__ import annotations

from pathlib import Path

from elftools.elf.elffile import ELFFile

from kgen.arch.hw import CR0_PG
from kgen.errors import MachineError
from kgen.guest.pagewalk import WalkError

SAMPLE = 64     # bytes compared at the start of each code segment: enough that chance cannot match


def code_samples(elf_path: Path) -> list[tuple[int, int, bytes]]:
    """(vaddr, paddr, first bytes) of each read-only code segment with file bytes: what a loader copies and the
    kernel does not write."""
    samples = []
    with open(elf_path, "rb") as stream:
        for segment in ELFFile(stream).iter_segments():
            flags = segment["p_flags"]
            if segment["p_type"] == "PT_LOAD" and segment["p_filesz"] and flags & 1 and not flags & 2:
                samples.append((segment["p_vaddr"], segment["p_paddr"], segment.data()[:SAMPLE]))
    return samples


def kernel_not_in_memory(view, elf_path: Path) -> str | None:
    """Why the ELF's code is not what the stopped machine holds, or None when one code segment matches: read at its
    link address through the page tables (paging on: wherever a loader put it), else at its load address."""
    samples = code_samples(elf_path)
    if not samples:
        return None     # nothing read-only to compare: no verdict either way
    paging = bool(view.regs.cr0 & CR0_PG)
    for vaddr, paddr, expected in samples:
        try:
            seen = (view.need_walker().read_virtual(vaddr, len(expected)) if paging
                    else view.read_phys(paddr, len(expected)))
        except (WalkError, MachineError, OSError, ValueError):
            continue
        if seen == expected:
            return None
    where = "its link addresses through the page tables" if paging else "its load addresses (paging off)"
    return (f"its code is not in guest memory at {where}: not the kernel this machine boots, or a build older or "
            "newer than the one in the image")
