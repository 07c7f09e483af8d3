"""A kernel under test, booted: `boot()` brings it to the state the checks look at (from a snapshot of that state
when one exists), `LiveKernel` stops it to look and continues it to call its routines.

A kgen kernel is booted to serve calls (`kgen.serve`); it then sleeps in `hlt`, changing no memory, so it can be
stopped, inspected, and continued for the next call. Anyone else's kernel is booted the way its `BootPath` says and
looked at when its `Ready` says (kgen/harness/ready.py).
"""
from __future__ import annotations

import sys
from contextlib import contextmanager
from dataclasses import replace

from kgen.errors import KgenError, MachineError
from kgen.guest.calls import CallError, Probe
from kgen.guest.diagnose import Failure, RunFailed, explain
from kgen.guest.findings import Finding
from kgen.guest.invariants import GuestView
from kgen.harness.kernel import BOOT_TIMEOUT, KernelUnderTest
from kgen.harness.qemuargs import qemu_refusal
from kgen.harness.ready import wait_booted
from kgen.harness.session import KernelSession
from kgen.machine.snapshot import fresh_machine

# int3 in every byte of RAM the kernel did not write: code run from such memory traps at once, and as a paging
# entry 0xcccccccc is not present, so a table that was never cleared shows up as poison rather than as garbage
# mappings the walk would have to survive.
POISON = b"\xcc"
# What it means when a kernel boots with zeroed RAM and not with POISON: the one finding of `boot_with_zeroed_ram`.
READS_UNWRITTEN_MEMORY = (f"boots with zeroed RAM, fails with RAM poisoned to 0x{POISON.hex()}: it reads memory it "
                          "never wrote")


# ...and when the poisoned boot then succeeds too: the failure came from timing, not from the RAM's contents.
BOOT_IS_FLAKY = ("failed once with RAM poisoned, then booted with zeroed RAM and with poisoned RAM again: its boot "
                 "depends on timing (a race with a device or a timer), not on what RAM held")


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
        if self._view is None:
            self.stop()
            self._view = GuestView.capture(self.machine, self.kernel.elf, self.kernel.layout, self.poison)
            self._view.boot_only = self.kernel.boot_only_segments
            self._view.kernel_base_given = self.kernel.kernel_base
        return self._view

    def write_phys(self, addr: int, data: bytes) -> None:
        self.stop()
        self._view = None
        self.machine.write_phys(addr, data)

    def call(self, routine: str | int, *args: int, timeout: float | None = None) -> int:
        """Run a kernel routine; one that faults or never returns raises `RunFailed` saying which and where."""
        return self._over_channel(lambda channel: channel.call(
            routine, *args, **({} if timeout is None else {"timeout": timeout})))

    def probe(self, vaddr: int, kind: str) -> Probe:
        """The CPU tries one access ("read", "write", "fetch") at vaddr (kgen/guest/calls.py, Probe)."""
        return self._over_channel(lambda channel: channel.probe(vaddr, kind))

    def _over_channel(self, use):
        if self.channel is None:
            raise KgenError(f"{self.kernel.elf_path.name} has no kgen call channel: routines cannot be called")
        self.cont()
        try:
            return use(self.channel)
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

    if kernel.layout is not None:
        with KernelSession(kernel.elf_path, kernel.layout, accel=accel, poison=poison, cold=cold,
                           firmware=getattr(kernel.boot, "firmware", "bios")) as session:
            yield LiveKernel(kernel, session.machine, session.channel, poison)
        return

    if timeout == BOOT_TIMEOUT:
        timeout = kernel.boot_timeout

    def ready(machine) -> None:
        try:
            wait_booted(machine, kernel.ready, timeout, kernel.elf, in_kernel_only=kernel.boot.loads_its_own)
        except MachineError as err:
            raise RunFailed(explain(machine, kernel.elf, err)) from err

    options = kernel.machine_options(accel, poison)
    try:
        machine = fresh_machine(options, ready, str(kernel.ready), cold=cold)
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


def boot_with_zeroed_ram(kernel: KernelUnderTest, accel: str, failure: Failure) -> Failure:
    """A foreign kernel whose boot failed with RAM poisoned (POISON, as `boot` fills it) booted once more with RAM
    zeroed, as real firmware and QEMU's own -kernel leave it: when that boot gets to the state to look at, the
    failure gains the finding READS_UNWRITTEN_MEMORY (it still fails: a kernel must not read what it never wrote).
    Asked only after a failure, so a kernel that boots costs nothing more; not after QEMU refused it, nor after a
    wait that timed out (that would cost the whole wait again; its report says what the kernel was doing)."""
    if kernel.layout is not None or failure.kind == "refused" or failure.timed_out:
        return failure
    print("kgen: the boot failed with RAM poisoned; booting again with zeroed RAM to see whether that is why",
          file=sys.stderr)
    try:
        with boot(kernel, accel, poison=None, cold=True):
            pass
    except MachineError:        # RunFailed too: it fails either way, the poison is not why
        return failure
    # One success after one failure proves nothing about the poison by itself: a kernel whose boot races a device
    # (an ATA probe, a timer) fails now and then whatever RAM holds. The poisoned boot must fail again to be the cause.
    try:
        with boot(kernel, accel, cold=True):
            pass
    except MachineError:
        return replace(failure, findings=(*failure.findings, Finding(READS_UNWRITTEN_MEMORY)))
    return replace(failure, findings=(*failure.findings, Finding(BOOT_IS_FLAKY)))
