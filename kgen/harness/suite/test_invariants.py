"""The kernel's paging against its own intent (ELF segments, and the layout for a kgen kernel), on the kernel
booted to idle and stopped, RAM poisoned. One test per invariant; kgen/guest/invariants.py holds the checks.

The page-table checks take `kgen_space`: with `--address-spaces` (a kernel given with --kernel that lists its spaces)
each space in turn, so a kernel with processes is judged the same whichever one is current; without, the space in CR3
and, for a kernel given with --kernel, the kernel's own space as well (`judged_views`, kgen/guest/ownspace.py): the
ready point may come while a process's space is live."""
from kgen.guest import invariants
from kgen.harness.pytest_plugin import assert_holds, judged_views


def test_paging_and_write_protect_are_on(kgen_idle):
    assert_holds(invariants.check_paging_enabled, kgen_idle.view())


def test_page_table_entries_are_well_formed(kgen_idle, kgen_space):
    assert_holds(invariants.check_entries_well_formed, *judged_views(kgen_idle, kgen_space))


def test_cr3_is_the_boot_page_directory(kgen_idle, kgen_layout):
    assert_holds(invariants.check_cr3, kgen_idle.view())


def test_recursive_slot_maps_the_pd_supervisor_only(kgen_idle, kgen_space):
    assert_holds(invariants.check_recursive_slot, *judged_views(kgen_idle, kgen_space))


def test_elf_segments_map_vaddr_to_paddr_no_wider_than_their_flags(kgen_idle, kgen_space):
    assert_holds(invariants.check_segments, *judged_views(kgen_idle, kgen_space))


def test_nothing_is_mapped_below_the_kernel_base(kgen_idle, kgen_space):
    assert_holds(invariants.check_nothing_below_kernel_base, *judged_views(kgen_idle, kgen_space))


def test_no_kernel_page_is_user_accessible(kgen_idle, kgen_space):
    assert_holds(invariants.check_no_user_pages, *judged_views(kgen_idle, kgen_space))


def test_temp_map_slots_are_empty_while_idle(kgen_idle, kgen_layout):
    assert_holds(invariants.check_tempmap_empty, kgen_idle.view())


def test_each_page_table_is_referenced_once(kgen_idle, kgen_space):
    assert_holds(invariants.check_tables_referenced_once, *judged_views(kgen_idle, kgen_space))


def test_page_tables_hold_no_poison(kgen_idle, kgen_space):
    assert_holds(invariants.check_tables_unpoisoned, *judged_views(kgen_idle, kgen_space))


def test_every_address_space_holds_its_invariants(kgen_idle, kgen_layout):
    assert_holds(invariants.check_address_spaces, kgen_idle.view())
