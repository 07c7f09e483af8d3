"""Every config the rules accept gives a kernel that builds, boots and passes `kgen test`; every config they refuse
gets one line naming a key the user set.

Configs are drawn by hypothesis over the whole config space of both architectures:

- `valid_configs(arch)` builds a config the way a user who read the rules would, region by region in the kernel
  half (image, recursive and foreign slots, temp-map window, the frame allocator (pmm.kind: a bitmap kernel's
  bitmap window takes the end of the temp-map's page table), vmm window in a gap that is left, RAM for what it
  needs), with a bias towards edges: windows that touch, that share a page table with the image, that end where
  the address space or a table ends. Almost every draw is accepted; the few the rules refuse are dropped.
- `any_configs(arch)` sets a few keys to anything at all: edges, huge numbers, values just past a limit.

Without a VM (fast, every run): an accepted config's layout is checked against the values themselves (regions
disjoint, in the kernel half, every assembler constant a word, RAM and vmm window large enough); a refused one's
message is one line naming one of the keys that were set.

With a VM (marked `vm`): each drawn valid config is built and `kgen test` runs on it. KGEN_CONFIG_EXAMPLES per
architecture (3 by default, derandomized so CI draws the same configs each run); KGEN_CONFIG_SEED=<n> draws
another sample, e.g. `KGEN_CONFIG_EXAMPLES=20 KGEN_CONFIG_SEED=1 pytest tests/build/test_valid_configs.py -k kgen_test`.
A failure prints the config as a kgen.toml, which `kgen test --config` replays.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, assume, given, note, seed, settings
from hypothesis import strategies as st

from conftest import needs_qemu, run_kgen
from kgen.arch import ARCHES
from kgen.build.config import PMM_KINDS, Config, load
from kgen.build.layout import I386_MIN_USER_HALF, RAM_ABOVE_IMAGE, TOP_2_GIB, Layout, compute
from kgen.errors import ConfigError

MIB = 1 << 20
PAGE = 0x1000
ARCH_NAMES = tuple(ARCHES)

# The image itself (code, data, bss but the stack, boot page tables) stays below this; max_size is drawn above it
# plus the stack, so the linker's "image too large" stays a rare refusal.
IMAGE_ROOM = 0x40000
# Guest RAM of a booted example: the harness poisons all of it, so the VM run keeps it moderate.
VM_MEMORY_MIB = 512
# The vmm window drawn at most this large (the rules allow far more; a larger one changes nothing the kernel does
# at boot but the free-range count).
VMM_SIZE_CAP = 1 << 32

# Where QEMU's pc machine moves guest RAM (MiB): all of it below the PCI hole up to 3.5 GiB; from 3.5 GiB on, 3 GiB
# stay low and the rest starts at 4 GiB (the RAM windows of `info mtree`). A size on each side of each edge.
RAM_SPLIT_MIB = (3072, 3584, 4096)
RAM_EDGES_MIB = tuple(m + d for m in RAM_SPLIT_MIB for d in (-1, 0, 1))
# The x86_64 kernel with RAM split below and above 4 GiB, booted (test_kgen_test_passes_with_ram_above_4gib).
SPLIT_RAM_MIB = 3584

EXAMPLES = int(os.environ.get("KGEN_CONFIG_EXAMPLES", "3"))
SEED = os.environ.get("KGEN_CONFIG_SEED")


# ---- drawing configs -------------------------------------------------------------------------------------------

def _edge_int(draw, lo: int, hi: int, step: int = 1) -> int:
    """A multiple of `step` in [lo, hi] (lo, hi multiples of step): the ends, their neighbours, or anywhere."""
    n = (hi - lo) // step
    k = draw(st.one_of(st.sampled_from([0, 1, n - 1, n]), st.integers(0, n)).filter(lambda k: 0 <= k <= n))
    return lo + k * step


def kernel_half_start(arch: str, virtual_base: int) -> int:
    return virtual_base if arch == "i386" else ARCHES[arch].kernel_half


def top_of(arch: str) -> int:
    return 1 << ARCHES[arch].va_bits if ARCHES[arch].word_size == 4 else 1 << 64


def slot_window(arch: str, slot: int) -> tuple[int, int]:
    a = ARCHES[arch]
    start = a.canonical(slot << a.shift(0))
    return start, start + a.span(0)


def gaps(lo: int, hi: int, taken: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The parts of [lo, hi) no interval of `taken` covers."""
    out, at = [], lo
    for start, end in sorted(taken):
        if start > at:
            out.append((at, min(start, hi)))
        at = max(at, end)
    if at < hi:
        out.append((at, hi))
    return [(s, e) for s, e in out if e > s]


