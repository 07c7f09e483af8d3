"""The walker against QEMU's `gva2gpa` at any page offset, as a property: every page kgen's kernel maps and a large
page of every size its paging mode has (planted by hand: 4 MiB on i386, 2 MiB and 1 GiB on x86_64), at offsets
drawn from the whole page, each offset bit alone and the last byte. A walker that mixes offset bits into the frame,
or keeps only the low ones, disagrees somewhere in 0..0xFFF or above. One boot per architecture; the machine stays
stopped while hypothesis draws (the draws only read it).
"""
from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from kgen.guest.elfinfo import ElfInfo
from kgen.harness.kernel import KernelUnderTest
from kgen.harness.live import boot
from kgen.harness.suite.test_oracles import every_page, plant_large_pages

from conftest import needs_qemu

pytestmark = [pytest.mark.vm, needs_qemu]


@pytest.fixture(scope="module")
def machine(kernel_build):
    """`arch`'s default kernel, booted once, large pages planted: (live kernel, its walker, pages), where pages
    maps each page's virtual address to (size, the physical address planted there, or None for the kernel's own)."""
    layout = kernel_build.kernel.layout
    with boot(KernelUnderTest(kernel_build.elf, ElfInfo.load(kernel_build.elf), layout)) as live:
        planted = plant_large_pages(live)
        view = live.view()
        pages = {vaddr: (t.size, None) for vaddr, t in every_page(view).items()}
        pages.update({vaddr: (size, paddr) for vaddr, size, paddr in planted})
        yield live, view.walker, pages


def offsets(size: int) -> st.SearchStrategy[int]:
    bits = size.bit_length() - 1
    return (st.integers(0, size - 1) | st.integers(0, bits - 1).map(lambda bit: 1 << bit)
            | st.just(size - 1) | st.integers(0, 0xFFF))


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_walker_and_qemu_agree_at_any_offset(machine, data):
    live, walker, pages = machine
    # A page size first, then a page of it: the few large pages are drawn as often as the hundreds of small ones.
    size = data.draw(st.sampled_from(sorted({size for size, _ in pages.values()})), label="size")
    vaddr = data.draw(st.sampled_from(sorted(v for v, (n, _) in pages.items() if n == size)), label="page")
    planted = pages[vaddr][1]
    offset = data.draw(offsets(size), label="offset")
    t = walker.translate(vaddr + offset)
    ours = None if t is None else t.paddr
    assert ours == live.machine.gva2gpa(vaddr + offset), f"{vaddr:#x} + {offset:#x} ({size:#x}-byte page)"
    if planted is not None:
        assert ours == planted + offset, f"planted {size:#x}-byte page {vaddr:#x} + {offset:#x}"


def test_every_large_size_is_planted(machine, kernel_build):
    """The property above draws from a large page of every size the paging mode has."""
    arch = kernel_build.kernel.layout.arch
    _, _, pages = machine
    sizes = {size for size, planted in pages.values() if planted is not None}
    assert sizes == {4096} | {1 << arch.shift(level) for level in arch.paging.large_levels}
