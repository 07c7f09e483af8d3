"""The kernel's paging against its own intent (ELF segments, and the layout for a kgen kernel), on the kernel
booted to idle and stopped, RAM poisoned. One test per invariant; kgen/invariants.py holds the checks."""
from kgen.guest import invariants
from kgen.harness.pytest_plugin import assert_holds


def test_paging_and_write_protect_are_on(kgen_idle):
    assert_holds(invariants.check_paging_enabled, kgen_idle.view())


def test_cr3_is_the_boot_page_directory(kgen_idle, kgen_layout):
    assert_holds(invariants.check_cr3, kgen_idle.view())


def test_recursive_slot_maps_the_pd_supervisor_only(kgen_idle):
    assert_holds(invariants.check_recursive_slot, kgen_idle.view())


def test_elf_segments_map_vaddr_to_paddr_no_wider_than_their_flags(kgen_idle):
    assert_holds(invariants.check_segments, kgen_idle.view())


def test_nothing_is_mapped_below_the_kernel_base(kgen_idle):
    assert_holds(invariants.check_nothing_below_kernel_base, kgen_idle.view())


def test_no_kernel_page_is_user_accessible(kgen_idle):
    assert_holds(invariants.check_no_user_pages, kgen_idle.view())


def test_temp_map_slots_are_empty_while_idle(kgen_idle, kgen_layout):
    assert_holds(invariants.check_tempmap_empty, kgen_idle.view())


def test_each_page_table_is_referenced_once(kgen_idle):
    assert_holds(invariants.check_tables_referenced_once, kgen_idle.view())


def test_page_tables_hold_no_poison(kgen_idle):
    assert_holds(invariants.check_tables_unpoisoned, kgen_idle.view())


def test_every_address_space_holds_its_invariants(kgen_idle, kgen_layout):
    assert_holds(invariants.check_address_spaces, kgen_idle.view())
