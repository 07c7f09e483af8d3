"""One QEMU boot of a kernel: launch, talk over QMP and the serial ports, shut down, and always clean up.

Lifecycle (like QEMU's own python/qemu/machine): `launch()` creates a private temporary directory, listens there on
three unix sockets (QMP, COM1, COM2), starts QEMU as their client and accepts its connections, so no sleep-and-retry
is needed and a QEMU that dies at start-up is seen at once. `shutdown()` asks QEMU to quit, kills it if it does not,
reaps it, closes everything and removes the directory; it runs from `__exit__` whatever happened inside the `with`
block, and an atexit/SIGTERM hook kills any machine still alive, so no QEMU outlives the harness.

The jobs are split by file: the process and its directory (process.py), QMP (qmp.py), COM1 (serial.py), guest RAM
(ram.py); snapshots and the pool of restorable machines (snapshot.py). This class puts them together and adds
waiting and inspection.

Guest RAM is a shared file in that directory (`memory-backend-file,share=on`) which the host maps too: reading guest
physical memory is a memcpy, and it stays readable after QEMU has exited (until `shutdown`). Where the file does not
back an address (the legacy VGA/ROM window, MMIO, RAM without a file), reads go through QMP `pmemsave`.

All methods must be called from one thread: QMP runs on a private asyncio loop driven by each call.
"""
from __future__ import annotations

import errno
import fcntl
import os
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import termios
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from kgen.arch import I386, X86_64
from kgen.errors import MachineError, ToolMissing
from kgen.machine import process
from kgen.machine.firmware import FIRMWARES, Ovmf, find_ovmf, machine_vars, pflash_args
from kgen.machine.errors import MachineStepError
from kgen.machine.qmp import LINK_ERRORS, ExecuteError, QmpLink
from kgen.machine.ram import MIB, GuestRam, poison_pattern
from kgen.machine.registers import Registers, parse_info_registers
from kgen.machine.serial import SerialLog, SerialSink
from kgen.protocol import DEBUG_EXIT_PORT

QEMU_PACKAGE = "qemu-system-x86"
DEFAULT_QEMU = I386.qemu     # the QEMU of a machine not told its kernel's architecture: the default config's

# A -kernel path longer than this is passed through a short link (`Machine._kernel_path`): it leaves more than half
# of kgen's 256-byte command-line buffer (BOOT_CMDLINE_MAX) to the arguments after it.
KERNEL_PATH_MAX = 128
START_TIMEOUT = 10.0       # QEMU up to its chardev connections and QMP greeting; it takes ~0.05 s
QUIT_GRACE = 2.0           # after QMP quit, before kill -9
RUNSTATE_POLL = 0.1        # how often wait_* asks QMP whether the guest stopped for good
HALT_POLL = 0.002          # how often wait_halted looks again; the hlt is usually microseconds away
SNAPSHOT_NAME = "kgen"     # the one internal snapshot in a machine's snapshot image

# Runstates from which the guest produces no more output and QEMU does not exit by itself (-no-shutdown keeps it
# alive after a triple fault or power-off, so the CPU and memory can still be inspected).
_DEAD_END_RUNSTATES = {"shutdown", "internal-error", "guest-panicked"}

_SERIAL_TAIL = 2000

# QEMU's exception log (`exception_log=True`): under TCG, `-d int` writes one line per exception and interrupt the
# CPU delivers (and a register dump after it), `check_exception old: .. new ..` when one is raised while another is
# being delivered, and `-d cpu_reset` the line "Triple fault" when the third one resets the CPU. The log is how the
# *first* fault of a triple fault is known (kgen/guest/faultloop.py reads it): the registers QEMU keeps are the last
# fault's. A timer at 1 kHz writes ~1 MB a second and a fault loop far more, so once the file holds
# EXCEPTION_LOG_LIMIT bytes QEMU is sent to a second file (HMP `logfile`), the older of the two dropped: the last
# stretch of the log is all a diagnosis reads.
EXCEPTION_LOG_NAMES = ("exceptions.log", "exceptions.1.log")
EXCEPTION_LOG_LIMIT = 4 << 20
_STDERR_TAIL = 2000


def _opt(value: object) -> str:
    """A value inside a QEMU `key=value,...` option: a comma is written twice."""
    return str(value).replace(",", ",,")


QCOW2_MAGIC = b"QFI\xfb"


def disk_format(path: Path) -> str:
    """qcow2 for a file that starts with qcow2's magic, else raw: named, so QEMU neither guesses (and warns) nor
    lets a raw image's first bytes pass for a header."""
    try:
        with open(path, "rb") as stream:
            return "qcow2" if stream.read(4) == QCOW2_MAGIC else "raw"
    except OSError:
        return "raw"        # QEMU's own error names the file


