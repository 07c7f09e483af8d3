"""The invariant checks turn red, naming the page, when the running kernel's tables are broken on purpose: each
test boots the default kernel to idle (poisoned RAM), tampers with the stopped machine and calls the check."""
import dataclasses

import pytest

from kgen.arch import hw

from kgen.guest import invariants
from kgen.guest.elfinfo import ElfInfo
from kgen.harness.kernel import KernelUnderTest
from kgen.harness.live import boot

from conftest import needs_qemu

pytestmark = [pytest.mark.vm, needs_qemu]


@pytest.fixture(scope="session")
def kernel(default_build):
    return KernelUnderTest(default_build.elf, ElfInfo.load(default_build.elf), default_build.kernel.layout)


@pytest.fixture
def live(kernel):
    with boot(kernel) as live:
        yield live


def u32(value: int) -> bytes:
    return value.to_bytes(4, "little")


def pte_of(view, vaddr):
    return view.walker.translate(vaddr).chain[-1]


def test_every_invariant_holds_on_the_kernel_as_built(live):
    view = live.view()
    assert {check.__name__: check(view) for check in invariants.GENERIC_CHECKS + invariants.KGEN_CHECKS} == {
        check.__name__: [] for check in invariants.GENERIC_CHECKS + invariants.KGEN_CHECKS}


def test_a_broken_recursive_entry_is_named(live):
    view = live.view()
    slot, pd = live.kernel.layout.recursive_slot, view.walker.top
    live.write_phys(pd + 4 * slot, u32(pd + hw.PAGE_SIZE | hw.PTE_P | hw.PTE_RW))
    problems = invariants.check_recursive_slot(live.view())
    assert len(problems) == 1
    assert problems[0].startswith(f"PD[{slot}] @ {pd + 4 * slot:#x} = {pd + hw.PAGE_SIZE | 3:#010x}: ")
    assert f"points at {pd + hw.PAGE_SIZE:#x}, not at the PD {pd:#x}" in problems[0]


def test_a_user_accessible_recursive_entry_is_named(live):
    view = live.view()
    slot, pd = live.kernel.layout.recursive_slot, view.walker.top
    live.write_phys(pd + 4 * slot, u32(pd | hw.PTE_P | hw.PTE_RW | hw.PTE_US))
    problems = invariants.check_recursive_slot(live.view())
    assert len(problems) == 1 and f"PD[{slot}] @ {pd + 4 * slot:#x}" in problems[0]
    assert "user-accessible" in problems[0]


def test_a_temp_slot_left_mapped_is_named(live):
    layout = live.kernel.layout
    frame = layout.kernel_load_address
    slot = live.call("temp_map", frame)
    assert slot == layout.tempmap_slot_address(0)
    problems = invariants.check_tempmap_empty(live.view())
    assert len(problems) == 1
    assert problems[0].startswith(f"temp-map slot 0 at {slot:#x}: ")
    assert f"maps frame {frame:#x} while the kernel is idle" in problems[0]
    live.call("temp_unmap", slot)
    assert invariants.check_tempmap_empty(live.view()) == []


def test_the_user_bit_on_a_kernel_page_is_named(live):
    view = live.view()
    kmain = view.elf.symbols["kmain"].value
    pte = pte_of(view, kmain)
    live.write_phys(pte.addr, u32(pte.value | hw.PTE_US))
    problems = invariants.check_no_user_pages(live.view())
    assert len(problems) == 1
    page = kmain & ~(hw.PAGE_SIZE - 1)
    assert problems[0].startswith(f"{pte} = {pte.value | hw.PTE_US:#010x} has U/S set for kernel page "
                                  f"{view.elf.symbolize(page)}")
    assert "not yet user-accessible" in problems[0]

    pde = view.walker.translate(kmain).chain[0]
    live.write_phys(pde.addr, u32(pde.value | hw.PTE_US))
    problems = invariants.check_no_user_pages(live.view())
    assert any(p.startswith(f"{pte} ") and "(user-accessible;" in p for p in problems), problems
    assert any(p.startswith(f"{pde} ") for p in problems), problems


def test_a_foreign_kernel_may_set_the_user_bit_on_table_entries_but_not_on_a_kernel_leaf(live):
    """xv6 and Linux set U/S on every PDE and deny at the PTE: for a foreign kernel only the leaf counts, while
    kgen's own kernel (a layout known) keeps the stricter rule. The same tampered tables, judged both ways."""
    view = live.view()
    kmain = view.elf.symbols["kmain"].value
    pde = view.walker.translate(kmain).chain[0]
    live.write_phys(pde.addr, u32(pde.value | hw.PTE_US))
    view = live.view()
    assert view.layout is not None and invariants.check_no_user_pages(view)
    foreign = dataclasses.replace(view, layout=None)
    assert foreign.kernel_base == view.layout.kernel_half_start      # still judged as a higher-half kernel
    assert invariants.check_no_user_pages(foreign) == []

    pte = pte_of(view, kmain)
    live.write_phys(pte.addr, u32(pte.value | hw.PTE_US))
    problems = invariants.check_no_user_pages(dataclasses.replace(live.view(), layout=None))
    assert len(problems) == 1 and problems[0].startswith(f"{pte} = ") and "(user-accessible;" in problems[0]


