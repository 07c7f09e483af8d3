"""The page-table walker, run over tables built by hand in a bytearray.

Expected values come from what each test built, never from the walker: the builder below knows the geometry of
each paging mode on its own, so a walker that misreads a mode disagrees with it.
"""
import re

import pytest
from hypothesis import given, settings, strategies as st

from kgen.errors import KgenError
from kgen.arch.hw import PAGE_SIZE, PTE_A as A, PTE_D as D, PTE_G as G, PTE_P as P, PTE_PCD as PCD, PTE_PS as PS
from kgen.arch.hw import PTE_NX as NX, PTE_PWT as PWT, PTE_RW as RW, PTE_US as US
from kgen.arch.paging import I386, PAE, X86_64
from kgen.guest.pagewalk import Attrs, Mapping, RecursiveWindow, Walker, WalkError

KiB4, MiB2, MiB4, GiB = 1 << 12, 1 << 21, 1 << 22, 1 << 30
PAT = 0x80      # bit 7 of a 4 KiB entry: a cache attribute, not PS


class Memory:
    """Physical RAM as a bytearray; reading outside it raises, as reading unbacked memory from QEMU does."""

    def __init__(self, size=4 << 20, first_frame=0x100000):
        self.ram = bytearray(size)
        self.next_frame = first_frame
        self.reads = []

    def alloc(self):
        frame = self.next_frame
        self.next_frame += PAGE_SIZE
        assert self.next_frame <= len(self.ram), "test RAM full"
        return frame

    def read(self, addr, size):
        self.reads.append((addr, size))
        if addr < 0 or addr + size > len(self.ram):
            raise ValueError(f"{addr:#x}+{size:#x} is outside RAM")
        return bytes(self.ram[addr:addr + size])

    def put(self, addr, value, width):
        self.ram[addr:addr + width] = value.to_bytes(width, "little")


class Tables:
    """Page tables of one geometry (entry width, index bits per level, top first), tables created on demand."""

    def __init__(self, width, bits, top_offset=0):
        self.mem = Memory()
        self.width, self.bits = width, bits
        self.top = self.mem.alloc() + top_offset
        self.tables = {(): self.top}    # index path from the top -> table address

    def index(self, vaddr, level):
        shift = 12 + sum(self.bits[level + 1:])
        return vaddr >> shift & ((1 << self.bits[level]) - 1)

    def entry_addr(self, path, index):
        return self.tables[path] + index * self.width

    def set(self, path, index, value):
        self.mem.put(self.entry_addr(path, index), value, self.width)

    def map(self, vaddr, paddr, flags, level=None, upper=P | RW | US):
        """One entry at `level` (default: the last) mapping vaddr to paddr, with PS above the last level. Tables
        made on the way get `upper`, an int or one value per level."""
        last = len(self.bits) - 1
        level = last if level is None else level
        if level < last:
            flags |= PS
        path = ()
        for lv in range(level):
            i = self.index(vaddr, lv)
            if path + (i,) not in self.tables:
                self.tables[path + (i,)] = self.mem.alloc()
                self.set(path, i, self.tables[path + (i,)] | (upper if isinstance(upper, int) else upper[lv]))
            path += (i,)
        self.set(path, self.index(vaddr, level), paddr | flags)

    def walker(self, mode=I386, **kw):
        return Walker(self.mem.read, self.top, mode, **kw)

    def lower_tables(self):
        return sorted((path, addr) for path, addr in self.tables.items() if path)


def i386():
    return Tables(4, (10, 10))


def only_malformed(walker):
    """The one malformed entry the walker found."""
    found = walker.malformed()
    assert len(found) == 1, found
    return found[0]


# --- translate -------------------------------------------------------------------------------------------------

def test_translate_4k_page():
    t = i386()
    t.map(0xC0000000, 0x00123000, P | RW)
    tr = t.walker().translate(0xC0000ABC)
    assert (tr.vaddr, tr.paddr, tr.size, tr.entry) == (0xC0000ABC, 0x00123ABC, KiB4, 0x00123000 | P | RW)
    assert tr.attrs == P | RW
    pde, pte = t.entry_addr((), 768), t.entry_addr((768,), 0)
    assert [(r.table, r.index, r.addr) for r in tr.chain] == [("PD", 768, pde), ("PT", 0, pte)]
    assert tr.path == f"PD[768] @ {pde:#x} → PT[0] @ {pte:#x}"


def test_translate_4m_page():
    t = i386()
    t.map(0xC0400000, 0x00800000, P | RW | G, level=0)
    w = t.walker()
    tr = w.translate(0xC0456789)
    assert (tr.paddr, tr.size) == (0x00856789, MiB4)
    assert tr.attrs == P | RW | PS | G
    assert [(r.table, r.index, r.addr) for r in tr.chain] == [("PD", 769, t.entry_addr((), 769))]
    assert w.translate(0xC07FFFFF).paddr == 0x00BFFFFF


