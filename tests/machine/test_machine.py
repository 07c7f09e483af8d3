"""kgen.machine against a real QEMU, with a tiny Multiboot kernel assembled here by GNU as + ld."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from kgen import protocol
from kgen.arch import hw
from kgen.errors import MachineError, ToolMissing
from kgen.machine import MIB, Machine, RamWindow, fill_file, kvm_usable_for, parse_ram_windows
from kgen.machine.kvm import PROBE_WALL_FACTOR
from kgen.machine.registers import parse_info_registers

needs_qemu = pytest.mark.skipif(shutil.which("qemu-system-i386") is None,
                                reason="qemu-system-i386 not installed (Debian package qemu-system-x86)")


def vm(test):
    return pytest.mark.vm(needs_qemu(test))


KNOWN_ADDR = 0x200000
KNOWN_VALUE = 0xC0FFEE42
KNOWN_EDI = 0x5EED1234
EXIT_VALUE = 0x21
PAGE_DIR = 0x300000
BOOT_TIMEOUT = 10.0
READY = "ready\n"  # the whole line: wait_for returns as soon as its marker is in, the newline may still be coming

# VARIANT 0: print, store, load EDI, isa-debug-exit, halt.
# VARIANT 1: print, store, 4 MiB-page paging (identity 0-8 MiB, 0xC0000000 -> 0), "ready", then echo COM2 forever.
# VARIANT 2: print, then fault with an empty IDT: a triple fault.
KERNEL_SOURCE = r"""
.set MB_MAGIC, 0x1BADB002
.set MB_FLAGS, 0x3
.set COM1, 0x3F8
.set COM2, 0x2F8
.text
.globl _start
.align 4
    .long MB_MAGIC, MB_FLAGS, -(MB_MAGIC + MB_FLAGS)
_start:
    cli
    mov $0x80000, %esp
    mov $hello, %esi
    call puts
    movl $KNOWN_VALUE, KNOWN_ADDR
.if VARIANT == 0
    mov $KNOWN_EDI, %edi
    mov $EXIT_VALUE, %eax
    mov $DEBUG_EXIT_PORT, %dx
    outl %eax, %dx
halt:
    hlt
    jmp halt
.elseif VARIANT == 1
    mov $PAGE_DIR, %edi
    xor %eax, %eax
    mov $1024, %ecx
    rep stosl                           /* RAM may be poisoned: clear every entry first */
    movl $0x00000083, PAGE_DIR          /* P|RW|PS: 0-4 MiB */
    movl $0x00400083, PAGE_DIR + 4      /* 4-8 MiB */
    movl $0x00000083, PAGE_DIR + 768*4  /* 0xC0000000 -> 0 */
    mov %cr4, %eax
    or $0x10, %eax                      /* CR4.PSE */
    mov %eax, %cr4
    mov $PAGE_DIR, %eax
    mov %eax, %cr3
    mov %cr0, %eax
    or $0x80000000, %eax
    mov %eax, %cr0
    mov $KNOWN_EDI, %edi                /* before "ready": the host stops us once it sees the line */
    mov $ready, %esi
    call puts
.globl echo_loop
echo_loop:
    mov $COM2 + 5, %dx
    in %dx, %al
    test $1, %al                        /* LSR.DR: a byte came from the host */
    jz echo_loop
    mov $COM2, %dx
    in %dx, %al
    out %al, %dx
    jmp echo_loop
.globl echo_end
echo_end:
.else
    lidt null_idtr
    ud2
.endif
puts:
    lodsb
    test %al, %al
    jz 1f
    mov $COM1, %dx
    out %al, %dx
    jmp puts
1:  ret
null_idtr: .word 0
           .long 0
