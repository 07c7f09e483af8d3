"""Address spaces and the foreign slot on a running kernel (poisoned RAM), i386 and x86_64 alike (ids [i386] /
[x86_64]): as_create shares the kernel half and leaves the user half empty, as_switch loads CR3 and the kernel keeps
serving, as_destroy gives back every frame; vmm_map_in / vmm_unmap_in / vmm_translate_in edit a space that is not
running through the foreign slot, seen by the walker from that space's own top table; re-attaching flushes what the
window showed (and a kernel built without that flush is caught); a model-based run of create / attach / map / unmap /
switch / destroy against a Python model. Slots, windows and spans come from the layout and the architecture record.
"""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kgen.arch import hw
from kgen.build.config import Config
from kgen.guest.pagewalk import Walker
from kgen.guest.pmmview import PmmView

from conftest import KVM_ONLY, X86_64_ONLY, DrivenModel, op_lists, open_session, run_model, shared_build

pytestmark = [pytest.mark.vm]
USER_FLAGS = hw.PTE_P | hw.PTE_RW | hw.PTE_US


# ---- reading a space ---------------------------------------------------------------------------------------------
def top_entries(s, top: int) -> list[int]:
    size = s.layout.arch.entry_size
    data = s.machine.read_phys(top, hw.PAGE_SIZE)
    return [int.from_bytes(data[i:i + size], "little") for i in range(0, hw.PAGE_SIZE, size)]


def space_walker(s, top: int) -> Walker:
    """A walk of the space whose top-level table is at `top` (not necessarily the one in CR3)."""
    paging = s.layout.arch.paging
    return Walker(s.machine.read_phys, top, paging, pse=True, nxe=bool(paging.nx_levels),
                  recursive_slot=s.layout.recursive_slot)


def user_mappings(s, top: int) -> dict[int, int]:
    """vaddr -> frame of every page the space maps below the kernel half."""
    w = space_walker(s, top)
    return {m.vstart + off: m.pstart + off for m in w.mappings() if m.vstart < s.layout.user_half_end
            for off in range(0, m.size, hw.PAGE_SIZE)}


def user_tables(s, top: int) -> set[tuple[int, ...]]:
    """Index paths of the tables below the top one that serve the user half."""
    first_kernel = s.layout.asm_constants()["KERNEL_HALF_FIRST_SLOT"]
    return {path for path, _ in space_walker(s, top).page_tables() if path[0] < first_kernel}


def boot_top(s) -> int:
    return s.symbol("boot_top_table") - s.layout.kernel_virtual_base


def live_spaces(s) -> list[tuple[int, int]]:
    """(top-level table, generation) of every live record in the kernel's as_spaces table."""
    base, word = s.symbol("as_spaces"), s.word_size
    records = [(s.read_word(base + 2 * word * i), s.read_word(base + 2 * word * i + word))
               for i in range(s.layout.as_max_spaces)]
    return [r for r in records if r[0]]


def cr3(s) -> int:
    s.machine.stop()
    try:
        return s.machine.registers().cr3 & s.layout.arch.paging.cr3_mask
    finally:
        s.machine.cont()


def user_address(layout, slot: int, *indices: int) -> int:
    """The user-half page with top-level index `slot` and the given indices below it (missing ones 0)."""
    arch = layout.arch
    v = slot << arch.shift(0)
    for level, i in enumerate(indices, start=1):
        v += i << arch.shift(level)
    return v


def path_of(layout, vaddr: int) -> list[tuple[int, ...]]:
    arch = layout.arch
    idx = [(vaddr >> arch.shift(level)) & (arch.entries_per_table - 1) for level in range(arch.levels)]
    return [tuple(idx[:level]) for level in range(1, arch.levels)]


