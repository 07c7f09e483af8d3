"""The kernel heap driven through the call channel against a Python model, on the i386 and the x86_64 kernel alike
(ids [i386] / [x86_64]): blocks never overlap, alignment holds, each block's contents survive until it is freed,
emptied pages go back, no frame is lost; heap pages are never executable where the architecture has NX, and the CPU
faults when it is sent to run a heap block; every misuse the heap must catch stops the kernel with a report. The
model run is repeated under KVM for x86_64 (skipped with the probe's reason where KVM cannot run the kernel)."""
from __future__ import annotations

import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kgen.arch import hw
from kgen.guest.calls import CallError
from kgen.build.config import Config
from kgen.guest.diagnose import find_exception
from kgen.guest.pagewalk import Attrs, Walker

from conftest import KVM_ONLY, X86_64_ONLY, DrivenModel, op_lists, open_session, run_model, shared_build, walker

pytestmark = [pytest.mark.vm]
PAGE_MASK = ~(hw.PAGE_SIZE - 1)


class VirtualMemory:
    """Reads and writes at kernel virtual addresses, translated by walking the guest's own page tables.

    The walker is a snapshot: `refresh()` after the kernel changed its mappings.
    """

    def __init__(self, s):
        self.s = s
        self.refresh()

    def refresh(self):
        self.walker = walker(self.s)

    def write(self, vaddr: int, data: bytes):
        for paddr, n in self.walker.physical_spans(vaddr, len(data)):
            self.s.machine.write_phys(paddr, data[:n])
            data = data[n:]

    def read(self, vaddr: int, size: int) -> bytes:
        return self.walker.read_virtual(vaddr, size)


def stamp(ptr: int, word: int) -> bytes:
    """What a test writes into a block: its own address, a whole word of it."""
    return ptr.to_bytes(word, "little")


def write_stamps(vm, ptr: int, size: int, word: int):
    vm.write(ptr, stamp(ptr, word)[:size])
    if size >= 2 * word:
        vm.write(ptr + size - word, stamp(ptr, word)[::-1])


def assert_intact(vm, ptr: int, size: int, word: int):
    """The block's first bytes and (for two words or more) its last word still hold what the test wrote."""
    assert vm.read(ptr, min(size, word)) == stamp(ptr, word)[:size], f"block {ptr:#x} (+{size}) changed while live"
    if size >= 2 * word:
        assert vm.read(ptr + size - word, word) == stamp(ptr, word)[::-1], f"end of block {ptr:#x} (+{size}) changed"


def heap_page_attrs(s) -> int:
    """What every heap page must be: present, writable, global (kernel half), and never executable where the
    architecture has NX."""
    nx = hw.PTE_NX if s.layout.arch.paging.nx_levels else 0
    return hw.PTE_P | hw.PTE_RW | hw.PTE_G | nx


def check_heap_pages(s, blocks: dict[int, int]) -> None:
    w = walker(s)
    want = heap_page_attrs(s)
    for ptr, size in blocks.items():
        for page in range(ptr & PAGE_MASK, ptr + size, hw.PAGE_SIZE):
            t = w.translate(page)
            assert t is not None, f"block {ptr:#x} (+{size}): page {page:#x} is not mapped"
            got = t.attrs & (hw.PTE_P | hw.PTE_RW | hw.PTE_US | hw.PTE_G | hw.PTE_NX)
            assert got == want, f"block {ptr:#x} (+{size}): page {page:#x} is {t.attrs}, want {Attrs(want)}"


sizes = st.one_of(st.integers(1, 64), st.integers(65, 2048), st.integers(2049, 20000))
aligns = st.sampled_from([1, 8, 64, 256, 2048, 4096, 16384])
# A free with no block live frees nothing.
ops = op_lists(("malloc", sizes), ("aligned", sizes, aligns), ("free", st.integers(0, 10 ** 6)),
               min_size=50, max_size=250)
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


