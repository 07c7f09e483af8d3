"""Where `kgen inspect` puts what the checks found (issue 22): by the places a finding carries, never by the numbers
in its text; information apart from failures; a large page one row with its region; the space judged named. On one
booted kernel of tests/zoo_reports.py (a writable 4 MiB kernel page, a user page at 0, a frame mapped twice)."""
from __future__ import annotations

import copy
from html.parser import HTMLParser

import pytest

import zoo_reports
from conftest import needs_qemu
from kgen.guest import invariants
from kgen.guest.findings import Finding
from kgen.harness.kernel import KernelUnderTest
from kgen.harness.live import boot
from kgen.inspect.html import render_html
from kgen.inspect.model import attach_problems, collect, run_invariants
from kgen.inspect.text import render_text

pytestmark = [pytest.mark.vm, needs_qemu]
KBASE = zoo_reports.KBASE
LARGE = 4 << 20


def h(text: str) -> int:
    return int(text, 16)


@pytest.fixture(scope="module")
def large(tmp_path_factory):
    """(document, the stopped view, the ELF's `pd` physical address) of the large-page kernel."""
    elf = zoo_reports.large_page_kernel(tmp_path_factory.mktemp("reports"))
    kernel = KernelUnderTest.foreign(elf, zoo_reports.LARGE_PAGE_READY)
    with boot(kernel, "tcg") as live:
        doc = collect(live)
        yield doc, live.view(), kernel.elf.symbols["pd"].value - KBASE


def range_at(doc: dict, vaddr: int) -> dict:
    (found,) = [v for v in doc["virtual"] if h(v["start"]) <= vaddr < h(v["end"])]
    return found


def test_a_finding_is_attached_by_its_range_not_by_the_numbers_in_its_text(large):
    doc, view, _ = large
    segments = {i["name"]: i for i in doc["invariants"]}["check_segments"]
    assert segments["outcome"] == "failed"
    # The text and rodata pages writable through the one 4 MiB entry: one finding, not one per 4 KiB page.
    (finding,) = segments["findings"]
    idt_init = view.elf.symbols["idt_init"].value
    text = finding["text"]
    assert f"<idt_init+{zoo_reports.IDT_INIT_OFFSET:#x}>" in text and f"4 MiB page at {KBASE:#x}" in text, text
    assert "writable" in text and not finding["info"]
    # Its range: the pages of the read-only segments (text, rodata), all inside that 4 MiB page.
    read_only = [page for seg in view.elf.segments if seg.memsz and seg.vaddr >= KBASE and not seg.writable
                 for page in range(seg.vaddr & ~0xFFF, seg.vaddr + seg.memsz, 0x1000)]
    assert len(read_only) == 4 and idt_init + zoo_reports.IDT_INIT_OFFSET in read_only
    assert [h(a) for a in finding["vrange"]] == [min(read_only), max(read_only) + 0x1000], finding
    # Attached to the 4 MiB range it concerns only: 0x208 (the symbol offset) lies in the user page at 0, but that
    # number places nothing.
    assert range_at(doc, KBASE)["problems"] == [text]
    user = range_at(doc, 0)
    assert user["user"] and user["problems"] == user["info"] == []
    assert all(not v["problems"] for v in doc["virtual"] if h(v["start"]) != KBASE), doc["virtual"]
    # A finding quoting the kernel base and a symbol offset lands on the range it carries, and nowhere else; one
    # that carries no range, or belongs to another space, lands nowhere.
    ranges = copy.deepcopy(doc["virtual"])
    quoting = f"below the kernel base {KBASE:#x}, first page {idt_init:#x} <idt_init+0x208>"
    twice = zoo_reports.TWICE_VADDR
    attach_problems(ranges, [Finding(quoting, vrange=(twice, twice + 0x1000)), quoting,
                             Finding(quoting + " (other)", vrange=(0, 0x1000), space="space 0x1a3000")])
    assert {v["start"]: v["problems"] for v in ranges if v["problems"]} == {
        hex(KBASE): [text], hex(twice): [quoting]}


def test_a_large_page_is_one_row_with_its_region(large):
    doc, view, _ = large
    big = range_at(doc, KBASE)
    assert (h(big["start"]), h(big["end"]), big["pages"], big["page_size"]) == (KBASE, KBASE + LARGE, 1, LARGE)
    # Named by the segments it holds (no region holds the whole of it: the ELF starts at 1 MiB inside).
    assert big["region"] is not None and big["region"].startswith(".text (r-x) + "), big["region"]
    rows = [line for line in render_text(doc).split("Virtual address space", 1)[1].splitlines()
            if line.split()[:1] == [hex(KBASE)]]
    assert len(rows) == 1 and rows[0].split()[3] == "4M" and rows[0].endswith(big["region"]), rows