def test_ps_is_a_table_pointer_without_pse():
    t = i386()
    t.map(0xC0000000, 0x5000, P | RW)
    pt = t.tables[(768,)]
    t.set((), 768, pt | P | RW | US | PS)
    tr = t.walker(pse=False).translate(0xC0000000)
    assert (tr.paddr, tr.size, tr.attrs) == (0x5000, KiB4, P | RW)
    # With PSE the same entry is a 4 MiB page whose frame bits below bit 22 are not all clear: on a CPU whose
    # MAXPHYADDR is 32 (no PSE-36) those are reserved bits ...
    assert pt & 0x3FE000
    w = t.walker(pse=True, maxphyaddr=32)
    bad = only_malformed(w)
    assert (bad.entry.table, bad.entry.index, bad.bits, bad.vrange) == ("PD", 768, pt & 0x3FE000,
                                                                        (0xC0000000, 0xC0400000))
    assert w.translate(0xC0000000) is None and w.mappings() == []
    # ... with PSE-36 (MAXPHYADDR 40), bits 20:13 are address bits 39:32, and bit 21 alone is reserved.
    assert not pt & 1 << 21
    tr = t.walker(pse=True, maxphyaddr=40).translate(0xC0000ABC)
    assert (tr.paddr, tr.size) == ((pt & 0xFFC00000) | (pt >> 13 & 0xFF) << 32 | 0xABC, MiB4)


def test_unmapped_is_none():
    t = i386()
    t.map(0xC0000000, 0x5000, P | RW)
    t.map(0xC0002000, 0x6000, RW | US | D)      # every bit but P
    w = t.walker()
    assert w.translate(0x00000000) is None      # no PDE
    assert w.translate(0xC0001000) is None      # PDE, zero PTE
    assert w.translate(0xC0002000) is None      # PTE not present
    assert w.mappings() == [Mapping(0xC0000000, 0x5000, KiB4, P | RW)]


def test_address_outside_the_mode_is_a_caller_error():
    t = i386()
    with pytest.raises(ValueError):
        t.walker().translate(1 << 32)


RIGHTS = [0, RW, US, RW | US]


@pytest.mark.parametrize("pde", RIGHTS)
@pytest.mark.parametrize("pte", RIGHTS)
def test_rw_and_us_need_every_level(pde, pte):
    t = i386()
    t.map(0xC0000000, 0x5000, P | pte, upper=P | pde)
    w = t.walker()
    assert w.translate(0xC0000000).attrs == P | (pde & pte)
    assert w.mappings()[0].attrs == P | (pde & pte)


def test_cache_global_dirty_come_from_the_leaf():
    t = i386()
    t.map(0xC0000000, 0x5000, P | RW | US, upper=P | RW | US | PWT | PCD | A | D | G)
    t.map(0xC0001000, 0x9000, P | RW | US | PWT | PCD | A | D | G | PAT)
    w = t.walker()
    assert w.translate(0xC0000000).attrs == P | RW | US
    assert w.translate(0xC0001000).attrs == P | RW | US | PWT | PCD | A | D | G


def test_attrs_print_as_names():
    assert str(Attrs(P | RW | G)) == "P RW G"
    assert f"{Attrs(P | US | PWT | PCD | A | D | PS)}" == "P US PWT PCD A D PS"
    assert str(Attrs(0)) == "-"
    assert repr(Attrs(P | RW)) == "Attrs(P RW)"
    assert str(Mapping(0xC0000000, 0x100000, 0x2000, Attrs(P | RW))) == "0xc0000000-0xc0002000 → 0x100000 P RW"


# --- mappings ----------------------------------------------------------------------------------------------------

def test_mappings_merge_only_what_continues():
    t = i386()
    for k in range(3):
        t.map(0xC0000000 + k * KiB4, 0x200000 + k * KiB4, P | RW)
    t.map(0xC0003000, 0x203000, P)                  # attributes differ
    t.map(0xC0004000, 0x300000, P)                  # physical gap
    t.map(0xC0006000, 0x301000, P)                  # virtual gap
    t.map(0xC03FF000, 0x500000, P | RW)             # continues across a page-table boundary
    t.map(0xC0400000, 0x501000, P | RW)
    t.map(0xC0800000, 0x0800000, P | RW, level=0)   # two 4 MiB pages that continue
    t.map(0xC0C00000, 0x0C00000, P | RW, level=0)
    t.map(0xC1000000, 0x1000000, P | RW)            # continues, but is not a large page
    assert t.walker().mappings() == [
        Mapping(0xC0000000, 0x200000, 3 * KiB4, P | RW),
        Mapping(0xC0003000, 0x203000, KiB4, P),
        Mapping(0xC0004000, 0x300000, KiB4, P),
        Mapping(0xC0006000, 0x301000, KiB4, P),
        Mapping(0xC03FF000, 0x500000, 2 * KiB4, P | RW),
        Mapping(0xC0800000, 0x0800000, 2 * MiB4, P | RW | PS),
        Mapping(0xC1000000, 0x1000000, KiB4, P | RW),
    ]


def test_page_tables_are_exactly_those_built():
    t = i386()
    for pdi in (0, 1, 768, 1022):
        t.map(pdi << 22 | 0x5000, 0x7000, P | RW)
    t.map(2 << 22, 0x800000, P | RW, level=0)       # a page, not a table
    t.set((), 3, 0x00ABC000 | RW)                   # not present
    assert t.walker().page_tables() == t.lower_tables()


