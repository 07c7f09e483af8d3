"""What `kgen test --kernel` and `kgen run --kernel` report, checked against what the zoo's process kernel
(tests/minikernels.py PROCESS) really holds: `--json` (one object per check, the outcome pytest itself printed),
`--address-spaces` (every space the kernel lists is judged, a flaw in one that is not in CR3 is found and named, the
verdicts do not depend on which process is current), user pages told apart from a stray identity map, a fault loop
named as such, and CS/CPL in the register line. Every kernel is built here by GNU as/ld and booted in QEMU."""
import json
from pathlib import Path

import pytest

import minikernels
import zoo_reports
from conftest import needs_qemu, run_kgen
from minikernels import (PROCESS_FAULT_ADDRESS, PROCESS_SPACE_SLOTS, PROCESS_SPACES, PROCESS_USER_CODE,
                         PROCESS_USER_STACK)

pytestmark = [pytest.mark.vm, needs_qemu]
KBASE = 0xC0000000
BELOW = "test_nothing_is_mapped_below_the_kernel_base"
# The page-table checks of the suite (kgen/harness/suite/test_invariants.py) that --address-spaces repeats per space.
PER_SPACE = ("test_page_table_entries_are_well_formed", "test_recursive_slot_maps_the_pd_supervisor_only",
             "test_elf_segments_map_vaddr_to_paddr_no_wider_than_their_flags", BELOW,
             "test_no_kernel_page_is_user_accessible", "test_each_page_table_is_referenced_once",
             "test_page_tables_hold_no_poison")


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    out = tmp_path_factory.mktemp("process")
    return {name: minikernels.process_kernel(out, name, **flags) for name, flags in {
        "kernel-current": {}, "process-current": {"CURRENT": 1},
        "flaw-kernel-current": {"FLAW": 1}, "flaw-process-current": {"FLAW": 1, "CURRENT": 1},
        "ring3": {"RING3": 1}, "fault-loop": {"FAULT_LOOP": 1}}.items()}


def symbol(elf: Path, name: str) -> int:
    from kgen.guest.elfinfo import ElfInfo
    return ElfInfo.load(elf).symbols[name].value


def tables(elf: Path) -> dict[str, int]:
    """Physical addresses of the kernel's and the process's page directories, from the ELF (linked at KBASE + phys)."""
    return {"kernel": symbol(elf, "kpd") - KBASE, "process": symbol(elf, "ppd") - KBASE}


def json_test(elf: Path, tmp_path: Path, *options: str, verbose: bool = False):
    """`kgen test --kernel ELF --json FILE`: (process result, document, {check name: outcome} from pytest's -v)."""
    report = tmp_path / f"{elf.stem}-{len(list(tmp_path.iterdir()))}.json"
    result = run_kgen("test", "--kernel", str(elf), "-j", "1", "--json", str(report), *options,
                      "-k", "not exercise", "--", "-v")
    assert "Traceback" not in result.stdout + result.stderr, result.stdout + result.stderr
    doc = json.loads(report.read_text())
    printed = {}
    for line in result.stdout.splitlines():     # "path::name[id] PASSED"
        parts = line.split()
        if len(parts) >= 2 and "::" in parts[0] and parts[1] in ("PASSED", "FAILED", "SKIPPED", "ERROR"):
            printed[parts[0].split("::", 1)[1]] = parts[1].lower()
    return result, doc, printed


def by_name(doc: dict) -> dict[str, dict]:
    return {check["name"]: check for check in doc["checks"]}


