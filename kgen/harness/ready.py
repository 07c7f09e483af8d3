"""When a kernel given with --kernel counts as booted, and waiting for it.

A kgen kernel says it is ready itself (its call channel's serving line); anyone else's Multiboot ELF has no such
line: it counts as booted when it prints its ready text (`--ready`), or, without one, when it reaches a state it will
not leave by itself or idles (`wait_booted`): halted with interrupts off (paging on or off: final at once), or halted
with interrupts on and paging on at the same instruction for IDLE_SETTLE seconds. `--ready-symbol` waits until the
CPU stays inside a function, `--ready-after` until the page tables stop changing, `--ready-at` stops it where the CPU
first reaches a symbol (a breakpoint through QEMU's gdbstub), `--ready-vga` once its VGA text screen shows a text.
The five are one `Ready`: a kernel is looked at in one way.
"""
from __future__ import annotations

import difflib
import hashlib
import struct
import time
from collections import Counter
from dataclasses import dataclass

from kgen.arch.hw import CR0_PG, CR4_PSE, EFLAGS_IF, PTE_A, PTE_D, PTE_P, PTE_PS
from kgen.build.config import show_text
from kgen.errors import KgenError, MachineError
from kgen.guest import faultloop
from kgen.guest import vga as screen
from kgen.guest.elfinfo import ElfInfo, name_address
from kgen.guest.invariants import GuestView
from kgen.guest.pagewalk import WalkError
from kgen.machine.gdbstub import GdbStub, GdbStubError

IDLE_POLL = 0.01
# A kernel halted with interrupts on wakes for each interrupt; found halted at the same instruction this long
# apart, with no sample in between outside it, it idles (a timer tick's handler is rarely caught running).
IDLE_SETTLE = 0.2
# COM1 bytes reach `machine.serial` through a reader thread, after the CPU wrote them: a kernel that prints its ready
# text and halts at once can be seen halted before the text is seen. A final state gives that text this long to
# arrive before it counts as "halted before the text appeared".
FINAL_SERIAL_GRACE = 1.0

# The "when to look" options, by the name they have as `kgen test`/`run`/`inspect` options and [foreign] keys
# (`--ready-symbol`, `ready_symbol`), and the `Ready.kind` each sets. One table, read by the command line, the
# [foreign] table, the pytest options and the waiting below.
READY_OPTIONS = {"ready": "text", "ready_symbol": "symbol", "ready_after": "after", "ready_at": "at",
                 "ready_vga": "vga"}


