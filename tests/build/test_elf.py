"""The ELF writer (LIEF) checked by an independent reader (pyelftools) and by the tools that load kernels."""
from __future__ import annotations

import dataclasses
import io
import re
import shutil
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

import lief
import pytest
from elftools.elf.elffile import ELFFile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kgen.build.elf
from kgen.build.elf import ELF32_I386, ELF64_X86_64, ElfTarget, write_elf
from kgen.guest.elfinfo import ElfInfo, LoadSegment
from kgen.errors import KgenError, LinkError
from kgen.build.image import LinkedImage, Section, Symbol


MB_MAGIC, MB_FLAGS = 0x1BADB002, 0x3
MB_AOUT_KLUDGE = 1 << 16
LOAD_ADDRESS = 0x100000      # where the loader puts the kernel: every paddr is LOAD_ADDRESS + offset


@dataclass(frozen=True)
class Flavour:
    """One ELF target with what a correct kernel for it looks like from the outside."""

    target: ElfTarget
    vma: int                  # virtual minus physical address of every section
    machine: str              # e_machine as pyelftools names it
    readelf_class: str
    readelf_machine: str

    @property
    def bits(self) -> int:
        return 32 if self.readelf_class == "ELF32" else 64   # not target.bits: that is under test

    def at(self, offset: int) -> int:
        """The virtual address of the byte loaded at LOAD_ADDRESS + offset."""
        return self.vma + LOAD_ADDRESS + offset

    def show(self, addr: int) -> str:
        """An address as ElfInfo.symbolize prints it: zero-padded to the class's width."""
        return f"{addr:#0{self.bits // 4 + 2}x}"


I386 = Flavour(ELF32_I386, 0xC0000000, "EM_386", "ELF32", "Intel 80386")
X86_64 = Flavour(ELF64_X86_64, 0xFFFFFFFF80000000, "EM_X86_64", "ELF64", "Advanced Micro Devices X86-64")
FLAVOURS = {"i386": I386, "x86_64": X86_64}

# Byte offsets of the fields the corruption tests change, per class (from the System V gABI structures).
FIELDS = {
    32: dict(e_shoff=(0x20, "I"), p_flags=(24, "I"), p_paddr=(12, "I"), sh_addr=(12, "I"), st_shndx=(14, "H"),
             sym_size=16),
    64: dict(e_shoff=(0x28, "Q"), p_flags=(4, "I"), p_paddr=(24, "Q"), sh_addr=(16, "Q"), st_shndx=(6, "H"),
             sym_size=24),
}


def multiboot_header(flags: int = MB_FLAGS) -> bytes:
    return struct.pack("<III", MB_MAGIC, flags, -(MB_MAGIC + flags) & 0xFFFFFFFF)


def section(f: Flavour, name: str, offset: int, perms: str, data: bytes = b"", *, nobits_size: int = 0,
            align: int = 0x10) -> Section:
    """A section loaded at LOAD_ADDRESS + offset."""
    size = nobits_size if nobits_size else len(data)
    return Section(name, f.at(offset), LOAD_ADDRESS + offset, data, size, perms, nobits=bool(nobits_size),
                   align=align)


TEXT = bytes((i * 7) & 0xFF for i in range(0x200))


def make_image(f: Flavour) -> LinkedImage:
    return LinkedImage(
        entry=f.at(0x10),
        sections=(
            section(f, ".multiboot", 0, "rx", multiboot_header(), align=4),
            section(f, ".text", 0x10, "rx", TEXT),
            section(f, ".rodata", 0x1000, "r", b"kgen kernel\0", align=0x1000),
            section(f, ".data", 0x2000, "rw", b"\x11\x22\x33\x44\x55\x66\x77\x88", align=0x1000),
            section(f, ".bss", 0x2010, "rw", nobits_size=0x4000),
        ),
        symbols=(
            Symbol("_start", f.at(0x10), ".text", 0x10),
            Symbol("pmm_alloc", f.at(0x90), ".text", 0x40),
            Symbol("banner", f.at(0x1000), ".rodata", 12, "object"),
            Symbol("free_top", f.at(0x2000), ".data", 4, "object"),
            Symbol("stack_bottom", f.at(0x2010), ".bss", 0x4000, "object"),
            Symbol("stack_top", f.at(0x6010), ".bss", 0, "object"),
        ),
    )


