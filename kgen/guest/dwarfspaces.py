"""A kernel's address spaces found in its own data, through the types its ELF's DWARF describes.

A kernel with processes keeps each process's top-level table somewhere of its own: a virtual pointer in an array of
`struct proc` (xv6's `ptable.proc[i].pgdir`), a physical address in a linked list of tasks, a pointer to an `mm`
that holds it. `--address-spaces EXPR` names that place with an expression over the kernel's globals, evaluated here
with the DWARF of the ELF (pyelftools) against the stopped machine; `candidates` proposes such expressions when none
is given.

The expression (one step after another, from a global variable):

    ptable.proc[].pgdir                 every element of the array ptable.proc, its member pgdir
    ptable.proc[state != 0].pgdir       ... only the elements whose `state` is not 0 (an enumerator name works too:
                                        `state != UNUSED`; `&&` joins conditions; ==, !=, <, <=, >, >=; a bare member
                                        means "is not 0")
    ptable.proc[3].pgdir                element 3 only
    task_list[->next].cr3               the linked list that starts at `task_list` (a struct, or a pointer to one),
                                        node after node through the member `next`, until a null pointer or back at a
                                        node already seen; `[->next, state != 0]` with a condition, `[->next:2]` node 2
    current->mm->pgd                    `->` follows a pointer to a struct, `.` takes a member of a struct

A null pointer on the way, or a value of 0 at the end, skips that element: no space there. The value at the end is
a pointer or an integer of at least 4 bytes. The rule for what it holds: a value at or above the kernel base (the
lowest virtual address of the ELF's higher-half segments, `GuestView.kernel_base`), or too large for a physical
address (2**52 and up: x86-64's upper half, where a direct map of RAM lies too), is a kernel virtual address,
translated through the kernel's own tables (the space in CR3, whose kernel half every process shares); any other
value is the physical address of the top-level table (a kernel that is not higher-half keeps its memory where it
lies, so the two agree). Every global, pointer and member on the way is read the same way: kernel virtual memory
through CR3's tables.

Each space is named by the expression with each `[]`, condition or list replaced by the element it is, and, when
the element (the last array element or list node on the way) has a char-array member called like a name (`name`,
`comm`, `*name`), by that too: `ptable.proc[1].pgdir "sh"`.

What the rest of kgen calls: `plan(types, text)` checks an expression before anything boots; `spaces(types,
expression, memory)` evaluates it over any `KernelMemory` (`spaces_in_view(view, expression)` on a stopped machine),
each `Space` with its `name` and `top`; `ExpressionSource` asks again at every moment; `candidates(elf)` and
`propose(view)` find expressions without being asked; `implausible(view, top)` says why a table is none of the
kernel's spaces.

Not handled: lists threaded through an embedded `struct list_head` (Linux's), bit-fields, unions chosen by a tag,
per-CPU variables, an ELF relocated by --symbols ELF@OFFSET.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator, Sequence

from kgen.errors import KgenError
from kgen.guest.elfinfo import ElfInfo
from kgen.guest.invariants import PHYS_LIMIT

# Lists longer than this are taken as corrupt (a cycle the walk could not see, a pointer into garbage).
MAX_LIST_NODES = 4096
# Member names that say "the top-level page table" (candidates): whole names, or these words inside a name.
PAGE_TABLE_NAMES = re.compile(r"^(pgdir|pgd|pml4|pml4t|cr3|page_?dir(ectory)?|page_?map|page_?table|pagetable|"
                              r"top_?table|vm_?root|ptbr|pt_?root|root_?table)$|pgdir|pml4|page_?directory|pagemap",
                              re.IGNORECASE)
# Member names a process's name is kept under (a char array).
NAME_MEMBERS = re.compile(r"^(name|comm|cmd|procname|pname)$|name$", re.IGNORECASE)
# Members that link a list of processes (a pointer to the same struct): `parent` points at the same struct too,
# but follows a chain of ancestors, not the processes.
LIST_LINKS = re.compile(r"next|link|sibling", re.IGNORECASE)
STATE_MEMBER = "state"
UNUSED_ENUMERATORS = re.compile(r"UNUSED|FREE", re.IGNORECASE)


class NoDwarf(KgenError):
    """The ELF carries no DWARF: there are no types to evaluate an expression with."""


# ---- the types ----------------------------------------------------------------------------------------------------

@dataclass(eq=False)
class CType:
    """One C type as DWARF describes it, typedefs and qualifiers stripped (`name` keeps what the source called it).
    kind: base, enum, pointer, struct, union, array, void, other."""
    kind: str
    name: str
    size: int = 0
    target: CType | None = None                   # pointer: what it points at; array: its element
    count: int | None = None                      # array: the number of elements (None: not given)
    members: dict[str, Member] = field(default_factory=dict)
    enumerators: dict[str, int] = field(default_factory=dict)
    signed: bool = False
    char: bool = False                            # a 1-byte character type

    def __str__(self) -> str:
        if self.kind == "pointer":
            return f"{self.target} *" if self.target is not None else "void *"
        if self.kind == "array":
            return f"{self.target}[{'' if self.count is None else self.count}]"
        if self.kind in ("struct", "union", "enum"):
            return f"{self.kind} {self.name}" if self.name else f"anonymous {self.kind}"
        return self.name or self.kind

    @property
    def is_word(self) -> bool:
        """A value that may hold a table's address: a pointer or an integer (enums aside) of 4 bytes or more."""
        return self.kind == "pointer" or (self.kind == "base" and not self.char and self.size >= 4)

    @property
    def is_integer(self) -> bool:
        return self.kind in ("base", "enum", "pointer")

    @property
    def is_record(self) -> bool:
        return self.kind in ("struct", "union")

    @property
    def points_at_record(self) -> bool:
        return self.kind == "pointer" and self.target is not None and self.target.is_record


