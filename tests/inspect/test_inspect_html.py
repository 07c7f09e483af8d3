"""`kgen inspect --html` and `kgen bench --html`: the page opened in real headless Chromium (Debian's `chromium`).

The page is made by the command a user runs, from a really booted kernel (kgen's i386 default and x86_64); the
checks read the expected names and sizes from the inspect document (`--json` of the same run) and the drawn
geometry from the browser after its scripts ran (a probe script the test adds writes each element's rendered box
into the DOM, which `--dump-dom` prints). Network: Chromium runs behind a proxy the test owns, so any request the
page made would reach it; a control page that does load an image shows the proxy sees requests.
"""
from __future__ import annotations

import http.server
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest

import minikernels
from conftest import needs_qemu, run_kgen
from kgen.inspect.html import FOLD_PX, FOLDED_ROLES, MIN_PX, render_bench_html, render_html

CHROMIUM = shutil.which("chromium")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (make system-deps)")

# A probe the test appends to a copy of the page: after the page's own scripts ran, write what the browser drew.
PROBE = """<script>
window.addEventListener("load", () => {
  for (const e of document.querySelectorAll("[data-key], .region, .bar, .point")) {
    const box = e.getBoundingClientRect();
    e.setAttribute("data-drawn", [box.x, box.y, box.width, box.height].map(v => v.toFixed(3)).join(","));
  }
  const loaded = performance.getEntriesByType("resource").map(r => r.name);
  document.body.setAttribute("data-resources", JSON.stringify(loaded));
  document.body.setAttribute("data-title", document.title);
  document.body.setAttribute("data-probed", "yes");
});
</script>"""


class _Recorder(http.server.BaseHTTPRequestHandler):
    """A proxy that answers nothing and remembers every request: Chromium sends all its traffic here."""
    seen: list[str] = []

    def _record(self):
        type(self).seen.append(f"{self.command} {self.path}")
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_POST = do_HEAD = do_CONNECT = _record

    def log_message(self, *args):
        pass


# Chromium's own traffic, also sent for an empty page whatever the flags (component updater, network time,
# accounts): not the page's. No kgen page names these hosts (test_pages_name_no_host checks).
CHROMIUM_OWN_HOSTS = ("google.com", "googleapis.com")


def page_requests(requests: list[str]) -> list[str]:
    def host(request: str) -> str:
        target = request.split()[1]
        return re.sub(r"^[a-z]+://", "", target).split("/")[0].split(":")[0]
    return [r for r in requests if not host(r).endswith(CHROMIUM_OWN_HOSTS)]