@dataclass(frozen=True)
class Ready:
    """When a foreign kernel counts as booted: `kind` one of READY_OPTIONS' values with its `value` (a `ReadyAt` for
    "at", seconds for "after", text or a symbol name for the others), or no kind: halted for good, or idle."""
    kind: str | None = None
    value: object = None

    @classmethod
    def from_options(cls, elf: ElfInfo | None = None, **given) -> Ready:
        """The one "when to look" option of `given` (READY_OPTIONS names, None for not given), checked against the
        ELF: more than one, an unknown --ready-symbol or --ready-at symbol, raise KgenError."""
        unknown = set(given) - set(READY_OPTIONS)
        if unknown:
            raise TypeError(f"not a ready option: {', '.join(sorted(unknown))}")
        chosen = [(name, value) for name, value in given.items() if value is not None]
        if len(chosen) > 1:
            raise KgenError((f"{elf.path}: " if elf is not None else "") + "give one of "
                            + ", ".join(option_flag(name) for name in READY_OPTIONS))
        if not chosen:
            return cls()
        name, value = chosen[0]
        kind = READY_OPTIONS[name]
        if kind == "symbol" and elf is not None and value not in elf.symbols:
            raise KgenError(f"{elf.path}: no symbol {value!r} for --ready-symbol (its symbol table names functions "
                            "and labels; a stripped ELF has none)")
        if kind == "at" and not isinstance(value, ReadyAt):
            value = resolve_ready_at(elf, value)
        if kind == "after":
            value = float(value)
        return cls(kind, value)

    def get(self, kind: str):
        """The value when this is the `kind` of readiness, else None."""
        return self.value if self.kind == kind else None

    @property
    def option(self) -> str | None:
        """The READY_OPTIONS name that gives this readiness (None: the default rule)."""
        return next((name for name, kind in READY_OPTIONS.items() if kind == self.kind), None)

    @property
    def option_value(self) -> str | None:
        """The value as that option takes it on a command line."""
        if self.kind is None:
            return None
        return self.value.name if isinstance(self.value, ReadyAt) else f"{self.value}" if self.kind != "after" \
            else f"{self.value:g}"

    def goal(self) -> str:
        """What the kernel has not become yet, for "stopped before it was ...": "ready ('login:' on COM1)"."""
        said = {"text": "ready ({!r} on COM1)", "symbol": "inside {}", "after": "settled (page tables unchanged for "
                "{:g} s)", "at": "at {}", "vga": "showing {!r} on the VGA screen"}
        return said[self.kind].format(self.value) if self.kind is not None else "halted"

    def missed(self) -> str:
        """What did not happen in time, for a timeout: "'login:' did not appear on COM1"."""
        said = {"text": "{!r} did not appear on COM1", "symbol": "the CPU did not stay in {}",
                "after": "paging was not on with page tables unchanged for {:g} s", "at": "the CPU did not reach {}",
                "vga": "{!r} did not appear on the VGA screen"}
        return (said[self.kind].format(self.value) if self.kind is not None
                else "the kernel neither halted with interrupts off nor sat idle in hlt with paging on")

    def reached(self) -> str:
        """What the kernel did to count as booted, for a report: "printed 'login:' on COM1"."""
        said = {"text": "printed {!r} on COM1", "symbol": "stayed inside {}", "after": "page tables unchanged for {} s",
                "at": "stopped the first time the CPU reached {}", "vga": "showed {!r} on the VGA text screen"}
        return said[self.kind].format(self.value) if self.kind is not None else "halted for good, or idle"

    def __str__(self) -> str:
        """Short, for a snapshot's key and a report: `ready: TEXT`, `at: (addresses)`, ..., `halted or idle`."""
        if self.kind is None:
            return "halted or idle"
        names = {"text": "ready", "symbol": "inside", "after": "settled", "at": "at", "vga": "vga"}
        value = self.value.addresses if isinstance(self.value, ReadyAt) else self.value
        return f"{names[self.kind]}: {value}"


def option_flag(name: str) -> str:
    """`ready_symbol` as the command line spells it."""
    return "--" + name.replace("_", "-")


@dataclass(frozen=True)
class ReadyAt:
    """Where `--ready-at` stops the CPU: `name` as the user gave it, `addresses` the linear addresses to break at.
    A symbol's link address comes first; a symbol in a segment loaded elsewhere (a higher-half kernel's boot code,
    run at its load address before paging is on) adds that load address, since the CPU may reach it there."""
    name: str
    addresses: tuple[int, ...]

    def __str__(self) -> str:
        link = f"{self.addresses[0]:#x}"
        return link if self.name.lower().startswith("0x") else f"{self.name} ({link})"


def resolve_ready_at(elf: ElfInfo, text: str, option: str = "--ready-at") -> ReadyAt:
    """`--ready-at` (or `option`, another that breaks at a place: --check-at) as a symbol of the ELF or a 0x
    address; an unknown symbol raises KgenError naming close ones."""
    if text.lower().startswith("0x"):
        try:
            address = int(text, 16)
        except ValueError:
            raise KgenError(f"{elf.path.name}: {option} {text}: not a hex address (0x then hex digits)") from None
        if address >> 64:       # an ELF32 may hold 64-bit code: the CPU's widest address is the bound
            raise KgenError(f"{elf.path.name}: {option} {show_text(text)}: wider than 64 bits; give an address "
                            "the CPU can reach")
        return ReadyAt(text, (address,))
    sym = elf.symbols.get(text)
    if sym is None:
        close = difflib.get_close_matches(text, list(elf.symbols), n=4, cutoff=0.6)
        close += [name for name in sorted(elf.symbols) if text.lower() in name.lower() and name not in close][:4]
        hint = (f"close matches: {', '.join(close)}" if close else
                "it has no symbols (stripped?)" if not elf.symbols else "nothing close")
        raise KgenError(f"{elf.path.name}: no symbol {text!r} for {option} ({hint}); name a symbol of the ELF "
                        "or give a 0x address")
    loads = [sym.value - seg.vaddr + seg.paddr for seg in elf.segments
             if seg.paddr != seg.vaddr and seg.vaddr <= sym.value < seg.vaddr + seg.memsz]
    return ReadyAt(text, tuple(dict.fromkeys([sym.value, *loads])))