@dataclass(frozen=True)
class Member:
    name: str
    offset: int
    type: CType


@dataclass(frozen=True)
class Global:
    """A global variable: its link-time virtual address and type."""
    name: str
    address: int
    type: CType


@dataclass(frozen=True)
class KernelTypes:
    """The kernel's global variables with their types, read from the DWARF of one ELF."""
    path: Path
    word_size: int
    globals: dict[str, Global]

    @classmethod
    def load(cls, elf: ElfInfo) -> KernelTypes:
        """Read once per file (and modification); NoDwarf if it has none, KgenError if it cannot be read."""
        path = Path(elf.path)
        key = (path.resolve(), path.stat().st_mtime_ns)
        if key not in _LOADED:
            _LOADED[key] = _read_types(path, elf)
        return _LOADED[key]


_LOADED: dict[tuple, KernelTypes] = {}


def _read_types(path: Path, elf: ElfInfo) -> KernelTypes:
    from elftools.elf.elffile import ELFFile
    try:
        with path.open("rb") as stream:
            image = ELFFile(stream)
            if not image.has_dwarf_info() or image.get_section_by_name(".debug_info") is None:
                raise NoDwarf(f"{path.name} has no DWARF (.debug_info): build it with -g to name its spaces by "
                              f"expression, or give SYMBOL[,COUNT] of an array of physical addresses")
            word = image.elfclass // 8
            reader = _TypeReader()
            found: dict[str, Global] = {}
            for cu in image.get_dwarf_info().iter_CUs():
                top = cu.get_top_DIE()
                for die in top.iter_children():
                    if die.tag != "DW_TAG_variable":
                        continue
                    spec = die
                    if "DW_AT_specification" in die.attributes:
                        spec = die.get_DIE_from_attribute("DW_AT_specification")
                    name = _name(spec)
                    if not name or "DW_AT_type" not in spec.attributes:
                        continue
                    address = _address(die, cu.header["address_size"])
                    if address is None:
                        sym = elf.symbols.get(name)
                        if sym is None or "DW_AT_declaration" in die.attributes and name in found:
                            continue
                        address = sym.value
                    if name in found and not die.attributes.get("DW_AT_external"):
                        continue        # a static of another file with a global's name: the global wins
                    found[name] = Global(name, address, reader.type_of(spec))
    except KgenError:
        raise
    except Exception as err:  # noqa: BLE001 - pyelftools on DWARF it does not know raises many kinds (ELFError,
        # DWARFError, KeyError, struct.error, NotImplementedError...): each is "cannot be read", in one line
        raise KgenError(f"{path.name}: its DWARF cannot be read ({' '.join(str(err).split())})") from None
    return KernelTypes(path, word, found)


def _name(die) -> str:
    value = die.attributes.get("DW_AT_name")
    return value.value.decode(errors="replace") if value is not None else ""


def _address(die, address_size: int) -> int | None:
    """A DW_OP_addr location (the one form a global at a fixed address has), else None."""
    loc = die.attributes.get("DW_AT_location")
    if loc is None or not isinstance(loc.value, list) or len(loc.value) != 1 + address_size or loc.value[0] != 0x03:
        return None
    return int.from_bytes(bytes(loc.value[1:]), "little")


