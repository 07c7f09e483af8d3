"""`kgen test --json FILE`: the suite's results as one JSON document, for CI.

Built from pytest's own reports (the plugin registers `JsonReport` on the process that runs the session; under
pytest-xdist the workers' reports reach it too), never by reading the text pytest prints:

    {"kgen_test": 1,
     "kernel": {"elf": "/abs/kernel.elf", "kind": "kgen"|"foreign", "arch": "i386"|"x86_64"},
     "accel": "tcg"|"kvm",
     "checks": [{"name": "test_nothing_is_mapped_below_the_kernel_base[spaces[1]]", "module": "test_invariants",
                 "outcome": "passed"|"failed"|"skipped"|"error", "messages": ["..."], "duration": 0.01,
                 "spaces": ["spaces[1]: PD at 0x106000 (the space in CR3)"]|null, "kgen_only": false}],
     "summary": {"passed": 8, "failed": 1, "skipped": 17, "error": 0, "total": 26, "kgen_only": 16},
     "spaces": ["the space in CR3: PD at 0x106000 (spaces[1])", "spaces[0]: PD at 0x104000", ...],
     "boot_failure": null | {"kind": "fault loop"|"triple fault"|"reset"|"hang"|..., "summary": "...",
                             "findings": ["..."]},
     "hits": [{"hit": 5, "symbol": "switch_to", "ip": 1048832, "where": "0x00100100 <switch_to>", "cr3": 1060864,
               "seconds": 0.0021,
               "callers": ["0x00100080 <main+0x1c>"], "outcome": "passed"|"failed"|"unchecked", "unchecked": null,
               "unread": [],
               "spaces": [{"name": "spaces[2]", "top": 1069056, "live": false,
                           "findings": {"check_segments": ["..."]}}]}]}

One object per check (per test, and per address space for the checks `--address-spaces` repeats). `messages` are
the lines of a failure as kgen words them (one per entry or page at fault; the first names the invariant), or the
reason of a skip; an `error` is a failure outside the check itself (its fixture: the kernel could not be booted).
A check's `spaces` are the address spaces it judged (the slot it was given, or the kernel's own space and the live
one, or the one in CR3, named by the slot of --address-spaces or kgen's `as_spaces` that holds it; null for a check
of no stopped machine), and the document's `spaces` every space the run judged. `kgen_only` marks a check skipped because it needs a kernel kgen built (its layout, its
call channel): `kgen test` prints those as one line, here each keeps its record.
A kernel that never reaches the state the checks look at is reported before the suite: no checks, and
`boot_failure` says what it did instead; its `findings`, what else the failure showed (the kernel boots with zeroed
RAM only: it reads memory it never wrote). `hits`: with --check-at (kgen/harness/checkat.py), one record per hit in
the order they came, each space checked there and what each check found in it (by the check's name in
kgen/guest/invariants.py; only the checks that found something), `unchecked` why nothing was (paging off),
`unread` the spaces the kernel's list named but that could not be followed at that hit, `seconds` what judging it
took; kgen's own kernel adds its as_switch stage's hits; empty otherwise.
"""
from __future__ import annotations

import contextlib
import json
import shutil
import sys
from pathlib import Path

from kgen.arch import Arch
from kgen.errors import KgenError
from kgen.guest.elfinfo import ElfInfo
from kgen.scratch import scratch_dir
from kgen.harness.outputs import check_report_path, write_report

FORMAT_VERSION = 1
FAILED_PREFIX = "Failed: "
SKIPPED_PREFIX = "Skipped: "


def kernel_record(elf_path: Path | None, kind: str, arch: str | None) -> dict:
    return {"elf": str(elf_path) if elf_path is not None else None, "kind": kind, "arch": arch}


def foreign_kernel_record(elf_path: Path) -> dict:
    """A foreign ELF's arch is the one its code runs in, the QEMU it boots in (`Arch.for_elf`)."""
    try:
        arch = Arch.for_elf(ElfInfo.load(elf_path)).name
    except Exception:  # noqa: BLE001 - an unreadable ELF is reported elsewhere; the record just says unknown
        arch = None
    return kernel_record(Path(elf_path).resolve(), "foreign", arch)


# The name under which a test hands its hits to this report (pytest's `user_properties` of its report).
HITS_PROPERTY = "kgen_hits"


