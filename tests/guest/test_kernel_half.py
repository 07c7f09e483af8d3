"""What a kernel half is (issue 22, point 2), on the zoo kernels of tests/zoo_half.py: the kernel half is what the
paging mode says (x86_64: the upper canonical half; a 32-bit kernel: its ELF's higher-half base or --kernel-base), a
supervisor mapping there is never "below the kernel base", a supervisor page of the user half on no kernel frame is
information (a guard page), and user pages are judged against the kernel half. Each kernel is booted once, in
process; the true findings are asserted beside the false ones that must stay away."""
from __future__ import annotations

import dataclasses

import pytest

from conftest import needs_grub, needs_qemu, one_line, run_kgen
from kgen.arch import hw
from kgen.guest import invariants
from kgen.guest.findings import failures
from kgen.harness.kernel import KernelUnderTest
from kgen.harness.live import boot
from kgen.harness.pytest_plugin import assert_holds
from kgen.inspect.model import collect
from kgen.inspect.text import render_text
from minikernels import PROCESS_USER_CODE, PROCESS_USER_STACK, outcomes
from zoo_half import (GUARD_FRAME, GUARD_PAGE, HALF64_BASE, HALF64_DIRECT_MAP, HALF64_DIRECT_MAP_PAGES, HALF64_MMIO,
                      HALF64_MMIO_FRAME, HALF64_READY, LOW64_READY, LOW64_USER, guard_page, half64, low64)

pytestmark = [needs_qemu]
UPPER_HALF = 0xFFFF800000000000
BELOW = "test_nothing_is_mapped_below_the_kernel_base"
NO_USER = "test_no_kernel_page_is_user_accessible"


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    out = tmp_path_factory.mktemp("half")
    return {"half64": half64(out), "guard": guard_page(out), "low64": low64(out)}


def u64(value: int) -> bytes:
    return value.to_bytes(8, "little")


@needs_grub
def test_a_direct_map_and_an_mmio_window_in_the_kernel_half_are_the_kernels(zoo):
    kernel = KernelUnderTest.foreign(zoo["half64"], HALF64_READY.strip())
    with boot(kernel, cold=True) as live:
        view = live.view()
        assert view.kernel_half == UPPER_HALF and view.kernel_base == HALF64_BASE
        assert view.walker.translate(HALF64_MMIO).paddr == HALF64_MMIO_FRAME
        # Below the kernel's base, in the kernel half: no finding (it was "mapped below the kernel base").
        assert invariants.check_nothing_below_kernel_base(view) == []
        assert invariants.check_no_user_pages(view) == []
        # The true finding: the text lies in one writable 2 MiB page.
        assert any("<higher_half> (segment R-X" in p and "writable" in p for p in invariants.check_segments(view))
        doc = collect(live)
        named = {r["name"]: r for r in doc["regions"] if r["source"] == "mapping"}
        assert set(named) == {"direct map of RAM", "MMIO window"}, doc["regions"]
        direct, mmio = named["direct map of RAM"], named["MMIO window"]
        assert (int(direct["start"], 16), int(direct["end"], 16)) == (HALF64_DIRECT_MAP, HALF64_DIRECT_MAP
                                                                      + HALF64_DIRECT_MAP_PAGES * (2 << 20))
        # 64 MiB mapped, the legacy VGA/BIOS hole in it no RAM.
        assert direct["description"].startswith(f"maps physical 0x0-{HALF64_DIRECT_MAP_PAGES * (2 << 20):#x} at "
                                                f"offset {HALF64_DIRECT_MAP:#x}: 63.6 MiB of the"), direct
        assert (int(mmio["start"], 16), int(mmio["end"], 16)) == (HALF64_MMIO, HALF64_MMIO + (2 << 20))
        rows = {r["region"]: r for r in doc["virtual"]}
        assert rows["direct map of RAM"]["pages"] == HALF64_DIRECT_MAP_PAGES        # one row, the A/D bits aside
        assert rows["MMIO window"]["problems"] == []
        verdict = {r["name"]: r["outcome"] for r in doc["invariants"]}
        assert verdict["check_nothing_below_kernel_base"] == verdict["check_no_user_pages"] == "passed"

        # The kernel half is judged: U/S on the window's leaf entry is a kernel page one entry from ring 3.
        pde = view.walker.translate(HALF64_MMIO).chain[-1]
        live.write_phys(pde.addr, u64(pde.value | hw.PTE_US))
        problems = invariants.check_no_user_pages(live.view())
        assert len(problems) == 1 and problems[0].startswith(f"{pde} = ") and "not yet user-accessible" in problems[0]
        assert problems[0].vrange == (HALF64_MMIO, HALF64_MMIO + (2 << 20))
        # And the user half: the boot identity map put back (PML4[0]) maps the image's frames, a true finding.
        assert view.entry(view.walker.top, 0) == 0          # dropped by the kernel once high
        live.write_phys(view.walker.top, u64(view.elf.symbols["pdpt_low"].value | hw.PTE_P | hw.PTE_RW))
        low = invariants.check_nothing_below_kernel_base(live.view())
    assert len(failures(low)) == 1 and "identity-mapped" in low[0]
    assert f"below the kernel base {UPPER_HALF:#x}" in low[0], low


