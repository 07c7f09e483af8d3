"""How a kernel given with --kernel is booted: the one place a way of booting plugs in.

A boot path turns the kernel's ELF into the arguments of a `Machine` (kgen/machine) and says, before QEMU does, why
it cannot boot an ELF. `DirectMultiboot` is QEMU's own Multiboot loader (`-kernel`). kgen's own kernel is booted by
`KernelSession` (kgen/harness/session.py) from its layout, not through here.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from kgen.errors import MachineError, UsageError
from kgen.guest.elfinfo import MULTIBOOT_SEARCH, ElfInfo
from kgen.harness.qemuargs import drives_copy_on_write, initrd_args, qemu_refusal
from kgen.machine import Machine

DEFAULT_MEMORY_MIB = 128
MULTIBOOT_AOUT_KLUDGE = 1 << 16


@dataclass(frozen=True)
class DirectMultiboot:
    """QEMU's -kernel: QEMU loads a Multiboot (v1) ELF itself, its modules through -initrd, its command line through
    -append; the user's disks are opened `snapshot=on` (`drives_copy_on_write`), never written."""
    memory_mib: int = DEFAULT_MEMORY_MIB
    append: str | None = None
    modules: tuple[str, ...] = ()       # FILE[,ARGS] as --module takes them
    qemu_args: tuple[str, ...] = ()     # the user's own QEMU arguments
    name: ClassVar[str] = "direct"

    def problem(self, elf: ElfInfo) -> str | None:
        """What stops this path from booting `elf`, or None (QEMU may still refuse it: `launch_refusing`)."""
        return multiboot_problem(elf)

    def machine_options(self, elf_path: Path, *, qemu: str, accel: str, poison: bytes | None) -> dict:
        """Machine(...) arguments that boot `elf_path` this way."""
        extra = initrd_args(self.modules) + drives_copy_on_write(self.qemu_args)
        return dict(kernel=elf_path, accel=accel, poison=poison, qemu=qemu, memory_mib=self.memory_mib,
                    append=self.append, extra_args=extra)


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



def launch_refusing(machine: Machine, elf_path: Path | None, elf: ElfInfo | None = None,
                    boot: DirectMultiboot | None = None) -> None:
    """Launch `machine`; when QEMU refuses a kernel the user gave (`elf_path`, from --kernel) that is the user's
    input: one line with what stops `boot` (default: QEMU's -kernel) from booting it, if anything, and QEMU's own
    reason (UsageError). kgen test, kgen run and kgen debug say it alike."""
    try:
        machine.launch()
    except MachineError as err:
        refusal = qemu_refusal(err)
        if refusal is None or elf_path is None:
            raise
        problem = (boot or DirectMultiboot()).problem(elf if elf is not None else ElfInfo.load(elf_path))
        raise UsageError(f"--kernel {elf_path}: " + (f"{problem}; " if problem else "")
                         + f"QEMU refused to boot it: {refusal}") from None