hello: .asciz "hello\n"
ready: .asciz "ready\n"
"""

# `info registers` exactly as QMP human-monitor-command returned it: QEMU 7.2, VARIANT 1 stopped in echo_loop.
INFO_REGISTERS_I386 = (
    '\r\nCPU#0\r\nEAX=80000060 EBX=00009500 ECX=00000000 EDX=000102fd\r\nESI=001000a9 EDI=5eed1234 EBP=00000000 '
    'ESP=00080000\r\nEIP=0010007d EFL=00000046 [---Z-P-] CPL=0 II=0 A20=1 SMM=0 HLT=0\r\nES =0010 00000000 '
    'ffffffff 00cf9300 DPL=0 DS   [-WA]\r\nCS =0008 00000000 ffffffff 00cf9a00 DPL=0 CS32 [-R-]\r\nSS =0010 '
    '00000000 ffffffff 00cf9300 DPL=0 DS   [-WA]\r\nDS =0010 00000000 ffffffff 00cf9300 DPL=0 DS   [-WA]\r\n'
    'FS =0010 00000000 ffffffff 00cf9300 DPL=0 DS   [-WA]\r\nGS =0010 00000000 ffffffff 00cf9300 DPL=0 DS   '
    '[-WA]\r\nLDT=0000 00000000 0000ffff 00008200 DPL=0 LDT\r\nTR =0000 00000000 0000ffff 00008b00 DPL=0 '
    'TSS32-busy\r\nGDT=     000ca2b8 00000027\r\nIDT=     00000000 000003ff\r\nCR0=80000011 CR2=00000000 '
    'CR3=00300000 CR4=00000010\r\nDR0=00000000 DR1=00000000 DR2=00000000 DR3=00000000 \r\nDR6=ffff0ff0 '
    'DR7=00000400\r\nEFER=0000000000000000\r\nFCW=037f FSW=0000 [ST=0] FTW=00 MXCSR=00001f80\r\n'
    'FPR0=0000000000000000 0000 FPR1=0000000000000000 0000\r\nFPR2=0000000000000000 0000 FPR3=0000000000000000 '
    '0000\r\nFPR4=0000000000000000 0000 FPR5=0000000000000000 0000\r\nFPR6=0000000000000000 0000 '
    'FPR7=0000000000000000 0000\r\nXMM00=0000000000000000 0000000000000000 XMM01=0000000000000000 '
    '0000000000000000\r\nXMM02=0000000000000000 0000000000000000 XMM03=0000000000000000 0000000000000000\r\n'
    'XMM04=0000000000000000 0000000000000000 XMM05=0000000000000000 0000000000000000\r\nXMM06=0000000000000000 '
    '0000000000000000 XMM07=0000000000000000 0000000000000000\r\n'
)

# The same from qemu-system-x86_64 7.2 with a small kernel stopped in long mode (RAX= names, 64-bit bases).
INFO_REGISTERS_X86_64 = (
    '\r\nCPU#0\r\nRAX=112233445566770a RBX=0000000000009500 RCX=00000000c0000080 RDX=00000000000003f8\r\n'
    'RSI=0000000000000000 RDI=0000000000403000 RBP=0000000000000000 RSP=0000000000080000\r\nR8 =0000000000000000 '
    'R9 =0000000000000000 R10=0000000000000000 R11=0000000000000000\r\nR12=00000000feedface R13=0000000000000000 '
    'R14=0000000000000000 R15=0000000000000000\r\nRIP=00000000001000ac RFL=00000086 [--S--P-] CPL=0 II=0 A20=1 '
    'SMM=0 HLT=0\r\nES =0010 0000000000000000 ffffffff 00cf9300 DPL=0 DS   [-WA]\r\nCS =0008 0000000000000000 '
    '00000000 00209a00 DPL=0 CS64 [-R-]\r\nSS =0010 0000000000000000 00000000 00009300 DPL=0 DS   [-WA]\r\n'
    'DS =0010 0000000000000000 00000000 00009300 DPL=0 DS   [-WA]\r\nFS =0010 0000000000000000 ffffffff 00cf9300 '
    'DPL=0 DS   [-WA]\r\nGS =0010 0000000000000000 ffffffff 00cf9300 DPL=0 DS   [-WA]\r\nLDT=0000 '
    '0000000000000000 0000ffff 00008200 DPL=0 LDT\r\nTR =0000 0000000000000000 0000ffff 00008b00 DPL=0 '
    'TSS64-busy\r\nGDT=     00000000001000b0 00000017\r\nIDT=     0000000000000000 000003ff\r\nCR0=80000011 '
    'CR2=0000000000000000 CR3=0000000000400000 CR4=00000020\r\nDR0=0000000000000000 DR1=0000000000000000 '
    'DR2=0000000000000000 DR3=0000000000000000 \r\nDR6=00000000ffff0ff0 DR7=0000000000000400\r\n'
    'EFER=0000000000000500\r\nFCW=037f FSW=0000 [ST=0] FTW=00 MXCSR=00001f80\r\n'
)

# HMP `info mtree -f`, the system address space of `-m 4096` on qemu-system-i386 7.2 (trimmed to its RAM lines).
MTREE_4G = """\
FlatView #2
 AS "memory", root: system
 AS "cpu-memory-0", root: system
 Root memory region: system
  0000000000000000-000000000009ffff (prio 0, ram): ram
  00000000000a0000-00000000000bffff (prio 1, i/o): vga-lowmem
  00000000000c0000-00000000000cafff (prio 0, rom): ram @00000000000c0000
  00000000000cb000-00000000000cdfff (prio 0, ram): ram @00000000000cb000
  0000000000100000-00000000bfffffff (prio 0, ram): ram @0000000000100000
  00000000fd000000-00000000fdffffff (prio 1, ram): vga.vram
  00000000fffc0000-00000000ffffffff (prio 0, rom): pc.bios
  0000000100000000-000000013fffffff (prio 0, ram): ram @00000000c0000000