class _TypeReader:
    """DIEs to CTypes, each DIE once (a struct that points at itself is built once and referred to)."""

    def __init__(self):
        self.memo: dict[int, CType] = {}

    def type_of(self, die) -> CType:
        if "DW_AT_type" not in die.attributes:
            return CType("void", "void")
        return self.convert(die.get_DIE_from_attribute("DW_AT_type"))

    def convert(self, die) -> CType:
        if die.offset in self.memo:
            return self.memo[die.offset]
        tag = die.tag
        if tag in ("DW_TAG_typedef", "DW_TAG_const_type", "DW_TAG_volatile_type", "DW_TAG_restrict_type",
                   "DW_TAG_atomic_type"):
            inner = self.type_of(die)
            self.memo[die.offset] = inner
            return inner
        size = die.attributes["DW_AT_byte_size"].value if "DW_AT_byte_size" in die.attributes else 0
        name = _name(die)
        if tag == "DW_TAG_base_type":
            encoding = die.attributes["DW_AT_encoding"].value if "DW_AT_encoding" in die.attributes else 0
            ctype = CType("base", name, size, signed=encoding in (5, 6, 0xd),
                          char=size == 1 and encoding in (6, 8, 0x10))
        elif tag == "DW_TAG_pointer_type":
            ctype = CType("pointer", "", size or 0)
            self.memo[die.offset] = ctype
            target = self.type_of(die)
            ctype.target = None if target.kind == "void" else target
            return ctype
        elif tag in ("DW_TAG_structure_type", "DW_TAG_union_type", "DW_TAG_class_type"):
            ctype = CType("union" if tag == "DW_TAG_union_type" else "struct", name, size)
            self.memo[die.offset] = ctype
            for child in die.iter_children():
                if child.tag != "DW_TAG_member" or "DW_AT_bit_size" in child.attributes:
                    continue
                where = child.attributes.get("DW_AT_data_member_location")
                offset = where.value if where is not None and isinstance(where.value, int) else 0
                member_type = self.type_of(child)
                member_name = _name(child)
                if member_name:
                    ctype.members[member_name] = Member(member_name, offset, member_type)
                elif member_type.is_record:      # an anonymous struct or union: its members are the parent's
                    for inner in member_type.members.values():
                        ctype.members.setdefault(inner.name, Member(inner.name, offset + inner.offset, inner.type))
            return ctype
        elif tag == "DW_TAG_enumeration_type":
            ctype = CType("enum", name, size, enumerators={
                _name(e): e.attributes["DW_AT_const_value"].value for e in die.iter_children()
                if e.tag == "DW_TAG_enumerator" and "DW_AT_const_value" in e.attributes})
        elif tag == "DW_TAG_array_type":
            element = self.type_of(die)
            counts = []
            for sub in die.iter_children():
                if sub.tag != "DW_TAG_subrange_type":
                    continue
                if "DW_AT_count" in sub.attributes and isinstance(sub.attributes["DW_AT_count"].value, int):
                    counts.append(sub.attributes["DW_AT_count"].value)
                elif "DW_AT_upper_bound" in sub.attributes and isinstance(sub.attributes["DW_AT_upper_bound"].value,
                                                                           int):
                    lower = sub.attributes["DW_AT_lower_bound"].value if "DW_AT_lower_bound" in sub.attributes else 0
                    counts.append(sub.attributes["DW_AT_upper_bound"].value - lower + 1)
                else:
                    counts.append(None)
            ctype = element
            for count in reversed(counts or [None]):     # int a[2][3]: an array of 2 arrays of 3
                ctype = CType("array", "", (ctype.size * count) if count is not None else 0, target=ctype,
                              count=count)
        else:
            ctype = CType("other", name or tag.removeprefix("DW_TAG_"), size)
        self.memo[die.offset] = ctype
        return ctype


# ---- the expression -----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Condition:
    """`path OP number` on an element: path is member names (each `.` or `->`), value a number or enumerator."""
    path: tuple[tuple[str, str], ...]       # (".", name) or ("->", name)
    op: str
    value: int | str
    bare: bool = False                      # written as the member alone: "is not 0"

    def __str__(self) -> str:
        path = "".join(f"{sep}{name}" for sep, name in self.path).removeprefix(".")
        return path if self.bare else f"{path} {self.op} {self.value}"


@dataclass(frozen=True)
class Step:
    """One step: member (`.` / `->`), elements (`[]`, `[N]`, `[cond]`) or a list (`[->next]`)."""
    kind: str                       # "member", "deref", "elements", "list"
    name: str = ""                  # the member (member, deref, list)
    index: int | None = None        # one element or list node only
    conditions: tuple[Condition, ...] = ()


