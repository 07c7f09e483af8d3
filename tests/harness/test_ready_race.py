"""A ready point racing a process switch (tests/zoo_race.py): the kernel switches CR3 between its own space and a
process's on every timer tick, so `--ready TEXT` stops it in either. The page-table checks judge the kernel's own
space (found by its `kpgdir`, kgen/guest/ownspace.py) and the live one every run: the flaw of the kernel's own
space is found whichever space was live, ten runs of `kgen test --kernel` give one verdict, and the report names the
spaces and says where the ready point came."""
from __future__ import annotations

import json

import pytest

import zoo_race
from conftest import needs_qemu, run_kgen

pytestmark = needs_qemu

USER_PAGES = "test_no_kernel_page_is_user_accessible"
RUNS = 10
# Each run as lean as the point allows: the page-table checks' module only, a small guest, one machine.
LEAN = ("--ready", zoo_race.READY, "-j", "1", "-k", "test_invariants", "--memory", "16", "--",
        "-p", "no:hypothesispytest", "-p", "no:cacheprovider")


@pytest.fixture(scope="module")
def kernels(tmp_path_factory):
    out = tmp_path_factory.mktemp("zoo-race")
    return {flaw: zoo_race.race_kernel(out, flaw=flaw) for flaw in (True, False)}


def test_the_kernels_own_space_and_the_live_one_are_judged_whichever_is_live(kernels, monkeypatch):
    """One boot, the ready point made to land in each space (the stopped machine seen with CR3 = each): the flaw is
    found in the kernel's own space both times, the process's space judged too when it is live and clean there."""
    from kgen.guest import invariants
    from kgen.guest.findings import failures
    from kgen.guest import ownspace
    from kgen.guest.ownspace import find, judged_spaces
    from kgen.harness.kernel import KernelUnderTest
    from kgen.harness.live import boot
    kernel = KernelUnderTest.foreign(kernels[True], ready=zoo_race.READY, memory_mib=16)
    with boot(kernel, cold=True) as live:
        view = live.view()
        kpgdir, proc = (int.from_bytes(view.walker.read_virtual(kernel.elf.symbols[name].value, 4), "little")
                        - zoo_race.KBASE["i386"] for name in ("kpgdir", "proc_pgdir"))
        assert view.regs.cr3 in (kpgdir, proc)
        own, why = find(view.in_space(proc, "the process"))
        assert why is None and own.top == kpgdir and own.symbol == "kpgdir" and not own.is_table
        verdicts = {}
        for live_top in (kpgdir, proc):
            judged, said = judged_spaces(view.in_space(live_top, None))
            assert [j.view.regs.cr3 for j in judged] == ([kpgdir] if live_top == kpgdir else [kpgdir, proc])
            assert f"the kernel's own space (PD at {kpgdir:#x}, kpgdir)" in said
            if live_top == proc:
                assert said.startswith(f"the ready point came while PD at {proc:#x} was live, not the kernel's own")
            found = {j.role: failures(invariants.check_no_user_pages(j.view)) for j in judged}
            assert len(found["own"]) == 1 and "PD[768]" in found["own"][0]
            assert found.get("live", []) == [], "the process's space shares no flaw"
            verdicts[live_top] = bool(sum(found.values(), []))
        assert verdicts == {kpgdir: True, proc: True}
        # A word holding a physical address (as a CR3 value) is read as one; a name the ELF lacks is said.
        monkeypatch.setattr(ownspace, "OWN_SPACE_SYMBOLS", ("proc_cr3",))
        own, why = ownspace.find(view)
        assert why is None and own.top == proc and own.symbol == "proc_cr3"
        monkeypatch.setattr(ownspace, "OWN_SPACE_SYMBOLS", ("no_such_table",))
        assert ownspace.find(view) == (None, f"{kernel.elf_path.name} has no symbol kgen knows a kernel's own "
                                             f"top-level table by (no_such_table...)")


def test_a_kernel_without_a_symbol_for_its_own_space_is_judged_in_the_live_one_and_says_why(kernels, monkeypatch):
    from kgen.guest import ownspace
    from kgen.harness.kernel import KernelUnderTest
    from kgen.harness.live import boot
    kernel = KernelUnderTest.foreign(kernels[False], ready=zoo_race.READY, memory_mib=16)
    monkeypatch.setattr(ownspace, "OWN_SPACE_SYMBOLS", ("no_such_table",))
    with boot(kernel, cold=True) as live:
        view = live.view()
        judged, said = ownspace.judged_spaces(view)
        assert [j.view for j in judged] == [view]
        assert said.startswith(f"judged the live space only (PD at {view.regs.cr3 & ~0xFFF:#x}): kgen cannot tell")
        assert "has no symbol" in said