class HeapModel(DrivenModel):
    """The blocks the heap handed out, each filled with stamps that every later allocation and free must leave
    intact; no two overlap, all are in the vmm window; freeing them all gives back every slab and frame."""

    def __init__(self, s):
        self.s, self.word = s, s.word_size
        self.vm = VirtualMemory(s)
        self.start_free = s.call("pmm_stats_free")
        self.start_slabs = s.variable("heap_slabs", 4)
        self.live: dict[int, int] = {}          # block -> size

    def malloc(self, size: int) -> None:
        self._taken(self.s.call("kmalloc", size), size, 1)

    def aligned(self, size: int, align: int) -> None:
        self._taken(self.s.call("kmalloc_aligned", size, align), size, align)

    def free(self, pick: int) -> None:
        if self.live:
            ptr = sorted(self.live)[pick % len(self.live)]
            assert_intact(self.vm, ptr, self.live.pop(ptr), self.word)
            self.s.call("kfree", ptr)

    def _taken(self, ptr: int, size: int, align: int) -> None:
        layout = self.s.layout
        assert ptr, f"kmalloc({size}, {align}) failed with plenty of memory"
        assert ptr % align == 0
        assert layout.vmm_base <= ptr and ptr + size <= layout.vmm_window.end, f"{ptr:#x} outside the window"
        for other, n in self.live.items():
            assert ptr + size <= other or other + n <= ptr, f"{ptr:#x}+{size} overlaps {other:#x}+{n}"
        self.live[ptr] = size
        self.vm.refresh()
        write_stamps(self.vm, ptr, size, self.word)

    def check(self) -> None:
        self.vm.refresh()
        for ptr, size in self.live.items():
            assert_intact(self.vm, ptr, size, self.word)
        check_heap_pages(self.s, self.live)

    def release(self) -> None:
        for ptr in list(self.live):
            self.s.call("kfree", ptr)
            del self.live[ptr]
        assert self.s.variable("heap_slabs", 4) == self.start_slabs == 0, "emptied slabs kept their pages"
        assert self.s.call("pmm_stats_free") == self.start_free, "frames lost after freeing everything"


@settings(max_examples=8, **SETTINGS)
@given(ops)
def test_random_sequences_against_a_model(kernel_build, sequence):
    with open_session(kernel_build) as s:
        run_model(HeapModel(s), sequence)


@settings(max_examples=2, **SETTINGS)
@given(ops)
def test_random_sequences_against_a_model_on_a_bitmap_kernel(bitmap_build, sequence):
    """The same heap over the bitmap frame allocator (pmm.kind = "bitmap")."""
    with open_session(bitmap_build) as s:
        run_model(HeapModel(s), sequence)


# A KVM boot costs seconds: the examples share one machine (each gives back everything it took).
@settings(max_examples=4, **SETTINGS)
@given(ops)
@X86_64_ONLY
@KVM_ONLY
def test_random_sequences_against_a_model_under_kvm(kernel, sequence):
    run_model(HeapModel(kernel), sequence)


def test_small_blocks_share_pages_and_pages_come_back(kernel):
    s = kernel
    start_free = s.call("pmm_stats_free")
    blocks = [s.call("kmalloc", 24) for _ in range(100)]
    assert len({b & PAGE_MASK for b in blocks}) == 1, "100 blocks of 32 bytes fit one slab page (126 blocks)"
    assert s.call("pmm_stats_free") < start_free
    for b in blocks:
        s.call("kfree", b)
    assert s.call("pmm_stats_free") == start_free


