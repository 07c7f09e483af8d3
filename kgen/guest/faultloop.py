"""A kernel that takes the same exception over and over: named as a fault loop, not as a hang.

A #PF handler that returns without mapping the page, or a handler that faults itself and returns, sends the CPU back
to the same instruction and the same exception forever. Sampled registers cannot tell that from a busy kernel: EIP
is either at the faulting instruction or in the handler, and no register holds the vector. QEMU can: under TCG its
`int` log prints one line per exception or interrupt it delivers ("v=0e e=0002 i=0 cpl=0 IP=0008:c0101096
pc=c0101096 SP=... CR2=dead0000"). Logging every boot would cost a line and a register dump per timer tick, so the
log is switched on through the monitor (`logfile`, `log int`) for PROBE_WINDOW seconds only when a diagnosis asks,
into the machine's own directory, and off again. In a fault loop that window holds hundreds of the same exception
(about 1,000 lines, 2 MB, in 20 ms here); in a kernel that is only busy it holds a few timer interrupts or nothing.
A probe costs ≈25 ms here (the first of a machine ≈50-110 ms, QEMU opening the file); a boot that halts within
FIRST_PROBE_AFTER pays nothing.
Under KVM the exceptions never reach QEMU's log: no loop is found and the diagnosis stays "hang".
"""
from __future__ import annotations

import re
import time
from collections import Counter
from dataclasses import dataclass

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
LOG_NAME = "fault-probe.log"


@dataclass(frozen=True)
class FaultLoop:
    """The exceptions a probe window caught, most frequent first: (vector, pc, cr2 or None, cpl) -> count."""
    sites: tuple[tuple[tuple[int, int, int | None, int], int], ...]
    total: int
    window: float

    def describe(self, elf=None, mode: Arch = I386) -> str:
        """"fault loop: #PF page fault at 0xc0101096 <f+0x6> over and over, CR2=0xdead0000 (...)"; `mode`, the
        CPU's (Registers.mode), says how wide an address prints."""
        parts = []
        for (vector, pc, cr2, cpl), _ in self.sites:
            name = hw.EXCEPTION_NAMES.get(vector, f"vector {vector}")
            text = f"{name} at {name_address(elf, pc, mode)}"
            parts.append(text + (f" in ring {cpl}" if cpl else ""))
        cr2s = sorted({cr2 for (_, _, cr2, _), _ in self.sites if cr2 is not None})
        return (f"fault loop: {' and '.join(parts)} over and over"
                + "".join(f", CR2={mode.hex(cr2)}" for cr2 in cr2s)
                + f" ({self.total} exceptions in {self.window * 1000:.0f} ms: the handler returns to the faulting "
                  f"instruction without removing the cause)")


def parse(log: str) -> list[tuple[int, int, int | None, int]]:
    """(vector, pc, cr2 or None, cpl) of every CPU exception in QEMU's `int` log (interrupts and `int n` left out)."""
    found = []
    for m in _EVENT.finditer(log):
        vector, software = int(m.group(1), 16), m.group(3) == "1"
        if software or vector >= hw.EXCEPTION_COUNT:     # above: interrupts (the timer)
            continue
        found.append((vector, int(m.group(7), 16), int(m.group(8), 16) if m.group(8) else None, int(m.group(4))))
    return found


def judge(events: list[tuple[int, int, int | None, int]], window: float) -> FaultLoop | None:
    if len(events) < MIN_EXCEPTIONS:
        return None
    sites = Counter(events).most_common()
    if len(sites) > MAX_SITES:
        return None
    return FaultLoop(tuple(sites), len(events), window)


def probe(machine, window: float = PROBE_WINDOW) -> FaultLoop | None:
    """Watch a running TCG machine's exceptions for `window` seconds; the loop it is in, or None. Leaves the machine
    running and QEMU's log off; a machine that is not running, runs under KVM or is no QEMU (a test's stand-in)
    gives None."""
    if getattr(machine, "accel", "tcg") != "tcg" or getattr(machine, "tmpdir", None) is None:
        return None
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
    return judge(parse(text), taken)
