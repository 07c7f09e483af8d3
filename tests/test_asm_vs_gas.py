"""keystone against GNU as: every piece of the kernel, assembled by both at the address the linker chose.

The rendered source (constants and outside symbols as `.equ` lines) goes to GNU as unchanged and to keystone after
`asm.keystone_source`, the one place that works around keystone's 32-bit mis-encodings. The decoded instruction
streams must match; data sections must match byte for byte.
"""
import re
import shutil
import subprocess

import pytest

from kgen import asm
from kgen.build import link_kernel
from kgen.config import Config

pytestmark = pytest.mark.skipif(shutil.which("as") is None or shutil.which("objdump") is None,
                                reason="binutils (as, ld, objdump) not installed")


def gas_bytes(source: str, address: int, tmp_path) -> bytes:
    src = tmp_path / "piece.s"
    obj = tmp_path / "piece.o"
    out = tmp_path / "piece.bin"
    src.write_text(source + "\n")
    subprocess.run(["as", "--32", "-msyntax=intel", "-mnaked-reg", str(src), "-o", str(obj)],
                   check=True, capture_output=True, text=True)
    subprocess.run(["ld", "-m", "elf_i386", f"-Ttext={address:#x}", "-e", f"{address:#x}", "--oformat", "binary",
                    str(obj), "-o", str(out)], check=True, capture_output=True, text=True)
    return out.read_bytes()


def decoded(data: bytes, address: int, tmp_path) -> list[str]:
    """The instruction stream as text, independent of encoding lengths.

    keystone and GNU as may pick encodings of different lengths for the same instruction (`add eax, imm32` is
    `81 c0` in one and `05` in the other), which shifts every later address and the alignment padding. So padding
    (`int3`, the fill templates use) is dropped and every number that is the address of an instruction in the
    piece becomes `@n`, the instruction's position.
    """
    path = tmp_path / "decode.bin"
    path.write_bytes(data)
    text = subprocess.run(["objdump", "-D", "-b", "binary", "-mi386", "-M", "intel", f"--adjust-vma={address:#x}",
                           str(path)], check=True, capture_output=True, text=True).stdout
    rows = []
    for line in text.splitlines():
        parts = line.split("\t")
        if len(parts) >= 3 and parts[0].rstrip().endswith(":"):
            insn = " ".join(parts[2].split())
            if insn != "int3":
                rows.append((int(parts[0].strip().rstrip(":"), 16), insn))
    position = {addr: i for i, (addr, _) in enumerate(rows)}
    position[address + len(data)] = len(rows)

    def symbolic(m):
        value = int(m.group(0), 16)
        return f"@{position[value]}" if value in position else m.group(0)

    return [re.sub(r"0x[0-9a-f]+", symbolic, insn) for _, insn in rows]


KERNEL = link_kernel(Config())


@pytest.mark.parametrize("result", KERNEL.linked.assembled, ids=lambda r: r.piece.name)
def test_keystone_matches_gnu_as(result, tmp_path):
    source = asm.render(result.piece, KERNEL.linked.visible)
    reference = gas_bytes(source, result.address, tmp_path)
    if result.piece.section == ".bss":
        assert len(reference) == len(result.data) and not any(reference)
    elif result.piece.section == ".text":
        assert decoded(result.data, result.address, tmp_path) == decoded(reference, result.address, tmp_path)
    else:
        assert result.data == reference


@pytest.mark.parametrize("line", [
    "lgdt [0xc0102000]", "lidt [0xc0102010]", "iret", "push ds", "pop es", "push fs", "pop gs",
    "ljmp 0x8, 0xc0100040", "push offset 0xc0100040", "mov eax, offset 0xc0101000",
])
def test_each_workaround_matches_gnu_as(line, tmp_path):
    """Each rewrite in asm.keystone_line, pinned on its own so a keystone upgrade or a broken rewrite shows here."""
    address = 0xC0100000
    ours = asm._ks_asm(asm.keystone_source(line), address)
    assert ours is not None, line
    assert ours == gas_bytes(line, address, tmp_path), line


def test_workarounds_are_needed():
    """If keystone ever encodes these right by itself, the rewrites can go: this test says so."""
    address = 0xC0100000
    assert asm._ks_asm("lgdt [0xc0102000]", address).startswith(b"\x66")
    assert asm._ks_asm("iret", address) == b"\x66\xcf"