_TOKEN = re.compile(r"\s*(?:(->)|(&&)|(==|!=|<=|>=|<|>)|([A-Za-z_$][\w$]*)|(-?(?:0[xX][0-9a-fA-F]+|\d+))|(\S))")


@dataclass(frozen=True)
class Expression:
    """A parsed --address-spaces expression: the global it starts at and its steps."""
    text: str
    root: str
    steps: tuple[Step, ...]

    @classmethod
    def parse(cls, text: str) -> Expression:
        """The expression's syntax (module docstring); KgenError naming what is wrong where."""
        tokens = _tokens(text)
        pos = 0

        def fail(why: str) -> KgenError:
            at = tokens[pos][1] if pos < len(tokens) else len(text)
            return KgenError(f"--address-spaces {text}: {why} at column {at + 1}")

        def take(kind: str | None = None, value: str | None = None):
            nonlocal pos
            if pos >= len(tokens):
                return None
            token = tokens[pos]
            if (kind is None or token[0] == kind) and (value is None or token[2] == value):
                pos += 1
                return token
            return None

        def member_path() -> tuple[tuple[str, str], ...]:
            path = []
            first = take("name")
            if first is None:
                raise fail("expected a member name")
            path.append((".", first[2]))
            while True:
                sep = take("punct", ".") or take("arrow")
                if sep is None:
                    return tuple(path)
                name = take("name")
                if name is None:
                    raise fail(f"expected a member name after {sep[2]!r}")
                path.append((sep[2], name[2]))

        def conditions() -> tuple[Condition, ...]:
            found = []
            while True:
                path = member_path()
                op = take("op")
                if op is None:
                    found.append(Condition(path, "!=", 0, bare=True))
                else:
                    value = take("number") or take("name")
                    if value is None:
                        raise fail(f"expected a number or an enumerator after {op[2]!r}")
                    found.append(Condition(path, op[2], int(value[2], 0) if value[0] == "number" else value[2]))
                if take("and") is None:
                    return tuple(found)

        root = take("name")
        if root is None:
            raise fail("expected the name of a global variable")
        steps: list[Step] = []
        while pos < len(tokens):
            if take("punct", "."):
                name = take("name")
                if name is None:
                    raise fail("expected a member name after '.'")
                steps.append(Step("member", name[2]))
            elif take("arrow"):
                name = take("name")
                if name is None:
                    raise fail("expected a member name after '->'")
                steps.append(Step("deref", name[2]))
            elif take("punct", "["):
                if take("punct", "]"):
                    steps.append(Step("elements"))
                    continue
                if take("arrow"):
                    link = take("name")
                    if link is None:
                        raise fail("expected the member that links the list, [->next]")
                    index, conds = None, ()
                    if take("punct", ":"):
                        number = take("number")
                        if number is None:
                            raise fail("expected a node number after ':'")
                        index = int(number[2], 0)
                    elif take("punct", ","):
                        conds = conditions()
                    steps.append(Step("list", link[2], index, conds))
                else:
                    number = take("number")
                    if number is not None:
                        steps.append(Step("elements", index=int(number[2], 0)))
                    else:
                        steps.append(Step("elements", conditions=conditions()))
                if take("punct", "]") is None:
                    raise fail("expected ']'")
            else:
                raise fail(f"unexpected {tokens[pos][2]!r}")
        return cls(text, root[2], tuple(steps))


def _tokens(text: str) -> list[tuple[str, int, str]]:
    """(kind, column, text) of each token: arrow, and, op, name, number, punct."""
    found, pos = [], 0
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if match is None or not match.group(0).strip():
            break
        kind = ("arrow", "and", "op", "name", "number", "punct")[match.lastindex - 1]
        found.append((kind, match.start(match.lastindex), match.group(match.lastindex)))
        pos = match.end()
    return found


# ---- what the expression means for these types ----------------------------------------------------------------------

@dataclass(frozen=True)
class Plan:
    """An expression checked against the kernel's types: the global, the type after each step, the leaf's type."""
    expression: Expression
    root: Global
    types: tuple[CType, ...]         # the type before each step, then the leaf's


def plan(types: KernelTypes, text: str) -> Plan:
    """Parse `text` and check every step against the DWARF types; KgenError (one line) on the first that does not
    fit: which step, the type it met, what it expected. Kept per types and text: `--check-at` asks at every hit."""
    key = (id(types), text)
    if key not in _PLANS:
        _PLANS[key] = (types, _plan(types, text))       # the types kept alive: their id stays theirs
    return _PLANS[key][1]


_PLANS: dict[tuple[int, str], tuple[KernelTypes, Plan]] = {}


