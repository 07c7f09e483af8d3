"""Write a `LinkedImage` as an ELF executable, built and written by LIEF: ELF32 i386 (`ELF32_I386`, the default)
or ELF64 x86-64 (`ELF64_X86_64`), chosen by `write_elf`'s `target`.

LIEF cannot start an ELF from nothing, so it is handed a skeleton packed here with `struct` in the target's class:
the ELF header, one blank PT_LOAD slot per segment, a null section and `.shstrtab`. LIEF fills the slots in, adds
the named sections, `.symtab` and `.strtab`, and produces the bytes. Everything after the skeleton is the same for
both classes; `ElfTarget` holds what differs (struct formats, field order, EI_CLASS, e_machine).

What LIEF would get wrong, and what is done instead:
- `add(Segment)` overwrites p_paddr with p_vaddr, rounds sizes to a page, places the data where its page size
  says, moves the program header table to the end of the file with a PT_LOAD of its own, and has room for only
  ten segments after that move. It is never called: the skeleton's slots are edited in place, the table stays
  right after the ELF header, and each segment gets its file offset before its content, because LIEF writes
  content at the segment's current offset.
- `add(Section, loaded=True)` would make a segment per section, so sections go in unloaded and are placed by hand.
- `.symtab` gets no null symbol unless one is added first.
- LIEF cuts values to 32 bits without a word: in an ELF32 every address (a 0xFFFFFFFF80100000 vaddr becomes
  0x80100000), and in an ELF64 too every size and alignment (p_memsz, p_align, sh_size, sh_addralign,
  st_size), though it keeps 64-bit addresses (p_vaddr, p_paddr, sh_addr, st_value, e_entry). Values that would be
  cut are refused before LIEF sees them.
- Moving `.shstrtab` away, the first write zeroes the bytes the skeleton had it in, right after the program header
  table, where the first segment starts when its vaddr is congruent to that offset; so the second pass writes
  the segment contents again.
- e_shoff is wherever the parsed skeleton had it, and the section header table is written before the segment
  contents, so a stale e_shoff gets overwritten silently; it is set to the end of the segment data, and each table
  LIEF appends moves it past itself.
- Appending `.shstrtab`/`.strtab`/`.symtab` at the end of the file shifts every section at or past that offset,
  the NOBITS `.bss` included, sh_addr and all; and writing reorders the section headers (`.shstrtab` moves
  behind the added sections) without renumbering st_shndx. So LIEF re-parses its own output and the planned
  fields are set once more: nothing is appended the second time, and the indices are final.

Sections nothing loads (`LinkedImage.unloaded`: the DWARF line table of kgen/build/dwarf.py) go to LIEF with their
contents and are placed by it after the segments' data, like its own tables; they change no segment.

Nothing LIEF produces is trusted: pyelftools, an independent reader, compares the bytes with the plan field by
field (by name, so one comparison serves both classes), and only a verified image reaches the disk (a temporary
file in the same directory, then `os.replace`).
"""
from __future__ import annotations

import io
import os
import secrets
import struct
from dataclasses import dataclass
from pathlib import Path

import lief
from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile
from elftools.elf.enums import ENUM_E_MACHINE

from kgen.arch import hw
from kgen.errors import KgenError, LinkError
from kgen.build.image import LinkedImage, Section

_PT_LOAD = 1
_PF_X, _PF_W, _PF_R = 1, 2, 4
_SHF_WRITE, _SHF_ALLOC, _SHF_EXECINSTR = 1, 2, 4
_SHT_PROGBITS, _SHT_STRTAB, _SHT_NOBITS = 1, 3, 8
_SEGMENT_FLAGS = {"rx": _PF_R | _PF_X, "r": _PF_R, "rw": _PF_R | _PF_W}
_SECTION_FLAGS = {"rx": _SHF_ALLOC | _SHF_EXECINSTR, "r": _SHF_ALLOC, "rw": _SHF_ALLOC | _SHF_WRITE}
_SYMBOL_TYPES = {"func": "STT_FUNC", "object": "STT_OBJECT"}
_TABLES = (".symtab", ".strtab", ".shstrtab")
_LIEF_SIZE_MAX = 0xFFFFFFFF      # the largest size or alignment LIEF writes intact, in either class
_LIEF_SIZE_LIMIT = "the 32 bits LIEF writes sizes and alignments with"


