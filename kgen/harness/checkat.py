"""`kgen test --check-at SYMBOL[,SYMBOL...]`: the page-table checks at every moment a kernel names, not at one.

A kernel's paging bugs show while it runs: at a fork, an exec, a context switch. So the machine stops each time its
CPU reaches one of the named places (a breakpoint through QEMU's gdbstub, kgen/machine/gdbstub.py, as --ready-at
stops it once), the checks run on the stopped machine, and it goes on: past the breakpoint by one step, then on
until the next hit. At each hit the checks judge the space in CR3 and every space the kernel keeps (a
`SpaceSource`, kgen/guest/spacesource.py: --address-spaces for another kernel, `as_spaces` for kgen's own), each
once. The verdict is the first hit at which a check fails: its place, number, symbolised IP, the callers as far as
frame pointers lead, the space and the findings.

The hits are counted from the first instruction the CPU runs (the machine is held at it while the breakpoints go
in), up to --check-count of them, for at most --check-for seconds (default: the boot timeout), or until the kernel
stops for good (halted or spinning with interrupts off, shut down): a kernel idle between timer-driven switches is
still watched. No hit at all is a failure: a place the kernel never reaches checks nothing.

Two drivers share the judging (`judge_hit`): `run_hits` holds the thread that runs it (a foreign kernel, booted for
this alone); `hits_in_background` serves the hits on a thread while the caller drives the kernel through its call
channel (kgen's own kernel and a scenario of calls: the stage in kgen/harness/suite/test_check_at.py). The call
channel uses COM2 and the RAM file only, the hits QMP and the gdbstub: the two never share a socket.

What a hit costs: docs/your-kernel.md, "What a hit costs".
"""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

from kgen.arch.hw import CR0_PG, EFLAGS_IF
from kgen.errors import KgenError, MachineError
from kgen.guest import invariants
from kgen.guest.elfinfo import ElfInfo
from kgen.guest.findings import failures
from kgen.guest.invariants import GuestView, NotApplicable
from kgen.guest.pagewalk import WalkError
from kgen.guest.spacesource import Space, SpaceSource
from kgen.harness.ready import IDLE_POLL, ReadyAt, SelfJumpWatch, in_code, resolve_ready_at, tables_fingerprint
from kgen.machine.gdbstub import GdbStub, GdbStubError

DEFAULT_COUNT = 100
BACKTRACE_DEPTH = 12
# The checks that judge one address space (the view's CR3): run on each space at each hit. The whole-machine checks
# (CR0, the boot CR3, temp-map slots) say nothing about a space, and poison only fills RAM at power-on.
SPACE_CHECKS = (invariants.check_recursive_slot, invariants.check_segments,
                invariants.check_nothing_below_kernel_base, invariants.check_no_user_pages,
                invariants.check_tables_referenced_once, invariants.check_tables_unpoisoned)
# kgen's own kernel at its as_switch stage: the same but the poison check, which reads every entry of every table
# (~0.4 s a space on x86_64, whose kernel half holds 256 PDPTs, and a kernel-half change is a change of every space);
# its suite checks the tables it makes for poison at rest (test_exercise, test_invariants).
KGEN_LIVE_CHECKS = tuple(check for check in SPACE_CHECKS if check is not invariants.check_tables_unpoisoned)