def test_a_guard_page_under_a_user_stack_is_information(zoo, capsys):
    kernel = KernelUnderTest.foreign(zoo["guard"], "proc: ready")
    with boot(kernel, cold=True) as live:
        view = live.view()
        t = view.walker.translate(GUARD_PAGE)
        assert t is not None and not t.attrs & hw.PTE_US and t.paddr == GUARD_FRAME
        found = invariants.check_nothing_below_kernel_base(view)
        assert failures(found) == [] and len(found) == 1 and found[0].info, found
        assert found[0].startswith(f"{GUARD_PAGE:#010x}-{PROCESS_USER_STACK:#010x} is a guard page: supervisor-only "
                                   f"(P RW) below the user page {PROCESS_USER_STACK:#x}"), found
        assert found[0].vrange == (GUARD_PAGE, PROCESS_USER_STACK) and found[0].frames == (GUARD_FRAME,)
        assert_holds(invariants.check_nothing_below_kernel_base, view)        # holds, the guard page a note
        assert f"note: {found[0]}" in capsys.readouterr().out
        doc = collect(live)
        below = next(r for r in doc["invariants"] if r["name"] == "check_nothing_below_kernel_base")
        assert below["outcome"] == "passed" and below["messages"] == [found[0]]
        assert f"note: {found[0]}" in render_text(doc, colour=False)
        assert invariants.check_no_user_pages(view) == []

        # --kernel-base moves the half: from 0x80000000 the user stack is a kernel page given to ring 3.
        lower = dataclasses.replace(view, kernel_base_given=0x80000000, notes=[])
        assert lower.kernel_half == 0x80000000
        problems = invariants.check_no_user_pages(lower)
        assert len(problems) == 1 and f"kernel page {PROCESS_USER_STACK:#x}" in problems[0], problems
        assert "(user-accessible;" in problems[0]

        # A kernel with no half kgen can tell (the same image, linked where it is loaded): only pages on the
        # image's frames are kernel pages, so the process's pages are its own ...
        flat = dataclasses.replace(view.elf, segments=tuple(dataclasses.replace(seg, vaddr=seg.paddr)
                                                            for seg in view.elf.segments))
        unknown = dataclasses.replace(view, elf=flat, notes=[])
        unknown.__dict__["_placement"] = view.placement
        assert unknown.kernel_half is None
        assert invariants.check_no_user_pages(unknown) == []
        assert "only pages on its image's frames are judged as kernel pages" in unknown.notes[0]
        with pytest.raises(invariants.NotApplicable, match="give --kernel-base ADDR"):
            invariants.check_nothing_below_kernel_base(unknown)
        # ... and a user page on a frame of the image is the kernel's, user-accessible.
        image = view.elf.segments[-1].paddr & ~(hw.PAGE_SIZE - 1)
        pte = view.walker.translate(PROCESS_USER_CODE).chain[-1]
        live.write_phys(pte.addr, (image | 7).to_bytes(4, "little"))
        tampered = dataclasses.replace(live.view(), elf=flat, notes=[])
        tampered.__dict__["_placement"] = view.placement
        problems = invariants.check_no_user_pages(tampered)
    assert len(problems) == 1 and problems[0].startswith(f"{pte} = ") and "(user-accessible;" in problems[0]


