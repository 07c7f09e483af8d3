"""The kernel's boot report (templates/report.s) read back into numbers."""
from __future__ import annotations

import re
from dataclasses import dataclass

from kgen.errors import KgenError
from kgen.protocol import BOOT_OK, EXIT_SUCCESS


def reported_success(serial: str) -> bool:
    """Whether COM1's last line is the kernel's success line: nothing ran after exit_success printed it."""
    lines = [line.strip() for line in serial.splitlines() if line.strip()]
    return bool(lines) and lines[-1] == EXIT_SUCCESS


@dataclass(frozen=True)
class MemoryRegion:
    base: int
    length: int
    type: int


@dataclass(frozen=True)
class BootReport:
    multiboot_flags: int
    mem_upper_kib: int
    mmap: tuple[MemoryRegion, ...]
    kernel_phys: tuple[int, int]
    kernel_virt: tuple[int, int]
    cr3: int
    recursive_slot: int
    recursive_pd: int
    ok: bool


def parse(serial: str) -> BootReport:
    def one(pattern: str) -> re.Match:
        m = re.search(pattern, serial, re.MULTILINE)
        if m is None:
            raise KgenError(f"boot report incomplete: no line matching {pattern!r}")
        return m

    hexnum = r"0x([0-9a-f]+)"
    mb = one(rf"^multiboot: flags={hexnum} mem_lower={hexnum} mem_upper={hexnum}$")
    kernel = one(rf"^kernel: phys {hexnum}-{hexnum} virt {hexnum}-{hexnum}$")
    recursive = one(rf"^recursive: (PD|PML4)\[{hexnum}\] at {hexnum} maps the \1 at CR3; all entries match$")
    mmap = tuple(MemoryRegion(int(b, 16), int(n, 16), int(t, 16)) for b, n, t in
                 re.findall(rf"^mmap: base={hexnum} length={hexnum} type={hexnum}$", serial, re.MULTILINE))
    return BootReport(
        multiboot_flags=int(mb.group(1), 16), mem_upper_kib=int(mb.group(3), 16), mmap=mmap,
        kernel_phys=(int(kernel.group(1), 16), int(kernel.group(2), 16)),
        kernel_virt=(int(kernel.group(3), 16), int(kernel.group(4), 16)),
        cr3=int(one(rf"^cr3: {hexnum}$").group(1), 16),
        recursive_slot=int(recursive.group(2), 16), recursive_pd=int(recursive.group(3), 16),
        ok=re.search(rf"^{BOOT_OK}$", serial, re.MULTILINE) is not None,
    )