def check_kernel_half_shared(s, top: int) -> None:
    layout = s.layout
    first_kernel = layout.asm_constants()["KERNEL_HALF_FIRST_SLOT"]
    boot, mine = top_entries(s, boot_top(s)), top_entries(s, top)
    names = layout.arch.paging.level_names
    for i in range(first_kernel, layout.arch.entries_per_table):
        if i == layout.recursive_slot:
            assert mine[i] & layout.arch.paging.frame_mask == top, f"{names[0]}[{i}] is not the self-map"
            assert not mine[i] & hw.PTE_US
        elif i == layout.foreign_slot:
            assert mine[i] == 0, f"{names[0]}[{i}] (foreign slot) is {mine[i]:#x} in a space that is not running"
        else:
            cpu_bits = hw.PTE_A | hw.PTE_D
            assert mine[i] & ~cpu_bits == boot[i] & ~cpu_bits, \
                f"{names[0]}[{i}] differs: {mine[i]:#x} here, {boot[i]:#x} in the boot space"


# ---- step 1: create, switch, destroy -----------------------------------------------------------------------------
def test_new_space_shares_the_kernel_half_and_has_an_empty_user_half(kernel):
    s = kernel
    free = s.call("pmm_stats_free")
    top = s.call("as_create")
    assert top and top % hw.PAGE_SIZE == 0
    assert s.call("pmm_stats_free") == free - 1, "a new space costs exactly its top-level table"
    check_kernel_half_shared(s, top)
    first_kernel = s.layout.asm_constants()["KERNEL_HALF_FIRST_SLOT"]
    assert top_entries(s, top)[:first_kernel] == [0] * first_kernel, "user half not empty (poison left?)"
    assert (top, s.variable("vmm_kernel_pde_generation", 4)) in live_spaces(s)
    assert top_entries(s, boot_top(s))[s.layout.foreign_slot] == 0, "as_create left the foreign slot in use"
    assert s.variable("as_attached") == 0


def test_switch_loads_cr3_and_the_kernel_keeps_serving(kernel):
    s = kernel
    top = s.call("as_create")
    assert s.call("as_switch", top) == 1
    assert cr3(s) == top
    assert s.call("as_current") == top
    frame = s.call("pmm_alloc")                       # kernel code, data, stack and the temp map all still there
    assert frame and s.call("pmm_free", frame) == 1
    assert s.call("as_switch", boot_top(s)) == 1
    assert cr3(s) == boot_top(s)
    assert s.call("as_switch", top + hw.PAGE_SIZE) == 0, "switched to a frame that is no address space"
    assert cr3(s) == boot_top(s)


def test_destroy_gives_back_every_frame_of_every_level(kernel):
    s = kernel
    layout, arch = s.layout, s.layout.arch
    free = s.call("pmm_stats_free")
    top = s.call("as_create")
    assert s.call("as_attach", top) == 1
    addresses = [user_address(layout, 1), user_address(layout, 1, 3, 5), user_address(layout, 2, 7)]
    frames = [s.call("pmm_alloc") for _ in addresses]
    for v, f in zip(addresses, frames):
        assert s.call("vmm_map_in", top, v, f, USER_FLAGS) == 1
    tables = {p for v in addresses for p in path_of(layout, v)}
    assert user_tables(s, top) == tables
    assert s.call("pmm_stats_free") == free - 1 - len(frames) - len(tables)
    held = {f for f in frames} | {top} | {frame for path, frame in space_walker(s, top).page_tables()
                                         if path in tables}
    assert s.call("as_destroy", top) == 1
    assert s.call("pmm_stats_free") == free
    stack = set(PmmView.of(s).free_stack())
    assert held <= stack, f"not given back: {sorted(hex(f) for f in held - stack)}"
    assert top not in [t for t, _ in live_spaces(s)]
    assert s.variable("as_attached") == 0
    assert top_entries(s, boot_top(s))[layout.foreign_slot] == 0
    assert arch.levels == len(path_of(layout, addresses[0])) + 1


def test_destroy_refuses_the_running_space_the_boot_space_and_strangers(kernel):
    s = kernel
    top = s.call("as_create")
    assert s.call("as_destroy", boot_top(s)) == 0
    assert s.call("as_switch", top) == 1
    assert s.call("as_destroy", top) == 0
    assert s.call("as_switch", boot_top(s)) == 1
    assert s.call("as_destroy", top + hw.PAGE_SIZE) == 0
    assert s.call("as_destroy", top) == 1
    assert s.call("as_destroy", top) == 0, "destroyed twice"


