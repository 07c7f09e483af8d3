"""`kgen debug`: build like `kgen run`, boot the kernel held at its first instruction under QEMU's gdbstub, and run
gdb with the kernel's symbols (twice: where it is linked and where it is loaded, kgen/debug/symbols.py) and kgen's
gdb helper (kgen/debug/gdb_kgen.py) loaded; or, with --no-gdb, wait for a debugger and print the line that attaches
one.

The processes, and who gets Ctrl-C:

    kgen  ──spawns──>  QEMU   (kgen's process group; PR_SET_PDEATHSIG: dies with kgen; kgen/machine/process.py)
      └───spawns──>  gdb    (a process group of its own, made the terminal's foreground group)

Ctrl-C on the terminal is delivered to the foreground group only, so it reaches gdb alone, which turns it into a
break in the guest (it sends the stub an interrupt); neither kgen nor QEMU sees it. In the same group QEMU would
quit on SIGINT and kgen would end with "interrupted". When gdb exits, kgen takes the terminal back and shuts QEMU
down (QMP quit, then SIGKILL): no QEMU outlives the session, whether gdb quit, detached or killed the guest.
"""
from __future__ import annotations

import errno
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import elftools

from kgen.build.config import DEFAULT_CONFIG_NAME, show_path
from kgen.build.pipeline import build, check_out_dir
from kgen.errors import EXIT_INTERNAL, EXIT_OK, KgenError, ToolMissing, UsageError
from kgen.guest.elfinfo import ElfInfo
from kgen.harness.bootpath import grub_icount, launch_refusing
from kgen.harness.kernel import KernelUnderTest
from kgen.harness.run import _existing_file, guest_memory_mib, machine_config
from kgen.machine import Machine
from kgen.machine.process import die_with_parent

GDB_PACKAGE = "gdb"
GDB_HOST = "127.0.0.1"          # the stub listens on loopback only: it gives full control of the guest
HELPER = Path(__file__).with_name("gdb_kgen.py")
WAIT_POLL = 0.2
# Under TCG a breakpoint is a check on the translated code's address (gdb's Z0 packet) and touches no memory; under
# KVM QEMU writes an int3 at the breakpoint's virtual address, which fails while that address is unmapped (the
# higher half before paging, the load address after the identity map is gone), and gdb then refuses to continue.
KVM_HINT = ("kgen: under --accel kvm use hbreak (debug registers, 4 at most; a symbol has two locations, linked and "
            "loaded), not break: a software breakpoint cannot be written at an unmapped address")