def test_json_has_one_object_per_check_with_the_outcome_pytest_printed(zoo, tmp_path):
    elf = zoo["process-current"]
    result, doc, printed = json_test(elf, tmp_path, "--address-spaces", PROCESS_SPACES)
    assert result.returncode == 0, result.stdout + result.stderr
    checks = by_name(doc)
    assert len(checks) == len(doc["checks"]), "a check appears twice"
    # The same tests, the same outcomes, as pytest's own -v lines of the same run; the checks for kernels kgen
    # built are skipped, each a record here but one line of their own there.
    kgen_only = {name for name, c in checks.items() if c["kgen_only"]}
    assert kgen_only and {checks[name]["outcome"] for name in kgen_only} == {"skipped"}
    assert {name: c["outcome"] for name, c in checks.items() if name not in kgen_only} == \
        {n.split("::")[-1]: o for n, o in printed.items()}
    assert f"kgen: {len(kgen_only)} checks skipped, for kernels kgen built only: {elf.name} was not built by kgen" \
        in result.stdout, result.stdout
    assert doc["kernel"] == {"elf": str(elf.resolve()), "kind": "foreign", "arch": "i386"} and doc["accel"] == "tcg"
    summary = doc["summary"]
    assert summary["total"] == len(checks) and summary["failed"] == summary["error"] == 0
    assert summary["passed"] == sum(c["outcome"] == "passed" for c in checks.values()) > 0
    assert summary["skipped"] == sum(c["outcome"] == "skipped" for c in checks.values()) > 0
    # Each page-table check once per slot of the array; the slots holding 0 are skipped with that reason.
    tops = [tables(elf)["kernel"], tables(elf)["process"]] + [0] * (PROCESS_SPACE_SLOTS - 2)
    for name in PER_SPACE:
        assert name not in checks
        for slot, top in enumerate(tops):
            check = checks[f"{name}[{PROCESS_SPACES}[{slot}]]"]
            if top == 0:
                assert check["outcome"] == "skipped"
                assert check["messages"] == [f"{PROCESS_SPACES}[{slot}] is 0: no address space in this slot"]
    # A skip's messages are its reason as the check words it, naming the space it looked at.
    recursive = checks[f"test_recursive_slot_maps_the_pd_supervisor_only[{PROCESS_SPACES}[1]]"]
    assert recursive["outcome"] == "skipped"
    assert recursive["messages"] == [f"no PD entry points at the PD itself: this kernel has no recursive slot in "
                                     f"address space {PROCESS_SPACES}[1]: PD at {tops[1]:#x} (the space in CR3)"]
    assert checks["test_paging_and_write_protect_are_on"]["outcome"] == "passed"
    # The space each check judged: the slot it was given, or the one in CR3, named by the slot holding it.
    cr3 = f"the space in CR3: PD at {tops[1]:#x} ({PROCESS_SPACES}[1])"
    slots = [f"{PROCESS_SPACES}[0]: PD at {tops[0]:#x}", f"{PROCESS_SPACES}[1]: PD at {tops[1]:#x} (the space in CR3)"]
    assert doc["spaces"] == [cr3] + slots
    assert checks["test_paging_and_write_protect_are_on"]["spaces"] == [cr3]
    assert checks[f"{BELOW}[{PROCESS_SPACES}[0]]"]["spaces"] == [slots[0]]
    assert f"kgen: address spaces judged: {'; '.join([cr3] + slots)}" in result.stdout, result.stdout


def test_a_large_page_is_one_finding_and_the_checks_for_kgen_kernels_one_line(tmp_path):
    """The default output of `kgen test --kernel`: the writable 4 MiB kernel page of tests/zoo_reports.py is one
    finding, the checks only a kernel kgen built can pass one line with the reason, and the space judged named."""
    elf = zoo_reports.large_page_kernel(tmp_path)
    report = tmp_path / "large.json"
    result = run_kgen("test", "--kernel", str(elf), "-j", "1", "--json", str(report))
    assert result.returncode == 1, result.stdout + result.stderr
    doc = json.loads(report.read_text())
    checks = by_name(doc)
    segments = checks["test_elf_segments_map_vaddr_to_paddr_no_wider_than_their_flags"]
    header, *findings = segments["messages"]
    assert segments["outcome"] == "failed" and len(findings) == 1, segments["messages"]
    assert findings[0].startswith(f"4 pages of the 4 MiB page at {KBASE:#x}, ") and "writable" in findings[0]
    kgen_only = [c for c in doc["checks"] if c["kgen_only"]]
    assert len(kgen_only) == doc["summary"]["kgen_only"] and {c["outcome"] for c in kgen_only} == {"skipped"}
    assert {c["name"] for c in kgen_only} >= {"test_cr3_is_the_boot_page_directory",
                                              "test_allocate_at_round_trips"}
    lines = [line for line in result.stdout.splitlines() if "was not built by kgen" in line]
    assert lines == [f"kgen: {len(kgen_only)} checks skipped, for kernels kgen built only: {elf.name} was not "
                     f"built by kgen: its layout and call channel are unknown (-vv or --json lists them)"], lines
    pd = symbol(elf, "pd") - KBASE
    assert doc["spaces"] == [f"the space in CR3: PD at {pd:#x}"]
    # The terminal says it once: the line of the kernel's own space and the live one (kgen/harness/spacesjudged.py),
    # not a second line of the same space.
    assert f"kgen: page-table checks: judged the live space only (PD at {pd:#x})" in result.stdout, result.stdout
    assert "kgen: address space" not in result.stdout, result.stdout


