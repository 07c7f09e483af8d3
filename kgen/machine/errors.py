"""How a machine step fails: one line naming the step, the evidence kept for whoever wants the details."""
from __future__ import annotations

import shlex
from collections.abc import Sequence

from kgen.errors import MachineError


class MachineStepError(MachineError):
    """A machine failure at a named step: launch, qmp-connect, wait, read, write, control, restore, shutdown.

    `str()` is one line; the evidence (QEMU's exit status, command line, stderr tail, COM1 tail) is in attributes
    and in `details()`.
    """

    def __init__(self, step: str, message: str, *, qemu_status: int | None = None, command: Sequence[str] = (),
                 stderr_tail: str = "", serial_tail: str = ""):
        super().__init__(f"{step}: {message}")
        self.step = step
        self.qemu_status = qemu_status
        self.command = tuple(command)
        self.stderr_tail = stderr_tail
        self.serial_tail = serial_tail

    def details(self) -> str:
        if not self.command:
            status = "never started"
        else:
            status = "still running" if self.qemu_status is None else str(self.qemu_status)
        return "\n".join([
            str(self),
            f"QEMU exit status: {status}",
            f"command line: {shlex.join(self.command)}",
            "--- QEMU stderr (tail) ---",
            self.stderr_tail.rstrip() or "(empty)",
            "--- COM1 (tail) ---",
            self.serial_tail.rstrip() or "(empty)",
        ])