# --- recursive slot ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("slot", [1023, 1000])
@pytest.mark.parametrize("named", [False, True])
def test_recursive_slot(slot, named):
    t = i386()
    t.map(0x00000000, 0x00000000, P | RW, level=0)
    for k in range(4):
        t.map(0xC0000000 + k * KiB4, 0x100000 + k * KiB4, P | RW | G)
    t.map(0x01405000, 0x9000, P | RW | US)
    t.set((), slot, t.top | P | RW)
    w = t.walker(recursive_slot=slot if named else None)

    base = slot << 22
    assert w.recursive_windows() == [RecursiveWindow(slot, base, MiB4, P | RW, t.entry_addr((), slot))]
    assert w.mappings() == [
        Mapping(0x00000000, 0x00000000, MiB4, P | RW | PS),
        Mapping(0x01405000, 0x9000, KiB4, P | RW | US),
        Mapping(0xC0000000, 0x100000, 4 * KiB4, P | RW | G),
    ]
    assert w.page_tables() == t.lower_tables()

    # Through the window, page i of the window is page table i and page `slot` is the directory itself.
    for (pdi,), pt in t.lower_tables():
        tr = w.translate(base | pdi << 12 | 0x10)
        assert (tr.paddr, tr.size) == (pt + 0x10, KiB4)
        assert [r.index for r in tr.chain] == [slot, pdi]
    assert w.translate(base | slot << 12).paddr == t.top
    assert w.translate(base | 500 << 12) is None


def test_named_recursive_slot_that_is_not_recursive():
    t = i386()
    t.set((), 1023, t.top | P | RW)
    with pytest.raises(WalkError, match=rf"PD\[1022\] @ {t.entry_addr((), 1022):#x}"):
        t.walker(recursive_slot=1022)


# --- corrupt tables ----------------------------------------------------------------------------------------------

def test_pde_outside_ram():
    t = i386()
    t.map(0xC0000000, 0x5000, P | RW)
    t.set((), 5, 0x7FFF0000 | P | RW)
    w = t.walker()
    expected = rf"PD\[5\] @ {t.entry_addr((), 5):#x} = 0x7fff0003: PT at 0x7fff0000 cannot be read: .*outside RAM"
    # The walk goes on: the range below the entry is not mapped, the rest is.
    assert w.translate(5 << 22) is None
    bad = w.malformed_at(5 << 22)
    assert re.search(expected, str(bad)) and bad.vrange == (5 << 22, 6 << 22) and bad.bits == 0
    assert w.mappings() == [Mapping(0xC0000000, 0x5000, KiB4, P | RW)]
    assert w.malformed() == [bad]
    assert w.page_tables() == [((768,), t.tables[(768,)])]
    with pytest.raises(WalkError, match=expected):
        w.read_virtual(5 << 22, 4)


def test_cr3_outside_ram():
    t = i386()
    with pytest.raises(WalkError, match="CR3 0x7ffff000: PD at 0x7ffff000 cannot be read"):
        Walker(t.mem.read, 0x7FFFF000)


def test_short_read():
    t = i386()
    t.map(0xC0000000, 0x5000, P | RW)
    pt = t.tables[(768,)]
    w = Walker(lambda addr, size: t.mem.read(addr, size)[:100] if addr == pt else t.mem.read(addr, size), t.top)
    assert w.translate(0xC0000000) is None
    assert "got 100 of 4096 bytes" in str(w.malformed_at(0xC0000000))


def test_reserved_bits_in_a_4m_entry():
    t = i386()
    t.set((), 7, 0x00C00000 | 1 << 21 | P | PS)
    t.map(0xC0000000, 0x5000, P | RW)
    w = t.walker()
    assert re.search(rf"PD\[7\] @ {t.entry_addr((), 7):#x} = 0xe00081: reserved bits 0x200000 set \(0x200000: "
                    rf"reserved in a 4 MiB PD entry with MAXPHYADDR 40\); 0x1c00000-0x2000000 is not mapped: any access "
                    rf"there is a page fault with error code RSVD", str(only_malformed(w)))
    assert w.translate(7 << 22) is None
    assert w.mappings() == [Mapping(0xC0000000, 0x5000, KiB4, P | RW)]


# --- efficiency --------------------------------------------------------------------------------------------------

def test_each_table_is_read_once_in_one_piece():
    t = i386()
    t.map(0, 0, P | RW, level=0)
    for k in range(256):
        t.map(0xC0000000 + k * KiB4, 0x100000 + k * KiB4, P | RW)
    t.map(0xC0400000, 0x700000, P | RW)
    t.set((), 1023, t.top | P | RW)
    w = t.walker()
    w.mappings()
    w.page_tables()
    w.translate(0xC0001000)
    w.translate(0xFFFFF000)
    assert sorted(t.mem.reads) == sorted([(t.top, PAGE_SIZE)] + [(pt, PAGE_SIZE) for _, pt in t.lower_tables()])


# --- property: mappings() and translate() reconstruct what was built ---------------------------------------------

LEAF = PWT | PCD | A | D | G
runs = st.lists(st.tuples(
    st.one_of(st.integers(0, (1 << 20) - 1), st.integers(0xBFF00, 0xC0800)),   # first virtual page
    st.integers(1, 1500),                                                         # pages
    st.integers(0, (1 << 20) - 1),                                                # first physical frame
    st.integers(0, 0x1FF).map(lambda f: f & ~P),                                  # flags besides P
    st.booleans(),                                                                # present
), max_size=6)