def wait_booted(machine, ready: Ready, timeout: float, elf: ElfInfo | None = None, *,
                in_kernel_only: bool = False) -> str:
    """Wait until a foreign kernel is ready to be looked at; return how it got there, or raise `MachineError`.

    `ready` (a `Ready`) says when: its text on COM1; the CPU staying inside its symbol, a function of `elf`
    (EIP named after it at samples IDLE_SETTLE seconds apart, none in between elsewhere): a place the kernel stays,
    such as its idle or busy loop, found without a breakpoint; paging on with CR3 and every page table it reaches
    unchanged for its seconds ("after": a kernel that never halts, running its own code or a module's); the CPU
    first getting to its `ReadyAt` ("at"): a breakpoint (`_wait_breakpoint`), the machine then left stopped exactly
    there; the VGA text screen showing its text (kgen/guest/vga.py). With no kind, when the CPU is halted with
    interrupts off (nothing can wake it: final at once, paging on or off), or halted with interrupts on and paging
    on at the same instruction IDLE_SETTLE seconds apart (an idle loop). A CPU spinning on a jump to itself with
    interrupts off (`for(;;);` at the end of a panic) is as final as that halt (`SelfJumpWatch`). A final state
    before the text appeared, or outside the symbol, is reported at once too.

    `in_kernel_only`: the machine runs a loader of its own (an author's image, their QEMU command line) that may halt
    or idle before the kernel is even loaded (a boot menu's timeout): halted and idle count only with the CPU in the
    code of `elf`."""
    at = ready.get("at")
    if at is not None:
        return _wait_breakpoint(machine, at, timeout, elf)
    settle, symbol, vga = ready.get("after"), ready.get("symbol"), ready.get("vga")
    text = ready.get("text")
    goal = ready.goal()
    deadline = time.monotonic() + timeout
    settled: tuple[int | str, float] | None = None      # (EIP or symbol, when first seen there)
    regs = None
    spin = SelfJumpWatch(machine, elf)
    seen = BootWatch(machine, elf, fingerprints=settle is None)
    next_probe = time.monotonic() + faultloop.FIRST_PROBE_AFTER
    while True:
        _tend_log(machine)
        if text is not None and text in machine.serial:
            return f"printed {text!r}"
        state = machine.status()
        if state != "running":
            raise MachineError(f"the guest stopped in runstate {state} before it was {goal}")
        if vga is not None and screen.shows(screen.screen_rows(machine), vga):
            return f"showed {vga!r} on the VGA screen"
        regs = machine.registers()
        now = time.monotonic()
        seen.sample(regs, now)
        paging = "on" if regs.cr0 & CR0_PG else "off"
        here = None
        if symbol is not None:
            found = elf.symbol_at(regs.eip) if elf is not None else None
            here = symbol if found is not None and found.name == symbol else None
        in_kernel = not in_kernel_only or elf is None or in_code(elf, regs.eip)
        spinning = spin.sample(regs)
        if (regs.halted or spinning) and not regs.eflags & EFLAGS_IF and in_kernel:
            final = "halted with interrupts off" if regs.halted else f"is {spinning}"
            if symbol is None and text is None and vga is None:
                return f"{final}, paging {paging}"     # final: nothing will change any more
            if text is not None and _arrives(machine, text, FINAL_SERIAL_GRACE):
                return f"printed {text!r}"
            if vga is not None and screen.shows(screen.screen_rows(machine), vga):
                return f"showed {vga!r} on the VGA screen"
            if here is not None:
                return f"{'halted' if regs.halted else 'spinning'} in {symbol}, interrupts off, paging {paging}"
            raise MachineError(f"the kernel {final} (for good, paging {paging}) before "
                               + (f"{text!r} appeared on COM1" if text is not None else
                                  f"{vga!r} appeared on the VGA screen" if vga is not None else f"it reached {symbol}"))
        if settle is not None:
            mark = tables_fingerprint(machine, regs) if regs.cr0 & CR0_PG else None
        elif symbol is not None:
            mark = here
        elif text is None and vga is None and regs.halted and regs.cr0 & CR0_PG and in_kernel:
            mark = regs.eip
        else:
            mark = None
        if mark is None:
            settled = None
        elif settled is not None and settled[0] == mark:
            if settle is not None and now - settled[1] >= settle:
                return f"settled: paging on, page tables unchanged for {settle:g} s"
            if settle is None and now - settled[1] >= IDLE_SETTLE:
                return (f"stayed in {symbol}, paging {paging}" if symbol is not None
                        else "idle: halted with interrupts on, paging on")
        else:
            settled = (mark, now)
        if not regs.halted and now >= next_probe:   # still running: stuck taking one exception? (a 20 ms look)
            next_probe = now + faultloop.PROBE_EVERY
            if faultloop.probe(machine) is not None:
                raise MachineError("the kernel took the same exception over and over: a fault loop")
        if now >= deadline:
            where = " in the kernel's code" if in_kernel_only and ready.kind is None else ""
            raise BootTimeout(f"{ready.missed()}{where} within {timeout:g} s; {seen.report(ready, now)}")
        time.sleep(IDLE_POLL)


