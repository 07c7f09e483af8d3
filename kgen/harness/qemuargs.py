"""The QEMU command line of a kernel given with --kernel: the user's modules and arguments as QEMU takes them, and
QEMU's own words when it refuses them.
"""
from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

from kgen.errors import ToolMissing, UsageError, input_file_problem
from kgen.machine import QEMU_PACKAGE


def qemu_refusal(err: BaseException) -> str | None:
    """QEMU's own reason when it exited at launch (it refused the kernel or an argument), one line, else None."""
    if getattr(err, "step", None) not in ("launch", "qmp-connect"):
        return None
    lines = [line.strip() for line in getattr(err, "stderr_tail", "").splitlines() if line.strip()]
    lines = [line for line in lines if "CPUID" not in line or "doesn't support" not in line]   # KVM's harmless note
    if lines:
        return lines[-1]        # QEMU may not have been reaped yet when the handshake failed: its words decide
    status = getattr(err, "qemu_status", None)
    return None if status is None else f"QEMU exited with status {status} and said nothing"


def initrd_args(modules) -> tuple[str, ...]:
    """QEMU's -initrd for Multiboot modules given as FILE[,ARGS]: "FILE ARGS,FILE2" (a comma in ARGS doubled)."""
    if not modules:
        return ()
    parts = []
    for spec in modules:
        path, _, args = spec.partition(",")
        parts.append(f"{Path(path).resolve()} {args.replace(',', ',,')}".rstrip())
    return ("-initrd", ",".join(parts))


# -hda FILE is QEMU's short form of a -drive at that IDE index.
_SHORT_DRIVES = {"-hda": 0, "-hdb": 1, "-hdc": 2, "-hdd": 3}


def drives_copy_on_write(args) -> tuple[str, ...]:
    """The user's QEMU arguments with every disk (-drive, -hda..-hdd) opened `snapshot=on`: the guest's writes go to
    a temporary overlay, never into the user's image. Under `kgen test` that is what makes a kernel with a disk
    testable: each test starts from the same disk, the parallel machines do not fight over the image's write lock
    (QEMU refuses a second writer), and the overlay is a qcow2, so `savevm` can snapshot the booted machine (a raw
    image cannot). `kgen run` passes the arguments as given: there the guest's writes are the user's to keep."""
    out: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg in ("-drive", "--drive") and i + 1 < len(args):
            spec = args[i + 1]
            if not re.search(r"(?:^|,)snapshot=", spec):
                spec += ",snapshot=on"
            out += [arg, spec]
            i += 2
        elif arg in _SHORT_DRIVES and i + 1 < len(args):
            path = args[i + 1].replace(",", ",,")       # QEMU's escape for a comma inside an option value
            out += ["-drive", f"file={path},index={_SHORT_DRIVES[arg]},media=disk,snapshot=on"]
            i += 2
        else:
            out.append(arg)
            i += 1
    return tuple(out)


def split_qemu_args(lines) -> tuple[str, ...]:
    """--qemu-arg values, each split like a shell line: `--qemu-arg '-smp 2'` gives two arguments."""
    try:
        return tuple(arg for line in lines for arg in shlex.split(line))
    except ValueError as err:
        raise UsageError(f"--qemu-arg: {err}; quote each argument as a shell would") from None


def check_modules(modules) -> None:
    """Refuse in one line a --module whose file is missing or whose path QEMU's -initrd list cannot hold."""
    for spec in modules:
        path = spec.partition(",")[0]
        problem = input_file_problem(path)
        if problem:
            raise UsageError(f"--module {spec}: {path!r}: {problem}")
        if " " in str(Path(path).resolve()):
            raise UsageError(f"--module {spec}: QEMU's -initrd cannot take a path with a space; move the file")



def require_qemu(binary: str) -> None:
    """Every command that boots a kernel needs QEMU: without it say so once, naming the package, not in every test."""
    if shutil.which(binary) is None:
        raise ToolMissing(f"{binary} not found: install the Debian package {QEMU_PACKAGE}")