def test_heap_pages_are_never_executable_where_there_is_nx(kernel):
    """Slab pages and whole-page blocks alike: NX on x86_64 (bit 63 of each PTE); i386 paging has no NX bit."""
    s = kernel
    assert s.variable("heap_page_flags") == heap_page_attrs(s) & ~hw.PTE_G
    blocks = {s.call("kmalloc", 40): 40, s.call("kmalloc", 2000): 2000, s.call("kmalloc", 9000): 9000,
              s.call("kmalloc_aligned", 4096, 4096): 4096, s.call("kmalloc_aligned", 100, 16384): 100}
    assert all(blocks)
    check_heap_pages(s, blocks)
    if s.layout.arch.paging.nx_levels:
        w = walker(s)
        assert all(w.translate(b).entry & hw.PTE_NX for b in blocks), "NX is bit 63 of the PTE itself"


# ---- the CPU sent into a heap block --------------------------------------------------------------------------
def stop_idle(s) -> tuple[int, int]:
    """Stop the idle kernel where it sleeps, the hlt in com2_get_byte, and return (physical address, value) of the
    return address on top of its stack, which leads back into com2_get_word. The machine stays stopped."""
    for _ in range(200):
        s.machine.stop()
        regs = s.machine.registers()
        where = s.elf.symbol_at(regs.eip)
        if regs.halted and where is not None and where.name == "com2_get_byte":
            break
        s.machine.cont()
        time.sleep(0.005)
    else:
        pytest.fail("the idle kernel was never seen in com2_get_byte's hlt")
    paging = s.layout.arch.paging
    [(phys, _)] = Walker(s.machine.read_phys, regs.cr3 & paging.cr3_mask, paging).physical_spans(regs.esp,
                                                                                                 s.word_size)
    back = int.from_bytes(s.machine.read_phys(phys, s.word_size), "little")
    caller = s.elf.symbol_at(back)
    assert caller is not None and caller.name == "com2_get_word", f"[rsp] = {s.elf.symbolize(back)}"
    return phys, back


def detour(code_at: int, marker_at: int, back: int) -> bytes:
    """x86_64 code: `mov byte ptr [rip + marker], 1; push back; ret`: it leaves a mark and returns to `back` (a
    kernel address: the top 2 GiB, so a sign-extended imm32)."""
    assert back >= (1 << 64) - (1 << 31)
    code = bytes([0xC6, 0x05]) + (marker_at - (code_at + 7)).to_bytes(4, "little", signed=True) + b"\x01"
    return code + b"\x68" + (back & 0xFFFFFFFF).to_bytes(4, "little") + b"\xC3"


def send_idle_kernel_to(s, code_at: int, marker_at: int) -> None:
    """Make the CPU run from `code_at`. The kernel has no routine that jumps to an address it is given, and the
    call channel refuses anything outside the kernel's text; so the idle kernel's own return address is replaced:
    the detour is written at `code_at` (its marker cleared), and the return address on top of the sleeping
    kernel's stack is pointed at it. The next byte on COM2 wakes the kernel, com2_get_byte returns into the
    detour, and the detour returns to com2_get_word as the replaced address would have."""
    vm = VirtualMemory(s)
    phys, back = stop_idle(s)
    try:
        vm.write(code_at, detour(code_at, marker_at, back))
        vm.write(marker_at, b"\x00")
        s.machine.write_phys(phys, code_at.to_bytes(s.word_size, "little"))
    finally:
        s.machine.cont()


