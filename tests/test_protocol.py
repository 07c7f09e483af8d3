"""kgen/protocol.py reaches the kernel: its lines are in the kernel's bytes where the templates put them, and its
numbers are the constants the templates assemble with; the harness reads the same module (tests/kernel/test_boot.py and
every KernelSession wait for those lines on a real boot)."""
from __future__ import annotations

import pytest

from kgen import protocol
from kgen.build import asm

from conftest import ARCH_BUILDS


@pytest.fixture(scope="module", params=tuple(ARCH_BUILDS))
def kernel(request):
    return request.getfixturevalue(ARCH_BUILDS[request.param]).kernel


@pytest.mark.parametrize("label, text", [("str_boot_ok", protocol.BOOT_OK), ("str_serving", protocol.SERVING),
                                         ("str_exit_success", protocol.EXIT_SUCCESS)])
def test_each_line_is_in_the_kernel_at_its_label(kernel, label, text):
    address = kernel.image.symbol(label).value
    rodata = next(s for s in kernel.image.sections if s.name == ".rodata")
    at = address - rodata.vaddr
    line = text.encode() + (b"\0" if label == "str_exit_success" else b"\n\0")   # exit_success adds its newline
    assert rodata.data[at:at + len(line)] == line


def test_the_numbers_are_the_templates_constants(kernel):
    constants = kernel.layout.asm_constants()
    assert {name: constants[name] for name in protocol.asm_constants()} == protocol.asm_constants()


def test_a_line_that_assembly_would_misquote_is_refused(monkeypatch):
    monkeypatch.setitem(protocol.ASM_STRINGS, "QUOTED_TEXT", 'say "hi"')
    with pytest.raises(ValueError, match="QUOTED_TEXT"):
        protocol.asm_string_macros()


def test_every_template_piece_gets_the_line_macros(tmp_path):
    (tmp_path / "x.s").write_text(".section .rodata\nline:\n    BOOT_OK_TEXT\n")
    piece, = asm.load_unit(tmp_path, "x")
    assert ".macro BOOT_OK_TEXT" in piece.body() and f'.ascii "{protocol.BOOT_OK}"' in piece.body()
