"""When to look at a foreign kernel: `--ready-at SYMBOL` (a breakpoint through QEMU's gdbstub) and `--ready-vga TEXT`
(the VGA text screen), on zoo kernels (tests/minikernels.py `ready_zoo`) whose one-second boot wait in `hlt` passes
for idle: only these options stop them where they are booted. Each kernel counts its timer ticks in `ticks` and sets
`reached_main` in the first instruction of `main_loop`, so a stop too early or too late shows in its memory."""
import os
import time

import pytest

import minikernels
from conftest import needs_qemu, run_kgen
from minikernels import outcomes

pytestmark = [pytest.mark.vm, needs_qemu]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    out = tmp_path_factory.mktemp("ready")
    return {"vga": minikernels.vga_only(out), "late": minikernels.late_symbol(out),
            "panic": minikernels.ready_zoo(out, "vga-panic", panic=True)}



def physical(elf, vaddr: int) -> int:
    """Where the loader put the byte linked at `vaddr` (the ELF's segments)."""
    for seg in elf.segments:
        if seg.vaddr <= vaddr < seg.vaddr + seg.memsz:
            return seg.paddr + vaddr - seg.vaddr
    raise AssertionError(f"{vaddr:#x} is in no segment")


def word(machine, elf, name: str) -> int:
    return int.from_bytes(machine.read_phys(physical(elf, elf.symbols[name].value), 4), "little")


# --- the gdbstub client's framing --------------------------------------------------------------------------------

def test_packets_carry_their_checksum_and_escapes():
    from kgen.machine.gdbstub import StopReply, decode, frame
    assert frame("c") == b"$c#63"                                   # ord("c") == 0x63
    assert frame("Z1,c010008e,1") == b"$Z1,c010008e,1#" + b"%02x" % (sum(b"Z1,c010008e,1") % 256)
    assert frame(b"a#b") == b"$a}\x03b#" + b"%02x" % ((sum(b"a}\x03b")) % 256)
    assert decode(b"a}\x03b") == b"a#b" and decode(b"0* ") == b"0000"  # "* " repeats 32 - 29 = 3 more times
    assert StopReply("T05thread:01;").signal == 5 and not StopReply("T05thread:01;").final
    assert StopReply("T03thread:01;").final and StopReply("W00").final


# --- --ready-at --------------------------------------------------------------------------------------------------

def test_ready_at_stops_the_first_time_the_cpu_reaches_the_symbol(zoo):
    from kgen.harness.kernel import KernelUnderTest
    from kgen.harness.live import boot
    kernel = KernelUnderTest.foreign(zoo["late"], ready_at="main_loop")
    elf = kernel.elf
    with boot(kernel, cold=True) as live:
        regs = live.machine.registers()
        assert regs.eip == elf.symbols["main_loop"].value, elf.symbolize(regs.eip)
        # Before main_loop's first instruction ran, after the whole tick wait.
        assert word(live.machine, elf, "reached_main") == 0
        assert word(live.machine, elf, "ticks") >= minikernels.READY_ZOO_TICKS
        view = live.view()
        assert view.regs.eip == regs.eip           # the view is taken there too, not after the guest ran on


def test_ready_at_a_boot_symbol_stops_at_its_load_address_before_paging(zoo):
    from kgen.arch.hw import CR0_PG
    from kgen.harness.kernel import KernelUnderTest
    from kgen.harness.live import boot
    kernel = KernelUnderTest.foreign(zoo["late"], ready_at="_start")
    start = kernel.elf.symbols["_start"].value
    assert kernel.ready.get("at").addresses == (start, physical(kernel.elf, start))
    with boot(kernel, cold=True) as live:
        regs = live.machine.registers()
        assert regs.eip == physical(kernel.elf, start) != start
        assert not regs.cr0 & CR0_PG


def test_ready_at_takes_a_hex_address(zoo):
    from kgen.harness.kernel import KernelUnderTest
    from kgen.harness.live import boot
    from kgen.guest.elfinfo import ElfInfo
    idle = ElfInfo.load(zoo["late"]).symbols["idle"].value
    kernel = KernelUnderTest.foreign(zoo["late"], ready_at=f"{idle:#x}")
    with boot(kernel, cold=True) as live:
        assert live.machine.registers().eip == idle
        assert word(live.machine, kernel.elf, "reached_main") == 1


