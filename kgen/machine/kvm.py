"""Whether this host's KVM can run a kernel: one short boot under `-accel kvm`."""
from __future__ import annotations

import os
import time

from kgen.errors import MachineError
from kgen.machine.machine import DEFAULT_QEMU, Machine

KVM_DEVICE = "/dev/kvm"


def kvm_accessible() -> bool:
    """Whether this process may open the KVM device (present, and read-write for this user: the `kvm` group)."""
    return os.access(KVM_DEVICE, os.R_OK | os.W_OK)


# A kvm_pvm boot of the x86_64 kernel takes ~3 s here alone (~9.5 s with the two cores under a load of 15). An i386
# kernel under kvm_pvm does not fail at once: it never gets there, so every i386 probe waits the whole bound, and a
# suite pays it per probe. 10 s keeps that cost down; a host loaded past it calls KVM unusable and skips KVM legs.
PROBE_TIMEOUT = 10.0


def kvm_usable_for(kernel_path: str | os.PathLike, marker: bytes | str, timeout: float = PROBE_TIMEOUT,
                   qemu: str = DEFAULT_QEMU) -> tuple[bool, str]:
    """Boot `kernel_path` once under KVM: (True, how long) if it reaches `marker`, else (False, why).

    A KVM that cannot run the kernel's paging mode (kvm_pvm triple-faults 32-bit paging) ends in runstate
    shutdown or internal-error, which `wait_for` reports at once; `timeout` bounds a guest that just hangs.
    """
    if not kvm_accessible():
        return False, f"{KVM_DEVICE} is missing or not accessible"
    started = time.monotonic()
    try:
        with Machine(kernel=kernel_path, accel="kvm", qemu=qemu) as machine:
            machine.wait_for(marker, timeout)
    except MachineError as err:
        return False, f"KVM boot did not reach {marker!r}: {err}"
    return True, f"KVM boot reached {marker!r} in {time.monotonic() - started:.2f} s"