class BootTimeout(MachineError):
    """A kernel that never got ready within its time: the message says what was seen and which option would have
    matched (`BootWatch.report`)."""
    timed_out = True


# A --ready-after the hint proposes: at most this, and half of what the tables were seen unchanged for.
SUGGESTED_SETTLE = 5
FINGERPRINT_EVERY = 1.0     # how often a wait without --ready-after digests the page tables, for the hint
# Rows the firmware leaves on the VGA screen: not the kernel's, so no --ready-vga text to propose.
FIRMWARE_ROWS = ("SeaBIOS", "Booting from", "iPXE", "Machine UUID")


class BootWatch:
    """What a wait saw of the CPU, from the samples it takes anyway, for the report of a timeout: the rings it ran
    in and where, CR3's values, how long the page tables stayed unchanged (a digest each FINGERPRINT_EVERY
    seconds), so the report can name the ready option that would have matched."""

    def __init__(self, machine, elf: ElfInfo | None, *, fingerprints: bool = True):
        self.machine = machine
        self.elf = elf
        self.fingerprints = fingerprints
        self.rings: Counter[int] = Counter()
        self.ring: tuple[int, float] | None = None       # (ring, since when it has been in it, sample after sample)
        self.place: tuple[str | None, float] | None = None   # (ring-0 symbol, since when), likewise
        self.cr3s: list[int] = []                        # CR3 values in the order they were first seen
        self.cr3_changes = 0
        self.last_cr3: int | None = None
        self.tables: tuple[tuple, float] | None = None   # (fingerprint, since when it has been the same)
        self.next_fingerprint = 0.0
        self.last = None                                 # the last sample's registers

    def sample(self, regs, now: float) -> None:
        self.last = regs
        ring = regs.cpl if regs.cpl is not None else regs.cs & 3
        self.rings[ring] += 1
        if self.ring is None or self.ring[0] != ring:
            self.ring = (ring, now)
        sym = self.elf.symbol_at(regs.eip) if self.elf is not None and ring == 0 else None
        name = sym.name if sym is not None else None
        if self.place is None or self.place[0] != name:
            self.place = (name, now)
        if regs.cr0 & CR0_PG and regs.cr3 != self.last_cr3:       # CR3 means nothing with paging off
            self.cr3_changes += self.last_cr3 is not None
            self.last_cr3 = regs.cr3
            if regs.cr3 not in self.cr3s:
                self.cr3s.append(regs.cr3)
        if self.fingerprints and regs.cr0 & CR0_PG and now >= self.next_fingerprint:
            self.next_fingerprint = now + FINGERPRINT_EVERY
            mark = tables_fingerprint(self.machine, regs)
            if self.tables is None or self.tables[0] != mark:
                self.tables = (mark, now)
        elif not regs.cr0 & CR0_PG:
            self.tables = None

    def report(self, ready: Ready, now: float) -> str:
        """"seen: in ring 3 at EIP=0x08048000 for the last 3 s, last running with interrupts off, paging on, CR3
        0x00105000 (never changed), page tables unchanged for 3 s; try --ready-after 1" (the options that would have
        matched, or the list of them when none is known)."""
        regs = self.last
        uefi = getattr(self.machine, "firmware", "bios") == "uefi"
        if regs is None:
            return "nothing seen: " + self._all_options(uefi)
        mode = regs.mode
        ring, since = self.ring
        total = sum(self.rings.values())
        where = f"at {mode.ip_name}={name_address(self.elf, regs.eip, mode)}"
        share = f" ({100 * self.rings[ring] // total}% of samples)" if self.rings[ring] != total else ""
        seen = [f"in ring {ring} {where} for the last {_seconds(now - since)} s{share}",
                f"last {'halted' if regs.halted else 'running'} with interrupts "
                f"{'on' if regs.eflags & EFLAGS_IF else 'off'}, paging {'on' if regs.cr0 & CR0_PG else 'off'}"]
        cr3 = ", ".join(mode.hex(value) for value in self.cr3s[-3:])
        if self.cr3s and self.cr3_changes == 0:
            seen.append(f"CR3 {cr3} (never changed)")
        elif self.cr3s:
            times = "once" if self.cr3_changes == 1 else f"{self.cr3_changes} times"
            seen.append(f"CR3 changed {times} between {len(self.cr3s)} values (last: {cr3})")
        stable = now - self.tables[1] if self.tables is not None else None
        if stable is not None and self.fingerprints:
            seen.append(f"page tables unchanged for {_seconds(stable)} s" if stable >= FINGERPRINT_EVERY
                        else "page tables still changing")
        hints = []
        if stable is not None and stable >= FINGERPRINT_EVERY and ready.kind != "after":
            # Half of what was seen (in half seconds): it matches again on a slower run.
            hints.append(f"--ready-after {min(SUGGESTED_SETTLE, int(stable) / 2):g}")
        name, there_since = self.place
        if name is not None and now - there_since >= 2 * IDLE_SETTLE and ready.kind != "symbol":
            hints.append(f"--ready-symbol {name}")      # it stays in one function of the kernel
        line = _last_line(self.machine.serial)
        if line and ready.kind != "text":
            hints.append(f"--ready {line!r}")
        if not uefi and ready.kind != "vga":
            rows = _kernel_rows(self.machine)
            if rows:
                hints.append(f"--ready-vga {rows[-1].strip()!r}")
        text = "seen: " + ", ".join(seen) + "; "
        text += (f"try {' or '.join(hints)}" if hints else self._all_options(uefi))
        if uefi:
            text += " (under UEFI there is no VGA text screen for --ready-vga: the firmware left a graphics mode)"
        return text

    @staticmethod
    def _all_options(uefi: bool) -> str:
        vga = "" if uefi else "--ready-vga TEXT, "
        return (f"pass --ready TEXT, {vga}--ready-at SYMBOL, --ready-symbol SYMBOL or --ready-after SECONDS, or a "
                "longer --boot-timeout")