FlatView #3
 AS "I/O", root: io
 Root memory region: io
  0000000000000000-0000000000000007 (prio 0, i/o): dma-chan
"""


@pytest.fixture(scope="session")
def kernels(tmp_path_factory) -> dict[str, Path]:
    """The three kernel variants as ELF files, plus `echo_loop`/`echo_end` addresses of the spinning one."""
    if shutil.which("as") is None or shutil.which("ld") is None:
        pytest.skip("GNU as/ld not installed (Debian package binutils)")
    out = tmp_path_factory.mktemp("kernels")
    (out / "kernel.S").write_text(KERNEL_SOURCE)
    symbols = {"KNOWN_ADDR": KNOWN_ADDR, "KNOWN_VALUE": KNOWN_VALUE, "KNOWN_EDI": KNOWN_EDI,
               "EXIT_VALUE": EXIT_VALUE, "PAGE_DIR": PAGE_DIR, "DEBUG_EXIT_PORT": protocol.DEBUG_EXIT_PORT}
    built = {}
    for variant, name in enumerate(("exit", "spin", "triple")):
        defsyms = [arg for sym, value in {**symbols, "VARIANT": variant}.items()
                   for arg in ("--defsym", f"{sym}={value:#x}")]
        obj, elf = out / f"{name}.o", out / f"{name}.elf"
        subprocess.run(["as", "--32", *defsyms, "-o", obj, out / "kernel.S"], check=True)
        subprocess.run(["ld", "-m", "elf_i386", "-Ttext", "0x100000", "-o", elf, obj], check=True)
        built[name] = elf
    nm = subprocess.run(["nm", built["spin"]], check=True, capture_output=True, text=True).stdout
    addresses = {line.split()[2]: int(line.split()[0], 16) for line in nm.splitlines()}
    built["echo_loop"], built["echo_end"] = addresses["echo_loop"], addresses["echo_end"]
    return built


def qemu_processes_mentioning(path: Path) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and str(path).encode() in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
        except OSError:
            pass  # exited while we looked
    return pids


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie left to a container's non-reaping init is dead too


def assert_cleaned_up(machine: Machine) -> None:
    assert not machine.tmpdir.exists()
    assert qemu_processes_mentioning(machine.tmpdir) == []
    assert not Path(f"/proc/{machine.pid}").exists()  # reaped, not a zombie


# --- registers parser (no QEMU needed) ------------------------------------------------------------------------------

def test_parse_info_registers_i386():
    regs = parse_info_registers(INFO_REGISTERS_I386)
    assert (regs.eax, regs.ebx, regs.edx, regs.esi, regs.edi) == (0x80000060, 0x9500, 0x102FD, 0x1000A9, KNOWN_EDI)
    assert (regs.esp, regs.ebp, regs.eip, regs.eflags) == (0x80000, 0, 0x10007D, 0x46)
    assert (regs.cr0, regs.cr2, regs.cr3, regs.cr4) == (0x80000011, 0, PAGE_DIR, 0x10)
    assert (regs.cs, regs.ds, regs.es, regs.fs, regs.gs, regs.ss) == (8, 0x10, 0x10, 0x10, 0x10, 0x10)
    assert (regs.gdtr_base, regs.gdtr_limit, regs.idtr_base, regs.idtr_limit) == (0xCA2B8, 0x27, 0, 0x3FF)
    assert (regs.cpl, regs.halted, regs.efer, regs.long_mode) == (0, False, 0, False)


def test_parse_info_registers_x86_64_long_mode():
    regs = parse_info_registers(INFO_REGISTERS_X86_64)
    assert regs.long_mode
    assert regs.eax == 0x112233445566770A  # RAX, full width
    assert (regs.eip, regs.eflags, regs.cr3, regs.efer) == (0x1000AC, 0x86, 0x400000, 0x500)
    assert (regs.cs, regs.ss, regs.gdtr_base, regs.gdtr_limit) == (8, 0x10, 0x1000B0, 0x17)


def test_parse_info_registers_rejects_other_text():
    with pytest.raises(ValueError, match="EAX"):
        parse_info_registers("unknown command: 'info regs'\r\n")


def test_parse_info_registers_reads_first_cpu_only():
    second = INFO_REGISTERS_I386.replace("CPU#0", "CPU#1").replace("EIP=0010007d", "EIP=deadbeef")
    assert parse_info_registers(INFO_REGISTERS_I386 + second).eip == 0x10007D


# --- RAM layout and poison file (no QEMU needed) --------------------------------------------------------------------

def test_ram_windows_above_4g_start_at_below_4g_size_and_skip_legacy_hole():
    assert parse_ram_windows(MTREE_4G, "ram") == [
        RamWindow(0, 0xA0000, 0),
        RamWindow(0x100000, 0xC0000000, 0x100000),
        RamWindow(0x100000000, 0x140000000, 0xC0000000),
    ]


def test_fill_file_tiles_the_pattern_or_leaves_zeros(tmp_path):
    fill_file(tmp_path / "p", 3 * MIB, b"\xde\xad\xbe\xef")
    data = (tmp_path / "p").read_bytes()
    assert len(data) == 3 * MIB and data == b"\xde\xad\xbe\xef" * (3 * MIB // 4)
    fill_file(tmp_path / "z", 2 * MIB, None)
    assert (tmp_path / "z").read_bytes() == bytes(2 * MIB)


@pytest.mark.parametrize("kwargs, message", [
    ({}, "exactly one"),
    ({"kernel": "k", "iso": "i"}, "exactly one"),
    ({"iso": "i", "append": "x"}, "append"),
    ({"kernel": "k", "accel": "kvm", "icount": True}, "icount"),
    ({"kernel": "k", "poison": 0x1A5}, "byte"),
    ({"kernel": "k", "poison": b"abc"}, "1, 2, 4 or 8"),
    ({"kernel": "k", "poison": 0xA5, "ram_file": False}, "ram_file"),
])
def test_bad_arguments_are_refused_before_launch(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Machine(**kwargs)


def test_missing_qemu_is_tool_missing_naming_the_package(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ToolMissing) as err:
        Machine(kernel=tmp_path / "k.elf").launch()
    assert str(err.value) == "qemu-system-i386 not found: install the Debian package qemu-system-x86"
    assert err.value.exit_code == 3


# --- booting ------------------------------------------------------------------------------------------------------

@vm
def test_boots_prints_hello_and_exits_with_debug_exit_status(kernels):
    with Machine(kernel=kernels["exit"]) as machine:
        assert machine.wait_for("hello\n", BOOT_TIMEOUT).startswith("hello\n")
        assert machine.wait_exit(BOOT_TIMEOUT) == (EXIT_VALUE << 1) | 1
        assert machine.status() == "exited"
        # The RAM file outlives QEMU until shutdown: post-mortem reads work.
        assert int.from_bytes(machine.read_phys(KNOWN_ADDR, 4), "little") == KNOWN_VALUE
    assert_cleaned_up(machine)


@vm
def test_registers_of_the_stopped_guest(kernels):
    with Machine(kernel=kernels["spin"]) as machine:
        machine.wait_for(READY, BOOT_TIMEOUT)
        # On a loaded host the vCPU can still be returning from puts when the line arrives: let it run on.
        deadline = time.monotonic() + BOOT_TIMEOUT
        while True:
            machine.stop()
            assert machine.status() == "paused"
            regs = machine.registers()
            if kernels["echo_loop"] <= regs.eip < kernels["echo_end"] or time.monotonic() > deadline:
                break
            machine.cont()
            time.sleep(0.01)
        assert kernels["echo_loop"] <= regs.eip < kernels["echo_end"]
        assert regs.edi == KNOWN_EDI
        assert regs.cr0 & hw.CR0_PE and regs.cr0 & hw.CR0_PG
        assert regs.cr3 == PAGE_DIR and regs.cr4 & hw.CR4_PSE
        assert regs.cs == 0x08 and regs.cpl == 0
        machine.cont()
        assert machine.status() == "running"


@vm
def test_read_phys_through_the_mapping_equals_pmemsave(kernels):
    with Machine(kernel=kernels["spin"]) as machine:
        machine.wait_for(READY, BOOT_TIMEOUT)
        machine.stop()
        known = machine.read_phys(KNOWN_ADDR, 4)
        assert int.from_bytes(known, "little") == KNOWN_VALUE
        assert known == machine.pmemsave(KNOWN_ADDR, 4)
        assert machine.read_phys(0x100000, 64 * 1024) == machine.pmemsave(0x100000, 64 * 1024)
        assert machine.read_phys(0, 0x1000) == machine.pmemsave(0, 0x1000)  # the real-mode IVT, written by BIOS
        # The legacy window is never read from the file; it goes through pmemsave (BIOS shadow here).
        assert machine.read_phys(0xF0000, 0x100) == machine.pmemsave(0xF0000, 0x100)
        machine.write_phys(KNOWN_ADDR, b"\x11\x22\x33\x44")
        assert machine.pmemsave(KNOWN_ADDR, 4) == b"\x11\x22\x33\x44"
        with pytest.raises(MachineError) as err:
            machine.write_phys(0xB8000, b"x")
        assert err.value.step == "write"


@vm
@pytest.mark.parametrize("poison, expected", [
    (None, b"\x00\x00\x00\x00"),
    (0xA5, b"\xa5\xa5\xa5\xa5"),
    (b"\xde\xad\xbe\xef", b"\xde\xad\xbe\xef"),
])
def test_poisoned_ram_shows_the_pattern_where_nothing_wrote(kernels, poison, expected):
    with Machine(kernel=kernels["spin"], poison=poison) as machine:
        machine.wait_for(READY, BOOT_TIMEOUT)
        machine.stop()
        untouched = machine.read_phys(0x1000000, MIB)
        assert untouched == expected * (MIB // 4)
        if poison is not None:
            assert b"\x00" not in untouched
        assert machine.pmemsave(0x1000000, 4096) == untouched[:4096]  # what the guest sees, not only the file
        # The kernel cleared its page directory, so unused entries are zero whatever the poison.
        assert machine.read_phys(PAGE_DIR + 8, 4) == bytes(4)


@vm
def test_gva2gpa_identity_higher_half_and_unmapped(kernels):
    with Machine(kernel=kernels["spin"]) as machine:
        machine.wait_for(READY, BOOT_TIMEOUT)
        machine.stop()
        assert machine.gva2gpa(KNOWN_ADDR) == KNOWN_ADDR
        assert machine.gva2gpa(0xC0000000 + KNOWN_ADDR + 0x123) == KNOWN_ADDR + 0x123
        assert machine.gva2gpa(0x40000000) is None
        assert "c0000000" in machine.info_tlb()


@vm
def test_com2_is_a_byte_channel_to_the_guest(kernels):
    with Machine(kernel=kernels["spin"]) as machine:
        machine.wait_for(READY, BOOT_TIMEOUT)
        machine.com2.settimeout(BOOT_TIMEOUT)
        machine.com2.sendall(b"ping")
        echoed = b""
        while len(echoed) < 4:
            echoed += machine.com2.recv(4 - len(echoed))
        assert echoed == b"ping"
        assert machine.com2.family == socket.AF_UNIX


@vm
def test_echo_serial_streams_com1_to_stdout(kernels, capsys):
    with Machine(kernel=kernels["spin"], echo_serial=True) as machine:
        machine.wait_for(READY, BOOT_TIMEOUT)
    assert "hello\nready\n" in capsys.readouterr().out


@vm
def test_icount_boot(kernels):
    with Machine(kernel=kernels["spin"], icount=True) as machine:
        assert "-icount" in machine.command
        machine.wait_for(READY, BOOT_TIMEOUT)


@vm
def test_ram_above_4g_is_mapped_at_below_4g_offset(kernels):
    # The RAM file is sparse, so 4 GiB costs nothing until touched.
    with Machine(kernel=kernels["spin"], memory_mib=4096) as machine:
        machine.wait_for(READY, BOOT_TIMEOUT)
        machine.stop()
        assert machine.ram_windows[-1] == RamWindow(0x100000000, 0x140000000, 0xC0000000)
        machine.write_phys(0x100000000, b"above4g!")
        machine.write_phys(0xBFFFFFF8, b"below4g!")
        assert machine.pmemsave(0x100000000, 8) == b"above4g!"
        assert machine.pmemsave(0xBFFFFFF8, 8) == b"below4g!"


# --- failures and cleanup -----------------------------------------------------------------------------------------

@vm
def test_shutdown_leaves_no_process_and_no_directory(kernels):
    machine = Machine(kernel=kernels["spin"]).launch()
    machine.wait_for(READY, BOOT_TIMEOUT)
    assert qemu_processes_mentioning(machine.tmpdir) == [machine.pid]
    machine.shutdown()
    assert_cleaned_up(machine)
    machine.shutdown()  # idempotent


@vm
def test_timeout_is_a_wait_error_with_the_serial_tail_and_leaves_qemu_inspectable(kernels):
    with Machine(kernel=kernels["spin"]) as machine:
        machine.wait_for(READY, BOOT_TIMEOUT)
        started = time.monotonic()
        with pytest.raises(MachineError) as err:
            machine.wait_for("never printed", 0.5)
        assert time.monotonic() - started < 2.0
        assert err.value.step == "wait" and str(err.value).startswith("wait: ")
        assert "\n" not in str(err.value)
        assert "hello\nready" in err.value.serial_tail and "ready" in err.value.details()
        assert err.value.qemu_status is None and "-kernel" in err.value.command
        assert machine.status() == "running"
        assert machine.registers().edi == KNOWN_EDI
    assert_cleaned_up(machine)


@vm
def test_triple_fault_fails_the_wait_at_once_and_keeps_the_cpu_state(kernels):
    with Machine(kernel=kernels["triple"]) as machine:
        started = time.monotonic()
        with pytest.raises(MachineError) as err:
            machine.wait_for("never printed", 30)
        assert time.monotonic() - started < 5.0
        assert err.value.step == "wait"
        assert "runstate shutdown" in str(err.value) and "guest-reset" in str(err.value)
        assert machine.status() == "shutdown"
        assert 0x100000 <= machine.registers().eip < 0x101000
        with pytest.raises(MachineError, match="will not exit"):
            machine.wait_exit(5)
    assert_cleaned_up(machine)


@vm
def test_keyboard_interrupt_inside_the_block_still_cleans_up(kernels):
    with pytest.raises(KeyboardInterrupt):
        with Machine(kernel=kernels["spin"]) as machine:
            machine.wait_for("hello", BOOT_TIMEOUT)
            raise KeyboardInterrupt
    assert_cleaned_up(machine)


@vm
def test_a_bad_qemu_option_is_a_launch_error_with_stderr(kernels):
    machine = Machine(kernel=kernels["spin"], extra_args=["-no-such-option"])
    with pytest.raises(MachineError) as err:
        machine.launch()
    assert err.value.step == "launch"
    assert "invalid option" in err.value.stderr_tail and err.value.qemu_status == 1
    assert "-no-such-option" in err.value.details()
    assert_cleaned_up(machine)


@vm
@pytest.mark.skipif(not os.path.exists("/dev/kvm"), reason="no /dev/kvm")
def test_kvm_probe_answers_within_a_bounded_time(kernels):
    started = time.monotonic()
    usable, reason = kvm_usable_for(kernels["spin"], READY, timeout=10)
    assert time.monotonic() - started < 10 * PROBE_WALL_FACTOR + 15
    assert reason
    if os.path.exists("/sys/module/kvm_pvm"):  # software hypervisor: 32-bit paging triple-faults
        assert not usable
        # The triple fault (or KVM no longer running the CPU) usually comes within the probe's time; on a loaded
        # host the boot may not get that far, and the probe says that answer is not kept.
        assert ("stopped for good" in reason or "KVM stopped running the CPU" in reason
                or "not kept" in reason), reason


HARNESS = """
import sys, time
sys.path.insert(0, sys.argv[1])
from kgen.machine import Machine
machine = Machine(kernel=sys.argv[2]).launch()
machine.wait_for("ready\\n", 10)
print(machine.tmpdir, machine.pid, flush=True)
if sys.argv[3] == "exit":
    sys.exit(0)  # without shutdown: the atexit hook must kill QEMU
