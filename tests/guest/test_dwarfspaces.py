"""Address spaces found in a kernel's own data through its DWARF (kgen/guest/dwarfspaces.py), on the C zoo kernels of
tests/zoo_c.py: the expression yields each process's space by name, virtual pointers and physical values alike; the
flaw planted in the third process is found in that space only, and named so; the kernels without it hold every
check in every space; the candidates are the expressions a user would write; expressions that do not fit the types
are one line each. Each kernel is built by gcc and booted once, in QEMU, for all its assertions."""
from __future__ import annotations

import shutil
import subprocess

import pytest

import zoo_c
from conftest import needs_qemu
from kgen.errors import KgenError
from kgen.guest import dwarfspaces, invariants
from kgen.guest.addrspaces import SpaceArray, parse_spec
from kgen.guest.elfinfo import ElfInfo

EXPRESSIONS = {"array": zoo_c.ARRAY_EXPRESSION, "list": zoo_c.LIST_EXPRESSION}
BELOW = invariants.check_nothing_below_kernel_base


def named(kind: str, index: int) -> str:
    """How a space of the zoo kernel is named: the expression with the element, and the process's name."""
    path = (f"ptable.proc[{index}].pgdir" if kind == "array" else f"task_list[->next:{index}].cr3")
    return f'{path} "{zoo_c.NAMES[index]}"'


class Built(dict):
    """(arch, kind, flaw) -> the zoo kernel, built on first use (a worker builds only the kernels its tests boot)."""

    def __init__(self, out):
        super().__init__()
        self.out = out

    def __missing__(self, key):
        arch, kind, flaw = key
        self[key] = zoo_c.c_kernel(self.out, kind, arch, flaw=flaw)
        return self[key]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return Built(tmp_path_factory.mktemp("zoo-c"))


def problems_in(view, space) -> dict[str, list[str]]:
    """Each generic check's problems in `space` (those that apply), by check name."""
    seen = view.in_space(space.top, space.name)
    found = {}
    for check in invariants.GENERIC_CHECKS:
        try:
            problems = check(seen)
        except invariants.NotApplicable:
            continue
        if problems:
            found[check.__name__] = problems
    return found


@needs_qemu
@pytest.mark.vm
@pytest.mark.parametrize("kind", ["array", "list"])
@pytest.mark.parametrize("arch", ["i386", "x86_64"])
def test_every_process_space_is_found_and_the_flaw_only_in_the_third(built, arch, kind):
    from kgen.harness.kernel import KernelUnderTest
    from kgen.harness.live import boot
    results = {}
    for flaw in (False, True):
        elf = built[arch, kind, flaw]
        with boot(KernelUnderTest.foreign(elf), cold=True) as live:
            view = live.view()
            found = dwarfspaces.spaces_in_view(view, EXPRESSIONS[kind])
            proposals = dwarfspaces.propose(view)
            assert all(s.problem is None and dwarfspaces.implausible(view, s.top) is None for s in found)
            # As a source asked at every moment (kgen test --check-at): the same spaces.
            source = dwarfspaces.ExpressionSource(EXPRESSIONS[kind])
            assert [(s.name, s.top) for s in source.spaces(view)] == [(s.name, s.top) for s in found]
            assert source.problems(view) == []
            # The space in CR3 is the first process's (the kernel ends there): one of those found.
            assert found[0].top == view.regs.cr3 & view.mode.cr3_mask
            results[flaw] = (found, {s.name: problems_in(view, s) for s in found}, proposals)
            if kind == "array":
                # Without its condition, the expression also yields the slot of the process that exited: a stale
                # pointer to a freed page, which maps no kernel.
                every = dwarfspaces.spaces_in_view(view, "ptable.proc[].pgdir")
                assert [s.name for s in every] == [s.name for s in found] + ["ptable.proc[3].pgdir"]
                assert "does not map the kernel" in dwarfspaces.implausible(view, every[-1].top)
    for found, _, proposals in results.values():
        assert [s.name for s in found] == [named(kind, i) for i in range(3)]
        assert [s.label for s in found] == list(zoo_c.NAMES)
        kbase = zoo_c.KBASE[arch]
        for space in found:
            # array: a virtual pointer, translated; list: the physical address itself.
            assert space.top == (space.value - kbase if kind == "array" else space.value), space
        # Proposed without asking: the same expression, usable, naming the same spaces.
        assert proposals[0].expression == EXPRESSIONS[kind] and proposals[0].problem is None
        assert [s.name for s in proposals[0].spaces] == [s.name for s in found]
    assert all(problems == {} for problems in results[False][1].values()), results[False][1]
    flawed = results[True][1]
    third = named(kind, zoo_c.FLAWED)
    assert {name for name, p in flawed.items() if p} == {third}, flawed
    assert list(flawed[third]) == [BELOW.__name__], flawed[third]
    [line] = flawed[third][BELOW.__name__]
    assert line.startswith(f"{zoo_c.USER_PEEK:#010x}-{zoo_c.USER_PEEK + 0x1000:#010x} is a user page"), line
    assert "on the kernel image's frames" in line