def _seconds(value: float) -> str:
    return f"{value:.0f}" if value >= 10 else f"{value:.1f}"


def _last_line(serial: str) -> str | None:
    lines = [line.strip() for line in serial.splitlines() if line.strip()]
    return lines[-1] if lines else None


def _kernel_rows(machine) -> list[str]:
    """The VGA screen's non-empty rows the firmware did not write."""
    try:
        rows = screen.non_empty_lines(screen.screen_rows(machine))
    except (MachineError, OSError):
        return []
    return [row for row in rows if not row.strip().startswith(FIRMWARE_ROWS)]


def _tend_log(machine) -> None:
    """QEMU's exception log kept small while a wait lets the guest run (Machine.tend_exception_log)."""
    if hasattr(machine, "tend_exception_log"):      # a test's stand-in for a Machine may have none
        machine.tend_exception_log()


def in_code(elf: ElfInfo, ip: int) -> bool:
    """Whether `ip` lies in an executable segment of `elf`, at its link address."""
    return any(seg.executable and seg.vaddr <= ip < seg.vaddr + seg.memsz for seg in elf.segments)


def _arrives(machine, text: str, grace: float) -> bool:
    """Whether `text` is on COM1 now or within `grace` seconds (bytes the guest already wrote, still on their way)."""
    deadline = time.monotonic() + grace
    while text not in machine.serial:
        if time.monotonic() >= deadline:
            return False
        time.sleep(IDLE_POLL)
    return True