def test_inspect_names_the_process_whose_space_it_shows(zoo):
    from kgen.inspect.text import render_text
    elf = zoo["process-current"]
    result = run_kgen("inspect", "--kernel", str(elf), "--address-spaces", PROCESS_SPACES, "--json")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    process = tables(elf)["process"]
    assert doc["space"] == {"cr3": hex(process), "top": hex(process), "name": f"{PROCESS_SPACES}[1]"}
    assert f"space:     the one in CR3 (PD at {process:#x}), {PROCESS_SPACES}[1]" in render_text(doc)


def test_a_flaw_only_in_the_space_not_in_cr3_is_found_and_named(zoo, tmp_path):
    elf = zoo["flaw-kernel-current"]
    pds = tables(elf)
    # Judged on CR3 alone (the kernel's space), the process's stray identity map is not seen.
    alone, doc, _ = json_test(elf, tmp_path)
    assert alone.returncode == 0 and by_name(doc)[BELOW]["outcome"] == "passed", alone.stdout + alone.stderr
    result, doc, printed = json_test(elf, tmp_path, "--address-spaces", f"{PROCESS_SPACES},2")
    assert result.returncode == 1, result.stdout + result.stderr
    checks = by_name(doc)
    assert doc["summary"]["failed"] == 1 and doc["summary"]["total"] == len(checks)
    assert checks[f"{BELOW}[{PROCESS_SPACES}[0]]"]["outcome"] == "passed"
    failed = checks[f"{BELOW}[{PROCESS_SPACES}[1]]"]
    assert failed["outcome"] == printed[f"{BELOW}[{PROCESS_SPACES}[1]]"] == "failed"
    header, *lines = failed["messages"]
    assert header.endswith(f"in address space {PROCESS_SPACES}[1]: PD at {pds['process']:#x}"), header
    # The identity map the FLAW variant adds: the image from 1 MiB, through PD[0] of the process's directory.
    assert lines and all("is identity-mapped" in line and "below the kernel base 0xc0000000" in line
                         for line in lines), lines
    assert lines[0].startswith("0x00100000-") and f"via PD[0] @ {pds['process']:#x} → PT[256]" in lines[0], lines
    # Two slots asked for: no third.
    assert f"{BELOW}[{PROCESS_SPACES}[2]]" not in checks


def test_the_verdicts_do_not_depend_on_which_process_is_current(zoo, tmp_path):
    verdicts = {}
    for name in ("flaw-kernel-current", "flaw-process-current"):
        result, doc, _ = json_test(zoo[name], tmp_path, "--address-spaces", PROCESS_SPACES)
        assert result.returncode == 1, result.stdout + result.stderr
        verdicts[name] = {c["name"]: c["outcome"] for c in doc["checks"]}
    assert verdicts["flaw-kernel-current"] == verdicts["flaw-process-current"]
    assert verdicts["flaw-process-current"][f"{BELOW}[{PROCESS_SPACES}[1]]"] == "failed"