@dataclass(frozen=True)
class CheckAt:
    """Where to stop (`places`, each a symbol's addresses) and for how long: `count` hits, `seconds` (None: the
    boot timeout)."""
    places: tuple[ReadyAt, ...]
    count: int = DEFAULT_COUNT
    seconds: float | None = None

    @classmethod
    def from_options(cls, elf: ElfInfo, check_at: str | None, count: int | None = None,
                     seconds: float | None = None) -> CheckAt | None:
        """--check-at, --check-count and --check-for against the ELF (None without --check-at); a symbol the ELF
        does not have, a count or time that is no positive number, or a count or time without places raise
        KgenError (one line)."""
        if check_at is None:
            given = [name for name, value in (("--check-count", count), ("--check-for", seconds)) if value is not None]
            if given:
                raise KgenError(f"{given[0]} is for --check-at: name the places to check at, --check-at "
                                "SYMBOL[,SYMBOL...]")
            return None
        names = [name.strip() for name in str(check_at).split(",")]
        if not all(names):
            raise KgenError(f"--check-at {check_at}: an empty symbol name; give SYMBOL[,SYMBOL...]")
        places = tuple(resolve_ready_at(elf, name, "--check-at") for name in dict.fromkeys(names))
        if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count <= 0):
            raise KgenError(f"--check-count {count}: give a number of hits above 0")
        if seconds is not None and not float(seconds) > 0:
            raise KgenError(f"--check-for {seconds}: give seconds above 0")
        return cls(places, count if count is not None else DEFAULT_COUNT,
                   float(seconds) if seconds is not None else None)

    def describe(self) -> str:
        return ", ".join(place.name for place in self.places)


@dataclass
class SpaceVerdict:
    """What the checks found in one space at one hit: `problems` per check, by its function's name."""
    space: Space
    live: bool                  # the space in CR3
    problems: dict[str, list[str]] = field(default_factory=dict)

    @property
    def failed(self) -> bool:
        """Information (a guard page, a frame mapped twice) is shown, never a failure (kgen/guest/findings.py)."""
        return any(failures(problems) for problems in self.problems.values())

    @property
    def label(self) -> str:
        return f"{self.space.name} (top-level table {self.space.top:#x}{', in CR3' if self.live else ''})"


@dataclass
class Hit:
    """One stop at a named place and what the checks saw there."""
    number: int                 # 1 for the first hit of any place
    place: str                  # the symbol (or 0x address) as given
    ip: int
    where: str                  # the IP symbolised
    cr3: int
    callers: list[str]          # return addresses, symbolised, innermost first (empty without frame pointers)
    spaces: list[SpaceVerdict]
    unchecked: str | None = None    # why nothing was checked (paging off)
    unread: list[str] = field(default_factory=list)     # spaces the source could not follow at this hit
    seconds: float = 0.0        # what judging it took (registers, spaces, checks), the machine stopped

    @property
    def failed(self) -> bool:
        return any(v.failed for v in self.spaces)

    @property
    def first_failure(self) -> SpaceVerdict | None:
        return next((v for v in self.spaces if v.failed), None)

    def record(self) -> dict:
        """The hit as a JSON record (kgen/harness/jsonreport.py `hits`)."""
        return {"hit": self.number, "symbol": self.place, "ip": self.ip, "where": self.where, "cr3": self.cr3,
                "seconds": round(self.seconds, 4),
                "callers": self.callers, "outcome": "failed" if self.failed else "unchecked" if self.unchecked
                else "passed", "unchecked": self.unchecked, "unread": self.unread,
                "spaces": [{"name": v.space.name, "top": v.space.top, "live": v.live,
                            "findings": {check: [str(p) for p in failures(problems)]
                                         for check, problems in v.problems.items() if failures(problems)},
                            "info": {check: [str(p) for p in problems if getattr(p, "info", False)]
                                     for check, problems in v.problems.items()
                                     if len(failures(problems)) < len(problems)}}
                           for v in self.spaces]}

    def report(self) -> str:
        """The verdict of a failing hit, for a person: where, who called, which space, what is wrong."""
        lines = [f"hit {self.number} at {self.place}: IP {self.where}, CR3 {self.cr3:#x}"]
        if self.callers:
            lines.append("  called from " + " <- ".join(self.callers))
        lines += [f"  not followed at this hit: {problem}" for problem in self.unread]
        for verdict in self.spaces:
            if not verdict.failed:
                continue
            lines.append(f"  in {verdict.label}:")
            for check, problems in verdict.problems.items():
                if failures(problems):
                    lines.append(f"    {_title(check)}")
                    lines += [f"      {p}" for p in failures(problems)]
        return "\n".join(lines)


