"""`kgen inspect`: its document checked against the walker, the layout, the PMM's own counters and the ELF, on
booted kernels (i386 and x86_64 kgen kernels, one foreign kernel from tests/minikernels.py).

One boot per kernel: the document is collected once per architecture (module-scoped), and further translations
are explained on the same stopped machine."""
from __future__ import annotations

import json

import pytest

import minikernels
from conftest import ARCH_BUILDS, needs_qemu, run_kgen, shared_build
from kgen.build.config import Config
from kgen.arch import hw
from kgen.guest import invariants
from kgen.guest.elfinfo import ElfInfo
from kgen.guest.pagewalk import PTE_NX, PTE_RW, PTE_US
from kgen.guest.pmmview import PmmView
from kgen.harness.kernel import KernelUnderTest
from kgen.harness.live import boot
from kgen.inspect.explain import explain_translation
from kgen.inspect.model import collect
from kgen.inspect.text import render_text

PAGE = hw.PAGE_SIZE


def h(text: str) -> int:
    return int(text, 16)


@pytest.fixture(scope="module", params=tuple(ARCH_BUILDS))
def inspected(request):
    """(document with --va at the top table's recursive address, the stopped view, the layout) per architecture."""
    out = request.getfixturevalue(ARCH_BUILDS[request.param])
    layout = out.kernel.layout
    kernel = KernelUnderTest(out.elf, ElfInfo.load(out.elf), layout)
    with boot(kernel, "tcg") as live:
        block = live.call("kmalloc", 64)        # a slab page of the heap, mapped in its slab window
        # One frame given back (on the free stack), one kept and mapped nowhere.
        freed, kept = live.call("pmm_alloc"), live.call("pmm_alloc")
        live.call("pmm_free", freed)
        doc = collect(live, va=layout.recursive_top)
        doc["test_frames"] = {"freed": freed, "kept": kept, "heap block": block}
        yield doc, live.view(), layout


@needs_qemu
def test_virtual_ranges_are_the_walkers_mappings(inspected):
    doc, view, layout = inspected
    walker = view.walker
    ranges = [r for r in doc["virtual"] if r["region"] != "recursive window"]
    # Every mapped page appears once, and only mapped pages.
    assert sum(r["pages"] * r["page_size"] for r in ranges) == sum(m.size for m in walker.mappings())
    for r in ranges:
        for vaddr in (h(r["start"]), h(r["end"]) - r["page_size"]):
            t = walker.translate(vaddr)
            assert t is not None, r
            assert bool(t.attrs & PTE_RW) == r["writable"] and bool(t.attrs & PTE_US) == r["user"], r
            assert bool(t.attrs & PTE_NX) == r["nx"], r
        if r["phys_contiguous"]:
            last = h(r["end"]) - r["page_size"]
            assert walker.translate(last).paddr == h(r["phys"]) + last - h(r["start"])
    # The recursive window: the layout's, showing the top table (CR3), one page per present top-level entry.
    (window,) = [r for r in doc["virtual"] if r["region"] == "recursive window"]
    assert (h(window["start"]), h(window["end"])) == (layout.recursive_window.start, layout.recursive_window.end)
    assert h(window["phys"]) == walker.top and not window["user"]
    # Every region of the layout is named with the layout's bounds.
    named = {r["name"]: (h(r["start"]), h(r["end"])) for r in doc["regions"] if r["source"] == "layout"}
    for region in layout.regions():
        assert named[region.name] == (region.start, region.end)
    # The image's first page is named after the ELF segment that holds it.
    seg = next(s for s in view.elf.segments if s.vaddr == layout.kernel_virtual_start)
    first = next(r for r in ranges if h(r["start"]) <= seg.vaddr < h(r["end"]))
    assert first["region"].endswith("(r-x)") and first["flags"] == "r-x"
    assert doc["paging"]["recursive_slots"][0] == {"slot": layout.recursive_slot, "base": hex(layout.recursive_base),
                                                   "role": "own"}


def frame_roles(doc) -> dict[int, str]:
    roles = {}
    for run in doc["physical"]:
        for frame in range(h(run["start"]), h(run["end"]), PAGE):
            roles[frame] = run["role"]
    return roles