@settings(deadline=None, max_examples=150)
@given(runs=runs, pde_rights=st.tuples(*[st.sampled_from(RIGHTS)] * 4))
def test_mappings_and_translate_match_what_was_built(runs, pde_rights):
    t = i386()
    expected = {}       # virtual page -> (physical frame, effective attributes)
    for vpn, count, ppn, flags, present in runs:
        count = min(count, (1 << 20) - vpn, (1 << 20) - ppn)
        for k in range(count):
            rights = pde_rights[(vpn + k) >> 10 & 3]
            t.map((vpn + k) << 12, (ppn + k) << 12, flags | (P if present else 0), upper=P | rights)
            if present:
                expected[vpn + k] = (ppn + k, P | flags & LEAF | flags & rights)
            else:
                expected.pop(vpn + k, None)
    w = t.walker()

    got = {}
    ms = w.mappings()
    for m in ms:
        assert m.vstart % KiB4 == m.pstart % KiB4 == m.size % KiB4 == 0
        for k in range(m.size >> 12):
            got[(m.vstart >> 12) + k] = ((m.pstart >> 12) + k, m.attrs)
    assert got == expected
    for a, b in zip(ms, ms[1:]):
        assert a.vstart + a.size <= b.vstart
        assert not (a.vstart + a.size == b.vstart and a.pstart + a.size == b.pstart and a.attrs == b.attrs)

    for vpn, (ppn, attrs) in expected.items():
        offset = vpn * 0x123 & 0xFFF
        tr = w.translate(vpn << 12 | offset)
        assert (tr.paddr, tr.size, tr.attrs) == (ppn << 12 | offset, KiB4, attrs)
    for vpn, count, *_ in runs:
        for near in (vpn - 1, vpn + count):
            if 0 <= near < 1 << 20 and near not in expected:
                assert w.translate(near << 12) is None

    assert w.page_tables() == t.lower_tables()


# --- the same walk over PAE and x86-64 ---------------------------------------------------------------------------

def test_pae():
    t = Tables(8, (2, 9, 9), top_offset=0x20)       # a PDPT is 32 bytes and need only be 32-byte aligned
    t.map(0xC0000000, 0x1_2345_6000, P | RW, upper=(P, P | RW | US))
    t.map(0xC0200000, 0x4000_0000, P | RW | G, level=1, upper=(P, P | RW | US))
    w = t.walker(PAE)
    tr = w.translate(0xC0000ABC)
    assert (tr.paddr, tr.size, tr.attrs) == (0x1_2345_6ABC, KiB4, P | RW)   # a PDPTE has no RW to withhold
    assert [r.table for r in tr.chain] == ["PDPT", "PD", "PT"]
    assert w.mappings() == [
        Mapping(0xC0000000, 0x1_2345_6000, KiB4, P | RW),
        Mapping(0xC0200000, 0x4000_0000, MiB2, P | RW | PS | G),
    ]
    assert w.page_tables() == t.lower_tables()

    t.set((), 3, t.tables[(3,)] | P | RW)
    w = t.walker(PAE)
    bad = only_malformed(w)
    assert re.search(r"PDPT\[3\].*reserved bits 0x2 set \(0x2: reserved in a PDPT entry\)", str(bad)), str(bad)
    assert bad.vrange == (0xC0000000, 1 << 32) and w.mappings() == [] and w.translate(0xC0000000) is None


def test_x86_64():
    t = Tables(8, (9, 9, 9, 9))
    t.map(0x4000_0000, 0x4000_0000, P | RW, level=1)                  # 1 GiB
    t.map(0xFFFF_FFFF_8000_0000, 0x200000, P | RW | G)                # 4 KiB, top 2 GiB
    t.map(0xFFFF_FFFF_8020_0000, 0x400000, P | RW | G, level=2)       # 2 MiB
    t.set((), 510, t.top | P | RW)
    w = t.walker(X86_64, recursive_slot=510)

    tr = w.translate(0xFFFF_FFFF_8000_0123)
    assert (tr.paddr, tr.size, tr.attrs) == (0x200123, KiB4, P | RW | G)
    assert [r.table for r in tr.chain] == ["PML4", "PDPT", "PD", "PT"]
    assert w.translate(0x4123_4567).paddr == 0x4123_4567
    assert w.mappings() == [
        Mapping(0x4000_0000, 0x4000_0000, GiB, P | RW | PS),
        Mapping(0xFFFF_FFFF_8000_0000, 0x200000, KiB4, P | RW | G),
        Mapping(0xFFFF_FFFF_8020_0000, 0x400000, MiB2, P | RW | PS | G),
    ]
    assert w.recursive_windows() == [RecursiveWindow(510, 0xFFFF_FF00_0000_0000, 1 << 39, P | RW,
                                                     t.entry_addr((), 510))]
    self_map = 0xFFFF_0000_0000_0000 | 510 << 39 | 510 << 30 | 510 << 21 | 510 << 12
    assert w.translate(self_map).paddr == t.top
    assert w.page_tables() == t.lower_tables()
    with pytest.raises(ValueError):
        w.translate(0x0000_8000_0000_0000)      # not canonical

    t.set((), 1, 0x7000 | P | PS)
    w = t.walker(X86_64)
    assert re.search(r"PML4\[1\].*reserved bits 0x80 set", str(only_malformed(w)))
    assert only_malformed(w).vrange == (1 << 39, 2 << 39)
    assert len(w.mappings()) == 3


def test_read_virtual_crosses_pages_and_refuses_unmapped():
    mem = bytearray(0x40000)
    pd, pt = 0x1000, 0x2000
    mem[pd:pd + 4] = (pt | P | RW).to_bytes(4, "little")
    # virtual pages 5 and 6 map physical 0x9000 and 0x3000: not contiguous in physical memory
    mem[pt + 5 * 4:pt + 5 * 4 + 4] = (0x9000 | P).to_bytes(4, "little")
    mem[pt + 6 * 4:pt + 6 * 4 + 4] = (0x3000 | P).to_bytes(4, "little")
    mem[0x9FFE:0xA000] = b"ab"
    mem[0x3000:0x3002] = b"cd"
    w = Walker(lambda a, n: bytes(mem[a:a + n]), pd)
    assert w.read_virtual(0x5FFE, 4) == b"abcd"
    assert w.physical_spans(0x5FFE, 4) == [(0x9FFE, 2), (0x3000, 2)]
    with pytest.raises(WalkError, match="0x7000 is not mapped"):
        w.read_virtual(0x6FFE, 4)