@pytest.fixture(scope="module")
def types(built):
    return {kind: dwarfspaces.KernelTypes.load(ElfInfo.load(built["i386", kind, False])) for kind in ("array", "list")}


@pytest.mark.parametrize("kind, expression, steps", [
    ("array", "ptable.proc[].pgdir", "member elements member"),
    ("array", "ptable.proc[3].pgdir", "member elements member"),
    ("array", "ptable.proc[state == RUNNABLE && pid > 1].pgdir", "member elements member"),
    ("array", "kpgdir", ""),
    ("list", "task_list[->next].cr3", "list member"),
    ("list", "task_list[->next, pid != 2].cr3", "list member"),
    ("list", "task_list[->next:1].cr3", "list member"),
    ("list", "task_list->next->cr3", "deref deref"),
])
def test_expressions_that_fit_the_types(types, kind, expression, steps):
    checked = dwarfspaces.plan(types[kind], expression)
    assert " ".join(step.kind for step in checked.expression.steps) == steps
    assert checked.types[-1].is_word


@pytest.mark.parametrize("kind, expression, says", [
    ("array", "nosuch[].pgdir", "zoo-c-array-i386.elf's DWARF has no global variable 'nosuch'"),
    ("array", "ptable.procs[].pgdir", "ptable is an anonymous struct with no member 'procs' (its members: lock, proc)"),
    ("array", "ptable.proc.pgdir", "ptable.proc is a struct proc[8], not a struct: it has no member 'pgdir'"),
    ("array", "ptable.proc[]->pgdir", "ptable.proc[] is a struct proc, not a pointer to a struct, so '->' does not "
                                      "apply: write ptable.proc[].pgdir"),
    ("array", "ptable.proc[].name", "ptable.proc[].name is a char[16]; the expression must end at a pointer or an "
                                    "integer of at least 4 bytes"),
    ("array", "ptable.proc[state != UNUSD].pgdir", "'UNUSD' is no enumerator of enum procstate (enumerators: "
                                                   "UNUSED, EMBRYO, RUNNABLE, RUNNING)"),
    ("array", "ptable.proc[8].pgdir", "ptable.proc has 8 elements; 8 is not one of them"),
    ("array", "ptable.proc[].pgdir)", "unexpected ')' at column 20"),
    ("array", "ptable.proc[state !=].pgdir", "expected a number or an enumerator after '!=' at column 21"),
    ("list", "task_list.cr3", "task_list is a pointer (struct task *): write task_list->cr3"),
    ("list", "task_list[].cr3", "task_list is a struct task *, not an array, so '[]' does not apply (a list? "
                                "[->MEMBER])"),
    ("list", "task_list[->comm].cr3", "struct task's member comm is a char[16], not a pointer to struct task: it "
                                      "does not link a list of them"),
])
def test_expressions_that_do_not_fit_are_one_line_each(types, kind, expression, says):
    with pytest.raises(KgenError) as err:
        dwarfspaces.plan(types[kind], expression)
    text = str(err.value)
    assert "\n" not in text and text.startswith(f"--address-spaces {expression}: ") and says in text, text


def test_the_old_form_and_no_dwarf(built, tmp_path):
    elf = ElfInfo.load(built["i386", "array", False])
    # SYMBOL[,COUNT] is still the array of physical addresses, DWARF or not.
    assert isinstance(parse_spec("ptable,2", elf), SpaceArray)
    assert isinstance(parse_spec("ptable.proc[].pgdir", elf), dwarfspaces.Plan)
    if shutil.which("objcopy") is None:
        pytest.skip("objcopy not installed (Debian package binutils)")
    stripped = tmp_path / "stripped.elf"
    subprocess.run(["objcopy", "--strip-debug", built["i386", "array", False], stripped], check=True)
    with pytest.raises(KgenError) as err:
        parse_spec("ptable.proc[].pgdir", ElfInfo.load(stripped))
    assert str(err.value).startswith("--address-spaces ptable.proc[].pgdir: stripped.elf has no DWARF (.debug_info)")
    assert dwarfspaces.candidates(ElfInfo.load(stripped)) == []


def test_candidates_come_from_the_types(built, tmp_path):
    for arch in ("i386", "x86_64"):
        for kind, expression in EXPRESSIONS.items():
            assert dwarfspaces.candidates(ElfInfo.load(built[arch, kind, False])) == [expression]
    # An array of pointers to processes whose table is one pointer further; a chain of parents is no list of them.
    source = tmp_path / "procs.c"
    source.write_text("struct mm { unsigned long pgd; };\n"
                      "struct proc { struct mm *mm; struct proc *parent; char name[16]; };\n"
                      "struct proc *procs[8];\nstruct proc *initproc;\n")
    subprocess.run(["gcc", "-m32", "-g", "-c", source, "-o", tmp_path / "procs.o"], check=True)
    assert dwarfspaces.candidates(ElfInfo.load(tmp_path / "procs.o")) == ["procs[]->mm->pgd"]


