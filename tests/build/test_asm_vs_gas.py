"""keystone against GNU as: every piece of every architecture's kernel, assembled by both at the address the linker
chose.

The rendered source (constants and outside symbols as `.equ` lines) goes to GNU as unchanged and to keystone after
`asm.keystone_source`, the one place that works around keystone's mis-encodings. The decoded instruction streams
must match; data sections must match byte for byte.

A 64-bit kernel's `.code32` pieces (the Multiboot entry) run before paging: they are assembled as 32-bit code at
their physical address, and the labels of such pieces are physical there too (kgen/build/asm.py). GNU as gets the same
view: `--32`, `elf_i386`, and those labels' `.equ` values moved down by the kernel's virtual base.

In 64-bit code keystone encodes an absolute memory operand RIP-relative (or as a 64-bit moffs for the accumulator)
where GNU as uses the SIB absolute form: the same memory, other bytes. The decoded text names every such operand
`[address]` by the address it reaches (objdump prints a RIP-relative target in a `#` comment), so a wrong
displacement still shows as a wrong address.
"""
import re
import shutil
import subprocess

import pytest

from kgen.build import asm
from kgen.arch import ARCHES, I386
from kgen.build.pipeline import link_kernel
from kgen.build.config import Config
from kgen.errors import AssemblyError

pytestmark = pytest.mark.skipif(shutil.which("as") is None or shutil.which("objdump") is None,
                                reason="binutils (as, ld, objdump) not installed")

X86_64 = ARCHES["x86_64"]
HIGH = 0xFFFFFFFF80100000     # an x86_64 kernel address: the image's default start


def tools(arch, bits: int) -> tuple[tuple[str, ...], str, str]:
    """GNU as flags, ld emulation and objdump machine for code of `bits` in a kernel of `arch`."""
    if bits == 32:
        return I386.gas_flags, I386.ld_emulation, I386.objdump_machine
    return arch.gas_flags, arch.ld_emulation, arch.objdump_machine


def gas_bytes(source: str, address: int, tmp_path, *, arch=I386, bits: int = 32, data: bool = False) -> bytes:
    """`source` assembled and linked at `address`; with `data`, in .data, so alignment padding is zeros as in
    .bss (ld pads .text with NOPs when an alignment is larger than the piece's own start's)."""
    flags, emulation, _ = tools(arch, bits)
    src = tmp_path / "piece.s"
    obj = tmp_path / "piece.o"
    out = tmp_path / "piece.bin"
    src.write_text((".data\n" if data else "") + source + "\n")
    subprocess.run(["as", *flags, "-msyntax=intel", "-mnaked-reg", str(src), "-o", str(obj)],
                   check=True, capture_output=True, text=True)
    place = f"-Tdata={address:#x}" if data else f"-Ttext={address:#x}"
    subprocess.run(["ld", "-m", emulation, place, "-e", f"{address:#x}", "--oformat", "binary",
                    str(obj), "-o", str(out)], check=True, capture_output=True, text=True)
    return out.read_bytes()


_ACCUMULATOR_SIZE = {"rax": "QWORD", "eax": "DWORD", "ax": "WORD", "al": "BYTE"}


def absolute_operands(insn: str) -> str:
    """One spelling for an absolute memory operand: `[0xADDR]`.

    objdump shows GNU as's SIB form as `ds:0xADDR`, keystone's RIP-relative form as `[rip+0xD]  # 0xADDR` (the
    comment is the address reached) and its moffs form as `movabs eax,ds:0xADDR` (the register gives the size
    that `mov` spells out).
    """
    m = re.fullmatch(r"movabs (\w+),ds:(0x[0-9a-f]+)|movabs ds:(0x[0-9a-f]+),(\w+)", insn)
    if m and (m.group(1) or m.group(4)) in _ACCUMULATOR_SIZE:
        if m.group(1):
            insn = f"mov {m.group(1)},{_ACCUMULATOR_SIZE[m.group(1)]} PTR ds:{m.group(2)}"
        else:
            insn = f"mov {_ACCUMULATOR_SIZE[m.group(4)]} PTR ds:{m.group(3)},{m.group(4)}"
    m = re.fullmatch(r"(.*\[rip[+-]0x[0-9a-f]+\].*) # (0x[0-9a-f]+)", insn)
    if m:
        insn = re.sub(r"\[rip[+-]0x[0-9a-f]+\]", f"[{m.group(2)}]", m.group(1))
    return re.sub(r"\bds:(0x[0-9a-f]+)", r"[\1]", insn)


