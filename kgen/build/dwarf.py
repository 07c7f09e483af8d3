"""The kernel's DWARF line table: which template line each instruction came from, so gdb shows template source.

keystone gives bytes only, and pyelftools reads DWARF but does not write it, so this module writes the few
sections a debugger needs by hand, from the line addresses the assembler recovered (kgen/build/asm.py puts a local
label before every template line that emits code or data and reads its address back):

- `.debug_line`: one DWARF 4 line program per template file, whose file table holds that one file by its absolute
  path (the template the build read: the checkout's `templates/`, or the installed package's `_data/templates/`),
  and one sequence per contiguous piece of code: DW_LNE_set_address, then a row per line (special opcodes where
  they fit, DW_LNS_advance_pc / DW_LNS_advance_line otherwise), then DW_LNE_end_sequence at the piece's end.
- `.debug_info` / `.debug_abbrev`: one compile unit per template file, with no children (like GNU as's `-g`): its
  name, comp_dir, producer, language (assembler), DW_AT_stmt_list, and its addresses as DW_AT_low_pc/high_pc, or
  DW_AT_ranges (`.debug_ranges`) when the file has code in more than one piece (x86_64/boot.s: 64-bit `.text` and
  the `.code32` stub). gdb finds a compile unit for an address by these, then reads its line program.

Only code gets rows (`.multiboot` and `.text`): a data line in `.rodata` is nowhere a debugger stops. A macro
invocation line covers its whole expansion; the macros' own lines (templates/macros.inc) have no rows.

Addresses are where the ELF links each byte (the symbol table's addresses), also for code that runs before paging:
gdb's second copy of the symbols at the load addresses (`add-symbol-file ELF -s .text 0x... `, kgen/debug/symbols.py)
moves the line table with the sections, so the boot stub has source lines at its physical addresses too.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, replace

from kgen.build.layout import Layout
from kgen.build.link import SECTION_PERMS, LinkResult, link_offset

PRODUCER = "kgen"
VERSION = 4
# Line-number program parameters: the usual choice of GNU as; special opcodes cover an address step of up to 17
# bytes together with a line step of -5..8 in one byte.
LINE_BASE, LINE_RANGE, OPCODE_BASE = -5, 14, 13
_STANDARD_OPCODE_LENGTHS = (0, 1, 1, 1, 1, 0, 0, 0, 1, 0, 0, 1)    # operands of opcodes 1..12 (DWARF 4, 6.2.4)

DW_TAG_compile_unit = 0x11
DW_CHILDREN_no = 0
DW_AT_name, DW_AT_stmt_list, DW_AT_low_pc, DW_AT_high_pc = 0x03, 0x10, 0x11, 0x12
DW_AT_language, DW_AT_comp_dir, DW_AT_producer, DW_AT_ranges = 0x13, 0x1B, 0x25, 0x55
DW_FORM_addr, DW_FORM_data2, DW_FORM_string, DW_FORM_sec_offset = 0x01, 0x05, 0x08, 0x17
DW_LANG_Mips_Assembler = 0x8001          # what GNU as records for assembly source
DW_LNS_copy, DW_LNS_advance_pc, DW_LNS_advance_line = 0x01, 0x02, 0x03
DW_LNE_end_sequence, DW_LNE_set_address = 0x01, 0x02

ABBREV_CONTIGUOUS, ABBREV_RANGES = 1, 2


@dataclass(frozen=True)
class Sequence:
    """One contiguous piece of code: a row (address, line) wherever a template line starts, up to `end`."""

    path: str
    rows: tuple[tuple[int, int], ...]
    end: int


def line_sequences(linked: LinkResult, layout: Layout) -> list[Sequence]:
    """The rows of every piece of code, at the addresses the ELF links them at, in address order."""
    sequences = []
    for result in linked.assembled:
        piece = result.piece
        if not piece.source or "x" not in SECTION_PERMS[piece.section] or not result.data:
            continue
        offset = link_offset(piece, layout)
        end = result.address + len(result.data) + offset
        rows: dict[int, int] = {}
        for line, address in result.lines:
            # A line that emits nothing (a macro expanding to nothing) shares its address with the next one,
            # which is the line the bytes there come from.
            rows[address + offset] = line
        ordered = tuple(sorted((address, line) for address, line in rows.items() if address < end))
        if ordered:
            sequences.append(Sequence(piece.source, ordered, end))
    return sorted(sequences, key=lambda seq: seq.rows[0][0])


def with_line_table(linked: LinkResult, layout: Layout, comp_dir: str) -> LinkResult:
    """The link result whose image carries the DWARF sections for its code."""
    sections = debug_sections(line_sequences(linked, layout), layout.arch.word_size, comp_dir)
    return replace(linked, image=replace(linked.image, unloaded=tuple(sections.items())))


def debug_sections(sequences: list[Sequence], address_size: int, comp_dir: str) -> dict[str, bytes]:
    """`.debug_abbrev`, `.debug_info`, `.debug_line` and, when a file has several pieces, `.debug_ranges`:
    one compile unit per file, in the order the files' code first appears."""
    address = {4: "<I", 8: "<Q"}[address_size]
    by_path: dict[str, list[Sequence]] = {}
    for seq in sequences:
        by_path.setdefault(seq.path, []).append(seq)
    info, line, ranges = bytearray(), bytearray(), bytearray()
    for path, pieces in by_path.items():
        stmt_list = len(line)
        line += _line_program(path, pieces, address)
        die = bytearray()
        die += _uleb(ABBREV_CONTIGUOUS if len(pieces) == 1 else ABBREV_RANGES)
        die += _string(PRODUCER) + struct.pack("<H", DW_LANG_Mips_Assembler) + _string(path) + _string(comp_dir)
        die += struct.pack("<I", stmt_list)
        if len(pieces) == 1:
            die += struct.pack(address, pieces[0].rows[0][0]) + struct.pack(address, pieces[0].end)
        else:
            # Base address 0, so each range's bounds are the addresses themselves; (0, 0) ends the list.
            die += struct.pack(address, 0) + struct.pack("<I", len(ranges))
            for seq in pieces:
                ranges += struct.pack(address, seq.rows[0][0]) + struct.pack(address, seq.end)
            ranges += struct.pack(address, 0) * 2
        header = struct.pack("<HIB", VERSION, 0, address_size)        # version, .debug_abbrev offset, address size
        info += struct.pack("<I", len(header) + len(die)) + header + die
    sections = {".debug_abbrev": _abbreviations(), ".debug_info": bytes(info), ".debug_line": bytes(line)}
    if ranges:
        sections[".debug_ranges"] = bytes(ranges)
    return sections


