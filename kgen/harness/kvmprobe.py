"""Whether this host's KVM can run a kernel: kvm_pvm, the software hypervisor of the development machines, runs long
mode but not 32-bit paging (docs/toolchain.md), so the answer is a short boot of the kernel itself, kept on disk when
it is a fact about the kernel (kgen/machine/kvm.py `KvmProbe.lasting`), never when the probe's time ran out.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

from kgen.errors import MachineError, ToolMissing
from kgen.harness.kernel import KernelUnderTest
from kgen.harness.live import boot
from kgen.machine import KVM_DEVICE, kvm_accessible
from kgen.machine.kvm import KvmProbe, probe_kvm_boot

KVM_PROBE_CACHE = ".kgen-kvm-probe.json"
# A kept answer besides its key; one without `lasting` (an older kgen kept timeouts too) is probed again.
KEPT_FIELDS = ("usable", "why", "lasting")
KVM_PROBE_TIMEOUT = 20.0


def probe_kvm(kernel: KernelUnderTest, cache_dir: Path | None = None) -> tuple[bool, str]:
    """Whether KVM on this host can run this kernel (kvm_pvm cannot run 32-bit paging): one short boot.

    The boot costs seconds where KVM is a software hypervisor (≈3 s here), more than the rest of the suite, so the
    answer is kept in `cache_dir` for the same kernel bytes, QEMU binary and host kernel; only a lasting one (a
    probe that ran out of time on a loaded host is asked again next run)."""
    marker = kernel.probe_marker
    cache = key = None
    if cache_dir is not None:
        qemu = shutil.which(kernel.qemu)
        key = hashlib.sha256(kernel.elf_path.read_bytes() + repr(
            (os.uname().release, qemu, qemu and os.stat(qemu).st_mtime_ns, kvm_accessible(),
             kernel.boot.describe())
        ).encode()).hexdigest()
        cache = cache_dir / KVM_PROBE_CACHE
        try:
            saved = json.loads(cache.read_text())
            if saved["key"] == key and saved["lasting"] is True:
                return saved["usable"], saved["why"] + " (probed earlier, answer kept in " + str(cache) + ")"
        except (OSError, ValueError, KeyError, TypeError):
            pass    # no answer kept, or not one we wrote: probe
    if kernel.layout is None or kernel.boot.name != "direct":
        # Booted the way the tests will boot it: under kvm_pvm OVMF itself stops with an internal error although
        # the same kernel runs from -kernel.
        probe = _probe_by_boot(kernel)
    else:
        probe = probe_kvm_boot(kernel.elf_path, marker, qemu=kernel.qemu)
    if cache is not None and probe.lasting:
        cache.write_text(json.dumps({"key": key, **{f: getattr(probe, f) for f in KEPT_FIELDS}}))
    return probe.usable, probe.why


# What a kernel did under KVM that no load changes (kgen/guest/diagnose.py `Failure.kind`); a "hang" is the time
# running out, and "refused"/"exit" are QEMU's or the host's.
LASTING_FAILURES = frozenset({"exception", "panic", "triple fault", "fault loop"})


def _probe_by_boot(kernel: KernelUnderTest) -> KvmProbe:
    """The kernel boots under KVM to the state the suite waits for (a foreign kernel's ready text or halt, a kgen
    kernel serving calls), its own way in."""
    if not kvm_accessible():
        return KvmProbe(False, f"{KVM_DEVICE} is missing or not accessible", lasting=True)
    started = time.monotonic()
    try:
        with boot(kernel, "kvm", poison=None, cold=True, timeout=min(kernel.boot_timeout, KVM_PROBE_TIMEOUT)):
            pass
    except MachineError as err:       # RunFailed too
        failure = getattr(err, "failure", None)
        lasting = getattr(failure, "kind", None) in LASTING_FAILURES
        return KvmProbe(False, f"the KVM boot failed: {err}" + ("" if lasting else " (not kept)"), lasting)
    return KvmProbe(True, f"the KVM boot got there in {time.monotonic() - started:.2f} s", lasting=True)



def require_kvm_for(kernel: KernelUnderTest, cache_dir: Path | None) -> None:
    """--accel kvm on a host whose KVM cannot run this kernel: one line and the missing-tool status, not a suite
    that skips every test and exits 0."""
    usable, why = probe_kvm(kernel, cache_dir)
    if not usable:
        raise ToolMissing(f"--accel kvm: KVM cannot run {kernel.elf_path.name} on this host ({why}); "
                          "use --accel tcg")
