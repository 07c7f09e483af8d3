"""Failure diagnosis of a 64-bit kernel, without QEMU: the long-mode `info registers` dump, the exception line with
rip=, and the one-line summaries naming RIP from a real ELF64; the i386 shapes kept exactly as they were."""
import re
import shutil
import subprocess

import pytest

from kgen.arch import hw
from kgen.guest.diagnose import explain, find_exception
from kgen.guest.elfinfo import ElfInfo
from kgen.machine.registers import parse_info_registers

# HMP `info registers` of qemu-system-x86_64 7.2 with the CPU halted in 64-bit code, written from the formats of
# target/i386/cpu-dump.c: "R8 =" with a space like the segment names, RFL, CR0 and CR4 in 8 digits, CR2/CR3, the
# segment and descriptor-table bases in 16 (the kernel's GDT and IDT in the higher half), EFER, then the FPU and
# the 16 XMM registers of long mode.
INFO_REGISTERS_LONG_MODE = (
    "\r\nCPU#0\r\n"
    "RAX=0000000000000001 RBX=0000000000010000 RCX=00000000c0000080 RDX=00000000000003f8\r\n"
    "RSI=0000000000009500 RDI=ffffffff80105000 RBP=ffffffff80108ff0 RSP=ffffffff80108fd8\r\n"
    "R8 =0000000000000008 R9 =0000000000000009 R10=000000000000000a R11=000000000000000b\r\n"
    "R12=ffff80000000000c R13=000000000000000d R14=000000000000000e R15=ffffffffffffffff\r\n"
    "RIP=ffffffff80100514 RFL=00000046 [---Z-P-] CPL=0 II=0 A20=1 SMM=0 HLT=1\r\n"
    "ES =0010 0000000000000000 ffffffff 00cf9300 DPL=0 DS   [-WA]\r\n"
    "CS =0008 0000000000000000 ffffffff 00af9b00 DPL=0 CS64 [-RA]\r\n"
    "SS =0010 0000000000000000 ffffffff 00cf9300 DPL=0 DS   [-WA]\r\n"
    "DS =0010 0000000000000000 ffffffff 00cf9300 DPL=0 DS   [-WA]\r\n"
    "FS =0000 0000000000000000 0000ffff 00009300 DPL=0 DS   [-WA]\r\n"
    "GS =0018 ffff800000001000 0000ffff 00009300 DPL=0 DS   [-WA]\r\n"
    "LDT=0000 0000000000000000 0000ffff 00008200 DPL=0 LDT\r\n"
    "TR =0028 ffffffff80104000 00000067 00008b00 DPL=0 TSS64-busy\r\n"
    "GDT=     ffffffff80102000 00000027\r\n"
    "IDT=     ffffffff80103000 00000fff\r\n"
    "CR0=80010011 CR2=0000000000100000 CR3=0000000000104000 CR4=000000a0\r\n"
    "DR0=0000000000000000 DR1=0000000000000000 DR2=0000000000000000 DR3=0000000000000000 \r\n"
    "DR6=00000000ffff0ff0 DR7=0000000000000400\r\n"
    "EFER=0000000000000d00\r\n"
    "FCW=037f FSW=0000 [ST=0] FTW=00 MXCSR=00001f80\r\n"
    + "".join(f"FPR{i}=0000000000000000 0000 FPR{i + 1}=0000000000000000 0000\r\n" for i in range(0, 8, 2))
    + "".join(f"XMM{i:02d}=0000000000000000 0000000000000000 XMM{i + 1:02d}=0000000000000000 0000000000000000\r\n"
              for i in range(0, 16, 2))
)