def test_a_restored_ready_at_machine_is_stopped_there_and_runs_on_without_the_debugger(zoo):
    from kgen.harness.kernel import KernelUnderTest
    from kgen.harness.live import boot
    from kgen.machine.snapshot import POOL
    kernel = KernelUnderTest.foreign(zoo["late"], ready_at="main_loop")
    main_loop = kernel.elf.symbols["main_loop"].value
    before = dict(POOL.counts)
    for _ in range(2):          # the first boots and saves, the second is restored (in the same QEMU or a new one)
        with boot(kernel, cold=False) as live:
            machine = live.machine
            assert machine.status() != "running" and machine.registers().eip == main_loop
            assert word(machine, kernel.elf, "reached_main") == 0
            machine.cont()      # the breakpoint is gone: the kernel runs on into its idle loop and stays running
            deadline = time.monotonic() + 30
            while word(machine, kernel.elf, "reached_main") == 0 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert word(machine, kernel.elf, "reached_main") == 1
            assert machine.status() == "running"
    assert POOL.counts["saved"] == before["saved"] + 1
    assert POOL.counts["restored"] + POOL.counts["relaunched"] == before["restored"] + before["relaunched"] + 1


def test_ready_at_under_kvm_uses_a_hardware_breakpoint(tmp_path):
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("no usable /dev/kvm here")
    from kgen.harness.kernel import KernelUnderTest
    from kgen.harness.live import boot
    kernel = KernelUnderTest.foreign(minikernels.elf64_multiboot(tmp_path), ready_at="long_mode")
    # kvm_pvm accepts Z0 too but never stops there: the int3 goes into RAM before QEMU's Multiboot ROM copies the
    # kernel over it. The stop proves Z1 was used.
    with boot(kernel, "kvm", cold=True) as live:
        regs = live.machine.registers()
        assert regs.long_mode and regs.eip == kernel.elf.symbols["long_mode"].value
        assert live.machine.serial == ""       # stopped before it printed


def test_ready_at_that_is_never_reached_is_the_timeout_naming_it(zoo):
    from kgen.errors import MachineError
    from kgen.guest.elfinfo import ElfInfo
    from kgen.harness.ready import Ready, wait_booted
    from kgen.machine import Machine
    elf = ElfInfo.load(zoo["late"])
    with Machine(kernel=zoo["late"], gdbstub=True, start_paused=True) as machine:
        with pytest.raises(MachineError) as seen:
            wait_booted(machine, Ready.from_options(elf, ready_at="0x7000"), 2, elf)
        assert "the CPU did not reach 0x7000 within 2 s" in str(seen.value)
        assert machine.status() == "paused"    # stopped where it was, for the diagnosis


# --- --ready-vga -------------------------------------------------------------------------------------------------

def test_ready_vga_waits_for_the_text_not_for_earlier_lines(zoo):
    from kgen.guest import vga
    from kgen.guest.elfinfo import ElfInfo
    from kgen.harness.ready import Ready, wait_booted
    from kgen.machine import Machine
    elf = ElfInfo.load(zoo["vga"])
    with Machine(kernel=zoo["vga"]) as machine:
        how = wait_booted(machine, Ready("vga", minikernels.READY_ZOO_READY), 60)
        machine.stop()
        assert how == f"showed {minikernels.READY_ZOO_READY!r} on the VGA screen"
        assert word(machine, elf, "ticks") >= minikernels.READY_ZOO_TICKS     # not at "zoo: booting"
        rows = vga.non_empty_lines(vga.screen_rows(machine))
        assert rows[-2:] == [minikernels.READY_ZOO_BOOTING, minikernels.READY_ZOO_READY], rows
        assert machine.serial == ""


def test_without_an_option_the_tick_wait_passes_for_idle(zoo):
    # Why the options exist: the default rule (idle in hlt with paging on) is met during the boot's wait.
    from kgen.guest import vga
    from kgen.guest.elfinfo import ElfInfo
    from kgen.harness.ready import Ready, wait_booted
    from kgen.machine import Machine
    elf = ElfInfo.load(zoo["vga"])
    with Machine(kernel=zoo["vga"]) as machine:
        assert wait_booted(machine, Ready(), 60).startswith("idle")
        machine.stop()
        assert word(machine, elf, "ticks") < minikernels.READY_ZOO_TICKS
        assert not vga.shows(vga.screen_rows(machine), minikernels.READY_ZOO_READY)


def test_ready_vga_text_never_shown_times_out_naming_it(zoo):
    from kgen.errors import MachineError
    from kgen.harness.ready import Ready, wait_booted
    from kgen.machine import Machine
    with Machine(kernel=zoo["vga"]) as machine:
        with pytest.raises(MachineError) as seen:
            wait_booted(machine, Ready("vga", "zoo: never shown"), 2)
    assert "'zoo: never shown' did not appear on the VGA screen within 2 s" in str(seen.value)