# --- x86-64: 4-level tables, canonical addresses, NX -------------------------------------------------------------

# The builder's own view of 4-level geometry, independent of the walker: 9 index bits per level, 48-bit addresses
# sign-extended from bit 47.
LEVELS64 = ("PML4", "PDPT", "PD", "PT")
HIGH = 0xFFFF_0000_0000_0000


def x86_64():
    return Tables(8, (9, 9, 9, 9))


def canonical(vaddr):
    return vaddr | HIGH if vaddr >> 47 & 1 else vaddr


def window_address(slot, path, index):
    """Where entry `index` of the table at index path `path` appears through the recursive PML4 slot `slot`: the
    slot repeated once per level the table sits above the PT level, then the path, then the entry's offset."""
    vaddr = 0
    for i in (slot,) * (4 - len(path)) + tuple(path):
        vaddr = vaddr << 9 | i
    return canonical(vaddr << 12 | index * 8)


def entry_value(t, path, index):
    return int.from_bytes(t.mem.ram[t.entry_addr(path, index):][:8], "little")


@pytest.mark.parametrize("slot", [510, 256, 3])
def test_x86_64_recursive_slot_reaches_the_table_of_every_level(slot):
    t = x86_64()
    kernel = 0xFFFF_FFFF_8010_0000     # PML4[511] PDPT[510] PD[0] PT[256]
    low = 0x0000_0000_0040_2000        # PML4[0] PDPT[0] PD[2] PT[2]
    t.map(kernel, 0x200000, P | RW | G)
    t.map(low, 0x300000, P | RW | US)
    t.set((), slot, t.top | P | RW | NX)
    w = t.walker(X86_64, recursive_slot=slot)

    base = canonical(slot << 39)
    assert w.recursive_windows() == [RecursiveWindow(slot, base, 1 << 39, P | RW | NX, t.entry_addr((), slot))]
    assert base >> 47 & 1 == (slot >= 256)

    for vaddr in (kernel, low):
        for level in range(4):
            path = tuple(t.index(vaddr, lv) for lv in range(level))
            index = t.index(vaddr, level)
            where = window_address(slot, path, index)
            tr = w.translate(where)
            # The recursive entry is RW but not US, and NX: so is every table seen through it.
            assert (tr.paddr, tr.size, tr.attrs) == (t.entry_addr(path, index), KiB4, P | RW | NX), LEVELS64[level]
            assert [r.index for r in tr.chain] == [slot] * (4 - level) + list(path)
            assert [r.table for r in tr.chain] == list(LEVELS64)
            value = entry_value(t, path, index)
            assert value & P and w.read_virtual(where, 8) == value.to_bytes(8, "little")

    assert w.translate(window_address(slot, (), 300)).paddr == t.entry_addr((), 300)     # an empty PML4 slot
    assert w.translate(window_address(slot, (300,), 0)) is None                        # no PDPT under it
    assert w.mappings() == [
        Mapping(low, 0x300000, KiB4, P | RW | US),
        Mapping(kernel, 0x200000, KiB4, P | RW | G),
    ]
    assert w.page_tables() == t.lower_tables()


def test_x86_64_large_pages_in_both_halves():
    t = x86_64()
    t.map(0x0000_0040_0000_0000, 0x1_0000_0000, P | RW | US, level=1)      # 1 GiB, lower half
    t.map(0xFFFF_8000_0000_0000, 0x4000_0000, P | RW, level=1)             # 1 GiB, upper half
    t.map(0x0000_0000_0020_0000, 0x0060_0000, P | RW | US, level=2)        # 2 MiB, lower half
    t.map(0xFFFF_FFFF_8020_0000, 0x0040_0000, P | RW | G | 1 << 12, level=2)  # 2 MiB with PAT, upper half
    w = t.walker(X86_64)

    tr = w.translate(0x0000_0040_2345_6789)
    assert (tr.paddr, tr.size, tr.attrs) == (0x1_2345_6789, GiB, P | RW | US | PS)
    assert [(r.table, r.index) for r in tr.chain] == [("PML4", 0), ("PDPT", 256)]
    tr = w.translate(0xFFFF_8000_3FFF_FFFF)
    assert (tr.paddr, tr.size) == (0x7FFF_FFFF, GiB)
    assert [(r.table, r.index) for r in tr.chain] == [("PML4", 256), ("PDPT", 0)]
    tr = w.translate(0x0000_0000_003F_FFFF)
    assert (tr.paddr, tr.size, tr.attrs) == (0x007F_FFFF, MiB2, P | RW | US | PS)
    tr = w.translate(0xFFFF_FFFF_8021_2345)
    assert (tr.paddr, tr.size, tr.attrs) == (0x0041_2345, MiB2, P | RW | PS | G)
    assert [(r.table, r.index) for r in tr.chain] == [("PML4", 511), ("PDPT", 510), ("PD", 1)]
    assert w.translate(0xFFFF_FFFF_8040_0000) is None
    assert w.mappings() == [
        Mapping(0x0000_0000_0020_0000, 0x0060_0000, MiB2, P | RW | US | PS),
        Mapping(0x0000_0040_0000_0000, 0x1_0000_0000, GiB, P | RW | US | PS),
        Mapping(0xFFFF_8000_0000_0000, 0x4000_0000, GiB, P | RW | PS),
        Mapping(0xFFFF_FFFF_8020_0000, 0x0040_0000, MiB2, P | RW | PS | G),
    ]
    assert w.page_tables() == t.lower_tables()


