"""`--qemu-command`: the user's own QEMU command line (the one in their Makefile's `run` target), kept as it is but
for what kgen must own to look at the machine.

kgen keeps the binary, the disks (opened `snapshot=on` under `kgen test`), devices, `-machine` type, `-bios`,
`-kernel`/`-initrd`/`-append`, `-cpu`, `-smp`, `-d`/`-D`, and adds its QMP socket, COM1/COM2 capture, the gdbstub
when asked, `-no-reboot`, `-no-shutdown`, `-display none` and the guest RAM as a shared file sized from the
command's `-m`. What it takes out, because it owns that part:

    -serial stdio|mon:stdio|vc   COM1 is captured by kgen (and shown on failure)
    -nographic, -display, -vga none stays, -monitor, -qmp, -mon, -s, -S, -gdb, -enable-kvm, -accel, -no-reboot
    -debugcon stdio|mon:stdio    the debug console's text goes to COM1's capture too (one mux chardev)

and what it cannot combine with, refused in one line: `-daemonize` (kgen waits for QEMU), `-snapshot` (kgen decides
what is written), `-incoming`, `-loadvm`, a second `-serial` that is not stdio (kgen needs COM1 and COM2).
"""
from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from kgen.errors import UsageError
from kgen.harness.qemuargs import drives_copy_on_write

QEMU_BINARY = re.compile(r"^qemu-system-(i386|x86_64)$")
_STDIO = ("stdio", "mon:stdio", "vc", "console")
# Options kgen owns, dropped with their value (True) or alone (False).
_DROPPED = {"-nographic": False, "-display": True, "-monitor": True, "-qmp": True, "-mon": True, "-s": False,
            "-S": False, "-gdb": True, "-enable-kvm": False, "-accel": True, "-no-reboot": False,
            "-no-shutdown": False}
_REFUSED = {"-daemonize": "kgen waits for QEMU and reads it while it runs",
            "-snapshot": "kgen decides what may be written (disks are opened snapshot=on under kgen test)",
            "-incoming": "kgen boots the machine itself", "-loadvm": "kgen boots the machine itself"}
# Options that take a value (so the value is not read as an option of its own).
_WITH_VALUE = {"-m", "-machine", "-M", "-serial", "-debugcon", "-cpu", "-smp", "-drive", "-cdrom", "-hda", "-hdb",
               "-hdc", "-hdd", "-fda", "-fdb", "-kernel", "-initrd", "-append", "-bios", "-pflash", "-boot", "-device",
               "-netdev", "-net", "-d", "-D", "-chardev", "-object", "-global", "-rtc", "-vga", "-name", "-usbdevice",
               "-audiodev", "-L", "-icount", "-k", "-smbios", "-fw_cfg", "-numa", "-mem-path"}


@dataclass(frozen=True)
class UserCommand:
    """The user's command, adapted: the binary, the arguments kgen keeps, and what it read from them."""
    binary: str
    args: tuple[str, ...]
    memory_mib: int
    machine_type: str           # -machine's type (pc unless the command says q35...), its other properties kept
    machine_props: str          # ",key=value..." after the type, or ""
    has_debug_exit: bool        # the command brings its own isa-debug-exit: kgen adds none


def parse_memory(value: str) -> int:
    """-m's value in MiB: `512`, `512M`, `1G`, `size=512M[,slots=..]`."""
    size = value.split(",")[0].removeprefix("size=")
    match = re.fullmatch(r"(\d+)([MmGg]?)[Bb]?", size)
    if not match:
        raise UsageError(f"--qemu-command: -m {value}: not a memory size kgen can read (give it in M or G)")
    number, unit = int(match.group(1)), match.group(2).upper()
    return number * 1024 if unit == "G" else number


def adapt(command: str, *, copy_on_write: bool) -> UserCommand:
    """Read the user's command line; refuse what kgen cannot combine with (UsageError, one line)."""
    try:
        words = shlex.split(command)
    except ValueError as err:
        raise UsageError(f"--qemu-command: {err}; quote it as a shell would") from None
    if not words or not QEMU_BINARY.match(Path(words[0]).name):
        first = words[0] if words else "nothing"
        raise UsageError(f"--qemu-command: starts with {first!r}, not qemu-system-i386 or qemu-system-x86_64; give "
                         "the QEMU command line from your Makefile")
    memory, machine, props, kept, has_exit = 128, "pc", "", [], False
    serials = 0
    i = 1
    while i < len(words):
        word = words[i]
        option = "-" + word.lstrip("-") if word.startswith("-") else word     # --serial means -serial
        value = words[i + 1] if i + 1 < len(words) else None
        takes = option in _WITH_VALUE or _DROPPED.get(option, False)
        if takes and value is None:
            raise UsageError(f"--qemu-command: {word} needs a value")
        i += 2 if takes else 1
        if option in _REFUSED:
            raise UsageError(f"--qemu-command: {word} cannot be combined with kgen: {_REFUSED[option]}")
        if option in _DROPPED:
            continue
        if option == "-m":
            memory = parse_memory(value)
        elif option in ("-machine", "-M"):
            head, _, rest = value.partition(",")
            if "=" in head:         # -machine type=q35,...
                rest, head = value, next((p.split("=", 1)[1] for p in value.split(",") if p.startswith("type=")),
                                         "pc")
                rest = ",".join(p for p in rest.split(",") if not p.startswith("type="))
            # accel= is kgen's (--accel), memory-backend= too (the shared RAM file).
            rest = ",".join(p for p in rest.split(",") if p and not p.startswith(("accel=", "memory-backend=")))
            machine, props = head or "pc", ("," + rest if rest else "")
        elif option == "-serial":
            serials += 1
            if value not in _STDIO and not value.startswith("mon:stdio") and value != "none":
                raise UsageError(f"--qemu-command: -serial {value}: kgen needs COM1 and COM2 for itself; drop "
                                 "this -serial (COM1's text is captured and shown)")
        elif option == "-debugcon" and value.split(",")[0] in _STDIO:
            kept += ["-debugcon", "chardev:com1"]       # COM1's capture is a mux: serial and debug console share it
        else:
            has_exit = has_exit or option == "-device" and value.split(",")[0] == "isa-debug-exit"
            kept += [word] + ([value] if takes else [])
    args = drives_copy_on_write(kept) if copy_on_write else tuple(kept)
    return UserCommand(Path(words[0]).name, tuple(args), memory, machine, props, has_exit)