# The same CPU in 32-bit protected mode (qemu-system-i386 7.2), trimmed after EFER.
INFO_REGISTERS_I386 = (
    "\r\nCPU#0\r\n"
    "EAX=80000060 EBX=00009500 ECX=00000000 EDX=000102fd\r\n"
    "ESI=001000a9 EDI=5eed1234 EBP=00000000 ESP=00080000\r\n"
    "EIP=0010007d EFL=00000046 [---Z-P-] CPL=0 II=0 A20=1 SMM=0 HLT=1\r\n"
    "ES =0010 00000000 ffffffff 00cf9300 DPL=0 DS   [-WA]\r\n"
    "CS =0008 00000000 ffffffff 00cf9a00 DPL=0 CS32 [-R-]\r\n"
    "SS =0010 00000000 ffffffff 00cf9300 DPL=0 DS   [-WA]\r\n"
    "DS =0010 00000000 ffffffff 00cf9300 DPL=0 DS   [-WA]\r\n"
    "FS =0010 00000000 ffffffff 00cf9300 DPL=0 DS   [-WA]\r\n"
    "GS =0010 00000000 ffffffff 00cf9300 DPL=0 DS   [-WA]\r\n"
    "LDT=0000 00000000 0000ffff 00008200 DPL=0 LDT\r\n"
    "TR =0000 00000000 0000ffff 00008b00 DPL=0 TSS32-busy\r\n"
    "GDT=     000ca2b8 00000027\r\n"
    "IDT=     00000000 000003ff\r\n"
    "CR0=80000011 CR2=d0000000 CR3=00300000 CR4=00000010\r\n"
    "DR0=00000000 DR1=00000000 DR2=00000000 DR3=00000000 \r\n"
    "DR6=ffff0ff0 DR7=00000400\r\n"
    "EFER=0000000000000000\r\n"
)

LINE64 = ("kgen: exception vector=0x000000000000000e error=0x0000000000000002 rip=0xffffffff80100514 "
          "cr2=0x0000000000100000 rax=0x0000000000000001 rbx=0x0000000000010000 rcx=0x00000000c0000080 "
          "rdx=0x00000000000003f8 rsi=0x0000000000009500 rdi=0xffffffff80105000 rbp=0xffffffff80108ff0 "
          "rsp=0xffffffff80108fd8 r8=0x0000000000000008 r9=0x0000000000000009 r10=0x000000000000000a "
          "r11=0x000000000000000b r12=0xffff80000000000c r13=0x000000000000000d r14=0x000000000000000e "
          "r15=0xffffffffffffffff cs=0x0000000000000008 rflags=0x0000000000010046")
LINE32 = ("kgen: exception vector=0x0000000e error=0x00000002 eip=0x0010007d cr2=0xd0000000 eax=0x80000060 "
          "ebx=0x00009500 ecx=0x00000000 edx=0x000102fd esi=0x001000a9 edi=0x5eed1234 ebp=0x00000000 "
          "esp=0x00080000 cs=0x00000008 eflags=0x00010046")

KERNEL64 = """
.intel_syntax noprefix
.section .text
.globl _start
_start:
    .skip 0x500, 0x90
.globl kmain
.type kmain, @function
kmain:
    .skip 0x20, 0x90
    hlt
.size kmain, .-kmain
"""
# Linked to run in the top 2 GiB and to be loaded at 1 MiB, as a higher-half x86-64 kernel is.
KERNEL64_LD = "SECTIONS { . = 0xffffffff80100000; .text : AT(0x100000) { *(.text) } }"

KERNEL32 = """
.intel_syntax noprefix
.section .text
.globl _start
_start:
    .skip 0x70, 0x90
.globl kmain
.type kmain, @function
kmain:
    .skip 0x20, 0x90
    hlt
.size kmain, .-kmain
"""


@pytest.fixture(scope="module")
def elfs(tmp_path_factory) -> dict[str, ElfInfo]:
    if shutil.which("as") is None or shutil.which("ld") is None:
        pytest.skip("GNU as/ld not installed (Debian package binutils)")
    out = tmp_path_factory.mktemp("elf64")
    (out / "k64.s").write_text(KERNEL64)
    (out / "k64.ld").write_text(KERNEL64_LD)
    (out / "k32.s").write_text(KERNEL32)
    subprocess.run(["as", "--64", "-o", out / "k64.o", out / "k64.s"], check=True)
    subprocess.run(["ld", "-m", "elf_x86_64", "-T", out / "k64.ld", "-o", out / "k64.elf", out / "k64.o"], check=True)
    subprocess.run(["as", "--32", "-o", out / "k32.o", out / "k32.s"], check=True)
    subprocess.run(["ld", "-m", "elf_i386", "-Ttext", "0x100000", "-o", out / "k32.elf", out / "k32.o"], check=True)
    return {"64": ElfInfo.load(out / "k64.elf"), "32": ElfInfo.load(out / "k32.elf")}


# --- registers -----------------------------------------------------------------------------------------------------

