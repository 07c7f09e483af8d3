"""`kgen inspect --html FILE` and `kgen bench --html FILE`: one self-contained page (inline CSS, JS and SVG, a
Content-Security-Policy that forbids every network load) drawn from the inspect document (docs/inspect.md).

Why the geometry is computed here and not in the browser: addresses are 64-bit and JavaScript numbers lose
precision above 2**53, so every position is worked out with Python ints and the page only receives pixels and
hex strings.

The scale, in one sentence the page repeats: occupied memory is drawn to scale, empty memory is folded. In each
column (virtual, physical) every mapped range (every frame with a role) gets a height proportional to its size
(`px_per_byte`, the same for the whole column; a range that would be thinner than `MIN_PX` is drawn `MIN_PX`
tall; a range that maps fewer pages than it spans, a recursive window whose pages are the page tables, stands for
the pages it maps), and every empty stretch -- unmapped addresses, frames never allocated or unreferenced
(`FOLDED_ROLES`), holes that are not RAM -- is folded to `FOLD_PX` whatever its size, with the size written on it.
Region edges cut the empty stretches, so every region of the layout, even an empty one, has a place of its own.
"""
from __future__ import annotations

from dataclasses import dataclass
from math import log2
from pathlib import Path

import jinja2

from kgen.arch import ARCHES
from kgen.arch.hw import EFER_NXE
from kgen.inspect.model import INFO_ROLES

TEMPLATES = Path(__file__).with_name("templates")

FOLD_PX = 20          # height of an empty stretch, whatever its size
MIN_PX = 3            # the least height of an occupied range
OCCUPIED_PX = 600     # what the occupied ranges of one column add up to (before MIN_PX)
CHAR_PX = 6.5         # width of one character of the labels (10.5 px monospace), for the SVG's width
BAR_X, BAR_W = 168, 84             # the column's bar; addresses to its left, names to its right
LABEL_GAP = 13        # least vertical distance between two labels
TOP = 24              # room above the first segment

# Physical roles that are empty memory: folded like unmapped virtual addresses.
FOLDED_ROLES = frozenset({"never allocated", "not RAM", "unreferenced"})
ROLE_COLOURS = {
    "kernel image": "#4e79a7", "boot tables": "#9c755f", "page table (PT)": "#59a14f",
    "page table (PD)": "#8cd17d", "page table (PDPT)": "#b6992d", "page table (PML4)": "#f1ce63",
    "temp-mapped": "#e15759", "free (on the stack)": "#bab0ac", "free (in the bitmap)": "#bab0ac",
    "pmm bitmap": "#edc948", "heap": "#f28e2b", "user page": "#b07aa1",
    "mapped twice": "#ff0000", "mapped": "#76b7b2", "reserved": "#888888", "allocated, unmapped": "#ff9da7",
}
REGION_COLOURS = ("#4e79a7", "#f28e2b", "#59a14f", "#b07aa1", "#9c755f", "#e15759", "#76b7b2", "#edc948",
                  "#ff9da7", "#bab0ac")


def _int(text: str | int | None) -> int | None:
    if text is None:
        return None
    return text if isinstance(text, int) else int(text, 16)