@needs_qemu
def test_physical_roles_agree_with_the_tables_and_the_pmm(inspected):
    doc, view, layout = inspected
    walker = view.walker
    names = walker.mode.level_names
    roles = frame_roles(doc)
    assert roles[walker.top] == f"page table ({names[0]})"
    tables = walker.page_tables()
    assert tables
    for path, frame in tables:
        assert roles[frame] == f"page table ({names[len(path)]})"
    pmm = PmmView(view.read_phys, view.elf, layout)
    state = pmm.state()
    # The kernel's own counters: frames the bump pointer has not reached, frames on the free stack.
    assert sum(1 for role in roles.values() if role == "never allocated") == state.untouched
    assert sorted(f for f, role in roles.items() if role == "free (on the stack)") == sorted(pmm.free_stack(state))
    assert roles[doc["test_frames"]["freed"]] == "free (on the stack)"
    assert roles[doc["test_frames"]["kept"]] == "allocated, unmapped"
    block = doc["test_frames"]["heap block"]
    assert layout.vmm_window.start <= block < layout.vmm_window.end
    assert roles[walker.translate(block).paddr & ~(PAGE - 1)] == "heap"
    (heap_range,) = [r for r in doc["virtual"] if h(r["start"]) <= block < h(r["end"])]
    assert heap_range["region"] == "heap slab window" and heap_range["writable"] and not heap_range["user"]
    assert doc["ram"]["bytes"] == layout.memory_bytes and len(roles) * PAGE >= layout.memory_bytes
    for seg in view.elf.segments:
        if seg.executable:
            assert all(roles[f] == "kernel image" for f in range(seg.paddr, seg.paddr + seg.memsz, PAGE))
    assert all(r["outcome"] == "passed" for r in doc["invariants"]), doc["invariants"]


@needs_qemu
def test_a_bitmap_kernels_frames_have_their_own_roles(tmp_path_factory):
    """pmm.kind = "bitmap": the bitmap's frames are `pmm bitmap`, its clear bits `free (in the bitmap)`; nothing is
    `never allocated` (no bump pointer); the window is a region of the virtual map."""
    out = shared_build(tmp_path_factory, Config(pmm_kind="bitmap"))
    layout = out.kernel.layout
    with boot(KernelUnderTest(out.elf, ElfInfo.load(out.elf), layout), "tcg") as live:
        freed, kept = live.call("pmm_alloc"), live.call("pmm_alloc")
        live.call("pmm_free", freed)
        doc = collect(live)
        view = live.view()
        pmm = PmmView(view.read_phys, view.elf, layout)
        state = pmm.state()
        roles = frame_roles(doc)
        assert sorted(f for f, role in roles.items() if role == "pmm bitmap") == pmm.bitmap_frames(state)
        assert sorted(f for f, role in roles.items() if role == "free (in the bitmap)") == pmm.free_frames(state)
        assert (roles[freed], roles[kept]) == ("free (in the bitmap)", "allocated, unmapped")
        assert "never allocated" not in roles.values() and "free (on the stack)" not in roles.values()
        assert any(r["region"] == "pmm bitmap window" for r in doc["virtual"]), "the bitmap window is no region"
        assert all(r["outcome"] == "passed" for r in doc["invariants"]), doc["invariants"]


@needs_qemu
def test_va_of_the_top_table_is_explained_as_the_self_map(inspected):
    doc, view, layout = inspected
    walker = view.walker
    t = doc["translation"]
    levels = layout.arch.levels
    assert [s["index"] for s in t["steps"]] == [layout.recursive_slot] * levels
    assert all(h(s["next"]) == walker.top for s in t["steps"])
    assert h(t["phys"]) == walker.top and t["fault"] is None
    top = walker.mode.level_names[0]
    times = {2: "twice"}.get(levels, f"{levels} times")
    assert any(f"maps the {top} itself: reached through {top}[{layout.recursive_slot}] {times}" in line
               for line in t["explanation"]), t["explanation"]
    # The CPU agrees: what the kernel reads at that address is its top table.
    assert walker.read_virtual(layout.recursive_top, PAGE) == view.read_phys(walker.top, PAGE)


