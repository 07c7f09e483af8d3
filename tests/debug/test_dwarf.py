"""The kernel ELF's DWARF line table (kgen/build/dwarf.py): every function's address maps to the template line of its
first instruction, as read here from the template files themselves; binutils decodes the table without a warning;
the line labels that give the addresses change no byte; and gdb, through `kgen debug`, stops in kmain (and in the
boot stub at its physical address) on the template line, lists the template and steps to the next line."""
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from conftest import ARCH_BUILDS, needs_qemu
from test_debug import assert_gone, debug, load_address, needs_gdb, qemu_pid
from kgen.arch import Arch
from kgen.build import asm
from kgen.build.link import SECTION_PERMS
from kgen.build.pipeline import kernel_units
from kgen.build.resources import templates_dir
from kgen.guest.elfinfo import ElfInfo

ARCHES = ("i386", "x86_64")
# Directives that emit bytes (everything else that starts with a dot emits none): a line with one is code or data.
DATA = {".byte", ".word", ".short", ".long", ".int", ".quad", ".ascii", ".asciz", ".string", ".skip", ".space",
        ".fill", ".zero", ".incbin", ".xword"}


@pytest.fixture(scope="module", params=ARCHES)
def built(request):
    """The default kernel of each architecture (conftest's, shared with the other modules)."""
    return request.getfixturevalue(ARCH_BUILDS[request.param])


# ---- the templates, read here on their own ---------------------------------------------------------------------
def _statement(raw: str) -> str:
    """The line without its comment and its labels."""
    text = raw.split("#", 1)[0].strip()
    while m := re.match(r"[A-Za-z_.][\w.]*\s*:\s*", text):
        text = text[m.end():]
    return text


def _condition(expression: str, constants: dict[str, int]) -> bool:
    python = re.sub(r"[A-Za-z_]\w*", lambda m: str(constants[m.group(0)]), expression).replace("/", "//")
    return bool(eval(python, {"__builtins__": {}}))     # noqa: S307 - numbers and operators from the templates


# Macros of templates/macros.inc that emit no bytes (they keep the argument offsets): their line has no address.
COUNTING_MACROS = frozenset({"frame"})


def first_code_line(lines: list[str], start: int, rest: str, constants: dict[str, int]) -> int | None:
    """The number of the first line from `start` (1-based; of that line only `rest` counts) that holds an
    instruction, a macro invocation or data in this kernel: `.if` branches decided by the layout's constants,
    macro bodies skipped; None when the section ends first."""
    branches: list[list[bool]] = []       # [taken, in_else] per open .if
    in_macro = False
    for number in range(start, len(lines) + 1):
        text = _statement(rest if number == start else lines[number - 1])
        word = text.split(None, 1)[0].lower() if text else ""
        if in_macro:
            in_macro = word != ".endm"
            continue
        if word == ".if":
            branches.append([_condition(text[3:], constants), False])
        elif word == ".else":
            branches[-1][1] = True
        elif word == ".endif":
            branches.pop()
        elif not all(taken != in_else for taken, in_else in branches):
            continue
        elif word == ".macro":
            in_macro = True
        elif word == ".section":
            return None
        elif word and (not word.startswith(".") or word in DATA) and word not in COUNTING_MACROS:
            return number
    return None


def label_definitions(arch: Arch) -> dict[str, tuple[Path, list[str], int, str]]:
    """label -> (template, its lines, the line defining it, the text after `label:`) over the kernel's units."""
    found = {}
    for unit in kernel_units(arch):
        path = templates_dir() / f"{unit}.s"
        lines = path.read_text().splitlines()
        for number, line in enumerate(lines, start=1):
            if m := re.match(r"\s*([A-Za-z_]\w*)\s*:", line.split("#", 1)[0]):
                found[m.group(1)] = (path, lines, number, line.split("#", 1)[0][m.end():])
    return found