def _plan(types: KernelTypes, text: str) -> Plan:
    expr = Expression.parse(text)
    where = f"--address-spaces {text}"
    root = types.globals.get(expr.root)
    if root is None:
        raise KgenError(f"{where}: {types.path.name}'s DWARF has no global variable {expr.root!r}")
    ctype = root.type
    seen = [ctype]
    shown = expr.root
    for step in expr.steps:
        if step.kind == "member":
            if ctype.points_at_record:
                raise KgenError(f"{where}: {shown} is a pointer ({ctype}): write {shown}->{step.name}")
            ctype = _member(where, shown, ctype, step.name).type
            shown += f".{step.name}"
        elif step.kind == "deref":
            if not ctype.points_at_record:
                hint = f": write {shown}.{step.name}" if ctype.is_record else ""
                raise KgenError(f"{where}: {shown} is {_a(ctype)}, not a pointer to a struct, so '->' does not "
                                f"apply{hint}")
            ctype = _member(where, shown, ctype.target, step.name).type
            shown += f"->{step.name}"
        elif step.kind == "elements":
            if ctype.kind != "array":
                raise KgenError(f"{where}: {shown} is {_a(ctype)}, not an array, so '[]' does not apply"
                                + (" (a list? [->MEMBER])" if ctype.is_record or ctype.points_at_record else ""))
            if ctype.count is None:
                raise KgenError(f"{where}: {shown} is an array of unknown length ({ctype})")
            if step.index is not None and not 0 <= step.index < ctype.count:
                raise KgenError(f"{where}: {shown} has {ctype.count} elements; {step.index} is not one of them")
            _check_conditions(where, shown + "[]", ctype.target, step.conditions)
            ctype = ctype.target
            shown += "[]"
        else:   # list
            node = ctype.target if ctype.points_at_record else ctype
            if not node.is_record:
                raise KgenError(f"{where}: {shown} is {_a(ctype)}, not a struct or a pointer to one, so a list "
                                f"[->{step.name}] cannot start there")
            link = _member(where, shown, node, step.name)
            if not (link.type.kind == "pointer" and link.type.target is node):
                raise KgenError(f"{where}: {node}'s member {step.name} is {_a(link.type)}, not a pointer to "
                                f"{node}: it does not link a list of them")
            _check_conditions(where, shown + f"[->{step.name}]", node, step.conditions)
            ctype = node
            shown += f"[->{step.name}]"
        seen.append(ctype)
    if not ctype.is_word:
        raise KgenError(f"{where}: {shown} is {_a(ctype)}; the expression must end at a pointer or an integer of "
                        f"at least 4 bytes holding a top-level table's address")
    return Plan(expr, root, tuple(seen))


def _a(ctype: CType) -> str:
    text = str(ctype)
    return f"an {text}" if text[:1] in "aeiou" else f"a {text}"


def _member(where: str, shown: str, ctype: CType, name: str) -> Member:
    if not ctype.is_record:
        raise KgenError(f"{where}: {shown} is {_a(ctype)}, not a struct: it has no member {name!r}")
    member = ctype.members.get(name)
    if member is None:
        names = ", ".join(list(ctype.members)[:12]) or "none"
        raise KgenError(f"{where}: {shown} is {_a(ctype)} with no member {name!r} (its members: {names})")
    return member


def _condition_type(where: str, shown: str, element: CType, cond: Condition) -> CType:
    ctype = element
    for sep, name in cond.path:
        if sep == "->":
            if not ctype.points_at_record:
                raise KgenError(f"{where}: in the condition {cond}, '->{name}' follows {_a(ctype)}")
            ctype = ctype.target
        ctype = _member(where, f"{shown} ({cond})", ctype, name).type
    if not ctype.is_integer:
        raise KgenError(f"{where}: the condition {cond} compares {_a(ctype)}; give an integer, enum or pointer "
                        f"member")
    if isinstance(cond.value, str) and cond.value not in ctype.enumerators:
        known = ", ".join(ctype.enumerators) if ctype.enumerators else f"none: {ctype} is no enum"
        raise KgenError(f"{where}: in the condition {cond}, {cond.value!r} is no enumerator of {ctype} "
                        f"(enumerators: {known})")
    return ctype


def _check_conditions(where, shown, element, conditions) -> None:
    for cond in conditions:
        _condition_type(where, shown, element, cond)


# ---- evaluated on a stopped machine -------------------------------------------------------------------------------