def decoded(data: bytes, address: int, tmp_path, machine: str = I386.objdump_machine,
            outside: frozenset = frozenset()) -> list[str]:
    """The instruction stream as text, independent of encoding lengths.

    keystone and GNU as may pick encodings of different lengths for the same instruction (`add eax, imm32` is
    `81 c0` in one and `05` in the other), which shifts every later address and the alignment padding. So padding
    (`int3`, the fill templates use) is dropped, absolute memory operands are spelled one way
    (`absolute_operands`), and every number that is the address of an instruction in the piece becomes `@n`, the
    instruction's position. The end of the piece is `@n` too (a label after the last instruction), unless it is
    one of the `outside` addresses: another piece's label that keystone's shorter encoding happens to put there
    (`jnz serve` at the end of kmain) is the same address in both streams and stays a number.
    """
    if not data:
        return []       # objdump refuses an empty file
    path = tmp_path / "decode.bin"
    path.write_bytes(data)
    text = subprocess.run(["objdump", "-D", "-b", "binary", f"-m{machine}", "-M", "intel",
                           f"--adjust-vma={address:#x}", str(path)], check=True, capture_output=True, text=True).stdout
    rows = []
    for line in text.splitlines():
        parts = line.split("\t")
        if len(parts) >= 3 and parts[0].rstrip().endswith(":"):
            insn = " ".join(parts[2].split())
            if insn != "int3":
                rows.append((int(parts[0].strip().rstrip(":"), 16), absolute_operands(insn)))
    position = {addr: i for i, (addr, _) in enumerate(rows)}
    if address + len(data) not in outside:
        position[address + len(data)] = len(rows)

    def symbolic(m):
        value = int(m.group(0), 16)
        return f"@{position[value]}" if value in position else m.group(0)

    return [re.sub(r"0x[0-9a-f]+", symbolic, insn) for _, insn in rows]


def outside_labels(kernel, piece, visible: dict[str, int]) -> frozenset:
    """Addresses of the labels (not the constants) `piece` names but does not define."""
    constants = kernel.layout.asm_constants()
    return frozenset(value for name, value in asm.outside_symbols(piece, visible).items() if name not in constants)


def visible_to(kernel, piece) -> dict[str, int]:
    """The names `piece` was assembled against: code that runs before paging sees the labels of all such code at
    their physical addresses (virtual minus the kernel's virtual base), everything else as the symbol table says."""
    visible = kernel.linked.visible
    if not piece.before_paging:
        return visible
    early = [label for r in kernel.linked.assembled if r.piece.before_paging for label in r.piece.global_labels]
    return {**visible, **{label: visible[label] - kernel.layout.kernel_virtual_base for label in early}}


KERNELS = {name: link_kernel(Config.for_arch(name)) for name in ARCHES}
# The fault variants differ in kmain only (`.if FAULT_AT_BOOT`): their pieces whose code differs are checked too.
FAULT_KERNELS = {name: link_kernel(Config.for_arch(name, fault_at_boot=True)) for name in ARCHES}
# The bitmap frame allocator (pmm.kind = "bitmap") is a unit of its own: its pieces are checked too.
BITMAP_KERNELS = {name: link_kernel(Config.for_arch(name, pmm_kind="bitmap")) for name in ARCHES}


def _code(kernel, piece) -> str:
    """The piece with the layout's constants in and its `.if` blocks decided, labels left as names."""
    return asm.keystone_source(piece.body(), kernel.layout.asm_constants(), piece.bits)


