"""What QEMU's exception log says: a kernel that takes the same exception over and over (a fault loop, not a hang),
and the fault a triple fault started from.

A #PF handler that returns without mapping the page, or a handler that faults itself and returns, sends the CPU back
to the same instruction and the same exception forever. Sampled registers cannot tell that from a busy kernel: EIP
is either at the faulting instruction or in the handler, and no register holds the vector. QEMU can: under TCG its
`int` log prints one line per exception or interrupt it delivers ("v=0e e=0002 i=0 cpl=0 IP=0008:c0101096
pc=c0101096 SP=... CR2=dead0000"). Logging every boot would cost a line and a register dump per timer tick, so the
log is switched on through the monitor (`logfile`, `log int`) for PROBE_WINDOW seconds only when a diagnosis asks,
into the machine's own directory, and off again. In a fault loop that window holds hundreds of the same exception
(about 1,000 lines, 2 MB, in 20 ms here); in a kernel that is only busy it holds a few timer interrupts or nothing.
A probe costs ≈25 ms here (the first of a machine ≈50-110 ms, QEMU opening the file); a boot that halts within
FIRST_PROBE_AFTER pays nothing. A machine that keeps the log from its start (`Machine(exception_log=True)`, what
kgen boots a --kernel with under TCG) is not switched: the probe reads what the window added.

A triple fault: the registers QEMU keeps are those of the *last* fault (CR2 of a gate read that faulted, a stack
pointer run off its page), not of the one that started it. The log from the start has the chain: each fault raised
while another is delivered is a `check_exception old: 0xe new 0xe` line, the first one of a chain says `old:
0xffffffff` (nothing was being delivered), each delivery a `v=` line with the registers after it, and `-d cpu_reset`
adds "Triple fault" at the end. `triple_fault_chain` reads it back from that last line.
Under KVM the exceptions never reach QEMU's log: no loop is found and the diagnosis stays "hang"; of a triple fault
only the last fault's registers are known.
"""
from __future__ import annotations

import re
import time
from collections import Counter
from dataclasses import dataclass, replace

from kgen.arch import I386, Arch, hw
from kgen.errors import MachineError
from kgen.guest.elfinfo import name_address

PROBE_WINDOW = 0.02
# While `kgen run/test --kernel` waits for a kernel that keeps running, it looks this long after the start and then
# this often (1% of the wait), so a fault loop is named within seconds instead of at the boot timeout.
FIRST_PROBE_AFTER = 1.0
PROBE_EVERY = 2.0
# A loop: at least this many exceptions in the window, all at no more than MAX_SITES (vector, address) pairs.
MIN_EXCEPTIONS = 16
MAX_SITES = 3
_EVENT = re.compile(r"^\s*\d+: v=([0-9a-f]+) e=([0-9a-f]+) i=(\d) cpl=(\d) IP=([0-9a-f]+):([0-9a-f]+) "
                    r"pc=([0-9a-f]+) SP=[0-9a-f]+:[0-9a-f]+(?: CR2=([0-9a-f]+))?", re.MULTILINE)
# The register dump after a `v=` line: RAX= in long mode, EAX= else; CR3 on the control-register line.
_DUMP_LONG = re.compile(r"^RAX=", re.MULTILINE)
_DUMP_CR3 = re.compile(r"^CR0=[0-9a-f]+ CR2=[0-9a-f]+ CR3=([0-9a-f]+)", re.MULTILINE)
_RAISED = re.compile(r"^check_exception old: 0x([0-9a-f]+) new 0x([0-9a-f]+)$", re.MULTILINE)
NOTHING_DELIVERED = "check_exception old: 0xffffffff "
TRIPLE_FAULT = "Triple fault"
LOG_NAME = "fault-probe.log"