@pytest.mark.parametrize("level, bad", [(1, 1 << 13), (1, 1 << 29), (2, 1 << 20)])
def test_x86_64_large_page_frames_must_be_aligned(level, bad):
    t = x86_64()
    t.map(0xFFFF_8000_0000_0000, (GiB if level == 1 else MiB2) | bad, P | RW, level=level)
    path = tuple(t.index(0xFFFF_8000_0000_0000, lv) for lv in range(level))
    where = t.entry_addr(path, t.index(0xFFFF_8000_0000_0000, level))
    w = t.walker(X86_64)
    assert w.translate(0xFFFF_8000_0000_0000) is None
    assert re.search(rf"{LEVELS64[level]}\[0\] @ {where:#x} = .*reserved bits {bad:#x} set \({bad:#x}: a "
                    rf"{(GiB if level == 1 else MiB2) >> 20} MiB page's frame must be aligned to its size\)",
                    str(w.malformed_at(0xFFFF_8000_0000_0000)))


@pytest.mark.parametrize("vaddr, pml4", [(0x0000_0000_0000_0000, 0), (0x0000_7FFF_FFFF_F000, 255),
                                         (0xFFFF_8000_0000_0000, 256), (0xFFFF_FFFF_FFFF_F000, 511)])
def test_x86_64_canonical_addresses_at_the_edges_of_both_halves(vaddr, pml4):
    t = x86_64()
    t.map(vaddr, 0x5000, P | RW)
    w = t.walker(X86_64)
    tr = w.translate(vaddr | 0xABC)
    assert (tr.paddr, tr.chain[0].index) == (0x5ABC, pml4)
    assert w.mappings() == [Mapping(vaddr, 0x5000, KiB4, P | RW)]


@pytest.mark.parametrize("vaddr", [0x0000_8000_0000_0000, 0xFFFF_7FFF_FFFF_FFFF, 0x0001_0000_0000_0000,
                                   0x8000_0000_0000_0000, 1 << 64, -1])
def test_x86_64_non_canonical_addresses_are_refused(vaddr):
    t = x86_64()
    t.map(vaddr & 0xFFFF_FFFF_F000, 0x5000, P | RW)      # the same index bits are mapped
    with pytest.raises(ValueError, match="not a x86-64 virtual address"):
        t.walker(X86_64).translate(vaddr)


# (level of the entry that restricts, level of the entry mapping the page: 1 GiB, 2 MiB or 4 KiB)
ON_THE_WAY = [(level, leaf) for leaf in (1, 2, 3) for level in range(leaf + 1)]


@pytest.mark.parametrize("right", [RW, US])
@pytest.mark.parametrize("level, leaf_level", ON_THE_WAY)
def test_x86_64_rw_and_us_need_every_level(right, level, leaf_level):
    """A level that withholds RW or US withholds it from the page however permissive the rest: a present PDPTE
    without US above a user PTE maps a supervisor page."""
    t = x86_64()
    vaddr = 0xFFFF_8000_0000_0000
    full = P | RW | US
    upper = tuple(full & ~right if lv == level else full for lv in range(4))
    t.map(vaddr, 0x4000_0000, upper[leaf_level], level=leaf_level, upper=upper)
    t.map(0x0000_0000_4000_0000, 0x4000_0000, full, level=leaf_level)      # a sibling nothing withholds from
    w = t.walker(X86_64)
    large = PS if leaf_level < 3 else 0
    assert w.translate(vaddr).attrs == full & ~right | large
    assert w.translate(0x4000_0000).attrs == full | large
    assert {m.vstart: m.attrs for m in w.mappings()} == {0x4000_0000: full | large, vaddr: full & ~right | large}


@pytest.mark.parametrize("level, leaf_level", ON_THE_WAY)
def test_x86_64_nx_at_any_level_makes_the_page_nx(level, leaf_level):
    t = x86_64()
    vaddr = 0xFFFF_FFFF_8000_0000
    full = P | RW | US
    upper = tuple(full | NX if lv == level else full for lv in range(4))
    t.map(vaddr, 0x4000_0000, upper[leaf_level], level=leaf_level, upper=upper)
    t.map(0x4000_0000, 0x4000_0000, full, level=leaf_level)               # an executable sibling
    w = t.walker(X86_64)            # nxe defaults to on, as in a kernel that sets EFER.NXE
    large = PS if leaf_level < 3 else 0
    tr = w.translate(vaddr + 0x123)
    assert (tr.paddr, tr.attrs) == (0x4000_0123, full | large | NX)        # bit 63 is no address bit
    assert tr.entry & NX == (NX if level == leaf_level else 0)
    assert w.translate(0x4000_0000).attrs == full | large
    assert [m.attrs for m in w.mappings()] == [full | large, full | large | NX]
    assert "NX" in str(tr.attrs)


def test_nx_above_is_not_undone_below():
    t = x86_64()
    t.map(0xFFFF_8000_0000_0000, 0x5000, P | RW, upper=(P | RW | NX, P | RW, P | RW, P | RW))
    t.map(0xFFFF_8000_0000_1000, 0x6000, P | RW | NX, upper=P | RW | NX)
    w = t.walker(X86_64)
    assert w.translate(0xFFFF_8000_0000_0000).attrs == P | RW | NX
    assert w.translate(0xFFFF_8000_0000_1000).attrs == P | RW | NX


