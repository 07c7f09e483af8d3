"""Place the pieces of every unit into sections and resolve symbols between them, in Python.

Section order and permissions:   .multiboot .text  (R-X) | .rodata (R) | .data .bss (RW)
Each permission group starts on a page so the boot stub can map it with its own flags.

keystone picks short or near jumps from the distance to the target, so a piece's size can depend on where other
pieces land. Linking therefore repeats place-and-assemble until sizes and addresses stop changing.
"""
from __future__ import annotations

from dataclasses import dataclass

from kgen.build.asm import SECTIONS, Assembled, Piece, assemble
from kgen.errors import ImageTooLarge, LinkError
from kgen.build.image import LinkedImage, Section, Symbol
from kgen.build.layout import Layout

SECTION_PERMS = {".multiboot": "rx", ".text": "rx", ".rodata": "r", ".data": "rw", ".bss": "rw"}
ENTRY_SYMBOL = "_start"
MAX_PASSES = 10
# Every section starts on a 16-byte boundary, so code that clears or copies sections can work in dwords.
SECTION_ALIGN = 0x10


def _align(value: int, alignment: int) -> int:
    return (value + alignment - 1) & ~(alignment - 1)


def linker_symbols(layout: Layout, bounds: dict[str, tuple[int, int]]) -> dict[str, int]:
    """Symbols the linker defines: `__text_start`, `__text_end`, ... and the image's `__kernel_start/_end`."""
    symbols = {}
    for name, (start, end) in bounds.items():
        symbols[f"__{name.lstrip('.')}_start"] = start
        symbols[f"__{name.lstrip('.')}_end"] = end
    symbols["__kernel_start"] = layout.kernel_virtual_start
    symbols["__kernel_end"] = _align(max(end for _, end in bounds.values()), layout.page_size)
    return symbols


def _check_names(pieces: list[Piece], constants: dict[str, int]):
    owner: dict[str, str] = {}
    for piece in pieces:
        for label in piece.global_labels:
            if label in constants:
                raise LinkError(f"templates/{piece.unit}.s: label {label} has the name of a layout constant")
            if label.startswith("__"):
                raise LinkError(f"templates/{piece.unit}.s: label {label}: names starting with __ are the linker's")
            if label in owner:
                raise LinkError(f"symbol {label} is defined twice: in templates/{owner[label]}.s "
                                f"and templates/{piece.unit}.s")
            owner[label] = piece.unit


@dataclass(frozen=True)
class LinkResult:
    image: LinkedImage
    assembled: tuple[Assembled, ...]     # every piece at its final address
    visible: dict[str, int]              # constants and symbols the final pass assembled against


def link(pieces: list[Piece], layout: Layout, constants: dict[str, int]) -> LinkResult:
    _check_names(pieces, constants)
    by_section = {name: [p for p in pieces if p.section == name] for name in SECTIONS}
    sizes = {p.name: 0 for p in pieces}
    # First guess for every symbol: the image start. Far enough from nothing to matter; the passes converge.
    symbols = {label: layout.kernel_virtual_start for p in pieces for label in p.global_labels}
    symbols.update(linker_symbols(layout, {s: (layout.kernel_virtual_start,) * 2 for s in SECTIONS}))

    for _ in range(MAX_PASSES):
        placed, bounds = _place(by_section, sizes, layout)
        visible = dict(constants)
        visible.update(symbols)
        # Code that runs before paging calls other such code at its physical address too.
        early = dict(visible)
        early.update({label: symbols[label] - layout.kernel_virtual_base for p in pieces if p.before_paging
                      for label in p.global_labels})
        # Code gets the addresses of its template lines too, for the debugger's line table (kgen/build/dwarf.py).
        results: list[Assembled] = [assemble(p, _run_address(p, placed[p.name], layout),
                                             early if p.before_paging else visible,
                                             line_table="x" in SECTION_PERMS[p.section]) for p in pieces]
        new_sizes = {r.piece.name: len(r.data) for r in results}
        new_symbols = {label: addr + placed[r.piece.name] - r.address for r in results
                       for label, addr in r.labels.items() if not label.startswith(".L")}
        new_symbols.update(linker_symbols(layout, bounds))
        if new_sizes == sizes and new_symbols == symbols:
            return LinkResult(_image(results, bounds, symbols, layout), tuple(results), visible)
        sizes, symbols = new_sizes, new_symbols
    raise LinkError(f"link did not settle after {MAX_PASSES} passes (jump sizes keep changing)")