@dataclass(frozen=True)
class KernelMemory:
    """Reading a stopped kernel: `read(vaddr, size)` reads kernel virtual memory through the kernel's tables
    (None where they map nothing), `table(value)` is the physical top-level table a stored value names (the rule in
    the module docstring), or None where a virtual value is not mapped."""
    read: Callable[[int, int], bytes | None]
    table: Callable[[int], int | None]

    @classmethod
    def of_view(cls, view) -> KernelMemory:
        """Through the view's space (CR3, or the one `in_space` chose), its physical memory and its kernel base."""
        walker = view.need_walker()
        base = view.kernel_base
        frames: dict[int, int | None] = {}      # page -> its frame: a walk per page, not per read

        def phys(vaddr: int) -> int | None:
            page = vaddr & ~0xFFF
            if page not in frames:
                t = walker.translate(page) if walker.mode.contains(page) else None
                frames[page] = t.paddr if t is not None else None
            frame = frames[page]
            return frame + (vaddr & 0xFFF) if frame is not None else None

        def read(vaddr: int, size: int) -> bytes | None:
            data = b""
            while len(data) < size:         # page by page: virtually contiguous is not physically so
                at = vaddr + len(data)
                paddr = phys(at)
                if paddr is None:
                    return None
                chunk = min(size - len(data), 4096 - (at & 0xFFF))
                data += view.read_phys(paddr, chunk)
            return data

        def table(value: int) -> int | None:
            if base is not None and value >= base or value >= PHYS_LIMIT:
                return phys(value)
            return value
        return cls(read, table)


@dataclass(frozen=True)
class Space:
    """One address space the expression found: `name` as reports name it, `top` its top-level table's physical
    address (None when it could not be followed: `problem` says why), `value` what the kernel stored."""
    name: str
    top: int | None
    value: int
    path: str                        # the expression with each element named: ptable.proc[1].pgdir
    label: str | None = None         # the element's name member, when it has one
    problem: str | None = None


class Unreadable(Exception):
    """A read the kernel's tables do not map; `where` is the part of the expression being read."""
    where: str | None = None


class TooLong(Unreadable):
    """A list longer than MAX_LIST_NODES: corrupt, or a cycle that does not come back to a node seen."""


def spaces(types: KernelTypes, expression: str | Plan, memory: KernelMemory) -> list[Space]:
    """Every space `expression` yields on the stopped machine `memory` reads, in the order the data holds them;
    null pointers and 0 values skipped. A pointer on the way into unmapped memory gives one Space with `problem`
    (the checks then report it) instead of ending the walk."""
    checked = expression if isinstance(expression, Plan) else plan(types, expression)
    found: list[Space] = []
    word = types.word_size

    def value_of(addr: int, ctype: CType) -> int:
        size = ctype.size or word
        data = memory.read(addr, size)
        if data is None:
            raise Unreadable(f"{addr:#x}, which the kernel's tables do not map")
        value = int.from_bytes(data, "little")
        if ctype.signed and value >> (8 * size - 1):
            value -= 1 << (8 * size)
        return value

    def name_of(addr: int, record: CType) -> str | None:
        for member in record.members.values():
            if (member.type.kind == "array" and member.type.target is not None and member.type.target.char
                    and NAME_MEMBERS.search(member.name)):
                data = memory.read(addr + member.offset, member.type.size)
                if data is None:
                    return None
                text = data.split(b"\0", 1)[0]
                if text and all(32 <= b < 127 for b in text):
                    return text.decode()
        return None

    def holds(addr: int, record: CType, conds: Sequence[Condition]) -> bool:
        for cond in conds:
            ctype, at = record, addr
            for sep, name in cond.path:
                if sep == "->":
                    at = value_of(at, ctype)
                    if at == 0:
                        return False
                    ctype = ctype.target
                member = ctype.members[name]
                at, ctype = at + member.offset, member.type
            value = value_of(at, ctype)
            wanted = ctype.enumerators[cond.value] if isinstance(cond.value, str) else cond.value
            if not _COMPARE[cond.op](value, wanted):
                return False
        return True

    def walk(index: int, addr: int, shown: str, element: tuple[int, CType] | None) -> None:
        try:
            step_from(index, addr, shown, element)
        except Unreadable as err:
            if err.where is None:
                err.where = shown       # the innermost part: what was being read
            raise

    def step_from(index: int, addr: int, shown: str, element: tuple[int, CType] | None) -> None:
        if index == len(checked.expression.steps):
            leaf = checked.types[-1]
            value = value_of(addr, leaf)
            if value == 0:
                return
            label = name_of(*element) if element is not None else None
            name = f'{shown} "{label}"' if label else shown
            top = memory.table(value)
            problem = (None if top is not None else
                       f"{shown} = {value:#x} lies in the kernel half but the kernel's tables do not map it")
            found.append(Space(name, top, value, shown, label, problem))
            return
        step = checked.expression.steps[index]
        ctype = checked.types[index]
        if step.kind == "member":
            member = ctype.members[step.name]
            walk(index + 1, addr + member.offset, f"{shown}.{step.name}", element)
        elif step.kind == "deref":
            target = value_of(addr, ctype)
            if target == 0:
                return
            if element is not None and element[0] == addr and element[1] is ctype:
                element = (target, ctype.target)      # an array of pointers: the element is the struct pointed at
            member = ctype.target.members[step.name]
            walk(index + 1, target + member.offset, f"{shown}->{step.name}", element)
        elif step.kind == "elements":
            size = ctype.target.size
            picked = range(ctype.count) if step.index is None else (step.index,)
            for i in picked:
                at = addr + i * size
                if holds(at, ctype.target, step.conditions):
                    walk(index + 1, at, f"{shown}[{i}]", (at, ctype.target))
        else:
            node_type = ctype.target if ctype.points_at_record else ctype
            node = value_of(addr, ctype) if ctype.points_at_record else addr
            link = node_type.members[step.name]
            seen: set[int] = set()
            n = 0
            while node and node not in seen:
                if n >= MAX_LIST_NODES:
                    raise TooLong(f"{shown}[->{step.name}] has more than {MAX_LIST_NODES} nodes: corrupt?")
                seen.add(node)
                if (step.index is None or step.index == n) and holds(node, node_type, step.conditions):
                    walk(index + 1, node, f"{shown}[->{step.name}:{n}]", (node, node_type))
                node = value_of(node + link.offset, link.type)
                n += 1

    try:
        walk(0, checked.root.address, checked.expression.root, None)
    except Unreadable as err:
        why = str(err) if isinstance(err, TooLong) else f"reading {err.where} at {err}"
        found.append(Space(f"{checked.expression.text} (unreadable)", None, 0, checked.expression.text, None,
                           f"{checked.expression.text}: stopped after {len(found)} spaces: {why}"))
    return found


