"""Kernels under test: booting one to the state the invariant suite inspects, and `kgen test`, which runs that
suite (kgen/suite, shipped in the package) on pytest.

A kgen kernel is booted to serve calls (`kgen.serve`); it then sleeps in `hlt`, changing no memory, so it can be
stopped, inspected, and continued for the next call. Anyone else's Multiboot ELF has no call channel: it counts as
booted when it prints its ready text (`--ready`), or, without one, when it reaches a state it will not leave by
itself or idles (`wait_booted`): halted with interrupts off (paging on or off: final at once), or halted with
interrupts on and paging on at the same instruction for IDLE_SETTLE seconds. `--ready-at` stops it where the CPU
first reaches a symbol (a breakpoint through QEMU's gdbstub), `--ready-vga` once its VGA text screen shows a text.
"""
from __future__ import annotations

import difflib
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from kgen.guest.elfinfo import MULTIBOOT_SEARCH, ElfInfo
from kgen.errors import (EXIT_CHECKS_FAILED, EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, KgenError,
                         MachineError, ToolMissing, UsageError)
from kgen.build.layout import Layout

# int3 in every byte of RAM the kernel did not write: code run from such memory traps at once, and as a paging
# entry 0xcccccccc is not present, so a table that was never cleared shows up as poison rather than as garbage
# mappings the walk would have to survive.
POISON = b"\xcc"
BOOT_TIMEOUT = 60.0
IDLE_POLL = 0.01
# A kernel halted with interrupts on wakes for each interrupt; found halted at the same instruction this long
# apart, with no sample in between outside it, it idles (a timer tick's handler is rarely caught running).
IDLE_SETTLE = 0.2
EFLAGS_IF = 1 << 9
# COM1 bytes reach `machine.serial` through a reader thread, after the CPU wrote them: a kernel that prints its ready
# text and halts at once can be seen halted before the text is seen. A final state gives that text this long to
# arrive before it counts as "halted before the text appeared".
FINAL_SERIAL_GRACE = 1.0
PLUGIN_ENTRY_POINT = "kgen"
KVM_PROBE_CACHE = ".kgen-kvm-probe.json"
SUITE = Path(__file__).resolve().parent / "suite"


@dataclass(frozen=True)
class KernelUnderTest:
    """The ELF and, for a kernel kgen built, the layout it was built from (None for anyone else's ELF)."""
    elf_path: Path
    elf: ElfInfo
    layout: Layout | None = None
    ready: str | None = None        # COM1 text a foreign kernel prints once booted
    # How a foreign kernel is booted: RAM, command line, Multiboot modules (QEMU -initrd), extra QEMU arguments.
    boot_timeout: float = BOOT_TIMEOUT
    memory_mib: int = 128
    append: str | None = None
    modules: tuple[str, ...] = ()
    qemu_args: tuple[str, ...] = ()
    ready_symbol: str | None = None     # a function a foreign kernel stays in once booted (its idle loop)
    ready_after: float | None = None    # seconds of unchanged page tables that count as booted
    ready_at: ReadyAt | None = None     # where the CPU is stopped the first time it gets there (a breakpoint)
    ready_vga: str | None = None        # VGA text-screen text a foreign kernel shows once booted
    # Program-header indices of segments that are boot code (may be unmapped once the kernel runs high, not the
    # kernel base); None: the default rule (GuestView.boot_segments).
    boot_only_segments: tuple[int, ...] | None = None

    @classmethod
    def built(cls, config_path: Path | None, out_dir: Path, arch: str | None = None) -> KernelUnderTest:
        from kgen.build import config as configmod
        from kgen.build.pipeline import build, current_elf
        from kgen.build.layout import compute
        config = configmod.load(config_path, arch)
        # Each parallel worker asks; linking again (~0.4 s) only to find the ELF up to date is the common case. The
        # stamp names the ELF's bytes too, so an ELF another build left beside it is not taken for this config's.
        elf = current_elf(config, out_dir) or build(config, out_dir, iso=False, force=False).elf
        return cls(elf, ElfInfo.load(elf), compute(config))

    @classmethod
    def foreign(cls, elf_path: Path, ready: str | None = None, *, boot_timeout: float | None = None,
                memory_mib: int | None = None, append: str | None = None, modules=(), qemu_args=(),
                ready_symbol: str | None = None, ready_after: float | None = None, ready_at: str | None = None,
                ready_vga: str | None = None, boot_only_segments=None) -> KernelUnderTest:
        elf = ElfInfo.load(elf_path)
        for index in boot_only_segments or ():
            problem = boot_only_problem(elf, index)
            if problem is not None:
                raise KgenError(f"{elf_path}: --boot-only-segment {index}: {problem}")
        if ready_symbol is not None and ready_symbol not in elf.symbols:
            raise KgenError(f"{elf_path}: no symbol {ready_symbol!r} for --ready-symbol (its symbol table names "
                            "functions and labels; a stripped ELF has none)")
        if sum(x is not None for x in (ready, ready_symbol, ready_after, ready_at, ready_vga)) > 1:
            raise KgenError(f"{elf_path}: give one of --ready, --ready-symbol, --ready-after, --ready-at, --ready-vga")
        at = resolve_ready_at(elf, ready_at) if ready_at is not None else None
        return cls(Path(elf_path), elf, None, ready, boot_timeout or BOOT_TIMEOUT, memory_mib or 128, append,
                   tuple(modules), tuple(qemu_args), ready_symbol, ready_after, at, ready_vga,
                   None if boot_only_segments is None else tuple(sorted(set(boot_only_segments))))

    @property
    def qemu(self) -> str:
        """The QEMU binary for this kernel: its architecture's; a foreign ELF32 gets qemu-system-i386, an ELF64
        (booted through its Multiboot header's address fields) qemu-system-x86_64."""
        from kgen.arch import I386, X86_64
        if self.layout is not None:
            return self.layout.architecture.qemu
        return (X86_64 if self.elf.bits == 64 else I386).qemu

    def machine_options(self, accel: str, poison: bytes | None) -> dict:
        """Machine(...) arguments booting this foreign kernel as the user asked."""
        extra = list(initrd_args(self.modules)) + list(drives_copy_on_write(self.qemu_args))
        # --ready-at: held at the first instruction (-S) with the gdbstub up, so the breakpoint is in before the
        # CPU runs anything (a symbol in the boot code is passed within microseconds).
        at = dict(gdbstub=True, start_paused=True) if self.ready_at is not None else {}
        return dict(kernel=self.elf_path, accel=accel, poison=poison, qemu=self.qemu, memory_mib=self.memory_mib,
                    append=self.append, extra_args=tuple(extra), **at)

    @property
    def probe_marker(self) -> str | None:
        """COM1 text that shows a boot got far enough, for the KVM probe."""
        from kgen.guest.bootreport import BOOT_OK
        return BOOT_OK if self.layout is not None else self.ready