PF_X, PF_W, PF_R = 1, 2, 4
SHF_WRITE, SHF_ALLOC, SHF_EXECINSTR = 1, 2, 4


@pytest.fixture(params=list(FLAVOURS.values()), ids=list(FLAVOURS))
def flavour(request) -> Flavour:
    return request.param


@pytest.fixture
def image(flavour) -> LinkedImage:
    return make_image(flavour)


@pytest.fixture
def kernel(tmp_path: Path, flavour, image) -> Path:
    path = tmp_path / "kernel.elf"
    write_elf(image, path, target=flavour.target)
    return path


def read(path: Path, fn):
    with path.open("rb") as stream:
        return fn(ELFFile(stream))


def other(f: Flavour) -> Flavour:
    return X86_64 if f is I386 else I386


def test_targets_differ_only_where_the_classes_do():
    assert (ELF32_I386.elfclass, ELF32_I386.machine, ELF32_I386.bits) == (1, 3, 32)
    assert (ELF64_X86_64.elfclass, ELF64_X86_64.machine, ELF64_X86_64.bits) == (2, 62, 64)
    assert (ELF32_I386.ehdr_size, ELF32_I386.phdr_size, ELF32_I386.shdr_size) == (52, 32, 40)
    assert (ELF64_X86_64.ehdr_size, ELF64_X86_64.phdr_size, ELF64_X86_64.shdr_size) == (64, 56, 64)
    assert ELF64_X86_64.phdr_fields[:2] == ("type", "flags") and ELF32_I386.phdr_fields[-2] == "flags"


