"""Guest RAM as a file both QEMU and the harness map (`memory-backend-file,share=on`).

Reading guest physical memory is then a memcpy, and it stays readable after QEMU has exited. Where the file backs
an address is QEMU's own answer (`info mtree -f`), not a recomputation of the `pc` machine's rules. Whole-RAM
copies (`save`, `restore`) are what snapshot restore uses to put RAM back (kgen/machine/snapshot.py).
"""
from __future__ import annotations

import mmap
import os
import re
from dataclasses import dataclass
from pathlib import Path

from kgen.arch.hw import LEGACY_HOLE

MIB = 1 << 20
# The legacy window below 1 MiB (LEGACY_HOLE) shows VGA memory or BIOS shadow copies depending on the chipset's PAM
# registers, which the firmware changes at run time: never read it from the RAM file.


@dataclass(frozen=True)
class RamWindow:
    """Guest physical [start, end) is the RAM file at [offset, offset + end - start)."""

    start: int
    end: int
    offset: int


def parse_ram_windows(mtree_flat: str, backend_id: str) -> list[RamWindow]:
    """Where the memory backend `backend_id` appears in the flat view of the system address space.

    `mtree_flat` is HMP `info mtree -f`. On `pc` the RAM is one block split around the PCI hole: with less than
    3.5 GiB it is all below 4 GiB at offset == address; with more, 3 GiB stay low and the rest starts at 4 GiB with
    file offset 3 GiB. Reading QEMU's own view instead of recomputing that rule keeps it right for any machine.
    """
    windows: list[RamWindow] = []
    in_system = False
    for line in mtree_flat.splitlines():
        if line.startswith("FlatView"):
            in_system = False
        elif line.lstrip().startswith("AS "):
            in_system = in_system or line.split('"')[1] == "memory"
        elif in_system:
            m = re.match(r"\s*([0-9a-f]+)-([0-9a-f]+) \(prio -?\d+, (\w+)\): (\S+)(?: @([0-9a-f]+))?", line)
            if m and m[3] == "ram" and m[4] == backend_id:
                window = RamWindow(int(m[1], 16), int(m[2], 16) + 1, int(m[5] or "0", 16))
                windows.extend(clip_legacy_hole(window))
    return windows


def clip_legacy_hole(w: RamWindow) -> list[RamWindow]:
    """`w` less the legacy hole 0xA0000-0xFFFFF (VGA memory and ROMs, not RAM, whatever the RAM file holds there)."""
    lo, hi = LEGACY_HOLE
    if w.end <= lo or w.start >= hi:
        return [w]
    parts = []
    if w.start < lo:
        parts.append(RamWindow(w.start, lo, w.offset))
    if w.end > hi:
        parts.append(RamWindow(hi, w.end, w.offset + hi - w.start))
    return parts


def poison_pattern(poison: int | bytes | None) -> bytes | None:
    if poison is None:
        return None
    if isinstance(poison, int):
        if not 0 <= poison <= 0xFF:
            raise ValueError(f"poison byte {poison:#x} does not fit in a byte; give bytes for a wider pattern")
        return bytes([poison])
    pattern = bytes(poison)
    # The pattern must tile pages exactly, so the byte at a physical address is pattern[addr % len].
    if len(pattern) not in (1, 2, 4, 8):
        raise ValueError(f"poison pattern must be 1, 2, 4 or 8 bytes, not {len(pattern)}")
    return pattern


def fill_file(path: Path, size: int, pattern: bytes | None) -> None:
    """Create `path` with `size` bytes: sparse zeros, or `pattern` repeated (written in 1 MiB pwrites: ≈0.02 s for
    128 MiB, ≈0.2 s for 1 GiB on ext4 here)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, size)
        if pattern is not None:
            block = memoryview(pattern * (MIB // len(pattern)))
            for offset in range(0, size, MIB):
                os.pwrite(fd, block[: size - offset], offset)
    finally:
        os.close(fd)


class GuestRam:
    """The RAM file of one machine: created (and poisoned) before QEMU starts, mapped once QEMU has said where it
    appears in the guest's physical address space."""

    BACKEND_ID = "ram"

    def __init__(self, path: Path, memory_mib: int, poison: bytes | None):
        self.path = path
        self.size = memory_mib * MIB
        self.poison = poison
        self.windows: list[RamWindow] = []
        self._map: mmap.mmap | None = None

    def create(self) -> None:
        fill_file(self.path, self.size, self.poison)

    def qemu_args(self, opt) -> list[str]:
        return ["-object", f"memory-backend-file,id={self.BACKEND_ID},size={self.size // MIB}M,"
                           f"mem-path={opt(self.path)},share=on"]

    def map(self, mtree_flat: str) -> str | None:
        """Map the file and learn its windows; returns why the layout is not understood, or None."""
        fd = os.open(self.path, os.O_RDWR)
        try:
            self._map = mmap.mmap(fd, self.size, mmap.MAP_SHARED)
        finally:
            os.close(fd)  # the mapping keeps the file referenced
        self.windows = parse_ram_windows(mtree_flat, self.BACKEND_ID)
        mapped = sum(w.end - w.start for w in self.windows)
        expected = self.size - (LEGACY_HOLE[1] - LEGACY_HOLE[0])
        if mapped != expected or any(w.offset + w.end - w.start > self.size for w in self.windows):
            return f"guest RAM layout not understood: {self.windows} cover {mapped:#x} bytes of {expected:#x}"
        return None

    @property
    def mapped(self) -> bool:
        return self._map is not None

    def file_offset(self, addr: int, size: int) -> int | None:
        if self._map is None:
            return None
        for w in self.windows:
            if w.start <= addr and addr + size <= w.end:
                return w.offset + addr - w.start
        return None

    def read(self, offset: int, size: int) -> bytes:
        return bytes(self._map[offset:offset + size])

    def write(self, offset: int, data: bytes) -> None:
        self._map[offset:offset + len(data)] = data

    def save(self) -> bytes:
        """All of the file, for `restore` (the whole RAM: ≈12 ms for 128 MiB here once the pages are resident)."""
        return bytes(self._map)

    def restore(self, saved: bytes) -> None:
        self._map[:] = saved

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None