class LiveKernel:
    """A booted kernel. `view()` stops the guest and snapshots it; `call()` continues it and runs a routine."""

    def __init__(self, kernel: KernelUnderTest, machine, channel=None, poison: bytes | None = None):
        self.kernel = kernel
        self.machine = machine
        self.channel = channel
        self.poison = poison
        self._view = None

    def stop(self) -> None:
        if self.machine.status() == "running":
            self.machine.stop()

    def cont(self) -> None:
        self._view = None
        if self.machine.status() == "paused":
            self.machine.cont()

    def view(self):
        """The stopped guest as the invariant checks see it; taken again after anything continued the guest."""
        from kgen.guest.invariants import GuestView
        if self._view is None:
            self.stop()
            self._view = GuestView.capture(self.machine, self.kernel.elf, self.kernel.layout, self.poison)
            self._view.boot_only = self.kernel.boot_only_segments
        return self._view

    def write_phys(self, addr: int, data: bytes) -> None:
        self.stop()
        self._view = None
        self.machine.write_phys(addr, data)

    def call(self, routine: str | int, *args: int, timeout: float | None = None) -> int:
        """Run a kernel routine; one that faults or never returns raises `RunFailed` saying which and where."""
        from kgen.guest.calls import CallError
        from kgen.guest.diagnose import RunFailed, explain
        if self.channel is None:
            raise KgenError(f"{self.kernel.elf_path.name} has no kgen call channel: routines cannot be called")
        self.cont()
        try:
            return self.channel.call(routine, *args, **({} if timeout is None else {"timeout": timeout}))
        except CallError as err:
            # The channel appends COM1's tail; the diagnosis shows that in its details already.
            why = str(err).split("; last output", 1)[0]
            raise RunFailed(explain(self.machine, self.kernel.elf, why)) from err


@contextmanager
def boot(kernel: KernelUnderTest, accel: str = "tcg", *, poison: bytes | None = POISON,
         timeout: float = BOOT_TIMEOUT, cold: bool | None = None):
    """Boot to the inspectable state; a boot that fails raises `RunFailed` saying what the kernel did instead.

    The machine comes from a snapshot of that state when one exists (kgen/machine/snapshot.py; `cold=True` or
    `--kgen-cold-boot` boots every time)."""
    from kgen.guest.diagnose import Failure, RunFailed, explain
    from kgen.harness.session import KernelSession
    from kgen.machine.snapshot import fresh_machine

    if kernel.layout is not None:
        with KernelSession(kernel.elf_path, kernel.layout, accel=accel, poison=poison, cold=cold) as session:
            yield LiveKernel(kernel, session.machine, session.channel, poison)
        return

    if timeout == BOOT_TIMEOUT:
        timeout = kernel.boot_timeout

    def ready(machine) -> None:
        try:
            wait_booted(machine, kernel.ready, timeout, symbol=kernel.ready_symbol, elf=kernel.elf,
                        settle=kernel.ready_after, at=kernel.ready_at, vga=kernel.ready_vga)
        except MachineError as err:
            raise RunFailed(explain(machine, kernel.elf, err)) from err

    options = kernel.machine_options(accel, poison)
    how = (f"ready: {kernel.ready}" if kernel.ready else
           f"inside: {kernel.ready_symbol}" if kernel.ready_symbol else
           f"settled: {kernel.ready_after}" if kernel.ready_after else
           f"at: {kernel.ready_at.addresses}" if kernel.ready_at else
           f"vga: {kernel.ready_vga}" if kernel.ready_vga else "halted or idle")
    try:
        machine = fresh_machine(options, ready, how, cold=cold)
    except MachineError as err:
        refusal = qemu_refusal(err)
        if refusal is None:
            raise
        raise RunFailed(Failure("refused", f"QEMU refused to boot {kernel.elf_path.name}: {refusal}",
                                err.details() if hasattr(err, "details") else str(err))) from None
    try:
        yield LiveKernel(kernel, machine, None, poison)
    finally:
        machine.shutdown()