def test_ten_runs_of_kgen_test_give_one_verdict(kernels, tmp_path):
    """`kgen test --kernel K --ready TEXT`, ten times: the same outcome for every check, the flaw of the kernel's own
    space failing the one check it breaks, whatever space was live at the ready point (the report says which)."""
    verdicts, landed = [], []
    for run in range(RUNS):
        report = tmp_path / f"run{run}.json"
        result = run_kgen("test", "--kernel", kernels[True], "--json", report, *LEAN)
        assert result.returncode == 1, result.stdout + result.stderr
        verdicts.append({c["name"]: c["outcome"] for c in json.loads(report.read_text())["checks"]})
        said = [line for line in result.stdout.splitlines() if line.startswith("kgen: page-table checks: ")]
        assert len(said) == 1 and "the ready point came while" in said[0], result.stdout
        assert "the kernel's own space (PD at 0x" in said[0] and "kpgdir)" in said[0], said
        landed.append("own" if "came while the kernel's own space" in said[0] else "process")
        if landed[-1] == "process":     # the finding names the space it is in; the live one's line is clean
            assert "in address space the kernel's own space (PD at " in result.stdout, result.stdout
    assert all(verdict == verdicts[0] for verdict in verdicts), verdicts
    assert [name for name, outcome in verdicts[0].items() if outcome == "failed"] == [USER_PAGES]
    print(f"ready point in the kernel's own space {landed.count('own')} times, in the process's "
          f"{landed.count('process')} times, of {RUNS}")


def test_the_kernel_without_the_flaw_passes_whichever_space_is_live(kernels):
    result = run_kgen("test", "--kernel", kernels[False], *LEAN)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "kgen: page-table checks: the ready point came while" in result.stdout


def test_with_address_spaces_the_kernels_own_space_is_one_more(kernels, tmp_path):
    """--address-spaces lists the process only: the kernel's own space is judged as one more space, the flaw found
    there and in no listed space."""
    report = tmp_path / "spaces.json"
    result = run_kgen("test", "--kernel", kernels[True], "--address-spaces", "proc_cr3,1", "--json", report, *LEAN)
    assert result.returncode == 1, result.stdout + result.stderr
    checks = {c["name"]: c for c in json.loads(report.read_text())["checks"]}
    assert {name for name, c in checks.items() if c["outcome"] == "failed"} == {f"{USER_PAGES}[the kernel's own space]"}
    assert checks[f"{USER_PAGES}[proc_cr3[0]]"]["outcome"] == "passed"


def test_an_assembly_label_of_no_size_at_a_page_boundary_is_read_as_the_table_itself(tmp_path, monkeypatch):
    """A kernel written in assembly keeps its table under a label (`pd: .skip 4096`, mios's `kernel_page_directory:
    .space 4096`): the symbol has no size, so it could be a word holding the table's address as well. Read as a
    word, its first entry is taken for that address (0 here, the identity entry cleared; mios's PD[0] read as
    0x10000000, "outside the guest's RAM") and the kernel's own space goes unjudged: the table is tried first."""
    import minikernels
    from kgen.guest import ownspace
    from kgen.harness.kernel import KernelUnderTest
    from kgen.harness.live import boot
    elf = minikernels.build(tmp_path, "mini", minikernels.HIGHER_HALF, minikernels.HIGHER_HALF_LDS, WRITABLE_TEXT=0)
    kernel = KernelUnderTest.foreign(elf, ready=minikernels.HIGHER_HALF_READY.strip(), memory_mib=16)
    assert kernel.elf.symbols["pd"].size == 0 and kernel.elf.symbols["pd"].value % 4096 == 0
    monkeypatch.setattr(ownspace, "OWN_SPACE_SYMBOLS", ("pd",))
    with boot(kernel, cold=True) as live:
        view = live.view()
        assert view.walker.read_virtual(kernel.elf.symbols["pd"].value, 4) == bytes(4), "PD[0] cleared"
        own, why = ownspace.find(view)
        assert why is None and own.top == view.regs.cr3 & ~0xFFF and own.is_table
        # A label whose page is no table of this kernel: both readings said, neither used.
        monkeypatch.setattr(ownspace, "OWN_SPACE_SYMBOLS", ("stack",))
        own, why = ownspace.find(view)
        assert own is None and why.startswith("as the table itself: stack names ") and \
            "; as a word holding its address: " in why