def document(kernel: dict, accel: str, checks: list[dict], boot_failure: dict | None = None,
             hits: list[dict] | None = None) -> dict:
    summary = {outcome: sum(c["outcome"] == outcome for c in checks)
               for outcome in ("passed", "failed", "skipped", "error")}
    summary["total"] = len(checks)
    summary["kgen_only"] = sum(bool(c.get("kgen_only")) for c in checks)
    return {"kgen_test": FORMAT_VERSION, "kernel": kernel, "accel": accel, "checks": checks, "summary": summary,
            "spaces": distinct_spaces(c.get("spaces") for c in checks), "boot_failure": boot_failure,
            "hits": hits or []}


def distinct_spaces(spaces) -> list[str]:
    """The spaces checks judged (a list per check, or None), each once: the one in CR3 first, then the others in
    the order met."""
    seen = [space for space in dict.fromkeys(name for names in spaces if names for name in names) if space]
    return sorted(seen, key=lambda space: not space.startswith("the space in CR3"))


def write(path: Path, doc: dict) -> None:
    write_report(Path(path), json.dumps(doc, indent=2) + "\n")


def _messages(report) -> list[str]:
    longrepr = report.longrepr
    if longrepr is None:
        return []
    if isinstance(longrepr, tuple):         # a skip: (path, line, "Skipped: reason")
        text = str(longrepr[2])
        text = text[len(SKIPPED_PREFIX):] if text.startswith(SKIPPED_PREFIX) else text
    else:
        crash = getattr(longrepr, "reprcrash", None)
        text = crash.message if crash is not None else str(longrepr)
        text = text[len(FAILED_PREFIX):] if text.startswith(FAILED_PREFIX) else text
    return [line.strip() for line in text.splitlines() if line.strip()]


class JsonReport:
    """Collects one record per test from pytest's reports; writes the document when the session ends."""

    def __init__(self, path: Path, kernel, accel: str):
        self.path = Path(path)
        self.kernel = kernel            # a dict, or a callable giving one at the end (a kgen kernel is built late)
        self.accel = accel
        self.checks: dict[str, dict] = {}
        self.hits: list[dict] = []

    def pytest_runtest_logreport(self, report) -> None:
        for name, value in getattr(report, "user_properties", ()) if report.when == "call" else ():
            if name == HITS_PROPERTY:
                self.hits += value
        module, _, name = report.nodeid.rpartition("::")
        record = self.checks.setdefault(report.nodeid, {
            "name": name, "module": Path(module).stem, "outcome": "passed", "messages": [], "duration": 0.0,
            "spaces": None, "kgen_only": False})
        record["duration"] = round(record["duration"] + (report.duration or 0.0), 4)
        record["spaces"] = record["spaces"] or getattr(report, "kgen_spaces", None)
        record["kgen_only"] = record["kgen_only"] or bool(getattr(report, "kgen_only", False))
        if report.passed:
            return
        if report.skipped:
            if record["outcome"] == "passed":
                record["outcome"] = "skipped"
                record["messages"] = _messages(report)
            return
        # failed: in the test's call a failed check; in its setup or teardown (a fixture) an error
        outcome = "failed" if report.when == "call" else "error"
        if record["outcome"] in ("passed", "skipped"):
            record["outcome"], record["messages"] = outcome, _messages(report)
        else:
            record["messages"] += _messages(report)

    def pytest_sessionfinish(self, session, exitstatus) -> None:
        kernel = self.kernel() if callable(self.kernel) else self.kernel
        checks = [self.checks[nodeid] for nodeid in sorted(self.checks)]
        write(self.path, document(kernel, self.accel, checks, hits=self.hits))


def run_suite_json(args, extra: list[str], run_suite) -> int:
    """`kgen test --json FILE` (`-`: the document on stdout, everything pytest prints on stderr): `run_suite` with
    the plugin's reporter on. A foreign kernel that never boots to the state the checks look at still gets a
    document: no checks, and `boot_failure` saying what it did instead."""
    to_stdout = args.json == "-"
    scratch = None
    if to_stdout:
        scratch = scratch_dir("json")
        args.json_path = scratch / "report.json"
    else:
        args.json_path = Path(args.json)
        check_report_path("--json", args.json_path)
    try:
        with contextlib.redirect_stdout(sys.stderr) if to_stdout else contextlib.nullcontext():
            try:
                return run_suite(args, extra)
            except KgenError as err:
                failure = getattr(err, "failure", None)
                if failure is None or args.kernel is None:
                    raise
                write(args.json_path, document(foreign_kernel_record(args.kernel), args.accel, [],
                                               {"kind": failure.kind, "summary": failure.summary,
                                                "findings": [str(f) for f in failure.findings]}))
                raise
    finally:
        if to_stdout:
            if args.json_path.is_file():
                sys.stdout.write(args.json_path.read_text())
                sys.stdout.flush()
            shutil.rmtree(scratch, ignore_errors=True)