def wait_booted(machine, ready: str | None, timeout: float, *, symbol: str | None = None,
                elf: ElfInfo | None = None, settle: float | None = None, at: ReadyAt | str | None = None,
                vga: str | None = None) -> str:
    """Wait until a foreign kernel is ready to be looked at; return how it got there, or raise `MachineError`.

    With `ready`, when that text is on COM1. With `symbol`, when the CPU stays inside that function of `elf`
    (EIP named after it at samples IDLE_SETTLE seconds apart, none in between elsewhere): a place the kernel stays,
    such as its idle or busy loop, found without a breakpoint. With `settle`, when paging is on and CR3 and every
    page table it reaches have not changed for that many seconds (a kernel that never halts, running its own code or
    a module's). With `at` (a `ReadyAt`, or a symbol of `elf` or 0x address), when the CPU first gets there: a
    breakpoint (`_wait_breakpoint`), the machine then left stopped exactly there. With `vga`, when the VGA text
    screen shows that text (kgen/guest/vga.py). Without any of these, when the CPU is halted with
    interrupts off (nothing can wake it: final at once, paging on or off), or halted with interrupts on and paging
    on at the same instruction IDLE_SETTLE seconds apart (an idle loop). A CPU spinning on a jump to itself with
    interrupts off (`for(;;);` at the end of a panic) is as final as that halt (`SelfJumpWatch`). A final state
    before the text appeared, or outside the symbol, is reported at once too."""
    from kgen.arch.hw import CR0_PG
    from kgen.guest import vga as screen
    if at is not None:
        return _wait_breakpoint(machine, resolve_ready_at(elf, at) if isinstance(at, str) else at, timeout, elf)
    if settle is not None:
        goal = f"settled (page tables unchanged for {settle:g} s)"
    elif symbol is not None:
        goal = f"inside {symbol}"
    elif ready is not None:
        goal = f"ready ({ready!r} on COM1)"
    elif vga is not None:
        goal = f"showing {vga!r} on the VGA screen"
    else:
        goal = "halted"
    deadline = time.monotonic() + timeout
    settled: tuple[int | str, float] | None = None      # (EIP or symbol, when first seen there)
    regs = None
    spin = SelfJumpWatch(machine, elf)
    from kgen.guest import faultloop
    next_probe = time.monotonic() + faultloop.FIRST_PROBE_AFTER
    while True:
        if ready is not None and ready in machine.serial:
            return f"printed {ready!r}"
        state = machine.status()
        if state != "running":
            raise MachineError(f"the guest stopped in runstate {state} before it was {goal}")
        if vga is not None and screen.shows(screen.screen_rows(machine), vga):
            return f"showed {vga!r} on the VGA screen"
        regs = machine.registers()
        now = time.monotonic()
        paging = "on" if regs.cr0 & CR0_PG else "off"
        here = None
        if symbol is not None:
            found = elf.symbol_at(regs.eip) if elf is not None else None
            here = symbol if found is not None and found.name == symbol else None
        spinning = spin.sample(regs)
        if (regs.halted or spinning) and not regs.eflags & EFLAGS_IF:
            final = "halted with interrupts off" if regs.halted else f"is {spinning}"
            if symbol is None and ready is None and vga is None:
                return f"{final}, paging {paging}"     # final: nothing will change any more
            if ready is not None and _arrives(machine, ready, FINAL_SERIAL_GRACE):
                return f"printed {ready!r}"
            if vga is not None and screen.shows(screen.screen_rows(machine), vga):
                return f"showed {vga!r} on the VGA screen"
            if here is not None:
                return f"{'halted' if regs.halted else 'spinning'} in {symbol}, interrupts off, paging {paging}"
            raise MachineError(f"the kernel {final} (for good, paging {paging}) before "
                               + (f"{ready!r} appeared on COM1" if ready is not None else
                                  f"{vga!r} appeared on the VGA screen" if vga is not None else f"it reached {symbol}"))
        if settle is not None:
            mark = _tables_fingerprint(machine, regs) if regs.cr0 & CR0_PG else None
        elif symbol is not None:
            mark = here
        elif ready is None and vga is None and regs.halted and regs.cr0 & CR0_PG:
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
            if settle is not None:
                want = f"paging was not on with page tables unchanged for {settle:g} s"
            elif symbol is not None:
                want = f"the CPU did not stay in {symbol}"
            elif ready is not None:
                want = f"{ready!r} did not appear on COM1"
            elif vga is not None:
                want = f"{vga!r} did not appear on the VGA screen"
            else:
                want = "the kernel neither halted with interrupts off nor sat idle in hlt with paging on"
            raise MachineError(f"{want} within {timeout:g} s (last seen: "
                               f"{'halted' if regs.halted else 'running'}, interrupts "
                               f"{'on' if regs.eflags & EFLAGS_IF else 'off'}, paging {paging}); pass --ready "
                               f"TEXT, --ready-vga TEXT, --ready-at SYMBOL or --ready-symbol SYMBOL, or a longer "
                               f"--boot-timeout")
        time.sleep(IDLE_POLL)


def _arrives(machine, text: str, grace: float) -> bool:
    """Whether `text` is on COM1 now or within `grace` seconds (bytes the guest already wrote, still on their way)."""
    deadline = time.monotonic() + grace
    while text not in machine.serial:
        if time.monotonic() >= deadline:
            return False
        time.sleep(IDLE_POLL)
    return True


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


def resolve_ready_at(elf: ElfInfo, text: str) -> ReadyAt:
    """`--ready-at` as a symbol of the ELF or a 0x address; an unknown symbol raises KgenError naming close ones."""
    if text.lower().startswith("0x"):
        try:
            return ReadyAt(text, (int(text, 16),))
        except ValueError:
            raise KgenError(f"{elf.path.name}: --ready-at {text}: not a hex address (0x then hex digits)") from None
    sym = elf.symbols.get(text)
    if sym is None:
        close = difflib.get_close_matches(text, list(elf.symbols), n=4, cutoff=0.6)
        close += [name for name in sorted(elf.symbols) if text.lower() in name.lower() and name not in close][:4]
        hint = (f"close matches: {', '.join(close)}" if close else
                "it has no symbols (stripped?)" if not elf.symbols else "nothing close")
        raise KgenError(f"{elf.path.name}: no symbol {text!r} for --ready-at ({hint}); name a symbol of the ELF "
                        "or give a 0x address")
    loads = [sym.value - seg.vaddr + seg.paddr for seg in elf.segments
             if seg.paddr != seg.vaddr and seg.vaddr <= sym.value < seg.vaddr + seg.memsz]
    return ReadyAt(text, tuple(dict.fromkeys([sym.value, *loads])))