def _wait_breakpoint(machine, at: ReadyAt, timeout: float, elf: ElfInfo | None = None) -> str:
    """Stop the guest the first time its CPU reaches `at`, through QEMU's gdbstub (kgen/machine/gdbstub.py); return
    how it got there, leaving it stopped there (runstate "debug"), breakpoints removed and the stub hung up, so QMP
    and snapshots see a plain stopped machine. A CPU that halts for good first, a guest that dies, or the deadline
    raise MachineError (the guest then paused where it was, for the diagnosis)."""
    if getattr(machine, "gdb_socket", None) is None:
        raise ValueError("--ready-at needs a Machine(gdbstub=True, start_paused=True): see "
                         "BootPath.machine_options")
    stub = GdbStub(machine.gdb_socket)
    deadline = time.monotonic() + timeout
    regs = None
    spin = SelfJumpWatch(machine, elf)
    seen = BootWatch(machine, elf)
    try:
        stub.connect()
        for addr in at.addresses:
            stub.insert_breakpoint(addr)
        stub.cont()     # from -S: the first instruction the CPU runs is already watched
        while True:
            stop = stub.wait_stop(IDLE_POLL)
            if stop is not None and stop.signal == 5:           # SIGTRAP: our breakpoint, the only one there is
                regs = machine.registers()
                stub.remove_breakpoints()
                paging = "on" if regs.cr0 & CR0_PG else "off"
                where = ("" if regs.eip == at.addresses[0] or regs.eip not in at.addresses else
                         f" at its load address {regs.eip:#x}")
                return f"reached {at.name}{where}, paging {paging}"
            state = machine.status()
            if stop is not None and stop.final or state not in ("running", "debug", "paused"):
                raise MachineError(f"the guest stopped in runstate {state} before the CPU reached {at}")
            if stop is not None:
                stub.cont()     # paused by something else (SIGINT): carry on waiting for the breakpoint
                continue
            if state != "running":
                continue        # stopped at the breakpoint a moment ago: its stop reply is on the way
            _tend_log(machine)
            regs = machine.registers()
            seen.sample(regs, time.monotonic())
            paging = "on" if regs.cr0 & CR0_PG else "off"
            spinning = spin.sample(regs)
            if (regs.halted or spinning) and not regs.eflags & EFLAGS_IF:
                final = "halted with interrupts off" if regs.halted else f"is {spinning}"
                raise MachineError(f"the kernel {final} (for good, paging {paging}) before the CPU reached {at}")
            if time.monotonic() >= deadline:
                raise BootTimeout(f"the CPU did not reach {at} within {timeout:g} s; "
                                  + seen.report(Ready("at", at), time.monotonic()))
    except GdbStubError as err:
        if machine.status() == "exited":
            raise MachineError(f"QEMU exited before the CPU reached {at}") from None
        raise MachineError(f"--ready-at {at.name}: {err}") from None
    finally:
        if stub.breakpoints:        # a failure: stop the guest where it is, take the breakpoints out
            try:
                if machine.status() == "running":
                    stub.interrupt()
                stub.remove_breakpoints()
            except (GdbStubError, MachineError, OSError):
                pass                # QEMU is gone or wedged: the diagnosis will say so
        stub.close()


# A jump to itself: `jmp .` as a short jump (EB, displacement -2) or a near one (E9, displacement -5 from the end of
# its 5 bytes), or a jump back over NOPs only (gcc -O0 compiles `for(;;);` to `nop; jmp .-1`). With interrupts off
# nothing can take the CPU away from it (an NMI handler returns there). Only the kernel's own (ring 0, as `for(;;);`
# ends a panic) counts as it stopping: a process spinning in ring 3 with interrupts off is a kernel that lost control,
# reported as the hang it is.
SHORT_SELF_JUMP = b"\xeb\xfe"
NEAR_SELF_JUMP = b"\xe9\xfb\xff\xff\xff"
NOP = 0x90
MAX_LOOP_NOPS = 8       # NOPs a spin loop may hold besides its jump


class SelfJumpWatch:
    """Tells a CPU spinning in ring 0 on a jump to itself with interrupts off, from successive register samples. The
    code at EIP is read (through the guest's page tables) only when a sample finds the CPU running with interrupts off
    at the same EIP and CR3 as the one before, and once per such place: a boot that moves on pays nothing."""

    def __init__(self, machine, elf: ElfInfo | None):
        self.machine = machine
        self.elf = elf
        self.last: tuple[int, int] | None = None
        self.not_a_spin: set[tuple[int, int]] = set()

    def sample(self, regs) -> str | None:
        """"spinning on a jump to itself with interrupts off at <symbol>" when it is, else None."""
        ring = regs.cpl if regs.cpl is not None else regs.cs & 3
        place = (regs.eip, regs.cr3) if not regs.halted and not regs.eflags & EFLAGS_IF and ring == 0 else None
        previous, self.last = self.last, place
        if place is None or place != previous or place in self.not_a_spin:
            return None
        if not jumps_to_itself(self.machine, regs):
            self.not_a_spin.add(place)
            return None
        where = (self.elf.symbolize(regs.eip) if self.elf is not None
                 else regs.mode.hex(regs.eip))
        return f"spinning on a jump to itself with interrupts off at {where}"


