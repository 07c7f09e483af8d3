"""`kgen inspect`'s rows of the virtual address space never run across the start of the kernel half: szhou42/osdev
maps a process's user stack (0xbfffc000-0xc0000000) and the kernel's first MiB (from 0xc0000000) with the same rights
(P RW US), which made one row "0xbfffc000-0xc0100000 user -" holding both halves."""
from __future__ import annotations

from types import SimpleNamespace

from kgen.arch.hw import PAGE_SIZE, PTE_P, PTE_RW, PTE_US
from kgen.guest.pagewalk import Attrs, Mapping
from kgen.inspect.model import virtual_ranges

USER_RW = Attrs(PTE_P | PTE_RW | PTE_US)


class FakeWalker:
    """The two runs of pages of the example, 4 KiB pages, no recursive slot, an empty top-level table."""
    mode = SimpleNamespace(nx_levels=(), entry_size=4)
    nxe = False
    top = 0x416000

    def __init__(self, runs: list[Mapping]):
        self.runs = runs

    def mappings(self) -> list[Mapping]:
        return self.runs

    def translate(self, vaddr: int):
        return SimpleNamespace(size=PAGE_SIZE)

    def recursive_windows(self) -> list:
        return []


def rows(half: int | None) -> list[tuple[int, int]]:
    view = SimpleNamespace(kernel_half=half, space=None, read_phys=lambda addr, size: bytes(size))
    walker = FakeWalker([Mapping(0xBFFFC000, 0x3401000, 0x4000, USER_RW), Mapping(0xC0000000, 0x0, 0x100000, USER_RW)])
    return [(int(r["start"], 16), int(r["end"], 16)) for r in virtual_ranges(view, walker, [], [])]


def test_a_row_ends_where_the_kernel_half_starts():
    assert rows(0xC0000000) == [(0xBFFFC000, 0xC0000000), (0xC0000000, 0xC0100000)]


def test_without_a_kernel_half_rows_merge_on_their_rights_alone():
    assert rows(None) == [(0xBFFFC000, 0xC0100000)]