def _wait_breakpoint(machine, at: ReadyAt, timeout: float, elf: ElfInfo | None = None) -> str:
    """Stop the guest the first time its CPU reaches `at`, through QEMU's gdbstub (kgen/machine/gdbstub.py); return
    how it got there, leaving it stopped there (runstate "debug"), breakpoints removed and the stub hung up, so QMP
    and snapshots see a plain stopped machine. A CPU that halts for good first, a guest that dies, or the deadline
    raise MachineError (the guest then paused where it was, for the diagnosis)."""
    from kgen.arch.hw import CR0_PG
    from kgen.machine.gdbstub import GdbStub, GdbStubError
    if getattr(machine, "gdb_socket", None) is None:
        raise ValueError("--ready-at needs a Machine(gdbstub=True, start_paused=True): see "
                         "KernelUnderTest.machine_options")
    stub = GdbStub(machine.gdb_socket)
    deadline = time.monotonic() + timeout
    regs = None
    spin = SelfJumpWatch(machine, elf)
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
            regs = machine.registers()
            paging = "on" if regs.cr0 & CR0_PG else "off"
            spinning = spin.sample(regs)
            if (regs.halted or spinning) and not regs.eflags & EFLAGS_IF:
                final = "halted with interrupts off" if regs.halted else f"is {spinning}"
                raise MachineError(f"the kernel {final} (for good, paging {paging}) before the CPU reached {at}")
            if time.monotonic() >= deadline:
                raise MachineError(f"the CPU did not reach {at} within {timeout:g} s (last seen: "
                                   f"{'halted' if regs.halted else 'running'}, interrupts "
                                   f"{'on' if regs.eflags & EFLAGS_IF else 'off'}, paging {paging}); name a place "
                                   "the kernel gets to, or give a longer --boot-timeout")
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
# its 5 bytes). With interrupts off nothing can take the CPU away from it (an NMI handler returns there). Only the
# kernel's own (ring 0, as `for(;;);` ends a panic) counts as it stopping: a process spinning in ring 3 with
# interrupts off is a kernel that lost control, reported as the hang it is.
SHORT_SELF_JUMP = b"\xeb\xfe"
NEAR_SELF_JUMP = b"\xe9\xfb\xff\xff\xff"


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
                 else f"{regs.eip:#0{18 if regs.long_mode else 10}x}")
        return f"spinning on a jump to itself with interrupts off at {where}"


def jumps_to_itself(machine, regs) -> bool:
    """Whether the instruction at EIP (RIP) is a jump to itself, read as the CPU fetches it: through the page
    tables in CR3 with paging on, at that physical address with paging off (a flat code segment, as Multiboot
    leaves it). Code that cannot be read is not taken for one."""
    from kgen.arch.hw import CR0_PG
    from kgen.guest.invariants import GuestView
    from kgen.guest.pagewalk import WalkError
    try:
        read = (GuestView(regs, machine.read_phys, None).need_walker().read_virtual if regs.cr0 & CR0_PG
                else machine.read_phys)
        head = read(regs.eip, len(SHORT_SELF_JUMP))
        return head == SHORT_SELF_JUMP or (head[:1] == NEAR_SELF_JUMP[:1]
                                           and read(regs.eip, len(NEAR_SELF_JUMP)) == NEAR_SELF_JUMP)
    except (WalkError, MachineError, OSError, ValueError):
        return False


def _tables_fingerprint(machine, regs) -> tuple:
    """CR3 and a digest of every page table it reaches (top level first), for `--ready-after`."""
    from kgen.guest.invariants import GuestView
    from kgen.guest.pagewalk import WalkError
    view = GuestView(regs, machine.read_phys, None)
    digest = hashlib.sha256()
    try:
        walker = view.need_walker()
        for frame in [walker.top] + [frame for _, frame in walker.page_tables()]:
            digest.update(machine.read_phys(frame, 4096))
    except WalkError as err:
        digest.update(str(err).encode())    # unwalkable: the same broken tables twice still count as unchanged
    return regs.cr3, digest.hexdigest()


def multiboot_problem(elf: ElfInfo) -> str | None:
    """What stops QEMU's -kernel from booting this ELF as Multiboot, or None: no header, or an ELF64 without the
    header's address fields (flag bit 16), which QEMU needs to load anything but an ELF32."""
    offset = elf.multiboot_header_offset()
    if offset is None:
        return (f"an ELF{elf.bits} with no Multiboot header in its first {MULTIBOOT_SEARCH // 1024} KiB: QEMU's "
                "-kernel boots Multiboot (v1) kernels only")
    flags = int.from_bytes(elf.head[offset + 4:offset + 8], "little")
    if elf.bits != 32 and not flags & MULTIBOOT_AOUT_KLUDGE:
        return ("an ELF64 whose Multiboot header lacks the address fields (flag bit 16): QEMU's -kernel loads "
                "an ELF64 only through them")
    return None


MULTIBOOT_AOUT_KLUDGE = 1 << 16


def qemu_refusal(err: BaseException) -> str | None:
    """QEMU's own reason when it exited at launch (it refused the kernel or an argument), one line, else None."""
    if getattr(err, "step", None) not in ("launch", "qmp-connect"):
        return None
    lines = [line.strip() for line in getattr(err, "stderr_tail", "").splitlines() if line.strip()]
    lines = [line for line in lines if "CPUID" not in line or "doesn't support" not in line]   # KVM's harmless note
    if lines:
        return lines[-1]        # QEMU may not have been reaped yet when the handshake failed: its words decide
    status = getattr(err, "qemu_status", None)
    return None if status is None else f"QEMU exited with status {status} and said nothing"


