"""Templates to bytes: parse a unit into per-section pieces, render each with its constants, assemble with keystone.

A template is Intel-syntax assembly that GNU `as -msyntax=intel -mnaked-reg` accepts unchanged. `.section NAME`
lines split it into pieces; kgen handles those lines itself because keystone crashes on section directives. Each
piece is assembled on its own at the address the linker chose, with every layout constant and every symbol of the
other pieces prepended as `.equ` lines for GNU as; keystone gets the same names replaced by their values (its symbol resolver
drops addends, and it mis-evaluates expressions of two `.equ` names).

keystone returns bytes only, so label addresses are recovered by appending `.long label` for every label and reading
those words back off the end. The same trick gives the address of every template line for the debugger's line table
(kgen/build/dwarf.py): `assemble(..., line_table=True)` puts a local label `.Lkgen_line_N:` before each instruction
or data line N (not inside a `.macro` or `.rept` body: a macro invocation line owns its whole expansion), reads those
labels back the same way, and drops the ones that fell into an `.if` branch not taken. A label emits no bytes, so
the bytes are the same as without them (`tests/build/test_asm_vs_gas.py` compares them with GNU as, which never sees the
labels).

keystone 0.9.2 mis-encodes a few instructions silently (see docs/toolchain.md). `keystone_source` rewrites
exactly those into the bytes GNU as produces; `tests/build/test_asm_vs_gas.py` pins every rewrite against binutils.

One template serves both word sizes: the architecture's selectors (`xax`, `xword ptr`, `.xword`: see kgen/arch)
are replaced when a unit is parsed, so both assemblers see plain registers. A unit of a 64-bit kernel may hold
32-bit code after a `.code32` line (the Multiboot entry runs in protected mode before long mode is on); such a piece
runs before paging, at its load address, so it is assembled there: its own labels, and those of other such pieces,
are physical addresses, as the CPU sees them; every other name is virtual. The linker moves the labels back up to
the virtual addresses the symbol table shows.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from keystone import KS_ARCH_X86, KS_MODE_32, KS_MODE_64, Ks, KsError

from kgen import protocol
from kgen.arch import I386, Arch
from kgen.errors import AssemblyError

SECTIONS = (".multiboot", ".text", ".rodata", ".data", ".bss")
PRELUDE = "macros.inc"

_LABEL_RE = re.compile(r"^\s*([A-Za-z_][\w]*|\.L\w+)\s*:")
_SECTION_RE = re.compile(r"^\s*\.section\s+(\S+)\s*$")
_BALIGN_RE = re.compile(r"^\s*\.balign\s+(0x[0-9a-fA-F]+|\d+)")
_CODE_RE = re.compile(r"^\s*\.code(32|64)\s*$")
# The local label put before template line N to learn its address; no template label starts with it.
LINE_MARK = ".Lkgen_line_"
# Directives that emit bytes: their lines get an address in the line table, like instructions and macro invocations.
_DATA_DIRECTIVES = frozenset((".byte", ".word", ".short", ".long", ".int", ".quad", ".ascii", ".asciz", ".string",
                              ".skip", ".space", ".fill", ".zero", ".incbin"))
_BODY_OPEN, _BODY_CLOSE = frozenset((".macro", ".rept", ".irp", ".irpc")), frozenset((".endm", ".endr"))


def strip_comment(line: str) -> str:
    """Drop a `#` comment, leaving `#` inside string literals alone.

    Both assemblers then see the same text: keystone treats `;` as a statement separator and some `#` comments as
    errors, so comments never reach it.
    """
    quoted = False
    for i, ch in enumerate(line):
        if ch == '"' and (i == 0 or line[i - 1] != "\\"):
            quoted = not quoted
        elif ch == "#" and not quoted:
            return line[:i].rstrip()
    return line.rstrip()


@dataclass(frozen=True)
class Piece:
    """The part of one unit that goes into one section."""
    unit: str
    section: str
    lines: tuple[tuple[int, str], ...]    # (line number in the template, text without comment)
    labels: tuple[str, ...]               # labels defined here, in order (local `.L` ones included)
    align: int                            # the largest `.balign` inside, so the linker can honour it
    bits: int = 32                        # the mode it is assembled in
    before_paging: bool = False           # 32-bit code of a 64-bit kernel: assembled at its physical address
    prelude: tuple[str, ...] = ()         # the shared macros (templates/macros.inc), assembled before the lines
    source: str = ""                      # absolute path of the template file ("" for generated pieces)

    @property
    def name(self) -> str:
        return f"{self.unit}{self.section}" + (".code32" if self.before_paging else "")

    @property
    def global_labels(self) -> tuple[str, ...]:
        return tuple(label for label in self.labels if not label.startswith(".L"))

    def body(self) -> str:
        return "\n".join(self.prelude + tuple(text for _, text in self.lines))


def parse_unit(unit: str, text: str, arch: Arch = I386, prelude: tuple[str, ...] = (),
               source: str = "") -> list[Piece]:
    """Split a template into one piece per section (and per `.code32`/`.code64` stretch); a section named twice
    continues where it left off. Word-size selectors become the architecture's registers here."""
    bodies: dict[tuple[str, int], list[tuple[int, str]]] = {}
    section = None
    bits = arch.keystone_mode
    for number, raw in enumerate(text.splitlines(), start=1):
        line = strip_comment(raw)
        if not line.strip():
            continue
        if not line.isascii():
            raise AssemblyError(f"templates/{unit}.s:{number}: non-ASCII text outside a comment")
        m = _SECTION_RE.match(line)
        if m:
            section = m.group(1)
            if section not in SECTIONS:
                raise AssemblyError(f"templates/{unit}.s:{number}: unknown section {section}; "
                                    f"use one of {', '.join(SECTIONS)}")
            bits = arch.keystone_mode
            bodies.setdefault((section, bits), [])
            continue
        m = _CODE_RE.match(line)
        if m:
            bits = int(m.group(1))
            if bits > arch.keystone_mode:
                raise AssemblyError(f"templates/{unit}.s:{number}: .code{bits} in a {arch.name} kernel")
            if section is not None:
                bodies.setdefault((section, bits), [])
            continue
        if section is None:
            raise AssemblyError(f"templates/{unit}.s:{number}: code before the first `.section` line")
        bodies[section, bits].append((number, arch.apply_selectors(line)))
    pieces = []
    for (section, bits), lines in bodies.items():
        if not lines and bits != arch.keystone_mode:
            continue
        labels = tuple(m.group(1) for _, t in lines if (m := _LABEL_RE.match(t)))
        aligns = [int(m.group(1), 0) for _, t in lines if (m := _BALIGN_RE.match(t))]
        pieces.append(Piece(unit, section, tuple(lines), labels, max(aligns, default=4), bits,
                            before_paging=bits < arch.keystone_mode, prelude=prelude, source=source))
    return pieces