def _cases():
    for name, kernel in KERNELS.items():
        for result in kernel.linked.assembled:
            yield pytest.param(kernel, result, id=f"{name}-{result.piece.name}")
    for name, kernel in FAULT_KERNELS.items():
        usual = {r.piece.name: _code(KERNELS[name], r.piece) for r in KERNELS[name].linked.assembled}
        for result in kernel.linked.assembled:
            if usual.get(result.piece.name) != _code(kernel, result.piece):
                yield pytest.param(kernel, result, id=f"{name}-fault-{result.piece.name}")
    for name, kernel in BITMAP_KERNELS.items():
        for result in kernel.linked.assembled:
            if result.piece.unit == "pmm_bitmap":
                yield pytest.param(kernel, result, id=f"{name}-{result.piece.name}")


CASES = list(_cases())


def test_both_architectures_and_the_entry_are_covered():
    names = {case.id for case in CASES}
    assert {"i386-i386/boot.text", "x86_64-x86_64/boot.text", "x86_64-x86_64/boot.text.code32",
            "x86_64-multiboot.multiboot", "i386-fault-report.text", "x86_64-fault-report.text",
            "i386-pmm_bitmap.text", "x86_64-pmm_bitmap.text"} <= names
    assert any(r.piece.bits == 32 and r.address < KERNELS["x86_64"].layout.kernel_virtual_base
               for r in KERNELS["x86_64"].linked.assembled)


@pytest.mark.parametrize("kernel, result", CASES)
def test_keystone_matches_gnu_as(kernel, result, tmp_path):
    arch = kernel.layout.arch
    visible = visible_to(kernel, result.piece)
    reference = gas_bytes(asm.render(result.piece, visible), result.address, tmp_path, arch=arch,
                          bits=result.piece.bits, data=result.piece.section == ".bss")
    if result.piece.section == ".bss":
        assert len(reference) == len(result.data) and not any(reference)
    elif result.piece.section == ".text":
        machine, outside = tools(arch, result.piece.bits)[2], outside_labels(kernel, result.piece, visible)
        assert (decoded(result.data, result.address, tmp_path, machine, outside)
                == decoded(reference, result.address, tmp_path, machine, outside))
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


@pytest.mark.parametrize("line", [
    "mov rcx, [0xffffffff80101234]", "mov rcx, qword ptr [0xffffffff80101234]", "mov r9, [0xffffffff80101234]",
    "mov rsp, [0xffffffff80101234]", "mov r12, [0xffffffff80101234]", "mov rdx, [0x1234]",
    "push offset 0xffffffff80100040", "push offset 0x100040", "push fs", "pop gs",
])
def test_each_64bit_workaround_matches_gnu_as(line, tmp_path):
    """The rewrites of asm.keystone_line(line, 64), byte for byte against GNU as --64."""
    ours = asm._ks_asm(asm.keystone_line(line, 64), HIGH, 64)
    assert ours is not None, line
    assert ours == gas_bytes(line, HIGH, tmp_path, arch=X86_64, bits=64), line


@pytest.mark.parametrize("line", [
    "lgdt [0xffffffff80102028]", "lidt [0xffffffff80102038]", "mov rax, [0xffffffff80101234]",
    "mov eax, [0xffffffff80101234]", "mov [0xffffffff80101234], rax", "mov ebx, [0xffffffff80101234]",
    "mov dword ptr [0x100000], 0x0", "cmp rbx, qword ptr [0xffffffff80101234]", "call qword ptr [0xffffffff80101234]",
    "push qword ptr [0xffffffff80101234]", "mov al, [0xffffffff80101234]",
])
def test_64bit_absolute_operands_mean_the_same(line, tmp_path):
    """Lines keystone encodes RIP-relative or as moffs, GNU as with SIB: other bytes, the same decoded meaning."""
    ours = asm._ks_asm(asm.keystone_line(line, 64), HIGH, 64)
    assert ours is not None, line
    reference = gas_bytes(line, HIGH, tmp_path, arch=X86_64, bits=64)
    assert decoded(ours, HIGH, tmp_path, X86_64.objdump_machine) == decoded(reference, HIGH, tmp_path,
                                                                             X86_64.objdump_machine)


