"""A kernel that uses the Limine boot protocol, booted from the author's own Limine ISO (`kgen test|run --image`),
BIOS and UEFI: kgen finds the kernel through limine.conf, learns where Limine put it from the live page tables (its
ELF's p_paddr are no load address: Limine chooses one) and judges it there. Verdicts are judged against what the zoo
kernel really does (tests/minikernels.py, LIMINE_KERNEL): Limine maps each segment with its rights, so the segment
check holds; Limine's direct map of all RAM lies below the kernel's base but in the kernel half (x86-64's upper
canonical half): the kernel's, no finding, and every check holds."""
from __future__ import annotations

import re

import pytest

from conftest import needs_qemu, run_kgen
from kgen.arch import hw
from kgen.guest import invariants
from kgen.harness.kernel import KernelUnderTest
from kgen.harness.live import boot
from kgen.machine import firmware
from minikernels import LIMINE_LOADED_AT, LIMINE_READY, limine_iso, limine_kernel, outcomes

pytestmark = [needs_qemu]
needs_ovmf = pytest.mark.skipif(not any(c.is_file() for c, _ in firmware.OVMF_CANDIDATES),
                                reason="UEFI needs the Debian package ovmf")
SEGMENTS = "test_elf_segments_map_vaddr_to_paddr_no_wider_than_their_flags"
BELOW = "test_nothing_is_mapped_below_the_kernel_base"
ELF_BASE = 0xffffffff80000000       # LIMINE_LDS: linked there, p_paddr = p_vaddr
HHDM = 0xffff800000000000           # Limine's higher-half direct map under 4-level paging
FIRMWARES = ["bios", pytest.param("uefi", marks=needs_ovmf)]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    out = tmp_path_factory.mktemp("limine")
    kernel = limine_kernel(out)
    return {"kernel": kernel, "iso": limine_iso(out, kernel)}


def loaded_at(serial: str) -> int:
    """The physical base the kernel's Limine kernel-address response gave, as the kernel prints it."""
    return int(re.search(re.escape(LIMINE_LOADED_AT) + "([0-9a-f]{16})", serial).group(1), 16)


def found_base(stdout: str) -> int:
    """The physical base the segment check learnt from the page tables (its note, shown by -rP)."""
    match = re.search(r"the page tables put the kernel at physical base (0x[0-9a-f]+), where its ELF's p_paddr say "
                      r"(0x[0-9a-f]+): every segment is judged there", stdout)
    assert match, stdout
    assert int(match.group(2), 16) == ELF_BASE
    return int(match.group(1), 16)


@pytest.mark.parametrize("firmware_name", FIRMWARES)
def test_a_limine_iso_is_booted_and_its_kernel_found_through_limine_conf(zoo, firmware_name):
    before = zoo["iso"].read_bytes()
    result = run_kgen("test", "--image", str(zoo["iso"]), "--ready", LIMINE_READY, "--firmware", firmware_name,
                      "-j", "1", "--", "-v", "-rP")
    assert result.returncode == 0, result.stdout + result.stderr
    assert ("kgen: --image limine.iso: checking /boot/limine-zoo.elf, the kernel its /boot/limine/limine.conf "
            "loads") in result.stderr, result.stderr
    assert f"through its own image limine.iso as the CD-ROM, {firmware_name.upper()}" in result.stderr
    seen = outcomes(result.stdout)
    failed = {name for name, outcome in seen.items() if outcome == "FAILED"}
    # Limine's direct map of RAM from HHDM, below the kernel's base, is in the kernel half: not a finding.
    assert failed == set() and seen[BELOW] == "PASSED", result.stdout
    assert f"{HHDM:#x}-" not in result.stdout, result.stdout
    # Where Limine put it: found in the tables, the base its kernel-address response gave; every page judged there.
    assert seen[SEGMENTS] == "PASSED"
    base = found_base(result.stdout)
    assert base != ELF_BASE and base % 0x1000 == 0 and base < 128 << 20, hex(base)
    for holds in ("test_paging_and_write_protect_are_on", "test_no_kernel_page_is_user_accessible",
                  "test_each_page_table_is_referenced_once", "test_walker_agrees_with_qemu_gva2gpa"):
        assert seen[holds] == "PASSED", holds
    assert zoo["iso"].read_bytes() == before        # never written