def test_user_pages_are_not_a_stray_identity_map(zoo, tmp_path):
    from kgen.arch import hw
    from kgen.guest import invariants
    from kgen.harness.kernel import KernelUnderTest
    from kgen.harness.live import boot
    elf = zoo["process-current"]
    # The process's user pages are really there, in CR3, user-accessible, below the kernel base ...
    with boot(KernelUnderTest.foreign(elf), cold=True) as live:
        view = live.view()
        assert view.regs.cr3 == tables(elf)["process"]
        for vaddr in (PROCESS_USER_CODE, PROCESS_USER_STACK):
            t = view.walker.translate(vaddr)
            assert t is not None and t.attrs & hw.PTE_US and vaddr < view.kernel_base, (vaddr, t)
        assert invariants.check_nothing_below_kernel_base(view) == []
        # ... and one that shows ring 3 a frame of the kernel image is still reported.
        text = symbol(elf, "higher_half") - KBASE & ~(hw.PAGE_SIZE - 1)
        pte = t.chain[-1]
        live.write_phys(pte.addr, (text | hw.PTE_P | hw.PTE_RW | hw.PTE_US).to_bytes(4, "little"))
        problems = invariants.check_nothing_below_kernel_base(live.view())
    span = f"{PROCESS_USER_STACK:#010x}-{PROCESS_USER_STACK + hw.PAGE_SIZE:#010x}"
    assert len(problems) == 1 and problems[0].startswith(f"{span} is a user page"), problems
    assert f"kernel image's frames {text:#x}-" in problems[0]
    # Under kgen test, with the process's space current: nothing below the kernel base is reported.
    result, doc, _ = json_test(elf, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert by_name(doc)[BELOW]["outcome"] == "passed"


def test_a_fault_loop_is_named_not_a_hang(zoo, tmp_path):
    elf = zoo["fault-loop"]
    fault = symbol(elf, "fault_here")
    expected = (f"fault loop: #PF page fault [page not present, write, supervisor] at {fault:#010x} <fault_here> "
                f"over and over, "
                f"CR2={PROCESS_FAULT_ADDRESS:#010x} (")
    run = run_kgen("run", "--kernel", str(elf), "--timeout", "60")
    assert run.returncode == 4, run.stdout + run.stderr
    assert run.stderr.strip().splitlines()[-1].startswith(f"kgen: error: {expected}"), run.stderr
    report = tmp_path / "loop.json"
    test = run_kgen("test", "--kernel", str(elf), "-j", "1", "--json", str(report))
    assert test.returncode == 1, test.stdout + test.stderr
    assert test.stderr.strip().splitlines()[-1].startswith(
        f"kgen: error: --kernel {elf.name} did not boot to a state the checks can look at: {expected}"), test.stderr
    doc = json.loads(report.read_text())
    assert doc["checks"] == [] and doc["boot_failure"]["kind"] == "fault loop"
    assert doc["boot_failure"]["summary"].startswith(expected)
    # A kernel that keeps running without taking exceptions (a process spinning in ring 3) is still a hang.
    spin = run_kgen("run", "--kernel", str(zoo["ring3"]), "--timeout", "3")
    assert spin.returncode == 4 and "kgen: error: hang: " in spin.stderr, spin.stderr
    assert "fault loop" not in spin.stderr


def register_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("registers: ")]
    assert len(lines) == 1, stderr
    return lines[0]


def test_the_register_line_names_cs_and_cpl(zoo):
    # Halted in ring 0 before the text asked for: the kernel's code selector, CPL 0.
    halted = run_kgen("run", "--kernel", str(zoo["kernel-current"]), "--ready", "never printed")
    assert halted.returncode == 4, halted.stdout + halted.stderr
    line = register_line(halted.stderr)
    assert " CS=0x0008 CPL=0 " in line and "halted=True" in line, line
    # Spinning in the process, ring 3: the user code selector (GDT entry 3, RPL 3), CPL 3.
    user = run_kgen("run", "--kernel", str(zoo["ring3"]), "--timeout", "3")
    line = register_line(user.stderr)
    assert line.startswith(f"registers: EIP={PROCESS_USER_CODE:#010x} CS=0x001b CPL=3 "), line


def test_the_long_mode_register_line_names_cs_and_cpl(x86_64_build):
    from kgen.guest.diagnose import register_line as line_of
    from kgen.harness.session import KernelSession
    layout = x86_64_build.kernel.layout
    with KernelSession(x86_64_build.elf, layout) as session:
        session.machine.stop()
        line = line_of(session.machine.registers())
    assert line.startswith("RIP=0xffff") and f" CS={layout.kernel_cs:#06x} CPL=0 " in line, line


def test_the_fault_loop_judge_counts_exceptions_only_at_few_places():
    # Lines in the shape QEMU's target/i386 do_interrupt_all logs them (8 hex digits on qemu-system-i386, 16 in long
    # mode), each followed in the real log by a register dump the reader skips.
    from kgen.guest import faultloop

    def line(n, vector, pc, cr2=None, software=0, width=8):
        tail = f" CR2={cr2:0{width}x}" if cr2 is not None else f" env->regs[R_EAX]={0:0{width}x}"
        return (f"{n:6d}: v={vector:02x} e=0002 i={software} cpl=0 IP=0008:{pc:0{width}x} pc={pc:0{width}x} "
                f"SP=0010:{0x1000:0{width}x}{tail}\nEAX=00000000 EBX=00000000\n")

    rip = 0xFFFFFFFF80100514
    loop = "".join(line(n, 14, rip, 0xDEAD0000, width=16) + line(n, 0x20, 0x1234) for n in range(40))
    found = faultloop.judge(faultloop.parse(loop), 0.02)
    assert found is not None and found.total == 40 and found.sites == (((14, rip, 0xDEAD0000, 0), 40),)
    # The timer's interrupts and `int 0x80` are no exceptions; a kernel paging in many pages is busy, not looping.
    assert faultloop.parse("".join(line(n, 0x20, 0x1234) + line(n, 0x80, 0x1234, software=1) for n in range(40))) == []
    demand = "".join(line(n, 14, 0xC0100000 + n, 0x08048000 + 0x1000 * n) for n in range(40))
    assert len(faultloop.parse(demand)) == 40 and faultloop.judge(faultloop.parse(demand), 0.02) is None
    assert faultloop.judge(faultloop.parse(loop)[:faultloop.MIN_EXCEPTIONS - 1], 0.02) is None


