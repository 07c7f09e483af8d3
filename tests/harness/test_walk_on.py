"""`kgen test --kernel` on a kernel whose live tables hold malformed entries (tests/zoo_walk.py WALK64: kernel virtual
addresses stored in two PD entries, as a 64-bit hobby port did): the entries are one check's findings, named with
their values, their wrong bits and the ranges they cover; every other check and both QEMU oracles judge the rest
of the tables on their own merits. The i386 case (a 4 MiB PDE with a reserved bit) is
test_foreign_kernels.py's bad-pde kernel."""
import pytest

import zoo_walk
from conftest import needs_qemu, run_kgen
from minikernels import outcomes

pytestmark = [pytest.mark.vm, needs_qemu]

WELL_FORMED = "test_page_table_entries_are_well_formed"


@pytest.fixture(scope="module")
def walk64(tmp_path_factory):
    return zoo_walk.walk64(tmp_path_factory.mktemp("walk-on"))


def test_malformed_entries_are_one_finding_each_and_every_other_check_judges_the_rest(walk64):
    result = run_kgen("test", "--kernel", str(walk64), "-j", "1", "--", "-v", "-rs")
    assert result.returncode == 1, result.stdout + result.stderr
    seen = outcomes(result.stdout)
    assert seen.pop(WELL_FORMED) == "FAILED", result.stdout
    for index in zoo_walk.WALK64_BAD_SLOTS:
        value = zoo_walk.WALK64_BAD_PDE + 8 * index
        start, end = index << 21, (index + 1) << 21
        assert (f"→ PD[{index}] @ 0x105{8 * index:03x} = {value:#x}: reserved bits 0xfff0000000000 set "
                f"(0xfff0000000000: address bits above MAXPHYADDR 40): the entry holds what looks like a kernel "
                f"virtual address, not a physical one; {start:#x}-{end:#x} is not mapped: any access there is a page "
                f"fault with error code RSVD") in result.stdout, result.stdout
    # The rest of the tables is right, and judged so: the image's pages, the recursive slot, the tables, and QEMU's
    # own walks (whose info tlb shows the two entries as pages through the recursive window: left out).
    for holds in ("test_paging_and_write_protect_are_on", "test_recursive_slot_maps_the_pd_supervisor_only",
                  "test_elf_segments_map_vaddr_to_paddr_no_wider_than_their_flags",
                  "test_no_kernel_page_is_user_accessible", "test_each_page_table_is_referenced_once",
                  "test_page_tables_hold_no_poison", "test_walker_agrees_with_qemu_gva2gpa",
                  "test_walker_agrees_with_qemu_info_tlb"):
        assert seen[holds] == "PASSED", (holds, result.stdout)
    assert "FAILED" not in seen.values() and "ERROR" not in seen.values(), result.stdout
    assert "cannot be walked" not in result.stdout and "Traceback" not in result.stdout + result.stderr
