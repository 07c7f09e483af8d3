"""Whether this host's KVM can run a kernel: kvm_pvm, the software hypervisor of the development machines, runs long
mode but not 32-bit paging (docs/toolchain.md), so the answer is a short boot of the kernel itself, kept on disk.
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
from kgen.machine import KVM_DEVICE, kvm_accessible, kvm_usable_for

KVM_PROBE_CACHE = ".kgen-kvm-probe.json"
KVM_PROBE_TIMEOUT = 20.0


def probe_kvm(kernel: KernelUnderTest, cache_dir: Path | None = None) -> tuple[bool, str]:
    """Whether KVM on this host can run this kernel (kvm_pvm cannot run 32-bit paging): one short boot.

    The boot costs seconds where KVM is a software hypervisor (≈3 s here), more than the rest of the suite, so the
    answer is kept in `cache_dir` for the same kernel bytes, QEMU binary and host kernel."""
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
            if saved["key"] == key:
                return saved["usable"], saved["why"] + " (probed earlier, answer kept in " + str(cache) + ")"
        except (OSError, ValueError, KeyError, TypeError):
            pass    # no answer kept, or not one we wrote: probe
    if kernel.layout is None or kernel.boot.name != "direct":
        # Booted the way the tests will boot it: under kvm_pvm OVMF itself stops with an internal error although
        # the same kernel runs from -kernel.
        usable, why = _probe_by_boot(kernel)
    else:
        usable, why = kvm_usable_for(kernel.elf_path, marker, qemu=kernel.qemu)
    if cache is not None:
        cache.write_text(json.dumps({"key": key, "usable": usable, "why": why}))
    return usable, why


def _probe_by_boot(kernel: KernelUnderTest) -> tuple[bool, str]:
    """The kernel boots under KVM to the state the suite waits for (a foreign kernel's ready text or halt, a kgen
    kernel serving calls), its own way in."""
    if not kvm_accessible():
        return False, f"{KVM_DEVICE} is missing or not accessible"
    started = time.monotonic()
    try:
        with boot(kernel, "kvm", poison=None, cold=True, timeout=min(kernel.boot_timeout, KVM_PROBE_TIMEOUT)):
            pass
    except MachineError as err:       # RunFailed too
        return False, f"the KVM boot failed: {err}"
    return True, f"the KVM boot got there in {time.monotonic() - started:.2f} s"



def require_kvm_for(kernel: KernelUnderTest, cache_dir: Path | None) -> None:
    """--accel kvm on a host whose KVM cannot run this kernel: one line and the missing-tool status, not a suite
    that skips every test and exits 0."""
    usable, why = probe_kvm(kernel, cache_dir)
    if not usable:
        raise ToolMissing(f"--accel kvm: KVM cannot run {kernel.elf_path.name} on this host ({why}); "
                          "use --accel tcg")