@dataclass
class HitRun:
    """Every hit of one run, how the run ended and how long it took."""
    check_at: CheckAt
    hits: list[Hit]
    ended: str
    seconds: float
    source: str | None          # where the spaces came from, None: CR3's only

    @property
    def first_failure(self) -> Hit | None:
        return next((hit for hit in self.hits if hit.failed), None)

    def summary(self) -> str:
        spaces = {v.space.top for hit in self.hits for v in hit.spaces}
        cr3s = {hit.cr3 for hit in self.hits}
        judged = sum(hit.seconds for hit in self.hits)
        per_hit = (f", the checks {1000 * judged / len(self.hits):.1f} ms a hit ({judged:.2f} s in all)"
                   if self.hits else "")
        return (f"--check-at {self.check_at.describe()}: {len(self.hits)} hit(s) in {self.seconds:.2f} s{per_hit}, "
                f"{len(cr3s)} distinct CR3, {len(spaces)} space(s) checked"
                + (f" (from {self.source})" if self.source else " (CR3's only: no --address-spaces)")
                + f"; ended: {self.ended}")


class SeenSpaces:
    """What the generic checks found in each space at earlier hits, by the space's tables: they judge a space by its
    tables alone (with the ELF, the poison and the paging bits of CR4 and EFER, the same all run long), so a space
    whose every table holds the same entries as at an earlier hit gets the same verdict without a second walk of each
    check (the poison check reads every entry of every table: ~0.4 s for kgen's x86_64 kernel; the user-page check
    translates every kernel page: ~2 s for xv6's 224 MiB kernel half). The Accessed and Dirty bits the CPU sets as
    it runs do not count: no check judges them (a message quoting an entry's attributes may show them as they were
    at the first hit)."""

    def __init__(self, machine):
        self.machine = machine
        self.verdicts: dict[tuple, dict[str, list[str]]] = {}

    def checks(self, view: GuestView, checks=SPACE_CHECKS) -> dict[str, list[str]]:
        regs = view.regs
        try:
            key = (tables_fingerprint(self.machine, regs, ignore_accessed=True), regs.cr4, regs.efer, checks)
        except (MachineError, OSError, ValueError):
            key = None      # tables that cannot be read: the checks say what is wrong
        if key is not None and key in self.verdicts:
            return self.verdicts[key]
        found: dict[str, list[str]] = {}
        for check in checks:
            try:
                found[check.__name__] = check(view)
            except NotApplicable:
                continue
        if key is not None:
            self.verdicts[key] = found
        return found


def _checks_of(view: GuestView, space: Space, live: bool, seen: SeenSpaces) -> dict[str, list[str]]:
    """The checks of one space: the generic ones (through the space, `in_space`); for kgen's kernel the generic ones
    but poison on the running space only (KGEN_LIVE_CHECKS) and `check_space` on each (a space not running may hold
    a stale kernel half on i386, which only check_space knows to leave out)."""
    found: dict[str, list[str]] = {}
    if view.layout is None:
        found.update(seen.checks(view if live else view.in_space(space.top, space.name)))
    elif live:
        found.update(seen.checks(view, KGEN_LIVE_CHECKS))
    if view.layout is not None:
        found[invariants.check_space.__name__] = _space_problems(view, space.top)
    return found


def _space_problems(view: GuestView, top: int) -> list[str]:
    try:   # idle=False: a hit may come while a space is attached (the loader fills one through the foreign slot)
        return invariants.check_space(view, top, idle=False)
    except WalkError as err:
        return [f"the page tables cannot be walked: {err}"]


def _title(name: str) -> str:
    """A check's summary line (the first of its docstring, as the suite's failures begin), from its name."""
    check = getattr(invariants, name, None)
    return check.__doc__.strip().splitlines()[0] if check is not None and check.__doc__ else name


