"""`kgen inspect` on a kernel whose live tables hold two malformed PD entries (tests/zoo_walk.py WALK64): the map is
drawn from the rest of the tables (the image's ranges, its frames, the tables by level, a scale), the entries are
the findings of one check, and `--va` below one says why the CPU faults there."""
import json

import pytest

import zoo_walk
from conftest import needs_qemu, run_kgen

pytestmark = [pytest.mark.vm, needs_qemu]


def h(text: str) -> int:
    return int(text, 16)


def test_the_rest_of_the_tables_is_drawn_and_the_malformed_entries_are_one_checks_findings(tmp_path):
    elf = zoo_walk.walk64(tmp_path)
    page = tmp_path / "walk64.html"
    bad = zoo_walk.WALK64_BAD_SLOTS[0] << 21 | 0x123
    result = run_kgen("inspect", "--kernel", elf, "--ready", zoo_walk.WALK64_READY.strip(), "--json", "--va",
                      f"{bad:#x}", "--html", page)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    doc = json.loads(result.stdout)
    # The image's pages (text, rodata, data and bss, tables, stack) are mapped ranges, each where its segment says.
    image = [(h(v["start"]), h(v["end"])) for v in doc["virtual"] if h(v["start"]) < 1 << 47]
    assert image and image[0][0] == 0x100000 and all(v["start"] == v["phys"] for v in doc["virtual"][:len(image)])
    roles = {run["role"] for run in doc["physical"]}
    assert {"kernel image", "page table (PML4)", "page table (PDPT)", "page table (PD)", "page table (PT)"} <= roles
    # Nothing mapped below the two entries.
    for index in zoo_walk.WALK64_BAD_SLOTS:
        assert not [v for v in doc["virtual"] if h(v["start"]) < (index + 1) << 21 and index << 21 < h(v["end"])]
    outcome = {inv["name"]: inv for inv in doc["invariants"]}
    assert [m.split(" = ")[0].split(" → ")[-1] for m in outcome["check_entries_well_formed"]["messages"]] == [
        f"PD[{i}] @ {0x105000 + 8 * i:#x}" for i in zoo_walk.WALK64_BAD_SLOTS]
    assert {name for name, inv in outcome.items() if inv["outcome"] == "failed"} == {"check_entries_well_formed"}
    assert outcome["check_segments"]["outcome"] == "passed"
    assert "cannot be walked" not in result.stdout
    fault = doc["translation"]["fault"]
    assert fault.startswith("malformed entry at level 2 (PD): PD[5] @ 0x105028") and "error code RSVD" in fault
    assert "virtual: 1 px = -" not in page.read_text()