@dataclass(frozen=True)
class Delivery:
    """One exception or interrupt QEMU's log says the CPU delivered: where it was raised (`pc`, at `cpl`), the error
    code, CR2 for a #PF, CR3 and the CPU's mode from the register dump after it."""
    vector: int
    error: int
    pc: int
    cpl: int
    cr2: int | None
    software: bool
    cr3: int | None = None
    long_mode: bool = False

    @property
    def mode(self) -> Arch:
        return Arch.for_cpu(self.long_mode)

    def describe(self, elf=None) -> str:
        """"#PF page fault (vector 14) error=0x2 [page not present, write, supervisor] CR2=0xdead0000 at
        EIP=0xc0100090 <fault_here> in ring 0"."""
        mode = self.mode
        name = hw.EXCEPTION_NAMES.get(self.vector, "interrupt" if self.vector >= hw.EXCEPTION_COUNT else "exception")
        text = f"{name} (vector {self.vector}) error={self.error:#x}"
        bits = hw.describe_error_code(self.vector, self.error)
        text += f" [{bits}]" if bits else ""
        text += f" CR2={mode.hex(self.cr2)}" if self.cr2 is not None else ""
        return f"{text} at {mode.ip_name}={name_address(elf, self.pc, mode)} in ring {self.cpl}"


def deliveries(log: str) -> list[Delivery]:
    """Every exception and interrupt QEMU's `int` log holds, in order, each with what its register dump says."""
    found = []
    matches = list(_EVENT.finditer(log))
    for n, m in enumerate(matches):
        dump = log[m.end():matches[n + 1].start() if n + 1 < len(matches) else len(log)]
        cr3 = _DUMP_CR3.search(dump)
        found.append(Delivery(int(m.group(1), 16), int(m.group(2), 16), int(m.group(7), 16), int(m.group(4)),
                              int(m.group(8), 16) if m.group(8) else None, m.group(3) == "1",
                              int(cr3.group(1), 16) if cr3 else None, bool(_DUMP_LONG.search(dump))))
    return found


@dataclass(frozen=True)
class FaultChain:
    """The exceptions of a triple fault, first to last: `deliveries` the ones the CPU began to deliver (the first
    the cause), `last` the vector raised while delivering the double fault, the one that reset the CPU."""
    deliveries: tuple[Delivery, ...]
    last: int

    @property
    def first(self) -> Delivery:
        return self.deliveries[0]

    def describe(self, elf=None) -> str:
        """"triple fault from #PF page fault (...) at EIP=... in ring 0; then #DF double fault, then #PF: the CPU
        reset"."""
        steps = [hw.EXCEPTION_NAMES.get(d.vector, f"vector {d.vector}") for d in self.deliveries[1:]]
        steps.append(hw.EXCEPTION_NAMES.get(self.last, f"vector {self.last}") + " delivering it")
        return (f"triple fault from {self.first.describe(elf)}; then {', then '.join(steps)}: the CPU reset "
                "(first fault from QEMU's exception log)")


def triple_fault_chain(log: str) -> FaultChain | None:
    """The chain of the last triple fault in QEMU's exception log (`-d int,cpu_reset`), or None when the log has
    none (no log, a reset the guest asked for, or the chain's start already rotated out)."""
    end = log.rfind(TRIPLE_FAULT)
    if end < 0:
        return None
    start = log.rfind(NOTHING_DELIVERED, 0, end)
    if start < 0:
        return None
    chain = log[start:end]
    raised = _RAISED.findall(chain)
    steps = tuple(d for d in deliveries(chain) if not d.software)
    if not steps or not raised:
        return None
    return FaultChain(steps, int(raised[-1][1], 16))