def test_parse_long_mode_info_registers():
    regs = parse_info_registers(INFO_REGISTERS_LONG_MODE)
    assert regs.long_mode
    assert (regs.eax, regs.ebx, regs.ecx, regs.edx) == (1, 0x10000, 0xC0000080, 0x3F8)
    assert (regs.esi, regs.edi, regs.ebp, regs.esp) == (0x9500, 0xFFFFFFFF80105000, 0xFFFFFFFF80108FF0,
                                                        0xFFFFFFFF80108FD8)
    assert (regs.r8, regs.r9, regs.r10, regs.r11) == (8, 9, 10, 11)
    assert (regs.r12, regs.r13, regs.r14, regs.r15) == (0xFFFF80000000000C, 13, 14, 0xFFFFFFFFFFFFFFFF)
    assert (regs.eip, regs.eflags) == (0xFFFFFFFF80100514, 0x46)
    assert (regs.cr0, regs.cr2, regs.cr3, regs.cr4) == (0x80010011, 0x100000, 0x104000, 0xA0)
    assert regs.efer == hw.EFER_LME | hw.EFER_LMA | hw.EFER_NXE
    assert (regs.cs, regs.ds, regs.es, regs.fs, regs.gs, regs.ss) == (8, 0x10, 0x10, 0, 0x18, 0x10)
    assert (regs.gdtr_base, regs.gdtr_limit) == (0xFFFFFFFF80102000, 0x27)
    assert (regs.idtr_base, regs.idtr_limit) == (0xFFFFFFFF80103000, 0xFFF)
    assert (regs.cpl, regs.halted) == (0, True)


def test_parse_i386_info_registers_has_no_r8_to_r15():
    regs = parse_info_registers(INFO_REGISTERS_I386)
    assert not regs.long_mode
    assert (regs.eip, regs.esp, regs.cr2, regs.gdtr_base) == (0x10007D, 0x80000, 0xD0000000, 0xCA2B8)
    assert [getattr(regs, f"r{n}") for n in range(8, 16)] == [None] * 8


def test_a_long_mode_dump_without_r8_is_refused():
    with pytest.raises(ValueError, match="no R8="):
        parse_info_registers(INFO_REGISTERS_LONG_MODE.replace("R8 =", "R8:="))


# --- the kernel's exception line -------------------------------------------------------------------------------------

def test_the_64_bit_exception_line():
    fault = find_exception(f"kgen: boot ok\r\n{LINE64}\r\nkgen: after\r\n")
    assert fault is not None and fault.long_mode
    assert (fault.vector, fault.ip, fault.fields["cr2"]) == (14, 0xFFFFFFFF80100514, 0x100000)
    assert fault.fields["error"] == hw.PF_W
    assert [fault.fields[f"r{n}"] for n in range(8, 16)] == [8, 9, 10, 11, 0xFFFF80000000000C, 13, 14, (1 << 64) - 1]
    assert (fault.fields["rflags"], fault.fields["rsp"]) == (0x10046, 0xFFFFFFFF80108FD8)
    assert fault.describe() == ("#PF page fault (vector 14) error=0x2 [page not present, write, supervisor] "
                                "CR2=0x0000000000100000 RIP=0xffffffff80100514")


def test_the_i386_exception_line_is_described_as_before():
    fault = find_exception(LINE32 + "\n")
    assert not fault.long_mode and fault.ip == fault.fields["eip"] == 0x10007D
    assert fault.describe() == ("#PF page fault (vector 14) error=0x2 [page not present, write, supervisor] "
                                "CR2=0xd0000000 EIP=0x0010007d")


def test_a_64_bit_exception_other_than_a_page_fault():
    line = LINE64.replace("vector=0x000000000000000e error=0x0000000000000002",
                          "vector=0x000000000000000d error=0x0000000000000010")
    assert find_exception(line).describe() == "#GP general protection (vector 13) error=0x10 RIP=0xffffffff80100514"


def test_upper_case_hex_is_read_too():
    fault = find_exception(LINE64.replace("0xffffffff80100514", "0xFFFFFFFF80100514"))
    assert fault.ip == 0xFFFFFFFF80100514 and "rflags" in fault.fields


def test_rip_is_named_from_an_elf64(elfs):
    elf = elfs["64"]
    assert elf.bits == 64 and elf.symbols["kmain"].value == 0xFFFFFFFF80100500
    assert find_exception(LINE64).describe(elf).endswith(" RIP=0xffffffff80100514 <kmain+0x14>")
    # Before the jump to the higher half, the CPU runs the same code at its load address.
    low = find_exception(LINE64.replace("rip=0xffffffff80100514", "rip=0x0000000000100514"))
    assert low.describe(elf).endswith(" RIP=0x0000000000100514 <kmain+0x14, at its physical address>")
    outside = find_exception(LINE64.replace("rip=0xffffffff80100514", "rip=0x0000000000200000"))
    assert outside.describe(elf).endswith(" RIP=0x0000000000200000")


