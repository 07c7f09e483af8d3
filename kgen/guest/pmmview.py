"""The kernel's physical frame allocator (templates/pmm.s, or templates/pmm_bitmap.s for pmm.kind = "bitmap") seen
from the host, read out of guest physical memory.

    view = PmmView.of(session)
    state = view.state()            # total, reserved, free = count + untouched, ranges, reserved intervals
    frames = view.free_stack(state) # the free stack, top first, by following the links inside the frames
    frames = view.free_frames(state)    # what the allocator holds free: the stack, or the bitmap's clear bits

Variables are found by their ELF symbols and reached through the kernel image's fixed physical offset, so nothing
here restates an address. Reading is only meaningful while the kernel is idle between calls.

The bitmap kind has no stack and no bump pointer (top and untouched read 0): bit b of its bitmap stands for the b-th
frame of the ranges taken one after the other, set while the frame is in use; the bitmap's own frames are the third
reserved interval, where it is read.

Sizes follow the kernel's architecture: pmm_top, pmm_bump_next, the [start, end) pairs and the link inside a free
frame are words (4 bytes on i386, 8 on x86_64); the frame counts are dwords on both.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from kgen import protocol
from kgen.arch import hw
from kgen.arch import I386, Arch
from kgen.guest.elfinfo import ElfInfo
from kgen.errors import KgenError
from kgen.build.layout import FOUR_GIB, Layout

ReadPhys = Callable[[int, int], bytes]

REPORT_LINE = re.compile("^" + r"(\d+)".join(map(re.escape, protocol.PMM_REPORT_PARTS)) + "$", re.MULTILINE)


class ChainError(KgenError):
    """The free stack cannot be followed: a cycle, a link that is no frame of RAM, or more frames than counted."""


@dataclass(frozen=True)
class PmmState:
    top: int
    count: int                              # frames on the stack
    untouched: int                          # frames never handed out yet (the bump pointer's)
    total: int                              # frames in the ranges
    reserved_frames: int                    # frames of the ranges inside reserved intervals
    ranges: tuple[tuple[int, int], ...]     # [start, end) of free RAM as init found it
    reserved: tuple[tuple[int, int], ...]   # [start, end) never to be handed out: image, Multiboot information

    @property
    def free(self) -> int:
        return self.count + self.untouched

    @property
    def live(self) -> int:
        return self.total - self.reserved_frames - self.free

    def in_ram(self, frame: int) -> bool:
        return any(lo <= frame < hi for lo, hi in self.ranges)

    def in_reserved(self, frame: int) -> bool:
        return any(lo <= frame < hi for lo, hi in self.reserved)


@dataclass(frozen=True)
class ReportLine:
    total: int
    reserved: int
    free: int
    init_ticks: int


def parse_report(serial: str) -> ReportLine:
    m = REPORT_LINE.search(serial)
    if m is None:
        raise KgenError(f"boot report has no line matching {REPORT_LINE.pattern!r}")
    return ReportLine(*map(int, m.groups()))


def ranges_from_mmap(mmap, arch: Arch = I386) -> list[tuple[int, int]]:
    """What pmm_init should make of memory-map entries (bootreport.MemoryRegion): available RAM at or above
    1 MiB, shrunk to whole frames; a 32-bit kernel (no PAE) also keeps only what lies below 4 GiB, its last frame
    excepted (a range's end must fit in a word). Written independently of the template, to check it."""
    clip = arch.clips_ram_at_4g
    ranges = []
    for region in mmap:
        if region.type != hw.MULTIBOOT_MMAP_AVAILABLE or clip and region.base >= FOUR_GIB:
            continue
        start = max(-(-region.base // hw.PAGE_SIZE) * hw.PAGE_SIZE, hw.LOW_MEMORY_END)
        end = region.base + region.length
        if clip:
            end = min(end, FOUR_GIB - hw.PAGE_SIZE)
        end = end // hw.PAGE_SIZE * hw.PAGE_SIZE
        if start < end:
            ranges.append((start, end))
    return ranges


def alloc_at_pages(layout: Layout) -> list[int]:
    """Pages of the temp-map window's page table above its slots (below the bitmap window of a bitmap kernel): the
    table exists from boot, so pmm_alloc_at can map them without the VMM growing tables."""
    span = layout.leaf_table_span
    table = layout.tempmap_base & ~(span - 1)
    end = layout.pmm_bitmap_window.start if layout.pmm_kind == "bitmap" else table + span
    return list(range(layout.tempmap_window.end, end, hw.PAGE_SIZE))


# The bitmap allocator's reserved intervals: the image, the Multiboot information, then its own frames.
BITMAP_INTERVAL = 2


def frames_in_bit_order(ranges):
    """The frames of the ranges one after the other: the frame bit b of the bitmap stands for is the b-th."""
    for start, end in ranges:
        yield from range(start, end, hw.PAGE_SIZE)


def overlap_frames(ranges, intervals) -> int:
    return sum(max(0, min(hi, rhi) - max(lo, rlo)) // hw.PAGE_SIZE
               for lo, hi in ranges for rlo, rhi in intervals)


class PmmView:
    def __init__(self, read_phys: ReadPhys, elf: ElfInfo | None, layout: Layout | None, *,
                 word_size: int | None = None):
        """`word_size` defaults to the layout's architecture's; give it when there is no layout (made-up memory)."""
        self.read_phys = read_phys
        self.elf = elf
        self.layout = layout
        self.word_size = word_size or layout.arch.word_size
        self.kind = layout.pmm_kind if layout is not None else "stack"

    @classmethod
    def of(cls, session) -> "PmmView":
        return cls(session.machine.read_phys, session.elf, session.layout)

    def _read(self, name: str, size: int, index: int) -> int:
        phys = self.elf.symbols[name].value - self.layout.kernel_virtual_base + size * index
        return int.from_bytes(self.read_phys(phys, size), "little")

    def u32(self, name: str, index: int = 0) -> int:
        """Element `index` of a dword variable (the frame counts)."""
        return self._read(name, 4, index)

    def word(self, name: str, index: int = 0) -> int:
        """Element `index` of a word variable (physical addresses: pmm_top, the [start, end) pairs)."""
        return self._read(name, self.word_size, index)

    def link(self, frame: int) -> int:
        """The link a free frame holds: the word at its start."""
        return int.from_bytes(self.read_phys(frame, self.word_size), "little")

    def pairs(self, array: str, count: str, capacity: int) -> tuple[tuple[int, int], ...]:
        """The [start, end) pairs of `array`, as many as the kernel's `count` says. The count is read from the guest,
        so it is bounded by the array's `capacity` before it is used (a wild count would loop for ever)."""
        n = self.u32(count)
        if n > capacity:
            raise ChainError(f"{count} = {n}: more than the {capacity} pairs {array} holds (the kernel's memory is "
                             "corrupt, or this is not the kernel the ELF describes)")
        return tuple((self.word(array, 2 * i), self.word(array, 2 * i + 1)) for i in range(n))

    def state(self) -> PmmState:
        stack = self.kind == "stack"
        return PmmState(top=self.word("pmm_top") if stack else 0, count=self.u32("pmm_count"),
                        untouched=self.u32("pmm_untouched") if stack else 0,
                        total=self.u32("pmm_total"), reserved_frames=self.u32("pmm_reserved_frames"),
                        ranges=self.pairs("pmm_ranges", "pmm_range_count", self.layout.boot_mmap_max_entries),
                        reserved=self.pairs("pmm_reserved", "pmm_reserved_count", self.layout.pmm_reserved_intervals))

    def free_count(self) -> int:
        """Frames free now, as pmm_stats_free counts them: the stack's and the bump pointer's, or the clear bits."""
        return self.u32("pmm_count") + (self.u32("pmm_untouched") if self.kind == "stack" else 0)

    def free_frames(self, state: PmmState | None = None) -> list[int]:
        """The frames the allocator holds free: the free stack (top first; the bump pointer's frames not counted),
        or the bitmap's clear bits (lowest first)."""
        state = state or self.state()
        if self.kind == "stack":
            return self.free_stack(state)
        data = self.bitmap(state)
        return [frame for bit, frame in zip(range(state.total), frames_in_bit_order(state.ranges))
                if not data[bit >> 3] >> (bit & 7) & 1]

    def bitmap(self, state: PmmState) -> bytes:
        """The bitmap's bytes (a bit per frame of the ranges, whole dwords), read from its own frames."""
        start, _ = state.reserved[BITMAP_INTERVAL]
        return self.read_phys(start, (state.total + 31) // 32 * 4)

    def bitmap_frames(self, state: PmmState) -> list[int]:
        """The frames that hold the bitmap."""
        start, end = state.reserved[BITMAP_INTERVAL]
        return list(range(start, end, hw.PAGE_SIZE))

    def free_stack(self, state: PmmState | None = None) -> list[int]:
        """The frames on the free stack, top first. Looks at most count + 1 links, so a chain longer than the
        count, or a cycle, is reported instead of followed for ever."""
        state = state or self.state()
        frames: list[int] = []
        seen: set[int] = set()
        frame = state.top
        while frame:
            where = f"link {len(frames)} of the free stack (count {state.count})"
            if frame in seen:
                raise ChainError(f"{where}: {frame:#x} again, after {' -> '.join(f'{f:#x}' for f in frames[-4:])}"
                                 ": a cycle")
            if frame % hw.PAGE_SIZE or not state.in_ram(frame):
                raise ChainError(f"{where}: {frame:#x} is not a page-aligned frame of RAM")
            if len(frames) == state.count:
                raise ChainError(f"{where}: {frame:#x} is one frame more than the count")
            seen.add(frame)
            frames.append(frame)
            frame = self.link(frame)
        return frames