def no_space_text(where: Path, ram_mib: int | None, poisoned: bool) -> str:
    """What to say when the machine's directory runs out of space: what needed it, what is free, what to do."""
    try:
        free = f"{shutil.disk_usage(where).free // MIB} MiB free"
    except OSError:
        free = "free space unknown"
    if ram_mib is None:
        need = "the machine keeps its sockets and log there"
    elif poisoned:
        need = f"the guest's RAM file is {ram_mib} MiB, all of it written with the poison pattern"
    else:
        need = f"the guest's RAM file is {ram_mib} MiB, written as the guest touches it"
    return (f"no space left for the machine's files ({need}; {free}): free space there or set TMPDIR to a larger "
            "file system - the host failing, not the kernel")


def check_room_for_ram(memory_mib: int) -> None:
    """Refuse now, in one line, a TMPDIR that cannot hold one poisoned guest's RAM file (status 5): a run would
    otherwise fail test by test. Asks the file system for its free space (writing the file to find out cost 6 s at
    3.5 GiB); the machine's own directory is where QEMU's files go, a long TMPDIR falling back to /tmp."""
    directory = process.make_dir()
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        return          # unknown: the launch itself will say
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    if free < memory_mib * MIB:
        raise MachineStepError("launch", f"{directory.parent}: " + no_space_text(directory.parent, memory_mib, True))


@dataclass(frozen=True)
class MachineState:
    """What `save_state` kept besides QEMU's own snapshot: guest RAM and the COM1 text with its read cursor."""
    ram: bytes
    serial: tuple[bytes, int]