def initrd_args(modules) -> tuple[str, ...]:
    """QEMU's -initrd for Multiboot modules given as FILE[,ARGS]: "FILE ARGS,FILE2" (a comma in ARGS doubled)."""
    if not modules:
        return ()
    parts = []
    for spec in modules:
        path, _, args = spec.partition(",")
        parts.append(f"{Path(path).resolve()} {args.replace(',', ',,')}".rstrip())
    return ("-initrd", ",".join(parts))


# -hda FILE is QEMU's short form of a -drive at that IDE index.
_SHORT_DRIVES = {"-hda": 0, "-hdb": 1, "-hdc": 2, "-hdd": 3}


def drives_copy_on_write(args) -> tuple[str, ...]:
    """The user's QEMU arguments with every disk (-drive, -hda..-hdd) opened `snapshot=on`: the guest's writes go to
    a temporary overlay, never into the user's image. Under `kgen test` that is what makes a kernel with a disk
    testable: each test starts from the same disk, the parallel machines do not fight over the image's write lock
    (QEMU refuses a second writer), and the overlay is a qcow2, so `savevm` can snapshot the booted machine (a raw
    image cannot). `kgen run` passes the arguments as given: there the guest's writes are the user's to keep."""
    out: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg in ("-drive", "--drive") and i + 1 < len(args):
            spec = args[i + 1]
            if not re.search(r"(?:^|,)snapshot=", spec):
                spec += ",snapshot=on"
            out += [arg, spec]
            i += 2
        elif arg in _SHORT_DRIVES and i + 1 < len(args):
            path = args[i + 1].replace(",", ",,")       # QEMU's escape for a comma inside an option value
            out += ["-drive", f"file={path},index={_SHORT_DRIVES[arg]},media=disk,snapshot=on"]
            i += 2
        else:
            out.append(arg)
            i += 1
    return tuple(out)


def split_qemu_args(lines) -> tuple[str, ...]:
    """--qemu-arg values, each split like a shell line: `--qemu-arg '-smp 2'` gives two arguments."""
    import shlex
    try:
        return tuple(arg for line in lines for arg in shlex.split(line))
    except ValueError as err:
        raise UsageError(f"--qemu-arg: {err}; quote each argument as a shell would") from None


def check_modules(modules) -> None:
    """Refuse in one line a --module whose file is missing or whose path QEMU's -initrd list cannot hold."""
    for spec in modules:
        path = spec.partition(",")[0]
        if not Path(path).is_file():
            raise UsageError(f"--module {spec}: {path!r} is no such file")
        if " " in str(Path(path).resolve()):
            raise UsageError(f"--module {spec}: QEMU's -initrd cannot take a path with a space; move the file")


def check_qemu_accepts(kernel: KernelUnderTest) -> None:
    """Launch QEMU once, paused, on the kernel and its options: a kernel or argument it refuses is one line, with
    QEMU's own reason, before the suite runs (not once per test)."""
    from kgen.machine import Machine
    options = kernel.machine_options("tcg", None)
    machine = Machine(**{**options, "start_paused": True}, ram_file=False)
    try:
        launch_refusing(machine, kernel.elf_path, kernel.elf)
    finally:
        machine.quit()


def launch_refusing(machine, elf_path: Path | None, elf: ElfInfo | None = None) -> None:
    """Launch `machine`; when QEMU refuses a kernel the user gave (`elf_path`, from --kernel) that is the user's
    input: one line with what is wrong with its Multiboot header, if anything, and QEMU's own reason (UsageError).
    kgen test, kgen run and kgen debug say it alike."""
    try:
        machine.launch()
    except MachineError as err:
        refusal = qemu_refusal(err)
        if refusal is None or elf_path is None:
            raise
        problem = multiboot_problem(elf if elf is not None else ElfInfo.load(elf_path))
        raise UsageError(f"--kernel {elf_path}: " + (f"{problem}; " if problem else "")
                         + f"QEMU refused to boot it: {refusal}") from None


def probe_kvm(kernel: KernelUnderTest, cache_dir: Path | None = None) -> tuple[bool, str]:
    """Whether KVM on this host can run this kernel (kvm_pvm cannot run 32-bit paging): one short boot.

    The boot costs seconds where KVM is a software hypervisor (≈3 s here), more than the rest of the suite, so the
    answer is kept in `cache_dir` for the same kernel bytes, QEMU binary and host kernel."""
    from kgen.machine import kvm_usable_for
    marker = kernel.probe_marker
    cache = key = None
    if cache_dir is not None:
        qemu = shutil.which(kernel.qemu)
        key = hashlib.sha256(kernel.elf_path.read_bytes() + repr(
            (os.uname().release, qemu, qemu and os.stat(qemu).st_mtime_ns, os.access("/dev/kvm", os.R_OK | os.W_OK))
        ).encode()).hexdigest()
        cache = cache_dir / KVM_PROBE_CACHE
        try:
            saved = json.loads(cache.read_text())
            if saved["key"] == key:
                return saved["usable"], saved["why"] + " (probed earlier, answer kept in " + str(cache) + ")"
        except (OSError, ValueError, KeyError, TypeError):
            pass    # no answer kept, or not one we wrote: probe
    if kernel.layout is None:
        usable, why = _probe_foreign_kvm(kernel)
    else:
        usable, why = kvm_usable_for(kernel.elf_path, marker, qemu=kernel.qemu)
    if cache is not None:
        cache.write_text(json.dumps({"key": key, "usable": usable, "why": why}))
    return usable, why