def backtrace(view: GuestView, elf: ElfInfo, depth: int = BACKTRACE_DEPTH) -> list[int]:
    """Return addresses from the stack, innermost first, read through the live tables: the word at SP when it points
    into code (a hit at a function's first instruction: its caller), then the frame-pointer chain ([BP + word] the
    return address, [BP] the next BP) while it leads into code and up the stack. Empty where neither does (code
    built without frame pointers stops the chain at once)."""
    regs = view.regs
    word = 8 if regs.long_mode else 4
    try:
        walker = view.need_walker()
    except NotApplicable:
        return []

    def read(addr: int) -> int:
        return int.from_bytes(walker.read_virtual(addr, word), "little")

    found: list[int] = []
    try:
        top = read(regs.esp)
        if in_code(elf, top):
            found.append(top)
        bp = regs.ebp
        while bp and len(found) < depth:
            ret, up = read(bp + word), read(bp)
            if not in_code(elf, ret):
                break
            found.append(ret)
            if up <= bp:
                break
            bp = up
    except (WalkError, ValueError, MachineError, OSError):
        pass        # a frame pointer into nothing mapped: the chain ends there
    return found


def judge_hit(machine, elf: ElfInfo, layout, poison: bytes | None, source: SpaceSource | None, seen: SeenSpaces,
              number: int, place: str, boot_only=None) -> Hit:
    """Check the stopped machine at one hit: the space in CR3 and every space `source` lists, each once."""
    started = time.monotonic()
    hit = _judged(machine, elf, layout, poison, source, seen, number, place, boot_only)
    hit.seconds = time.monotonic() - started
    return hit


def _judged(machine, elf: ElfInfo, layout, poison: bytes | None, source: SpaceSource | None, seen: SeenSpaces,
            number: int, place: str, boot_only) -> Hit:
    regs = machine.registers()
    view = GuestView(regs, machine.read_phys, elf, layout, poison)
    view.boot_only = boot_only
    hit = Hit(number, place, regs.eip, elf.symbolize(regs.eip), regs.cr3, [], [])
    if not regs.cr0 & CR0_PG:
        hit.unchecked = "paging is off"
        return hit
    hit.callers = [elf.symbolize(addr) for addr in backtrace(view, elf)]
    live_top = regs.cr3 & view.mode.cr3_mask
    try:
        listed = source.spaces(view) if source is not None else []
        hit.unread = source.problems(view) if source is not None else []
    except (KgenError, WalkError, ValueError) as err:
        failed = SpaceVerdict(Space("the kernel's list of spaces", 0), False,
                              {"spaces": [f"{source.describe()}: the spaces could not be read: {err}"]})
        hit.spaces.append(failed)
        listed = []
    named = {space.top: space for space in listed}
    spaces = [named.get(live_top, Space(f"CR3's space", live_top))]
    spaces += [space for space in dict((s.top, s) for s in listed).values() if space.top != live_top]
    for space in spaces:
        live = space.top == live_top
        hit.spaces.append(SpaceVerdict(space, live, _checks_of(view, space, live, seen)))
    return hit


class _Breakpoints:
    """The gdbstub with a breakpoint at every address of the places: which place an address is, and the stub."""

    def __init__(self, machine, check_at: CheckAt):
        if getattr(machine, "gdb_socket", None) is None:
            raise ValueError("--check-at needs a Machine(gdbstub=True)")
        self.stub = GdbStub(machine.gdb_socket)
        self.place_of = {addr: place.name for place in check_at.places for addr in place.addresses}

    def __enter__(self) -> GdbStub:
        self.stub.connect()         # pauses a running guest
        for addr in self.place_of:
            self.stub.insert_breakpoint(addr)
        return self.stub

    def __exit__(self, *exc) -> None:
        try:
            if self.stub.breakpoints:
                self.stub.remove_breakpoints()
        except (GdbStubError, OSError):
            pass        # QEMU is gone or wedged: whoever looks next says so
        self.stub.close()