def test_a_kernel_table_made_later_reaches_every_space(kernel):
    """i386: a kernel page table made in one space must appear in another before it runs (the generation counter
    in vmm.s; as_switch re-copies). x86_64: the kernel half's PDPTs are made at boot, so nothing changes."""
    s = kernel
    layout = s.layout
    top = s.call("as_create")
    span = layout.leaf_table_span
    # A kernel address in the vmm window whose page table does not exist yet: the last leaf-table span of it.
    v = layout.vmm_window.end - span + 3 * hw.PAGE_SIZE
    assert s.call("vmm_translate", v) == layout.vmm_none
    frame = s.call("pmm_alloc")
    assert s.call("vmm_map", v, frame, hw.PTE_P | hw.PTE_RW) == 1
    s.machine.stop()
    s.machine.write_phys(frame, (0x5A5AC0DE).to_bytes(4, "little"))
    s.machine.cont()
    assert s.call("as_switch", top) == 1
    assert s.call("kmem_read32", v) == 0x5A5AC0DE     # would fault with a stale kernel half
    check_kernel_half_shared(s, top)
    assert s.call("as_switch", boot_top(s)) == 1
    assert s.call("vmm_unmap", v) == frame
    # i386: `top` still holds the freed kernel table's PDE until it runs again; the invariants know it is stale
    from kgen.guest import invariants
    assert invariants.check_address_spaces(view_of(s)) == []
    assert s.call("as_switch", top) == 1
    check_kernel_half_shared(s, top)                  # the freed kernel table is gone here too
    assert invariants.check_address_spaces(view_of(s)) == []
    assert s.call("as_switch", boot_top(s)) == 1


# ---- step 2: the foreign slot ------------------------------------------------------------------------------------
def test_map_unmap_translate_in_a_space_that_is_not_running(kernel):
    s = kernel
    layout = s.layout
    free = s.call("pmm_stats_free")
    top = s.call("as_create")
    v = user_address(layout, 3, 1, 2) + 0x123
    frame = s.call("pmm_alloc")
    assert s.call("vmm_map_in", top, v, frame, USER_FLAGS) == 0, "mapped in a space that is not attached"
    assert s.call("as_attach", top) == 1
    assert top_entries(s, boot_top(s))[layout.foreign_slot] & layout.arch.paging.frame_mask == top
    assert s.call("vmm_map_in", top, v, frame, USER_FLAGS) == 1
    assert s.call("vmm_map_in", top, v, frame, USER_FLAGS) == 0, "mapped twice"
    assert s.call("vmm_map_in", top, layout.kernel_half_start, frame, USER_FLAGS) == 0, "mapped in the kernel half"
    assert s.call("vmm_translate_in", top, v) == frame + 0x123
    assert s.call("vmm_translate", v) == layout.vmm_none, "the running space saw a foreign mapping"
    t = space_walker(s, top).translate(v)
    assert t is not None and t.paddr == frame + 0x123 and t.attrs & hw.PTE_US and t.attrs & hw.PTE_RW
    assert user_mappings(s, boot_top(s)) == {}
    assert user_tables(s, top) == set(path_of(layout, v))
    # every table of the path sits at its foreign-window address: the page the window shows is the table
    for level, path in enumerate(path_of(layout, v), start=1):
        window_page = layout.foreign_entry_address(v, level) & ~(hw.PAGE_SIZE - 1)
        table = dict(space_walker(s, top).page_tables())[path]
        assert s.call("vmm_translate", window_page) == table
    assert s.call("vmm_unmap_in", top, v) == frame
    assert s.call("vmm_translate_in", top, v) == layout.vmm_none
    assert user_tables(s, top) == set(), "tables of an emptied path not given back"
    assert s.call("vmm_unmap_in", top, v) == layout.vmm_none
    assert s.call("pmm_free", frame) == 1
    s.call("as_detach")
    assert s.variable("as_attached") == 0
    assert top_entries(s, boot_top(s))[layout.foreign_slot] == 0
    assert s.call("as_destroy", top) == 1
    assert s.call("pmm_stats_free") == free