def test_a_finding_about_a_frame_is_attached_to_that_frame_only(large):
    doc, view, _ = large
    tpt = view.elf.symbols["tpt"].value - KBASE
    twice = zoo_reports.TWICE_VADDR
    referenced = {i["name"]: i for i in doc["invariants"]}["check_tables_referenced_once"]
    assert referenced["outcome"] == "failed"
    (finding,) = referenced["findings"]
    # Its text names the two virtual addresses the table serves; it is about the table's frame.
    assert f"(for {twice:#010x})" in finding["text"] and f"(for {twice + (4 << 20):#010x})" in finding["text"]
    assert finding["frames"] == [hex(tpt)] and finding["vrange"] is None
    (run,) = [r for r in doc["physical"] if h(r["start"]) <= tpt < h(r["end"])]
    assert run["role"] == "page table (PT)" and run["problems"] == [finding["text"]]
    assert [r for r in doc["physical"] if r["problems"]] == [run]
    assert not any(finding["text"] in v["problems"] for v in doc["virtual"])


def test_a_frame_mapped_twice_is_information_not_a_failure(large):
    doc, _, _ = large
    (run,) = [r for r in doc["physical"] if h(r["start"]) <= zoo_reports.TWICE_FRAME < h(r["end"])]
    assert run["role"] == "mapped twice"
    # No invariant fails on it: the writable kernel text and the table reached twice do.
    assert [i["name"] for i in doc["invariants"] if i["outcome"] == "failed"] == [
        "check_segments", "check_tables_referenced_once"]
    # Text: the information colour (blue), not the failure colour.
    (line,) = [line for line in render_text(doc, colour=True).splitlines() if "mapped twice" in line]
    assert line.startswith("\x1b[34m") and "\x1b[31m" not in line, repr(line)
    # HTML: outlined as information, with its legend entry; only the failing range outlined as a failure.
    page = render_html(doc)
    classes = _segment_classes(page)
    index = doc["physical"].index(run)
    assert "info" in classes[f"p{index}"] and "problem" not in classes[f"p{index}"]
    failing = {key for key, cls in classes.items() if "problem" in cls}
    tables = [i for i, r in enumerate(doc["physical"]) if r["problems"]]
    assert failing == {f"v{doc['virtual'].index(range_at(doc, KBASE))}"} | {f"p{i}" for i in tables}, failing
    assert "information, not a failure" in page and "an invariant fails here" in page


def test_information_found_by_a_check_fails_nothing_and_is_drawn_apart(large, monkeypatch):
    doc, view, _ = large
    guard = Finding("0x00000000-0x00001000 is a guard page", vrange=(0, 0x1000), info=True)

    def check_guard_pages(view):
        return [guard]
    monkeypatch.setattr(invariants, "GENERIC_CHECKS", (check_guard_pages,))
    results, found = run_invariants(view)
    assert results == [{"name": "check_guard_pages", "outcome": "passed", "messages": [str(guard)], "findings": [
        {"text": str(guard), "info": True, "vrange": ["0x0", "0x1000"], "frames": [], "chain": [], "space": None}]}]
    ranges = copy.deepcopy(doc["virtual"])
    attach_problems(ranges, found)
    user = next(v for v in ranges if v["start"] == "0x0")
    assert user["info"] == [str(guard)] and user["problems"] == []
    shown = {**doc, "virtual": ranges, "invariants": results}
    text = render_text(shown, colour=True).splitlines()
    row = text.index(next(line for line in text if line.startswith("\x1b[34m  0x0 ")))
    assert text[row + 1] == f"\x1b[34m      i {guard}\x1b[0m", text[row:row + 2]
    assert f"\x1b[34m          note: {guard}\x1b[0m" in text
    classes = _segment_classes(render_html(shown))
    assert "info" in classes[f"v{ranges.index(user)}"] and "problem" not in classes[f"v{ranges.index(user)}"]


def test_the_space_judged_is_named(large):
    doc, view, pd = large
    assert h(doc["space"]["top"]) == pd == view.regs.cr3 & view.mode.cr3_mask
    header = render_text(doc).splitlines()[:6]
    assert f"space:     the one in CR3 (PD at {pd:#x})" in header, header
    assert f"top-level table at <code>{pd:#x}</code>" in render_html(doc)


def _segment_classes(page: str) -> dict[str, list[str]]:
    """data-key -> class list of every drawn segment (rect) of the page."""
    found: dict[str, list[str]] = {}

    class Parser(HTMLParser):
        def handle_starttag(self, tag, attrs):
            a = dict(attrs)
            if tag == "rect" and "data-key" in a:
                found[a["data-key"]] = a.get("class", "").split()
    Parser().feed(page)
    return found