def test_a_writable_text_page_is_named(live):
    view = live.view()
    kmain = view.elf.symbols["kmain"].value
    pte = pte_of(view, kmain)
    live.write_phys(pte.addr, u32(pte.value | hw.PTE_RW))
    problems = invariants.check_segments(live.view())
    assert len(problems) == 1
    assert problems[0].startswith(f"page {view.elf.symbolize(kmain & ~(hw.PAGE_SIZE - 1))} (segment R-X")
    assert "writable" in problems[0] and str(pte) in problems[0]


def test_a_table_shared_by_two_pd_entries_and_a_low_mapping_are_named(live):
    view = live.view()
    base = live.kernel.layout.kernel_virtual_base
    kernel_pde = view.walker.translate(live.kernel.layout.kernel_virtual_start).chain[0]
    live.write_phys(view.walker.top, u32(kernel_pde.value))       # PD[0]: the kernel's table again
    tampered = live.view()
    shared = invariants.check_tables_referenced_once(tampered)
    assert len(shared) == 1
    assert shared[0].startswith(f"page table at {kernel_pde.value & hw.PTE_FRAME_MASK:#x} is reached 2 times: "
                                f"PD[0] (for 0x00000000), PD[{kernel_pde.index}] (for {kernel_pde.index << 22:#010x})")
    low = invariants.check_nothing_below_kernel_base(tampered)
    assert low and low[0].startswith(f"{live.kernel.layout.kernel_load_address:#010x}-") and "identity-mapped" in low[0]
    assert f"below the kernel base {base:#x}" in low[0]


def test_a_poisoned_entry_in_a_live_table_is_named(live):
    view = live.view()
    pde, pte = view.walker.translate(live.kernel.layout.kernel_virtual_start).chain
    table = pte.addr & hw.PTE_FRAME_MASK
    live.write_phys(table + 4 * 1000, live.poison * 4)
    problems = invariants.check_tables_unpoisoned(live.view())
    assert len(problems) == 1
    assert problems[0].startswith(f"table at {table:#x} (PD[{pde.index}] (for {pde.index << 22:#010x})): ")
    assert "1 of 1024 entries hold the poison 0xcccccccc, first index 1000" in problems[0]


def test_malformed_pdes_are_one_finding_each_and_every_other_check_still_holds(live):
    # In user-half slots the kernel never touches: a 4 MiB PDE with bit 21 set (reserved whatever MAXPHYADDR is),
    # and a PDE whose table lies beyond the guest's RAM (QEMU reads zeros there: no error, unless kgen asks where
    # RAM is).
    view = live.view()
    reserved, outside = (5, 0x00C00000 | 1 << 21 | hw.PTE_P | hw.PTE_PS), (6, 0x7FFF0000 | hw.PTE_P | hw.PTE_RW)
    for slot, value in (reserved, outside):
        live.write_phys(view.walker.top + 4 * slot, u32(value))
    tampered = live.view()
    found = invariants.check_entries_well_formed(tampered)
    assert [f.split(": ")[0] for f in found] == [f"PD[{slot}] @ {view.walker.top + 4 * slot:#x} = {value:#x}"
                                                 for slot, value in (reserved, outside)]
    assert found[0].startswith(f"PD[5] @ {view.walker.top + 20:#x} = {reserved[1]:#x}: reserved bits 0x200000 set")
    assert "is not mapped: any access there is a page fault with error code RSVD" in found[0]
    assert "PT at 0x7fff0000 cannot be read: 0x7fff0000-0x7fff1000 is not in the guest's RAM" in found[1]
    assert [f.vrange for f in found] == [(5 << 22, 6 << 22), (6 << 22, 7 << 22)]
    assert [[ref.index for ref in f.chain] for f in found] == [[5], [6]]
    others = invariants.GENERIC_CHECKS + invariants.KGEN_CHECKS + (invariants.check_address_spaces,)
    assert {check.__name__: check(tampered) for check in others if check is not invariants.check_entries_well_formed
            } == {check.__name__: [] for check in others if check is not invariants.check_entries_well_formed}


def test_cr3_and_cr0_are_checked_against_the_layout(live):
    view = live.view()
    wrong = dataclasses.replace(view, regs=dataclasses.replace(view.regs, cr3=view.regs.cr3 + hw.PAGE_SIZE,
                                                               cr0=view.regs.cr0 & ~hw.CR0_WP))
    assert invariants.check_paging_enabled(view) == [] and invariants.check_cr3(view) == []
    assert "CR0.WP is clear" in invariants.check_paging_enabled(wrong)[0]
    assert invariants.check_cr3(wrong)[0].startswith(f"CR3={view.regs.cr3 + hw.PAGE_SIZE:#010x}: expected the "
                                                     f"boot page directory boot_top_table at physical {view.regs.cr3:#x}")


def test_without_a_layout_the_kgen_checks_do_not_apply(live):
    view = dataclasses.replace(live.view(), layout=None, poison=None)
    for check in (invariants.check_cr3, invariants.check_tempmap_empty, invariants.check_tables_unpoisoned):
        with pytest.raises(invariants.NotApplicable):
            check(view)