class Machine:
    """A QEMU `pc` machine booting one kernel (Multiboot ELF via `-kernel`), one ISO (`-cdrom`) or one disk image
    (the first IDE disk, opened `snapshot=on`: the guest's writes never reach the file), under SeaBIOS
    (`firmware="bios"`) or OVMF (`firmware="uefi"`, kgen/machine/firmware.py)."""

    def __init__(self, kernel: str | os.PathLike | None = None, iso: str | os.PathLike | None = None, *,
                 disk: str | os.PathLike | None = None, firmware: str = "bios",
                 append: str | None = None, accel: str = "tcg", memory_mib: int = 128,
                 poison: int | bytes | None = None, debug_exit_port: int = DEBUG_EXIT_PORT, echo_serial: bool = False,
                 icount: bool = False, ram_file: bool = True, extra_args: Sequence[str] = (),
                 qemu: str = DEFAULT_QEMU, snapshot_image: str | os.PathLike | None = None,
                 start_paused: bool = False, gdbstub: bool = False, machine_type: str = "pc",
                 boot_in_args: bool = False, exception_log: bool = False):
        # boot_in_args: what boots is in extra_args (a user's own QEMU command line, kgen/harness/qemucommand.py),
        # not a kernel=, iso= or disk= of kgen's.
        if sum(x is not None for x in (kernel, iso, disk)) != (0 if boot_in_args else 1):
            raise ValueError("give exactly one of kernel=, iso= or disk=, or none with boot_in_args=True")
        if firmware not in FIRMWARES:
            raise ValueError(f"firmware must be one of {', '.join(FIRMWARES)}, not {firmware!r}")
        if firmware == "uefi" and kernel is not None:
            # QEMU's -kernel loads a Multiboot kernel through an option ROM of the legacy BIOS; OVMF has no use for it.
            raise ValueError("firmware='uefi' boots an iso= or disk=, not a -kernel")
        if firmware == "uefi" and Path(qemu).name == I386.qemu:
            raise ValueError(f"OVMF is x86_64 firmware: firmware='uefi' needs qemu={X86_64.qemu!r}")
        if append is not None and kernel is None:
            raise ValueError("append= is the -kernel command line; an ISO's bootloader has its own")
        if accel not in ("tcg", "kvm"):
            raise ValueError(f"accel must be 'tcg' or 'kvm', not {accel!r}")
        if icount and accel != "tcg":
            raise ValueError("icount needs accel='tcg'")
        if exception_log and accel != "tcg":
            raise ValueError("exception_log needs accel='tcg': under KVM the guest's exceptions never reach QEMU")
        if poison is not None and not ram_file:
            raise ValueError("poison= needs ram_file=True: the pattern is written into the RAM file")
        if snapshot_image is not None and not ram_file:
            raise ValueError("snapshot_image= needs ram_file=True: RAM is saved and restored through the file")
        # Absolute, because QEMU runs in the temporary directory.
        self.kernel = Path(kernel).resolve() if kernel is not None else None
        self.iso = Path(iso).resolve() if iso is not None else None
        self.disk = Path(disk).resolve() if disk is not None else None
        self.firmware = firmware
        self.machine_type = machine_type
        self.boot_in_args = boot_in_args
        self._ovmf: Ovmf | None = None
        self._ovmf_vars: Path | None = None   # the variable store's copy this machine boots with (firmware.py)
        self.append = append
        self.accel = accel
        self.memory_mib = memory_mib
        self.poison = poison_pattern(poison)
        self.debug_exit_port = debug_exit_port
        self.echo_serial = echo_serial
        self.icount = icount
        self.ram_file = ram_file
        self.extra_args = tuple(extra_args)
        self.qemu = qemu
        self.snapshot_image = Path(snapshot_image).resolve() if snapshot_image is not None else None
        self.start_paused = start_paused
        self.gdbstub = gdbstub      # QEMU's gdbstub listens on gdb.sock in the machine's directory (gdbstub.py)
        # A user's own command line that sets QEMU's log itself keeps it: one -d/-D is QEMU's, not two.
        self.exception_log = exception_log and not any(arg in ("-d", "-D") for arg in self.extra_args)
        self._exception_logs = list(EXCEPTION_LOG_NAMES[:1])     # the files written so far, the current one last

        self._com2: socket.socket | None = None     # the `com2` property
        self._com2_sink: SerialSink | None = None   # reads COM2 from launch until `com2` is first used
        self.tmpdir: Path | None = None
        self.command: tuple[str, ...] = ()
        self.timings: dict[str, float] = {}
        # Called by `shutdown()` before quitting; True means the machine was taken back (a pool keeps it for a
        # restore) and must stay up.
        self.on_release: Callable[[Machine], bool] | None = None
        self._proc: subprocess.Popen | None = None
        self._log = None
        self._qmp: QmpLink | None = None
        self._serial: SerialLog | None = None
        self._listeners: list[socket.socket] = []
        self._ram: GuestRam | None = None
        self._launched = False
        self._closed = False
        self._ignore_shared = False   # the migration capability is set once per QEMU
        self._phys_bits: int | None = None

    # --- lifecycle ---------------------------------------------------------------------------------------------

    def __enter__(self) -> Machine:
        return self.launch()

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.shutdown()
        except MachineError as err:
            if exc is None:
                raise
            exc.add_note(f"and then shutdown failed: {err}")  # keep the failure that ended the block in front

    def launch(self) -> Machine:
        if self._launched:
            raise MachineStepError("launch", "this machine was already launched; make a new Machine")
        binary = shutil.which(self.qemu)
        if binary is None:
            raise ToolMissing(f"{self.qemu} not found: install the Debian package {QEMU_PACKAGE}")
        if self.firmware == "uefi":
            self._ovmf = find_ovmf()
        self._launched = True
        started = time.monotonic()
        try:
            # Registered before anything is written, so an interrupt from here on removes the directory.
            process.install_hooks()
            process.register(self)
            self.tmpdir = process.make_dir()
            if self._ovmf is not None:
                self._ovmf_vars = machine_vars(self._ovmf, self.tmpdir, self.snapshot_image)
            if self.ram_file:
                self._ram = GuestRam(self.tmpdir / "ram", self.memory_mib, self.poison)
                self._ram.create()
                self.timings["ram_fill"] = time.monotonic() - started
            qmp_listener, com1_listener, com2_listener = (self._listen(n) for n in ("qmp", "com1", "com2"))
            self.command = tuple(self._command_line(binary))
            self._log = open(self.tmpdir / "qemu.log", "wb")
            # QEMU runs in the caller's directory, so a relative path in extra_args (--qemu-arg '-drive file=fs.img')
            # means what it means on the user's command line; every path kgen itself passes is absolute.
            self._proc = process.spawn(self.command, process.caller_cwd() or self.tmpdir, self._log)
            deadline = time.monotonic() + START_TIMEOUT
            self._serial = SerialLog(self._accept(com1_listener, "COM1", deadline), self.echo_serial)
            self._com2 = self._accept(com2_listener, "COM2", deadline)
            self._com2_sink = SerialSink(self._com2, "com2")
            self._connect_qmp(self._accept(qmp_listener, "QMP", deadline), deadline)
            if self._ram is not None:
                problem = self._ram.map(self.hmp("info mtree -f", step="launch"))
                if problem:
                    raise self._error("launch", problem)
            if not self.start_paused:
                self.qmp("cont", step="launch")
            self.timings["launch"] = time.monotonic() - started
        except OSError as err:  # a socket path too long for AF_UNIX, a full disk, an unexecutable binary
            if err.errno in (errno.ENOSPC, errno.EDQUOT) and self.tmpdir is not None:
                failure = self._error("launch", f"{self.tmpdir.parent}: {self._no_space_text()}")
            else:
                failure = self._error("launch", f"{err} (working in {self.tmpdir})")
            self._teardown()
            raise failure from err
        except BaseException:
            self._teardown()
            raise
        return self

    def shutdown(self) -> None:
        """Quit QEMU (kill -9 if it does not go within QUIT_GRACE), reap it, release everything. Idempotent.

        A machine with an `on_release` hook (one from a snapshot pool) may be taken back instead: it stays up,
        stopped, until the pool restores it for the next user or quits it."""
        if self._closed or not self._launched:
            self._closed = True
            return
        if self.on_release is not None:
            hook, self.on_release = self.on_release, None
            if hook(self):
                return
        self.quit()

    def quit(self) -> None:
        """Shut down for good, whatever `on_release` would say (it is still told, so a pool stops waiting for
        this machine)."""
        if self._closed or not self._launched:
            self._closed = True
            return
        hook, self.on_release = self.on_release, None
        try:
            if self._proc is not None and self._proc.poll() is None and self._qmp is not None:
                try:
                    self._qmp.execute("quit", timeout=QUIT_GRACE)
                except (ExecuteError, *LINK_ERRORS):
                    pass  # QEMU closing the socket before its reply is the normal way for quit to end
                try:
                    self._proc.wait(QUIT_GRACE)
                except subprocess.TimeoutExpired:
                    pass
        finally:
            self._teardown()
            if hook is not None:
                hook(self)

    def _teardown(self) -> None:
        """Release everything `launch` acquired, in reverse order, tolerating any of it being absent or broken."""
        self._closed = True
        stuck = self._kill_hard()
        if self._qmp is not None:
            self._qmp.close(QUIT_GRACE)
        if self._serial is not None:
            self._serial.close(QUIT_GRACE)  # QEMU is dead, so COM1 is at EOF and the reader is ending
        if self._com2_sink is not None:
            self._com2_sink.close(QUIT_GRACE)
        for sock in (self._com2, *self._listeners):
            if sock is not None:
                sock.close()
        if self._ram is not None:
            self._ram.close()
        if self._log is not None:
            self._log.close()
        process.unregister(self)
        if stuck:
            raise self._error("shutdown", f"QEMU (pid {self._proc.pid}) did not die after SIGKILL")

    def _kill_hard(self) -> bool:
        """SIGKILL and reap QEMU if it is alive, remove the temporary directory. True if QEMU would not die."""
        stuck = process.kill_and_reap(self._proc)
        if self.tmpdir is not None and self.tmpdir.exists():
            shutil.rmtree(self.tmpdir, ignore_errors=True)
        return stuck

    @property
    def pid(self) -> int | None:
        """QEMU's process id (the Debian /usr/bin wrapper execs the real binary, so it is QEMU's own)."""
        return self._proc.pid if self._proc is not None else None

    @property
    def gdb_socket(self) -> Path | None:
        """Where QEMU's gdbstub listens (`gdbstub=True`), for kgen.machine.gdbstub.GdbStub."""
        return self.tmpdir / "gdb.sock" if self.gdbstub and self.tmpdir is not None else None

    @property
    def alive(self) -> bool:
        return self._launched and not self._closed and self._proc is not None and self._proc.poll() is None

    # --- launch helpers ----------------------------------------------------------------------------------------

    def _listen(self, name: str) -> socket.socket:
        sock = process.listen(self.tmpdir / f"{name}.sock")
        self._listeners.append(sock)
        return sock

    def _command_line(self, binary: str) -> list[str]:
        def chardev(name: str, mux: bool = False) -> list[str]:
            return ["-chardev", f"socket,id={name},path={_opt(self.tmpdir / f'{name}.sock')}" + (",mux=on" * mux)]

        machine = (f"{self.machine_type},memory-backend={GuestRam.BACKEND_ID}" if self.ram_file
                   else self.machine_type)
        # A user's own command line keeps its devices, network and firmware: kgen adds only what it needs.
        own = ["-no-user-config", "-parallel", "none", "-net", "none"] if not self.boot_in_args else []
        exit_device = (["-device", f"isa-debug-exit,iobase={self.debug_exit_port:#x},iosize=0x04"]
                       if self.debug_exit_port is not None else [])
        args = [binary, "-machine", machine, "-m", str(self.memory_mib), "-display", "none", *own,
                "-no-reboot", "-no-shutdown", *exit_device,
                "-accel", self.accel,
                # QEMU is the client of sockets we already listen on: connected before the guest runs a cycle.
                *chardev("qmp"), "-mon", "chardev=qmp,mode=control",
                # mux: a user's own command may send its debug console (-debugcon) into COM1's capture too.
                *chardev("com1", mux=self.boot_in_args), "-serial", "chardev:com1",
                *chardev("com2"), "-serial", "chardev:com2"]
        if self._ram is not None:
            args += self._ram.qemu_args(_opt)
        if self._ovmf is not None:
            args += pflash_args(self._ovmf, self._ovmf_vars, _opt)
        if self.snapshot_image is not None:
            # A drive no device uses: only the home of the internal snapshot (CPU and device state; RAM is kept
            # by the harness, see snapshot.py).
            args += ["-drive", f"if=none,id=kgen-snapshot,format=qcow2,file={_opt(self.snapshot_image)}"]
        if self.gdbstub:
            # A unix socket QEMU serves and nobody has to wait for: no port to collide with a parallel machine's.
            args += ["-chardev", f"socket,id=gdb,path={_opt(self.gdb_socket)},server=on,wait=off",
                     "-gdb", "chardev:gdb"]
        # Always held at the first instruction until launch has QMP and the RAM mapping: a kernel that exits in
        # its first microseconds is then reported by its exit, never as a launch that lost a race with it.
        args += ["-S"]
        if self.icount:
            args += ["-icount", "shift=0,sleep=off"]
        if self.exception_log:
            args += ["-d", "int,cpu_reset", "-D", str(self.tmpdir / EXCEPTION_LOG_NAMES[0])]
        if self.kernel is not None:
            args += ["-kernel", self._kernel_path()]
            if self.append is not None:
                args += ["-append", self.append]
        elif self.iso is not None:
            args += ["-cdrom", str(self.iso), "-boot", "d"]
        elif self.disk is not None:
            args += ["-drive", f"file={_opt(self.disk)},format={disk_format(self.disk)},if=ide,index=0,media=disk,"
                               "snapshot=on", "-boot", "c"]
        return args + list(self.extra_args)

    def _no_space_text(self) -> str:
        where = self.tmpdir.parent if self.tmpdir is not None else Path(tempfile.gettempdir())
        return no_space_text(where, self.memory_mib if self.ram_file else None, bool(self.poison))

    def host_failure(self, status: int | None) -> str | None:
        """Why QEMU's exit `status` is the host's failure rather than the kernel's: a SIGBUS is QEMU touching a page
        of the guest's RAM file that the file system could not back (a full TMPDIR); None otherwise."""
        if status == -signal.SIGBUS and self.ram_file:
            where = self.tmpdir.parent if self.tmpdir is not None else "TMPDIR"
            return f"QEMU died of SIGBUS, most likely out of space in {where}: {self._no_space_text()}"
        return None

    def _kernel_path(self) -> str:
        """The -kernel path: QEMU makes it the first word of the Multiboot command line, which a kernel copies into
        a buffer of its own (kgen's: 256 bytes, BOOT_CMDLINE_MAX). A long path would crowd out the arguments after
        it (kgen.serve): such a kernel is handed over through a short link in this machine's directory."""
        path = str(self.kernel)
        if len(path) <= KERNEL_PATH_MAX:
            return path
        link = self.tmpdir / "kernel.elf"
        if not link.is_symlink():
            link.symlink_to(Path(path).resolve())
        return str(link)

    def _accept(self, listener: socket.socket, what: str, deadline: float) -> socket.socket:
        conn = process.accept(listener, self._proc, deadline)
        if conn is not None:
            return conn
        if self._proc.poll() is not None:
            raise self._error("launch", f"QEMU exited with status {self._proc.returncode} before connecting {what}")
        raise self._error("launch", f"QEMU did not connect {what} within {START_TIMEOUT:.0f} s")

    def _connect_qmp(self, sock: socket.socket, deadline: float) -> None:
        self._qmp = QmpLink()
        try:
            self._qmp.connect(sock, max(0.1, deadline - time.monotonic()))
        except LINK_ERRORS as err:
            raise self._error("qmp-connect", f"QMP handshake failed: {self._gone_or(err)}") from err

    # --- QMP ---------------------------------------------------------------------------------------------------

    def qmp(self, command: str, arguments: dict | None = None, *, step: str = "control") -> object:
        """Execute one QMP command; `step` names the failure if it fails."""
        if self._qmp is None or self._closed:
            raise self._error(step, f"QMP {command}: machine is not running")
        try:
            return self._qmp.execute(command, arguments)
        except ExecuteError as err:
            raise self._error(step, f"QMP {command}: {err}") from err
        except LINK_ERRORS as err:
            raise self._error(step, f"QMP {command}: {self._gone_or(err)}") from err

    def hmp(self, command: str, *, step: str = "read") -> str:
        """One HMP command line through QMP; returns its text output (HMP ends lines with CRLF; we give LF)."""
        return self.qmp("human-monitor-command", {"command-line": command}, step=step).replace("\r\n", "\n")

    def status(self) -> str:
        """QEMU's runstate ("running", "paused", "shutdown", ...), or "exited" once the process has ended."""
        if self._proc is None or self._proc.poll() is not None:
            return "exited"
        try:
            return self.qmp("query-status", step="read")["status"]
        except MachineStepError:
            # A QEMU that is exiting closes QMP before its process ends: give it the time to end.
            try:
                self._proc.wait(QUIT_GRACE)
            except subprocess.TimeoutExpired:
                raise
            return "exited"

    def stop(self) -> None:
        self.qmp("stop")

    def cont(self) -> None:
        self.qmp("cont")

    @property
    def events(self) -> list[dict]:
        """QMP events received so far (STOP, SHUTDOWN, RESUME ...), oldest first."""
        return list(self._qmp.events) if self._qmp is not None else []

    # --- snapshots ---------------------------------------------------------------------------------------------

    def _snapshot_step(self, step: str, command: str) -> None:
        if self.snapshot_image is None:
            raise self._error(step, "this machine has no snapshot image (snapshot_image=)")
        # RAM lives in the shared file, which the harness saves and puts back itself (a memcpy); QEMU keeps CPU
        # and devices only. Writing 128 MiB of poisoned RAM into qcow2 and reading it back takes ≈0.3 s here.
        if not self._ignore_shared:
            self.qmp("migrate-set-capabilities",
                     {"capabilities": [{"capability": "x-ignore-shared", "state": True}]}, step=step)
            self._ignore_shared = True
        out = self.hmp(f"{command} {SNAPSHOT_NAME}", step=step).strip()
        if out:
            raise self._error(step, f"{command}: {out}")

    def save_state(self) -> MachineState:
        """Stop the guest and save it: CPU and devices into the snapshot image, RAM and COM1 into the result."""
        if self.status() == "running":
            self.stop()
        self._snapshot_step("snapshot", "savevm")
        return MachineState(self._ram.save(), self._serial.state())

    def restore_state(self, state: MachineState, *, run: bool = True) -> None:
        """Put the machine back to `state` (and the snapshot image's CPU and devices), then continue it.

        `loadvm` resets the machine first, which copies the kernel's ELF segments back into RAM as at power-on;
        so RAM is restored after it. Anything the previous user left in COM1 or COM2 is dropped."""
        started = time.monotonic()
        self.stop()     # stopping a stopped machine is a no-op for QEMU: cheaper than asking first
        self._snapshot_step("restore", "loadvm")
        self._ram.restore(state.ram)
        self._serial.reset(state.serial)
        self.drain_com2()
        self._qmp.events.clear()
        if run:
            self.cont()
        self.timings["restore"] = time.monotonic() - started

    @property
    def com2(self) -> socket.socket | None:
        """The guest's COM2 once launched: raw bytes both ways. Until first used here a thread reads and drops what
        the guest writes on it (the firmware's console, under OVMF), so QEMU never holds back a byte that would turn
        up later in a reply (SerialSink); from the first use on, every byte is the caller's."""
        if self._com2_sink is not None:
            self._com2_sink.stop()
        return self._com2

    def drain_com2(self) -> None:
        """Drop what the guest wrote on COM2 and the host has not read, without waiting for more."""
        self.com2.setblocking(False)
        try:
            while self.com2.recv(65536):
                pass
        except (BlockingIOError, OSError):
            pass
        finally:
            self.com2.setblocking(True)

    def com2_unread_by_guest(self) -> int:
        """Bytes the host sent on COM2 that QEMU has not taken yet (they would reach the next user's guest)."""
        buf = fcntl.ioctl(self._com2.fileno(), termios.TIOCOUTQ, struct.pack("i", 0))
        return struct.unpack("i", buf)[0]

    # --- serial and waiting ------------------------------------------------------------------------------------

    @property
    def serial(self) -> str:
        """All COM1 output so far."""
        return self._serial.text if self._serial is not None else ""

    def wait_for(self, marker: bytes | str, timeout: float) -> str:
        """Wait until `marker` appears on COM1 after the previous marker found; return all COM1 text so far.

        Fails early (step "wait") when QEMU exits or the guest stops for good (triple fault, KVM internal error).
        On failure QEMU is left as it is: `registers()`, `read_phys()` and `serial` still work until `shutdown()`.
        """
        self._require_launched("wait")
        needle = marker.encode() if isinstance(marker, str) else bytes(marker)
        deadline = time.monotonic() + timeout
        next_poll = 0.0
        while True:
            text = self._serial.find_next(needle)
            if text is not None:
                return text
            now = time.monotonic()
            if now >= next_poll:
                ended = self._dead_end()
                if ended:
                    text = self._serial.find_next(needle)
                    if text is not None:
                        return text  # the marker arrived while we were asking
                    raise self._error("wait", f"{marker!r} did not appear on COM1: {ended}")
                next_poll = now + RUNSTATE_POLL
            if now >= deadline:
                raise self._error("wait", f"{marker!r} did not appear on COM1 within {timeout:g} s "
                                          f"(runstate {self.status()})")
            self._serial.wait(min(deadline - now, RUNSTATE_POLL))

    def wait_halted(self, timeout: float) -> None:
        """Wait until CPU 0 sleeps in `hlt` (waiting for an interrupt); fails early as `wait_for` does.

        Output seen on COM1 means the guest has passed that `out`, not where it is now: on a busy host QEMU's CPU
        thread may still be a few instructions short of the `hlt` that follows."""
        self._require_launched("wait")
        deadline = time.monotonic() + timeout
        while not self.registers().halted:
            ended = self._dead_end()
            if ended:
                raise self._error("wait", f"the CPU did not reach hlt: {ended}")
            if time.monotonic() >= deadline:
                raise self._error("wait", f"the CPU did not reach hlt within {timeout:g} s")
            time.sleep(HALT_POLL)

    def wait_exit(self, timeout: float) -> int:
        """Wait for QEMU to exit and return its status (`isa-debug-exit` gives `(value << 1) | 1`)."""
        self._require_launched("wait")
        deadline = time.monotonic() + timeout
        while True:
            try:
                status = self._proc.wait(min(RUNSTATE_POLL, max(0.0, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                ended = self._dead_end()
                if ended and self._proc.poll() is not None:
                    continue    # it exited between the wait and the runstate query: collect its status
                if ended:
                    raise self._error("wait", f"{ended}; QEMU will not exit by itself") from None
                if time.monotonic() >= deadline:
                    raise self._error("wait", f"QEMU did not exit within {timeout:g} s "
                                              f"(runstate {self.status()})") from None
                continue
            self._serial.drain(QUIT_GRACE)  # the guest's last bytes are in the socket before QEMU's exit
            return status

    def _dead_end(self) -> str | None:
        """Why the guest can make no more progress, or None while it can."""
        self.tend_exception_log()
        state = self.status()
        if state == "exited":
            self._serial.drain(QUIT_GRACE)
            return f"QEMU exited with status {self._proc.returncode}"
        if state in _DEAD_END_RUNSTATES:
            reasons = [e.get("data", {}).get("reason") for e in self.events if e.get("event") == "SHUTDOWN"]
            reason = reasons[-1] if reasons else None
            if reason == "guest-reset":
                reason += ": a triple fault, or a reset the guest asked for"
            return f"the guest stopped in runstate {state}" + (f" (reason {reason})" if reason else "")
        return None

    # --- QEMU's exception log --------------------------------------------------------------------------------

    def tend_exception_log(self) -> None:
        """Send QEMU's exception log to the other file once the current one holds EXCEPTION_LOG_LIMIT bytes (cheap
        otherwise: one stat); called by the waits, which are the only time a guest runs for long unwatched."""
        if not self.exception_log or self.tmpdir is None or not self.alive:
            return
        current = self.tmpdir / self._exception_logs[-1]
        try:
            if current.stat().st_size < EXCEPTION_LOG_LIMIT:
                return
        except OSError:
            return
        following = next(name for name in EXCEPTION_LOG_NAMES if name != self._exception_logs[-1])
        self.hmp(f"logfile {self.tmpdir / following}", step="log")      # QEMU truncates it and writes on there
        self._exception_logs = [self._exception_logs[-1], following]

    def exception_log_text(self) -> str | None:
        """What QEMU's exception log holds (the previous file, then the current one), or None for a machine that
        keeps none (under KVM, or not asked for)."""
        if not self.exception_log or self.tmpdir is None:
            return None
        parts = []
        for name in self._exception_logs:
            try:
                parts.append((self.tmpdir / name).read_bytes().decode("utf-8", "replace"))
            except OSError:
                pass
        return "".join(parts)

    def exception_log_size(self) -> int:
        """Bytes in the current exception log file: where new lines will start (0 without one)."""
        try:
            return (self.tmpdir / self._exception_logs[-1]).stat().st_size if self.exception_log else 0
        except OSError:
            return 0

    def exception_log_since(self, offset: int) -> str:
        """The current exception log file from byte `offset` on."""
        try:
            with open(self.tmpdir / self._exception_logs[-1], "rb") as stream:
                stream.seek(offset)
                return stream.read().decode("utf-8", "replace")
        except OSError:
            return ""

    # --- inspection --------------------------------------------------------------------------------------------

    @property
    def ram_windows(self):
        return self._ram.windows if self._ram is not None else []

    def registers(self) -> Registers:
        """CPU 0's registers. Stop the machine first for a consistent snapshot under TCG."""
        text = self.hmp("info registers")
        try:
            return parse_info_registers(text)
        except ValueError as err:
            raise self._error("read", str(err)) from err

    def phys_bits(self) -> int | None:
        """The guest CPU's physical-address width, MAXPHYADDR (what CPUID 0x80000008 EAX[7:0] tells the guest):
        CPU 0's QOM property `phys-bits`, asked once (docs/toolchain.md: qemu64 40, qemu32 32 under TCG; a user's
        -cpu or host-phys-bits changes it). None if QEMU does not say."""
        if self._phys_bits is None:
            try:
                cpus = self.qmp("query-cpus-fast", step="read")
                bits = self.qmp("qom-get", {"path": cpus[0]["qom-path"], "property": "phys-bits"}, step="read")
            except (MachineError, LookupError, TypeError):
                return None
            self._phys_bits = bits if isinstance(bits, int) and 32 <= bits <= 52 else None
        return self._phys_bits

    def gva2gpa(self, vaddr: int) -> int | None:
        """Translate a guest virtual address with the current CR3 (None when unmapped)."""
        text = self.hmp(f"gva2gpa {vaddr:#x}").strip()
        if text.startswith("gpa: "):
            return int(text[5:], 16)
        if text == "Unmapped":
            return None
        raise self._error("read", f"gva2gpa {vaddr:#x}: {text}")

    def info_tlb(self) -> str:
        """HMP `info tlb`: the page-table walk from CR3 (not TLB contents)."""
        return self.hmp("info tlb")

    def read_phys(self, addr: int, size: int) -> bytes:
        """Guest physical memory: from the RAM file if it backs the whole range, else through `pmemsave`."""
        offset = self._ram.file_offset(addr, size) if self._ram is not None else None
        if offset is not None:
            return self._ram.read(offset, size)
        return self.pmemsave(addr, size)

    def pmemsave(self, addr: int, size: int) -> bytes:
        """Guest physical memory as QEMU's memory API sees it (MMIO, ROM and all); needs QEMU running."""
        if size <= 0 or addr < 0:
            raise ValueError(f"bad physical range {addr:#x}+{size:#x}")
        path = self.tmpdir / "pmemsave.bin"
        self.qmp("pmemsave", {"val": addr, "size": size, "filename": str(path)}, step="read")
        try:
            return path.read_bytes()
        finally:
            path.unlink(missing_ok=True)

    def write_phys(self, addr: int, data: bytes) -> None:
        """Write guest RAM through the file mapping. Stop the machine first, and patch data rather than code: TCG
        is not told about host writes, so code it already translated from those bytes may keep running."""
        offset = self._ram.file_offset(addr, len(data)) if self._ram is not None else None
        if offset is None:
            raise self._error("write", f"{addr:#x}+{len(data):#x} is not file-backed guest RAM "
                                       "(QMP has no memory-write command)")
        self._ram.write(offset, data)

    # --- errors ------------------------------------------------------------------------------------------------

    def _require_launched(self, step: str) -> None:
        if self._proc is None:
            raise self._error(step, "the machine was never launched")

    def _gone_or(self, err: BaseException) -> str:
        if self._proc is not None and self._proc.poll() is not None:
            return f"QEMU has exited (status {self._proc.returncode})"
        return repr(err)

    def _error(self, step: str, message: str) -> MachineStepError:
        stderr = ""
        if self.tmpdir is not None and (self.tmpdir / "qemu.log").exists():
            stderr = (self.tmpdir / "qemu.log").read_bytes()[-_STDERR_TAIL:].decode("utf-8", "replace")
        serial = self._serial.tail(_SERIAL_TAIL) if self._serial is not None else ""
        status = self._proc.poll() if self._proc is not None else None
        return MachineStepError(step, message, qemu_status=status, command=self.command, stderr_tail=stderr,
                                serial_tail=serial)