def window_problems(s) -> list[str]:
    """Two spaces map the same user page to different frames through the foreign slot; then attach A and read A's
    PTE through the foreign window (so the TLB holds that window page), attach B and read again. -> what went wrong:
    a refused map (the window still showed the other space's table), or a read that shows the previous space."""
    layout = s.layout
    v = user_address(layout, 4, 2)
    a, b = s.call("as_create"), s.call("as_create")
    frames = {a: s.call("pmm_alloc"), b: s.call("pmm_alloc")}
    problems = []
    for top in (a, b):
        assert s.call("as_attach", top) == 1
        if s.call("vmm_map_in", top, v, frames[top], USER_FLAGS) != 1:
            problems.append(f"vmm_map_in refused {v:#x} in space {top:#x}: the window still showed a mapping there")
    pte = layout.foreign_entry_address(v, layout.arch.levels - 1)
    for top in (a, b, a):
        assert s.call("as_attach", top) == 1
        seen = s.call("kmem_read32", pte) & ~(hw.PAGE_SIZE - 1)
        if seen != frames[top] & 0xFFFFFFFF:
            problems.append(f"attached {top:#x}: its PTE for {v:#x} through the window reads {seen:#x}, "
                            f"expected {frames[top]:#x}")
        if s.call("vmm_translate_in", top, v) != frames[top]:
            problems.append(f"attached {top:#x}: vmm_translate_in({v:#x}) is not its frame {frames[top]:#x}")
    return problems


def test_reattaching_the_foreign_slot_shows_the_new_space(kernel):
    assert window_problems(kernel) == []


def test_a_kernel_that_does_not_flush_on_reattach_is_caught(tmp_path_factory, arch):
    variant = shared_build(tmp_path_factory, Config.for_arch(arch, aspace_skip_foreign_flush=True))
    with open_session(variant) as s:
        problems = window_problems(s)
    assert problems, "a foreign slot changed without a flush went unnoticed"