def test_json_on_stdout_for_a_kgen_kernel(tmp_path):
    out = tmp_path / "build"
    result = run_kgen("test", "--out", str(out), "-j", "1", "-k", "test_invariants", "--json", "-", "--", "-v")
    assert result.returncode == 0, result.stdout + result.stderr
    doc = json.loads(result.stdout)        # stdout holds the document alone: pytest's lines went to stderr
    printed = {line.split()[0].split("::", 1)[1]: line.split()[1].lower() for line in result.stderr.splitlines()
               if "::" in line and len(line.split()) >= 2 and line.split()[1] in ("PASSED", "FAILED", "SKIPPED")}
    assert printed and {c["name"]: c["outcome"] for c in doc["checks"]} == printed
    assert doc["kernel"] == {"elf": str((out / "kernel.elf").resolve()), "kind": "kgen", "arch": "i386"}
    assert doc["summary"]["total"] == len(printed) and doc["boot_failure"] is None
    assert all(c["module"] == "test_invariants" for c in doc["checks"])
    # kgen's own kernel is looked at in its boot space, and says so.
    from kgen.guest.elfinfo import ElfInfo
    elf = ElfInfo.load(out / "kernel.elf")
    top = elf.symbols["boot_top_table"].value - KBASE
    assert doc["spaces"] == [f"the space in CR3: PD at {top:#x} (the boot space)"], doc["spaces"]


def test_a_slot_outside_ram_is_a_failure_not_an_empty_space(zoo, tmp_path):
    # `ready` is the kernel's ready string, not an array of page directories: its words point nowhere in RAM.
    elf = zoo["kernel-current"]
    words = [int.from_bytes(minikernels.PROCESS_READY.encode()[i:i + 4], "little") & ~0xFFF for i in (0, 4)]
    result, doc, _ = json_test(elf, tmp_path, "--address-spaces", "ready,2")
    assert result.returncode == 1, result.stdout + result.stderr
    for slot, word in enumerate(words):
        check = by_name(doc)[f"{BELOW}[ready[{slot}]]"]
        assert check["outcome"] == "failed"
        assert check["messages"][0].startswith(f"ready[{slot}] = {word:#x} is not in the guest's RAM"), check


def test_assert_holds_fails_on_failures_only_and_prints_information_as_notes(capsys):
    from types import SimpleNamespace

    from kgen.guest.findings import Finding
    from kgen.harness.pytest_plugin import assert_holds
    guard = Finding("0x00000000-0x00001000 is a guard page", vrange=(0, 0x1000), info=True)
    stray = Finding("0x00100000-0x00101000 is identity-mapped", vrange=(0x100000, 0x101000))

    def check_low(view):
        """Nothing stray below the kernel base."""
        return findings
    view = SimpleNamespace(notes=[], space=None)
    findings = [guard]
    assert_holds(check_low, view)
    assert capsys.readouterr().out == f"note: {guard}\n"
    findings = [guard, stray]
    with pytest.raises(pytest.fail.Exception) as failed:
        assert_holds(check_low, view)
    assert str(failed.value) == f"Nothing stray below the kernel base.\n  {stray}"


def test_the_short_summary_words_the_checks_for_kgen_kernels_as_any_skip(tmp_path):
    """`-- -rs` (or -rA) lists every skip in pytest's short summary, the checks for kernels kgen built too: each line
    starts with SKIPPED, as pytest words it (the one-line-each rule of the run hid that word there too)."""
    elf = zoo_reports.large_page_kernel(tmp_path)
    result = run_kgen("test", "--kernel", str(elf), "-j", "1", "-k", "test_invariants", "--", "-rs")
    summary = result.stdout.split("short test summary info", 1)[1].splitlines()[1:]
    skips = [line for line in summary if "[" in line and ("was not built by kgen" in line or "no recursive" in line)]
    assert skips and all(line.startswith("SKIPPED [") for line in skips), result.stdout
