"""The kernel heap driven through the call channel against a Python model: blocks never overlap, alignment holds,
each block's contents survive until it is freed, emptied pages go back, no frame is lost; and every misuse the
heap must catch stops the kernel with a report."""
import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kgen import hw
from kgen.build import build
from kgen.calls import CallError
from kgen.config import Config
from kgen.pagewalk import Walker
from kgen.session import KernelSession

from conftest import POISON

pytestmark = [pytest.mark.vm, pytest.mark.skipif(shutil.which("qemu-system-i386") is None,
                                                  reason="qemu-system-i386 not installed")]


class VirtualMemory:
    """Reads and writes at kernel virtual addresses, translated by walking the guest's own page tables.

    The walker is a snapshot: `refresh()` after the kernel changed its mappings.
    """

    def __init__(self, s):
        self.s = s
        self.cr3 = s.machine.registers().cr3 & hw.PTE_FRAME_MASK
        self.refresh()

    def refresh(self):
        self.walker = Walker(self.s.machine.read_phys, self.cr3)

    def write(self, vaddr: int, data: bytes):
        for paddr, n in self.walker.physical_spans(vaddr, len(data)):
            self.s.machine.write_phys(paddr, data[:n])
            data = data[n:]

    def read(self, vaddr: int, size: int) -> bytes:
        return self.walker.read_virtual(vaddr, size)


def stamp(ptr: int) -> bytes:
    return ptr.to_bytes(4, "little")


def assert_intact(vm, ptr: int, size: int):
    """The block's first bytes and (for 8 bytes or more) its last four still hold what the test wrote."""
    assert vm.read(ptr, min(size, 4)) == stamp(ptr)[:size], f"block {ptr:#x} (+{size}) changed while live"
    if size >= 8:
        assert vm.read(ptr + size - 4, 4) == stamp(ptr)[::-1], f"end of block {ptr:#x} (+{size}) changed"


sizes = st.one_of(st.integers(1, 64), st.integers(65, 2048), st.integers(2049, 20000))
aligns = st.sampled_from([1, 8, 64, 256, 2048, 4096, 16384])
ops = st.lists(st.tuples(st.sampled_from(["malloc", "aligned", "free"]), sizes, aligns, st.integers(0, 10 ** 6)),
               min_size=50, max_size=250)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops)
def test_random_sequences_against_a_model(default_build, sequence):
    with KernelSession(default_build.elf, default_build.kernel.layout, poison=POISON) as s:
        vm = VirtualMemory(s)
        start_free = s.call("pmm_stats_free")
        live: dict[int, int] = {}
        for op, size, align, pick in sequence:
            if op == "free" and live:
                ptr = sorted(live)[pick % len(live)]
                assert_intact(vm, ptr, live[ptr])
                s.call("kfree", ptr)
                del live[ptr]
                continue
            if op == "malloc":
                align = 1
                ptr = s.call("kmalloc", size)
            else:
                ptr = s.call("kmalloc_aligned", size, align)
            assert ptr, f"kmalloc({size}, {align}) failed with plenty of memory"
            assert ptr % align == 0
            for other, n in live.items():
                assert ptr + size <= other or other + n <= ptr, f"{ptr:#x}+{size} overlaps {other:#x}+{n}"
            live[ptr] = size
            vm.refresh()
            vm.write(ptr, stamp(ptr)[:size])
            if size >= 8:
                vm.write(ptr + size - 4, stamp(ptr)[::-1])
        vm.refresh()
        for ptr, size in live.items():
            assert_intact(vm, ptr, size)
        for ptr in list(live):
            s.call("kfree", ptr)
        assert s.variable("heap_slabs") == 0, "emptied slabs kept their pages"
        assert s.call("pmm_stats_free") == start_free, "frames lost after freeing everything"


def test_small_blocks_share_pages_and_pages_come_back(session):
    s = session
    start_free = s.call("pmm_stats_free")
    blocks = [s.call("kmalloc", 24) for _ in range(100)]
    assert len({b & hw.PTE_FRAME_MASK for b in blocks}) < 100 // 2
    assert s.call("pmm_stats_free") < start_free
    for b in blocks:
        s.call("kfree", b)
    assert s.call("pmm_stats_free") == start_free


@pytest.mark.parametrize("size", [0, 0xFFFFFFFF, 0x80000000])
def test_zero_and_huge_sizes_return_0(session, size):
    s = session
    before = s.call("pmm_stats_free")
    assert s.call("kmalloc", size) == 0
    assert s.call("kmalloc_aligned", 16, 3) == 0, "an alignment that is not a power of two"
    assert s.call("pmm_stats_free") == before
    assert s.call("kmalloc", 32) != 0, "the heap still works"


def test_exhaustion_returns_0_and_leaves_the_heap_intact(tmp_path):
    small = build(Config(machine_memory_mib=16), tmp_path, iso=False)
    with KernelSession(small.elf, small.kernel.layout) as s:
        start_free = s.call("pmm_stats_free")
        big = []
        while (ptr := s.call("kmalloc", 0x100000)) != 0:
            big.append(ptr)
            assert len(big) < 64, "a 16 MiB guest cannot hold this many MiB blocks"
        assert big, "not even one block"
        assert s.call("pmm_stats_free") < 0x100
        for ptr in big:
            s.call("kfree", ptr)
        assert s.call("pmm_stats_free") == start_free
        assert s.call("kmalloc", 0x100000) != 0


def panics(s, call, *args) -> str:
    with pytest.raises(CallError) as info:
        s.call(call, *args)
    assert s.machine.wait_exit(5) == s.layout.failure_status
    return str(info.value)


def test_double_free_stops_the_kernel(session):
    s = session
    keep, block = s.call("kmalloc", 40), s.call("kmalloc", 40)
    assert keep and block
    s.call("kfree", block)
    assert "kfree: block freed twice" in panics(session, "kfree", block)


@pytest.mark.parametrize("where", ["inside a block", "kernel data", "vmm window"])
def test_freeing_what_the_heap_never_returned_stops_the_kernel(session, where):
    s = session
    block = s.call("kmalloc", 64)
    pointer = {"inside a block": block + 8, "kernel data": s.symbol("pmm_top"),
               "vmm window": s.layout.vmm_window.end - hw.PAGE_SIZE}[where]
    assert "kfree: not a block the heap handed out" in panics(s, "kfree", pointer)


def test_overwritten_slab_header_is_detected(session):
    s = session
    block = s.call("kmalloc", 100)
    VirtualMemory(s).write(block & hw.PTE_FRAME_MASK, b"\0\0\0\0")
    assert "heap: slab header overwritten" in panics(s, "kfree", block)
