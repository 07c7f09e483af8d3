"""The ELF writer (LIEF) checked by an independent reader (pyelftools) and by the tools that load kernels."""
from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kgen.elf
from kgen.elf import write_elf
from kgen.elfinfo import ElfInfo, LoadSegment
from kgen.errors import KgenError, LinkError
from kgen.image import LinkedImage, Section, Symbol

KERNEL_VMA = 0xC0000000
MB_MAGIC, MB_FLAGS = 0x1BADB002, 0x3


def multiboot_header() -> bytes:
    return struct.pack("<III", MB_MAGIC, MB_FLAGS, -(MB_MAGIC + MB_FLAGS) & 0xFFFFFFFF)


def section(name: str, vaddr: int, perms: str, data: bytes = b"", *, nobits_size: int = 0, align: int = 0x10):
    size = nobits_size if nobits_size else len(data)
    return Section(name, vaddr, vaddr - KERNEL_VMA, data, size, perms, nobits=bool(nobits_size), align=align)


TEXT = bytes((i * 7) & 0xFF for i in range(0x200))

IMAGE = LinkedImage(
    entry=0xC0100010,
    sections=(
        section(".multiboot", 0xC0100000, "rx", multiboot_header(), align=4),
        section(".text", 0xC0100010, "rx", TEXT),
        section(".rodata", 0xC0101000, "r", b"kgen kernel\0", align=0x1000),
        section(".data", 0xC0102000, "rw", b"\x11\x22\x33\x44\x55\x66\x77\x88", align=0x1000),
        section(".bss", 0xC0102010, "rw", nobits_size=0x4000),
    ),
    symbols=(
        Symbol("_start", 0xC0100010, ".text", 0x10),
        Symbol("pmm_alloc", 0xC0100090, ".text", 0x40),
        Symbol("banner", 0xC0101000, ".rodata", 12, "object"),
        Symbol("free_top", 0xC0102000, ".data", 4, "object"),
        Symbol("stack_bottom", 0xC0102010, ".bss", 0x4000, "object"),
        Symbol("stack_top", 0xC0106010, ".bss", 0, "object"),
    ),
)

PF_X, PF_W, PF_R = 1, 2, 4
SHF_WRITE, SHF_ALLOC, SHF_EXECINSTR = 1, 2, 4


@pytest.fixture
def kernel(tmp_path: Path) -> Path:
    path = tmp_path / "kernel.elf"
    write_elf(IMAGE, path)
    return path


def read(path: Path, fn):
    with path.open("rb") as stream:
        return fn(ELFFile(stream))


def test_header(kernel):
    def check(elf):
        assert elf.elfclass == 32 and elf.little_endian
        assert elf.header.e_type == "ET_EXEC"
        assert elf.header.e_machine == "EM_386"
        assert elf.header.e_entry == 0xC0100010
    read(kernel, check)


def test_one_load_per_permission_group(kernel):
    def check(elf):
        segments = list(elf.iter_segments())
        assert [s["p_type"] for s in segments] == ["PT_LOAD"] * 3
        got = [(s["p_vaddr"], s["p_paddr"], s["p_filesz"], s["p_memsz"], s["p_flags"], s["p_align"])
               for s in segments]
        assert got == [
            (0xC0100000, 0x100000, 0x210, 0x210, PF_R | PF_X, 0x1000),
            (0xC0101000, 0x101000, 12, 12, PF_R, 0x1000),
            (0xC0102000, 0x102000, 8, 0x4010, PF_R | PF_W, 0x1000),
        ]
        for seg in segments:
            assert seg["p_offset"] % 0x1000 == seg["p_vaddr"] % 0x1000
        assert segments[0]["p_offset"] == 0x1000
        assert segments[0].data()[:12] == multiboot_header()
        assert segments[0].data()[0x10:] == TEXT
        assert segments[2].data() == b"\x11\x22\x33\x44\x55\x66\x77\x88"
        table_end = elf.header.e_phoff + elf.header.e_phnum * elf.header.e_phentsize
        assert table_end <= segments[0]["p_offset"]
    read(kernel, check)