def test_skeleton_is_an_elf_of_the_class(flavour):
    """The bytes LIEF starts from, read by pyelftools: a field packed into the wrong slot shows up here."""
    elf = ELFFile(io.BytesIO(kgen.build.elf._skeleton(flavour.target, 3)))
    assert elf.elfclass == flavour.bits and elf.header.e_machine == flavour.machine
    assert (elf.header.e_phoff, elf.header.e_phnum, elf.header.e_shnum) == (flavour.target.ehdr_size, 3, 2)
    assert elf.header.e_shoff % (flavour.bits // 8) == 0
    assert [(s["p_type"], s["p_flags"], s["p_align"], s["p_vaddr"]) for s in elf.iter_segments()] == \
        [("PT_LOAD", PF_R, 0x1000, 0)] * 3
    shstrtab = elf.get_section(1)
    assert (shstrtab.name, shstrtab["sh_type"], shstrtab["sh_addralign"]) == (".shstrtab", "SHT_STRTAB", 1)


def test_default_target_is_elf32_i386(tmp_path):
    write_elf(make_image(I386), tmp_path / "k.elf")
    assert read(tmp_path / "k.elf", lambda elf: (elf.elfclass, elf.header.e_machine)) == (32, "EM_386")


def test_header(kernel, flavour):
    def check(elf):
        assert elf.elfclass == flavour.bits and elf.little_endian
        assert elf.header.e_type == "ET_EXEC"
        assert elf.header.e_machine == flavour.machine
        assert elf.header.e_entry == flavour.at(0x10)
        assert (elf.header.e_phoff, elf.header.e_phentsize, elf.header.e_shentsize) == \
            (flavour.target.ehdr_size, flavour.target.phdr_size, flavour.target.shdr_size)
    read(kernel, check)


def test_one_load_per_permission_group(kernel, flavour):
    def check(elf):
        segments = list(elf.iter_segments())
        assert [s["p_type"] for s in segments] == ["PT_LOAD"] * 3
        got = [(s["p_vaddr"], s["p_paddr"], s["p_filesz"], s["p_memsz"], s["p_flags"], s["p_align"])
               for s in segments]
        assert got == [
            (flavour.at(0), 0x100000, 0x210, 0x210, PF_R | PF_X, 0x1000),
            (flavour.at(0x1000), 0x101000, 12, 12, PF_R, 0x1000),
            (flavour.at(0x2000), 0x102000, 8, 0x4010, PF_R | PF_W, 0x1000),
        ]
        for seg in segments:
            assert seg["p_vaddr"] >= flavour.vma          # higher half; for x86-64 the top 2 GiB
            assert seg["p_offset"] % 0x1000 == seg["p_vaddr"] % 0x1000
        assert segments[0]["p_offset"] == 0x1000
        assert segments[0].data()[:12] == multiboot_header()
        assert segments[0].data()[0x10:] == TEXT
        assert segments[2].data() == b"\x11\x22\x33\x44\x55\x66\x77\x88"
        table_end = elf.header.e_phoff + elf.header.e_phnum * elf.header.e_phentsize
        assert table_end <= segments[0]["p_offset"]
    read(kernel, check)


def test_sections(kernel, flavour, image):
    def check(elf):
        names = [s.name for s in elf.iter_sections()]
        assert names[:6] == ["", ".multiboot", ".text", ".rodata", ".data", ".bss"]
        assert set(names[6:]) == {".symtab", ".strtab", ".shstrtab"}
        expected = {
            ".multiboot": ("SHT_PROGBITS", SHF_ALLOC | SHF_EXECINSTR, flavour.at(0), 12, 4),
            ".text": ("SHT_PROGBITS", SHF_ALLOC | SHF_EXECINSTR, flavour.at(0x10), 0x200, 0x10),
            ".rodata": ("SHT_PROGBITS", SHF_ALLOC, flavour.at(0x1000), 12, 0x1000),
            ".data": ("SHT_PROGBITS", SHF_ALLOC | SHF_WRITE, flavour.at(0x2000), 8, 0x1000),
            ".bss": ("SHT_NOBITS", SHF_ALLOC | SHF_WRITE, flavour.at(0x2010), 0x4000, 0x10),
        }
        for name, (sh_type, flags, addr, size, align) in expected.items():
            sec = elf.get_section_by_name(name)
            assert (sec["sh_type"], sec["sh_flags"], sec["sh_addr"], sec["sh_size"], sec["sh_addralign"]) == \
                (sh_type, flags, addr, size, align), name
        by_name = {sec.name: sec for sec in image.sections}
        for name in (".multiboot", ".text", ".rodata", ".data"):
            assert elf.get_section_by_name(name).data() == by_name[name].data
        text = elf.get_section_by_name(".text")
        assert text["sh_offset"] % 0x1000 == text["sh_addr"] % 0x1000
        data = elf.get_section_by_name(".data")
        assert elf.get_section_by_name(".bss")["sh_offset"] <= data["sh_offset"] + data["sh_size"]
    read(kernel, check)


def test_symbols(kernel, image):
    def check(elf):
        symtab = elf.get_section_by_name(".symtab")
        assert symtab["sh_link"] == elf.get_section_index(".strtab")
        assert symtab["sh_entsize"] == FIELDS[elf.elfclass]["sym_size"]
        symbols = list(symtab.iter_symbols())
        null = symbols[0]
        assert (null.name, null["st_value"], null["st_size"], null["st_shndx"]) == ("", 0, 0, "SHN_UNDEF")
        sections = list(elf.iter_sections())
        got = {s.name: (s["st_value"], s["st_size"], s["st_info"]["type"], s["st_info"]["bind"],
                        sections[s["st_shndx"]].name) for s in symbols[1:]}
        assert got == {
            sym.name: (sym.value, sym.size, "STT_FUNC" if sym.kind == "func" else "STT_OBJECT", "STB_GLOBAL",
                       sym.section)
            for sym in image.symbols
        }
    read(kernel, check)


@pytest.mark.skipif(shutil.which("grub-file") is None, reason="grub-file not installed (Debian grub-common)")
def test_grub_accepts_it_as_multiboot(kernel):
    assert subprocess.run(["grub-file", "--is-x86-multiboot", str(kernel)]).returncode == 0


def readelf(path: Path) -> dict:
    """`readelf -lSsh -W`, parsed: binutils' reading of the file, independent of pyelftools and of LIEF."""
    result = subprocess.run(["readelf", "-lSsh", "-W", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    header = dict(re.findall(r"^  (Class|Machine|Entry point address):\s+(.*?)\s*$", out, re.M))
    sections = {int(n): (name, flags) for n, name, flags in re.findall(
        r"^\s*\[\s*(\d+)\]\s+(\S*)\s+[A-Z_]+\s+[0-9a-f]+\s+[0-9a-f]+\s+[0-9a-f]+\s+[0-9a-f]+\s+([A-Z]*)\s", out, re.M)}
    loads = [(int(v, 16), int(p, 16), flags.replace(" ", "")) for v, p, flags in re.findall(
        r"^\s+LOAD\s+0x[0-9a-f]+\s+(0x[0-9a-f]+)\s+(0x[0-9a-f]+)\s+0x[0-9a-f]+\s+0x[0-9a-f]+\s+(R?W?E?|R E)\s+0x",
        out, re.M)]
    mapping = re.findall(r"^\s+\d\d\s+(.*?)\s*$", out.split("Section to Segment mapping:")[1].split("\n\n")[0],
                         re.M)
    symbols = {name: (int(value, 16), ndx) for value, ndx, name in re.findall(
        r"^\s+\d+:\s+([0-9a-f]+)\s+\d+\s+\w+\s+\w+\s+\w+\s+(\w+)\s+(\S+)\s*$", out, re.M)}
    return dict(text=out + result.stderr, header=header, sections=sections, loads=loads,
                mapping=[m.split() for m in mapping], symbols=symbols)


@pytest.mark.skipif(shutil.which("readelf") is None, reason="readelf not installed (Debian binutils)")
def test_readelf_reads_what_was_planned(kernel, flavour, image):
    got = readelf(kernel)
    assert "warning" not in got["text"].lower() and "error" not in got["text"].lower()
    assert got["header"]["Class"] == flavour.readelf_class
    assert got["header"]["Machine"] == flavour.readelf_machine
    assert int(got["header"]["Entry point address"], 16) == image.entry

    # One PT_LOAD per permission group, in the higher half, loaded at 1 MiB, with the flags of its sections.
    assert got["mapping"] == [[".multiboot", ".text"], [".rodata"], [".data", ".bss"]]
    assert [(v, p) for v, p, _ in got["loads"]] == [(flavour.at(o), LOAD_ADDRESS + o) for o in (0, 0x1000, 0x2000)]
    assert all(v >= flavour.vma for v, _, _ in got["loads"])
    if flavour is X86_64:
        assert all(v >= 0xFFFFFFFF80000000 for v, _, _ in got["loads"])      # the top 2 GiB: -mcmodel=kernel
    section_flags = {name: flags for name, flags in got["sections"].values()}
    assert [flags for _, _, flags in got["loads"]] == ["RE", "R", "RW"]
    for (_, _, seg_flags), names in zip(got["loads"], got["mapping"]):
        for name in names:
            want = "RE" if "X" in section_flags[name] else "RW" if "W" in section_flags[name] else "R"
            assert seg_flags == want, name

    # Every symbol with its value and the index of the section it was defined in.
    index_of = {name: n for n, (name, _) in got["sections"].items()}
    assert got["symbols"] == {s.name: (s.value, str(index_of[s.section])) for s in image.symbols}


@pytest.mark.skipif(shutil.which("readelf") is None, reason="readelf not installed (Debian binutils)")
def test_readelf_parse_tells_the_flavours_apart(tmp_path, flavour):
    """The readelf checks above would fail for a kernel written for the other target."""
    path = tmp_path / "k.elf"
    write_elf(make_image(I386), path, target=flavour.target)      # i386 addresses fit both classes
    got = readelf(path)
    assert got["header"]["Class"] == flavour.readelf_class
    assert got["header"]["Class"] != other(flavour).readelf_class
    assert got["header"]["Machine"] != other(flavour).readelf_machine
    if flavour is I386:
        assert not any(v >= X86_64.vma for v, _, _ in got["loads"])


def test_elfinfo_round_trip(kernel, flavour, image):
    info = ElfInfo.load(kernel)
    assert info.bits == flavour.bits
    assert info.entry == image.entry
    assert info.segments == (
        LoadSegment(flavour.at(0), 0x100000, 0x210, 0x210, readable=True, writable=False, executable=True),
        LoadSegment(flavour.at(0x1000), 0x101000, 12, 12, readable=True, writable=False, executable=False),
        LoadSegment(flavour.at(0x2000), 0x102000, 8, 0x4010, readable=True, writable=True, executable=False),
    )
    assert {name: (s.value, s.size) for name, s in info.symbols.items()} == \
        {s.name: (s.value, s.size) for s in image.symbols}
    assert [s.value for s in info.by_address] == sorted(s.value for s in image.symbols)
    assert info.symbols["banner"].kind == "object" and info.symbols["banner"].section == ".rodata"
    assert info.multiboot_header_offset() == 0x1000


@pytest.mark.parametrize("offset, name", [
    (0xA3, "pmm_alloc+0x13"),
    (0x90, "pmm_alloc"),
    (0x1F, "_start+0xf"),
    (0xD0, None),                       # past pmm_alloc's size, nothing else covers it
    (0x3000, "stack_bottom+0xff0"),
    (0x6010, None),                     # stack_top: unsized, at the very end of .bss
])
def test_symbolize(kernel, flavour, offset, name):
    addr = flavour.at(offset)
    assert ElfInfo.load(kernel).symbolize(addr) == (f"{flavour.show(addr)} <{name}>" if name else flavour.show(addr))


def test_symbolize_outside_every_segment(kernel, flavour):
    assert ElfInfo.load(kernel).symbolize(0x00100000) == flavour.show(0x00100000)


def test_unsized_symbol_covers_rest_of_its_section(tmp_path, flavour, image):
    image = LinkedImage(image.entry, image.sections, (Symbol("kmain", flavour.at(0x20), ".text"),))
    write_elf(image, tmp_path / "k.elf", target=flavour.target)
    info = ElfInfo.load(tmp_path / "k.elf")
    assert info.symbolize(flavour.at(0x20F)) == f"{flavour.show(flavour.at(0x20F))} <kmain+0x1ef>"
    assert info.symbolize(flavour.at(0x210)) == flavour.show(flavour.at(0x210))


def test_sized_function_wins_over_alias_at_same_address(tmp_path, flavour, image):
    symbols = (Symbol("entry_alias", flavour.at(0x90), ".text", 0, "object"),
               Symbol("pmm_alloc", flavour.at(0x90), ".text", 0x40))
    write_elf(LinkedImage(image.entry, image.sections, symbols), tmp_path / "k.elf", target=flavour.target)
    info = ElfInfo.load(tmp_path / "k.elf")
    assert info.symbolize(flavour.at(0x91)) == f"{flavour.show(flavour.at(0x91))} <pmm_alloc+0x1>"
    assert info.symbolize(flavour.at(0xD0)) == f"{flavour.show(flavour.at(0xD0))} <entry_alias+0x40>"


def test_elfinfo_rejects_non_elf(tmp_path):
    junk = tmp_path / "not-an-elf.bin"
    junk.write_bytes(b"MZ" + bytes(100))
    with pytest.raises(KgenError) as err:
        ElfInfo.load(junk)
    assert str(junk) in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(KgenError, match="missing.elf"):
        ElfInfo.load(tmp_path / "missing.elf")


def test_no_multiboot_header_outside_window(kernel):
    data = bytearray(kernel.read_bytes())
    data[0x1000:0x1004] = b"\0\0\0\0"
    kernel.write_bytes(bytes(data))
    assert ElfInfo.load(kernel).multiboot_header_offset() is None


def multiboot_near_window_end(f: Flavour, flags: int) -> LinkedImage:
    """A 4 KiB-less-28-bytes .rodata first, so .multiboot lands at file offset 0x1FE4: 12 bytes fit the
    8 KiB window, 32 (the header with the a.out address fields) do not."""
    header = multiboot_header(flags)
    if flags & MB_AOUT_KLUDGE:
        header += bytes(20)
    secs = (section(f, ".rodata", 0, "r", b"r" * 0xFE4),
            section(f, ".multiboot", 0x1FE4, "rx", header, align=4),
            section(f, ".text", 0x1FE4 + 0x20, "rx", b"\x90" * 0x10))
    return LinkedImage(f.at(0x1FE4 + 0x20), secs)


def test_multiboot_header_must_fit_the_window_whole(tmp_path, flavour):
    path = tmp_path / "k.elf"
    write_elf(multiboot_near_window_end(flavour, MB_FLAGS), path, target=flavour.target)
    assert ElfInfo.load(path).multiboot_header_offset() == 0x1FE4
    with pytest.raises(LinkError, match="Multiboot header would sit at file offset 0x1fe4"):
        write_elf(multiboot_near_window_end(flavour, MB_FLAGS | MB_AOUT_KLUDGE), path, target=flavour.target)
    assert not path.exists()


@pytest.mark.parametrize("past_table", [0, 4, 8])
def test_segment_right_after_the_program_header_table(tmp_path, flavour, past_table):
    """LIEF's first write zeroes the 11 bytes after the program header table, where the skeleton's .shstrtab
    was; a first segment congruent to that offset starts there, and must keep its contents."""
    table_end = flavour.target.ehdr_size + 3 * flavour.target.phdr_size
    start = table_end + past_table
    secs = (section(flavour, ".multiboot", start, "rx", multiboot_header(), align=4),
            section(flavour, ".text", start + 0x10, "rx", TEXT),
            section(flavour, ".rodata", 0x1000, "r", b"r"),
            section(flavour, ".bss", 0x2000, "rw", nobits_size=0x10))
    path = tmp_path / "k.elf"
    write_elf(LinkedImage(flavour.at(start + 0x10), secs), path, target=flavour.target)
    data = path.read_bytes()
    assert ElfInfo.load(path).multiboot_header_offset() == start
    assert data[start:start + 12] == multiboot_header() and data[start + 0x10:start + 0x210] == TEXT


def test_failed_verification_leaves_no_file(tmp_path, monkeypatch, flavour, image):
    path = tmp_path / "kernel.elf"
    path.write_bytes(b"an older kernel")
    monkeypatch.setattr(kgen.build.elf, "_verify", lambda *args: ["p_paddr is 0xc0100000, expected 0x100000"])
    with pytest.raises(LinkError, match="p_paddr") as err:
        write_elf(image, path, target=flavour.target)
    assert "\n" not in str(err.value)
    assert list(tmp_path.iterdir()) == []


def patched(data: bytes, offset: int, fmt: str, value: int) -> bytes:
    size = struct.calcsize("<" + fmt)
    return data[:offset] + struct.pack("<" + fmt, value) + data[offset + size:]


def field(elf: ELFFile, name: str) -> tuple[int, str]:
    return FIELDS[elf.elfclass][name]


def moved_section_headers(data: bytes, elf: ELFFile, offset: int) -> bytes:
    size = elf.header.e_shnum * elf.header.e_shentsize
    table = data[elf.header.e_shoff:elf.header.e_shoff + size]
    where, fmt = field(elf, "e_shoff")
    return patched(data[:offset] + table + data[offset + size:], where, fmt, offset)


def phdr_patched(data: bytes, elf: ELFFile, name: str, value: int) -> bytes:
    where, fmt = field(elf, name)
    return patched(data, elf.header.e_phoff + where, fmt, value)


def bss_addr_patched(data: bytes, elf: ELFFile, value: int) -> bytes:
    where, fmt = field(elf, "sh_addr")
    return patched(data, elf.header.e_shoff + elf.get_section_index(".bss") * elf.header.e_shentsize + where, fmt,
                   value)


def shndx_decremented(data: bytes, elf: ELFFile) -> bytes:
    where, fmt = field(elf, "st_shndx")
    at = elf.get_section_by_name(".symtab")["sh_offset"] + FIELDS[elf.elfclass]["sym_size"] + where   # symbol 1
    return patched(data, at, fmt, struct.unpack_from("<" + fmt, data, at)[0] - 1)


@pytest.mark.parametrize("what, corrupt", [
    # What LIEF's add(Segment) does to p_paddr.
    (r"program header 0 p_paddr is {v0}, expected 0x100000",
     lambda data, elf, f: phdr_patched(data, elf, "p_paddr", f.at(0))),
    # p_flags, which sits in a different place in each class.
    (r"program header 0 p_flags is 0x7, expected 0x5",
     lambda data, elf, f: phdr_patched(data, elf, "p_flags", 7)),
    # A section header table written over the first segment.
    (r"overlaps segment 0", lambda data, elf, f: moved_section_headers(data, elf, 0x1100)),
    # .bss shifted by the tables LIEF appends.
    (r".bss sh_addr is {bss}, expected {bss_want}",
     lambda data, elf, f: bss_addr_patched(data, elf, f.at(0x20A0))),
    # st_shndx left pointing at the section before its own.
    (r"symbol ('_start', {start}, 16, 'STT_FUNC', 'STB_GLOBAL', '.multiboot') was not asked for",
     lambda data, elf, f: shndx_decremented(data, elf)),
], ids=["p_paddr", "p_flags", "shdr-overlap", "bss-addr", "st_shndx"])
def test_verifier_catches_what_lief_gets_wrong(kernel, flavour, image, what, corrupt):
    data = kernel.read_bytes()
    with kernel.open("rb") as stream:
        bad = corrupt(data, ELFFile(stream), flavour)
    layout = kgen.build.elf._layout(image, flavour.target)
    assert kgen.build.elf._verify(data, image, layout, flavour.target) == []
    problems = kgen.build.elf._verify(bad, image, layout, flavour.target)
    message = what.format(v0=hex(flavour.at(0)), bss=hex(flavour.at(0x20A0)), bss_want=hex(flavour.at(0x2010)),
                          start=flavour.at(0x10))
    assert any(message in problem for problem in problems), (message, problems)


def test_verifier_catches_the_wrong_target(kernel, flavour, image):
    """A file of the other class, or of this class for another machine, is not what was planned."""
    data = kernel.read_bytes()
    wrong_class = other(flavour).target
    wrong_machine = dataclasses.replace(flavour.target, machine={3: 62, 62: 3}[flavour.target.machine])
    problems = kgen.build.elf._verify(data, image, kgen.build.elf._layout(image, flavour.target), wrong_class)
    assert f"EI_CLASS is {hex(flavour.bits)}, expected {hex(other(flavour).bits)}" in problems
    assert any(p.startswith("e_phentsize is") for p in problems)
    problems = kgen.build.elf._verify(data, image, kgen.build.elf._layout(image, wrong_machine), wrong_machine)
    assert problems == [f"e_machine is {hex(flavour.target.machine)}, expected {hex(wrong_machine.machine)}"]


def test_higher_half_x86_64_addresses_do_not_fit_elf32(tmp_path):
    path = tmp_path / "k.elf"
    path.write_bytes(b"an older kernel")
    with pytest.raises(LinkError, match=r"the entry point 0xffffffff80100010 does not fit a 32-bit address"):
        write_elf(make_image(X86_64), path, target=ELF32_I386)
    assert not path.exists()


def test_sizes_beyond_32_bits_are_refused_in_both_classes(tmp_path, flavour, image):
    """An ELF64 has 64-bit size fields, but LIEF writes them cut to 32 bits (see the next test)."""
    path = tmp_path / "k.elf"
    huge = dataclasses.replace(image, symbols=(Symbol("everything", flavour.at(0x2010), ".bss", 1 << 33, "object"),))
    with pytest.raises(LinkError, match="symbol everything size 0x200000000 does not fit the 32 bits LIEF writes"):
        write_elf(huge, path, target=flavour.target)
    bss = dataclasses.replace(image.sections[4], size=1 << 32)
    with pytest.raises(LinkError, match="section .bss size 0x100000000 does not fit the 32 bits LIEF writes"):
        write_elf(dataclasses.replace(image, sections=image.sections[:4] + (bss,), symbols=()), path,
                  target=flavour.target)
    assert not path.exists()


def test_lief_cuts_elf64_sizes_but_not_addresses_to_32_bits(tmp_path):
    """Why the test above refuses big sizes for ELF64 too. If this fails, LIEF writes 64-bit sizes now, and
    kgen.build.elf._LIEF_SIZE_MAX can follow the class."""
    path = tmp_path / "k.elf"
    write_elf(make_image(X86_64), path, target=ELF64_X86_64)
    binary = lief.ELF.parse(str(path))
    big = 0x123456780
    [sym] = [s for s in binary.symtab_symbols if s.name == "stack_bottom"]
    sym.size = big
    sym.value = big
    list(binary.segments)[2].virtual_size = big
    list(binary.segments)[2].physical_address = big
    binary.write(str(path))

    def check(elf):
        got = elf.get_section_by_name(".symtab").get_symbol_by_name("stack_bottom")[0]
        assert (got["st_size"], got["st_value"]) == (big & 0xFFFFFFFF, big)
        assert (elf.get_segment(2)["p_memsz"], elf.get_segment(2)["p_paddr"]) == (big & 0xFFFFFFFF, big)
    read(path, check)


@pytest.mark.parametrize("change, message", [
    (lambda f, s: s[:1] + (section(f, ".text", 0x10, "rwx", TEXT),) + s[2:], "permissions"),
    (lambda f, s: s[:4] + (section(f, ".bss", 0x2004, "rw", nobits_size=0x10),), "overlaps"),
    (lambda f, s: s[:3] + (s[4], section(f, ".data", 0x6010, "rw", b"\1")), "follows NOBITS"),
    (lambda f, s: s[:1] + (Section(".text", f.at(0x10), 0x200010, TEXT, len(TEXT), "rx"),) + s[2:],
     "virtual-to-physical"),
], ids=["rwx", "overlap", "after-nobits", "bias"])
def test_rejects_images_an_elf_cannot_express(tmp_path, flavour, image, change, message):
    image = LinkedImage(image.entry, change(flavour, image.sections))
    with pytest.raises(LinkError, match=message):
        write_elf(image, tmp_path / "k.elf", target=flavour.target)
    assert not (tmp_path / "k.elf").exists()


def test_entry_outside_executable_code_is_refused(tmp_path, flavour, image):
    with pytest.raises(LinkError, match="entry point"):
        write_elf(LinkedImage(flavour.at(0x1000), image.sections), tmp_path / "k.elf", target=flavour.target)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    start=st.integers(0, 0x3FF).map(lambda n: n * 4),          # .multiboot is 4-aligned
    text_size=st.integers(1, 0x3000),
    rodata_size=st.integers(0, 0x1800),
    data_size=st.integers(0, 0x1800),
    bss_size=st.integers(0, 0x20000),
)
def test_any_layout_survives_lief(tmp_path, flavour, start, text_size, rodata_size, data_size, bss_size):
    """Sizes and gaps move LIEF's own tables around; the writer's verification must still pass every time."""
    page = lambda a: (a + 0xFFF) & ~0xFFF   # noqa: E731
    secs = [section(flavour, ".multiboot", start, "rx", multiboot_header(), align=4),
            section(flavour, ".text", start + 0x10, "rx", bytes([0x90]) * text_size)]
    cursor = page(start + 0x10 + text_size)
    if rodata_size:
        secs.append(section(flavour, ".rodata", cursor, "r", b"r" * rodata_size))
        cursor = page(cursor + rodata_size)
    if data_size:
        secs.append(section(flavour, ".data", cursor, "rw", b"d" * data_size))
        cursor += data_size
    if bss_size:
        secs.append(section(flavour, ".bss", (cursor + 0xF) & ~0xF, "rw", nobits_size=bss_size))
    image = LinkedImage(flavour.at(start + 0x10), tuple(secs), (Symbol("_start", flavour.at(start + 0x10), ".text"),))
    path = tmp_path / "k.elf"
    write_elf(image, path, target=flavour.target)

    info = ElfInfo.load(path)
    assert info.bits == flavour.bits
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