# ---- the model ---------------------------------------------------------------------------------------------------
class SpacesModel(DrivenModel):
    """Live spaces and what each maps: vaddr -> frame. Every page is mapped through the foreign slot, usually while
    another space is running; the free count must equal the start's minus one top table per space, the tables
    each space's pages need and the frames handed to spaces; every space's tables must match."""

    def __init__(self, s):
        self.s = s
        self.layout = layout = s.layout
        arch = layout.arch
        choices = [(1, 2)] + [(1, 300)] * (arch.levels - 2) + [(0, 5, arch.entries_per_table - 1)]
        pool = [0]
        for level, picks in enumerate(choices):
            pool = [v + (i << arch.shift(level)) for v in pool for i in picks]
        self.pool = pool
        self.start_free = s.call("pmm_stats_free")
        self.boot = boot_top(s)
        self.spaces: dict[int, dict[int, int]] = {}
        self.current = self.boot

    def tables(self, top: int) -> set[tuple[int, ...]]:
        return {p for v in self.spaces[top] for p in path_of(self.layout, v)}

    def expected_free(self) -> int:
        return self.start_free - sum(1 + len(self.tables(t)) + len(m) for t, m in self.spaces.items())

    def pick_space(self, pick: int) -> int | None:
        return sorted(self.spaces)[pick % len(self.spaces)] if self.spaces else None

    def create(self, pick: int) -> None:
        if len(self.spaces) >= 4:
            return self.destroy(pick)
        top = self.s.call("as_create")
        assert top, "as_create failed with plenty of frames"
        self.spaces[top] = {}

    def destroy(self, pick: int) -> None:
        top = self.pick_space(pick)
        if top is None:
            return
        if top == self.current:
            assert self.s.call("as_destroy", top) == 0, "destroyed the running space"
            return
        held = set(self.spaces[top].values())
        assert self.s.call("as_destroy", top) == 1
        del self.spaces[top]
        assert held <= set(PmmView.of(self.s).free_frames()), "a destroyed space's page is not free"

    def map(self, pick: int, which: int) -> None:
        top = self.pick_space(which)
        if top is None:
            return
        v = self.pool[pick % len(self.pool)]
        assert self.s.call("as_attach", top) == 1
        if v in self.spaces[top]:
            assert self.s.call("vmm_map_in", top, v, 0, USER_FLAGS) == 0
            return
        frame = self.s.call("pmm_alloc")
        assert self.s.call("vmm_map_in", top, v, frame, USER_FLAGS) == 1
        self.spaces[top][v] = frame                   # the space owns the frame from now on

    def unmap(self, pick: int, which: int) -> None:
        top = self.pick_space(which)
        if top is None:
            return
        assert self.s.call("as_attach", top) == 1
        mapped = self.spaces[top]
        if not mapped:
            v = self.pool[pick % len(self.pool)]
            assert self.s.call("vmm_unmap_in", top, v) == self.layout.vmm_none
            return
        v = sorted(mapped)[pick % len(mapped)]
        frame = mapped.pop(v)
        assert self.s.call("vmm_unmap_in", top, v) == frame
        assert self.s.call("vmm_translate_in", top, v + 8) == self.layout.vmm_none
        assert self.s.call("pmm_free", frame) == 1

    def switch(self, which: int) -> None:
        choices = [self.boot] + sorted(self.spaces)
        top = choices[which % len(choices)]
        assert self.s.call("as_switch", top) == 1
        self.current = top

    def detach(self) -> None:
        self.s.call("as_detach")
        assert self.s.variable("as_attached") == 0

    # ---- checks ------------------------------------------------------------------------------------------------
    def check(self) -> None:
        s = self.s
        assert s.call("pmm_stats_free") == self.expected_free()
        assert sorted(t for t, _ in live_spaces(s)) == sorted([self.boot] + list(self.spaces))
        assert cr3(s) == self.current
        for top, mapped in self.spaces.items():
            assert user_mappings(s, top) == mapped, f"space {top:#x} maps other pages than the model"
            assert user_tables(s, top) == self.tables(top), f"space {top:#x} holds other tables than its pages need"
            for v, frame in list(mapped.items())[:3]:
                t = space_walker(s, top).translate(v)
                assert t.attrs & hw.PTE_US and t.attrs & hw.PTE_RW
        assert user_mappings(s, self.boot) == {}, "the boot space got a user page"
        from kgen.guest import invariants
        assert invariants.check_address_spaces(view_of(s), idle=s.variable("as_attached") == 0) == []

    def release(self) -> None:
        self.switch(0)
        for top in list(self.spaces):
            self.destroy(sorted(self.spaces).index(top))
        self.detach()
        assert self.s.call("pmm_stats_free") == self.start_free
        assert top_entries(self.s, self.boot)[self.layout.foreign_slot] == 0


PICK, WHICH = st.integers(0, 1 << 16), st.integers(0, 7)
SPACE_OPS = op_lists(("create", PICK), ("create", PICK), ("map", PICK, WHICH), ("map", PICK, WHICH),
                     ("map", PICK, WHICH), ("unmap", PICK, WHICH), ("unmap", PICK, WHICH), ("switch", WHICH),
                     ("destroy", PICK), ("detach",), min_size=10, max_size=60)
SPACE_BATCH = 6
SPACE_SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                           HealthCheck.function_scoped_fixture])


@settings(max_examples=5, **SPACE_SETTINGS)
@given(ops=SPACE_OPS)
def test_random_space_sequences_match_the_model(kernel_build, ops):
    with open_session(kernel_build) as s:
        run_model(SpacesModel(s), ops, check_every=SPACE_BATCH)


@settings(max_examples=2, **SPACE_SETTINGS)
@given(ops=SPACE_OPS)
def test_random_space_sequences_match_the_model_on_a_bitmap_kernel(bitmap_build, ops):
    """The same address spaces over the bitmap frame allocator (pmm.kind = "bitmap")."""
    with open_session(bitmap_build) as s:
        run_model(SpacesModel(s), ops, check_every=SPACE_BATCH)