def load_prelude(templates: Path, arch: Arch = I386) -> tuple[str, ...]:
    """The macros every piece may use: templates/macros.inc (macros only, no code or data of its own), then one per
    text of the kernel<->host contract (`BOOT_OK_TEXT`..., kgen/protocol.py), which emits it where a template
    writes its name: the way a string reaches the templates, as `.equ` lines bring the numbers."""
    path = templates / PRELUDE
    text = path.read_text(encoding="ascii") if path.exists() else ""
    lines = [arch.apply_selectors(line) for raw in text.splitlines() if (line := strip_comment(raw)).strip()]
    return tuple(lines) + protocol.asm_string_macros()


def load_unit(templates: Path, unit: str, arch: Arch = I386) -> list[Piece]:
    """`unit` is a path below templates/ without `.s`: "serial" (shared) or "x86_64/boot" (one architecture's)."""
    path = templates / f"{unit}.s"
    try:
        return parse_unit(unit, path.read_text(encoding="ascii", errors="strict"), arch,
                          load_prelude(templates, arch), source=os.path.abspath(path))
    except UnicodeDecodeError as err:
        raise AssemblyError(f"{path}: non-ASCII byte at offset {err.start}") from None
    except FileNotFoundError:
        raise AssemblyError(f"{path}: template not found") from None