@pytest.mark.parametrize("level", range(4))
def test_xd_with_nxe_off_is_a_reserved_bit_named_by_its_entry(level):
    t = x86_64()
    vaddr = 0xFFFF_FFFF_8010_0000
    upper = tuple(P | RW | NX if lv == level else P | RW for lv in range(4))
    t.map(vaddr, 0x5000, upper[3], upper=upper)
    path = tuple(t.index(vaddr, lv) for lv in range(level))
    index = t.index(vaddr, level)
    ref = rf"{LEVELS64[level]}\[{index}\] @ {t.entry_addr(path, index):#x} = {entry_value(t, path, index):#x}"
    w = t.walker(X86_64, nxe=False)
    assert w.translate(vaddr) is None
    assert re.search(rf"{ref}: reserved bits 0x8000000000000000 set \(0x8000000000000000: XD.*EFER.NXE off\)",
                    str(w.malformed_at(vaddr)))
    w = t.walker(X86_64, nxe=False)
    assert w.mappings() == [] and re.search(ref, str(only_malformed(w)))
    assert t.walker(X86_64, nxe=True).translate(vaddr).attrs == P | RW | NX


def test_x86_64_without_xd_needs_no_nxe():
    t = x86_64()
    t.map(0xFFFF_FFFF_8010_0000, 0x5000, P | RW)
    t.set((), 510, t.top | P | RW)
    assert (t.walker(X86_64, nxe=False).mappings() == t.walker(X86_64, nxe=True).mappings()
            == [Mapping(0xFFFF_FFFF_8010_0000, 0x5000, KiB4, P | RW)])


def test_pae_nx():
    t = Tables(8, (2, 9, 9), top_offset=0x20)
    t.map(0xC0000000, 0x5000, P | RW | NX, upper=(P, P | RW))
    t.map(0xC0200000, 0x40000000, P | RW, level=1, upper=(P, P | RW))
    t.map(0xC0400000, 0x6000, P | RW, upper=(P, P | RW | NX))
    w = t.walker(PAE)
    assert w.translate(0xC0000000).attrs == P | RW | NX
    assert w.translate(0xC0200000).attrs == P | RW | PS
    assert w.translate(0xC0400000).attrs == P | RW | NX
    assert re.search(r"PT\[0\] .*reserved bits 0x8000000000000000 set",
                    str(t.walker(PAE, nxe=False).malformed_at(0xC0000000)).split(" → ")[-1])
    # A PDPTE has no XD: bit 63 there is reserved whatever EFER.NXE says.
    t.set((), 3, t.tables[(3,)] | P | NX)
    for nxe in (True, False):
        assert re.search(r"PDPT\[3\] .*reserved bits 0x8000000000000000 set \(0x8000000000000000: reserved in a "
                        r"PDPT entry\)", str(only_malformed(t.walker(PAE, nxe=nxe))))


def test_nxe_changes_nothing_in_i386():
    t = i386()
    t.map(0xC0000000, 0x5000, P | RW)
    t.map(0xC0400000, 0x800000, P | RW, level=0)
    assert t.walker(nxe=False).mappings() == t.walker(nxe=True).mappings() == [
        Mapping(0xC0000000, 0x5000, KiB4, P | RW), Mapping(0xC0400000, 0x800000, MiB4, P | RW | PS)]


def test_mappings_split_where_only_nx_differs():
    t = x86_64()
    base = 0xFFFF_FFFF_8000_0000
    for k, nx in enumerate((0, 0, NX, NX, 0)):
        t.map(base + k * KiB4, 0x200000 + k * KiB4, P | RW | nx)
    # Continuous across a PT boundary, but the second PT's PDE says NX.
    t.map(base + MiB2 - KiB4, 0x400000 - KiB4, P | RW)
    t.map(base + MiB2, 0x400000, P | RW, upper=(P | RW, P | RW, P | RW | NX))
    t.map(base + MiB2 + KiB4, 0x401000, P | RW | NX)                         # NX twice over: still one run
    # Continuous 2 MiB pages in the next PD's span: NX from the PDPTE of one of them.
    t.map(0x0000_0000_4000_0000 - MiB2, 0x4000_0000 - MiB2, P | RW, level=2)
    t.map(0x0000_0000_4000_0000, 0x4000_0000, P | RW, level=2, upper=(P | RW, P | RW | NX))
    assert t.walker(X86_64).mappings() == [
        Mapping(0x4000_0000 - MiB2, 0x4000_0000 - MiB2, MiB2, P | RW | PS),
        Mapping(0x4000_0000, 0x4000_0000, MiB2, P | RW | PS | NX),
        Mapping(base, 0x200000, 2 * KiB4, P | RW),
        Mapping(base + 2 * KiB4, 0x202000, 2 * KiB4, P | RW | NX),
        Mapping(base + 4 * KiB4, 0x204000, KiB4, P | RW),
        Mapping(base + MiB2 - KiB4, 0x400000 - KiB4, KiB4, P | RW),
        Mapping(base + MiB2, 0x400000, 2 * KiB4, P | RW | NX),
    ]
    # With nothing but NX to tell them apart, the same pages are one run.
    u = x86_64()
    for k in range(5):
        u.map(base + k * KiB4, 0x200000 + k * KiB4, P | RW | NX)
    assert u.walker(X86_64).mappings() == [Mapping(base, 0x200000, 5 * KiB4, P | RW | NX)]


