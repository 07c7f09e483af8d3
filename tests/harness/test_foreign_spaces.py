"""`kgen test --kernel` on a kernel whose processes' spaces its DWARF names (tests/zoo_c.py): without
--address-spaces the expression is proposed, said on stderr with the option that pins it, and every space it
yields is checked, the flaw of the third process failing that process's check only, named by the expression and the
process's name; with it pinned, the kernel without the flaw passes in every space; an expression that does not fit
(or an ELF without DWARF, or [foreign] address_spaces) is one line, status 2, before anything boots."""
from __future__ import annotations

import json
import shlex
import shutil
import subprocess

import pytest

import zoo_c
from conftest import needs_qemu, one_line, run_kgen

BELOW = "test_nothing_is_mapped_below_the_kernel_base"
PER_SPACE = ("test_elf_segments_map_vaddr_to_paddr_no_wider_than_their_flags", BELOW,
             "test_no_kernel_page_is_user_accessible", "test_each_page_table_is_referenced_once",
             "test_page_tables_hold_no_poison")


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    return tmp_path_factory.mktemp("zoo-c")


def json_test(elf, tmp_path, *options):
    report = tmp_path / f"{elf.stem}.json"
    result = run_kgen("test", "--kernel", elf, "-j", "1", "--json", report, "-k", "test_invariants", *options)
    assert "Traceback" not in result.stdout + result.stderr, result.stdout + result.stderr
    return result, {check["name"]: check for check in json.loads(report.read_text())["checks"]}


@needs_qemu
@pytest.mark.vm
def test_the_spaces_are_proposed_and_the_third_process_flaw_named(out, tmp_path):
    elf = zoo_c.c_kernel(out, "array", "i386", flaw=True)
    result, checks = json_test(elf, tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    expression = zoo_c.ARRAY_EXPRESSION
    said = [line for line in result.stderr.splitlines() if line.startswith(f"kgen: {elf.name}: ")]
    names = [f'ptable.proc[{i}].pgdir "{name}"' for i, name in enumerate(zoo_c.NAMES)]
    assert said == [f"kgen: {elf.name}: its DWARF suggests --address-spaces {expression}: 3 spaces "
                    f"({', '.join(names)}) [plausible]",
                    f"kgen: {elf.name}: checking every space of {expression}; pin it with --address-spaces "
                    f"{shlex.quote(expression)}"], result.stderr
    failed = {name for name, check in checks.items() if check["outcome"] == "failed"}
    third = f"{BELOW}[{names[zoo_c.FLAWED]}]"
    assert failed == {third}, failed
    header, line = checks[third]["messages"]
    assert f'in address space {names[zoo_c.FLAWED]}: PD at 0x' in header, header
    assert line.startswith(f"{zoo_c.USER_PEEK:#010x}-") and "on the kernel image's frames" in line, line
    for check in PER_SPACE:
        assert all(f"{check}[{name}]" in checks for name in names), sorted(checks)


@needs_qemu
@pytest.mark.vm
def test_a_pinned_expression_passes_the_kernel_without_the_flaw(out, tmp_path):
    elf = zoo_c.c_kernel(out, "list", "x86_64")
    result, checks = json_test(elf, tmp_path, "--address-spaces", zoo_c.LIST_EXPRESSION)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "suggests" not in result.stderr, result.stderr
    names = [f'task_list[->next:{i}].cr3 "{name}"' for i, name in enumerate(zoo_c.NAMES)]
    for check in PER_SPACE:
        assert [checks[f"{check}[{name}]"]["outcome"] for name in names] == ["passed"] * 3


def test_what_does_not_fit_is_one_line_before_anything_boots(out, tmp_path):
    elf = zoo_c.c_kernel(out, "array", "i386")
    bad = run_kgen("test", "--kernel", elf, "--address-spaces", "ptable.proc[].name")
    assert bad.returncode == 2
    assert one_line(bad) == ("kgen: error: --address-spaces ptable.proc[].name: ptable.proc[].name is a char[16]; "
                             "the expression must end at a pointer or an integer of at least 4 bytes holding a "
                             "top-level table's address")
    config = tmp_path / "kgen.toml"
    config.write_text(f'[foreign]\nkernel = "{elf}"\naddress_spaces = "ptable.proc[state != DEAD].pgdir"\n')
    table = run_kgen("test", "--config", config)
    assert table.returncode == 2
    line = one_line(table)
    assert line.startswith(f"kgen: error: {config}: foreign.address_spaces = 'ptable.proc[state != DEAD].pgdir': ")
    assert line.endswith("'DEAD' is no enumerator of enum procstate (enumerators: UNUSED, EMBRYO, RUNNABLE, RUNNING)")
    if shutil.which("objcopy") is None:
        pytest.skip("objcopy not installed (Debian package binutils)")
    stripped = tmp_path / "stripped.elf"
    subprocess.run(["objcopy", "--strip-debug", elf, stripped], check=True)
    nodwarf = run_kgen("test", "--kernel", stripped, "--address-spaces", zoo_c.ARRAY_EXPRESSION)
    assert nodwarf.returncode == 2
    assert one_line(nodwarf).startswith(f"kgen: error: --address-spaces {zoo_c.ARRAY_EXPRESSION}: stripped.elf has "
                                        f"no DWARF (.debug_info): build it with -g")


def test_a_test_of_a_space_that_is_not_there_skips_or_fails_saying_why(monkeypatch):
    """`space_view` for what collection found (no machine: a stand-in that only hands out its view)."""
    from types import SimpleNamespace

    from kgen.guest import dwarfspaces
    from kgen.guest.addrspaces import NamedSpace, NoSpaces
    from kgen.harness.pytest_plugin import space_view
    live = SimpleNamespace(view=lambda: SimpleNamespace())
    with pytest.raises(pytest.skip.Exception, match=r"^x\[\] yields no space"):
        space_view(live, NoSpaces("x[]", "x[] yields no space on the booted kernel"))
    with pytest.raises(pytest.fail.Exception, match=r"^x\[\] could not be evaluated: boom$"):
        space_view(live, NoSpaces("x[]", "x[] could not be evaluated: boom", failed=True))
    gone = NamedSpace("x[].pgdir", 'x[2].pgdir "cat"')
    monkeypatch.setattr(NamedSpace, "find", lambda self, view: None)
    gone_line = r'^x\[2\].pgdir "cat" is no longer among the spaces of x\[\].pgdir$'
    with pytest.raises(pytest.fail.Exception, match=gone_line):
        space_view(live, gone)
    broken = dwarfspaces.Space("x[] (unreadable)", None, 0, "x[]", None, "x[]: stopped after 2 spaces: ...")
    monkeypatch.setattr(NamedSpace, "find", lambda self, view: broken)
    with pytest.raises(pytest.fail.Exception, match=r"^x\[\]: stopped after 2 spaces: \.\.\.$"):
        space_view(live, gone)