def _run_address(piece: Piece, vaddr: int, layout: Layout) -> int:
    """Where the CPU runs the piece: its virtual address, or its physical one for code that runs before paging."""
    return vaddr - link_offset(piece, layout)


def link_offset(piece: Piece, layout: Layout) -> int:
    """What moves an address the piece was assembled at to where the ELF links it (as its symbols are)."""
    return layout.kernel_virtual_base if piece.before_paging else 0


def _place(by_section: dict[str, list[Piece]], sizes: dict[str, int], layout: Layout):
    placed: dict[str, int] = {}
    bounds: dict[str, tuple[int, int]] = {}
    cursor = layout.kernel_virtual_start
    previous_perms = None
    for name in SECTIONS:
        if SECTION_PERMS[name] != previous_perms:
            cursor = _align(cursor, layout.page_size)
            previous_perms = SECTION_PERMS[name]
        cursor = _align(cursor, SECTION_ALIGN)
        start = cursor
        for piece in by_section[name]:
            cursor = _align(cursor, piece.align)
            placed[piece.name] = cursor
            cursor += sizes[piece.name]
        bounds[name] = (start, cursor)
    # The image ends on a page: the boot stub maps whole pages, and what they hold beyond .bss is the kernel's.
    last = SECTIONS[-1]
    bounds[last] = (bounds[last][0], _align(cursor, layout.page_size))
    return placed, bounds


def _image(results: list[Assembled], bounds, symbols: dict[str, int], layout: Layout) -> LinkedImage:
    sections = []
    for name in SECTIONS:
        start, end = bounds[name]
        if end == start:
            continue
        data = bytearray(end - start)
        for r in results:
            if r.piece.section == name:
                offset = r.address - _run_address(r.piece, start, layout)
                data[offset:offset + len(r.data)] = r.data
        nobits = name == ".bss"
        if nobits and any(data):
            raise LinkError(".bss must hold only zero-filled space (.skip / .balign with 0), found data bytes")
        sections.append(Section(name=name, vaddr=start, paddr=start - layout.kernel_virtual_base,
                                data=b"" if nobits else bytes(data), size=end - start,
                                perms=SECTION_PERMS[name], nobits=nobits,
                                align=max([r.piece.align for r in results if r.piece.section == name], default=4)))
    image_end = symbols["__kernel_end"]
    if image_end > layout.kernel_window.end:
        raise ImageTooLarge(image_end - layout.kernel_virtual_start, layout.kernel_max_size)
    if ENTRY_SYMBOL not in symbols:
        raise LinkError(f"no `{ENTRY_SYMBOL}` label in any template: the kernel has no entry point")
    return LinkedImage(entry=symbols[ENTRY_SYMBOL], sections=tuple(sections),
                       symbols=_symbol_table(sections, symbols))


def _symbol_table(sections: list[Section], symbols: dict[str, int]) -> tuple[Symbol, ...]:
    """Every global label with the section it lies in; a label's size runs to the next label of its section."""
    def section_of(addr: int) -> Section | None:
        for sec in sections:
            if sec.vaddr <= addr < sec.vaddr + sec.size:
                return sec
        return None

    table = []
    ordered = sorted((addr, name) for name, addr in symbols.items() if not name.startswith("__"))
    for i, (addr, name) in enumerate(ordered):
        sec = section_of(addr)
        if sec is None:
            continue
        following = [a for a, _ in ordered[i + 1:] if a > addr]
        end = min([sec.vaddr + sec.size] + following)
        table.append(Symbol(name=name, value=addr, section=sec.name, size=end - addr,
                            kind="func" if "x" in sec.perms else "object"))
    for name, addr in symbols.items():
        if not name.startswith("__"):
            continue
        # A boundary symbol may sit just past the last byte of a section (`__bss_end`, `__kernel_end`).
        sec = section_of(addr) or next((s for s in sections if s.vaddr + s.size == addr), None)
        if sec is not None:
            table.append(Symbol(name=name, value=addr, section=sec.name, size=0, kind="object"))
    return tuple(table)
