"""What the tools need to know about a kernel ELF, read with pyelftools: ours or anyone else's Multiboot kernel.

Everything is read once, in `ElfInfo.load`, into frozen values, so later questions (which symbol holds this
faulting address? where is the Multiboot header?) never touch the file again and cannot see it half-rewritten.
"""
from __future__ import annotations

import bisect
import struct
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Mapping, Sequence

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile
from elftools.elf.sections import SymbolTableSection

from kgen.arch import I386, Arch, hw
from kgen.errors import KgenError

_PF_X, _PF_W, _PF_R = 1, 2, 4
_KINDS = {"STT_FUNC": "func", "STT_OBJECT": "object", "STT_NOTYPE": "notype"}


@dataclass(frozen=True)
class LoadSegment:
    """One PT_LOAD: where it runs (vaddr), where the loader puts it (paddr), and what it may do."""

    vaddr: int
    paddr: int
    filesz: int
    memsz: int
    readable: bool
    writable: bool
    executable: bool
    index: int = field(default=-1, compare=False)    # its program header's index, as `readelf -l` numbers them


@dataclass(frozen=True)
class ElfSymbol:
    """A FUNC, OBJECT or NOTYPE symbol with a name and a defined value."""

    name: str
    value: int
    size: int
    kind: str                 # "func", "object" or "notype"
    section: str | None       # None for an absolute symbol
    end: int                  # addresses in [value, end) belong to it: its size, or if 0 its section's end when
                              # the value lies inside the section (else it names only its own address)
    is_global: bool