@needs_qemu
def test_entry_virt_reaches_the_entry_at_entry_phys(inspected):
    """Each step's recursive address, read through the guest's own page tables, holds the same bytes as the entry
    at its physical address: a wrong level, slot or shift in the formula reads another entry."""
    doc, view, layout = inspected
    walker = view.walker
    size = walker.mode.entry_size
    text_page = next(s for s in view.elf.segments if s.executable).vaddr
    checked = 0
    for va in (text_page, layout.tempmap_base, layout.vmm_base, layout.recursive_top,
               layout.recursive_pt(layout.kernel_pde_first) if layout.arch.name == "i386" else layout.recursive_base):
        t = explain_translation(view, walker, va)
        chain, _ = walker.walk(va)
        assert [h(s["entry_phys"]) for s in t["steps"]] == [ref.addr for ref in chain]
        for step in t["steps"]:
            phys_bytes = view.read_phys(h(step["entry_phys"]), size)
            assert walker.read_virtual(h(step["entry_virt"]), size) == phys_bytes, (hex(va), step)
            assert int.from_bytes(phys_bytes, "little") == h(step["entry"])
            checked += 1
    assert checked >= 3 * layout.arch.levels


@needs_qemu
def test_faults_are_explained(inspected):
    doc, view, layout = inspected
    walker = view.walker
    # An empty temp-map slot: the page table is there, its entry is not.
    t = explain_translation(view, walker, layout.tempmap_base)
    assert t["phys"] is None and t["steps"][-1]["flags"] == "not present"
    assert t["fault"].startswith(f"not present at level 1 ({walker.mode.level_names[-1]})")
    # Kernel text: read-only for a supervisor write (CR0.WP is on), supervisor-only for ring 3.
    assert view.regs.cr0 & hw.CR0_WP
    seg = next(s for s in view.elf.segments if s.executable and not s.writable)
    access = {a["access"]: a for a in explain_translation(view, walker, seg.vaddr)["access"]}
    assert access["kernel read"]["faults"] is False and access["kernel fetch"]["faults"] is False
    assert access["kernel write"]["faults"] and "CR0.WP" in access["kernel write"]["why"]
    assert access["user read"]["faults"] and "supervisor" in access["user read"]["why"]
    data = next(s for s in view.elf.segments if not s.executable)
    fetch = {a["access"]: a for a in explain_translation(view, walker, data.vaddr)["access"]}["kernel fetch"]
    assert fetch["faults"] == (bool(walker.mode.nx_levels) and walker.nxe), fetch


@needs_qemu
def test_text_output(inspected):
    doc, view, layout = inspected
    plain = render_text({**doc, "translation": None})
    assert "\x1b[" not in plain
    for r in doc["virtual"]:
        assert f"  {r['start']}  " in plain
    assert f"{sum(1 for r in doc['invariants'] if r['outcome'] == 'passed')} passed" in plain
    va = render_text(doc, colour=True)
    assert "\x1b[" in va
    slot = f"[{layout.recursive_slot}]"
    assert sum(slot in line for line in va.splitlines()) >= layout.arch.levels


@needs_qemu
def test_the_cli_explains_0xfffff000_on_the_default_i386_kernel(default_build):
    out = default_build.elf.parent
    r = run_kgen("inspect", "--out", out, "--va", "0xFFFFF000", env={"NO_COLOR": "1"})
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    layout = default_build.kernel.layout
    pd = ElfInfo.load(default_build.elf).symbols["boot_top_table"].value - layout.kernel_virtual_base
    assert f"maps the PD itself: reached through PD[1023] twice, the frame is the PD {pd:#x}" in r.stdout
    assert "\x1b[" not in r.stdout


