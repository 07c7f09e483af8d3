"""`kgen test --kernel K --check-at SYMBOL`: the page-table checks at every hit of a symbol (kgen/harness/checkat.py),
through the real command line, on the zoo kernels of tests/zoo_checkat.py (three spaces switched at `switch_to`, a
flaw in space 2 between the 4th and the 7th switch only) and the C kernels of tests/zoo_c.py (processes found
through their DWARF), i386 and x86_64 under TCG. Each run selects the check-at test alone (`-k every_hit`): the rest
of the suite sees the kernel at rest.
"""
from __future__ import annotations

import json

import pytest

import zoo_c
import zoo_checkat
from conftest import needs_qemu, one_line, run_kgen
from zoo_checkat import FIRST_FLAWED_HIT, FIRST_FLAWED_HIT_IN_CR3, FLAWED_HITS, SPACES, SWITCHES, SYMBOL

pytestmark = [pytest.mark.vm, needs_qemu]
ARCHES = tuple(zoo_checkat.SOURCES)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    out = tmp_path_factory.mktemp("check-at")
    return {(arch, flaw): zoo_checkat.switcher(out, arch, flaw_at=zoo_checkat.FLAW_AT if flaw else 0)
            for arch in ARCHES for flaw in (False, True)}


def check_at(kernel, tmp_path, *args: str):
    """`kgen test` of the check-at test alone, its JSON report read back."""
    report = tmp_path / "report.json"
    result = run_kgen("test", "--kernel", kernel, "--check-at", SYMBOL, "-k", "every_hit", "-j", "1",
                      "--json", report, *args)
    assert report.is_file(), result.stdout[-3000:] + result.stderr
    return result, json.loads(report.read_text())


@pytest.mark.parametrize("arch", ARCHES)
def test_the_verdict_is_the_first_hit_the_flaw_is_there_in_the_space_it_is_in(zoo, tmp_path, arch):
    result, doc = check_at(zoo[arch, True], tmp_path, "--address-spaces", SPACES)
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr
    hits = doc["hits"]
    assert [hit["hit"] for hit in hits] == list(range(1, SWITCHES + 1)), "one record per hit, in order"
    assert {hit["symbol"] for hit in hits} == {SYMBOL}
    assert [hit["hit"] for hit in hits if hit["outcome"] == "failed"] == list(FLAWED_HITS)
    first = hits[FIRST_FLAWED_HIT - 1]
    broken = [space for space in first["spaces"] if space["findings"]]
    assert [(space["name"], space["live"]) for space in broken] == [(f"{SPACES}[2]", False)], \
        "the flaw is in space 2, not the one in CR3 at that hit: only --address-spaces shows it there"
    assert list(broken[0]["findings"]) == ["check_segments"]
    assert "<switch_to>" in first["where"] and "<main+" in first["callers"][0], first
    said = result.stdout
    assert f"the page tables broke at hit {FIRST_FLAWED_HIT} of {SWITCHES}" in said, said[-3000:]
    assert f"hit {FIRST_FLAWED_HIT} at {SYMBOL}: IP " in said and f"in {SPACES}[2] (top-level table" in said
    assert "writable" in said and "but no writable segment lies there" in said


def test_without_the_spaces_listed_the_first_hit_with_the_flaw_in_cr3_is_the_verdict(zoo, tmp_path):
    # --check-count ends the run at that very hit: nothing after it is checked.
    result, doc = check_at(zoo["i386", True], tmp_path, "--check-count", str(FIRST_FLAWED_HIT_IN_CR3))
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr
    assert len(doc["hits"]) == FIRST_FLAWED_HIT_IN_CR3
    failed = [hit for hit in doc["hits"] if hit["outcome"] == "failed"]
    assert [hit["hit"] for hit in failed] == [FIRST_FLAWED_HIT_IN_CR3]
    assert [(space["live"], bool(space["findings"])) for space in failed[0]["spaces"]] == [(True, True)]
    assert len({hit["cr3"] for hit in doc["hits"]}) == 3, "every distinct CR3 is a space checked"
    assert "ended: " + f"{FIRST_FLAWED_HIT_IN_CR3} hits (--check-count)" in result.stdout, result.stdout[-3000:]


@pytest.mark.parametrize("arch", ARCHES)
def test_the_kernel_without_the_flaw_passes_every_hit(zoo, tmp_path, arch):
    result, doc = check_at(zoo[arch, False], tmp_path, "--address-spaces", SPACES)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    assert [hit["outcome"] for hit in doc["hits"]] == ["passed"] * SWITCHES
    assert all(len(hit["spaces"]) == 3 for hit in doc["hits"])
    assert [check["outcome"] for check in doc["checks"]] == ["passed"]