def _probe_foreign_kvm(kernel: KernelUnderTest) -> tuple[bool, str]:
    """A foreign kernel boots under KVM to the state the suite waits for (its ready text, or a halt)."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False, "/dev/kvm is missing or not accessible"
    started = time.monotonic()
    try:
        with boot(kernel, "kvm", poison=None, cold=True, timeout=min(kernel.boot_timeout, KVM_PROBE_TIMEOUT)):
            pass
    except MachineError as err:
        return False, f"the KVM boot failed: {err}"
    return True, f"the KVM boot got there in {time.monotonic() - started:.2f} s"


KVM_PROBE_TIMEOUT = 20.0


# --- `kgen test` ------------------------------------------------------------------------------------------------

def pytest_args(args, extra: list[str]) -> list[str]:
    """The pytest command line that runs the packaged suite as `kgen test` was asked to."""
    argv = [str(SUITE), "-c", str(SUITE / "pytest.ini"), "--rootdir", str(SUITE),
            # The suite may live in site-packages: write no cache there.
            "-p", "no:cacheprovider", "--kgen-accel", args.accel]
    if importlib.metadata.entry_points(group="pytest11", name=PLUGIN_ENTRY_POINT):
        # pytest would rewrite the asserts of the plugin's package, but `kgen test` has imported kgen already.
        argv += ["-W", "ignore::pytest.PytestAssertRewriteWarning"]
    else:
        argv += ["-p", "kgen.harness.pytest_plugin"]      # a checkout on PYTHONPATH: the entry point is not installed
    if args.kernel is not None:
        argv += ["--kgen-kernel", str(args.kernel.resolve())]
        # `=` forms: a value may begin with "-" (a QEMU argument) or hold spaces.
        for option, value in (("--kgen-ready", getattr(args, "ready", None)),
                              ("--kgen-ready-symbol", getattr(args, "ready_symbol", None)),
                              ("--kgen-ready-after", getattr(args, "ready_after", None)),
                              ("--kgen-ready-at", getattr(args, "ready_at", None)),
                              ("--kgen-ready-vga", getattr(args, "ready_vga", None)),
                              ("--kgen-boot-timeout", getattr(args, "boot_timeout", None)),
                              ("--kgen-memory", getattr(args, "memory", None)),
                              ("--kgen-append", getattr(args, "append", None))):
            if value is not None:
                argv.append(f"{option}={value}")
        argv += [f"--kgen-module={Path(m.partition(',')[0]).resolve()}" + m[len(m.partition(',')[0]):]
                 for m in getattr(args, "module", None) or ()]
        argv += [f"--kgen-qemu-arg={a}" for a in getattr(args, "qemu_arg", None) or ()]
        argv += [f"--kgen-boot-only-segment={n}" for n in getattr(args, "boot_only_segment", None) or ()]
        if getattr(args, "boot_only_segment", None) == []:      # [foreign] boot_only_segments = []: none at all
            argv.append("--kgen-boot-only-segment=none")
        if getattr(args, "address_spaces", None):
            argv.append(f"--kgen-address-spaces={args.address_spaces}")
    else:
        if args.config is not None:
            argv += ["--kgen-config", str(args.config.resolve())]
        if args.arch is not None:
            argv += ["--kgen-arch", args.arch]
        argv += ["--kgen-out", str(args.out.resolve())]
    if getattr(args, "cold_boot", False):
        argv.append("--kgen-cold-boot")
    if args.keyword:
        argv += ["-k", args.keyword]
    if args.exitfirst:
        argv.append("-x")
    if args.junitxml is not None:
        argv.append(f"--junitxml={args.junitxml.resolve()}")
    if getattr(args, "json_path", None) is not None:      # set by kgen.harness.jsonreport.run_suite_json
        argv.append(f"--kgen-json={args.json_path.resolve()}")
    if str(args.jobs) not in ("0", "1"):
        if importlib.util.find_spec("xdist") is None:
            raise ToolMissing("parallel machines need pytest-xdist: pip install 'kgen[test]', or pass -j 1")
        # By module: a module's machine booted for looking (kgen_idle) and the KVM probe then happen once.
        argv += ["-n", str(args.jobs), "--dist", "loadscope"]
    return argv + list(extra)


# pytest's exit codes (pytest.ExitCode) as kgen's (kgen/errors.py): pytest's 2 (interrupted) would read as a config
# error and its 3 (internal error) as a missing tool. 5 is "no tests collected" (a -k that selects nothing), 6 more
# warnings than a --max-warnings the user set.
PYTEST_EXIT = {0: EXIT_OK, 1: EXIT_CHECKS_FAILED, 2: EXIT_INTERRUPTED, 3: EXIT_INTERNAL, 4: EXIT_USAGE, 5: EXIT_USAGE,
               6: EXIT_CHECKS_FAILED}


def check_keyword(expression: str) -> None:
    """Refuse a -k expression pytest would refuse, before anything is built."""
    try:
        from _pytest.mark.expression import Expression     # pytest's own parser; private, so only if it is there
    except ImportError:
        return
    try:
        Expression.compile(expression)
    except Exception as err:  # noqa: BLE001 - ParseError, whose home module is private too
        raise UsageError(f"-k {expression!r}: {err}") from None


def check_report_path(option: str, path: Path) -> None:
    """A report file pytest will write at the very end: refuse now, in one line, a path it could not write (pytest
    would fail after the whole run, with a traceback)."""
    def refuse(why: str) -> UsageError:
        return UsageError(f"{option} {path}: {why}; choose another path")

    if path.is_dir():
        raise refuse("is a directory")
    parent = path.parent
    while not (parent.exists() or parent.is_symlink()):
        parent = parent.parent
    if not parent.is_dir():
        raise refuse(f"{parent} is not a directory")
    probe = parent / f".kgen-probe.{os.getpid()}.{time.monotonic_ns()}"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError as err:
        raise refuse(f"cannot create files in {parent} ({err.strerror or err})") from None
    finally:
        probe.unlink(missing_ok=True)


def require_qemu(binary: str) -> None:
    """The suite boots every kernel it checks: without QEMU say so once, as `kgen run` does, not in every test."""
    if shutil.which(binary) is None:
        from kgen.machine import QEMU_PACKAGE
        raise ToolMissing(f"{binary} not found: install the Debian package {QEMU_PACKAGE}")


def check_boots(kernel: KernelUnderTest, accel: str) -> None:
    """Boot a foreign kernel once before the suite: one that never gets to the state the checks look at is
    reported once, its diagnosis on stderr and one line, status 1 (a finding about the kernel), instead of once per
    test."""
    import sys
    from kgen.guest.diagnose import RunFailed
    try:
        with boot(kernel, accel, cold=True):
            pass
    except RunFailed as err:
        sys.stdout.flush()
        print(err.details(), file=sys.stderr)
        failed = KgenError(f"--kernel {kernel.elf_path.name} did not boot to a state the checks can look at: {err}",
                           exit_code=EXIT_CHECKS_FAILED)
        failed.failure = err.failure        # for the --json report
        raise failed from None


def require_kvm_for(kernel: KernelUnderTest, cache_dir: Path | None) -> None:
    """--accel kvm on a host whose KVM cannot run this kernel: one line and the missing-tool status, not a suite
    that skips every test and exits 0."""
    usable, why = probe_kvm(kernel, cache_dir)
    if not usable:
        raise ToolMissing(f"--accel kvm: KVM cannot run {kernel.elf_path.name} on this host ({why}); "
                          "use --accel tcg")


def boot_only_problem(elf: ElfInfo, index: int) -> str | None:
    """Why program header `index` of `elf` cannot be a boot-only segment (out of range, not a PT_LOAD), or None."""
    count = len(elf.program_headers)
    if not 0 <= index < count:
        return (f"out of range: the ELF has {count} program headers, numbered 0 to {count - 1} as `readelf -l` "
                "shows them" if count else "the ELF has no program headers")
    if elf.program_headers[index] != "PT_LOAD":
        return (f"program header {index} is {elf.program_headers[index]}, not a PT_LOAD segment (`readelf -l` "
                "lists them)")
    return None


# [foreign] key (kgen/build/config.py ForeignConfig) -> the command-line option's attribute holding the same.
FOREIGN_OPTIONS = {"ready": "ready", "ready_at": "ready_at", "ready_symbol": "ready_symbol", "ready_vga": "ready_vga",
                   "ready_after": "ready_after", "boot_timeout": "boot_timeout", "memory": "memory",
                   "append": "append", "modules": "module", "qemu_args": "qemu_arg",
                   "address_spaces": "address_spaces", "boot_only_segments": "boot_only_segment"}
READY_KEYS = ("ready", "ready_at", "ready_symbol", "ready_vga", "ready_after")


def apply_foreign_config(args) -> None:
    """Give `kgen test`, `kgen run` and `kgen inspect` what the config's [foreign] table holds for a kernel under
    test (the --config file, else ./kgen.toml): with `kernel` set and no --kernel (nor --iso or --direct), that
    kernel is the one checked; for a kernel given either way, every option the command line left unset takes the
    table's value (one --ready* option on the command line sets aside all the table's ready keys), and --memory
    falls back to [foreign].memory, then to machine.memory_mib if the file sets it. A value of the table that is
    wrong for this kernel (no such file, symbol or program header) is one line naming its key (UsageError)."""
    from kgen.build import config as configmod
    if getattr(args, "iso", None) is not None or getattr(args, "direct", False):
        return      # kgen's own kernel: the table is not about it
    config = configmod.load(args.config, args.arch)
    foreign = config.foreign
    if args.kernel is None and (foreign is None or foreign.kernel is None):
        if getattr(args, "boot_only_segment", None):
            raise UsageError("--boot-only-segment is for a kernel given with --kernel (or [foreign] kernel)")
        return
    from_table: set[str] = set()     # the keys whose values the table gave
    if foreign is not None:
        if args.kernel is None:
            args.kernel = foreign.kernel
            from_table.add("kernel")
        ready_given = any(getattr(args, FOREIGN_OPTIONS[key], None) is not None for key in READY_KEYS)
        for key, attr in FOREIGN_OPTIONS.items():
            if key == "boot_timeout" and not hasattr(args, attr):
                attr = "timeout"        # kgen run's name for it
            value = getattr(foreign, key)
            if value is None or not hasattr(args, attr) or getattr(args, attr) is not None:
                continue
            if key in READY_KEYS and ready_given:
                continue
            if key == "qemu_args":
                import shlex
                value = [shlex.join(value)] if value else []      # one array item, one QEMU argument
            elif key in ("modules", "boot_only_segments"):
                value = list(value)
            setattr(args, attr, value)
            from_table.add(key)
    if getattr(args, "memory", None) is None and "machine_memory_mib" in config.explicit:
        args.memory = config.machine_memory_mib     # the one key of kgen's own config a foreign kernel uses
    if from_table:
        _check_from_table(args, foreign, from_table)


def _check_from_table(args, foreign, from_table: set[str]) -> None:
    """The table's values that only this kernel can judge, each refused in one line naming its key."""
    from kgen.build.config import show_value

    def refuse(key: str, why: str) -> UsageError:
        value = getattr(foreign, key)
        shown = show_value(str(value) if key == "kernel" else list(value) if isinstance(value, tuple) else value)
        return UsageError(f"{foreign.key(key)} = {shown}: {why}")

    if "kernel" in from_table and not args.kernel.is_file():
        raise refuse("kernel", "no such file" if not args.kernel.exists() else "not a file")
    if "modules" in from_table:
        for spec in foreign.modules:
            path = spec.partition(",")[0]
            if not Path(path).is_file():
                raise refuse("modules", f"{path!r} is no such file")
    if not args.kernel.is_file():
        return          # --kernel's own check says so
    try:
        elf = ElfInfo.load(args.kernel)
    except KgenError as err:
        if "kernel" in from_table:
            raise refuse("kernel", str(err).removeprefix(f"{args.kernel}: ")) from None
        return          # --kernel's own check says so
    for index in (args.boot_only_segment or ()) if "boot_only_segments" in from_table else ():
        problem = boot_only_problem(elf, index)
        if problem is not None:
            raise refuse("boot_only_segments", f"{index}: {problem}")
    if "ready_symbol" in from_table and foreign.ready_symbol not in elf.symbols:
        raise refuse("ready_symbol", f"{elf.path.name} has no such symbol")
    if "ready_at" in from_table:
        try:
            resolve_ready_at(elf, foreign.ready_at)
        except KgenError as err:
            raise refuse("ready_at", str(err)) from None
    if "address_spaces" in from_table:
        from kgen.guest.addrspaces import SpaceArray
        try:
            SpaceArray.parse(foreign.address_spaces, elf)
        except KgenError as err:
            raise refuse("address_spaces", str(err)) from None