@pytest.fixture
def proxy():
    handler = type("Recorder", (_Recorder,), {"seen": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], handler.seen
    finally:
        server.shutdown()
        server.server_close()


def chromium(tmp_path: Path, *args: str, proxy_port: int | None = None, timeout: float = 90) -> str:
    """Run headless Chromium in a session of its own, return its stdout; every process of that session is gone
    when this returns (killed if it is still there)."""
    profile = tmp_path / f"profile-{time.monotonic_ns()}"
    command = [CHROMIUM, "--headless", "--disable-gpu", f"--user-data-dir={profile}", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--disable-default-apps", "--hide-scrollbars", "--virtual-time-budget=3000"]
    if os.geteuid() == 0:
        command.append("--no-sandbox")
    if proxy_port is not None:
        command += [f"--proxy-server=http://127.0.0.1:{proxy_port}", "--proxy-bypass-list=<-loopback>"]
    process = subprocess.Popen(command + list(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        out, err = "", "timed out"
    finally:
        _end_session(process.pid)
        process.wait(timeout=10)
        shutil.rmtree(profile, ignore_errors=True)
    assert process.returncode == 0, f"chromium failed ({process.returncode}): {err[-2000:]}"
    return out


def _end_session(sid: int) -> None:
    """Kill what is left of the session Chromium ran in (its zygote and helpers), and wait until it is empty."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not _session_pids(sid):
            return
        for pid in _session_pids(sid):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 5
        while _session_pids(sid) and time.monotonic() < deadline:
            time.sleep(0.05)
    assert not _session_pids(sid), f"chromium processes left behind: {_session_pids(sid)}"


def _session_pids(sid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[3]) == sid and fields[0] != "Z":      # fields[3]: session id; zombies are reaped by init
                pids.append(int(entry.name))
    return pids


class _Dom(HTMLParser):
    """The elements of a dumped DOM, each as (tag, attributes), and the text."""

    def __init__(self, text: str):
        super().__init__()
        self.elements: list[tuple[str, dict]] = []
        self.text: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.elements.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)

    def having(self, attribute: str) -> list[dict]:
        return [a for _, a in self.elements if attribute in a]


def probed_dom(tmp_path: Path, page: Path, fragment: str = "", **kw) -> _Dom:
    """Chromium's DOM of `page` after its scripts and the probe ran."""
    probed = tmp_path / f"probed-{page.name}"
    probed.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
    dom = _Dom(chromium(tmp_path, "--dump-dom", probed.as_uri() + fragment, **kw))
    body = [a for tag, a in dom.elements if tag == "body"]
    assert body and body[0].get("data-probed") == "yes", "the page's scripts did not run to the end"
    return dom


def drawn(attrs: dict) -> tuple[float, float, float, float]:
    return tuple(float(v) for v in attrs["data-drawn"].split(","))


def png_size_and_colours(path: Path) -> tuple[int, int, int]:
    """Width, height and the number of distinct byte values of the decoded image data (a blank page has few)."""
    import struct
    import zlib
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    at, idat = 8, b""
    while at < len(data):
        length, kind = struct.unpack(">I4s", data[at:at + 8])
        if kind == b"IDAT":
            idat += data[at + 8:at + 8 + length]
        at += 12 + length
    return width, height, len(set(zlib.decompress(idat)))


# ---- a page made by `kgen inspect --html` from a really booted kernel ---------------------------------------------

def assert_drawn_to_scale(doc: dict, dom: _Dom) -> str:
    """Every range and frame run of the document drawn, in address order, occupied ones at one scale per column
    (the one the page states), empty ones folded; returns the page's text."""
    segments = _by_key(dom)
    for column, rows in (("v", doc["virtual"]), ("p", doc["physical"])):
        assert rows, f"the document has no {column} rows to draw"
        for i, row in enumerate(rows):
            seg = segments.get(f"{column}{i}")
            assert seg is not None, f"{column}{i} {row['start']}..{row['end']} is not on the page"
            assert (seg["data-start"], seg["data-end"]) == (row["start"], row["end"])
        # Address order, no overlap, no hole: each segment starts where the one above ends.
        ordered = sorted((a for k, a in segments.items() if k.startswith(column) or k.startswith(column + "gap")),
                         key=lambda a: drawn(a)[1])
        ids = {"v": "virtual-map", "p": "physical-map"}
        assert all(abs(drawn(a)[1] + drawn(a)[3] - drawn(b)[1]) < 0.05 for a, b in zip(ordered, ordered[1:])), \
            f"{ids[column]}: segments overlap or leave gaps"
        # Occupied ranges to scale, empty ones folded.
        occupied = [a for a in ordered if a["data-folded"] == "no"]
        folded = [a for a in ordered if a["data-folded"] == "yes"]
        assert folded, f"{ids[column]}: nothing folded, although most of the space is empty"
        assert all(abs(drawn(a)[3] - FOLD_PX) < 0.05 for a in folded), f"{ids[column]}: a fold is not {FOLD_PX} px"
        largest = max(occupied, key=lambda a: int(a["data-weight"]))
        px_per_byte = drawn(largest)[3] / int(largest["data-weight"])
        for a in occupied:
            want = max(MIN_PX, int(a["data-weight"]) * px_per_byte)
            assert abs(drawn(a)[3] - want) < 0.05, \
                f"{ids[column]} {a['data-start']}: drawn {drawn(a)[3]:.2f} px, to scale {want:.2f} px"
        # Folded exactly where nothing is: a virtual fold is no mapped range, a physical one no frame with a role.
        for a in folded:
            key = a["data-key"]
            if column == "p" and not key.startswith("pgap"):
                assert doc["physical"][int(key[1:])]["role"] in FOLDED_ROLES
            else:
                assert key.startswith(column + "gap")
        stated = re.search(rf"{ids[column].split('-')[0]}: 1 px = ([0-9.]+) (B|KiB|MiB)", " ".join(dom.text))
        assert stated, f"the page does not state the {ids[column]} scale"
        per_px = float(stated[1]) * {"B": 1, "KiB": 1024, "MiB": 1 << 20}[stated[2]]
        assert abs(per_px * px_per_byte - 1) < 0.06, \
            f"{ids[column]}: the page says 1 px = {stated[1]} {stated[2]}, drawn 1 px = {1 / px_per_byte:.0f} B"

    # The scale the test just measured is the one the page states.
    text = " ".join(dom.text)
    assert f"folded to {FOLD_PX} px" in text
    return text


@pytest.fixture(scope="module", params=["i386", "x86_64"])
def inspected(request, tmp_path_factory):
    """(arch, document, page): one boot of kgen's default kernel for the architecture, `--json` and `--html` of
    the same run, with a translation of the image's first page (the layout's kernel window)."""
    from kgen.build.config import Config
    from kgen.build.layout import compute
    arch = request.param
    tmp = tmp_path_factory.mktemp(f"inspect-{arch}")
    page = tmp / "map.html"
    va = compute(Config.for_arch(arch)).kernel_window.start
    result = run_kgen("inspect", "--arch", arch, "--out", tmp / "build", "--va", f"{va:#x}", "--json", "--html", page,
                      cwd=tmp, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return arch, json.loads(result.stdout), page


def _by_key(dom: _Dom) -> dict[str, dict]:
    return {a["data-key"]: a for a in dom.having("data-key") if "data-start" in a}


@needs_chromium
@needs_qemu
@pytest.mark.vm
@pytest.mark.slow
def test_every_region_range_and_frame_is_drawn_to_the_documented_scale(inspected, tmp_path, proxy):
    from kgen.arch import ARCHES
    from kgen.build.config import Config
    from kgen.build.layout import compute
    arch, doc, page = inspected
    port, requests = proxy
    first = next(i for i, v in enumerate(doc["virtual"]) if v["phys_contiguous"])
    dom = probed_dom(tmp_path, page, f"#v{first}", proxy_port=port)

    # Every region: the layout's own (names from kgen's Layout), and every one the document lists.
    drawn_regions = {a["data-region"]: drawn(a) for a in dom.having("data-region")}
    layout_names = [r.name for r in compute(Config.for_arch(arch)).regions()]
    for name in layout_names + [r["name"] for r in doc["regions"]]:
        assert name in drawn_regions, f"region {name!r} has no element on the page"
        assert drawn_regions[name][3] > 0, f"region {name!r} is not drawn"

    text = assert_drawn_to_scale(doc, dom)

    # The clicked range's card: its range and the entry chain, level names from the architecture record.
    card = " ".join(dom.text[dom.text.index("Details") + 1:])
    chosen = doc["virtual"][first]
    assert chosen["start"] in card
    top = ARCHES[arch].paging.level_names[0]
    assert f"{top}[" in card, card[:500]

    for inv in doc["invariants"]:
        assert any(a.get("data-invariant") == inv["name"] and a.get("class") == inv["outcome"]
                   for a in dom.having("data-invariant")), inv["name"]
    for step in doc["translation"]["steps"]:
        assert step["entry"] in text and step["entry_phys"] in text

    # Nothing from the network: the page itself fetched no resource, and Chromium sent the proxy nothing.
    body = next(a for tag, a in dom.elements if tag == "body")
    assert json.loads(body["data-resources"]) == []
    assert page_requests(requests) == []


@needs_chromium
@needs_qemu
@pytest.mark.vm
@pytest.mark.slow
def test_a_foreign_kernel_with_writable_text_has_its_failure_drawn(tmp_path):
    """Anyone's kernel (tests/minikernels.py's higher-half kernel, its text mapped writable): ELF segments and
    symbols as regions, the failing invariant listed, exactly the ranges it names outlined."""
    elf = minikernels.build(tmp_path, "hh", minikernels.HIGHER_HALF, minikernels.HIGHER_HALF_LDS, WRITABLE_TEXT=1)
    page = tmp_path / "foreign.html"
    result = run_kgen("inspect", "--kernel", elf, "--ready", minikernels.HIGHER_HALF_READY, "--json", "--html", page)
    assert result.returncode == 0, result.stderr[-3000:]
    doc = json.loads(result.stdout)
    assert any(inv["outcome"] == "failed" for inv in doc["invariants"]), "the writable text went unnoticed"
    dom = probed_dom(tmp_path, page)
    assert_drawn_to_scale(doc, dom)
    assert {a["data-region"] for a in dom.having("data-region")} == {r["name"] for r in doc["regions"]}
    outlined = {a["data-key"] for a in _by_key(dom).values() if "problem" in a["class"].split()}
    assert outlined and outlined == {f"v{i}" for i, v in enumerate(doc["virtual"]) if v["problems"]}
    failed = {a["data-invariant"] for a in dom.having("data-invariant") if a["class"] == "failed"}
    assert failed == {inv["name"] for inv in doc["invariants"] if inv["outcome"] == "failed"}


@needs_chromium
@needs_qemu
@pytest.mark.vm
@pytest.mark.slow
def test_screenshot_of_the_page(inspected, tmp_path):
    arch, doc, page = inspected
    shot = tmp_path / "page.png"
    chromium(tmp_path, "--window-size=1400,1100", f"--screenshot={shot}", page.as_uri())
    width, height, colours = png_size_and_colours(shot)
    assert (width, height) == (1400, 1100)
    assert colours > 50, "the screenshot is (nearly) blank"


@needs_chromium
def test_the_network_check_sees_a_page_that_loads_something(tmp_path, proxy):
    """Control for the check above: a page that loads an image is seen by the proxy; the same image put into a
    kgen page is refused by its Content-Security-Policy and never requested."""
    port, requests = proxy
    plain = tmp_path / "plain.html"
    plain.write_text('<!DOCTYPE html><html><body><img src="http://kgen-test.invalid/x.png"></body></html>')
    chromium(tmp_path, "--dump-dom", plain.as_uri(), proxy_port=port)
    assert any("kgen-test.invalid/x.png" in r for r in page_requests(requests)), requests
    requests.clear()
    page = tmp_path / "bench.html"
    page.write_text(render_bench_html(_small_bench()).replace(
        "</body>", '<img src="http://kgen-test.invalid/y.png"></body>'))
    chromium(tmp_path, "--dump-dom", page.as_uri(), proxy_port=port)
    assert not any("kgen-test.invalid" in r for r in requests), requests


def _small_bench() -> dict:
    return {"kgen_bench": 1, "host": "test", "loops": 1, "runs": [
        {"arch": "i386", "accel": "tcg", "unit": "instructions", "pmm": {"a": 1.0}, "vmm": {"b": 2.0},
         "init": None, "init_verdict": None}]}


@needs_chromium
@needs_qemu
@pytest.mark.vm
@pytest.mark.slow
def test_names_from_the_kernel_are_text_and_problems_are_marked(inspected, tmp_path):
    """A foreign ELF names its own symbols and sections: a name that is HTML stays text. A range where an
    invariant fails is outlined and the failure listed (the document of a booted kernel with one failure added)."""
    arch, doc, _ = inspected
    doc = json.loads(json.dumps(doc))
    evil = '<img src="x" onerror="document.title=\'pwned\'">'
    doc["regions"][0]["name"] = evil
    target = next(i for i, v in enumerate(doc["virtual"]) if v["writable"])
    message = f"{doc['virtual'][target]['start']} is writable </script><marquee>moving</marquee>"
    doc["virtual"][target]["problems"] = [message]
    doc["invariants"][0] = {"name": doc["invariants"][0]["name"], "outcome": "failed", "messages": [message]}
    page = tmp_path / "evil.html"
    page.write_text(render_html(doc))
    dom = probed_dom(tmp_path, page, f"#v{target}")
    assert not any(tag == "img" for tag, _ in dom.elements)
    assert not any(tag == "marquee" for tag, _ in dom.elements)
    body = next(a for tag, a in dom.elements if tag == "body")
    assert body["data-title"].startswith("kgen inspect"), "a name ran as a script"
    assert any(a["data-region"] == evil for a in dom.having("data-region"))
    assert message in " ".join(dom.text)
    seg = _by_key(dom)[f"v{target}"]
    assert "problem" in seg["class"].split()
    assert sum("problem" in a.get("class", "").split() for a in _by_key(dom).values()) == 1
    failed = [a for a in dom.having("data-invariant") if a["class"] == "failed"]
    assert [a["data-invariant"] for a in failed] == [doc["invariants"][0]["name"]]


# ---- kgen bench --json / --html -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def benched(tmp_path_factory):
    """One small real bench (i386 under TCG: per-operation figures and pmm_init at three guest sizes), its JSON
    and its page."""
    tmp = tmp_path_factory.mktemp("bench")
    page = tmp / "bench.html"
    result = run_kgen("bench", "--arch", "i386", "--no-kvm", "--json", "--html", page, cwd=tmp, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout), page, tmp


@needs_chromium
@needs_qemu
@pytest.mark.vm
@pytest.mark.slow
def test_bench_chart_draws_every_figure_to_scale(benched, tmp_path, proxy):
    data, page, _ = benched
    port, requests = proxy
    dom = probed_dom(tmp_path, page, proxy_port=port)
    (run,) = data["runs"]
    figures = {label: value for label, value in (*run["pmm"].items(), *run["vmm"].items())
               if not label.startswith("empty loop")}
    bars = {a["data-label"]: a for a in dom.having("data-label")}
    assert set(bars) == set(figures)
    largest = max(figures, key=figures.get)
    px_per_unit = drawn(bars[largest])[2] / figures[largest]
    for label, value in figures.items():
        assert abs(drawn(bars[label])[2] - max(0.0, value) * px_per_unit) < 0.05, label
    points = {int(a["data-mib"]): a for a in dom.having("data-mib")}
    assert sorted(points) == [row["mib"] for row in run["init"]]
    xs = [drawn(points[m])[0] for m in sorted(points)]
    assert xs == sorted(xs) and len(set(xs)) == len(xs), "guest RAM axis not increasing"
    for row in run["init"]:
        assert int(points[row["mib"]]["data-ticks"]) == row["ticks"]
    assert page_requests(requests) == []


@needs_qemu
@pytest.mark.vm
@pytest.mark.slow
def test_bench_from_json_draws_the_same_page_and_refuses_other_files(benched, tmp_path):
    data, page, work = benched
    saved = tmp_path / "figures.json"
    saved.write_text(json.dumps(data))
    again = tmp_path / "again.html"
    result = run_kgen("bench", "--from-json", saved, "--html", again, timeout=120)
    assert result.returncode == 0, result.stderr
    assert again.read_text() == page.read_text()
    for html in (tmp_path, Path("/proc/kgen.html")):        # refused before anything is measured
        result = run_kgen("bench", "--arch", "i386", "--html", html, timeout=120)
        assert result.returncode == 2 and result.stderr.startswith(f"kgen: error: --html {html}"), result.stderr
        assert result.stderr.count("\n") == 1 and result.stdout == ""
    for content in ("not json", json.dumps({"kgen_inspect": 1})):
        saved.write_text(content)
        result = run_kgen("bench", "--from-json", saved, "--html", again, timeout=120)
        assert result.returncode == 2
        assert result.stderr.startswith("kgen: error: --from-json") and result.stderr.count("\n") == 1, \
            result.stderr
        assert "Traceback" not in result.stderr


@needs_chromium
@needs_qemu
@pytest.mark.vm
@pytest.mark.slow
def test_an_inspect_document_with_bench_figures_shows_the_charts(inspected, benched, tmp_path):
    """`kgen inspect --html FILE --bench FIGURES.json` puts the figures of `kgen bench --json` in the document's
    `bench` (null otherwise) and draws them on the inspect page as on the bench page."""
    arch, _, _ = inspected
    data, _, _ = benched
    figures = tmp_path / "figures.json"
    figures.write_text(json.dumps(data))
    page = tmp_path / "with-bench.html"
    result = run_kgen("inspect", "--arch", arch, "--out", tmp_path / "build", "--json", "--html", page,
                      "--bench", figures, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    doc = json.loads(result.stdout)
    assert doc["bench"] == data
    dom = probed_dom(tmp_path, page)
    labels = {a["data-label"] for a in dom.having("data-label")}
    (run,) = data["runs"]
    assert labels == {label for label in (*run["pmm"], *run["vmm"]) if not label.startswith("empty loop")}
    assert {a["data-region"] for a in dom.having("data-region")} >= {r["name"] for r in doc["regions"]}


@needs_qemu
@pytest.mark.vm
@pytest.mark.slow
def test_a_kernel_without_paging_still_gets_its_page(inspected):
    """`kgen inspect --kernel` of a kernel that never turned paging on: no virtual ranges, no recursive slot; the
    page says so and still draws the physical column (the booted document with paging taken away)."""
    arch, doc, _ = inspected
    off = {**doc, "virtual": [], "translation": None,
           "paging": {**doc["paging"], "enabled": False, "recursive_slots": []}}
    dom = _Dom(render_html(off))
    assert any(a.get("id") == "paging-off" for _, a in dom.elements)
    keys = {a["data-key"] for a in dom.having("data-start")}
    assert not any(re.fullmatch(r"v\d+", k) for k in keys)
    assert {f"p{i}" for i in range(len(doc["physical"]))} <= keys
    assert not any(a.get("id") == "paging-off" for _, a in _Dom(render_html(doc)).elements)
