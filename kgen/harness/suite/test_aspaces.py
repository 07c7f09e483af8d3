"""A kgen kernel's address spaces driven through the call channel (templates/aspace.s): two spaces map the same user
page to different frames through the foreign slot while the boot space runs; the window must follow every
re-attachment (a kernel that skips the flush shows the previous space) and, once detached, the CPU must fault
through the empty slot; each space's tables are walked from its own top-level table; every invariant of every live space holds attached and idle; a switch runs the kernel in another
space; destroying both gives every frame back and leaves none referenced. Addresses come from the layout. A kernel
kgen did not build has no call channel or address spaces: skipped.
"""
from __future__ import annotations

import pytest

from kgen.arch import hw
from kgen.guest import invariants
from kgen.guest.findings import failures

USER_RW = hw.PTE_P | hw.PTE_RW | hw.PTE_US


@pytest.fixture
def live(kgen_layout, kgen_machine):
    if kgen_machine.channel is None or "as_create" not in kgen_machine.kernel.elf.symbols:
        pytest.skip("this kernel has no call channel or no address spaces")
    return kgen_machine


def problems_of(live, check, *args, **kwargs) -> list[str]:
    """What a check finds that fails it (information aside)."""
    return failures(check(live.view(), *args, **kwargs))


def test_address_spaces_through_the_foreign_slot(live, kgen_layout):
    layout, arch = kgen_layout, kgen_layout.arch
    free = live.call("pmm_stats_free")
    boot = live.call("as_current")
    v = arch.span(0) + 5 * hw.PAGE_SIZE + 3 * arch.span(arch.levels - 2)   # user half, top-level slot 1
    spaces = [live.call("as_create") for _ in range(2)]
    assert all(spaces), "as_create failed"
    frames = {top: live.call("pmm_alloc") for top in spaces}
    for top in spaces:
        assert live.call("as_attach", top) == 1
        assert live.call("vmm_map_in", top, v, frames[top], USER_RW) == 1, \
            f"vmm_map_in({v:#x}) refused in space {top:#x}: the foreign window still showed another space"
    pte = layout.foreign_entry_address(v, arch.levels - 1)
    for top in spaces + spaces[:1]:
        assert live.call("as_attach", top) == 1
        seen = live.call("kmem_read32", pte) & ~(hw.PAGE_SIZE - 1)
        assert seen == frames[top] & 0xFFFFFFFF, \
            f"attached {top:#x}, but its PTE for {v:#x} through the foreign window reads {seen:#x}: a stale TLB entry"
        assert live.call("vmm_translate_in", top, v + 0x10) == frames[top] + 0x10
    for top in spaces:
        t = invariants.space_walker(live.view(), top).translate(v)
        assert t is not None and t.paddr == frames[top] and t.attrs & hw.PTE_US, f"space {top:#x} at {v:#x}: {t}"
    assert live.call("vmm_translate", v) == layout.vmm_none, "the running space sees a foreign page"
    assert problems_of(live, invariants.check_address_spaces, idle=False) == []
    live.call("as_detach")
    for address in (pte, layout.foreign_level_window(0)):   # a leaf entry and the top table, through the slot
        probe = live.probe(address, "read")
        assert probe.faulted and not probe.error & hw.PF_P, \
            f"as_detach emptied the foreign slot, yet {probe.describe()}: a stale translation through the slot"
    assert problems_of(live, invariants.check_address_spaces) == []
    live.write_phys(frames[spaces[0]], (0x5CA1AB1E).to_bytes(4, "little"))
    assert live.call("as_switch", spaces[0]) == 1
    assert live.call("kmem_read32", v) == 0x5CA1AB1E, "running in the space, its page is not the frame it was given"
    assert live.call("as_switch", boot) == 1
    assert live.call("as_current") == boot
    gone = set().union(*(invariants.space_frames(live.view(), top) for top in spaces))
    for top in spaces:
        assert live.call("as_destroy", top) == 1
    assert problems_of(live, invariants.check_frames_unreferenced, gone) == []
    assert problems_of(live, invariants.check_address_spaces) == []
    assert live.call("pmm_stats_free") == free, "frames of destroyed spaces not given back"