@st.composite
def valid_values(draw, arch: str, memory_cap: int | None = None) -> dict:
    """Config fields for `arch` placed the way the rules ask, with a bias towards their edges."""
    a = ARCHES[arch]
    top = top_of(arch)
    leaf = a.span(a.levels - 2)
    entries = a.entries_per_table
    v: dict = {}
    v["kernel_load_address"] = draw(st.one_of(st.just(0x100000), st.integers(0x100, 0x4000).map(lambda p: p * PAGE)))
    v["kernel_stack_size"] = draw(st.one_of(st.just(0x4000), st.integers(1, 64).map(lambda p: p * PAGE),
                                            st.integers(64, 1024).map(lambda p: p * PAGE)))
    least = IMAGE_ROOM + v["kernel_stack_size"]
    v["kernel_max_size"] = draw(st.one_of(
        st.just(max(0x400000, least)),
        st.integers(least // PAGE, least // PAGE + 64).map(lambda p: p * PAGE),
        st.integers(least // PAGE, 0x4000000 // PAGE).map(lambda p: p * PAGE)))
    image_phys_end = v["kernel_load_address"] + v["kernel_max_size"]

    # The virtual base: i386 anywhere 4 MiB aligned above the identity window with a kernel half of 256 MiB or
    # more; x86_64 such that the image lies in the top 2 GiB.
    if arch == "i386":
        lowest = max(I386_MIN_USER_HALF, -(-image_phys_end // a.span(0)) * a.span(0))
        assume(lowest <= 0xF0000000)
        v["kernel_virtual_base"] = draw(st.one_of(
            st.just(max(0xC0000000, lowest)), st.just(lowest),
            st.integers(lowest // a.span(0), 0xF0000000 // a.span(0)).map(lambda i: i * a.span(0))))
    else:
        lowest = TOP_2_GIB - v["kernel_load_address"]
        highest = top - image_phys_end
        usual = 0xFFFFFFFF80000000
        v["kernel_virtual_base"] = (usual if draw(st.booleans()) and lowest <= usual <= highest
                                    else _edge_int(draw, lowest, highest, PAGE))
    image_start = v["kernel_virtual_base"] + v["kernel_load_address"]
    image = (image_start, image_start + v["kernel_max_size"])
    half = kernel_half_start(arch, v["kernel_virtual_base"])
    top_slot = lambda vaddr: (vaddr & a.va_mask) >> a.shift(0)   # noqa: E731
    image_slots = set(range(top_slot(image[0]), top_slot(image[1] - 1) + 1))

    # Recursive and foreign slots: top-level entries of the kernel half the image does not use.
    free_slots = [s for s in range(top_slot(half), entries) if s not in image_slots]
    assume(len(free_slots) >= 4)
    pick_slot = st.one_of(st.sampled_from(free_slots[:2] + free_slots[-3:]), st.sampled_from(free_slots))
    v["paging_recursive_slot"] = draw(pick_slot)
    v["paging_foreign_slot"] = draw(pick_slot.filter(lambda s: s != v["paging_recursive_slot"]))
    taken = [image, slot_window(arch, v["paging_recursive_slot"]), slot_window(arch, v["paging_foreign_slot"])]

    # Temp-map window: in the image's own page table (below or after the image), or in any free page table.
    slots = draw(st.one_of(st.just(16), st.sampled_from([1, 2, entries]), st.integers(1, entries)))
    image_table = image[0] // leaf * leaf
    table_choices = [st.just(image_table), st.just((image[1] - 1) // leaf * leaf)]
    if arch == "i386":
        free_tables = [s * leaf for s in range(top_slot(half), entries)
                       if s not in image_slots | {v["paging_recursive_slot"], v["paging_foreign_slot"]}]
        table_choices.append(st.sampled_from(free_tables))
    else:
        pml4 = st.sampled_from([s for s in range(top_slot(half), entries)
                                if s not in {v["paging_recursive_slot"], v["paging_foreign_slot"]}])
        table_choices.append(st.builds(lambda s, t: a.canonical(s << a.shift(0)) + t * leaf, pml4,
                                       st.one_of(st.sampled_from([0, 1, 511, 0x3FFFF]), st.integers(0, 0x3FFFF))))
    table = draw(st.one_of(*table_choices))
    # A bitmap kernel's bitmap window is the last pages of that table: the temp-map window stays below it.
    v["pmm_kind"] = draw(st.sampled_from(PMM_KINDS))
    bitmap_pages = BITMAP_PAGES[arch] if v["pmm_kind"] == "bitmap" else 0
    slots = min(slots, entries - bitmap_pages)
    v["tempmap_slots"] = slots
    v["tempmap_base"] = table + _edge_int(draw, 0, (entries - bitmap_pages - slots) * PAGE, PAGE)
    taken.append((v["tempmap_base"], v["tempmap_base"] + slots * PAGE))
    if bitmap_pages:
        taken.append((table + (entries - bitmap_pages) * PAGE, table + leaf))

    # The vmm window: in a gap of the kernel half the others leave, at least the heap's window and the room
    # beyond it, ending below the top of the address space. One draw in eight probes past what the rules are
    # believed to need (a window the heap does not fit, or barely; one that ends at the top of the address space):
    # the rules must refuse it, or the kernel built from it is booted and must pass.
    heap = Layout.heap_slab_pages * PAGE
    probe = draw(st.integers(0, 7)) == 0
    least_vmm = draw(st.sampled_from([PAGE, heap - PAGE, heap, heap + PAGE, heap + leaf])) if probe else heap + 2 * leaf
    room = [(s, e) for s, e in gaps(half, top if probe else top - PAGE, taken) if e - s >= least_vmm]
    assume(room)
    start, end = draw(st.sampled_from(room))
    size = least_vmm if probe else _edge_int(draw, least_vmm, min(end - start, VMM_SIZE_CAP) // PAGE * PAGE, PAGE)
    v["vmm_size"] = size
    v["vmm_base"] = start + _edge_int(draw, 0, (end - start - size) // PAGE * PAGE, PAGE)

    # RAM: what the layout says the kernel needs, or more.
    try:
        needed = compute(Config.for_arch(arch, **v, machine_memory_mib=a.max_memory_mib)).ram_needed
    except ConfigError as err:
        note(f"refused: {err}")
        assume(False)
    least_mib = max(16, -(-needed // MIB))
    if draw(st.integers(0, 7)) == 0:        # a probe: RAM that ends where the image window ends, or just after
        least_mib = max(16, -(-(v["kernel_load_address"] + v["kernel_max_size"]) // MIB))
    cap = min(memory_cap or a.max_memory_mib, a.max_memory_mib)
    assume(least_mib <= cap)
    edges = [m for m in RAM_EDGES_MIB if least_mib <= m <= cap]
    v["machine_memory_mib"] = draw(st.one_of(st.just(least_mib), st.just(max(least_mib, min(128, cap))),
                                             st.integers(least_mib, cap), *[st.sampled_from(edges)] * bool(edges)))
    return v


# Pages of a bitmap kernel's bitmap window (a bit per frame of the most RAM the architecture takes).
BITMAP_PAGES = {arch: -(-ARCHES[arch].max_memory_mib * MIB // PAGE // 8 // PAGE) for arch in ARCH_NAMES}


def valid_configs(arch: str, memory_cap: int | None = None):
    """Configs the rules accept (the few drawn values they refuse are dropped)."""
    def accepted(values: dict):
        config = Config.for_arch(arch, **values)
        try:
            compute(config)
        except ConfigError as err:
            note(f"refused: {err}")
            return None
        return config
    return valid_values(arch, memory_cap).map(accepted).filter(lambda c: c is not None)


# Values past every edge: the limits of each architecture, one more, one less, a page off, huge, negative-free.
def _wild_ints(arch: str):
    top = top_of(arch)
    edges = [0, 1, PAGE - 1, PAGE, 0x100000, 0x3FF000, 0x400000, 0x400001, 1 << 31, (1 << 32) - PAGE, 1 << 32,
             (1 << 32) + PAGE, TOP_2_GIB, top - PAGE, top - 1, top, top + PAGE, 1 << 64, (1 << 64) - 1, 2 ** 100,
             16 ** 5000, 1023, 1024, 511, 512, 16, 3072, 3073, 16384, 16385, ARCHES[arch].kernel_half
             if arch != "i386" else 0xC0000000]
    return st.one_of(st.sampled_from(edges), st.integers(0, top * 2), st.integers(0, 4096),
                     st.integers(0, top // PAGE).map(lambda p: p * PAGE))


INT_FIELDS = ("kernel_virtual_base", "kernel_load_address", "kernel_max_size", "kernel_stack_size",
              "paging_recursive_slot", "paging_foreign_slot", "tempmap_base", "tempmap_slots", "vmm_base", "vmm_size",
              "machine_memory_mib")


@st.composite
def any_configs(draw, arch: str) -> Config:
    """A config for `arch` with one to three keys set to anything an integer key can hold, near a valid one or not."""
    base = draw(st.one_of(st.just({}), valid_values(arch)))
    fields = draw(st.lists(st.sampled_from([f for f in INT_FIELDS if hasattr(Config, f)]), min_size=1, max_size=3,
                           unique=True))
    values = {f: draw(_wild_ints(arch)) for f in fields}
    kept = {f: x for f, x in base.items() if f not in values and draw(st.booleans())}
    return Config.for_arch(arch, **kept, **values)


# ---- without a VM: accepted layouts are sound, refusals name a key that was set --------------------------------

def windows_of(config: Config) -> dict[str, tuple[int, int]]:
    """The kernel-half windows, computed here from the config's values (not from Layout.regions)."""
    arch = ARCHES[config.arch]
    image = config.kernel_virtual_base + config.kernel_load_address
    out = {"image": (image, image + config.kernel_max_size),
           "recursive": slot_window(config.arch, config.paging_recursive_slot),
           "temp-map": (config.tempmap_base, config.tempmap_base + config.tempmap_slots * PAGE),
           "vmm": (config.vmm_base, config.vmm_base + config.vmm_size)}
    if hasattr(config, "paging_foreign_slot"):
        out["foreign"] = slot_window(config.arch, config.paging_foreign_slot)
    if getattr(config, "pmm_kind", "stack") == "bitmap":
        leaf = arch.span(arch.levels - 2)
        table_end = config.tempmap_base // leaf * leaf + leaf
        out["pmm bitmap"] = (table_end - BITMAP_PAGES[config.arch] * PAGE, table_end)
    assert arch  # every window above is in this architecture's terms
    return out


def _wide_constants(arch: str) -> frozenset:
    bits = 8 * ARCHES[arch].word_size
    consts = compute(Config.for_arch(arch)).asm_constants()
    return frozenset(k for k, v in consts.items() if not -(1 << bits - 1) <= v < 1 << bits)


WIDE_BY_NATURE = {arch: _wide_constants(arch) for arch in ARCH_NAMES}


def check_accepted(config: Config, layout: Layout):
    arch = ARCHES[config.arch]
    top = top_of(config.arch)
    half = kernel_half_start(config.arch, config.kernel_virtual_base)
    windows = windows_of(config)
    names = sorted(windows)
    for i, x in enumerate(names):
        (s, e) = windows[x]
        assert half <= s < e <= top, f"{x} window [{s:#x}, {e:#x}) leaves the kernel half [{half:#x}, {top:#x})"
        assert arch.is_canonical(s) and arch.is_canonical(e - 1), f"{x} window is not canonical"
        for y in names[i + 1:]:
            (s2, e2) = windows[y]
            assert e <= s2 or e2 <= s, f"{x} [{s:#x}, {e:#x}) overlaps {y} [{s2:#x}, {e2:#x})"
    # The boot identity window lies below the kernel base and 4 GiB (Multiboot loads below 4 GiB).
    assert config.kernel_load_address >= 0x100000
    assert config.kernel_load_address + config.kernel_max_size <= min(config.kernel_virtual_base, 1 << 32)
    if config.arch != "i386":
        assert windows["image"][0] >= TOP_2_GIB
    # The temp-map window lies in one last-level table, so its PTEs are consecutive.
    leaf = arch.span(arch.levels - 2)
    assert config.tempmap_base // leaf == (windows["temp-map"][1] - 1) // leaf
    # The kernel's own needs: RAM above the image, a vmm window the heap fits in with room to spare.
    assert config.machine_memory_mib * MIB >= config.kernel_load_address + config.kernel_max_size + RAM_ABOVE_IMAGE
    assert config.vmm_size > layout.heap_slab_pages * PAGE
    # Every constant a template may name is a word of the architecture: the assembler takes no wider immediate
    # (a vmm window ending at 4 GiB gave VMM_END = 2**32, which keystone refused).
    # Descriptors (GDT_KERNEL_*) are 8-byte data in every layout: only constants the config moves must fit.
    bits = 8 * arch.word_size
    wide = {k: v for k, v in layout.asm_constants().items()
            if not -(1 << bits - 1) <= v < 1 << bits and k not in WIDE_BY_NATURE[config.arch]}
    assert not wide, f"constants wider than a {bits}-bit word: " + ", ".join(f"{k} = {v:#x}" for k, v in wide.items())
    # i386: the boot stub writes one PDE per image table, and the temp-map window's own only when it has one.
    if config.arch == "i386":
        consts = layout.asm_constants()
        image_pdes = range(consts["KERNEL_PDE_FIRST"], consts["KERNEL_PDE_FIRST"] + consts["KERNEL_PDE_COUNT"])
        own = consts["TEMPMAP_PDE_INDEX"] not in image_pdes
        assert consts["TEMPMAP_OWN_TABLE"] == own
        assert consts["BOOT_PAGE_TABLES"] == consts["KERNEL_PDE_COUNT"] + own
        assert consts["RECURSIVE_SLOT"] not in image_pdes and consts["RECURSIVE_SLOT"] != consts["TEMPMAP_PDE_INDEX"]


FAST = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])


@pytest.mark.parametrize("arch", ARCH_NAMES)
@FAST
@given(data=st.data())
def test_drawn_valid_configs_are_accepted_and_sound(arch, data):
    """The valid-config generator lands in valid space (so the VM test below samples it well), and what the
    rules accept there is a sound layout."""
    config = data.draw(valid_configs(arch))
    check_accepted(config, compute(config))


@pytest.mark.parametrize("arch", ARCH_NAMES)
@FAST
@given(data=st.data())
def test_any_config_is_accepted_soundly_or_refused_in_one_line_naming_a_key_it_set(arch, data):
    config = data.draw(any_configs(arch))
    try:
        layout = compute(config)
    except ConfigError as err:
        message = str(err)
        assert "\n" not in message and "\r" not in message, message
        assert len(message) < 400, message
        assert message.startswith(f"{config.source}: ")
        named = message[len(config.source) + 2:].split(" = ", 1)[0]
        keys = {Config.key_of(f) for f in config.explicit if f != "arch"}
        assert named in keys, f"names {named}, but the config set only {sorted(keys)}: {message}"
        return
    check_accepted(config, layout)


def test_the_generator_reaches_the_edges_it_is_meant_to():
    """The VM sample is only as good as the generator: it draws windows that share the image's page table and vmm
    windows that end at the top of a gap (checked on a fixed sample)."""
    seen = {"tempmap in image table": False, "vmm against another window": False, "low i386 base": False}
    seen |= {f"x86_64 RAM around {m} MiB": False for m in RAM_SPLIT_MIB}

    @settings(max_examples=600, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
    @given(st.sampled_from(ARCH_NAMES).flatmap(valid_configs))
    def sample(config):
        a = ARCHES[config.arch]
        leaf = a.span(a.levels - 2)
        image = config.kernel_virtual_base + config.kernel_load_address
        if config.tempmap_base // leaf in (image // leaf, (image + config.kernel_max_size - 1) // leaf):
            seen["tempmap in image table"] = True
        ends = {e for s, e in windows_of(config).values()} | {s for s, e in windows_of(config).values()}
        if config.vmm_base in ends or config.vmm_base + config.vmm_size in ends:
            seen["vmm against another window"] = True
        if config.arch == "i386" and config.kernel_virtual_base == I386_MIN_USER_HALF:
            seen["low i386 base"] = True
        if config.arch == "x86_64" and config.machine_memory_mib in RAM_EDGES_MIB:
            seen[f"x86_64 RAM around {min(RAM_SPLIT_MIB, key=lambda m: abs(m - config.machine_memory_mib))} MiB"] = True

    sample()
    assert all(seen.values()), [key for key, reached in seen.items() if not reached]


# ---- with a VM: build each drawn config and run `kgen test` on it ----------------------------------------------

def toml_of(config: Config) -> str:
    """The config as the kgen.toml a user would write: every key it sets, addresses in hex."""
    tables: dict[str, list[str]] = {}
    for field in sorted(config.explicit):
        key = Config.key_of(field)
        value = getattr(config, field)
        table, _, name = key.rpartition(".")
        shown = (f'"{value}"' if isinstance(value, str) else str(value).lower() if isinstance(value, bool)
                 else str(value) if key in ("paging.recursive_slot", "paging.foreign_slot", "tempmap.slots",
                                            "machine.memory_mib") else f"{value:#x}")
        tables.setdefault(table, []).append(f"{name} = {shown}")
    lines = [f'arch = "{config.arch}"']
    for table, items in tables.items():
        if table:
            lines += ["", f"[{table}]", *items]
    return "\n".join(lines) + "\n"


def vm_settings():
    chosen = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=SEED is None,
                      phases=[Phase.explicit, Phase.generate],       # a shrink would boot dozens of kernels
                      suppress_health_check=list(HealthCheck))

    def wrap(test):
        test = chosen(test)
        return seed(int(SEED))(test) if SEED is not None else test
    return wrap


# Many edges at once, always run: every window touches another; i386: the kernel half from 1 GiB, the temp-map
# window in the image's page table, RAM at its minimum (16 MiB reached exactly); x86_64: the image ending at 2**64,
# one temp-map slot in the last PTE below it, the vmm window at its minimum sharing PML4[511], slots 256 and 257.
EDGE_CONFIGS = {
    "i386": dict(kernel_virtual_base=0x40000000, kernel_load_address=0xA00000, kernel_max_size=0x200000,
                 kernel_stack_size=0x1000, paging_recursive_slot=259, paging_foreign_slot=257,
                 tempmap_base=0x40800000, tempmap_slots=512, vmm_base=0x41000000, vmm_size=0xC00000,
                 machine_memory_mib=16),
    "x86_64": dict(kernel_virtual_base=0xFFFFFFFFFF500000, kernel_load_address=0x900000, kernel_max_size=0x200000,
                   kernel_stack_size=0x20000, paging_recursive_slot=256, paging_foreign_slot=257,
                   tempmap_base=0xFFFFFFFFFFDFF000, tempmap_slots=1, vmm_base=0xFFFFFFFF80000000, vmm_size=0x800000,
                   machine_memory_mib=16),
}


def run_kgen_test(config: Config, work: Path, replay: str = "") -> None:
    path = work / "kgen.toml"
    path.write_text(toml_of(config))
    print(f"{config.arch} config:\n{path.read_text()}{replay}")
    assert compute(load(path)) == compute(config), "the written kgen.toml is not the drawn config"
    result = run_kgen("test", "--config", path, "--out", work / "out", "-j", "1", timeout=600)
    if result.returncode == 2 and "kgen.toml: kernel.max_size = " in result.stderr:
        # The one rule only the linker can check: the image did not fit. A clean refusal, naming the key.
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assume(False)
    tail = "\n".join((result.stdout + result.stderr).splitlines()[-40:])
    assert result.returncode == 0, f"kgen test failed on an accepted config:\n{path.read_text()}{replay}\n{tail}"


@pytest.mark.vm
@needs_qemu
@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_kgen_test_passes_on_the_edge_config(arch, tmp_path):
    config = Config.for_arch(arch, **EDGE_CONFIGS[arch])
    layout = compute(config)
    windows = sorted((r.start, r.end) for r in layout.regions() if r.name != "boot identity window")
    touching = sum(a[1] == b[0] for a, b in zip(windows, windows[1:]))
    if arch == "i386":
        assert touching == len(windows) - 1, "the i386 edge config's windows should all touch"
    else:
        assert touching >= 2 and windows[-1][1] == 1 << 64, "the x86_64 edge config's image should end at 2**64"
    assert layout.memory_bytes <= layout.ram_needed + MIB, "the edge config should have RAM at its minimum"
    run_kgen_test(config, tmp_path)


@pytest.mark.vm
@needs_qemu
def test_kgen_test_passes_with_ram_above_4gib(tmp_path):
    """x86_64 with RAM split around the PCI hole (3 GiB low, the rest from 4 GiB): the check that spreads frames over
    all of RAM reaches the RAM above 4 GiB and none in the hole (it wrote into the hole, "not file-backed guest
    RAM"). Only that check: every boot of this guest writes its 3.5 GiB of poison."""
    config = Config.for_arch("x86_64", machine_memory_mib=SPLIT_RAM_MIB)
    path = tmp_path / "kgen.toml"
    path.write_text(toml_of(config))
    result = run_kgen("test", "--config", path, "--out", tmp_path / "out", "-j", "1",
                      "-k", "fresh_temp_map and tcg", "--", "-rA", timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    assert "PASSED kgen/harness/suite/test_oracles.py::test_cpu_reads_through_a_fresh_temp_map[tcg]" in result.stdout


@pytest.mark.vm
@needs_qemu
@pytest.mark.parametrize("arch", ARCH_NAMES)
@vm_settings()
@given(data=st.data())
def test_kgen_test_passes_on_drawn_valid_configs(arch, data, tmp_path_factory):
    config = data.draw(valid_configs(arch, memory_cap=VM_MEMORY_MIB))
    replay = (f"replay: kgen test --config <the file above>  (sample: KGEN_CONFIG_SEED={SEED or 'unset, derandomized'} "
              f"KGEN_CONFIG_EXAMPLES={EXAMPLES})")
    run_kgen_test(config, tmp_path_factory.mktemp(f"config-{arch}"), replay)
