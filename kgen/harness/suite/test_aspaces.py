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
        for offset in (0x0, 0x5A8, 0xFFF):     # none, some and every offset bit
            assert live.call("vmm_translate_in", top, v + offset) == frames[top] + offset, \
                f"vmm_translate_in({top:#x}, {v + offset:#x}), the page maps {frames[top]:#x}"
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


def test_a_kernel_table_made_while_other_spaces_exist_reaches_them(live, kgen_layout):
    """A page table the kernel makes in its own half after other spaces were created must be theirs too by the time
    they run (i386: each space holds its own copy of the kernel half's PDEs, refreshed by as_switch when
    vmm_kernel_pde_generation moved; x86_64: the kernel half's tables are shared). The space is switched to while
    another is attached, so as_switch's refresh must reach the target's top table through a re-pointed foreign slot.
    Every space's kernel half is checked before the switch, and the CPU reads the new page after it."""
    layout = kgen_layout
    span = layout.leaf_table_span
    free = live.call("pmm_stats_free")
    boot = live.call("as_current")
    spaces = [live.call("as_create") for _ in range(2)]
    assert all(spaces), "as_create failed"
    # A page of the vmm window (kernel half) whose page table does not exist yet: in a range reserved here, at the
    # first leaf-table span boundary inside it that has none.
    pages = 3 * span // hw.PAGE_SIZE
    start = live.call("vrange_reserve", pages)
    if not start:
        pytest.skip(f"the vmm window has no free range of {pages} pages (three page tables' span)")
    bases = range(start - start % span + span, start + pages * hw.PAGE_SIZE, span)
    vaddr = next((base for base in bases if not live.call("paging_table_present", base)), None)
    if vaddr is None:
        pytest.skip("every page-table span of the reserved range has its table already")
    # Space 0 attached and written through the foreign slot (its first page table made), so the CPU caches the
    # slot's window onto space 0's top table as writable: TCG, like hardware, walks again for a write only when the
    # cached translation was made by a read.
    assert live.call("as_attach", spaces[0]) == 1
    user_page = hw.PAGE_SIZE * 16
    user_frame = live.call("pmm_alloc")
    assert live.call("vmm_map_in", spaces[0], user_page, user_frame, USER_RW) == 1
    frame = live.call("pmm_alloc")
    assert frame and live.call("vmm_map", vaddr, frame, hw.PTE_P | hw.PTE_RW) == 1, f"vmm_map({vaddr:#x}) refused"
    assert problems_of(live, invariants.check_address_spaces, idle=False) == []
    live.write_phys(frame, (0x7AB1E5ED).to_bytes(4, "little"))
    assert live.call("as_switch", spaces[1]) == 1
    seen = live.call("kmem_read32", vaddr)
    # The attachment goes with the switch: space 0 is still reached through the new space's foreign slot.
    attached = [live.call("vmm_translate_in", spaces[0], user_page)]
    assert live.call("as_switch", boot) == 1
    attached.append(live.call("vmm_translate_in", spaces[0], user_page))
    assert attached == [user_frame] * 2, (f"space {spaces[0]:#x} attached across as_switch there and back: its page "
                                          f"{user_page:#x} translates to {attached[0]:#x}, then {attached[1]:#x}, "
                                          f"not {user_frame:#x}")
    assert seen == 0x7AB1E5ED, (f"running in space {spaces[1]:#x}, the kernel read {seen:#x} at {vaddr:#x}: the page "
                                f"table the kernel made for it after the space was created did not reach the space")
    assert problems_of(live, invariants.check_address_spaces, idle=False) == []
    live.call("as_detach")
    assert live.call("vmm_unmap", vaddr) == frame           # its page table goes too: the other spaces must follow
    live.call("pmm_free", frame)
    assert problems_of(live, invariants.check_address_spaces, idle=False) == []
    for top in spaces:
        assert live.call("as_destroy", top) == 1
    assert live.call("vrange_release", start, pages) == 1
    assert problems_of(live, invariants.check_address_spaces) == []
    assert live.call("pmm_stats_free") == free, "frames of the stage not given back"