def human_size(n: int) -> str:
    """1 GiB, 4 KiB, 1.5 MiB: the size written on a fold or beside a range."""
    for unit, shift in (("EiB", 60), ("PiB", 50), ("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            value = n / (1 << shift)
            return f"{value:.0f} {unit}" if value == int(value) or value >= 100 else f"{value:.1f} {unit}"
    return f"{n} B"


@dataclass
class Segment:
    """One drawn stretch of a column: a listed range (index into the document's list) or an unlisted gap."""
    start: int                  # column coordinates: a physical address, or a virtual one masked to va_bits
    end: int
    folded: bool
    index: int | None = None
    mapped: int | None = None   # bytes it maps when fewer than its extent (a recursive window: the tables it shows)
    y: float = 0.0
    h: float = 0.0

    @property
    def size(self) -> int:
        return self.end - self.start

    @property
    def weight(self) -> int:
        """The bytes its height stands for."""
        return self.size if self.mapped is None else self.mapped


class Column:
    """The folded scale of one column: occupied ranges to scale, empty stretches folded (module docstring)."""

    def __init__(self, pieces: list[Segment], lo: int, hi: int, cuts: set[int]):
        pieces = sorted(pieces, key=lambda s: s.start)
        cuts = sorted(c for c in cuts if lo < c < hi)
        segments: list[Segment] = []
        at = lo

        def gap(a: int, b: int):
            edges = [a, *(c for c in cuts if a < c < b), b]
            segments.extend(Segment(x, y, True) for x, y in zip(edges, edges[1:]))

        for piece in pieces:
            if piece.start > at:
                gap(at, piece.start)
            segments.append(piece)
            at = max(at, piece.end)
        if at < hi:
            gap(at, hi)
        occupied = sum(s.weight for s in segments if not s.folded)
        self.px_per_byte = OCCUPIED_PX / occupied if occupied else 0.0
        y = TOP
        for s in segments:
            s.y = y
            s.h = FOLD_PX if s.folded else max(MIN_PX, s.weight * self.px_per_byte)
            y += s.h
        self.segments = segments
        self.height = y

    def y_of(self, addr: int) -> float:
        """Where an address falls: linear inside its segment (folded ones too), so the map is monotonic."""
        for s in self.segments:
            if s.start <= addr < s.end:
                return s.y + s.h * (addr - s.start) / s.size
        return self.segments[-1].y + self.segments[-1].h if addr >= self.segments[-1].end else TOP

    def bytes_per_px_text(self) -> str:
        return human_size(round(1 / self.px_per_byte)) if self.px_per_byte else "-"


def spread(wanted: list[float], gap: float = LABEL_GAP) -> list[float]:
    """Label positions as close to `wanted` (sorted) as possible, at least `gap` apart."""
    placed: list[float] = []
    for y in wanted:
        placed.append(max(y, placed[-1] + gap) if placed else y)
    return placed


class Geometry:
    """Everything the template draws, computed from the document with Python ints."""

    def __init__(self, doc: dict):
        self.doc = doc
        paging = doc.get("paging") or {}
        arch = ARCHES.get(doc["kernel"]["arch"])
        self.va_bits = paging.get("va_bits") or (arch.va_bits if arch is not None else 32)
        self.va_mask = (1 << self.va_bits) - 1
        self.half = 1 << (self.va_bits - 1) if self.va_bits > 32 else None   # the canonical hole sits here
        efer = _int((doc.get("registers") or {}).get("efer")) or 0
        self.has_nx = bool(efer & EFER_NXE)   # off: no page is execute-disable
        self.virtual = self._virtual_column()
        self.physical = self._physical_column()
        self.details: dict[str, dict] = {}
        self.vsegs = [self._vseg(s) for s in self.virtual.segments]
        self.psegs = [self._pseg(s) for s in self.physical.segments]
        self.regions = self._regions()
        self.vaddr_labels = self._address_labels(self.virtual, self.canonical)
        self.paddr_labels = self._address_labels(self.physical, lambda a: a)
        self.role_labels = self._role_labels()
        self.marker = self._translation_marker()
        self.hole_y = self.virtual.y_of(self.half) if self.half else None
        self.vwidth = round(max([BAR_X + BAR_W + 200] + [r["tx"] + CHAR_PX * len(f"{r['name']} ({r['size']})")
                                                          for r in self.regions]) + 10)
        self.pwidth = round(max([BAR_X + BAR_W + 200] + [BAR_X + BAR_W + 14 + CHAR_PX * len(r["text"])
                                                          for r in self.role_labels]) + 10)
        self.height = max(self.virtual.height, self.physical.height,
                          *(label["y"] for label in self.regions + self.role_labels), 0) + 30

    # ---- address helpers -----------------------------------------------------------------------------------
    def canonical(self, masked: int) -> int:
        if self.half is not None and masked & self.half:
            return masked | ~self.va_mask & ((1 << 64) - 1)
        return masked

    def hexv(self, masked: int) -> str:
        return f"{self.canonical(masked):#x}"

    # ---- columns -------------------------------------------------------------------------------------------
    def _virtual_column(self) -> Column:
        pieces = []
        for i, v in enumerate(self.doc.get("virtual") or []):
            start, end = _int(v["start"]) & self.va_mask, ((_int(v["end"]) - 1) & self.va_mask) + 1
            mapped = (v.get("pages") or 0) * (v.get("page_size") or 4096)
            pieces.append(Segment(start, end, False, i, mapped if 0 < mapped < end - start else None))
        cuts = {self.half} if self.half else set()
        for r in self.doc.get("regions") or []:
            cuts.add(_int(r["start"]) & self.va_mask)
            cuts.add(((_int(r["end"]) - 1) & self.va_mask) + 1)
        translation = self.doc.get("translation")
        if translation:
            va = _int(translation["va"]) & self.va_mask
            cuts |= {va & ~0xFFF, (va & ~0xFFF) + 0x1000}
        return Column(pieces, 0, 1 << self.va_bits, cuts)

    def _physical_column(self) -> Column:
        rows = self.doc.get("physical") or []
        pieces = [Segment(_int(p["start"]), _int(p["end"]), p.get("role") in FOLDED_ROLES, i)
                  for i, p in enumerate(rows)]
        ram = (self.doc.get("ram") or {}).get("bytes") or 0
        hi = max([ram, *(s.end for s in pieces)]) or 1
        return Column(pieces, 0, hi, set())

    # ---- segments, with their detail cards -----------------------------------------------------------------
    def _vseg(self, s: Segment) -> dict:
        if s.index is None:
            key = f"vgap{s.start:x}"
            names = [r["name"] for r in self.doc.get("regions") or []
                     if _int(r["start"]) & self.va_mask <= s.start < (((_int(r["end"]) - 1) & self.va_mask) + 1)]
            self.details[key] = {"title": f"unmapped {human_size(s.size)}", "rows": [
                ["range", f"{self.hexv(s.start)} .. {self.hexv(s.end - 1)}"], ["size", human_size(s.size)],
                ["region", ", ".join(names) or "none"]]
                + [["note", "starts after the non-canonical hole"]] * (s.start == self.half), "lists": []}
            label = human_size(s.size)
            return {"key": key, "y": s.y, "h": s.h, "folded": True, "cls": "fold", "text": label,
                    "start": self.hexv(s.start), "end": self.hexv(s.end), "size": s.size, "weight": s.weight,
                    "problem": False, "info": False}
        v = self.doc["virtual"][s.index]
        key = f"v{s.index}"
        problems, info = list(v.get("problems") or []), list(v.get("info") or [])
        rows = [["range", f"{v['start']} .. {self.hexv(s.end - 1)} (end {v['end']})"],
                ["size", f"{human_size(s.size)}: {v.get('pages')} page{'' if v.get('pages') == 1 else 's'} of "
                         f"{human_size(v.get('page_size') or 4096)}"],
                ["flags", f"{v.get('flags')}: " + ", ".join(
                    ["writable" if v.get("writable") else "read-only", "user" if v.get("user") else "supervisor"]
                    + ["NX"] * bool(v.get("nx")) + ["global"] * bool(v.get("global")))],
                ["physical", f"{v.get('phys')}" + (" contiguous" if v.get("phys_contiguous") else
                                                     " (first page; the rest scattered)")],
                ["region", v.get("region") or "none"]]
        lists = [{"title": "entry chain of the first page", "items": self.chain(s.start, v)}]
        if problems:
            lists.append({"title": "problems", "items": problems, "bad": True})
        if info:
            lists.append({"title": "information (not a failure)", "items": info, "note": True})
        links = [f"p{i}" for i in self._frames_of(v)]
        self.details[key] = {"title": f"{v['start']} {v.get('flags')} {v.get('region') or ''}".strip(),
                             "rows": rows, "lists": lists, "links": links}
        return {"key": key, "y": s.y, "h": s.h, "folded": False, "cls": "map " + self._perm_class(v),
                "text": v.get("flags") or "", "start": v["start"], "end": v["end"], "size": s.size, "weight": s.weight,
                "problem": bool(problems), "info": bool(info), "links": " ".join(links)}

    def _perm_class(self, v: dict) -> str:
        """Colour by what the page allows: user, writable and executable, writable, executable, read-only. Without
        EFER.NXE (32-bit paging) every page is executable, so only writable or not is told apart."""
        if v.get("user"):
            return "perm-user"
        if v.get("writable"):
            return "perm-wx" if self.has_nx and not v.get("nx") else "perm-rw"
        return "perm-ro" if self.has_nx and v.get("nx") else "perm-rx"

    def _frames_of(self, v: dict) -> list[int]:
        """Physical rows this virtual range maps (all of them when contiguous, else the first page's)."""
        phys = _int(v.get("phys"))
        if phys is None:
            return []
        size = (_int(v["end"]) - _int(v["start"])) if v.get("phys_contiguous") else 1
        return [i for i, p in enumerate(self.doc.get("physical") or [])
                if _int(p["start"]) < phys + size and phys < _int(p["end"])]

    def chain(self, masked: int, v: dict) -> list[str]:
        """Index at each level, and where the kernel itself reaches that entry through its recursive slot."""
        arch = ARCHES.get(self.doc["kernel"]["arch"])
        levels = (self.doc.get("paging") or {}).get("levels")
        if arch is None or levels != arch.levels:
            return [f"{levels}-level paging: no index breakdown for this mode"]
        own = [r for r in (self.doc.get("paging") or {}).get("recursive_slots") or [] if r.get("role") in ("own", None)]
        names = arch.paging.level_names
        page = v.get("page_size") or 4096
        out = []
        for level in range(arch.levels):
            index = (masked >> arch.shift(level)) & (arch.entries_per_table - 1)
            text = f"{names[level]}[{index}]"
            if own:
                text += f" at {arch.entry_address(own[0]['slot'], self.canonical(masked), level):#x}"
            leaf = arch.span(level) <= page
            text += f" -> frame {v.get('phys')} ({v.get('flags')})" if leaf else f" -> {names[level + 1]}"
            out.append(text)
            if leaf:
                break
        return out

    def _pseg(self, s: Segment) -> dict:
        if s.index is None:
            key = f"pgap{s.start:x}"
            self.details[key] = {"title": f"not listed {human_size(s.size)}", "rows": [
                ["range", f"{s.start:#x} .. {s.end - 1:#x}"], ["size", human_size(s.size)]], "lists": []}
            return {"key": key, "y": s.y, "h": s.h, "folded": True, "cls": "fold", "text": human_size(s.size),
                    "start": f"{s.start:#x}", "end": f"{s.end:#x}", "size": s.size, "weight": s.weight,
                    "problem": False, "info": False, "colour": None, "role": None, "links": ""}
        p = self.doc["physical"][s.index]
        key = f"p{s.index}"
        mapped_at = [f"v{i}" for i, v in enumerate(self.doc.get("virtual") or []) if s.index in self._frames_of(v)]
        rows = [["range", f"{p['start']} .. {s.end - 1:#x} (end {p['end']})"],
                ["frames", f"{p.get('frames')} ({human_size(s.size)})"], ["role", p.get("role")],
                ["detail", p.get("detail") or "-"]]
        lists = [{"title": "mapped at", "items": [
            f"{self.doc['virtual'][int(k[1:])]['start']} {self.doc['virtual'][int(k[1:])].get('region') or ''}"
            for k in mapped_at] or ["nowhere"]}]
        if p.get("problems"):
            lists.append({"title": "problems", "items": list(p["problems"]), "bad": True})
        if p.get("info"):
            lists.append({"title": "information (not a failure)", "items": list(p["info"]), "note": True})
        self.details[key] = {"title": f"{p['start']} {p.get('role')}", "rows": rows, "lists": lists,
                             "links": mapped_at}
        role = p.get("role") or ""
        return {"key": key, "y": s.y, "h": s.h, "folded": s.folded, "cls": "fold" if s.folded else "frame",
                "text": human_size(s.size) if s.folded else "", "start": p["start"], "end": p["end"],
                "size": s.size, "weight": s.weight, "problem": bool(p.get("problems")),
                "info": role in INFO_ROLES or bool(p.get("info")),
                "colour": ROLE_COLOURS.get(role, "#888"),
                "role": role, "links": " ".join(mapped_at)}

    # ---- labels --------------------------------------------------------------------------------------------
    def _regions(self) -> list[dict]:
        """Each layout region as a bracket right of the virtual bar; nested regions further in."""
        raw = []
        for r in self.doc.get("regions") or []:
            start, end = _int(r["start"]) & self.va_mask, ((_int(r["end"]) - 1) & self.va_mask) + 1
            raw.append((start, end, r))
        raw.sort(key=lambda t: (t[0], -(t[1] - t[0])))
        out = []
        for i, (start, end, r) in enumerate(raw):
            depth = sum(1 for s, e, _ in raw if s <= start and end <= e and (s, e) != (start, end))
            y0, y1 = self.virtual.y_of(start), self.virtual.y_of(end)
            key = f"r{i}"
            self.details[key] = {"title": r["name"], "rows": [
                ["range", f"{r['start']} .. {r['end']} (end exclusive)"], ["size", human_size(end - start)],
                ["from", r.get("source") or "-"], ["what", r.get("description") or "-"]], "lists": [{
                    "title": "mapped ranges inside", "items": [
                        f"{v['start']} .. {v['end']} {v.get('flags')}" for v in self.doc.get("virtual") or []
                        if start <= _int(v["start"]) & self.va_mask < end] or ["none"]}]}
            out.append({"key": key, "name": r["name"], "y0": y0, "y1": y1, "x": BAR_X + BAR_W + 6 + 8 * depth,
                        "colour": REGION_COLOURS[i % len(REGION_COLOURS)], "source": r.get("source"),
                        "description": r.get("description") or "", "size": human_size(end - start),
                        "start": r["start"], "end": r["end"], "want": (y0 + y1) / 2 + 4})
        ys = spread([o["want"] for o in sorted(out, key=lambda o: o["want"])])
        for o, y in zip(sorted(out, key=lambda o: o["want"]), ys):
            o["y"] = y
        depth_max = max((o["x"] for o in out), default=BAR_X + BAR_W)
        for o in out:
            o["tx"] = depth_max + 14
        return out

    def _role_labels(self) -> list[dict]:
        """Physical roles beside their bar: one label per run of segments with the same role."""
        runs: list[dict] = []
        for seg in self.psegs:
            role = seg.get("role") or ("not listed" if seg["folded"] else "")
            if runs and runs[-1]["role"] == role:
                runs[-1]["y1"] = seg["y"] + seg["h"]
                runs[-1]["count"] += 1
                runs[-1]["size"] += seg["size"]
            else:
                runs.append({"role": role, "y0": seg["y"], "y1": seg["y"] + seg["h"], "count": 1,
                             "size": seg["size"]})
        for run, y in zip(runs, spread([(r["y0"] + r["y1"]) / 2 + 4 for r in runs])):
            run["y"] = y
            run["text"] = f"{run['role']} ({human_size(run['size'])})"
        return runs

    @staticmethod
    def _address_labels(column: Column, show) -> list[dict]:
        labels, last = [], -1e9
        for s in column.segments:
            if s.y - last >= LABEL_GAP:
                labels.append({"y": s.y + 4, "text": f"{show(s.start):#x}"})
                last = s.y
        end = column.segments[-1]
        if end.y + end.h - last >= LABEL_GAP:
            labels.append({"y": end.y + end.h + 4, "text": f"{show(end.end - 1):#x}"})
        return labels

    def _translation_marker(self) -> dict | None:
        t = self.doc.get("translation")
        if not t:
            return None
        va = _int(t["va"]) & self.va_mask
        marker = {"vy": self.virtual.y_of(va), "va": t["va"], "py": None, "phys": t.get("phys")}
        if t.get("phys"):
            marker["py"] = self.physical.y_of(_int(t["phys"]))
        return marker


# ---- bench charts ---------------------------------------------------------------------------------------------

CHART_W = 860
RUN_COLOURS = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759")


def bench_charts(bench: dict) -> dict:
    """The `kgen bench --json` figures as SVG geometry: cost per operation (one chart per unit: TCG counts
    instructions, KVM TSC cycles) and pmm_init against guest RAM (RAM on a log2 axis)."""
    runs = bench.get("runs") or []
    op_charts = []
    for unit in dict.fromkeys(r["unit"] for r in runs):
        mine = [r for r in runs if r["unit"] == unit]
        labels = list(dict.fromkeys(label for r in mine for label in (*r["pmm"], *r["vmm"])
                                    if not label.startswith("empty loop")))
        top = max([max(0.0, v) for r in mine for v in (*r["pmm"].values(), *r["vmm"].values())] + [1.0])
        bar_h, left, width = 11, 300, CHART_W - 300 - 90
        rows, y = [], 20
        for label in labels:
            bars = []
            for k, r in enumerate(mine):
                value = r["pmm"].get(label, r["vmm"].get(label))
                if value is not None:
                    bars.append({"y": y, "w": max(0.0, value) / top * width, "value": value,
                                 "colour": RUN_COLOURS[runs.index(r) % len(RUN_COLOURS)],
                                 "run": f"{r['arch']} {r['accel'].upper()}"})
                    y += bar_h + 1
            rows.append({"label": label, "y": (bars[0]["y"] if bars else y) + bar_h - 2, "bars": bars})
            y += 8
        op_charts.append({"unit": unit, "rows": rows, "left": left, "width": width, "height": y + 10,
                          "bar_h": bar_h, "top": top,
                          "legend": [{"run": f"{r['arch']} {r['accel'].upper()}",
                                      "colour": RUN_COLOURS[runs.index(r) % len(RUN_COLOURS)]} for r in mine]})
    init_charts = []
    for unit in dict.fromkeys(r["unit"] for r in runs if r.get("init")):
        mine = [r for r in runs if r["unit"] == unit and r.get("init")]
        mibs = sorted({row["mib"] for r in mine for row in r["init"]})
        top = max([row["ticks"] for r in mine for row in r["init"]] + [1])
        left, width, height = 90, CHART_W - 90 - 40, 220
        lo, hi = mibs[0].bit_length(), max(mibs[-1].bit_length(), mibs[0].bit_length() + 1)

        def x(mib: int) -> float:
            return left + (log2(mib) - (lo - 1)) / (hi - (lo - 1)) * width

        lines = []
        for r in mine:
            points = [{"x": x(row["mib"]), "y": 20 + height - row["ticks"] / top * height, "ticks": row["ticks"],
                       "mib": row["mib"], "hwm": round(row["hwm_kib"] / 1024, 1)} for row in r["init"]]
            lines.append({"run": f"{r['arch']} {r['accel'].upper()}", "points": points,
                          "path": " ".join(f"{p['x']:.1f},{p['y']:.1f}" for p in points),
                          "colour": RUN_COLOURS[runs.index(r) % len(RUN_COLOURS)],
                          "verdict": r.get("init_verdict")})
        init_charts.append({"unit": unit, "lines": lines, "left": left, "width": width, "height": height,
                            "ticks_x": [{"x": x(m), "mib": m} for m in mibs], "top": top,
                            "ticks_y": [{"y": 20 + height - f * height, "value": round(top * f)}
                                        for f in (0, 0.25, 0.5, 0.75, 1)]})
    return {"ops": op_charts, "init": init_charts}


# ---- rendering ------------------------------------------------------------------------------------------------

def _environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["px"] = lambda v: f"{v:.2f}"
    return env


def render_html(doc: dict) -> str:
    """The inspect document as one HTML page (the module docstring says how it is drawn)."""
    geometry = Geometry(doc)
    bench = doc.get("bench")
    return _environment().get_template("inspect.html.j2").render(
        doc=doc, g=geometry, folded_roles=", ".join(sorted(FOLDED_ROLES)), fold_px=FOLD_PX, min_px=MIN_PX,
        bar_x=BAR_X, bar_w=BAR_W, bench=bench, charts=bench_charts(bench) if bench else None)


def render_bench_html(bench: dict) -> str:
    """`kgen bench --html FILE`: the bench figures alone, drawn as in the inspect page's bench section."""
    return _environment().get_template("bench.html.j2").render(bench=bench, charts=bench_charts(bench))