time.sleep(60)
"""


@vm
@pytest.mark.parametrize("ending", ["exit", "SIGTERM", "SIGKILL"])
def test_no_qemu_outlives_its_harness(kernels, ending):
    harness = subprocess.Popen([sys.executable, "-c", HARNESS, str(Path(__file__).parents[2]), kernels["spin"],
                                ending], stdout=subprocess.PIPE, text=True)
    try:
        tmpdir, pid = harness.stdout.readline().split()
        if ending != "exit":
            harness.send_signal(getattr(signal, ending))
        harness.wait(BOOT_TIMEOUT)
        deadline = time.monotonic() + 5
        while alive(int(pid)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(int(pid))
        if ending != "SIGKILL":  # a SIGKILLed harness cannot remove anything; PR_SET_PDEATHSIG still kills QEMU
            assert not Path(tmpdir).exists()
    finally:
        harness.kill()
        harness.wait()
        shutil.rmtree(tmpdir, ignore_errors=True)


# --- under load: the verdict is the kernel's, however busy the host ------------------------------------------------

class CpuHogs:
    """Busy loops on every core and then some, for the length of a `with` block (each also ends by itself after a
    minute, so a harness killed in between leaves none behind for long)."""

    def __init__(self, count: int | None = None):
        self.count = count or 2 * (os.cpu_count() or 2)
        self.procs: list[subprocess.Popen] = []

    def __enter__(self):
        hog = "import time\nend = time.monotonic() + 60\nwhile time.monotonic() < end: pass\n"
        self.procs = [subprocess.Popen([sys.executable, "-c", hog]) for _ in range(self.count)]
        return self

    def __exit__(self, *exc):
        for proc in self.procs:
            proc.kill()
        for proc in self.procs:
            proc.wait()


@vm
def test_a_kernel_that_exits_at_once_is_reported_by_its_exit_under_load(kernels):
    # QEMU starts held (-S) until launch has QMP and the RAM mapping, so a kernel that exits in its first
    # microseconds can never make launch fail; before, a loaded host turned such runs into QMP/launch errors.
    with CpuHogs():
        for _ in range(8):
            with Machine(kernel=kernels["exit"]) as machine:
                assert machine.wait_exit(BOOT_TIMEOUT * 3) == (EXIT_VALUE << 1) | 1
                assert "hello" in machine.serial


@vm
def test_a_harness_descheduled_during_launch_still_sees_the_kernels_exit(kernels, monkeypatch):
    # The loaded host's worst case, made certain: the harness stalls right after the QMP handshake for longer than
    # the whole boot and exit take. The guest must not have run meanwhile.
    from kgen.machine.qmp import QmpLink
    connect = QmpLink.connect

    def stalled_connect(self, sock, timeout):
        connect(self, sock, timeout)
        time.sleep(1.5)
    monkeypatch.setattr(QmpLink, "connect", stalled_connect)
    with Machine(kernel=kernels["exit"]) as machine:
        assert machine.wait_exit(BOOT_TIMEOUT) == (EXIT_VALUE << 1) | 1


@vm
def test_a_triple_fault_under_load_is_a_triple_fault(kernels):
    with CpuHogs():
        for _ in range(4):
            with Machine(kernel=kernels["triple"]) as machine:
                with pytest.raises(MachineError, match="runstate shutdown"):
                    machine.wait_for("never printed", BOOT_TIMEOUT * 3)


@vm
def test_a_long_tmpdir_does_not_break_the_sockets(kernels, tmp_path, monkeypatch):
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    monkeypatch.setattr(tempfile, "tempdir", str(deep))
    with Machine(kernel=kernels["exit"]) as machine:
        assert machine.wait_exit(BOOT_TIMEOUT) == (EXIT_VALUE << 1) | 1


def test_stale_qemu_dirs_of_dead_processes_are_swept(tmp_path):
    from kgen.machine.process import TMP_PREFIX, sweep_stale_dirs
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f"{TMP_PREFIX}{dead.pid}-abc"
    stale.mkdir()
    (stale / "ram").write_bytes(b"x" * 4096)
    mine = tmp_path / f"{TMP_PREFIX}{os.getpid()}-abc"
    mine.mkdir()
    alive_dir = tmp_path / f"{TMP_PREFIX}1-abc"     # pid 1 is always alive
    alive_dir.mkdir()
    assert sweep_stale_dirs(tmp_path) == [stale]
    assert not stale.exists() and mine.exists() and alive_dir.exists()


@vm
def test_a_relative_path_in_extra_args_is_the_callers(kernels, tmp_path, monkeypatch):
    """--qemu-arg '-drive file=fs.img' means fs.img next to the user, as on QEMU's own command line (xv6 needs it)."""
    (tmp_path / "fs.img").write_bytes(bytes(64 * 1024))
    monkeypatch.chdir(tmp_path)
    with Machine(kernel=kernels["spin"], extra_args=("-drive", "file=fs.img,format=raw,if=none,id=disk0")) as machine:
        # Opened at launch: from any other directory QEMU refuses ("Could not open 'fs.img'") and launch fails.
        blocks = {b["device"]: b for b in machine.qmp("query-block")}
        assert blocks["disk0"]["inserted"]["file"] == "fs.img"