def test_decoding_still_sees_a_wrong_displacement(tmp_path):
    """keystone's own `mov rcx, [abs]` (a RIP-relative load of the literal displacement) must not pass for GNU
    as's: the normalised text names the address each one reaches."""
    line = "mov rcx, [0xffffffff80101234]"
    raw = asm._ks_asm(line, HIGH, 64)
    reference = gas_bytes(line, HIGH, tmp_path, arch=X86_64, bits=64)
    machine = X86_64.objdump_machine
    assert decoded(reference, HIGH, tmp_path, machine) == ["mov rcx,QWORD PTR [0xffffffff80101234]"]
    # disp32 0x80101234 is negative: the load reaches 2 GiB below the next instruction, not the address.
    assert decoded(raw, HIGH, tmp_path, machine) == [f"mov rcx,QWORD PTR [{HIGH + 7 + 0x80101234 - (1 << 32):#x}]"]


@pytest.mark.parametrize("line", ["push ds", "pop es", "push ss", "pop ds", "ljmp 0x8, 0xffffffff80100040"])
def test_64bit_refuses_what_gnu_as_refuses(line, tmp_path):
    """ds/es/ss push and pop and the direct far jump do not exist in 64-bit mode: GNU as refuses them, and kgen
    must not emit the 32-bit opcode (a #UD at run time) in their place."""
    with pytest.raises(subprocess.CalledProcessError):
        gas_bytes(line, HIGH, tmp_path, arch=X86_64, bits=64)
    assert asm._ks_asm(asm.keystone_source(line, bits=64), HIGH, 64) is None


def test_64bit_iret_is_refused(tmp_path):
    """GNU as takes a bare `iret` in 64-bit code as the 32-bit iretd, with a warning; kgen asks for iretq."""
    src = tmp_path / "iret.s"
    src.write_text("iret\n")
    result = subprocess.run(["as", *X86_64.gas_flags, "-msyntax=intel", "-mnaked-reg", str(src), "-o",
                             str(tmp_path / "iret.o")], capture_output=True, text=True)
    assert "ambiguous operand size" in result.stderr
    with pytest.raises(AssemblyError, match="iretq"):
        asm.keystone_line("iret", 64)
    assert asm._ks_asm(asm.keystone_line("iretq", 64), HIGH, 64) == gas_bytes("iretq", HIGH, tmp_path, arch=X86_64,
                                                                             bits=64)


def test_workarounds_are_needed():
    """If keystone ever encodes these right by itself, the rewrites can go: this test says so."""
    address = 0xC0100000
    assert asm._ks_asm("lgdt [0xc0102000]", address).startswith(b"\x66")
    assert asm._ks_asm("iret", address) == b"\x66\xcf"
    # 64-bit: `mov rcx, [abs]` becomes [rip + the address's low 32 bits]; `push offset X` is refused.
    assert asm._ks_asm("mov rcx, [0xffffffff80101234]", HIGH, 64) == bytes.fromhex("488b0d34121080")
    assert asm._ks_asm("push offset 0xffffffff80100040", HIGH, 64) is None
    assert asm._ks_asm("iret", HIGH, 64) == b"\x66\xcf"


@pytest.mark.parametrize("symbols", [
    {"foo": 0x10, ".Lx": 0x20, "FOO_BAR": 0x30},
    {"foo": 0x10, ".Lx": 0x20, "FOO_BAR": 0x30, "odd.name": 0x40},     # a dotted name: the alternation path
])
def test_names_become_values_only_as_whole_words_outside_strings(symbols):
    body = "\n".join(["mov eax, foo", "mov eax, [FOO_BAR + foo*4]", "jmp .Lx", "mov eax, foobar", "mov eax, x.foo",
                      "mov eax, foo$", '.ascii "foo"', "mov eax, $foo", "call FOO_BARE", "jmp .", "push \\foo"])
    lines = asm.keystone_source(body, symbols).splitlines()
    assert lines[:4] == ["mov eax, 0x10", "mov eax, [0x30 + 0x10*4]", "jmp 0x20", "mov eax, foobar"]
    assert lines[4:] == ["mov eax, x.foo", "mov eax, foo$", '.ascii "foo"', "mov eax, $foo", "call FOO_BARE", "jmp .",
                         "push \\foo"]      # a macro's parameter, not the symbol
    if "odd.name" in symbols:
        assert asm.keystone_source("push odd.name", symbols) == "push 0x40"