def _abbreviations() -> bytes:
    common = [(DW_AT_producer, DW_FORM_string), (DW_AT_language, DW_FORM_data2), (DW_AT_name, DW_FORM_string),
              (DW_AT_comp_dir, DW_FORM_string), (DW_AT_stmt_list, DW_FORM_sec_offset)]
    table = bytearray()
    for code, where in ((ABBREV_CONTIGUOUS, [(DW_AT_low_pc, DW_FORM_addr), (DW_AT_high_pc, DW_FORM_addr)]),
                        (ABBREV_RANGES, [(DW_AT_low_pc, DW_FORM_addr), (DW_AT_ranges, DW_FORM_sec_offset)])):
        table += _uleb(code) + _uleb(DW_TAG_compile_unit) + bytes([DW_CHILDREN_no])
        for attribute, form in common + where:
            table += _uleb(attribute) + _uleb(form)
        table += b"\0\0"
    return bytes(table + b"\0")


def _line_program(path: str, sequences: list[Sequence], address: str) -> bytes:
    """A DWARF 4 line program whose file 1 is `path` (absolute, so no include directories)."""
    files = _string(path) + _uleb(0) + _uleb(0) + _uleb(0) + b"\0"   # directory 0, no mtime, no length
    header = bytes([1, 1, 1, LINE_BASE & 0xFF, LINE_RANGE, OPCODE_BASE])  # min insn length, max ops, default_is_stmt
    header += bytes(_STANDARD_OPCODE_LENGTHS) + b"\0" + files             # no include directories
    program = bytearray()
    for seq in sequences:
        target = struct.pack(address, seq.rows[0][0])
        program += b"\0" + _uleb(1 + len(target)) + bytes([DW_LNE_set_address]) + target
        current_address, current_line = seq.rows[0][0], 1
        for row_address, row_line in seq.rows:
            program += _advance(row_address - current_address, row_line - current_line)
            current_address, current_line = row_address, row_line
        program += bytes([DW_LNS_advance_pc]) + _uleb(seq.end - current_address)
        program += b"\0\1" + bytes([DW_LNE_end_sequence])
    body = struct.pack("<H", VERSION) + struct.pack("<I", len(header)) + header + program
    return struct.pack("<I", len(body)) + body


def _advance(address_step: int, line_step: int) -> bytes:
    """Append a row `address_step` bytes and `line_step` lines on: one special opcode where it fits."""
    out = bytearray()
    if not LINE_BASE <= line_step < LINE_BASE + LINE_RANGE:
        out += bytes([DW_LNS_advance_line]) + _sleb(line_step)
        line_step = 0
    special = (line_step - LINE_BASE) + LINE_RANGE * address_step + OPCODE_BASE
    if special > 0xFF:
        out += bytes([DW_LNS_advance_pc]) + _uleb(address_step)
        special = (line_step - LINE_BASE) + OPCODE_BASE
    return bytes(out + bytes([special]))


def _string(text: str) -> bytes:
    return text.encode() + b"\0"


def _uleb(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _sleb(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        done = (value == 0 and not byte & 0x40) or (value == -1 and byte & 0x40)
        out.append(byte | (0 if done else 0x80))
        if done:
            return bytes(out)
