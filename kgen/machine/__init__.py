"""The machine stage: QEMU booting one kernel, and the harness's hands on it (QMP, COM1/COM2, guest RAM).

    with Machine(kernel="kernel.elf", poison=0xCC) as m:
        m.wait_for("ready", 10)
        m.read_phys(0x100000, 16)

Files by job: `machine.py` (the Machine: lifecycle, waiting, inspection), `process.py` (the QEMU process, its
directory, no orphans), `qmp.py`, `serial.py` (COM1), `ram.py` (the shared RAM file), `registers.py` (the CPU's
registers from `info registers`), `snapshot.py` (a fresh machine per test by restore), `kvm.py` (the KVM probe),
`errors.py`.
"""
from kgen.machine.errors import MachineStepError
from kgen.machine.kvm import KVM_DEVICE, kvm_accessible, kvm_usable_for
from kgen.machine.firmware import QEMU_IMG, QEMU_IMG_PACKAGE
from kgen.machine.machine import QEMU_PACKAGE, Machine, MachineState
from kgen.machine.ram import MIB, RamWindow, fill_file, parse_ram_windows

__all__ = ["KVM_DEVICE", "MIB", "QEMU_IMG", "QEMU_IMG_PACKAGE", "QEMU_PACKAGE", "Machine", "MachineState",
           "MachineStepError", "RamWindow", "fill_file", "kvm_accessible", "kvm_usable_for", "parse_ram_windows"]