def run_hits(machine, elf: ElfInfo, layout, poison: bytes | None, source: SpaceSource | None, check_at: CheckAt,
             timeout: float, boot_only=None) -> HitRun:
    """Run a machine held at its first instruction (gdbstub on) through every hit of `check_at`, judging each; end
    at its count, after its seconds (else `timeout`), or when the kernel stops for good. The machine is left
    stopped. A guest that dies raises MachineError, with the hits so far in its `hits`."""
    seconds = check_at.seconds if check_at.seconds is not None else timeout
    hits: list[Hit] = []
    started = time.monotonic()
    deadline = started + seconds
    spin = SelfJumpWatch(machine, elf)
    seen = SeenSpaces(machine)
    bps = _Breakpoints(machine, check_at)
    try:
        with bps as stub:
            stub.cont()
            while True:
                stop = stub.wait_stop(IDLE_POLL)
                if stop is not None and stop.signal == 5:
                    regs_ip = machine.registers().eip
                    place = bps.place_of.get(regs_ip)
                    if place is not None:
                        hits.append(judge_hit(machine, elf, layout, poison, source, seen, len(hits) + 1, place,
                                              boot_only))
                        if len(hits) >= check_at.count:
                            ended = f"{check_at.count} hits (--check-count)"
                            break
                        if time.monotonic() >= deadline:
                            ended = f"{seconds:g} s (--check-for) ran out"
                            break
                        stub.step_over_breakpoints()
                    stub.cont()
                    continue
                state = machine.status()
                if stop is not None and stop.final or state not in ("running", "debug", "paused"):
                    raise MachineError(f"the guest stopped in runstate {state} after {len(hits)} hit(s) of "
                                       f"{check_at.describe()}")
                if stop is not None:
                    stub.cont()         # paused by something else (SIGINT): go on
                    continue
                if state != "running":
                    continue            # at a breakpoint a moment ago: its stop reply is on the way
                regs = machine.registers()
                spinning = spin.sample(regs)
                if (regs.halted or spinning) and not regs.eflags & EFLAGS_IF:
                    ended = ("the kernel halted with interrupts off" if regs.halted
                             else f"the kernel is {spinning}")
                    break
                if time.monotonic() >= deadline:
                    ended = f"{seconds:g} s (--check-for) ran out"
                    break
            if machine.status() == "running":
                stub.interrupt()
    except GdbStubError as err:
        if machine.status() == "exited":
            failed = MachineError(f"QEMU exited after {len(hits)} hit(s) of {check_at.describe()}")
        else:
            failed = MachineError(f"--check-at {check_at.describe()}: {err}")
        failed.hits = hits
        raise failed from None
    except MachineError as err:
        err.hits = hits
        raise
    return HitRun(check_at, hits, ended, time.monotonic() - started,
                  source.describe() if source is not None else None)


@contextmanager
def hits_in_background(machine, elf: ElfInfo, layout, poison: bytes | None, source: SpaceSource | None,
                       check_at: CheckAt):
    """Judge every hit of `check_at` on a thread of its own while the caller drives the kernel (its call channel:
    COM2, never QMP, which this thread uses). Yields the list the hits are appended to; on leaving, the machine is
    stopped and the breakpoints taken out. An error of the thread (the stub went away) is raised there."""
    hits: list[Hit] = []
    done = threading.Event()
    errors: list[BaseException] = []
    seen = SeenSpaces(machine)
    bps = _Breakpoints(machine, check_at)
    stub = bps.__enter__()

    def serve() -> None:
        try:
            stub.cont()
            while not done.is_set():
                stop = stub.wait_stop(IDLE_POLL)
                if stop is None:
                    continue
                if stop.final:
                    return
                if stop.signal == 5:
                    place = bps.place_of.get(machine.registers().eip)
                    if place is not None:
                        hits.append(judge_hit(machine, elf, layout, poison, source, seen, len(hits) + 1, place))
                        stub.step_over_breakpoints()
                stub.cont()
        except BaseException as err:  # noqa: BLE001 - handed to the caller's thread
            errors.append(err)

    thread = threading.Thread(target=serve, name="kgen-check-at", daemon=True)
    thread.start()
    try:
        yield hits
    finally:
        done.set()
        thread.join()
        try:
            if machine.status() == "running":
                stub.interrupt()
        except (GdbStubError, MachineError, OSError):
            pass
        bps.__exit__(None, None, None)
    if errors:
        raise errors[0]
