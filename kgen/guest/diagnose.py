"""What went wrong in a run, in one line a person can act on: the exception the kernel reported, or the state
of a machine that hung or triple-faulted, with addresses named after the ELF's symbols."""
from __future__ import annotations

import re
from dataclasses import dataclass

from kgen.arch import Arch, hw
from kgen import protocol
from kgen.errors import MachineError
from kgen.guest import faultloop
from kgen.guest.elfinfo import ElfInfo, name_address
from kgen.guest.vga import non_empty_lines, screen_rows

# One shape for both kernels: "kgen: exception vector=0x.. error=0x.. eip=0x.. cr2=0x.. eax=0x.. ..." from the i386
# one (templates/i386/idt.s), the same with rip= and r8=..r15=, rflags= and 16-digit values from the 64-bit one.
EXCEPTION_LINE = re.compile(re.escape(protocol.EXCEPTION_PREFIX) + r"((?: \w+=0x[0-9a-fA-F]+)+)")
FIELD = re.compile(r"(\w+)=0x([0-9a-fA-F]+)")


@dataclass(frozen=True)
class KernelException:
    """The kernel's own report of a CPU exception (templates/i386/idt.s prints it; the 64-bit kernel says rip=)."""
    fields: dict[str, int]

    @property
    def vector(self) -> int:
        return self.fields["vector"]

    @property
    def long_mode(self) -> bool:
        """The report came from 64-bit code: it names RIP, not EIP."""
        return "rip" in self.fields

    @property
    def mode(self) -> Arch:
        return Arch.for_cpu(self.long_mode)

    @property
    def ip(self) -> int:
        """The faulting instruction's address: RIP or EIP."""
        return self.fields[self.mode.ip_name.lower()]

    def describe(self, elf: ElfInfo | None = None) -> str:
        f = self.fields
        name = hw.EXCEPTION_NAMES.get(self.vector, "reserved exception")
        text = f"{name} (vector {self.vector}) error={f['error']:#x}"
        if self.vector == hw.VECTOR_PAGE_FAULT:
            text += f" [{hw.describe_page_fault_error(f['error'])}] CR2={self.mode.hex(f['cr2'])}"
        return f"{text} {at_ip(elf, self.ip, self.mode)}"


PANIC_LINE = re.compile(re.escape(protocol.PANIC_PREFIX) + r"(.*)")


def find_panic(serial: str) -> str | None:
    """The message of the kernel's panic (templates/debugexit.s), if it panicked."""
    m = PANIC_LINE.search(serial)
    return m.group(1).strip() if m else None


def find_exception(serial: str) -> KernelException | None:
    m = EXCEPTION_LINE.search(serial)
    if not m:
        return None
    return KernelException({k: int(v, 16) for k, v in FIELD.findall(m.group(1))})


def tail(text: str, lines: int = 12) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


@dataclass(frozen=True)
class Failure:
    """A failed run, diagnosed: `kind` is "exception", "panic", "triple fault", "reset", "fault loop", "hang" or
    "exit";
    `summary` is the one line to print, `details` the evidence behind it (registers, COM1 tail, QEMU's command line
    and stderr); `findings` what else was learnt about the kernel (it fails only with poisoned RAM), a line each;
    `timed_out`: the kernel ran on until a wait gave up (not a state it stopped in)."""
    kind: str
    summary: str
    details: str
    findings: tuple[str, ...] = ()
    timed_out: bool = False

    def __str__(self) -> str:
        return self.summary


class RunFailed(MachineError):
    """A boot or run that failed, with its diagnosis in `failure`."""

    def __init__(self, failure: Failure):
        super().__init__(failure.summary)
        self.failure = failure

    def details(self) -> str:
        return self.failure.details