def test_a_kernel_not_linked_high_owns_its_identity_map_and_its_process_its_pages(zoo):
    kernel = KernelUnderTest.foreign(zoo["low64"], LOW64_READY.strip())
    with boot(kernel, cold=True) as live:
        view = live.view()
        assert view.kernel_base is None and view.kernel_half == UPPER_HALF
        user = view.walker.translate(LOW64_USER)
        assert user is not None and user.attrs & hw.PTE_US
        # The process's page is not a kernel page (it was "kernel page, user-accessible").
        assert invariants.check_no_user_pages(view) == []
        # The 1 GiB RWX identity map: information (supervisor-only, around the image linked there) ...
        found = invariants.check_nothing_below_kernel_base(view)
        assert failures(found) == [] and len(found) == 1, found
        assert found[0].startswith("0x00000000-0x40000000 is identity-mapped, supervisor-only (P RW PS), in the user "
                                   f"half (below the kernel half at {UPPER_HALF:#x}), around the kernel's own image "
                                   "at 0x100000-"), found
        assert any("is not linked in the higher half" in note for note in view.notes), view.notes
        regions = [r for r in collect(live)["regions"] if r["source"] == "mapping"]
        assert [(r["name"], r["start"], r["end"]) for r in regions] == [("direct map of RAM", "0x0", "0x40000000")]
        assert regions[0]["description"] == ("maps physical 0x0-0x40000000 identity-mapped: all of the guest's RAM "
                                             "and the holes between")
        # ... and the true finding where it is one: the kernel's text and rodata are writable through it, one
        # finding for the 2 MiB page that holds them.
        (writable,) = [p for p in invariants.check_segments(view) if "writable" in p]
        assert writable.startswith("2 pages of the 2 MiB page at 0x0, ") and writable.vrange[0] == 0x100000, writable
        assert "(segment R-X, loaded at 0x100000)" in writable and ": writable (P RW A PS) via PML4[0]" in writable
        # Its image given to ring 3 is found, even at its own link addresses.
        identity = view.walker.translate(0x100000).chain
        for ref in identity:
            live.write_phys(ref.addr, u64(ref.value | hw.PTE_US))
        problems = invariants.check_nothing_below_kernel_base(live.view())
    assert len(failures(problems)) == 1 and problems[0].startswith("0x00000000-0x00200000 is a user page"), problems
    assert "on the kernel image's frames 0x100000-" in problems[0]


def test_kernel_base_reaches_kgen_test_and_moves_the_half(zoo):
    result = run_kgen("test", "--kernel", zoo["guard"], "--ready", "proc: ready", "--kernel-base", "0x80000000",
                      "-j", "1", "-k", "below_the_kernel_base or no_kernel_page", "--", "-v")
    assert result.returncode == 1, result.stdout + result.stderr
    seen = outcomes(result.stdout)
    assert seen[BELOW] == "PASSED" and seen[NO_USER] == "FAILED", result.stdout
    assert f"has U/S set for kernel page {PROCESS_USER_STACK:#x}" in result.stdout, result.stdout


@pytest.mark.parametrize("command, kernel, value, said", [
    ("test", "guard", "0x1234", "--kernel-base 0x1234: not page-aligned"),
    ("inspect", "guard", "0x100000000", "--kernel-base 0x100000000: give an address above 0 and below 0x100000000"),
    ("test", "low64", "0x80000000", "--kernel-base 0x80000000: low64.elf is a 64-bit kernel, whose kernel half is "
                                    "the upper canonical half (from 0xffff800000000000)"),
])
def test_a_kernel_base_that_cannot_be_is_one_line(zoo, command, kernel, value, said):
    result = run_kgen(command, "--kernel", zoo[kernel], "--kernel-base", value)
    assert result.returncode == 2 and said in one_line(result), result.stderr


def test_a_kernel_base_that_is_no_address_is_one_line(zoo, tmp_path):
    result = run_kgen("test", "--kernel", zoo["guard"], "--kernel-base", "high")
    assert result.returncode == 2 and "--kernel-base: 'high' is not an address" in one_line(result)
    config = tmp_path / "kgen.toml"
    config.write_text(f'[foreign]\nkernel = "{zoo["guard"]}"\nkernel_base = 0xC0000123\n')
    result = run_kgen("test", "--config", config)
    assert result.returncode == 2, result.stderr
    assert "foreign.kernel_base = 0xc0000123: not page-aligned" in one_line(result)