@X86_64_ONLY
def test_running_a_heap_block_faults_as_a_fetch(kernel):
    """The same detour runs from an executable page (the positive control: the call comes back and the detour's
    mark is there) and faults from a heap block: a protection fault on an instruction fetch, reported as such on
    COM1 ("... fetch") and in the exception line (error code bit 4), with CR2 and RIP at the block."""
    s = kernel
    page = s.call("vmm_alloc", 1, hw.PTE_P | hw.PTE_RW, 0)          # executable: no NX asked for
    assert page and not walker(s).translate(page).attrs & hw.PTE_NX
    send_idle_kernel_to(s, page + 0x40, page + 0x80)
    free = s.call("pmm_stats_free")                                     # the detour runs on this call's first byte
    assert s.call("pmm_stats_free") == free, "the kernel came back from the detour intact"
    assert VirtualMemory(s).read(page + 0x80, 1) == b"\x01", "the CPU did not run the detour"

    block = s.call("kmalloc", 64)
    assert block and walker(s).translate(block).attrs & hw.PTE_NX
    send_idle_kernel_to(s, block, block + 0x30)
    with pytest.raises(CallError) as info:
        s.call("pmm_stats_free")
    message = str(info.value)
    assert "#PF page fault" in message and "instruction fetch" in message, message
    assert s.machine.wait_exit(5) == s.layout.failure_status
    assert "kgen: page fault: protection read supervisor fetch\n" in s.machine.serial
    report = find_exception(s.machine.serial)
    assert report is not None and report.vector == hw.VECTOR_PAGE_FAULT
    assert report.fields["error"] == hw.PF_P | hw.PF_I, f"error code {report.fields['error']:#x}"
    assert report.fields["cr2"] == block and report.ip == block
    assert walker(s).read_virtual(block + 0x30, 1) == b"\x00", "the heap block ran"


# ---- limits and misuse -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", ["zero", "all ones", "top bit", "beyond the window"])
def test_zero_and_huge_sizes_return_0(kernel, size):
    s = kernel
    arch = s.layout.arch
    size = {"zero": 0, "all ones": arch.word_mask, "top bit": 1 << (8 * arch.word_size - 1),
            "beyond the window": s.layout.vmm_size + 1}[size]
    before = s.call("pmm_stats_free")
    assert s.call("kmalloc", size) == 0
    assert s.call("kmalloc_aligned", 16, 3) == 0, "an alignment that is not a power of two"
    assert s.call("kmalloc_aligned", 16, size) == 0, "an alignment of that size"
    assert s.call("pmm_stats_free") == before
    assert s.call("kmalloc", 32) != 0, "the heap still works"


def test_exhaustion_returns_0_and_leaves_the_heap_intact(tmp_path_factory, arch):
    small = shared_build(tmp_path_factory, Config.for_arch(arch, machine_memory_mib=16))
    with open_session(small, poison=None) as s:
        start_free = s.call("pmm_stats_free")
        big = []
        while (ptr := s.call("kmalloc", 0x100000)) != 0:
            big.append(ptr)
            assert len(big) < 16, "a 16 MiB guest cannot hold this many MiB blocks"
        assert big, "not even one block"
        assert s.call("pmm_stats_free") < 0x100 + 3
        for ptr in big:
            s.call("kfree", ptr)
        assert s.call("pmm_stats_free") == start_free
        assert s.call("kmalloc", 0x100000) != 0


def panics(s, call, *args) -> str:
    with pytest.raises(CallError) as info:
        s.call(call, *args)
    assert s.machine.wait_exit(5) == s.layout.failure_status
    return str(info.value)


def test_double_free_stops_the_kernel(kernel):
    s = kernel
    keep, block = s.call("kmalloc", 40), s.call("kmalloc", 40)
    assert keep and block
    s.call("kfree", block)
    assert "kfree: block freed twice" in panics(s, "kfree", block)


@pytest.mark.parametrize("where", ["inside a block", "kernel data", "vmm window"])
def test_freeing_what_the_heap_never_returned_stops_the_kernel(kernel, where):
    s = kernel
    block = s.call("kmalloc", 64)
    pointer = {"inside a block": block + 8, "kernel data": s.symbol("pmm_top"),
               "vmm window": s.layout.vmm_window.end - hw.PAGE_SIZE}[where]
    assert "kfree: not a block the heap handed out" in panics(s, "kfree", pointer)


def test_overwritten_slab_header_is_detected(kernel):
    s = kernel
    block = s.call("kmalloc", 100)
    s.machine.stop()
    VirtualMemory(s).write(block & PAGE_MASK, b"\0\0\0\0")
    s.machine.cont()
    assert "heap: slab header overwritten" in panics(s, "kfree", block)