@needs_qemu
def test_a_foreign_kernel_as_json_from_the_cli(tmp_path):
    elf_path = minikernels.build(tmp_path, "hh", minikernels.HIGHER_HALF, minikernels.HIGHER_HALF_LDS,
                                 WRITABLE_TEXT=0)
    elf = ElfInfo.load(elf_path)
    r = run_kgen("inspect", "--kernel", elf_path, "--json", "--va", "0xfffff000", "--ready", "mini: ready")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    doc = json.loads(r.stdout)
    assert doc["kernel"]["kind"] == "foreign" and doc["kernel"]["arch"] == "i386"
    assert "mini: ready" in doc["stopped"]["how"]
    # Every PT_LOAD page maps p_vaddr -> p_paddr, in a range named after its segment or a symbol in it.
    for seg in elf.segments:
        for vaddr in range(seg.vaddr, seg.vaddr + seg.memsz, PAGE):
            (r_,) = [v for v in doc["virtual"] if h(v["start"]) <= vaddr < h(v["end"])]
            assert r_["phys_contiguous"] and h(r_["phys"]) + vaddr - h(r_["start"]) == seg.paddr + vaddr - seg.vaddr
            assert r_["writable"] == seg.writable and r_["region"] is not None
    names = {reg["name"] for reg in doc["regions"]}
    assert {"pd", "pt", "stack"} <= names
    # The kernel's PD (its `pd` symbol, loaded 3 GiB below) is the top table and maps itself at 0xfffff000.
    pd = elf.symbols["pd"].value - 0xC0000000
    assert h(doc["registers"]["cr3"]) == pd
    roles = frame_roles(doc)
    assert roles[pd] == "page table (PD)" and roles[elf.symbols["pt"].value - 0xC0000000] == "page table (PT)"
    t = doc["translation"]
    assert h(t["phys"]) == pd and [s["index"] for s in t["steps"]] == [1023, 1023]
    assert [h(s["entry_virt"]) for s in t["steps"]] == [0xFFFFFFFC, 0xFFFFFFFC]
    assert {i["outcome"] for i in doc["invariants"]} <= {"passed", "skipped"}


def test_bad_input_is_one_line(tmp_path):
    (tmp_path / "other.json").write_text('{"kgen_inspect": 1}')
    for args, needle in (
            (("--kernel", tmp_path / "missing.elf"), "no such file"),
            (("--ready", "x", "--out", tmp_path / "b"), "--ready is for a kernel given with --kernel"),
            (("--va", "banana"), "is not an address"),
            (("--arch", "x86_64", "--out", tmp_path / "b64", "--va", "0x0000800000000000"), "not canonical"),
            (("--bench", tmp_path / "f.json"), "--bench draws figures in the HTML page: give --html FILE"),
            (("--html", tmp_path / "m.html", "--bench", tmp_path / "f.json"), f"--bench {tmp_path / 'f.json'}: "),
            (("--html", tmp_path / "m.html", "--bench", tmp_path / "other.json"), "not the output of `kgen bench")):
        r = run_kgen("inspect", *args)
        assert r.returncode == 2, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and needle in r.stderr and "Traceback" not in r.stderr


@needs_qemu
def test_an_invariant_failure_is_attached_to_the_range_it_names(tmp_path):
    """A foreign kernel that maps its text and rodata writable: check_segments fails on exactly those pages, and
    each range holding one carries the message; no other range does."""
    elf_path = minikernels.build(tmp_path, "hhw", minikernels.HIGHER_HALF, minikernels.HIGHER_HALF_LDS,
                                 WRITABLE_TEXT=1)
    kernel = KernelUnderTest.foreign(elf_path, minikernels.HIGHER_HALF_READY)
    with boot(kernel, "tcg") as live:
        doc = collect(live)
    failed = {i["name"]: i for i in doc["invariants"]}["check_segments"]
    assert failed["outcome"] == "failed"
    read_only = {vaddr for seg in kernel.elf.segments if not seg.writable
                 for vaddr in range(seg.vaddr, seg.vaddr + seg.memsz, PAGE)}
    assert read_only
    for r in doc["virtual"]:
        pages = set(range(h(r["start"]), h(r["end"]), PAGE))
        if pages & read_only:
            assert r["problems"] and set(r["problems"]) <= set(failed["messages"]), r
        else:
            assert not r["problems"], r


# ---- user pages, a frame mapped twice: made by the kernel's own routines -----------------------------------------