def test_rip_has_16_digits_even_from_an_elf32(elfs):
    low = find_exception(LINE64.replace("rip=0xffffffff80100514", "rip=0x0000000000100075"))
    assert low.describe(elfs["32"]).endswith(" RIP=0x0000000000100075 <kmain+0x5>")


def test_eip_is_named_as_before(elfs):
    assert find_exception(LINE32).describe(elfs["32"]).endswith(" CR2=0xd0000000 EIP=0x0010007d <kmain+0xd>")


# --- hangs and triple faults: the CPU read back from QEMU ------------------------------------------------------------

class StoppedMachine:
    """What `explain` asks of a Machine, answered from a register dump."""

    def __init__(self, dump: str, state: str, serial: str = "kgen: hello\r\n", reset: bool = False):
        self.serial = serial
        self.state = state
        self.dump = dump
        self.events = [{"event": "SHUTDOWN", "data": {"reason": "guest-reset"}}] if reset else []

    def status(self):
        return self.state

    def stop(self):
        self.state = "paused"

    def registers(self):
        return parse_info_registers(self.dump)


TRIPLE = "triple fault (vector unknown: the CPU reset instead of reporting it): "


def test_a_long_mode_triple_fault_names_rip(elfs):
    machine = StoppedMachine(INFO_REGISTERS_LONG_MODE, "shutdown", reset=True)
    failure = explain(machine, elfs["64"], "wait: 'x' did not appear")
    assert failure.kind == "triple fault"
    assert failure.summary == f"{TRIPLE}RIP=0xffffffff80100514 <kmain+0x14> CR2=0x0000000000100000"
    assert ("registers: RIP=0xffffffff80100514 CS=0x0008 CPL=0 RSP=0xffffffff80108fd8 RFLAGS=0x00000046 CR0=0x80010011 "
            "CR2=0x0000000000100000 CR3=0x0000000000104000 CR4=0x000000a0 EFER=0x0000000000000d00 halted=True"
            ) in failure.details


def test_a_long_mode_hang_names_rip(elfs):
    machine = StoppedMachine(INFO_REGISTERS_LONG_MODE, "running")
    failure = explain(machine, elfs["64"], "call kmain: no reply within 0.5 s")
    assert failure.kind == "hang" and machine.state == "paused"
    assert failure.summary == ("hang: call kmain: no reply within 0.5 s; "
                               "CPU halted at RIP=0xffffffff80100514 <kmain+0x14>")
    assert "kgen: hello" in failure.details
    assert explain(StoppedMachine(INFO_REGISTERS_LONG_MODE, "running"), None, "t").summary.endswith(
        "CPU halted at RIP=0xffffffff80100514")


def test_a_64_bit_exception_line_wins_over_the_registers(elfs):
    machine = StoppedMachine(INFO_REGISTERS_LONG_MODE, "running", serial=LINE64 + "\r\n")
    failure = explain(machine, elfs["64"], "exit status 3")
    assert failure.kind == "exception"
    assert re.fullmatch(r"kernel exception: #PF page fault \(vector 14\) .* CR2=0x0{10}100000 "
                        r"RIP=0xffffffff80100514 <kmain\+0x14>", failure.summary), failure.summary


def test_an_i386_triple_fault_and_hang_read_as_before(elfs):
    failure = explain(StoppedMachine(INFO_REGISTERS_I386, "shutdown", reset=True), elfs["32"], "w")
    assert failure.summary == f"{TRIPLE}EIP=0x0010007d <kmain+0xd> CR2=0xd0000000"
    assert ("registers: EIP=0x0010007d CS=0x0008 CPL=0 ESP=0x00080000 EFLAGS=0x00000046 CR0=0x80000011 CR2=0xd0000000 "
            "CR3=0x00300000 CR4=0x00000010 halted=True") in failure.details
    failure = explain(StoppedMachine(INFO_REGISTERS_I386, "running"), elfs["32"], "wait: nothing")
    assert failure.summary == "hang: wait: nothing; CPU halted at EIP=0x0010007d <kmain+0xd>"