def foreign_kernel_from_args(args) -> KernelUnderTest:
    """The --kernel ELF and its boot and "when to look" options (`_add_foreign_boot_args` in kgen/cli.py), as
    `kgen test --kernel` and `kgen inspect --kernel` take them (after `apply_foreign_config`): a missing file or
    module, or no usable ELF, is one line (UsageError)."""
    if not args.kernel.is_file():
        raise UsageError(f"--kernel {args.kernel}: no such file" if not args.kernel.exists()
                         else f"--kernel {args.kernel}: not a file")
    check_modules(getattr(args, "module", None) or ())
    try:
        return KernelUnderTest.foreign(   # a file that is no usable ELF fails here, in one line
            args.kernel, getattr(args, "ready", None), boot_timeout=getattr(args, "boot_timeout", None),
            memory_mib=getattr(args, "memory", None), append=getattr(args, "append", None),
            modules=getattr(args, "module", None) or (),
            qemu_args=split_qemu_args(getattr(args, "qemu_arg", None) or ()),
            ready_symbol=getattr(args, "ready_symbol", None), ready_after=getattr(args, "ready_after", None),
            ready_at=getattr(args, "ready_at", None), ready_vga=getattr(args, "ready_vga", None),
            boot_only_segments=getattr(args, "boot_only_segment", None))
    except KgenError as err:
        raise UsageError(f"--kernel {err}") from None