@pytest.mark.parametrize("firmware_name", FIRMWARES)
def test_a_limine_menu_that_waits_is_not_taken_for_the_kernel(zoo, tmp_path, firmware_name):
    # Limine's templates wait 3 s in their menu. Under BIOS that wait ran forever with the -icount GRUB needs, and
    # under UEFI the loader idling in it looked like a booted kernel: without --ready the checks then ran before the
    # kernel was even loaded. Now halted or idle counts only in the kernel's own code, and -icount is GRUB's alone.
    iso = limine_iso(tmp_path, zoo["kernel"], "menu.iso", timeout=3)
    result = run_kgen("test", "--image", str(iso), "--firmware", firmware_name, "-j", "1", "-k",
                      "segments or below_the_kernel_base", "--", "-v")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "error" not in result.stderr, result.stderr
    seen = outcomes(result.stdout)
    assert seen[SEGMENTS] == "PASSED" and seen[BELOW] == "PASSED", result.stdout


def test_the_kernel_given_with_the_limine_iso_is_judged_the_same(zoo):
    result = run_kgen("test", "--image", str(zoo["iso"]), "--kernel", str(zoo["kernel"]), "--ready", LIMINE_READY,
                      "-j", "1", "-k", "segments or below_the_kernel_base", "--", "-v", "-rP")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "checking /boot" not in result.stderr and "error" not in result.stderr, result.stderr
    seen = outcomes(result.stdout)
    assert seen[SEGMENTS] == "PASSED" and seen[BELOW] == "PASSED", result.stdout
    assert found_base(result.stdout) != ELF_BASE


@pytest.mark.parametrize("firmware_name", FIRMWARES)
def test_the_base_found_in_the_tables_is_where_limine_says_it_put_the_kernel(zoo, firmware_name):
    kernel = KernelUnderTest.foreign(zoo["kernel"], LIMINE_READY, image=zoo["iso"], firmware=firmware_name)
    with boot(kernel, cold=True) as live:
        live.stop()
        view = live.view()
        placement = view.placement
        assert placement.elf_base == ELF_BASE and placement.strays == {}
        assert placement.base == loaded_at(live.machine.serial)
        assert invariants.check_segments(view) == []
        assert view.notes == [f"the page tables put the kernel at physical base {placement.base:#x}, where its "
                              f"ELF's p_paddr say {ELF_BASE:#x}: every segment is judged there"]
        # Rights are judged at the base found: the rodata page made writable is named, loaded where Limine put it.
        rodata = next(seg for seg in view.elf.segments if not seg.writable and not seg.executable)
        pte = view.walker.translate(rodata.vaddr).chain[-1]
        live.write_phys(pte.addr, (pte.value | hw.PTE_RW).to_bytes(8, "little"))
        tampered = live.view()
        t = tampered.walker.translate(rodata.vaddr)
        problems = invariants.check_segments(tampered)
        where = rodata.paddr - ELF_BASE + placement.base
        assert problems[0] == placement.describe()
        assert problems[1:] == [f"page {rodata.vaddr:#x} <hexdigits> (segment R--, loaded at {where:#x}): writable "
                                f"({t.attrs}) via {t.path}, but no writable segment lies there"], problems
        # A segment moved apart from the rest: the data page mapped one page further on is one finding.
        data = next(seg for seg in view.elf.segments if seg.writable)
        pte = view.walker.translate(data.vaddr).chain[-1]
        live.write_phys(pte.addr, (pte.value + hw.PAGE_SIZE).to_bytes(8, "little"))
        moved = live.view()
        assert moved.placement.strays == {data.index: placement.offset + hw.PAGE_SIZE}
        problems = invariants.check_segments(moved)
        assert problems[1] == (f"segment {data.index} ({data.vaddr:#x} <limine_requests_start>) is mapped at "
                               f"physical {data.paddr + placement.offset + hw.PAGE_SIZE:#x}, not "
                               f"{data.paddr + placement.offset:#x} where the rest of the kernel puts it (physical base "
                               f"{placement.base:#x}): a kernel's segments keep their distances wherever it is "
                               f"loaded"), problems
        assert len(problems) == 3 and "<hexdigits>" in problems[2], problems     # its pages: not named again