@dataclass(frozen=True)
class ElfTarget:
    """What depends on the ELF class and machine: `ELF32_I386` and `ELF64_X86_64` are the two instances.

    The header formats list the fields in the same order for both classes (only their widths differ), except the
    program header, whose p_flags comes last in Elf32_Phdr and second in Elf64_Phdr: hence `phdr_fields`.
    """

    elfclass: int            # EI_CLASS: 1 for ELF32, 2 for ELF64
    machine: int             # e_machine
    ehdr_format: str         # struct format of the ELF header after e_ident
    phdr_format: str
    phdr_fields: tuple[str, ...]   # p_flags moves between the classes, so the fields are packed by name
    shdr_format: str
    page_size: int = hw.PAGE_SIZE

    @property
    def bits(self) -> int:
        """Width of an address, offset or size in this class: 32 or 64."""
        return 32 if self.elfclass == 1 else 64

    @property
    def word_size(self) -> int:
        return self.bits // 8

    @property
    def ehdr_size(self) -> int:
        return 16 + struct.calcsize(self.ehdr_format)

    @property
    def phdr_size(self) -> int:
        return struct.calcsize(self.phdr_format)

    @property
    def shdr_size(self) -> int:
        return struct.calcsize(self.shdr_format)


ELF32_I386 = ElfTarget(
    elfclass=1,
    machine=3,
    ehdr_format="<HHIIIIIHHHHHH",
    phdr_format="<8I",
    phdr_fields=("type", "offset", "vaddr", "paddr", "filesz", "memsz", "flags", "align"),
    shdr_format="<10I",
)

ELF64_X86_64 = ElfTarget(
    elfclass=2,
    machine=62,                                   # EM_X86_64
    ehdr_format="<HHIQQQIHHHHHH",                 # e_entry, e_phoff, e_shoff are 64-bit
    phdr_format="<IIQQQQQQ",
    phdr_fields=("type", "flags", "offset", "vaddr", "paddr", "filesz", "memsz", "align"),
    shdr_format="<IIQQQQIIQQ",                    # sh_flags, sh_addr, sh_offset, sh_size, sh_addralign, sh_entsize
)


@dataclass(frozen=True)
class _Load:
    """One PT_LOAD as it must appear in the file."""

    vaddr: int
    paddr: int
    offset: int
    filesz: int
    memsz: int
    flags: int
    content: bytes


@dataclass(frozen=True)
class _Placed:
    """A section with the file offset the layout gave it."""

    section: Section
    offset: int

    @property
    def sh_type(self) -> int:
        return _SHT_NOBITS if self.section.nobits else _SHT_PROGBITS

    @property
    def sh_flags(self) -> int:
        return _SECTION_FLAGS[self.section.perms]


@dataclass(frozen=True)
class _Layout:
    loads: tuple[_Load, ...]
    sections: tuple[_Placed, ...]
    end: int                  # end of the last segment's file data: LIEF appends its tables from here


def write_elf(image: LinkedImage, path: Path, *, target: ElfTarget = ELF32_I386) -> None:
    """Write `image` to `path`, or raise a KgenError (LinkError if the image or LIEF is at fault) and leave no
    file there.

    Like ld, a failed write also removes an older file at `path`, so a stale kernel is never taken for this one.
    """
    path = Path(path)
    try:
        _check_image(image, target)
        data = _build(image, target)
        _write_atomically(path, data)
    except KgenError:
        path.unlink(missing_ok=True)
        raise


def _build(image: LinkedImage, target: ElfTarget) -> bytes:
    layout = _layout(image, target)
    with lief.logging.level_scope(lief.logging.LEVEL.ERROR):
        binary = lief.ELF.parse(_skeleton(target, len(layout.loads)))
        if binary is None:
            raise LinkError("LIEF could not parse the ELF skeleton")
        for segment, load in zip(binary.segments, layout.loads):
            _set_segment_header(segment, load, target)
            segment.content = list(load.content)
        binary.header.section_header_offset = layout.end
        for placed in layout.sections:
            binary.add(lief.ELF.Section(placed.section.name, lief.ELF.Section.TYPE(placed.sh_type)), loaded=False)
        for name, content in image.unloaded:
            section = lief.ELF.Section(name, lief.ELF.Section.TYPE.PROGBITS)
            section.content = list(content)
            section.alignment = 1
            binary.add(section, loaded=False)
        _add_symbols(binary, image)
        _settle(binary, image, layout, target)
        first = binary.write_to_bytes()

        again = lief.ELF.parse(first)
        if again is None:
            raise LinkError("LIEF could not re-parse the ELF it had just written")
        _settle(again, image, layout, target)
        data = again.write_to_bytes()
    problems = _verify(data, image, layout, target)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise LinkError(f"LIEF wrote a wrong ELF: {problems[0]}{more}")
    return data


