"""Errors that reach the user as one line and an exit code, never as a traceback."""


class KgenError(Exception):
    """A failure the user can act on. `str(err)` is the one line printed; `exit_code` is the process status."""

    exit_code = 1

    def __init__(self, message: str, *, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class ConfigError(KgenError):
    """A config key, value or combination that breaks a rule. Exit status 2, like a usage error."""

    exit_code = 2


class AssemblyError(KgenError):
    """A template that does not assemble. Carries the rendered source with line numbers."""


class LinkError(KgenError):
    """Units that cannot be placed together: a duplicate or undefined symbol, an image that does not fit."""


class ToolMissing(KgenError):
    """An external program (QEMU, GRUB) is not installed; the message names the Debian package."""

    exit_code = 3


class MachineError(KgenError):
    """QEMU failed at a named step: launch, QMP connect, wait, read, shut down."""