def test_attrs_print_nx():
    assert str(Attrs(P | RW | NX)) == "P RW NX"
    assert str(Attrs(P | US | PS | G | NX)) == "P US PS G NX"
    assert str(Mapping(0xFFFF_FFFF_8000_0000, 0x200000, KiB4, Attrs(P | NX))) == \
        "0xffffffff80000000-0xffffffff80001000 → 0x200000 P NX"


# --- malformed entries: recorded, their subtree skipped, the rest walked ------------------------------------------

KERNEL_VA_AS_ENTRY = 0xFFFF_FFFF_8010_5003     # a kernel virtual address | P | RW, stored where a PDE belongs


def process_space_with_a_virtual_address_as_pde():
    """A 64-bit process space like a public kernel's: its own user page, the kernel's 2 MiB image page, and two PD
    entries in the user half that hold kernel virtual addresses (present: bits 51:40 are set)."""
    t = x86_64()
    t.map(0x40_0000, 0x30_0000, P | RW | US)                           # PML4[0] PDPT[0] PD[2] PT[0]
    t.map(0xFFFF_FFFF_8000_0000, 0x20_0000, P | RW | G, level=2)       # PML4[511] PDPT[510] PD[0]
    for index in (5, 6):
        t.set((0, 0), index, KERNEL_VA_AS_ENTRY + index * 8)
    return t


def test_address_bits_above_maxphyaddr_are_one_finding_each_and_the_rest_is_walked():
    t = process_space_with_a_virtual_address_as_pde()
    w = t.walker(X86_64, maxphyaddr=40)
    found = w.malformed()
    assert [(m.entry.table, m.entry.index, m.entry.addr) for m in found] == [
        ("PD", i, t.entry_addr((0, 0), i)) for i in (5, 6)]
    first = found[0]
    assert first.vrange == (5 * MiB2, 6 * MiB2)
    assert first.bits == 0x000F_FF00_0000_0000           # address bits 51:40; 62:52 are free for software
    text = str(first)
    assert text.startswith(f"PML4[0] @ {t.entry_addr((), 0):#x} → PDPT[0] @ {t.entry_addr((0,), 0):#x} → PD[5] @ "
                           f"{t.entry_addr((0, 0), 5):#x} = {KERNEL_VA_AS_ENTRY + 40:#x}: reserved bits "
                           f"0xfff0000000000 set (0xfff0000000000: address bits above MAXPHYADDR 40)")
    assert "looks like a kernel virtual address" in text and "0xa00000-0xc00000 is not mapped" in text
    assert "error code RSVD" in text
    # The rest: both good mappings, both tables below them; nothing below the malformed entries.
    assert w.mappings() == [Mapping(0x40_0000, 0x30_0000, KiB4, P | RW | US),
                            Mapping(0xFFFF_FFFF_8000_0000, 0x20_0000, MiB2, P | RW | PS | G)]
    assert w.page_tables() == t.lower_tables()
    # An address below it: no translation, as the CPU's reserved-bit fault; the walk names the entry.
    chain, tr = w.walk(5 * MiB2 + 0x123)
    assert tr is None and chain == first.chain and w.malformed_at(5 * MiB2 + 0x123) == first
    assert w.malformed_at(0x40_0000) is None and w.malformed_at(0x80_0000) is None     # mapped; not present
    with pytest.raises(WalkError, match=r"0xa00000 is not mapped.*PD\[5\].*MAXPHYADDR 40"):
        w.read_virtual(5 * MiB2, 8)


def test_without_maxphyaddr_the_same_entry_points_at_a_table_outside_ram():
    # With all 52 address bits allowed, the entry is well-formed and leads to a "table" at 0xfffff80105000.
    t = process_space_with_a_virtual_address_as_pde()
    w = t.walker(X86_64)
    found = w.malformed()
    assert [m.entry.index for m in found] == [5, 6] and [m.bits for m in found] == [0, 0]
    assert "PT at 0xfffff80105000 cannot be read" in str(found[0]) and "outside RAM" in str(found[0])
    assert len(w.mappings()) == 2


def test_a_malformed_entry_is_found_once_through_the_recursive_window_too():
    t = process_space_with_a_virtual_address_as_pde()
    t.set((), 510, t.top | P | RW)
    w = t.walker(X86_64, maxphyaddr=40)
    # The PD seen as a page through the window, and the malformed PDE read there as a PTE: not a translation.
    assert w.translate(window_address(510, (0, 0), 0)).paddr == t.tables[(0, 0)]
    assert w.translate(canonical(510 << 39 | 0 << 30 | 0 << 21 | 5 << 12)) is None
    assert [m.entry.index for m in w.malformed()] == [5, 6]


def test_with_nxe_off_both_bit_63_and_the_address_bits_are_named():
    # The public kernel's case: EFER.NXE off, so bit 63 is reserved too; the finding names both rules, not bit 63
    # alone.
    t = process_space_with_a_virtual_address_as_pde()
    first = t.walker(X86_64, nxe=False, maxphyaddr=40).malformed()[0]
    assert first.bits == 0x8000_0000_0000_0000 | 0x000F_FF00_0000_0000
    assert ("reserved bits 0x800fff0000000000 set (0x8000000000000000: XD, bit 63, is reserved with EFER.NXE off; "
            "0xfff0000000000: address bits above MAXPHYADDR 40)") in str(first)