@dataclass(frozen=True)
class ElfInfo:
    """The entry point, PT_LOAD segments and symbols of one ELF file; `symbols` maps a name to its symbol."""

    path: Path
    bits: int
    entry: int
    segments: tuple[LoadSegment, ...]
    by_address: tuple[ElfSymbol, ...]             # sorted by value, for symbolize
    symbols: Mapping[str, ElfSymbol] = field(hash=False)
    head: bytes = field(repr=False)               # the start of the file, where a Multiboot header (v1 or v2) must be
    program_headers: tuple[str, ...] = ()         # every program header's p_type (PT_LOAD, PT_NOTE, ...), in order

    @classmethod
    def load(cls, path: Path) -> ElfInfo:
        path = Path(path)
        try:
            with path.open("rb") as stream:
                elf = ELFFile(stream)
                symbols = _read_symbols(elf)
                info = cls(
                    path=path,
                    bits=elf.elfclass,
                    entry=elf.header.e_entry,
                    segments=tuple(_read_segments(elf)),
                    by_address=tuple(sorted(symbols, key=lambda s: (s.value, s.name))),
                    symbols=MappingProxyType(_by_name(symbols)),
                    head=_read_head(stream),
                    program_headers=tuple(seg["p_type"] for seg in elf.iter_segments()),
                )
        except OSError as err:
            raise KgenError(f"{path}: cannot read: {err.strerror or err}") from err
        except ELFError as err:
            reason = " ".join(str(err).split())
            raise KgenError(f"{path}: not a readable ELF file ({reason})") from err
        return info

    def relocated(self, offset: int) -> ElfInfo:
        """This ELF moved by `offset` bytes of virtual address, as a loader that relocates a kernel runs it
        (--symbols ELF@OFFSET): every segment's p_vaddr, the entry and every symbol move; p_paddr stay (where a
        loader really put the kernel is learnt from the page tables, kgen/guest/invariants.py `find_placement`)."""
        if not offset:
            return self
        moved = tuple(replace(sym, value=sym.value + offset, end=sym.end + offset) for sym in self.by_address)
        return replace(self, entry=self.entry + offset,
                       segments=tuple(replace(seg, vaddr=seg.vaddr + offset) for seg in self.segments),
                       by_address=moved, symbols=MappingProxyType(_by_name(moved)))

    def symbolize(self, addr: int) -> str:
        """`0xc01000a3 <pmm_alloc+0x13>` for an address inside a symbol, the bare address otherwise."""
        text = f"{addr:#0{self.bits // 4 + 2}x}"
        sym, where = self.symbol_at(addr), addr
        if sym is None:
            # Before paging is on, a higher-half kernel runs at its load address: name the code it runs there.
            where = self.virtual_of_physical(addr)
            sym = self.symbol_at(where) if where is not None else None
            if sym is None:
                return text
        offset = where - sym.value
        name = f"{sym.name}+{offset:#x}" if offset else sym.name
        return f"{text} <{name}>" if where == addr else f"{text} <{name}, at its physical address>"

    def virtual_of_physical(self, addr: int) -> int | None:
        """The link-time address of the byte a segment loads at physical `addr`, or None outside every segment."""
        for seg in self.segments:
            if seg.paddr != seg.vaddr and seg.paddr <= addr < seg.paddr + seg.memsz:
                return addr - seg.paddr + seg.vaddr
        return None

    def symbol_at(self, addr: int) -> ElfSymbol | None:
        """The nearest symbol at or below `addr` whose extent covers it."""
        # Walk down from the nearest preceding symbol rather than stopping at it: a small sized object or label
        # can sit between a function's start and the address without covering it.
        for index in range(bisect.bisect_right(self.by_address, addr, key=_value) - 1, -1, -1):
            if addr < self.by_address[index].end:
                value = self.by_address[index].value
                same = self.by_address[bisect.bisect_left(self.by_address, value, key=_value):index + 1]
                return max((s for s in same if addr < s.end), key=_preference)
        return None

    def multiboot_header_offset(self) -> int | None:
        """File offset of a valid Multiboot v1 header (magic, flags, checksum summing to 0), as GRUB finds it."""
        window = min(len(self.head), hw.MULTIBOOT_HEADER_SEARCH_LIMIT)
        for offset in range(0, window - hw.MULTIBOOT_HEADER_SIZE + 1, 4):
            magic, flags, checksum = struct.unpack_from("<III", self.head, offset)
            if magic == hw.MULTIBOOT_HEADER_MAGIC and (magic + flags + checksum) & 0xFFFFFFFF == 0:
                return offset
        return None

    def multiboot_headers(self) -> MultibootHeaders:
        """Which Multiboot headers this ELF has (v1, v2, both or none) and what the v2 header's tags ask for."""
        v1 = self.multiboot_header_offset()
        v1_flags = struct.unpack_from("<I", self.head, v1 + 4)[0] if v1 is not None else None
        v2 = multiboot2_header_offset(self.head)
        if v2 is None:
            return MultibootHeaders(v1, v1_flags)
        architecture, length = struct.unpack_from("<II", self.head, v2 + 4)
        tags = multiboot2_header_tags(self.head[v2:v2 + length])
        relocatable = next((Multiboot2Relocatable(*struct.unpack_from("<IIII", body))
                            for kind, _, body in tags if kind == hw.MULTIBOOT2_HEADER_TAG_RELOCATABLE
                            and len(body) >= 16), None)
        return MultibootHeaders(v1, v1_flags, v2, architecture, tuple(kind for kind, _, _ in tags), relocatable)


def merged(parts: Sequence[ElfInfo]) -> ElfInfo:
    """Several ELFs judged as one kernel (--symbols given more than once: a kernel and the parts loaded beside it).
    Segments: all of them, in the order given, their program headers numbered on from the previous ELF's (the first
    ELF's 0 to n-1, the second's from n: what --boot-only-segment counts). Symbols: all of them; a name two ELFs
    define is the first one's (within one ELF the global one's, as `load` reads it). Path, class, entry and head
    (what names the kernel in messages and judges its architecture): the first ELF's."""
    if len(parts) == 1:
        return parts[0]
    segments, headers, symbols = [], [], []
    for part in parts:
        segments += [replace(seg, index=seg.index + len(headers)) for seg in part.segments]
        headers += part.program_headers
        symbols += part.by_address
    table: dict[str, ElfSymbol] = {}
    for part in reversed(parts):
        table.update(part.symbols)      # the first ELF's last: its names win
    return replace(parts[0], segments=tuple(segments), program_headers=tuple(headers),
                   by_address=tuple(sorted(symbols, key=lambda s: (s.value, s.name))),
                   symbols=MappingProxyType(table))


