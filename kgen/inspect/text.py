"""The document of `kgen inspect` (kgen/inspect/model.py) as text for a terminal: a header, the virtual address
space, physical memory and the invariants; with --va, the header and the translation only.

Colour (ANSI) only when asked: `kgen inspect` asks when stdout is a terminal and NO_COLOR is unset. Without colour
the marks say the same: `!` before a failure attached to a range, `i` before information (a frame mapped twice, a
guard page), which fails nothing."""
from __future__ import annotations

import os
import sys

from kgen.inspect.model import INFO_ROLES

_CODES = {"bold": "1", "red": "31", "green": "32", "yellow": "33", "dim": "2", "cyan": "36", "blue": "34"}
FAILURE, INFO = "red", "blue"       # a range an invariant fails on; information that fails nothing


def use_colour(stream=None) -> bool:
    stream = stream or sys.stdout
    return "NO_COLOR" not in os.environ and hasattr(stream, "isatty") and stream.isatty()


class _Paint:
    def __init__(self, on: bool):
        self.on = on

    def __call__(self, text: str, style: str) -> str:
        return f"\x1b[{_CODES[style]}m{text}\x1b[0m" if self.on and text else text


def render_text(doc: dict, colour: bool = False) -> str:
    paint = _Paint(colour)
    out = header(doc, paint)
    if doc.get("translation") is not None:
        out += [""] + translation(doc["translation"], paint)
    else:
        out += ([""] + regions(doc, paint) + [""] + virtual(doc, paint) + [""] + physical(doc, paint) + [""]
                + invariants(doc, paint))
    return "\n".join(out) + "\n"


def header(doc: dict, paint) -> list[str]:
    k, s, r, p = doc["kernel"], doc["stopped"], doc["registers"], doc["paging"]
    where = s["ip"] + (f" <{s['symbol']}>" if s["symbol"] else "")
    slots = ", ".join(f"{_top(p)}[{x['slot']}] at {x['base']}" + (f" ({x['role']})" if x["role"] else "")
                      for x in p["recursive_slots"])
    paging = (f"{p['mode']}, {p['levels']} levels, {p['va_bits']}-bit addresses"
              + (f"; slots: {slots}" if slots else "; no recursive slot")) if p["enabled"] else "off"
    return [paint(f"kgen inspect: {k['elf']} ({k['arch']}, {k['kind']} kernel, {k['accel']})", "bold"),
            f"stopped:   {s['how']}, at {where}",
            f"registers: CR0={r['cr0']} CR3={r['cr3']} CR4={r['cr4']} EFER={r['efer']} CS={r['cs']} CPL={r['cpl']}",
            f"paging:    {paging}",
            f"space:     {space_text(doc)}"]


def space_text(doc: dict) -> str:
    """The address space drawn and judged: "the one in CR3 (PD at 0x105000), the boot space"."""
    space = doc.get("space") or {"top": doc["registers"]["cr3"], "name": None}
    top = _top(doc["paging"]) if doc["paging"]["enabled"] else "top-level table"
    return f"the one in CR3 ({top} at {space['top']})" + (f", {space['name']}" if space.get("name") else "")


def _top(paging: dict) -> str:
    return {2: "PD", 3: "PDPT", 4: "PML4"}[paging["levels"]]


def _table(rows: list[list[str]], right: set[int] = frozenset()) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  " + "  ".join(cell.rjust(w) if i in right else cell.ljust(w) for i, (cell, w) in
                             enumerate(zip(row, widths))).rstrip() for row in rows]


def regions(doc: dict, paint) -> list[str]:
    """The layout's regions (a kgen kernel), with how many of their pages are mapped: the empty windows too."""
    chosen = [r for r in doc["regions"] if r["source"] == "layout"]
    if not chosen:
        return [paint("Regions", "bold") + ": the ELF's segments and symbols (see the ranges below)"]
    rows = [["start", "end", "mapped", "region"]]
    for r in chosen:
        lo, hi = int(r["start"], 16), int(r["end"], 16)
        mapped = sum(_pages_within(v, lo, hi) for v in doc["virtual"])
        rows.append([r["start"], r["end"], f"{mapped} pages", r["name"]])
    body = _table(rows, right={2})
    return [paint("Regions (the layout)", "bold"), paint(body[0], "dim")] + body[1:]