@settings(max_examples=3, **SPACE_SETTINGS)
@given(ops=SPACE_OPS)
@X86_64_ONLY
@KVM_ONLY
def test_random_space_sequences_match_the_model_under_kvm(kernel, ops):
    run_model(SpacesModel(kernel), ops, check_every=SPACE_BATCH)


# ---- invariants of every live space (kgen/guest/invariants.py) ----------------------------------------------------
def view_of(s):
    from kgen.guest.invariants import GuestView
    s.machine.stop()
    try:
        return GuestView.capture(s.machine, s.elf, s.layout)
    finally:
        s.machine.cont()


def populated_spaces(s) -> list[int]:
    """Three spaces with user pages at every level, the second one running, nothing attached."""
    layout = s.layout
    spaces = [s.call("as_create") for _ in range(3)]
    for n, top in enumerate(spaces):
        assert s.call("as_attach", top) == 1
        for v in (user_address(layout, 1, n), user_address(layout, 2, 3, 4)):
            assert s.call("vmm_map_in", top, v, s.call("pmm_alloc"), USER_FLAGS) == 1
    s.call("as_detach")
    assert s.call("as_switch", spaces[1]) == 1
    return spaces


def test_every_live_space_holds_the_invariants(kernel):
    from kgen.guest import invariants
    s = kernel
    spaces = populated_spaces(s)
    view = view_of(s)
    assert [top for top, _ in invariants.live_spaces(view)] == [boot_top(s)] + spaces
    assert invariants.check_address_spaces(view) == []
    # as_destroy leaves none of a space's frames in any table
    gone = invariants.space_frames(view, spaces[2])
    pages = {user_address(s.layout, 1, 2), user_address(s.layout, 2, 3, 4)}
    assert len(gone) == 1 + len({p for v in pages for p in path_of(s.layout, v)}) + len(pages)
    assert s.call("as_destroy", spaces[2]) == 1
    view = view_of(s)
    assert invariants.check_frames_unreferenced(view, gone) == []
    assert invariants.check_address_spaces(view) == []
    assert s.call("as_switch", boot_top(s)) == 1


def test_the_space_invariants_catch_what_they_check(kernel):
    """Each finding of check_address_spaces and check_frames_unreferenced, provoked by editing a stopped guest."""
    from kgen.guest import invariants
    s = kernel
    layout, arch = s.layout, s.layout.arch
    spaces = populated_spaces(s)
    assert s.call("as_switch", boot_top(s)) == 1
    view = view_of(s)
    assert invariants.check_address_spaces(view) == []
    assert invariants.check_frames_unreferenced(view, invariants.space_frames(view, spaces[0])), \
        "a live space's frames reported as unreferenced"
    size = arch.entry_size
    first_kernel = layout.asm_constants()["KERNEL_HALF_FIRST_SLOT"]
    kernel_slot = (layout.kernel_virtual_start & arch.va_mask) >> arch.shift(0)
    victim = spaces[2]
    original = top_entries(s, victim)
    edits = {   # finding: (entry of the victim's top table, value)
        "the foreign slot holds a space": (layout.foreign_slot, spaces[0] | hw.PTE_P | hw.PTE_RW),
        "the kernel half is not shared": (kernel_slot, original[kernel_slot] ^ hw.PAGE_SIZE),
        "has U/S": (kernel_slot, original[kernel_slot] | hw.PTE_US),
        "the recursive window is user-accessible": (layout.recursive_slot,
                                                    original[layout.recursive_slot] | hw.PTE_US),
        "and also": (0x1, top_entries(s, spaces[0])[1]),   # space 0's user tables, held by the victim as well
    }
    assert first_kernel <= kernel_slot
    for what, (slot, value) in edits.items():
        s.machine.stop()
        s.machine.write_phys(victim + slot * size, value.to_bytes(size, "little"))
        try:
            found = invariants.check_address_spaces(invariants.GuestView.capture(s.machine, s.elf, s.layout))
        finally:
            s.machine.write_phys(victim + slot * size, original[slot].to_bytes(size, "little"))
            s.machine.cont()
        assert any(what in line for line in found), f"'{what}' not found in {found}"
    assert invariants.check_address_spaces(view_of(s)) == []