def equ_lines(symbols: dict[str, int]) -> list[str]:
    return [f".equ {name}, {value:#x}" for name, value in symbols.items()]


# ---- keystone work-arounds: the only place that knows keystone 0.9.2's 32-bit encoding bugs ----------------------
_SEGMENT_PUSH_POP = {
    ("push", "es"): "0x06", ("pop", "es"): "0x07", ("push", "ss"): "0x16", ("pop", "ss"): "0x17",
    ("push", "ds"): "0x1e", ("pop", "ds"): "0x1f", ("push", "fs"): "0x0f, 0xa0", ("pop", "fs"): "0x0f, 0xa1",
    ("push", "gs"): "0x0f, 0xa8", ("pop", "gs"): "0x0f, 0xa9",
}
_DESCRIPTOR_TABLE_MODRM = {"lgdt": "0x15", "lidt": "0x1d"}   # 0F 01 /2 and /3 with a disp32 operand


_REG64 = {name: number for number, name in enumerate(
    ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15"))}
_NUMBER = r"(?:0x[0-9a-fA-F]+|\d+)"


def _load_absolute64(register: str, operand: str) -> str:
    """`mov r64, [address]`: keystone 64-bit encodes the address as a RIP-relative displacement taken literally.
    Emit GNU as's SIB form (no base, no index, disp32 sign-extended), which needs the address in the top or
    bottom 2 GiB."""
    address = eval_number(operand)
    if not -(1 << 31) <= (address if address < 1 << 63 else address - (1 << 64)) < 1 << 31:
        raise AssemblyError(f"`mov {register}, [{operand}]`: {address:#x} is not a sign-extended 32-bit address; "
                            f"load it into a register first")
    number = _REG64[register]
    rex = 0x48 | (0x04 if number >= 8 else 0)
    modrm = 0x04 | (number & 7) << 3
    return f".byte {rex:#x}, 0x8b, {modrm:#x}, 0x25\n.long {address & 0xFFFFFFFF:#x}"


def eval_number(expression: str) -> int:
    """A constant expression of numbers (names already replaced), as both assemblers compute it, modulo 2**64."""
    if not re.fullmatch(r"[\s0-9a-fA-FxX+\-*/()<>|&~=!]+", expression):
        raise AssemblyError(f"`{expression}` is not a constant expression")
    try:
        value = eval(expression.replace("/", "//"), {"__builtins__": {}})   # noqa: S307 - digits and operators
    except (SyntaxError, ZeroDivisionError, TypeError) as err:
        raise AssemblyError(f"`{expression}` is not a constant expression: {err}") from None
    return int(value) & ((1 << 64) - 1)


def keystone_line(line: str, bits: int = 32) -> str:
    """Rewrite one GNU-as Intel line into what keystone encodes the same way."""
    stripped = line.strip()
    if bits == 64:
        m = re.fullmatch(r"mov\s+(r\w+)\s*,\s*(?:qword\s+ptr\s+)?\[([^\]]+)\]", stripped)
        if m and m.group(1) in _REG64 and m.group(1) != "rax" and re.fullmatch(
                r"[\s0-9a-fA-FxX+\-*()<>|&~]+", m.group(2)):
            return _load_absolute64(m.group(1), m.group(2))
    # `offset X` is GNU as's immediate address; keystone has no `offset` and treats a bare label as immediate.
    m = re.fullmatch(r"push\s+offset\s+(.+)", stripped)
    if m:   # keystone refuses `push label` outright; in 64-bit mode the 32-bit immediate is sign-extended
        return f".byte 0x68\n.long ({m.group(1)}) & 0xffffffff"
    line = re.sub(r"\boffset\s+", "", line)
    stripped = line.strip()
    # lgdt/lidt get a 0x66 prefix (24-bit base) from keystone.
    m = re.fullmatch(r"(lgdt|lidt)\s+(?:fword\s+ptr\s+)?\[([^\]]+)\]", stripped)
    if m and bits == 32:
        if re.search(r"\b(e?[abcd]x|e?[sd]i|e?[sb]p)\b", m.group(2)):
            raise AssemblyError(f"`{stripped}`: only an absolute operand is supported for {m.group(1)}")
        return f".byte 0x0f, 0x01, {_DESCRIPTOR_TABLE_MODRM[m.group(1)]}\n.long {m.group(2)}"
    # `iret` comes out as the 16-bit `66 cf`. In 64-bit code GNU as takes it as the 32-bit iretd (with a warning),
    # which is never what a 64-bit frame needs: ask for the explicit form there.
    if stripped == "iret":
        if bits == 64:
            raise AssemblyError("`iret` in 64-bit code is ambiguous (GNU as assembles the 32-bit iretd): "
                                "write iretq")
        return "iretd"
    # Segment-register push/pop get a 0x66 prefix (a 2-byte push that breaks frames). In 64-bit code only fs/gs
    # exist, and keystone encodes those right; the others are refused there, as GNU as refuses them.
    m = re.fullmatch(r"(push|pop)\s+([defgs]s|es|ss)", stripped)
    if m and bits == 32 and (m.group(1), m.group(2)) in _SEGMENT_PUSH_POP:
        return f".byte {_SEGMENT_PUSH_POP[(m.group(1), m.group(2))]}"
    # Far jumps: keystone emits a 16-bit form or no bytes at all. 64-bit mode has no direct far jump (0xEA is #UD
    # there) and GNU as refuses one: so is it left to keystone, which refuses it too.
    m = re.fullmatch(r"ljmp\s+([^,]+),\s*(.+)", stripped)
    if m and bits == 32:
        return f".byte 0xea\n.long {m.group(2)}\n.word {m.group(1)}"
    return line


def keystone_source(body: str, symbols: dict[str, int] | None = None, bits: int = 32) -> str:
    """The piece as keystone must see it: outside names replaced by their values, then workarounds applied.

    keystone evaluates an expression of two `.equ` names wrongly (`[boot_magic - KERNEL_VIRTUAL_BASE]` came out
    as `[0xc0000000]`), so names it does not define itself reach it as numbers.
    """
    lines = body.splitlines()
    if symbols:
        names, value = _name_pattern(symbols)
        lines = [line if line.startswith(LINE_MARK)     # a line label (assemble): nothing to replace
                 else _outside_strings(line, lambda text: names.sub(value, text))
                 for line in lines]
    return "\n".join(line if line.startswith(LINE_MARK) else keystone_line(line, bits)
                     for line in _resolve_conditionals(lines))


# A name as the templates write one: a whole run of word characters (or `$`), maybe after one leading dot (`.Lx`),
# not glued to a `.`, `$` or `\` before it.
_NAME_RE = re.compile(r"(?<![\w.$\\])([A-Za-z_.$][\w$]*)(?![\w$])")


def _name_pattern(symbols: dict[str, int]):
    """(pattern, replacement) turning each name of `symbols` into its value and leaving every other word alone.

    Every name a build passes is one run of word characters, so any word of the text is a name or not by one dict
    lookup; an alternation of all names (hundreds per piece, rebuilt for each of ~200 pieces) cost most of a link.
    A name of another shape falls back to that alternation, longest first."""
    if all(_NAME_RE.fullmatch(name) for name in symbols):
        def value(m: re.Match) -> str:
            found = symbols.get(m.group(1))
            return m.group(0) if found is None else f"{found:#x}"
        return _NAME_RE, value
    names = re.compile(r"(?<![\w.$\\])(" + "|".join(sorted(map(re.escape, symbols), key=len, reverse=True))
                       + r")(?![\w$])")
    return names, lambda m: f"{symbols[m.group(1)]:#x}"


def _resolve_conditionals(lines: list[str]) -> list[str]:
    """Decide `.if` blocks whose condition is a number once names are replaced, and drop the false branch.

    keystone resolves every symbol even inside a false `.if` (`call pmm_init` in a kernel without the PMM is an
    error), so keystone never sees a branch that is not taken. Conditions it alone can decide (a macro's
    parameters) are left to it."""
    out: list[str] = []
    stack: list[list] = []          # ["kgen", taken, in_else] for decided blocks, ["keystone"] for the others

    def active() -> bool:
        return all(frame[0] == "keystone" or frame[1] != frame[2] for frame in stack)

    for line in lines:
        stripped = line.strip()
        m = re.fullmatch(r"\.if\s+(.+)", stripped)
        if m:
            try:
                taken = eval_number(m.group(1)) != 0
            except AssemblyError:
                stack.append(["keystone"])
                if active():
                    out.append(line)
                continue
            stack.append(["kgen", taken, False])
            continue
        if stripped in (".else", ".endif") and stack:
            frame = stack[-1]
            if frame[0] == "kgen":
                if stripped == ".else":
                    frame[2] = True
                else:
                    stack.pop()
                continue
            if stripped == ".endif":
                stack.pop()
                if active():
                    out.append(line)
                continue
        if active():
            out.append(line)
    return out


def _outside_strings(line: str, change) -> str:
    """Apply `change` to the parts of `line` that are not inside a string literal."""
    parts = re.split(r'("(?:[^"\\]|\\.)*")', line)
    return "".join(part if i % 2 else change(part) for i, part in enumerate(parts))


# ---- assembling ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Assembled:
    piece: Piece
    address: int
    data: bytes
    labels: dict[str, int]
    lines: tuple[tuple[int, int], ...] = ()   # (template line, address) of each line that emits code or data


def _first_word(text: str) -> str:
    label = _LABEL_RE.match(text)
    statement = (text[label.end():] if label else text).split(None, 1)
    return statement[0].lower() if statement else ""


def _marked_body(piece: Piece) -> str:
    """The piece's body with `LINE_MARK<N>:` before each line N that emits code or data, outside macro and
    repeat bodies (a label there would be defined once per expansion)."""
    out = list(piece.prelude)
    depth = 0
    for number, text in piece.lines:
        word = _first_word(text)
        if word in _BODY_OPEN:
            depth += 1
        elif word in _BODY_CLOSE:
            depth -= 1
        elif depth == 0 and word and (not word.startswith(".") or word in _DATA_DIRECTIVES):
            out.append(f"{LINE_MARK}{number}:")
        out.append(text)
    return "\n".join(out)


def _defined_labels(source: str) -> tuple[set[str], list[tuple[int, str]]]:
    """The labels keystone will see defined (those of an `.if` branch not taken are gone), and the line labels
    among them that are sure to be defined once: not inside a block keystone decides itself (an `.if` kgen could
    not evaluate) or a macro body. One pass over the source: a regular expression per label costs more than the
    assembly."""
    labels: set[str] = set()
    marks, depth = [], 0
    for line in source.splitlines():
        stripped = line.strip()
        if stripped.startswith(LINE_MARK):
            if depth == 0:
                marks.append((int(stripped[len(LINE_MARK):-1]), stripped[:-1]))
            continue
        label = _LABEL_RE.match(line)
        if label:
            labels.add(label.group(1))
        word = _first_word(stripped)
        if word.startswith(".if") or word in _BODY_OPEN:
            depth += 1
        elif word == ".endif" or word in _BODY_CLOSE:
            depth -= 1
    return labels, marks


_KS: dict[int, object] = {}


def _keystone(bits: int):
    # Options are never set: setting any of them switches keystone's default number base to 16.
    if bits not in _KS:
        _KS[bits] = Ks(KS_ARCH_X86, KS_MODE_32 if bits == 32 else KS_MODE_64)
    return _KS[bits]


def _ks_asm(source: str, address: int, bits: int = 32) -> bytes | None:
    try:
        encoding, _count = _keystone(bits).asm(source, address)
    except KsError:
        return None
    return None if encoding is None else bytes(encoding)


def render(piece: Piece, symbols: dict[str, int]) -> str:
    """The source both assemblers see: `.equ` for every outside name, then the piece."""
    return "\n".join(equ_lines(outside_symbols(piece, symbols)) + [piece.body()])


def outside_symbols(piece: Piece, symbols: dict[str, int]) -> dict[str, int]:
    return {name: value for name, value in symbols.items() if name not in piece.labels}


def assemble(piece: Piece, address: int, symbols: dict[str, int], *, line_table: bool = False) -> Assembled:
    """Assemble a piece at `address` (where the CPU runs it), with `symbols` (constants and other pieces' labels)
    visible. Label addresses come back as keystone computed them, at `address`; with `line_table`, the address
    of each template line that emits code or data too."""
    marked = line_table and bool(piece.source)
    source = keystone_source(_marked_body(piece) if marked else piece.body(), outside_symbols(piece, symbols),
                             piece.bits)
    # A label inside an `.if` branch not taken does not exist in this kernel.
    present, marks = _defined_labels(source)
    defined = [label for label in piece.labels if label in present]
    tail = "\n".join(f".quad {label}" for label in defined + [mark for _, mark in marks])
    data = _ks_asm(source + "\n" + tail, address, piece.bits)
    expected_tail = 8 * (len(defined) + len(marks))
    if data is None or len(data) < expected_tail:
        raise _diagnose(piece, address, symbols)
    body = data[:len(data) - expected_tail]
    words = data[len(body):]
    values = [int.from_bytes(words[i:i + 8], "little") for i in range(0, len(words), 8)]
    labels = dict(zip(defined, values))
    marked_lines = list(zip((number for number, _ in marks), values[len(defined):]))
    # A line at the same address as the next one emitted nothing (a macro that only counts, such as FRAME in
    # templates/macros.inc): the address belongs to the line that follows.
    lines = tuple(row for row, after in zip(marked_lines, marked_lines[1:] + [(None, None)]) if row[1] != after[1])
    return Assembled(piece, address, body, labels, lines)


def _diagnose(piece: Piece, address: int, symbols: dict[str, int]) -> AssemblyError:
    """Find the first line keystone rejects on its own (with every label defined) and show it in context."""
    outside = outside_symbols(piece, symbols)
    failing = None
    for number, text in piece.lines:
        m = _LABEL_RE.match(text)
        statement = text[m.end():] if m else text
        if not statement.strip() or statement.strip().startswith(".") and not statement.strip().startswith(
                (".byte", ".word", ".long", ".quad", ".ascii", ".asciz", ".skip", ".fill", ".balign")):
            continue
        local = "\n".join(f".equ {lab}, {address:#x}" for lab in piece.labels)
        try:
            source = "\n".join(piece.prelude + (statement,))
            rejected = _ks_asm(local + "\n" + keystone_source(source, outside, piece.bits), address,
                               piece.bits) is None
        except AssemblyError:
            rejected = True
        if rejected:
            failing = number
            break
    listing = "\n".join(f"{'>>' if n == failing else '  '} {n:4d}  {t}" for n, t in piece.lines)
    where = f"templates/{piece.unit}.s:{failing}" if failing else f"templates/{piece.unit}.s"
    what = (f"keystone rejects `{dict(piece.lines)[failing].strip()}`" if failing
            else "keystone rejects the piece (the failing line could not be isolated)")
    return AssemblyError(f"{where}: {what} (section {piece.section})\n{listing}")