_COMPARE = {"==": lambda a, b: a == b, "!=": lambda a, b: a != b, "<": lambda a, b: a < b,
            "<=": lambda a, b: a <= b, ">": lambda a, b: a > b, ">=": lambda a, b: a >= b}


def spaces_in_view(view, expression: str | Plan) -> list[Space]:
    """`spaces` on a stopped machine's `GuestView`, with the types of its ELF."""
    return spaces(KernelTypes.load(view.elf), expression, KernelMemory.of_view(view))


@dataclass(frozen=True)
class ExpressionSource:
    """`--address-spaces EXPR` as a source of spaces asked again at every moment (`describe()`, `spaces(view)`:
    the shape of kgen/guest/spacesource.py's sources): each space with its top-level table (CR3's address bits);
    one that could not be followed at this moment (a pointer into unmapped memory while a list is being changed) is
    left out, and `problems(view)` says which."""
    expression: str

    def describe(self) -> str:
        return f"--address-spaces {self.expression}"

    def spaces(self, view) -> list[Space]:
        mask = view.mode.cr3_mask
        return [replace(space, top=space.top & mask) for space in spaces_in_view(view, self.expression)
                if space.top is not None]

    def problems(self, view) -> list[str]:
        return [space.problem for space in spaces_in_view(view, self.expression) if space.problem is not None]


# ---- found without asking -----------------------------------------------------------------------------------------

def candidates(elf: ElfInfo) -> list[str]:
    """Expressions that may name every process's space, from the types alone: a global holding an array of structs
    or a list of structs (through a member pointing at the same struct, named like `next`: LIST_LINKS), whose struct
    has a member whose name says
    page table (PAGE_TABLE_NAMES) and whose type may hold an address, directly or one pointer away
    (`[->next].mm->pgd`). An element with a `state` member gets the condition that skips unused ones: `state !=
    UNUSED` (an enumerator with UNUSED or FREE in its name), else `state != 0`. [] without DWARF."""
    try:
        types = KernelTypes.load(elf)
    except KgenError:
        return []
    found: list[str] = []
    for glob in sorted(types.globals.values(), key=lambda g: g.name):
        for expression in _candidates_in(glob.name, glob.type, depth=0):
            if expression not in found:
                try:
                    plan(types, expression)
                except KgenError:
                    continue
                found.append(expression)
    return found


def _unused_condition(record: CType) -> str:
    state = record.members.get(STATE_MEMBER)
    if state is None or not state.type.is_integer or state.type.kind == "pointer":
        return ""
    unused = next((name for name in state.type.enumerators if UNUSED_ENUMERATORS.search(name)), None)
    return f"{STATE_MEMBER} != {unused if unused is not None else 0}"