def test_sections(kernel):
    def check(elf):
        names = [s.name for s in elf.iter_sections()]
        assert names[:6] == ["", ".multiboot", ".text", ".rodata", ".data", ".bss"]
        assert set(names[6:]) == {".symtab", ".strtab", ".shstrtab"}
        expected = {
            ".multiboot": ("SHT_PROGBITS", SHF_ALLOC | SHF_EXECINSTR, 0xC0100000, 12, 4),
            ".text": ("SHT_PROGBITS", SHF_ALLOC | SHF_EXECINSTR, 0xC0100010, 0x200, 0x10),
            ".rodata": ("SHT_PROGBITS", SHF_ALLOC, 0xC0101000, 12, 0x1000),
            ".data": ("SHT_PROGBITS", SHF_ALLOC | SHF_WRITE, 0xC0102000, 8, 0x1000),
            ".bss": ("SHT_NOBITS", SHF_ALLOC | SHF_WRITE, 0xC0102010, 0x4000, 0x10),
        }
        for name, (sh_type, flags, addr, size, align) in expected.items():
            sec = elf.get_section_by_name(name)
            assert (sec["sh_type"], sec["sh_flags"], sec["sh_addr"], sec["sh_size"], sec["sh_addralign"]) == \
                (sh_type, flags, addr, size, align), name
        by_name = {sec.name: sec for sec in IMAGE.sections}
        for name in (".multiboot", ".text", ".rodata", ".data"):
            assert elf.get_section_by_name(name).data() == by_name[name].data
        text = elf.get_section_by_name(".text")
        assert text["sh_offset"] % 0x1000 == text["sh_addr"] % 0x1000
        data = elf.get_section_by_name(".data")
        assert elf.get_section_by_name(".bss")["sh_offset"] <= data["sh_offset"] + data["sh_size"]
    read(kernel, check)


def test_symbols(kernel):
    def check(elf):
        symtab = elf.get_section_by_name(".symtab")
        assert symtab["sh_link"] == elf.get_section_index(".strtab")
        symbols = list(symtab.iter_symbols())
        null = symbols[0]
        assert (null.name, null["st_value"], null["st_size"], null["st_shndx"]) == ("", 0, 0, "SHN_UNDEF")
        sections = list(elf.iter_sections())
        got = {s.name: (s["st_value"], s["st_size"], s["st_info"]["type"], s["st_info"]["bind"],
                        sections[s["st_shndx"]].name) for s in symbols[1:]}
        assert got == {
            sym.name: (sym.value, sym.size, "STT_FUNC" if sym.kind == "func" else "STT_OBJECT", "STB_GLOBAL",
                       sym.section)
            for sym in IMAGE.symbols
        }
    read(kernel, check)


@pytest.mark.skipif(shutil.which("grub-file") is None, reason="grub-file not installed (Debian grub-common)")
def test_grub_accepts_it_as_multiboot(kernel):
    assert subprocess.run(["grub-file", "--is-x86-multiboot", str(kernel)]).returncode == 0


@pytest.mark.skipif(shutil.which("readelf") is None, reason="readelf not installed (Debian binutils)")
def test_readelf_has_no_complaint(kernel):
    result = subprocess.run(["readelf", "-lSs", "-W", str(kernel)], capture_output=True, text=True)
    assert result.returncode == 0
    assert "warning" not in (result.stdout + result.stderr).lower()
    assert "error" not in (result.stdout + result.stderr).lower()
    mapping = result.stdout.split("Section to Segment mapping:")[1]
    assert ".multiboot .text" in mapping and ".data .bss" in mapping


def test_elfinfo_round_trip(kernel):
    info = ElfInfo.load(kernel)
    assert info.bits == 32
    assert info.entry == IMAGE.entry
    assert info.segments == (
        LoadSegment(0xC0100000, 0x100000, 0x210, 0x210, readable=True, writable=False, executable=True),
        LoadSegment(0xC0101000, 0x101000, 12, 12, readable=True, writable=False, executable=False),
        LoadSegment(0xC0102000, 0x102000, 8, 0x4010, readable=True, writable=True, executable=False),
    )
    assert {name: (s.value, s.size) for name, s in info.symbols.items()} == \
        {s.name: (s.value, s.size) for s in IMAGE.symbols}
    assert [s.value for s in info.by_address] == sorted(s.value for s in IMAGE.symbols)
    assert info.symbols["banner"].kind == "object" and info.symbols["banner"].section == ".rodata"
    assert info.multiboot_header_offset() == 0x1000