@dataclass(frozen=True)
class Multiboot2Relocatable:
    """A Multiboot 2 relocatable tag: the loader may put the image anywhere in [min_addr, max_addr], aligned."""
    min_addr: int
    max_addr: int
    align: int
    preference: int            # 0 anywhere, 1 lowest, 2 highest address (hw.MULTIBOOT2_RELOCATABLE_PREFERENCES)

    def describe(self) -> str:
        where = hw.MULTIBOOT2_RELOCATABLE_PREFERENCES.get(self.preference, f"preference {self.preference}")
        return (f"relocatable to {self.min_addr:#x}-{self.max_addr:#x}, aligned to {self.align:#x}, "
                f"{where}")


@dataclass(frozen=True)
class MultibootHeaders:
    """The Multiboot headers of one ELF as GRUB finds them: file offsets (None: absent) and what they ask for."""
    v1_offset: int | None = None
    v1_flags: int | None = None
    v2_offset: int | None = None
    v2_architecture: int | None = None
    v2_tags: tuple[int, ...] = ()                   # header tag types in file order, the end tag left out
    v2_relocatable: Multiboot2Relocatable | None = None

    @property
    def protocols(self) -> tuple[str, ...]:
        """GRUB's commands that can load this ELF: "multiboot" (v1), "multiboot2" (v2), in that order."""
        return tuple(name for name, offset in (("multiboot", self.v1_offset), ("multiboot2", self.v2_offset))
                     if offset is not None)

    @property
    def v1_addresses(self) -> bool:
        """The v1 header carries the load addresses (flag bit 16): a loader needs no ELF program headers."""
        return self.v1_flags is not None and bool(self.v1_flags & hw.MULTIBOOT_FLAG_ADDRESSES)

    def describe(self) -> str:
        """One line: which headers were found where, or which were looked for."""
        if not self.protocols:
            return f"no Multiboot header: looked for {LOOKED_FOR}"
        parts = []
        if self.v1_offset is not None:
            parts.append(f"Multiboot 1 header at file offset {self.v1_offset:#x} (flags {self.v1_flags:#x})")
        if self.v2_offset is not None:
            tags = ", ".join(hw.MULTIBOOT2_HEADER_TAGS.get(kind, f"type {kind}") for kind in self.v2_tags)
            arch = ("i386" if self.v2_architecture == hw.MULTIBOOT2_ARCHITECTURE_I386
                    else f"{self.v2_architecture}, not i386")
            parts.append(f"Multiboot 2 header at file offset {self.v2_offset:#x} (architecture {arch}, tags: "
                         f"{tags or 'none'})")
            if self.v2_relocatable is not None:
                parts[-1] += f", {self.v2_relocatable.describe()}"
        return "; ".join(parts)


# What the probe searches, for the line that says an ELF has neither header.
LOOKED_FOR = (f"a Multiboot 1 header (magic {hw.MULTIBOOT_HEADER_MAGIC:#x}, 4-byte aligned, in the first "
              f"{hw.MULTIBOOT_HEADER_SEARCH_LIMIT // 1024} KiB) and a Multiboot 2 header "
              f"(magic {hw.MULTIBOOT2_HEADER_MAGIC:#x}, {hw.MULTIBOOT2_HEADER_ALIGN}-byte aligned, in the first "
              f"{hw.MULTIBOOT2_HEADER_SEARCH_LIMIT // 1024} KiB)")


def multiboot2_header_offset(head: bytes) -> int | None:
    """File offset of a valid Multiboot 2 header in `head` (the file's start), as GRUB's `multiboot2` finds it:
    8-aligned, magic, the four fixed fields summing to 0, the whole header_length inside the search window."""
    window = head[:hw.MULTIBOOT2_HEADER_SEARCH_LIMIT]
    fixed = hw.MULTIBOOT2_HEADER_FIXED_SIZE
    for offset in range(0, len(window) - fixed + 1, hw.MULTIBOOT2_HEADER_ALIGN):
        magic, architecture, length, checksum = struct.unpack_from("<IIII", window, offset)
        if (magic == hw.MULTIBOOT2_HEADER_MAGIC and (magic + architecture + length + checksum) & 0xFFFFFFFF == 0
                and fixed <= length and offset + length <= len(window)):
            return offset
    return None