def run_suite(args, extra: list[str]) -> int:
    """`kgen test`: build the kernel (unless --kernel), run the suite; pytest's exit status mapped onto kgen's.

    pytest's temporary directories go in a directory of this run's, removed at the end, so nothing is left in the
    user's TMPDIR (pytest would keep `pytest-of-USER/` there)."""
    if importlib.util.find_spec("pytest") is None:
        raise ToolMissing("kgen test needs pytest: pip install 'kgen[test]'")
    if args.keyword:
        check_keyword(args.keyword)
    if args.junitxml is not None:
        check_report_path("--junitxml", args.junitxml)
    if args.kernel is not None:
        kernel = foreign_kernel_from_args(args)
        if getattr(args, "address_spaces", None):
            from kgen.guest.addrspaces import SpaceArray
            try:
                SpaceArray.parse(args.address_spaces, kernel.elf)
            except KgenError as err:
                raise UsageError(str(err)) from None
        require_qemu(kernel.qemu)
        check_qemu_accepts(kernel)
        if args.accel == "kvm":
            require_kvm_for(kernel, None)       # its probe is a boot under KVM
        else:
            check_boots(kernel, args.accel)
    else:
        used = [name for name in ("ready", "ready_symbol", "ready_after", "ready_at", "ready_vga",
                                  "boot_timeout", "memory", "append", "module",
                                  "qemu_arg", "address_spaces") if getattr(args, name, None)]
        if used:
            raise UsageError(f"--{used[0].replace('_', '-')} is for a kernel given with --kernel; a kgen kernel "
                             "takes its machine from the config")
        from kgen.build import config as configmod
        from kgen.build.layout import compute
        from kgen.build.pipeline import check_out_dir
        check_out_dir(args.out)
        require_qemu(compute(configmod.load(args.config, args.arch)).architecture.qemu)
        # Built once here, so parallel workers find it up to date instead of each writing it.
        kernel = KernelUnderTest.built(args.config, args.out, args.arch)
        if args.accel == "kvm":
            require_kvm_for(kernel, args.out)
    argv = pytest_args(args, extra)
    import pytest

    scratch = None
    if not any(arg == "--basetemp" or arg.startswith("--basetemp=") for arg in extra):
        scratch = Path(tempfile.mkdtemp(prefix="kgen-test-"))
        argv += ["--basetemp", str(scratch / "pytest")]
    try:
        status = int(pytest.main(argv))
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    code = PYTEST_EXIT.get(status, EXIT_INTERNAL)
    if code == EXIT_INTERRUPTED:
        raise KeyboardInterrupt         # one line and 130, as anywhere else in kgen
    if status == 5:
        raise UsageError("no test was selected" + (f" by -k {args.keyword!r}" if args.keyword else "")
                         + "; `kgen test -- --collect-only -q` lists them")
    if status == 3:
        raise KgenError("pytest stopped with an internal error (its report is above)")
    return code