@pytest.mark.parametrize("addr, text", [
    (0xC01000A3, "0xc01000a3 <pmm_alloc+0x13>"),
    (0xC0100090, "0xc0100090 <pmm_alloc>"),
    (0xC010001F, "0xc010001f <_start+0xf>"),
    (0xC01000D0, "0xc01000d0"),                       # past pmm_alloc's size, nothing else covers it
    (0xC0103000, "0xc0103000 <stack_bottom+0xff0>"),
    (0xC0106010, "0xc0106010"),                       # stack_top: unsized, at the very end of .bss
    (0x00100000, "0x00100000"),
])
def test_symbolize(kernel, addr, text):
    assert ElfInfo.load(kernel).symbolize(addr) == text


def test_unsized_symbol_covers_rest_of_its_section(tmp_path):
    image = LinkedImage(IMAGE.entry, IMAGE.sections, (Symbol("kmain", 0xC0100020, ".text"),))
    write_elf(image, tmp_path / "k.elf")
    info = ElfInfo.load(tmp_path / "k.elf")
    assert info.symbolize(0xC010020F) == "0xc010020f <kmain+0x1ef>"
    assert info.symbolize(0xC0100210) == "0xc0100210"


def test_sized_function_wins_over_alias_at_same_address(tmp_path):
    symbols = (Symbol("entry_alias", 0xC0100090, ".text", 0, "object"), Symbol("pmm_alloc", 0xC0100090, ".text", 0x40))
    write_elf(LinkedImage(IMAGE.entry, IMAGE.sections, symbols), tmp_path / "k.elf")
    info = ElfInfo.load(tmp_path / "k.elf")
    assert info.symbolize(0xC0100091) == "0xc0100091 <pmm_alloc+0x1>"
    assert info.symbolize(0xC01000D0) == "0xc01000d0 <entry_alias+0x40>"


def test_elfinfo_rejects_non_elf(tmp_path):
    junk = tmp_path / "not-an-elf.bin"
    junk.write_bytes(b"MZ" + bytes(100))
    with pytest.raises(KgenError) as err:
        ElfInfo.load(junk)
    assert str(junk) in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(KgenError, match="missing.elf"):
        ElfInfo.load(tmp_path / "missing.elf")


def test_no_multiboot_header_outside_window(tmp_path):
    path = tmp_path / "k.elf"
    write_elf(IMAGE, path)
    data = bytearray(path.read_bytes())
    data[0x1000:0x1004] = b"\0\0\0\0"
    path.write_bytes(bytes(data))
    assert ElfInfo.load(path).multiboot_header_offset() is None


def test_failed_verification_leaves_no_file(tmp_path, monkeypatch):
    path = tmp_path / "kernel.elf"
    path.write_bytes(b"an older kernel")
    monkeypatch.setattr(kgen.elf, "_verify", lambda *args: ["p_paddr is 0xc0100000, expected 0x100000"])
    with pytest.raises(LinkError, match="p_paddr") as err:
        write_elf(IMAGE, path)
    assert "\n" not in str(err.value)
    assert list(tmp_path.iterdir()) == []


def patched(data: bytes, field_offset: int, value: int) -> bytes:
    return data[:field_offset] + struct.pack("<I", value) + data[field_offset + 4:]


def moved_section_headers(data: bytes, elf: ELFFile, offset: int) -> bytes:
    size = elf.header.e_shnum * elf.header.e_shentsize
    table = data[elf.header.e_shoff:elf.header.e_shoff + size]
    return patched(data[:offset] + table + data[offset + size:], 0x20, offset)