def multiboot2_header_tags(header: bytes) -> list[tuple[int, int, bytes]]:
    """(type, flags, body) of each tag of a Multiboot 2 header up to its end tag; a malformed size ends the list."""
    tags = []
    offset = hw.MULTIBOOT2_HEADER_FIXED_SIZE
    while offset + 8 <= len(header):
        kind, flags, size = struct.unpack_from("<HHI", header, offset)
        if kind == hw.MULTIBOOT2_HEADER_TAG_END or size < 8 or offset + size > len(header):
            break
        tags.append((kind, flags, header[offset + 8:offset + size]))
        offset += (size + hw.MULTIBOOT2_HEADER_ALIGN - 1) & -hw.MULTIBOOT2_HEADER_ALIGN
    return tags


def name_address(elf: ElfInfo | None, addr: int, mode: Arch = I386) -> str:
    """`addr` named from the ELF: 8 hex digits for EIP as the ELF prints it, always 16 for RIP (a 64-bit kernel may
    come as an ELF32 for Multiboot, whose symbolize would pad to 8)."""
    if not mode.long_mode:
        return elf.symbolize(addr) if elf else mode.hex(addr)
    text = mode.hex(addr)
    if elf is None:
        return text
    named = elf.symbolize(addr)
    return text + named[named.index(" "):] if " " in named else text


def _value(sym: ElfSymbol) -> int:
    return sym.value


def _preference(sym: ElfSymbol) -> tuple[bool, bool, bool, str]:
    # Among symbols at one address, a sized function says most; a global name beats a local alias.
    return (sym.kind == "func", sym.size > 0, sym.is_global, sym.name)


def _read_segments(elf: ELFFile) -> list[LoadSegment]:
    return [
        LoadSegment(
            vaddr=seg["p_vaddr"], paddr=seg["p_paddr"], filesz=seg["p_filesz"], memsz=seg["p_memsz"],
            readable=bool(seg["p_flags"] & _PF_R), writable=bool(seg["p_flags"] & _PF_W),
            executable=bool(seg["p_flags"] & _PF_X), index=index,
        )
        for index, seg in enumerate(elf.iter_segments())
        if seg["p_type"] == "PT_LOAD"
    ]


def _read_symbols(elf: ELFFile) -> list[ElfSymbol]:
    sections = list(elf.iter_sections())
    found: list[ElfSymbol] = []
    for table in sections:
        if not isinstance(table, SymbolTableSection):
            continue
        for sym in table.iter_symbols():
            kind = _KINDS.get(sym["st_info"]["type"])
            shndx = sym["st_shndx"]
            if kind is None or not sym.name or shndx == "SHN_UNDEF":
                continue
            home = sections[shndx] if isinstance(shndx, int) and shndx < len(sections) else None
            if sym["st_size"]:
                end = sym["st_value"] + sym["st_size"]
            elif home is not None and home["sh_addr"] <= sym["st_value"] < home["sh_addr"] + home["sh_size"]:
                end = home["sh_addr"] + home["sh_size"]
            else:
                # Unsized and absolute, or outside its own section (`_kernel_end = . - 0xC0000000`, a label at a
                # section's end): it names a point, never a range, so it names no other address.
                end = sym["st_value"]
            found.append(ElfSymbol(
                name=sym.name, value=sym["st_value"], size=sym["st_size"], kind=kind,
                section=home.name if home is not None else None, end=end,
                is_global=sym["st_info"]["bind"] != "STB_LOCAL",
            ))
    return found


def _by_name(symbols: list[ElfSymbol]) -> dict[str, ElfSymbol]:
    # Static functions in different files may share a name; the global one is the one a user means.
    table: dict[str, ElfSymbol] = {}
    for sym in symbols:
        if sym.name not in table or (sym.is_global and not table[sym.name].is_global):
            table[sym.name] = sym
    return table


def _read_head(stream) -> bytes:
    stream.seek(0)
    return stream.read(max(hw.MULTIBOOT_HEADER_SEARCH_LIMIT, hw.MULTIBOOT2_HEADER_SEARCH_LIMIT))