# ---- the ELF, read with pyelftools -------------------------------------------------------------------------------
def line_sequences(elf: ELFFile) -> list[tuple[list[tuple[int, str, int]], int]]:
    """Every sequence of the line table: its rows (address, file, line) and its end address."""
    dwarf = elf.get_dwarf_info()
    sequences = []
    for cu in dwarf.iter_CUs():
        program = dwarf.line_program_for_CU(cu)
        files = [entry.name.decode() for entry in program["file_entry"]]
        rows: list[tuple[int, str, int]] = []
        for entry in program.get_entries():
            state = entry.state
            if state is None:
                continue
            if state.end_sequence:
                sequences.append((rows, state.address))
                rows = []
            else:
                rows.append((state.address, files[state.file - 1], state.line))
    return sequences


def line_of(sequences, address: int) -> tuple[str, int] | None:
    for rows, end in sequences:
        if rows and rows[0][0] <= address < end:
            return max((row for row in rows if row[0] <= address), key=lambda row: row[0])[1:]
    return None


def cu_ranges(elf: ELFFile) -> list[tuple[str, int, int]]:
    """(name, start, end) of every address range a compile unit claims (DW_AT_low_pc/high_pc or DW_AT_ranges)."""
    dwarf = elf.get_dwarf_info()
    claimed = []
    for cu in dwarf.iter_CUs():
        die = cu.get_top_DIE()
        name = die.attributes["DW_AT_name"].value.decode()
        if "DW_AT_ranges" in die.attributes:
            for entry in dwarf.range_lists().get_range_list_at_offset(die.attributes["DW_AT_ranges"].value):
                claimed.append((name, entry.begin_offset, entry.end_offset))
        else:
            claimed.append((name, die.attributes["DW_AT_low_pc"].value, die.attributes["DW_AT_high_pc"].value))
    return claimed


def functions(elf: ELFFile) -> dict[str, int]:
    return {sym.name: sym["st_value"] for sym in elf.get_section_by_name(".symtab").iter_symbols()
            if sym["st_info"]["type"] == "STT_FUNC"}


def test_every_function_maps_to_the_line_of_its_first_instruction(built):
    arch = built.kernel.layout.arch
    constants = built.kernel.layout.asm_constants()
    definitions = label_definitions(arch)
    with built.elf.open("rb") as stream:
        elf = ELFFile(stream)
        sequences, claimed, funcs = line_sequences(elf), cu_ranges(elf), functions(elf)
    checked = 0
    for name, address in sorted(funcs.items(), key=lambda item: item[1]):
        path, lines, number, rest = definitions[name]
        expected = first_code_line(lines, number, rest, constants)
        assert expected is not None, f"{name}: no code follows its label in {path}"
        assert line_of(sequences, address) == (str(path), expected), (name, hex(address))
        assert [n for n, start, end in claimed if start <= address < end] == [str(path)], name
        checked += 1
    assert {"_start", "kmain", "pmm_alloc", "vmm_map"} <= set(funcs) and checked == len(funcs) > 100


def test_file_names_are_the_templates_the_build_read(built):
    with built.elf.open("rb") as stream:
        names = {path for rows, _ in line_sequences(ELFFile(stream)) for _, path, _ in rows}
    expected = {str(templates_dir() / f"{unit}.s") for unit in kernel_units(built.kernel.layout.arch)}
    assert names and names <= expected and all(Path(name).is_absolute() for name in names)
    assert str(templates_dir() / "report.s") in names


def test_readelf_decodes_the_table_without_a_warning(built):
    """binutils, a reader independent of the writer and of pyelftools: no warning, and kmain's row is the
    template line of its first instruction."""
    if shutil.which("readelf") is None:
        pytest.skip("readelf not installed (Debian package binutils)")
    # --wide: without it readelf cuts a file name longer than its column from the left (a checkout's long path).
    result = subprocess.run(["readelf", "--wide", "--debug-dump=info,abbrev,rawline,decodedline,Ranges",
                             str(built.elf)], capture_output=True, text=True)
    assert result.returncode == 0 and result.stderr == "" and "warning" not in result.stdout.lower(), result.stderr
    path, lines, number, rest = label_definitions(built.kernel.layout.arch)["kmain"]
    kmain = built.kernel.image.symbol("kmain").value
    line = first_code_line(lines, number, rest, built.kernel.layout.asm_constants())
    assert re.search(rf"^{re.escape(str(path))} +{line} +{kmain:#x} ", result.stdout, re.MULTILINE), result.stdout