def test_vga_text_wrapping_at_column_80_is_found():
    from kgen.guest.vga import COLUMNS, decode_rows, shows
    cells = bytearray(b" \x07" * COLUMNS * 2)
    text = b"wrapped text"
    start = COLUMNS - 4                     # "wrap" ends row 0, "ped text" begins row 1
    for i, char in enumerate(text):
        cells[(start + i) * 2] = char
    rows = decode_rows(bytes(cells))
    assert rows[0].endswith("wrap") and rows[1].startswith("ped text")
    assert shows(rows, "wrapped text") and not shows(rows, "wrapped texts")


# --- the command line --------------------------------------------------------------------------------------------

def test_kgen_test_ready_vga_judges_the_booted_state(zoo):
    kernel = str(zoo["vga"])
    ready = run_kgen("test", "--kernel", kernel, "--ready-vga", minikernels.READY_ZOO_READY, "-j", "1", "--", "-v")
    assert ready.returncode == 0, ready.stdout + ready.stderr
    assert outcomes(ready.stdout)["test_nothing_is_mapped_below_the_kernel_base"] == "PASSED", ready.stdout
    # Judged during its boot wait, the identity map it still has is found: the option is what makes the verdict.
    early = run_kgen("test", "--kernel", kernel, "-j", "1", "-k", "below_the_kernel_base")
    assert early.returncode == 1 and "is identity-mapped" in early.stdout, early.stdout + early.stderr
    assert "Traceback" not in ready.stdout + ready.stderr + early.stdout + early.stderr


def test_kgen_test_ready_at_judges_the_booted_state(zoo):
    result = run_kgen("test", "--kernel", str(zoo["late"]), "--ready-at", "main_loop", "-j", "1", "--", "-v")
    assert result.returncode == 0, result.stdout + result.stderr
    assert outcomes(result.stdout)["test_nothing_is_mapped_below_the_kernel_base"] == "PASSED", result.stdout
    assert "Traceback" not in result.stdout + result.stderr


def test_kgen_run_ready_at_and_ready_vga(zoo):
    from kgen.guest.elfinfo import ElfInfo
    main_loop = ElfInfo.load(zoo["late"]).symbols["main_loop"].value
    at = run_kgen("run", "--kernel", str(zoo["late"]), "--ready-at", "main_loop")
    assert at.returncode == 0, at.stdout + at.stderr
    assert f"kgen: ready: the kernel reached main_loop, paging on (CPU at EIP={main_loop:#010x} <main_loop>" \
        in at.stderr, at.stderr
    shown = run_kgen("run", "--kernel", str(zoo["vga"]), "--ready-vga", minikernels.READY_ZOO_READY)
    assert shown.returncode == 0, shown.stdout + shown.stderr
    assert f"kgen: ready: the kernel showed {minikernels.READY_ZOO_READY!r} on the VGA screen" in shown.stderr


def test_an_unknown_ready_at_symbol_is_one_line_naming_close_matches(zoo):
    for command in (["test", "-j", "1"], ["run"]):
        result = run_kgen(*command, "--kernel", str(zoo["late"]), "--ready-at", "main_lop")
        assert result.returncode == 2, result.stdout + result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "no symbol 'main_lop' for --ready-at (close matches: main_loop" in lines[0], lines
    for wrong, said in ((["--ready-at", "0xzz"], "--ready-at 0xzz: not a hex address"),
                        (["--ready-at", "main_loop", "--ready-vga", "x"], "give one of --ready, --ready-symbol")):
        result = run_kgen("test", "--kernel", str(zoo["late"]), *wrong)
        assert result.returncode == 2 and said in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_a_vga_only_kernel_that_panics_shows_its_screen_in_the_report(zoo):
    result = run_kgen("test", "--kernel", str(zoo["panic"]), "--ready-vga", minikernels.READY_ZOO_READY, "-j", "1")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "--- VGA text screen (non-empty rows) ---" in result.stderr, result.stderr
    screen = result.stderr.split("--- VGA text screen (non-empty rows) ---", 1)[1]
    assert minikernels.READY_ZOO_PANIC in screen, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("kgen: error: --kernel vga-panic.elf did not boot") and "VGA screen" in last, last
    assert "Traceback" not in result.stdout + result.stderr


def test_a_ready_at_never_reached_is_one_failure_not_a_traceback(zoo):
    result = run_kgen("test", "--kernel", str(zoo["late"]), "--ready-at", "0x7000", "--boot-timeout", "2", "-j", "1")
    assert result.returncode == 1, result.stdout + result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert "the CPU did not reach 0x7000 within 2 s" in last, result.stderr
    assert "Traceback" not in result.stdout + result.stderr and "passed" not in result.stdout


def test_help_documents_both_options():
    for command in ("test", "run"):
        shown = run_kgen(command, "--help").stdout
        assert "--ready-at SYMBOL" in shown and "--ready-vga TEXT" in shown, shown