def _page_table_member(record: CType, via_pointer: bool = True) -> Iterator[str]:
    """`.pgdir`, or `.mm->pgd` one pointer away: the steps from a record to a member that names its table."""
    for member in record.members.values():
        if PAGE_TABLE_NAMES.search(member.name) and member.type.is_word:
            yield f".{member.name}"
    if via_pointer:
        for member in record.members.values():
            if member.type.points_at_record and member.type.target is not record:
                for inner in _page_table_member(member.type.target, via_pointer=False):
                    yield f".{member.name}->{inner[1:]}"


def _candidates_in(shown: str, ctype: CType, depth: int) -> Iterator[str]:
    if depth > 3:
        return
    if ctype.kind == "array" and ctype.target is not None and ctype.target.is_record and ctype.count:
        cond = _unused_condition(ctype.target)
        for tail in _page_table_member(ctype.target):
            yield f"{shown}[{cond}]{tail}"
        return
    if ctype.kind == "array" and ctype.target is not None and ctype.target.points_at_record and ctype.count:
        for tail in _page_table_member(ctype.target.target):      # an array of pointers: null slots are unused
            yield f"{shown}[]->{tail[1:]}"
        return
    record = ctype.target if ctype.points_at_record else ctype if ctype.is_record else None
    if record is None:
        return
    for link in record.members.values():
        if link.type.kind == "pointer" and link.type.target is record and LIST_LINKS.search(link.name):
            cond = _unused_condition(record)
            for tail in _page_table_member(record):
                yield f"{shown}[->{link.name}{', ' + cond if cond else ''}]{tail}"
    if ctype.is_record:
        for member in record.members.values():
            if member.type.kind == "array" or member.type.is_record:
                yield from _candidates_in(f"{shown}.{member.name}", member.type, depth + 1)


def implausible(view, top: int) -> str | None:
    """Why physical `top` is not the top-level table of one of this kernel's spaces, or None if it may be: it is
    page-aligned and maps the kernel where the space in CR3 does (its first page at or above the kernel base, else
    the entry point, to the same frame). Every process of a kernel shares its kernel half; a freed or reused page
    does not map it."""
    if top & 0xFFF:
        return f"{top:#x} is not page-aligned"
    walker = view.need_walker()
    base = view.kernel_base
    high = sorted(seg.vaddr for seg in view.elf.segments if seg.memsz and base is not None and seg.vaddr >= base)
    probe = high[0] if high else view.elf.entry
    if not walker.mode.contains(probe):
        return None
    there = walker.translate(probe)
    try:
        from kgen.guest.pagewalk import Walker
        own = Walker(view.read_phys, top, view.mode, pse=walker.pse, nxe=walker.nxe).translate(probe)
    except (KgenError, ValueError, IndexError, OSError) as err:
        return f"its tables cannot be walked ({err})"
    if there is None:
        return None
    if own is None:
        return f"it does not map the kernel ({view.elf.symbolize(probe)} is not present)"
    if own.paddr != there.paddr:
        return (f"it maps the kernel ({view.elf.symbolize(probe)}) to {own.paddr:#x}, where the space in CR3 maps "
                f"it to {there.paddr:#x}")
    return None


@dataclass(frozen=True)
class Proposal:
    """A candidate expression tried on a stopped machine: the spaces it yields and, if it is not usable, why."""
    expression: str
    spaces: tuple[Space, ...]
    problem: str | None

    def describe(self) -> str:
        if self.problem is not None:
            return f"{self.expression}: {self.problem}"
        count = f"{len(self.spaces)} space{'s' if len(self.spaces) != 1 else ''}"
        return f"{self.expression}: {count} ({', '.join(s.name for s in self.spaces)})"


def propose(view) -> list[Proposal]:
    """Every candidate of the view's ELF tried on the stopped machine: usable when it yields at least one space and
    each is a plausible top-level table (`implausible`); the usable ones first, the most spaces first."""
    found = []
    for expression in candidates(view.elf):
        try:
            yielded = tuple(spaces_in_view(view, expression))
        except KgenError as err:
            found.append(Proposal(expression, (), str(err)))
            continue
        problem = None if yielded else "no space (every element null or skipped)"
        for space in yielded:
            why = space.problem or implausible(view, space.top)
            if why is not None:
                problem = f"{space.name}: {why}"
                break
        found.append(Proposal(expression, yielded, problem))
    return sorted(found, key=lambda p: (p.problem is not None, -len(p.spaces)))