def test_grub_gets_an_alignment_for_every_unloaded_section(built):
    """GRUB 2.06 copies every section with sh_addr 0 into memory, aligned up to its sh_addralign: 0 there puts it
    at physical 0, over the real-mode interrupt vectors, and the boot hangs in GRUB once the DWARF sections' names
    make `.shstrtab` reach vector 0x10 (tests/kernel/test_boot.py boots the ISO)."""
    with built.elf.open("rb") as stream:
        unloaded = {sec.name: sec["sh_addralign"] for sec in ELFFile(stream).iter_sections()
                    if sec.name and not sec["sh_addr"] and sec["sh_size"]}
    assert {".debug_line", ".debug_info", ".debug_abbrev", ".shstrtab", ".symtab"} <= set(unloaded)
    assert all(align >= 1 for align in unloaded.values()), unloaded


def test_line_labels_change_no_byte(built):
    """Each piece of code assembled with its line labels and without: the same bytes (tests/build/test_asm_vs_gas.py
    compares the labelled bytes with GNU as too)."""
    kernel = built.kernel
    with_lines = 0
    for result in kernel.linked.assembled:
        if "x" not in SECTION_PERMS[result.piece.section]:
            continue
        plain = asm.assemble(result.piece, result.address, _visible(kernel, result.piece))
        assert plain.data == result.data and not plain.lines, result.piece.name
        with_lines += bool(result.lines)
    assert with_lines >= 10


def _visible(kernel, piece) -> dict[str, int]:
    """The names the linker's last pass assembled `piece` against (code before paging: physical labels)."""
    visible = kernel.linked.visible
    if not piece.before_paging:
        return visible
    early = [label for r in kernel.linked.assembled if r.piece.before_paging for label in r.piece.global_labels]
    return {**visible, **{label: visible[label] - kernel.layout.kernel_virtual_base for label in early}}


# ---- gdb through kgen debug ----------------------------------------------------------------------------------------
@needs_qemu
@needs_gdb
@pytest.mark.vm
def test_gdb_stops_in_kmain_on_its_template_line_and_next_goes_to_the_next(built, tmp_path):
    arch = built.kernel.layout.arch
    constants = built.kernel.layout.asm_constants()
    definitions = label_definitions(arch)
    result = debug(built.elf.parent, arch.name, "-ex", "break _start", "-ex", "break kmain",
                   "-ex", "continue", "-ex", "echo STUB\\n", "-ex", "info line *$pc",
                   "-ex", "continue", "-ex", "echo HIGH\\n", "-ex", "info line *$pc", "-ex", "list",
                   "-ex", "echo NEXT\\n", "-ex", "next", "-ex", "info line *$pc", "-ex", "kill", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert_gone(qemu_pid(result.stderr))
    stub, high = result.stdout.split("\nSTUB\n", 1)[1].split("\nHIGH\n", 1)
    high, stepped = high.split("\nNEXT\n", 1)
    elf = ElfInfo.load(built.elf)

    # The boot stub, at its physical address: its template line through the second copy of the symbols.
    path, lines, number, rest = definitions["_start"]
    line = first_code_line(lines, number, rest, constants)
    start = load_address(elf, elf.symbols["_start"].value)
    assert f'Line {line} of "{path}" starts at address {start:#x}' in stub, stub

    # kmain: `info line`, then `list` shows the template around that line, then `next` goes one line on.
    path, lines, number, rest = definitions["kmain"]
    line = first_code_line(lines, number, rest, constants)
    assert f'Line {line} of "{path}" starts at address {elf.symbols["kmain"].value:#x} <kmain>' in high, high
    for shown in range(line - 2, line + 3):
        assert re.search(rf"^{shown}\t{re.escape(lines[shown - 1])}$", high, re.MULTILINE), (shown, high)
    following = first_code_line(lines, line + 1, lines[line], constants)
    assert following and re.search(rf'^Line {following} of "{re.escape(str(path))}" starts at address', stepped,
                                   re.MULTILINE), stepped