def explain(machine, elf: ElfInfo | None, why: BaseException | str) -> Failure:
    """Say what a run that did not do what was expected actually did.

    `why` is what the caller saw (a wait that timed out, an exit status). The kernel's own exception line wins;
    else the runstate tells a triple fault (-no-shutdown keeps QEMU up with the CPU as it was) from an exit and
    from a hang, and for the last two kinds the machine is stopped and its CPU read, so EIP (RIP in long mode) is
    named from the ELF.
    Leaves the machine stopped but alive: the caller still shuts it down.
    """
    reason = str(why).split("\n", 1)[0]
    serial = machine.serial
    evidence = [f"seen: {why}"]
    fault = find_exception(serial)
    panic = find_panic(serial)
    if fault is not None:
        kind, summary = "exception", f"kernel exception: {fault.describe(elf)}"
    elif panic is not None:
        kind, summary = "panic", f"kernel panic: {panic}"
    else:
        try:
            state = machine.status()
        except MachineError as err:
            state = f"unknown ({err})"
        # Still running: before it is stopped, a short look at the exceptions it takes (kgen/guest/faultloop.py).
        loop = faultloop.probe(machine) if state == "running" else None
        regs = _registers(machine, state, evidence)
        where = at_ip(elf, regs.eip, regs.mode) if regs else "registers unreadable"
        log = machine.exception_log_text() if hasattr(machine, "exception_log_text") else None
        if state == "shutdown" and _guest_reset(machine) and log is not None and faultloop.TRIPLE_FAULT not in log:
            kind = "reset"      # QEMU logs every triple fault: this reset was asked for
            summary = (f"the guest reset the machine (no triple fault in QEMU's exception log: a reset it asked for, "
                       f"through the keyboard controller or port 0xcf9): {where}")
        elif state == "shutdown" and _guest_reset(machine):
            kind = "triple fault"
            summary = _triple_fault(machine, elf, regs, where, log, evidence)
        elif state == "exited":
            kind, summary = "exit", f"QEMU exited ({reason}) without a kernel exception report"
        elif loop is not None:
            kind, summary = "fault loop", loop.describe(elf, regs.mode if regs else I386)
        elif getattr(why, "timed_out", False):
            kind, summary = "hang", f"hang: {reason}"      # the wait said what it saw, and what would have matched
        else:
            kind = "hang"
            summary = f"hang: {reason}; " + (f"CPU {'halted' if regs and regs.halted else 'running'} at {where}"
                                               if regs else where)
    evidence.append("--- COM1 (tail) ---")
    evidence.append(tail(serial) or "(empty)")
    if getattr(machine, "firmware", "bios") == "uefi":
        evidence.append("(no VGA text screen under UEFI: the firmware leaves a graphics mode)")
    else:
        evidence += _vga_screen(machine)       # what a kernel printed on the screen, next to what it said on COM1
    if hasattr(why, "details"):
        # A machine step's details end with COM1's tail too: shown once, above.
        text = why.details()
        cut = text.find("\n--- COM1 (tail) ---")
        evidence.append(text[:cut] if cut >= 0 else text)
    return Failure(kind, summary, "\n".join(evidence), timed_out=bool(getattr(why, "timed_out", False)))


def _triple_fault(machine, elf: ElfInfo | None, regs, where: str, log: str | None, evidence: list[str]) -> str:
    """A triple fault named from its first fault when QEMU's exception log `log` has the chain
    (kgen/guest/faultloop.py), else from the registers, which are the last fault's (its CR2, its stack pointer),
    saying so."""
    last = where + (f" CR2={regs.mode.hex(regs.cr2)}" if regs else "")
    chain = faultloop.triple_fault_chain(log) if log else None
    if chain is not None:
        evidence.append(f"the registers above are the last fault's, at the reset: {last}")
        return chain.describe(elf)
    if getattr(machine, "accel", "tcg") == "kvm":
        return (f"triple fault (first fault unknown: under KVM the guest's exceptions never reach QEMU's log; "
                f"the registers are the last fault's, --accel tcg names the first): {last}")
    return f"triple fault (vector unknown: the CPU reset instead of reporting it): {last}"


def _vga_screen(machine) -> list[str]:
    """The VGA text screen's non-empty rows under a heading, or nothing (QEMU gone, or a blank screen)."""
    try:
        rows = non_empty_lines(screen_rows(machine))
    except (MachineError, OSError, AttributeError):
        return []
    return ["--- VGA text screen (non-empty rows) ---", *rows] if rows else []


def _registers(machine, state: str, evidence: list[str]):
    if state == "exited":
        return None
    try:
        if state == "running":
            machine.stop()
        regs = machine.registers()
    except MachineError as err:
        evidence.append(f"registers unreadable: {err}")
        return None
    evidence.append(f"registers: {register_line(regs)}")
    return regs


def register_line(regs) -> str:
    """The registers that say where a stopped CPU was, named as the mode it ran in names them."""
    # CS and the privilege level the CPU ran at: a kernel stuck in ring 3 (a user process) is not one stuck in ring 0.
    ring = f"CS={regs.cs:#06x} CPL={'?' if regs.cpl is None else regs.cpl}"
    mode = regs.mode
    r = mode.register_prefix.upper()                # EIP, ESP, EFLAGS; RIP, RSP, RFLAGS
    efer = (f" EFER={'?' if regs.efer is None else mode.hex(regs.efer)}" if mode.long_mode else "")
    return (f"{r}IP={mode.hex(regs.eip)} {ring} {r}SP={mode.hex(regs.esp)} {r}FLAGS={regs.eflags:#010x} "
            f"CR0={regs.cr0:#010x} CR2={mode.hex(regs.cr2)} CR3={mode.hex(regs.cr3)} CR4={regs.cr4:#010x}{efer} "
            f"halted={regs.halted}")


def _guest_reset(machine) -> bool:
    return any(e.get("event") == "SHUTDOWN" and e.get("data", {}).get("reason") == "guest-reset"
               for e in machine.events)


def at_ip(elf: ElfInfo | None, ip: int, mode: Arch) -> str:
    """"EIP=0xc01000a3 <kmain+0x13>": the instruction pointer named as the CPU's mode names it, from the ELF."""
    return f"{mode.ip_name}={name_address(elf, ip, mode)}"