def _pages_within(v: dict, lo: int, hi: int) -> int:
    """4 KiB pages of range `v` inside [lo, hi): a range wholly inside counts its mapped pages (the recursive
    window's are its tables), one that crosses the region's edge the pages of the overlap."""
    start, end = int(v["start"], 16), int(v["end"], 16)
    if lo <= start and end <= hi:
        return v["pages"] * v["page_size"] // 4096
    return max(0, min(hi, end) - max(lo, start)) // 4096


def virtual(doc: dict, paint) -> list[str]:
    lines = [paint("Virtual address space", "bold")]
    if not doc["virtual"]:
        return lines + ["  nothing mapped" if doc["paging"]["enabled"] else "  paging is off"]
    rows = [["start", "end", "pages", "size", "flags", "user", "global", "phys", "region"]]
    for v in doc["virtual"]:
        size = {4096: "4K", 2 << 20: "2M", 4 << 20: "4M", 1 << 30: "1G"}.get(v["page_size"], str(v["page_size"]))
        phys = v["phys"] + ("" if v["phys_contiguous"] else "..")
        rows.append([v["start"], v["end"], str(v["pages"]), size, v["flags"], "user" if v["user"] else "-",
                     "G" if v["global"] else "-", phys, v["region"] or "-"])
    body = _table(rows, right={2})
    lines.append(paint(body[0], "dim"))
    for v, line in zip(doc["virtual"], body[1:]):
        lines += _marked(line, v, paint)
    lines.append(paint("  (phys ending in '..': the range is not physically contiguous; ! an invariant fails on the "
                       "range, i information, not a failure)", "dim"))
    return lines


def _marked(line: str, row: dict, paint, info_role: bool = False) -> list[str]:
    """A row of the virtual or physical table in the colour of what is attached to it, then those findings."""
    problems, info = row.get("problems") or [], row.get("info") or []
    colour = FAILURE if problems else INFO if info or info_role else None
    return ([paint(line, colour) if colour else line] + [paint(f"      ! {m}", FAILURE) for m in problems]
            + [paint(f"      i {m}", INFO) for m in info])


def physical(doc: dict, paint) -> list[str]:
    lines = [paint(f"Physical memory ({doc['ram']['bytes'] >> 20} MiB of RAM)", "bold")]
    rows = [["start", "end", "frames", "role", "detail"]]
    rows += [[r["start"], r["end"], str(r["frames"]), r["role"], r["detail"] or ""] for r in doc["physical"]]
    body = _table(rows, right={2})
    lines.append(paint(body[0], "dim"))
    for r, line in zip(doc["physical"], body[1:]):
        lines += _marked(line, r, paint, info_role=r["role"] in INFO_ROLES)
    return lines


def invariants(doc: dict, paint) -> list[str]:
    results = doc["invariants"]
    counts = {o: sum(1 for r in results if r["outcome"] == o) for o in ("passed", "failed", "skipped")}
    lines = [paint("Invariants", "bold") + f": {counts['passed']} passed, {counts['failed']} failed, "
             f"{counts['skipped']} skipped"]
    colours = {"passed": "green", "failed": "red", "skipped": "yellow"}
    for r in results:
        lines.append(f"  {paint(r['outcome'].upper().ljust(7), colours[r['outcome']])} {r['name']}")
        findings = r.get("findings") or [{"text": m, "info": False} for m in r["messages"]]
        if r["outcome"] == "skipped":
            lines += [f"          {m}" for m in r["messages"]]
            continue
        for f in findings:      # information (a guard page) as notes under any check; failures under a failed one
            if f["info"]:
                lines.append(paint(f"          note: {f['text']}", INFO))
            elif r["outcome"] != "passed":
                lines.append(f"          {f['text']}")
    return lines


def translation(t: dict, paint) -> list[str]:
    lines = [paint(f"Translation of {t['va']}", "bold")]
    if t["steps"]:
        rows = [["level", "entry", "at physical", "at virtual (recursive)", "value", "decoded", "next"]]
        rows += [[str(s["level"]), f"{s['table']}[{s['index']}]", s["entry_phys"], s["entry_virt"] or "-",
                  s["entry"], s["flags"], s["next"] or "-"] for s in t["steps"]]
        body = _table(rows)
        lines.append(paint(body[0], "dim"))
        for s, line in zip(t["steps"], body[1:]):
            lines.append(line)
            if s["note"]:
                lines.append(paint(f"      {s['note']}", "red" if s["next"] is None else "cyan"))
    for text in t["explanation"]:
        bad = ": faults:" in text or text.startswith("any access faults")
        lines.append(paint("  " + text, "red") if bad else "  " + text)
    return lines