@pytest.mark.parametrize("what, corrupt", [
    # What LIEF's add(Segment) does to p_paddr.
    ("p_paddr", lambda data, elf: patched(data, elf.header.e_phoff + 12, 0xC0100000)),
    # A section header table written over the first segment.
    ("overlaps", lambda data, elf: moved_section_headers(data, elf, 0x1100)),
    # .bss shifted by the tables LIEF appends.
    (".bss sh_addr", lambda data, elf: patched(
        data, elf.header.e_shoff + elf.get_section_index(".bss") * elf.header.e_shentsize + 12, 0xC01020A0)),
    # st_shndx left pointing at the section before its own.
    ("symbol", lambda data, elf: patched(
        data, elf.get_section_by_name(".symtab")["sh_offset"] + 16 + 12,
        struct.unpack_from("<I", data, elf.get_section_by_name(".symtab")["sh_offset"] + 16 + 12)[0] - 1)),
])
def test_verifier_catches_what_lief_gets_wrong(kernel, what, corrupt):
    data = kernel.read_bytes()
    with kernel.open("rb") as stream:
        bad = corrupt(data, ELFFile(stream))
    layout = kgen.elf._layout(IMAGE, kgen.elf.ELF32_I386)
    assert kgen.elf._verify(data, IMAGE, layout, kgen.elf.ELF32_I386) == []
    problems = kgen.elf._verify(bad, IMAGE, layout, kgen.elf.ELF32_I386)
    assert any(what in problem for problem in problems), problems


@pytest.mark.parametrize("change, message", [
    (lambda s: s[:1] + (section(".text", 0xC0100010, "rwx", TEXT),) + s[2:], "permissions"),
    (lambda s: s[:4] + (section(".bss", 0xC0102004, "rw", nobits_size=0x10),), "overlaps"),
    (lambda s: s[:3] + (s[4], section(".data", 0xC0106010, "rw", b"\1")), "follows NOBITS"),
    (lambda s: s[:1] + (Section(".text", 0xC0100010, 0x200010, TEXT, len(TEXT), "rx"),) + s[2:],
     "virtual-to-physical"),
])
def test_rejects_images_an_elf_cannot_express(tmp_path, change, message):
    image = LinkedImage(IMAGE.entry, change(IMAGE.sections))
    with pytest.raises(LinkError, match=message):
        write_elf(image, tmp_path / "k.elf")
    assert not (tmp_path / "k.elf").exists()


def test_entry_outside_executable_code_is_refused(tmp_path):
    with pytest.raises(LinkError, match="entry point"):
        write_elf(LinkedImage(0xC0101000, IMAGE.sections), tmp_path / "k.elf")


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    start=st.integers(0, 0xFF).map(lambda n: 0xC0100000 + n * 0x10),
    text_size=st.integers(1, 0x3000),
    rodata_size=st.integers(0, 0x1800),
    data_size=st.integers(0, 0x1800),
    bss_size=st.integers(0, 0x20000),
)
def test_any_layout_survives_lief(tmp_path, start, text_size, rodata_size, data_size, bss_size):
    """Sizes and gaps move LIEF's own tables around; the writer's verification must still pass every time."""
    page = lambda a: (a + 0xFFF) & ~0xFFF   # noqa: E731
    secs = [section(".multiboot", start, "rx", multiboot_header(), align=4),
            section(".text", start + 0x10, "rx", bytes([0x90]) * text_size)]
    cursor = page(start + 0x10 + text_size)
    if rodata_size:
        secs.append(section(".rodata", cursor, "r", b"r" * rodata_size))
        cursor = page(cursor + rodata_size)
    if data_size:
        secs.append(section(".data", cursor, "rw", b"d" * data_size))
        cursor += data_size
    if bss_size:
        secs.append(section(".bss", (cursor + 0xF) & ~0xF, "rw", nobits_size=bss_size))
    image = LinkedImage(start + 0x10, tuple(secs), (Symbol("_start", start + 0x10, ".text"),))
    path = tmp_path / "k.elf"
    write_elf(image, path)

    info = ElfInfo.load(path)
    assert len(info.segments) == len(image.segments())
    assert info.multiboot_header_offset() is not None and info.multiboot_header_offset() % 0x1000 == start % 0x1000
    for seg, group in zip(info.segments, image.segments()):
        assert (seg.vaddr, seg.paddr) == (group[0].vaddr, group[0].paddr)
        assert seg.memsz == group[-1].vaddr + group[-1].size - group[0].vaddr


def test_symbolize_names_code_running_at_its_physical_address(default_build):
    info = ElfInfo.load(default_build.elf)
    start = default_build.kernel.image.symbol("_start").value
    physical = start - default_build.kernel.layout.kernel_virtual_base + 4
    assert info.symbolize(physical) == f"{physical:#010x} <_start+0x4, at its physical address>"
    assert info.symbolize(start + 4) == f"{start + 4:#010x} <_start+0x4>"