def jumps_to_itself(machine, regs) -> bool:
    """Whether the CPU at EIP (RIP) spins on a jump to itself, or on one back over NOPs only with EIP among them,
    read as the CPU fetches it: through the page tables in CR3 with paging on, at that physical address with paging
    off (a flat code segment, as Multiboot leaves it). Code that cannot be read is not taken for one."""
    try:
        read = (GuestView(regs, machine.read_phys, None).need_walker().read_virtual if regs.cr0 & CR0_PG
                else machine.read_phys)
        ahead = read(regs.eip, min(MAX_LOOP_NOPS + len(NEAR_SELF_JUMP), 4096 - regs.eip % 4096))
        nops = len(ahead) - len(ahead.lstrip(bytes([NOP])))
        jump = ahead[nops:]
        if jump[:1] == SHORT_SELF_JUMP[:1] and len(jump) >= 2:
            size, displacement = 2, int.from_bytes(jump[1:2], "little", signed=True)
        elif jump[:1] == NEAR_SELF_JUMP[:1] and len(jump) >= 5:
            size, displacement = 5, int.from_bytes(jump[1:5], "little", signed=True)
        else:
            return False
        behind = -(nops + size + displacement)      # NOPs from the jump's target up to EIP
        if not 0 <= behind <= MAX_LOOP_NOPS - nops:
            return False
        return behind == 0 or read(regs.eip - behind, behind) == bytes([NOP]) * behind
    except (WalkError, MachineError, OSError, ValueError):
        return False


# Every byte value with the Accessed (bit 5) and Dirty (bit 6) bits of a paging entry's low byte cleared.
_WITHOUT_ACCESSED_DIRTY = bytes(b & ~(PTE_A | PTE_D) for b in range(256))


def tables_fingerprint(machine, regs, *, ignore_accessed: bool = False) -> tuple:
    """CR3 and a digest of every page table it reaches (top level first, then each table below in entry order), for
    `--ready-after`; with `ignore_accessed`, blind to the Accessed and Dirty bits the CPU sets as it runs, for
    --check-at to know a space it checked at an earlier hit unchanged for its checks (kgen/harness/checkat.py).

    The tables are found from their raw entries (present, and not a large page), not by a walk that decodes every
    page: that is the checks' work, ~1.5 s for one of xv6's spaces; this is a read of each table."""
    mode = GuestView(regs, machine.read_phys, None).mode
    large_at_top = mode.levels == 2 and bool(regs.cr4 & CR4_PSE)     # 32-bit paging: a PDE may map 4 MiB
    word = "I" if mode.entry_size == 4 else "Q"
    digest = hashlib.sha256()
    seen: set[int] = set()      # a recursive slot leads back to a table already read

    def visit(level: int, frame: int) -> None:
        seen.add(frame)
        count = 1 << mode.index_bits[level]         # PAE's top table: 4 entries
        table = machine.read_phys(frame, count * mode.entry_size)
        if ignore_accessed:
            low = bytearray(table)
            low[::mode.entry_size] = table[::mode.entry_size].translate(_WITHOUT_ACCESSED_DIRTY)
            digest.update(low)
        else:
            digest.update(table)
        if level == mode.levels - 1:
            return
        for entry in struct.unpack(f"<{count}{word}", table):
            if not entry & PTE_P or entry & PTE_PS and (level > 0 or large_at_top):
                continue
            lower = entry & mode.frame_mask
            if lower not in seen:
                visit(level + 1, lower)

    try:
        visit(0, regs.cr3 & mode.cr3_mask)
    except (MachineError, OSError, ValueError) as err:
        digest.update(str(err).encode())    # unreadable: the same broken tables twice still count as unchanged
    return regs.cr3, digest.hexdigest()