def _skeleton(target: ElfTarget, segments: int) -> bytes:
    """ELF header, `segments` blank PT_LOAD slots, a null section and `.shstrtab`: what LIEF needs to start from."""
    names = b"\0.shstrtab\0"
    phoff = target.ehdr_size
    names_off = phoff + segments * target.phdr_size
    shoff = -(-(names_off + len(names)) // target.word_size) * target.word_size   # aligned to the class's word
    ident = b"\x7fELF" + bytes([target.elfclass, 1, 1]) + bytes(9)   # little-endian, EV_CURRENT, SysV
    header = ident + struct.pack(
        target.ehdr_format, 2, target.machine, 1, 0, phoff, shoff, 0,          # ET_EXEC, EV_CURRENT, entry 0
        target.ehdr_size, target.phdr_size, segments, target.shdr_size, 2, 1,
    )
    blank = dict(type=_PT_LOAD, offset=0, vaddr=0, paddr=0, filesz=0, memsz=0, flags=_PF_R, align=target.page_size)
    phdrs = struct.pack(target.phdr_format, *(blank[name] for name in target.phdr_fields)) * segments
    body = (header + phdrs + names).ljust(shoff, b"\0")
    null = bytes(target.shdr_size)
    # sh_name, sh_type, sh_flags, sh_addr, sh_offset, sh_size, sh_link, sh_info, sh_addralign, sh_entsize
    shstrtab = struct.pack(target.shdr_format, 1, _SHT_STRTAB, 0, 0, names_off, len(names), 0, 0, 1, 0)
    return body + null + shstrtab


def _check_image(image: LinkedImage, target: ElfTarget) -> None:
    """Refuse what no single ELF layout of this class can express, before LIEF sees any of it."""
    if not image.sections:
        raise LinkError("the image has no sections")
    names = [sec.name for sec in image.sections]
    if len(set(names)) != len(names):
        raise LinkError(f"duplicate section names in {names}")
    previous = None
    for sec in image.sections:
        if sec.perms not in _SEGMENT_FLAGS:
            raise LinkError(f"section {sec.name} has permissions {sec.perms!r}; expected one of rx, r, rw")
        if sec.nobits and sec.data:
            raise LinkError(f"NOBITS section {sec.name} carries {len(sec.data)} bytes of data")
        if not sec.nobits and len(sec.data) != sec.size:
            raise LinkError(f"section {sec.name} has {len(sec.data)} bytes of data but size {sec.size:#x}")
        if previous is not None and sec.vaddr < previous.vaddr + previous.size:
            raise LinkError(f"section {sec.name} at {sec.vaddr:#x} overlaps or precedes {previous.name}")
        previous = sec
    for group in image.segments():
        bias = group[0].paddr - group[0].vaddr
        for before, sec in zip(group, group[1:]):
            if sec.paddr - sec.vaddr != bias:
                raise LinkError(f"sections {group[0].name} and {sec.name} share a segment but not a "
                                f"virtual-to-physical offset")
            if before.nobits and not sec.nobits:
                raise LinkError(f"section {sec.name} has file contents but follows NOBITS {before.name} "
                                f"in the same segment")
    if not any(s.vaddr <= image.entry < s.vaddr + s.size and "x" in s.perms for s in image.sections):
        raise LinkError(f"entry point {image.entry:#x} is not inside an executable section")
    by_name = {sec.name: sec for sec in image.sections}
    for sym in image.symbols:
        sec = by_name.get(sym.section)
        if sec is None:
            raise LinkError(f"symbol {sym.name} names section {sym.section}, which the image does not have")
        if sym.kind not in _SYMBOL_TYPES:
            raise LinkError(f"symbol {sym.name} has kind {sym.kind!r}; expected func or object")
        if not sec.vaddr <= sym.value <= sec.vaddr + sec.size:
            raise LinkError(f"symbol {sym.name} at {sym.value:#x} lies outside its section {sec.name}")
    _check_widths(image, target)


def _check_widths(image: LinkedImage, target: ElfTarget) -> None:
    """Addresses must fit the class; sizes and alignments must fit 32 bits whatever the class, because LIEF
    writes p_memsz, p_align, sh_size, sh_addralign and st_size cut to 32 bits even in an ELF64."""
    top = 1 << target.bits
    checks = [(f"the entry point {image.entry:#x}", image.entry, top - 1, f"a {target.bits}-bit address")]
    for sec in image.sections:
        checks += [   # sizes first: a huge size also pushes the end past the top, but is the cause
            (f"section {sec.name} size {sec.size:#x}", sec.size, _LIEF_SIZE_MAX, _LIEF_SIZE_LIMIT),
            (f"section {sec.name} alignment {sec.align:#x}", sec.align, _LIEF_SIZE_MAX, _LIEF_SIZE_LIMIT),
            (f"section {sec.name} at {sec.vaddr:#x}", sec.vaddr, top - 1, f"a {target.bits}-bit address"),
            (f"section {sec.name} loaded at {sec.paddr:#x}", sec.paddr, top - 1, f"a {target.bits}-bit address"),
            (f"the end of section {sec.name}, {sec.vaddr + sec.size:#x},", sec.vaddr + sec.size, top,
             f"the {target.bits}-bit address space"),
            (f"the physical end of section {sec.name}, {sec.paddr + sec.size:#x},", sec.paddr + sec.size, top,
             f"the {target.bits}-bit address space"),
        ]
    for group in image.segments():
        memsz = group[-1].vaddr + group[-1].size - group[0].vaddr
        checks.append((f"the segment from {group[0].name} to {group[-1].name}, {memsz:#x} bytes,", memsz,
                       _LIEF_SIZE_MAX, _LIEF_SIZE_LIMIT))
    for sym in image.symbols:
        checks += [(f"symbol {sym.name} at {sym.value:#x}", sym.value, top - 1, f"a {target.bits}-bit address"),
                   (f"symbol {sym.name} size {sym.size:#x}", sym.size, _LIEF_SIZE_MAX, _LIEF_SIZE_LIMIT)]
    for what, value, highest, limit in checks:
        if not 0 <= value <= highest:
            raise LinkError(f"{what} does not fit {limit}")


def _layout(image: LinkedImage, target: ElfTarget) -> _Layout:
    """Give every segment a file offset congruent to its vaddr, packed after the program header table."""
    loads: list[_Load] = []
    placed: list[_Placed] = []
    cursor = target.ehdr_size + len(image.segments()) * target.phdr_size
    for group in image.segments():
        base = group[0]
        offset = cursor + (base.vaddr - cursor) % target.page_size
        backed = [sec for sec in group if not sec.nobits]
        filesz = backed[-1].vaddr + backed[-1].size - base.vaddr if backed else 0
        content = bytearray(filesz)
        for sec in backed:
            start = sec.vaddr - base.vaddr
            content[start:start + sec.size] = sec.data
        for sec in group:
            # NOBITS sits where the segment's file data ends, not at a congruent offset that can lie past the
            # end of the file.
            placed.append(_Placed(sec, offset + (filesz if sec.nobits else sec.vaddr - base.vaddr)))
        loads.append(_Load(
            vaddr=base.vaddr, paddr=base.paddr, offset=offset, filesz=filesz,
            memsz=group[-1].vaddr + group[-1].size - base.vaddr,
            flags=_SEGMENT_FLAGS[base.perms], content=bytes(content),
        ))
        cursor = offset + filesz
    for entry in placed:
        if (entry.section.name == ".multiboot"
                and entry.offset + _multiboot_header_size(entry.section) > hw.MULTIBOOT_HEADER_SEARCH_LIMIT):
            raise LinkError(f"the Multiboot header would sit at file offset {entry.offset:#x}, past the first "
                            f"{hw.MULTIBOOT_HEADER_SEARCH_LIMIT // 1024} KiB where loaders look for it")
    return _Layout(tuple(loads), tuple(placed), cursor)


def _multiboot_header_size(sec: Section) -> int:
    """12 bytes, or 32 when the flags ask for the a.out address fields; the whole header must be in the window."""
    if len(sec.data) >= 8 and struct.unpack_from("<I", sec.data, 4)[0] & hw.MULTIBOOT_FLAG_ADDRESSES:
        return hw.MULTIBOOT_ADDRESS_HEADER_SIZE
    return hw.MULTIBOOT_HEADER_SIZE


def _set_segment_header(segment: lief.ELF.Segment, load: _Load, target: ElfTarget) -> None:
    segment.type = lief.ELF.Segment.TYPE.LOAD
    segment.flags = lief.ELF.Segment.FLAGS(load.flags)
    segment.file_offset = load.offset
    segment.virtual_address = load.vaddr
    segment.physical_address = load.paddr
    segment.physical_size = load.filesz
    segment.virtual_size = load.memsz
    segment.alignment = target.page_size


def _set_section_header(section: lief.ELF.Section, placed: _Placed) -> None:
    section.flags = lief.ELF.Section.FLAGS(placed.sh_flags)
    section.virtual_address = placed.section.vaddr
    section.offset = placed.offset
    section.size = placed.section.size
    section.alignment = placed.section.align


def _add_symbols(binary: lief.ELF.Binary, image: LinkedImage) -> None:
    binary.add_symtab_symbol(lief.ELF.Symbol())   # index 0 must be the null symbol; LIEF does not add one
    for sym in image.symbols:
        entry = lief.ELF.Symbol()
        entry.name = sym.name
        entry.value = sym.value
        entry.size = sym.size
        entry.binding = lief.ELF.Symbol.BINDING.GLOBAL
        entry.type = lief.ELF.Symbol.TYPE.FUNC if sym.kind == "func" else lief.ELF.Symbol.TYPE.OBJECT
        binary.add_symtab_symbol(entry)


def _settle(binary: lief.ELF.Binary, image: LinkedImage, layout: _Layout, target: ElfTarget) -> None:
    """Set every planned header field on what LIEF holds: once before the first write, once after re-parsing it.

    The second time is what counts: only then are the section indices final and `.bss` back where it belongs.
    The segment contents are set again too: the first write zeroes the bytes where the skeleton's `.shstrtab`
    was, and a segment may start there.
    """
    loads = [seg for seg in binary.segments if seg.type == lief.ELF.Segment.TYPE.LOAD]
    for segment, load in zip(loads, layout.loads):
        _set_segment_header(segment, load, target)
        segment.content = list(load.content)
    for placed in layout.sections:
        section = binary.get_section(placed.section.name)
        if section is not None:
            _set_section_header(section, placed)
    for entry in binary.symtab_symbols:
        index = binary.get_section_idx(image.symbol(entry.name).section) if entry.name else 0
        if isinstance(index, int):     # else a lief_errors value, and _verify reports the st_shndx left behind
            entry.shndx = index
    # LIEF writes `.shstrtab` with sh_addralign 0. GRUB 2.06 copies every section with sh_addr 0 into memory for
    # the Multiboot information and aligns it up to sh_addralign: to 0 for 0, so `.shstrtab` lands at physical 0
    # over the real-mode interrupt vectors, and once the names reach vector 0x10 (0x40) the BIOS calls GRUB still
    # makes hang the boot (they did with the DWARF sections' names).
    names = binary.get_section(".shstrtab")
    if names is not None:
        names.alignment = 1
    binary.header.entrypoint = image.entry


def _verify(data: bytes, image: LinkedImage, layout: _Layout, target: ElfTarget) -> list[str]:
    """Every field this module sets, read back by pyelftools; one line per difference."""
    try:
        elf = ELFFile(io.BytesIO(data))
        return _differences(elf, data, image, layout, target)
    except ELFError as err:
        return [f"unreadable by pyelftools: {err}"]


def _differences(elf: ELFFile, data: bytes, image: LinkedImage, layout: _Layout, target: ElfTarget) -> list[str]:
    problems: list[str] = []

    def expect(what: str, got: object, want: object) -> None:
        if got != want:
            problems.append(f"{what} is {_show(got)}, expected {_show(want)}")

    header = elf.header
    expect("EI_CLASS", elf.elfclass, target.bits)
    expect("EI_DATA", header.e_ident["EI_DATA"], "ELFDATA2LSB")
    expect("e_type", header.e_type, "ET_EXEC")
    expect("e_machine", ENUM_E_MACHINE.get(header.e_machine, header.e_machine), target.machine)
    expect("e_entry", header.e_entry, image.entry)
    # The layout put the first segment right after a program header table of this class at this offset.
    for field, want in (("e_ehsize", target.ehdr_size), ("e_phoff", target.ehdr_size),
                        ("e_phentsize", target.phdr_size), ("e_shentsize", target.shdr_size)):
        expect(field, header[field], want)

    segments = list(elf.iter_segments())
    expect("program header count", len(segments), len(layout.loads))
    for index, (segment, load) in enumerate(zip(segments, layout.loads)):
        name = f"program header {index}"
        expect(f"{name} p_type", segment["p_type"], "PT_LOAD")
        for field, want in (("p_offset", load.offset), ("p_vaddr", load.vaddr), ("p_paddr", load.paddr),
                            ("p_filesz", load.filesz), ("p_memsz", load.memsz), ("p_flags", load.flags),
                            ("p_align", target.page_size)):
            expect(f"{name} {field}", segment[field], want)
        if data[load.offset:load.offset + load.filesz] != load.content:
            problems.append(f"{name} file contents differ from the image")
    problems.extend(_overlaps(elf, layout, [name for name, _ in image.unloaded]))

    sections = {sec.name: sec for sec in elf.iter_sections()}
    expect("section names", sorted(n for n in sections if n),
           sorted([p.section.name for p in layout.sections] + list(_TABLES) + [n for n, _ in image.unloaded]))
    if ".shstrtab" in sections:
        expect(".shstrtab sh_addralign", sections[".shstrtab"]["sh_addralign"], 1)
    for name, content in image.unloaded:
        sec = sections.get(name)
        if sec is not None:
            for field, want in (("sh_type", "SHT_PROGBITS"), ("sh_flags", 0), ("sh_addr", 0)):
                expect(f"{name} {field}", sec[field], want)
            if sec.data() != content:
                problems.append(f"{name} contents differ from the image's")
    for placed in layout.sections:
        sec = sections.get(placed.section.name)
        if sec is None:
            continue
        for field, want in (("sh_type", "SHT_NOBITS" if placed.section.nobits else "SHT_PROGBITS"),
                            ("sh_flags", placed.sh_flags), ("sh_addr", placed.section.vaddr),
                            ("sh_offset", placed.offset), ("sh_size", placed.section.size),
                            ("sh_addralign", placed.section.align)):
            expect(f"{placed.section.name} {field}", sec[field], want)

    symtab = elf.get_section_by_name(".symtab")
    if symtab is None:
        return problems
    symbols = list(symtab.iter_symbols())
    if not symbols or symbols[0].name or symbols[0]["st_value"] or symbols[0]["st_shndx"] != "SHN_UNDEF":
        problems.append("symbol 0 is not the null symbol")
    index_names = {i: sec.name for i, sec in enumerate(elf.iter_sections())}
    got = {
        (s.name, s["st_value"], s["st_size"], s["st_info"]["type"], s["st_info"]["bind"],
         index_names.get(s["st_shndx"], str(s["st_shndx"])))
        for s in symbols[1:]
    }
    want = {(s.name, s.value, s.size, _SYMBOL_TYPES[s.kind], "STB_GLOBAL", s.section) for s in image.symbols}
    problems.extend(f"symbol {entry} is missing" for entry in sorted(want - got))
    problems.extend(f"symbol {entry} was not asked for" for entry in sorted(got - want))
    return problems


def _show(value: object) -> str:
    return hex(value) if isinstance(value, int) else repr(value)


def _overlaps(elf: ELFFile, layout: _Layout, unloaded: list[str]) -> list[str]:
    """LIEF places its tables and the unloaded sections itself; none may land on another part of the file."""
    header = elf.header
    parts = [("the ELF header", 0, header.e_ehsize),
             ("the program header table", header.e_phoff, header.e_phnum * header.e_phentsize),
             ("the section header table", header.e_shoff, header.e_shnum * header.e_shentsize)]
    parts += [(f"segment {i}", load.offset, load.filesz) for i, load in enumerate(layout.loads)]
    parts += [(sec.name, sec["sh_offset"], sec["sh_size"]) for sec in elf.iter_sections()
              if sec.name in _TABLES or sec.name in unloaded]
    problems = []
    reach, reacher = 0, ""
    for start, end, name in sorted((start, start + size, name) for name, start, size in parts if size):
        if start < reach:
            problems.append(f"{name} at {start:#x} overlaps {reacher}, which ends at {reach:#x}")
        if end > reach:
            reach, reacher = end, name
    return problems


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        # O_EXCL with a random name instead of mkstemp: the file gets the umask's mode, like any build output.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise KgenError(f"{path}: cannot write the ELF: {err.strerror or err}") from err
    except BaseException:       # Ctrl-C mid-write: no temporary file left behind either
        tmp.unlink(missing_ok=True)
        raise
