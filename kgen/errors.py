"""Errors that reach the user as one line and an exit code, never as a traceback.

The exit codes are the same for `kgen build`, `kgen run` and `kgen test` (`kgen --help` and docs/exit-status.md list them);
`kgen test` maps pytest's own codes onto them (kgen/cli/test.py), so a bad `-k` is never taken for a missing
tool, nor an interrupt for a bad config.
"""

import argparse

EXIT_OK = 0
EXIT_CHECKS_FAILED = 1      # kgen test: a check of the kernel failed
EXIT_USAGE = 2              # a bad command line, config value or output directory (argparse uses 2 too)
EXIT_TOOL_MISSING = 3       # QEMU, GRUB, KVM or a Python package is missing on this host
EXIT_KERNEL_FAILED = 4      # kgen run: the kernel faulted, panicked, hung, triple-faulted or did not report success
EXIT_INTERNAL = 5           # kgen or its tools failed: an assembler, linker, LIEF or GRUB failure, a QEMU/QMP error
EXIT_INTERRUPTED = 130      # Ctrl-C (128 + SIGINT), as a shell reports it
EXIT_TERMINATED = 143       # SIGTERM (128 + 15): kgen cleans up and ends with the status a shell reports for it

EXIT_CODES = (
    (EXIT_OK, "success"),
    (EXIT_CHECKS_FAILED, "checks failed (kgen test)"),
    (EXIT_USAGE, "bad command line, config or --out"),
    (EXIT_TOOL_MISSING, "a tool is missing (QEMU, GRUB, KVM, pytest; kgen doctor lists them)"),
    (EXIT_KERNEL_FAILED, "the kernel failed: fault, panic, hang, triple fault, no success report (kgen run)"),
    (EXIT_INTERNAL, "kgen or a tool it drives failed (assembler, LIEF, GRUB, QEMU/QMP, pytest internal error)"),
    (EXIT_INTERRUPTED, "interrupted (Ctrl-C)"),
    (EXIT_TERMINATED, "terminated (SIGTERM), after cleaning up"),
)


def exit_codes_text() -> str:
    """The exit-code table as `kgen --help` prints it."""
    return "exit status:\n" + "\n".join(f"  {code:<4} {meaning}" for code, meaning in EXIT_CODES)


class KgenError(Exception):
    """A failure the user can act on. `str(err)` is the one line printed; `exit_code` is the process status."""

    exit_code = EXIT_INTERNAL

    def __init__(self, message: str, *, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class UsageError(KgenError):
    """A bad command-line value: a missing file, an unusable --out, a timeout that is not a positive number."""

    exit_code = EXIT_USAGE


class ConfigError(KgenError):
    """A config key, value or combination that breaks a rule. Exit status 2, like a usage error."""

    exit_code = EXIT_USAGE


class AssemblyError(KgenError):
    """A template that does not assemble. Carries the rendered source with line numbers."""


class LinkError(KgenError):
    """Units that cannot be placed together: a duplicate or undefined symbol, an image that does not fit."""


class ToolMissing(KgenError):
    """An external program (QEMU, GRUB) is not installed; the message names the Debian package."""

    exit_code = EXIT_TOOL_MISSING


class MachineError(KgenError):
    """QEMU failed at a named step: launch, QMP connect, wait, read, shut down."""


class KernelFailed(KgenError):
    """The kernel under `kgen run` did not succeed: it faulted, panicked, hung or exited without its success report."""

    exit_code = EXIT_KERNEL_FAILED


class ImageTooLarge(LinkError):
    """The linked image does not fit `kernel.max_size`: the build turns it into a config error naming the file."""

    exit_code = EXIT_USAGE

    def __init__(self, needed: int, limit: int):
        super().__init__(f"the kernel image needs {needed:#x} bytes but kernel.max_size is {limit:#x}: "
                         "raise kernel.max_size")
        self.needed = needed
        self.limit = limit


def input_file_problem(path) -> str | None:
    """Why `path`, named as a file for kgen to read (a kernel, a module, a config), cannot be one, or None if it is a
    regular file. A fifo or a device would block or never end (/dev/zero read until memory runs out)."""
    import os
    import stat
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "no such file"
    except OSError as err:
        return err.strerror or str(err)
    if stat.S_ISDIR(mode):
        return "not a file (a directory)"
    if not stat.S_ISREG(mode):
        return "not a regular file (a fifo, a device or a socket): give the file itself"
    return None


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad command line is one line, as every other bad input is (argparse prints usage first)."""

    def error(self, message: str):
        if message.endswith("expected one argument"):
            # argparse takes a value beginning with "-" for an option: `--qemu-arg -S` must be `--qemu-arg=-S`.
            message += "; a value that begins with '-' is written with '=' (--option=-value)"
        self.exit(EXIT_USAGE, f"kgen: error: {self.prog}: {message} (see {self.prog} --help)\n")
