"""What went wrong in a run, in one line a person can act on: the exception the kernel reported, or the state
of a machine that hung or triple-faulted, with addresses named after the ELF's symbols."""
from __future__ import annotations

import re
from dataclasses import dataclass

from . import hw
from .elfinfo import ElfInfo

EXCEPTION_LINE = re.compile(r"kgen: exception((?: \w+=0x[0-9a-f]+)+)")
FIELD = re.compile(r"(\w+)=0x([0-9a-f]+)")


@dataclass(frozen=True)
class KernelException:
    """The kernel's own report of a CPU exception (templates/idt.s prints it)."""
    fields: dict[str, int]

    @property
    def vector(self) -> int:
        return self.fields["vector"]

    def describe(self, elf: ElfInfo | None = None) -> str:
        f = self.fields
        name = hw.EXCEPTION_NAMES.get(self.vector, "reserved exception")
        text = f"{name} (vector {self.vector}) error={f['error']:#x}"
        if self.vector == 14:
            text += f" [{hw.describe_page_fault_error(f['error'])}] CR2={f['cr2']:#010x}"
        eip = elf.symbolize(f["eip"]) if elf else f"{f['eip']:#010x}"
        return f"{text} EIP={eip}"


def find_exception(serial: str) -> KernelException | None:
    m = EXCEPTION_LINE.search(serial)
    if not m:
        return None
    return KernelException({k: int(v, 16) for k, v in FIELD.findall(m.group(1))})


def tail(text: str, lines: int = 12) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def describe_stall(machine, elf: ElfInfo | None, why: str) -> str:
    """A machine that neither exited nor reported: stop it and say where the CPU is."""
    try:
        machine.stop()
        regs = machine.registers()
    except Exception as err:   # the machine may be gone; the reason we already have still stands
        return f"{why}; registers unreadable ({err})"
    eip = elf.symbolize(regs.eip) if elf else f"{regs.eip:#010x}"
    return (f"{why}; CPU stopped at EIP={eip} CR2={regs.cr2:#010x} CR3={regs.cr3:#010x} "
            f"CR0={regs.cr0:#010x} ESP={regs.esp:#010x}")