USER_FLAGS = hw.PTE_P | hw.PTE_RW | hw.PTE_US
KERNEL_FLAGS = hw.PTE_P | hw.PTE_RW


@pytest.fixture(scope="module", params=tuple(ARCH_BUILDS))
def user_and_shared(request):
    """A kgen kernel whose own routines made, over the call channel: a user page in the running space (vmm_map_in
    through the foreign slot attached to the running space itself, as user_load does: templates/task.s), a user
    page at the same address of a second space (as_create, vmm_map_in), and one frame mapped at two kernel pages
    (vmm_map twice, pages 1 and 3 of a lazy vmm_alloc range, so each is a range of its own).
    (document, stopped view, what was made) per architecture."""
    out = request.getfixturevalue(ARCH_BUILDS[request.param])
    layout = out.kernel.layout
    kernel = KernelUnderTest(out.elf, ElfInfo.load(out.elf), layout)
    with boot(kernel, "tcg") as live:
        running = live.view().walker.top
        va = layout.user_text_base
        own, other, shared = (live.call("pmm_alloc") for _ in range(3))
        assert own and other and shared
        assert live.call("as_attach", running) == 1
        assert live.call("vmm_map_in", running, va, own, USER_FLAGS) == 1
        live.call("as_detach")
        space = live.call("as_create")
        assert space and live.call("as_attach", space) == 1
        assert live.call("vmm_map_in", space, va, other, USER_FLAGS) == 1
        live.call("as_detach")
        base = live.call("vmm_alloc", 5, KERNEL_FLAGS, 1)     # lazy: no page backed until touched
        assert base
        twice = (base + PAGE, base + 3 * PAGE)
        for vaddr in twice:
            assert live.call("vmm_map", vaddr, shared, KERNEL_FLAGS) == 1
        made = {"va": va, "own": own, "space": space, "other": other, "shared": shared, "twice": twice}
        yield collect(live), live.view(), made


def run_of(doc, frame: int) -> dict:
    (run,) = [r for r in doc["physical"] if h(r["start"]) <= frame < h(r["end"])]
    return run


def range_of(doc, vaddr: int) -> dict:
    (r,) = [v for v in doc["virtual"] if h(v["start"]) <= vaddr < h(v["end"])]
    return r


def text_line_of_frame(text: str, frame: int) -> str:
    """The line of the text output's physical table whose run holds `frame`."""
    (line,) = [line for line in text.split("Physical memory", 1)[1].splitlines()
               if len(line.split()) > 2 and all(w.startswith("0x") for w in line.split()[:2])
               and int(line.split()[0], 16) <= frame < int(line.split()[1], 16)]
    return line


@needs_qemu
def test_user_pages_are_named_with_their_space(user_and_shared):
    doc, view, made = user_and_shared
    walker = view.walker
    va, space = made["va"], made["space"]
    # What the kernel made, seen by the walker: the running space maps va to its own frame, user-accessible.
    t = walker.translate(va)
    assert t is not None and t.paddr == made["own"] and t.attrs & PTE_US
    other = invariants.space_walker(view, space).translate(va)
    assert other is not None and other.paddr == made["other"] and other.attrs & PTE_US
    own_run, other_run = run_of(doc, made["own"]), run_of(doc, made["other"])
    assert (own_run["role"], own_run["detail"]) == ("user page", "in the running space")
    assert (other_run["role"], other_run["detail"]) == ("user page", f"space {space:#x}")
    # The second space's own tables are its page tables, not "allocated, unmapped".
    names = walker.mode.level_names
    first_kernel = (view.layout.kernel_half_start & view.layout.arch.va_mask) >> walker.mode.shift(0)
    tables = [(path, frame) for path, frame in invariants.space_walker(view, space).page_tables()
              if path[0] < first_kernel]
    assert len(tables) == walker.mode.levels - 1
    for path, frame in tables + [((), space)]:
        assert run_of(doc, frame)["role"] == f"page table ({names[len(path)]})", (path, hex(frame))
    # The virtual address space is the running one's: va is one user page, on the running space's frame.
    r = range_of(doc, va)
    assert (h(r["start"]), h(r["end"]), h(r["phys"])) == (va, va + PAGE, made["own"])
    assert r["user"] and r["writable"] and r["region"] is not None
    text = render_text(doc)
    assert f"  {va:#x}  " in text
    for frame, detail in ((made["own"], "in the running space"), (made["other"], f"space {space:#x}")):
        line = text_line_of_frame(text, frame)
        assert "user page" in line and detail in line, line
    assert all(i["outcome"] == "passed" for i in doc["invariants"]), doc["invariants"]


