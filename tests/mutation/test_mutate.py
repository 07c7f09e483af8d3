"""The mutation run (tests/mutation/mutate.py): which lines it changes and how, and one real run that tells a bug
`kgen test` catches from a line the kernel does not contain."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import mutate
from conftest import needs_qemu

TEMPLATE = """\
# a comment
routine:
    push xbx
    FRAME 0x1
    mov xax, [xsp + ARG1]
    or xax, PTE_P | PTE_RW
    mov [xbx], xax
    invlpg [xbx]
    cmp xax, 0x10
    jb .Lsmall
.if VMM_SKIP_TABLE_CLEAR
    mov eax, 0x1
.else
    xor eax, eax
.endif
    add xsp, 2*WORD_SIZE
    mov ecx, 0x3
    mov edx, 0x4
.Lsmall:
    pop xbx
    ret
"""


def by_operator(mutants) -> dict[str, list[tuple[int, str]]]:
    found: dict[str, list[tuple[int, str]]] = {}
    for m in mutants:
        found.setdefault(m.operator, []).append((m.line, m.mutated.strip()))
    return found


def test_each_operator_changes_the_lines_a_slip_would():
    found = by_operator(mutate.mutants_of("t.s", TEMPLATE))
    assert (8, "# mutant: invlpg [xbx]") in found["omit"]
    assert found["flag-drop"] == [(6, "or xax, PTE_RW"), (6, "or xax, PTE_P")]
    assert found["negate"] == [(10, "jae .Lsmall")] and found["boundary"] == [(10, "jbe .Lsmall")]
    assert (9, "cmp xax, 0x11") in found["constant"] or (9, "cmp xax, 0xf") in found["constant"]
    # The correct branch of a variant switch is mutated, the seeded bug is not.
    assert 14 in [line for line, _ in found["omit"]] and 12 not in [line for line, _ in found["omit"]]


def test_stack_bookkeeping_and_control_flow_are_left_alone():
    lines = {line for m in mutate.mutants_of("t.s", TEMPLATE) for line in (m.line, m.next_line)}
    for untouched in (3, 4, 16, 20, 21):        # push, FRAME, add xsp, pop, ret
        assert untouched not in lines, TEMPLATE.splitlines()[untouched - 1]


def test_only_dependent_neighbours_are_swapped():
    swaps = {(m.line, m.next_line) for m in mutate.mutants_of("t.s", TEMPLATE) if m.operator == "swap"}
    assert (5, 6) in swaps          # the load and the flags or-ed into it
    assert (9, 10) in swaps         # the compare and the jump reading its flags
    assert (17, 18) not in swaps    # two loads into different registers: the same program


def test_every_mutant_of_the_templates_changes_one_line_or_swaps_two():
    mutants = mutate.all_mutants(mutate.ROOT / "templates")
    assert len(mutants) > 1000
    assert not [m for m in mutants if m.template == "bench.s"]
    for m in mutants[::37]:
        lines = (mutate.ROOT / "templates" / m.template).read_text().splitlines()
        changed = [i for i, (a, b) in enumerate(zip(lines, m.apply(lines))) if a != b]
        assert len(changed) == (2 if m.operator == "swap" else 1), m


@pytest.mark.vm
@needs_qemu
def test_a_run_tells_a_caught_bug_from_a_line_the_kernel_lacks(tmp_path):
    """i386: the INVLPG of pt_unmap left out must be caught by `kgen test`; a line of the x86_64 entry is not in
    the i386 kernel, so its mutant is equivalent and never run."""
    mutants = mutate.all_mutants(mutate.ROOT / "templates")
    caught = next(m for m in mutants if m.template == "paging.s" and m.operator == "omit"
                  and m.original.split("#")[0].split() == ["invlpg", "[xbx]"])
    absent = next(m for m in mutants if m.template == "x86_64/boot.s" and m.operator == "omit")
    report = tmp_path / "report.json"
    scratch = Path(mutate.tempfile.gettempdir())
    before = set(scratch.glob("kgen-mutants-*"))
    assert mutate.main(["--arch", "i386", "--only", caught.name, "--only", absent.name, "-j", "1",
                        "--report", str(report)]) == 0
    outcome = {r["mutant"]: r["outcome"] for r in json.loads(report.read_text())}
    assert outcome == {caught.name: "killed", absent.name: "equivalent"}
    assert set(scratch.glob("kgen-mutants-*")) == before, "the run's copy of the checkout was left behind"


@pytest.mark.parametrize("first,second,matters", [
    (("or", "xcx, PTE_P"), ("or", "xcx, xax"), False),                           # or-ing flags in: commutes
    (("mov", "dword ptr [xbx], MAGIC"), ("mov", "[xbx + 0x4], cl"), False),      # two fields of one record
    (("mov", "eax, [esi + 0x4]"), ("mov", "[edi], eax"), True),                  # a load, then its store
    (("mov", "[edi], eax"), ("mov", "[esi], ecx"), True),                        # two pointers that may alias
    (("mov", "[xbx], xcx"), ("invlpg", "[xdi]"), True),                          # the entry, then its flush
])
def test_a_swap_is_a_mutant_only_where_the_order_matters(first, second, matters):
    assert mutate.dependent(first, second) is matters