def test_a_list_is_followed_until_it_comes_back_and_a_bad_pointer_is_named(types):
    """task_list's nodes in a made-up memory (no machine): a circular list ends where it began, a node whose cr3 is 0
    is skipped, a condition picks nodes, and a `next` into unmapped memory ends the walk with a space that says so."""
    task = types["list"].globals["task_list"].type.target
    offset = {name: member.offset for name, member in task.members.items()}
    head = types["list"].globals["task_list"].address
    memory: dict[int, int] = {head: 0x1000}

    def node(at: int, following: int, pid: int, cr3: int, comm: str) -> None:
        memory[at + offset["next"]] = following
        memory[at + offset["pid"]] = pid
        memory[at + offset["cr3"]] = cr3
        for i, byte in enumerate(comm.encode() + b"\0"):
            memory[at + offset["comm"] + i] = byte

    def read(vaddr: int, size: int) -> bytes | None:
        if size == 16:      # comm
            return bytes(memory.get(vaddr + i, 0) & 0xFF for i in range(16))
        if vaddr not in memory:
            return None
        return memory[vaddr].to_bytes(size, "little")

    node(0x1000, 0x2000, 1, 0x10000, "init")
    node(0x2000, 0x3000, 2, 0, "zombie")            # no table: skipped
    node(0x3000, 0x4000, 3, 0x30000, "sh")
    node(0x4000, 0x1000, 4, 0x40000, "cat")         # back to the first
    kernel = dwarfspaces.KernelMemory(read, lambda value: value)
    found = dwarfspaces.spaces(types["list"], "task_list[->next].cr3", kernel)
    assert [(s.name, s.top) for s in found] == [('task_list[->next:0].cr3 "init"', 0x10000),
                                                 ('task_list[->next:2].cr3 "sh"', 0x30000),
                                                 ('task_list[->next:3].cr3 "cat"', 0x40000)]
    picked = dwarfspaces.spaces(types["list"], "task_list[->next, pid >= 3 && pid != 4].cr3", kernel)
    assert [s.label for s in picked] == ["sh"]
    assert [s.label for s in dwarfspaces.spaces(types["list"], "task_list[->next:3].cr3", kernel)] == ["cat"]
    memory[0x3000 + offset["next"]] = 0x9000        # into nothing
    broken = dwarfspaces.spaces(types["list"], "task_list[->next].cr3", kernel)
    assert [s.label for s in broken[:2]] == ["init", "sh"] and broken[2].top is None
    assert broken[2].problem == ("task_list[->next].cr3: stopped after 2 spaces: reading task_list[->next:3].cr3 "
                                 "at 0x9018, which the kernel's tables do not map")


def test_an_array_of_pointers_names_each_space_by_the_struct_pointed_at():
    """`procs[]->pgdir` over `struct proc *procs[3]` (made-up types and memory): a null slot is skipped, the name is
    the pointed-at struct's."""
    from pathlib import Path
    char = dwarfspaces.CType("base", "char", 1, char=True)
    word = dwarfspaces.CType("base", "unsigned int", 4)
    proc = dwarfspaces.CType("struct", "proc", 20)
    proc.members = {"pgdir": dwarfspaces.Member("pgdir", 0, word),
                    "name": dwarfspaces.Member("name", 4, dwarfspaces.CType("array", "", 16, target=char, count=16))}
    slots = dwarfspaces.CType("array", "", 12, target=dwarfspaces.CType("pointer", "", 4, target=proc), count=3)
    types = dwarfspaces.KernelTypes(Path("made-up.elf"), 4, {"procs": dwarfspaces.Global("procs", 0x100, slots)})
    data = bytearray(0x1000)
    data[0x100:0x10C] = (0x200).to_bytes(4, "little") + bytes(4) + (0x300).to_bytes(4, "little")
    for at, top, name in ((0x200, 0x5000, b"init"), (0x300, 0x6000, b"sh")):
        data[at:at + 4] = top.to_bytes(4, "little")
        data[at + 4:at + 4 + len(name)] = name
    memory = dwarfspaces.KernelMemory(lambda vaddr, size: bytes(data[vaddr:vaddr + size]), lambda value: value)
    found = dwarfspaces.spaces(types, "procs[]->pgdir", memory)
    assert [(s.name, s.top) for s in found] == [('procs[0]->pgdir "init"', 0x5000), ('procs[2]->pgdir "sh"', 0x6000)]