@needs_qemu
def test_a_frame_mapped_at_two_pages_is_mapped_twice(user_and_shared):
    doc, view, made = user_and_shared
    walker = view.walker
    shared = made["shared"]
    pages = [m.vstart + off for m in walker.mappings() for off in range(0, m.size, PAGE) if m.pstart + off == shared]
    assert sorted(pages) == sorted(made["twice"])
    run = run_of(doc, shared)
    assert (run["role"], run["detail"]) == ("mapped twice", f"mapped at {len(pages)} virtual pages")
    for vaddr in made["twice"]:
        r = range_of(doc, vaddr)
        assert (h(r["start"]), h(r["end"]), h(r["phys"])) == (vaddr, vaddr + PAGE, shared)
        assert r["writable"] and not r["user"]
    text = render_text(doc)
    assert all(f"  {vaddr:#x}  " in text for vaddr in made["twice"])
    line = text_line_of_frame(text, shared)
    assert "mapped twice" in line and f"mapped at {len(pages)} virtual pages" in line, line


# ---- a foreign kernel's frames outside RAM -----------------------------------------------------------------------

@needs_qemu
@pytest.mark.parametrize("memory_mib", [128, 4096])
def test_a_foreign_kernels_frames_outside_ram_are_not_ram(tmp_path, memory_mib):
    """QEMU's pc machine has no RAM at 0xA0000-0xFFFFF (VGA memory, the BIOS), and with 3.5 GiB or more it keeps
    3 GiB below 4 GiB (the PCI hole above) and puts the rest above 4 GiB: those frames are "not RAM", the RAM
    nothing references is "unreferenced", and the document spans the RAM above 4 GiB too."""
    elf_path = minikernels.build(tmp_path, "hh", minikernels.HIGHER_HALF, minikernels.HIGHER_HALF_LDS,
                                 WRITABLE_TEXT=0)
    kernel = KernelUnderTest.foreign(elf_path, minikernels.HIGHER_HALF_READY, memory_mib=memory_mib)
    with boot(kernel, "tcg", poison=None) as live:     # a sparse RAM file: 4 GiB costs nothing
        doc = collect(live)
        windows = [(w.start, w.end) for w in live.machine.ram_windows]
    assert doc["ram"]["bytes"] == memory_mib << 20 and windows
    roles = frame_roles(doc)
    assert max(roles) + PAGE == max(hi for _, hi in windows)
    in_ram = {f: any(lo <= f < hi for lo, hi in windows) for f in roles}
    assert {roles[f] for f in roles if not in_ram[f]} == {"not RAM"}
    assert "not RAM" not in {roles[f] for f in roles if in_ram[f]}
    # Fixed by the PC, not read from QEMU: VGA text memory, the BIOS, conventional memory below them.
    assert roles[0xB8000] == roles[0xF0000] == "not RAM"
    assert roles[0x9F000] == "unreferenced"
    if memory_mib >= 3584:
        assert roles[0xBFFFF000] == "unreferenced" and roles[0xC0000000] == roles[0xFFFFF000] == "not RAM"
        assert roles[0x100000000] == roles[(memory_mib << 20) + (1 << 30) - PAGE] == "unreferenced"
        assert max(roles) + PAGE == (memory_mib << 20) + (1 << 30)
    else:
        assert roles[(memory_mib << 20) - PAGE] == "unreferenced" and max(roles) + PAGE == memory_mib << 20
    pd = kernel.elf.symbols["pd"].value - 0xC0000000
    assert roles[pd] == "page table (PD)"
    line = text_line_of_frame(render_text(doc), 0xB8000)
    assert line.split()[:2] == ["0xa0000", "0x100000"] and "not RAM" in line, line