def port_in_use_reason(port: int) -> str | None:
    """Why QEMU could not listen on `port`, or None if it can. SO_REUSEADDR as QEMU sets it, so a port that only
    has connections in TIME_WAIT counts as free, as it is for QEMU."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((GDB_HOST, port))
    except OSError as err:
        if err.errno == errno.EADDRINUSE:
            return "is in use"
        return f"cannot be listened on ({err.strerror})"
    finally:
        probe.close()
    return None


def free_port() -> int:
    """A port nothing listens on now (the kernel's choice for port 0); QEMU binds it a moment later."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((GDB_HOST, 0))
        return probe.getsockname()[1]


def pick_port(requested: int | None) -> int:
    if requested is None:
        return free_port()
    if not 1 <= requested <= 65535:
        raise UsageError(f"--gdb-port {requested}: a TCP port is 1..65535")
    reason = port_in_use_reason(requested)
    if reason is not None:
        raise UsageError(f"--gdb-port {requested}: port {requested} on {GDB_HOST} {reason}; "
                         "pick another or leave --gdb-port out for a free one")
    return requested


def python_path_for_helper() -> list[str]:
    """Directories gdb's Python (the system python3) needs besides kgen itself: where this Python finds pyelftools,
    the helper's one import from outside the standard library."""
    return [str(Path(elftools.__file__).resolve().parent.parent)]


def helper_commands(elf: Path, arch: str | None, config: Path | None) -> list[str]:
    """gdb commands that source the helper and load the kernel (symbols twice, and its layout if kgen's)."""
    load = ["kgen-load"]
    for path in python_path_for_helper():
        load += ["--python-path", path]
    if arch is not None:
        load += ["--arch", arch]
        if config is not None:
            load += ["--config", str(config.resolve())]
    load.append(str(elf.resolve()))
    return [f"source {HELPER}", shlex.join(load)]


def gdb_command_line(gdb: str, elf: Path, port: int, arch: str | None, config: Path | None,
                     extra: list[str] = ()) -> list[str]:
    """gdb ELF, the helper and its kgen-load, then `target remote` (after the symbols: the first stop is named),
    then the user's own arguments (after `kgen debug --`)."""
    command = [gdb, "-q", str(elf.resolve())]
    for line in helper_commands(elf, arch, config):
        command += ["-ex", line]
    command += ["-ex", f"target remote {GDB_HOST}:{port}"]
    return command + list(extra)


def _config_file(args) -> Path | None:
    """The config file the build read: --config, or ./kgen.toml when present (kgen/build/config.py's rule)."""
    if args.config is not None:
        return args.config
    default = Path(DEFAULT_CONFIG_NAME)
    return default if default.exists() else None


def debug(args, extra: list[str]) -> int:
    if extra and args.no_gdb:
        raise UsageError("arguments after -- go to gdb; --no-gdb starts none")
    if args.append is not None and args.kernel is None and not args.direct:
        raise UsageError("--append needs a directly booted kernel (--kernel or --direct); GRUB's menu sets the "
                         "ISO's command line")
    gdb = None
    if not args.no_gdb:
        gdb = shutil.which(args.gdb)
        if gdb is None and os.sep in args.gdb and Path(args.gdb).exists():
            what = "a directory" if Path(args.gdb).is_dir() else "not an executable file"
            raise UsageError(f"--gdb {show_path(args.gdb)}: {what}; give the path of the gdb program")
        if gdb is None:
            raise ToolMissing(f"{args.gdb} not found: install the Debian package {GDB_PACKAGE}, give --gdb PATH, or "
                              "use --no-gdb and attach a debugger of your own")
    port = pick_port(args.gdb_port)
    if args.kernel is None:
        check_out_dir(args.out)
    cfg, layout = machine_config(args)

    if args.kernel is not None:
        elf_path = _existing_file("--kernel", args.kernel)
        try:
            elf = ElfInfo.load(elf_path)
        except KgenError as err:
            raise UsageError(f"--kernel {err}") from None
        qemu = KernelUnderTest(elf_path, elf).qemu      # the ELF's class picks it, as under kgen run/test
        target = {"kernel": elf_path, "append": args.append}
        kgen_arch = None                                # foreign: no layout for the helper
    else:
        out = build(cfg, args.out, iso=not args.direct, force=False)
        elf_path, qemu, kgen_arch = out.elf, layout.arch.qemu, layout.arch.name
        target = {"kernel": out.elf, "append": args.append} if args.direct else {"iso": out.iso}

    icount = grub_icount("iso" in target, "bios", args.accel)      # as kgen run: GRUB under TCG
    machine = Machine(**target, accel=args.accel, memory_mib=guest_memory_mib(args, layout), echo_serial=True, icount=icount,
                      qemu=qemu, start_paused=True,
                      extra_args=("-gdb", f"tcp:{GDB_HOST}:{port}"))
    config_file = _config_file(args) if kgen_arch is not None else None
    recipe = gdb_command_line(args.gdb if gdb is None else gdb, Path(elf_path), port, kgen_arch, config_file)
    try:
        launch_refusing(machine, elf_path if args.kernel is not None else None)
        print(f"kgen: QEMU (pid {machine.pid}) holds the kernel at its first instruction; gdbstub on "
              f"{GDB_HOST}:{port}", file=sys.stderr)
        if args.accel == "kvm":
            print(KVM_HINT, file=sys.stderr)
        if gdb is None:
            print("kgen: attach with (Ctrl-C here ends QEMU):\n" + shlex.join(recipe), file=sys.stderr, flush=True)
            while machine.alive:
                time.sleep(WAIT_POLL)
            return EXIT_OK
        status = run_gdb(gdb_command_line(gdb, Path(elf_path), port, kgen_arch, config_file, extra))
    finally:
        machine.shutdown()
    if status == 0:
        return EXIT_OK
    what = f"signal {-status}" if status < 0 else f"status {status}"
    print(f"kgen: error: gdb ended with {what}", file=sys.stderr)
    return EXIT_INTERNAL


def _terminal() -> int | None:
    """Our terminal's descriptor when we own it (we are its foreground process group), else None."""
    for fd in (0, 1, 2):
        try:
            if os.isatty(fd) and os.tcgetpgrp(fd) == os.getpgrp():
                return fd
        except OSError:
            continue
    return None


class _Ended(SystemExit):
    """kgen was told to end (SIGTERM, SIGHUP) while gdb ran: unwind so gdb, the terminal and QEMU are seen to."""


def _end_on_signal(signum: int, frame: object) -> None:
    raise _Ended(128 + signum)


def _gdb_dies_with_kgen() -> None:
    # In the forked child before exec: if kgen is SIGKILLed, the kernel kills gdb too (QEMU already has the same).
    die_with_parent()


def run_gdb(command: list[str]) -> int:
    """Run gdb in a process group of its own that owns the terminal; return its exit status (-N: signal N)."""
    tty = _terminal()
    # A background process that touches the terminal (tcsetpgrp below, or COM1 echoed while gdb is in front with
    # `stty tostop`) is stopped by SIGTTOU; kgen must go on echoing and take the terminal back.
    old = {sig: signal.signal(sig, handler) for sig, handler in ((signal.SIGTTOU, signal.SIG_IGN),
                                                                 (signal.SIGTERM, _end_on_signal),
                                                                 (signal.SIGHUP, _end_on_signal))}
    proc = None
    try:
        proc = subprocess.Popen(command, process_group=0, preexec_fn=_gdb_dies_with_kgen)
        if tty is not None:
            os.tcsetpgrp(tty, proc.pid)
            # gdb may have touched the terminal before it was in front, and been stopped for it: let it go on.
            os.killpg(proc.pid, signal.SIGCONT)
        return proc.wait()
    except BaseException:
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        raise
    finally:
        if tty is not None:
            try:
                os.tcsetpgrp(tty, os.getpgrp())
            except OSError:
                pass
        for sig, handler in old.items():
            signal.signal(sig, handler)