@pytest.mark.parametrize("kind, arch", [("array", "i386"), ("list", "x86_64")])
def test_a_c_kernel_s_processes_are_checked_at_every_switch_named_by_their_dwarf(tmp_path, kind, arch):
    """tests/zoo_c.py: three processes (an array of structs with virtual pgdir pointers, or a list of tasks with
    physical cr3s), the third ("cat") given a user page on a kernel frame by the first switch into it."""
    expression = zoo_c.ARRAY_EXPRESSION if kind == "array" else zoo_c.LIST_EXPRESSION
    elf = zoo_c.c_kernel(tmp_path, kind, arch, flaw=True)
    result, doc = check_at(elf, tmp_path, "--address-spaces", expression)
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr
    first = next(hit for hit in doc["hits"] if hit["outcome"] == "failed")
    assert first["hit"] == len(zoo_c.NAMES) + 1, "the hit after the first switch into the third process"
    broken = [space["name"] for space in first["spaces"] if space["findings"]]
    assert len(broken) == 1 and broken[0].endswith(f'"{zoo_c.NAMES[zoo_c.FLAWED]}"'), first["spaces"]
    assert "<kmain+" in first["callers"][0], first["callers"]


@pytest.mark.parametrize("args, said", [
    (("--check-at", "no_such_symbol"), "no symbol 'no_such_symbol' for --check-at"),
    (("--check-at", f"{SYMBOL},"), "an empty symbol name"),
    (("--check-at", SYMBOL, "--check-count", "0"), "--check-count"),
    (("--check-at", SYMBOL, "--check-for", "-1"), "--check-for"),
    (("--check-count", "5"), "--check-count is for --check-at"),
])
def test_a_bad_check_at_is_one_line(zoo, args, said):
    result = run_kgen("test", "--kernel", zoo["i386", False], *args)
    assert result.returncode == 2, result.stdout + result.stderr
    assert said in one_line(result)


def test_a_bad_check_count_in_the_config_is_one_line_naming_its_key(zoo, tmp_path):
    config = tmp_path / "kgen.toml"
    config.write_text(f'[foreign]\nkernel = "{zoo["i386", False]}"\ncheck_at = "{SYMBOL}"\ncheck_count = 0\n')
    result = run_kgen("test", "--config", config)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "foreign.check_count" in one_line(result)


def test_check_at_is_for_a_kernel_given_with_kernel(tmp_path):
    result = run_kgen("test", "--out", tmp_path / "out", "--check-at", "as_switch")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "checked at every as_switch" in one_line(result)


def test_a_space_s_fingerprint_reads_its_tables_and_nothing_else():
    """ready.tables_fingerprint, what --check-at keys a space's verdict by: every table its entries lead to, once (a
    recursive slot is not read twice, a 4 MiB page is no table); with ignore_accessed blind to Accessed and Dirty
    only."""
    from types import SimpleNamespace

    from kgen.arch import hw
    from kgen.harness.ready import tables_fingerprint
    ram = bytearray(0x4000)

    def entry(table: int, index: int, value: int) -> None:
        ram[table + 4 * index:table + 4 * index + 4] = value.to_bytes(4, "little")

    entry(0x1000, 0, 0x2000 | hw.PTE_P | hw.PTE_RW)                         # PD[0] -> the PT at 0x2000
    entry(0x1000, 1, 0x400000 | hw.PTE_P | hw.PTE_PS)                       # PD[1]: a 4 MiB page
    entry(0x1000, 1023, 0x1000 | hw.PTE_P | hw.PTE_RW)                      # PD[1023]: the recursive slot
    entry(0x2000, 5, 0x3000 | hw.PTE_P)                                     # PT[5]: a page
    reads = []

    class Machine:
        def read_phys(self, addr, size):
            reads.append(addr)
            return bytes(ram[addr:addr + size])

    regs = SimpleNamespace(cr0=hw.CR0_PG, cr3=0x1000, cr4=hw.CR4_PSE, efer=0)
    before = tables_fingerprint(Machine(), regs, ignore_accessed=True)
    assert reads == [0x1000, 0x2000]
    entry(0x2000, 5, 0x3000 | hw.PTE_P | hw.PTE_A | hw.PTE_D)             # the CPU used the page
    assert tables_fingerprint(Machine(), regs, ignore_accessed=True) == before
    assert tables_fingerprint(Machine(), regs) != before
    entry(0x2000, 5, 0x3000 | hw.PTE_P | hw.PTE_RW)                         # the kernel made it writable
    assert tables_fingerprint(Machine(), regs, ignore_accessed=True) != before


def test_information_at_a_hit_is_shown_never_a_failure():
    """xv6's stack guard page (supervisor-only, below the user stack) is information: --check-at called hit 18 of
    xv6 a failure on it alone."""
    from kgen.guest.findings import Finding
    from kgen.guest.spacesource import Space
    from kgen.harness.checkat import SpaceVerdict
    guard = Finding("0x1000-0x2000 is a guard page: supervisor-only below the user page 0x2000", info=True)
    quiet = SpaceVerdict(Space("proc[0]", 0x1000), live=True,
                         problems={"check_nothing_below_kernel_base": [guard]})
    assert not quiet.failed
    loud = SpaceVerdict(Space("proc[0]", 0x1000), live=True,
                        problems={"check_nothing_below_kernel_base": [guard, "kernel page 0xc0000000 is writable"]})
    assert loud.failed
