"""Whether this host's KVM can run a kernel: one short boot under `-accel kvm`.

An answer is kept (kgen/harness/kvmprobe.py) only when it is a fact about the kernel on this host, never when the
probe's time ran out: a loaded host makes every boot slow, and the same probe passes once the load is gone. What
decides without waiting out the bound is the guest's own state: the marker reached; the guest stopped for good
(triple fault, KVM internal error); or KVM no longer running the CPU at all (`VcpuWatch`).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from kgen.errors import MachineError
from kgen.machine.errors import MachineStepError
from kgen.machine.machine import _DEAD_END_RUNSTATES, DEFAULT_QEMU, Machine

KVM_DEVICE = "/dev/kvm"


def kvm_accessible() -> bool:
    """Whether this process may open the KVM device (present, and read-write for this user: the `kvm` group)."""
    return os.access(KVM_DEVICE, os.R_OK | os.W_OK)


# A kvm_pvm boot of the x86_64 kernel takes ~3.5 s of the vCPU thread's CPU time, nearly all of it in the
# firmware's Multiboot loader (emulated instructions copying the ELF): ~4 s here alone, 10-15 s with the two cores
# under a load of 10. So the probe's bound is the vCPU's CPU time, which load does not change, and a wall-clock cap
# of PROBE_WALL_FACTOR times that for a host too loaded to give it even that; neither bound's "no" is kept.
PROBE_TIMEOUT = 10.0
PROBE_WALL_FACTOR = 3
# How often the probe looks at the vCPU while it waits, and how long the vCPU must stay frozen to count as stopped.
VCPU_POLL = 0.5
VCPU_FROZEN_FOR = 2.0


@dataclass(frozen=True)
class KvmProbe:
    """A probe's answer: `lasting` when it is a fact about the kernel on this host (it booted; it stopped for good;
    KVM stopped running its CPU), False when the bound ran out or the host failed first (a loaded host, no room)."""

    usable: bool
    why: str
    lasting: bool


@dataclass(frozen=True)
class VcpuSample:
    at: float               # time.monotonic()
    asleep: bool            # the vCPU thread is not runnable (state S or D) and the guest is not halted
    cpu_ticks: int | None   # the vCPU thread's utime + stime (clock ticks), None if /proc does not say
    exits: int | None       # KVM's count of the vCPU's exits (QMP query-stats), None if QEMU does not say
    pc: int                 # EIP/RIP


def thread_state(pid: int, tid: int) -> tuple[str, int] | None:
    """(state letter, utime + stime in clock ticks) of thread `tid` of process `pid`, or None if /proc has none."""
    try:
        fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], int(fields[11]) + int(fields[12])


class VcpuWatch:
    """Whether KVM has stopped running the guest's CPU while QEMU says it runs: the vCPU thread asleep (a thread
    the host is too loaded to run is runnable, state R, not asleep), no CPU time used, no VM exit counted, the
    same EIP, and the guest not halted, for VCPU_FROZEN_FOR seconds. kvm_pvm does this to the i386 kernel where it
    turns paging on (docs/toolchain.md): nothing will ever come, however long one waits."""

    def __init__(self, machine: Machine, thread=thread_state):
        self.machine = machine
        self.thread = thread
        self._tid: int | None = None
        self._frozen: VcpuSample | None = None      # the first sample of the current frozen stretch
        self._first_ticks: int | None = None

    def cpu_seconds(self, now: VcpuSample | None) -> float | None:
        """CPU time the vCPU thread used since the first sample, or None where /proc does not say."""
        if now is None or now.cpu_ticks is None or self._first_ticks is None:
            return None
        return (now.cpu_ticks - self._first_ticks) / os.sysconf("SC_CLK_TCK")

    def sample(self) -> VcpuSample | None:
        """The vCPU now, or None where QEMU or /proc cannot say (then nothing is decided from it)."""
        try:
            if self._tid is None:
                self._tid = self.machine.qmp("query-cpus-fast", step="read")[0]["thread-id"]
            regs = self.machine.registers()
            exits = self._exits()
        except (MachineError, LookupError, TypeError):
            return None
        state = self.thread(self.machine.pid, self._tid)
        if state is None:
            return None
        if self._first_ticks is None:
            self._first_ticks = state[1]
        return VcpuSample(time.monotonic(), state[0] in "SD" and not regs.halted, state[1], exits, regs.eip)

    def _exits(self) -> int | None:
        try:
            stats = self.machine.qmp("query-stats", {"target": "vcpu"}, step="read")
        except MachineStepError:
            return None     # QEMU before 7.1, or an accelerator without statistics
        for provider in stats or ():
            for stat in provider.get("stats", ()):
                if stat.get("name") == "exits":
                    return stat.get("value")
        return None

    def stopped(self, now: VcpuSample | None) -> str | None:
        """Why the CPU will not run again, once it has stayed frozen for VCPU_FROZEN_FOR seconds; else None."""
        first = self._frozen
        same = (first is not None and now is not None and now.asleep
                and (now.cpu_ticks, now.exits, now.pc) == (first.cpu_ticks, first.exits, first.pc))
        if not same:
            self._frozen = now if now is not None and now.asleep else None
            return None
        if now.at - first.at < VCPU_FROZEN_FOR:
            return None
        return (f"KVM stopped running the CPU at {now.pc:#x}: QEMU says it runs, but its vCPU thread has slept "
                f"{now.at - first.at:.1f} s with no VM exit and no CPU time, the guest not halted")


def probe_kvm_boot(kernel_path: str | os.PathLike, marker: bytes | str, timeout: float = PROBE_TIMEOUT,
                   qemu: str = DEFAULT_QEMU, thread=thread_state) -> KvmProbe:
    """Boot `kernel_path` once under KVM until it prints `marker` (usable), stops for good or KVM stops running its
    CPU (not usable, lasting), or its vCPU has used `timeout` seconds of CPU time, or the wall clock
    PROBE_WALL_FACTOR times that (not usable, not lasting: said so). Where /proc does not show the vCPU's time,
    `timeout` is wall-clock time."""
    if not kvm_accessible():
        return KvmProbe(False, f"{KVM_DEVICE} is missing or not accessible", lasting=True)
    started = time.monotonic()
    try:
        with Machine(kernel=kernel_path, accel="kvm", qemu=qemu) as machine:
            watch = VcpuWatch(machine, thread)
            now = watch.sample()
            while True:
                used = watch.cpu_seconds(now)
                cap = timeout if used is None else timeout * PROBE_WALL_FACTOR
                left = min(started + cap - time.monotonic(), timeout - (used or 0.0))
                try:
                    machine.wait_for(marker, max(0.0, min(VCPU_POLL, left)))
                    return KvmProbe(True, f"KVM boot reached {marker!r} in {time.monotonic() - started:.2f} s",
                                    lasting=True)
                except MachineStepError as err:
                    state = machine.status()
                    if state in _DEAD_END_RUNSTATES:        # the guest stopped for good: a fact
                        # Said whether wait_for saw the end itself (guest-reset...) or its time slice ran out first.
                        return KvmProbe(False, f"KVM boot did not reach {marker!r}: the guest stopped for good "
                                        f"(runstate {state}): {err}", lasting=True)
                    if state != "running":                  # QEMU gone: maybe the host's doing
                        return KvmProbe(False, f"KVM boot did not reach {marker!r}: {err} (not kept)", lasting=False)
                    if left <= 0.0:
                        spent = (f"{used:.1f} s of CPU time in {time.monotonic() - started:.1f} s"
                                 if used is not None else f"{timeout:g} s")
                        return KvmProbe(False, f"KVM boot did not reach {marker!r} within {spent}, the guest still "
                                        "running (not kept: a loaded host can be this slow)", lasting=False)
                now = watch.sample()
                stopped = watch.stopped(now)
                if stopped:
                    return KvmProbe(False, f"KVM boot did not reach {marker!r}: {stopped}", lasting=True)
    except MachineError as err:
        return KvmProbe(False, f"KVM boot did not reach {marker!r}: {err} (not kept)", lasting=False)


def kvm_usable_for(kernel_path: str | os.PathLike, marker: bytes | str, timeout: float = PROBE_TIMEOUT,
                   qemu: str = DEFAULT_QEMU) -> tuple[bool, str]:
    """Boot `kernel_path` once under KVM: (True, how long) if it reaches `marker`, else (False, why)."""
    probe = probe_kvm_boot(kernel_path, marker, timeout, qemu)
    return probe.usable, probe.why