@dataclass(frozen=True)
class FaultLoop:
    """The exceptions a probe window caught, in the order they first came: (vector, pc, cr2 or None, cpl) -> count;
    `errors` the error code each site's first exception pushed (empty when not known)."""
    sites: tuple[tuple[tuple[int, int, int | None, int], int], ...]
    total: int
    window: float
    errors: tuple[int, ...] = ()

    def describe(self, elf=None, mode: Arch = I386) -> str:
        """"fault loop: #PF page fault at 0xc0101096 <f+0x6> over and over, CR2=0xdead0000 (...)"; `mode`, the
        CPU's (Registers.mode), says how wide an address prints."""
        parts = []
        for n, ((vector, pc, cr2, cpl), _) in enumerate(self.sites):
            name = hw.EXCEPTION_NAMES.get(vector, f"vector {vector}")
            bits = hw.describe_error_code(vector, self.errors[n]) if n < len(self.errors) else None
            text = f"{name}{f' [{bits}]' if bits else ''} at {name_address(elf, pc, mode)}"
            parts.append(text + (f" in ring {cpl}" if cpl else ""))
        cr2s = sorted({cr2 for (_, _, cr2, _), _ in self.sites if cr2 is not None})
        return (f"fault loop: {' and '.join(parts)} over and over"
                + "".join(f", CR2={mode.hex(cr2)}" for cr2 in cr2s)
                + f" ({self.total} exceptions in {self.window * 1000:.0f} ms: the handler returns to the faulting "
                  f"instruction without removing the cause)")


def exceptions(log: str) -> list[Delivery]:
    """The CPU exceptions of QEMU's `int` log, in order (interrupts and `int n` left out)."""
    return [d for d in deliveries(log) if not d.software and d.vector < hw.EXCEPTION_COUNT]  # above: the timer...


def parse(log: str) -> list[tuple[int, int, int | None, int]]:
    """(vector, pc, cr2 or None, cpl) of every CPU exception in QEMU's `int` log (interrupts and `int n` left out)."""
    return [(d.vector, d.pc, d.cr2, d.cpl) for d in exceptions(log)]


def judge(events: list[tuple[int, int, int | None, int]], window: float) -> FaultLoop | None:
    if len(events) < MIN_EXCEPTIONS:
        return None
    sites = tuple(Counter(events).items())      # in the order each first came
    if len(sites) > MAX_SITES:
        return None
    return FaultLoop(sites, len(events), window)


def _judge_log(log: str, window: float) -> FaultLoop | None:
    """`judge` on a log's text, each site with the error code its first exception pushed."""
    found = exceptions(log)
    loop = judge([(d.vector, d.pc, d.cr2, d.cpl) for d in found], window)
    if loop is None:
        return None
    first = {}
    for d in found:
        first.setdefault((d.vector, d.pc, d.cr2, d.cpl), d.error)
    return replace(loop, errors=tuple(first[site] for site, _ in loop.sites))


def probe(machine, window: float = PROBE_WINDOW) -> FaultLoop | None:
    """Watch a running TCG machine's exceptions for `window` seconds; the loop it is in, or None. Leaves the machine
    running and QEMU's log off; a machine that is not running, runs under KVM or is no QEMU (a test's stand-in)
    gives None."""
    if getattr(machine, "accel", "tcg") != "tcg" or getattr(machine, "tmpdir", None) is None:
        return None
    if getattr(machine, "exception_log", False):
        return _probe_running_log(machine, window)
    log = machine.tmpdir / LOG_NAME
    try:
        if machine.status() != "running":
            return None
        machine.hmp(f"logfile {log}")
        started = time.monotonic()
        machine.hmp("log int")
        try:
            time.sleep(window)
        finally:
            machine.hmp("log none")
        taken = time.monotonic() - started
    except MachineError:
        return None
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return None
    finally:
        log.unlink(missing_ok=True)
    return _judge_log(text, taken)


def _probe_running_log(machine, window: float) -> FaultLoop | None:
    """`probe` on a machine whose exception log runs from its start: what the window adds to it."""
    try:
        if machine.status() != "running":
            return None
        machine.tend_exception_log()
        offset = machine.exception_log_size()
        started = time.monotonic()
        time.sleep(window)
        taken = time.monotonic() - started
    except MachineError:
        return None
    return _judge_log(machine.exception_log_since(offset), taken)
