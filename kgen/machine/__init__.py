"""One QEMU boot of a kernel: launch, talk over QMP and the serial ports, shut down, and always clean up.

Lifecycle (like QEMU's own python/qemu/machine): `launch()` creates a private temporary directory, listens there on
three unix sockets (QMP, COM1, COM2), starts QEMU as their client and accepts its connections, so no sleep-and-retry
is needed and a QEMU that dies at start-up is seen at once. `shutdown()` asks QEMU to quit, kills it if it does not,
reaps it, closes everything and removes the directory; it runs from `__exit__` whatever happened inside the `with`
block, and an atexit/SIGTERM hook kills any machine still alive, so no QEMU outlives the harness.

Guest RAM is a shared file in that directory (`memory-backend-file,share=on`) which the host maps too: reading guest
physical memory is a memcpy, and it stays readable after QEMU has exited (until `shutdown`). Where the file does not
back an address (the legacy VGA/ROM window, MMIO, RAM without a file), reads go through QMP `pmemsave`.

All methods must be called from one thread: QMP runs on a private asyncio loop driven by each call.
"""

from __future__ import annotations

import asyncio
import atexit
import codecs
import ctypes
import mmap
import os
import re
import select
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from qemu.qmp import ExecuteError, QMPClient, QMPError

from kgen.errors import MachineError, ToolMissing
from kgen.build.layout import DEBUG_EXIT_PORT
from kgen.guest.registers import Registers, parse_info_registers

QEMU_PACKAGE = "qemu-system-x86"
MIB = 1 << 20

START_TIMEOUT = 10.0       # QEMU up to its chardev connections and QMP greeting; it takes ~0.05 s
QMP_TIMEOUT = 10.0         # any single QMP command
QUIT_GRACE = 2.0           # after QMP quit, before kill -9
RUNSTATE_POLL = 0.1        # how often wait_* asks QMP whether the guest stopped for good

# Runstates from which the guest produces no more output and QEMU does not exit by itself (-no-shutdown keeps it
# alive after a triple fault or power-off, so the CPU and memory can still be inspected).
_DEAD_END_RUNSTATES = {"shutdown", "internal-error", "guest-panicked"}

# The legacy window below 1 MiB shows VGA memory or BIOS shadow copies depending on the chipset's PAM registers,
# which the firmware changes at run time: never read it from the RAM file.
_LEGACY_HOLE = (0xA0000, 0x100000)

_SERIAL_TAIL = 2000
_STDERR_TAIL = 2000


class MachineStepError(MachineError):
    """A machine failure at a named step: launch, qmp-connect, wait, read, write, control, shutdown.

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


@dataclass(frozen=True)
class RamWindow:
    """Guest physical [start, end) is the RAM file at [offset, offset + end - start)."""

    start: int
    end: int
    offset: int


def parse_ram_windows(mtree_flat: str, backend_id: str) -> list[RamWindow]:
    """Where the memory backend `backend_id` appears in the flat view of the system address space.

    `mtree_flat` is HMP `info mtree -f`. On `pc` the RAM is one block split around the PCI hole: with less than
    3.5 GiB it is all below 4 GiB at offset == address; with more, 3 GiB stay low and the rest starts at 4 GiB with
    file offset 3 GiB. Reading QEMU's own view instead of recomputing that rule keeps it right for any machine.
    """
    windows: list[RamWindow] = []
    in_system = False
    for line in mtree_flat.splitlines():
        if line.startswith("FlatView"):
            in_system = False
        elif line.lstrip().startswith("AS "):
            in_system = in_system or line.split('"')[1] == "memory"
        elif in_system:
            m = re.match(r"\s*([0-9a-f]+)-([0-9a-f]+) \(prio -?\d+, (\w+)\): (\S+)(?: @([0-9a-f]+))?", line)
            if m and m[3] == "ram" and m[4] == backend_id:
                window = RamWindow(int(m[1], 16), int(m[2], 16) + 1, int(m[5] or "0", 16))
                windows.extend(_clip_legacy_hole(window))
    return windows


def _clip_legacy_hole(w: RamWindow) -> list[RamWindow]:
    lo, hi = _LEGACY_HOLE
    if w.end <= lo or w.start >= hi:
        return [w]
    parts = []
    if w.start < lo:
        parts.append(RamWindow(w.start, lo, w.offset))
    if w.end > hi:
        parts.append(RamWindow(hi, w.end, w.offset + hi - w.start))
    return parts


def _opt(value: object) -> str:
    """A value inside a QEMU `key=value,...` option: a comma is written twice."""
    return str(value).replace(",", ",,")


def _poison_pattern(poison: int | bytes | None) -> bytes | None:
    if poison is None:
        return None
    if isinstance(poison, int):
        if not 0 <= poison <= 0xFF:
            raise ValueError(f"poison byte {poison:#x} does not fit in a byte; give bytes for a wider pattern")
        return bytes([poison])
    pattern = bytes(poison)
    # The pattern must tile pages exactly, so the byte at a physical address is pattern[addr % len].
    if len(pattern) not in (1, 2, 4, 8):
        raise ValueError(f"poison pattern must be 1, 2, 4 or 8 bytes, not {len(pattern)}")
    return pattern


def fill_file(path: Path, size: int, pattern: bytes | None) -> None:
    """Create `path` with `size` bytes: sparse zeros, or `pattern` repeated (written in 1 MiB pwrites: ≈0.02 s for
    128 MiB, ≈0.2 s for 1 GiB on ext4 here)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, size)
        if pattern is not None:
            block = memoryview(pattern * (MIB // len(pattern)))
            for offset in range(0, size, MIB):
                os.pwrite(fd, block[: size - offset], offset)
    finally:
        os.close(fd)


# --- no orphan QEMU: every launched machine is registered until its shutdown has reaped QEMU ---------------------

_live: set[Machine] = set()
_previous_sigterm: object = None
_hooks_installed = False

try:
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # not Linux: rely on the atexit/SIGTERM hooks alone
    _prctl = None
_PR_SET_PDEATHSIG = 1
_SIGKILL = int(signal.SIGKILL)


def _die_with_parent() -> None:
    # Runs in the forked child before exec: if the harness is SIGKILLed (no atexit, no handler), the kernel kills
    # QEMU too. Linux ties this to the thread that forked, so launch machines from a thread that outlives them.
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, _SIGKILL)


def _kill_all_live() -> None:
    # list() of a set is one C call: safe against other threads adding or removing machines meanwhile, and no lock
    # is taken, so this can run inside a signal handler that interrupted a thread holding one.
    for machine in list(_live):
        machine._kill_hard()


def _on_sigterm(signum: int, frame: object) -> None:
    _kill_all_live()
    if callable(_previous_sigterm):
        _previous_sigterm(signum, frame)
    elif _previous_sigterm != signal.SIG_IGN:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)


def _install_hooks() -> None:
    global _hooks_installed, _previous_sigterm
    if _hooks_installed:
        return
    atexit.register(_kill_all_live)
    if threading.current_thread() is threading.main_thread():  # signal.signal works only there
        _previous_sigterm = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, _on_sigterm)
    _hooks_installed = True


class Machine:
    """A QEMU `pc` machine booting one kernel (Multiboot ELF via `-kernel`) or one ISO (`-cdrom`)."""

    def __init__(self, kernel: str | os.PathLike | None = None, iso: str | os.PathLike | None = None, *,
                 append: str | None = None, accel: str = "tcg", memory_mib: int = 128,
                 poison: int | bytes | None = None, debug_exit_port: int = DEBUG_EXIT_PORT, echo_serial: bool = False,
                 icount: bool = False, ram_file: bool = True, extra_args: Sequence[str] = (),
                 qemu: str = "qemu-system-i386"):
        if (kernel is None) == (iso is None):
            raise ValueError("give exactly one of kernel= or iso=")
        if append is not None and kernel is None:
            raise ValueError("append= is the -kernel command line; an ISO's bootloader has its own")
        if accel not in ("tcg", "kvm"):
            raise ValueError(f"accel must be 'tcg' or 'kvm', not {accel!r}")
        if icount and accel != "tcg":
            raise ValueError("icount needs accel='tcg'")
        if poison is not None and not ram_file:
            raise ValueError("poison= needs ram_file=True: the pattern is written into the RAM file")
        # Absolute, because QEMU runs in the temporary directory.
        self.kernel = Path(kernel).resolve() if kernel is not None else None
        self.iso = Path(iso).resolve() if iso is not None else None
        self.append = append
        self.accel = accel
        self.memory_mib = memory_mib
        self.poison = _poison_pattern(poison)
        self.debug_exit_port = debug_exit_port
        self.echo_serial = echo_serial
        self.icount = icount
        self.ram_file = ram_file
        self.extra_args = tuple(extra_args)
        self.qemu = qemu

        self.com2: socket.socket | None = None  # connected to the guest's COM2 once launched; raw bytes both ways
        self.tmpdir: Path | None = None
        self.command: tuple[str, ...] = ()
        self.ram_windows: list[RamWindow] = []
        self.timings: dict[str, float] = {}
        self._proc: subprocess.Popen | None = None
        self._log = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._qmp: QMPClient | None = None
        self._com1: socket.socket | None = None
        self._listeners: list[socket.socket] = []
        self._ram: mmap.mmap | None = None
        self._serial = bytearray()
        self._serial_cond = threading.Condition()
        self._cursor = 0
        self._pump: threading.Thread | None = None
        self._events: list[dict] = []
        self._launched = False
        self._closed = False

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
        self._launched = True
        started = time.monotonic()
        try:
            self.tmpdir = Path(tempfile.mkdtemp(prefix="kgen-qemu-"))
            _install_hooks()
            if self.ram_file:
                fill_file(self.tmpdir / "ram", self.memory_mib * MIB, self.poison)
                self.timings["ram_fill"] = time.monotonic() - started
            qmp_listener, com1_listener, com2_listener = (self._listen(n) for n in ("qmp", "com1", "com2"))
            self.command = tuple(self._command_line(binary))
            self._log = open(self.tmpdir / "qemu.log", "wb")
            self._proc = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=self._log,
                                          stderr=subprocess.STDOUT, cwd=self.tmpdir, preexec_fn=_die_with_parent)
            _live.add(self)
            deadline = time.monotonic() + START_TIMEOUT
            self._com1 = self._accept(com1_listener, "COM1", deadline)
            self.com2 = self._accept(com2_listener, "COM2", deadline)
            self._pump = threading.Thread(target=self._pump_serial, name="kgen-com1", daemon=True)
            self._pump.start()
            self._connect_qmp(self._accept(qmp_listener, "QMP", deadline), deadline)
            if self.ram_file:
                self._map_ram()
            self.timings["launch"] = time.monotonic() - started
        except OSError as err:  # a socket path too long for AF_UNIX, a full disk, an unexecutable binary
            failure = self._error("launch", f"{err} (working in {self.tmpdir})")
            self._teardown()
            raise failure from err
        except BaseException:
            self._teardown()
            raise
        return self

    def shutdown(self) -> None:
        """Quit QEMU (kill -9 if it does not go within QUIT_GRACE), reap it, release everything. Idempotent."""
        if self._closed or not self._launched:
            self._closed = True
            return
        try:
            if self._proc is not None and self._proc.poll() is None and self._qmp is not None:
                try:
                    self._run(self._qmp.execute("quit"), QUIT_GRACE)
                except (QMPError, OSError, EOFError, asyncio.TimeoutError):
                    pass  # QEMU closing the socket before its reply is the normal way for quit to end
                try:
                    self._proc.wait(QUIT_GRACE)
                except subprocess.TimeoutExpired:
                    pass
        finally:
            self._teardown()

    def _teardown(self) -> None:
        """Release everything `launch` acquired, in reverse order, tolerating any of it being absent or broken."""
        self._closed = True
        stuck = self._kill_hard()
        if self._qmp is not None and self._loop is not None:
            try:
                self._run(self._qmp.disconnect(), QUIT_GRACE)
            except (QMPError, OSError, EOFError, asyncio.TimeoutError):
                pass  # the peer is gone; disconnect still cancels the client's tasks
        if self._loop is not None:
            self._loop.close()
        if self._pump is not None:
            self._pump.join(QUIT_GRACE)  # QEMU is dead, so COM1 is at EOF and the thread is ending
        for sock in (self._com1, self.com2, *self._listeners):
            if sock is not None:
                sock.close()
        if self._ram is not None:
            self._ram.close()
            self._ram = None
        if self._log is not None:
            self._log.close()
        _live.discard(self)
        if stuck:
            raise self._error("shutdown", f"QEMU (pid {self._proc.pid}) did not die after SIGKILL")

    def _kill_hard(self) -> bool:
        """SIGKILL and reap QEMU if it is alive, remove the temporary directory. True if QEMU would not die."""
        stuck = False
        proc = self._proc
        if proc is not None and proc.returncode is None:
            try:
                proc.kill()
            except ProcessLookupError:
                pass
            try:
                proc.wait(5.0)
            except subprocess.TimeoutExpired:
                stuck = True
        if self.tmpdir is not None and self.tmpdir.exists():
            shutil.rmtree(self.tmpdir, ignore_errors=True)
        return stuck

    @property
    def pid(self) -> int | None:
        """QEMU's process id (the Debian /usr/bin wrapper execs the real binary, so it is QEMU's own)."""
        return self._proc.pid if self._proc is not None else None

    # --- launch helpers ----------------------------------------------------------------------------------------

    def _listen(self, name: str) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listeners.append(sock)
        sock.bind(str(self.tmpdir / f"{name}.sock"))
        sock.listen(1)
        return sock

    def _command_line(self, binary: str) -> list[str]:
        def chardev(name: str) -> list[str]:
            return ["-chardev", f"socket,id={name},path={_opt(self.tmpdir / f'{name}.sock')}"]

        machine = "pc,memory-backend=ram" if self.ram_file else "pc"
        args = [binary, "-machine", machine, "-m", str(self.memory_mib), "-display", "none",
                "-no-user-config", "-no-reboot", "-no-shutdown", "-parallel", "none", "-net", "none",
                "-device", f"isa-debug-exit,iobase={self.debug_exit_port:#x},iosize=0x04",
                "-accel", self.accel,
                # QEMU is the client of sockets we already listen on: connected before the guest runs a cycle.
                *chardev("qmp"), "-mon", "chardev=qmp,mode=control",
                *chardev("com1"), "-serial", "chardev:com1",
                *chardev("com2"), "-serial", "chardev:com2"]
        if self.ram_file:
            args += ["-object", f"memory-backend-file,id=ram,size={self.memory_mib}M,"
                                f"mem-path={_opt(self.tmpdir / 'ram')},share=on"]
        if self.icount:
            args += ["-icount", "shift=0,sleep=off"]
        if self.kernel is not None:
            args += ["-kernel", str(self.kernel)]
            if self.append is not None:
                args += ["-append", self.append]
        else:
            args += ["-cdrom", str(self.iso), "-boot", "d"]
        return args + list(self.extra_args)

    def _accept(self, listener: socket.socket, what: str, deadline: float) -> socket.socket:
        # Poll in short slices so a QEMU that exits on a bad option is reported now, not at the deadline.
        while time.monotonic() < deadline:
            if select.select([listener], [], [], 0.02)[0]:
                conn, _ = listener.accept()
                return conn
            if self._proc.poll() is not None:
                raise self._error("launch", f"QEMU exited with status {self._proc.returncode} before "
                                            f"connecting {what}")
        raise self._error("launch", f"QEMU did not connect {what} within {START_TIMEOUT:.0f} s")

    def _connect_qmp(self, sock: socket.socket, deadline: float) -> None:
        self._loop = asyncio.new_event_loop()
        self._qmp = QMPClient("kgen-machine")
        try:
            self._run(self._qmp.connect(sock), max(0.1, deadline - time.monotonic()))
        except (QMPError, OSError, EOFError, asyncio.TimeoutError) as err:
            raise self._error("qmp-connect", f"QMP handshake failed: {err!r}") from err

    def _map_ram(self) -> None:
        fd = os.open(self.tmpdir / "ram", os.O_RDWR)
        try:
            self._ram = mmap.mmap(fd, self.memory_mib * MIB, mmap.MAP_SHARED)
        finally:
            os.close(fd)  # the mapping keeps the file referenced
        self.ram_windows = parse_ram_windows(self.hmp("info mtree -f"), "ram")
        mapped = sum(w.end - w.start for w in self.ram_windows)
        expected = self.memory_mib * MIB - (_LEGACY_HOLE[1] - _LEGACY_HOLE[0])
        if mapped != expected or any(w.offset + w.end - w.start > len(self._ram) for w in self.ram_windows):
            raise self._error("launch", f"guest RAM layout not understood: {self.ram_windows} "
                                        f"cover {mapped:#x} bytes of {expected:#x}")

    def _pump_serial(self) -> None:
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        while True:
            try:
                data = self._com1.recv(65536)
            except OSError:
                break
            if not data:
                break
            with self._serial_cond:
                self._serial += data
                self._serial_cond.notify_all()
            if self.echo_serial:
                sys.stdout.write(decoder.decode(data))
                sys.stdout.flush()

    # --- QMP ---------------------------------------------------------------------------------------------------

    def _run(self, coro, timeout: float):
        return self._loop.run_until_complete(asyncio.wait_for(coro, timeout))

    def qmp(self, command: str, arguments: dict | None = None, *, step: str = "control") -> object:
        """Execute one QMP command; `step` names the failure if it fails."""
        if self._qmp is None or self._closed:
            raise self._error(step, f"QMP {command}: machine is not running")
        try:
            result = self._run(self._qmp.execute(command, arguments), QMP_TIMEOUT)
        except ExecuteError as err:
            raise self._error(step, f"QMP {command}: {err}") from err
        except (QMPError, OSError, EOFError, asyncio.TimeoutError) as err:
            raise self._error(step, f"QMP {command}: {self._gone_or(err)}") from err
        self._events.extend(dict(e) for e in self._qmp.events.clear())
        return result

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
            if self._proc.poll() is not None:  # it exited during the query
                return "exited"
            raise

    def stop(self) -> None:
        self.qmp("stop")

    def cont(self) -> None:
        self.qmp("cont")

    @property
    def events(self) -> list[dict]:
        """QMP events received so far (STOP, SHUTDOWN, RESUME ...), oldest first."""
        return list(self._events)

    # --- serial and waiting ------------------------------------------------------------------------------------

    @property
    def serial(self) -> str:
        """All COM1 output so far."""
        with self._serial_cond:
            return self._serial.decode("utf-8", "replace")

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
            with self._serial_cond:
                found = self._serial.find(needle, self._cursor)
                if found >= 0:
                    self._cursor = found + len(needle)
                    return self._serial.decode("utf-8", "replace")
            now = time.monotonic()
            if now >= next_poll:
                ended = self._dead_end()
                if ended:
                    with self._serial_cond:
                        if self._serial.find(needle, self._cursor) >= 0:
                            continue  # the marker arrived while we were asking
                    raise self._error("wait", f"{marker!r} did not appear on COM1: {ended}")
                next_poll = now + RUNSTATE_POLL
            if now >= deadline:
                raise self._error("wait", f"{marker!r} did not appear on COM1 within {timeout:g} s "
                                          f"(runstate {self.status()})")
            with self._serial_cond:
                self._serial_cond.wait(min(deadline - now, RUNSTATE_POLL))

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
            self._pump.join(QUIT_GRACE)  # the guest's last bytes are in the socket before QEMU's exit
            return status

    def _dead_end(self) -> str | None:
        """Why the guest can make no more progress, or None while it can."""
        state = self.status()
        if state == "exited":
            self._pump.join(QUIT_GRACE)
            return f"QEMU exited with status {self._proc.returncode}"
        if state in _DEAD_END_RUNSTATES:
            reasons = [e.get("data", {}).get("reason") for e in self._events if e.get("event") == "SHUTDOWN"]
            reason = reasons[-1] if reasons else None
            if reason == "guest-reset":
                reason += ": a triple fault, or a reset the guest asked for"
            return f"the guest stopped in runstate {state}" + (f" (reason {reason})" if reason else "")
        return None

    # --- inspection --------------------------------------------------------------------------------------------

    def registers(self) -> Registers:
        """CPU 0's registers. Stop the machine first for a consistent snapshot under TCG."""
        text = self.hmp("info registers")
        try:
            return parse_info_registers(text)
        except ValueError as err:
            raise self._error("read", str(err)) from err

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
        offset = self._file_offset(addr, size)
        if offset is not None:
            return bytes(self._ram[offset:offset + size])
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
        offset = self._file_offset(addr, len(data))
        if offset is None:
            raise self._error("write", f"{addr:#x}+{len(data):#x} is not file-backed guest RAM "
                                       "(QMP has no memory-write command)")
        self._ram[offset:offset + len(data)] = data

    def _file_offset(self, addr: int, size: int) -> int | None:
        if self._ram is None:
            return None
        for w in self.ram_windows:
            if w.start <= addr and addr + size <= w.end:
                return w.offset + addr - w.start
        return None

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
        with self._serial_cond:
            serial = self._serial[-_SERIAL_TAIL:].decode("utf-8", "replace")
        status = self._proc.poll() if self._proc is not None else None
        return MachineStepError(step, message, qemu_status=status, command=self.command, stderr_tail=stderr,
                                serial_tail=serial)


def kvm_usable_for(kernel_path: str | os.PathLike, marker: bytes | str, timeout: float = 10.0,
                   qemu: str = "qemu-system-i386") -> tuple[bool, str]:
    """Boot `kernel_path` once under KVM: (True, how long) if it reaches `marker`, else (False, why).

    A KVM that cannot run the kernel's paging mode (kvm_pvm triple-faults 32-bit paging) ends in runstate
    shutdown or internal-error, which `wait_for` reports at once; `timeout` bounds a guest that just hangs.
    """
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False, "/dev/kvm is missing or not accessible"
    started = time.monotonic()
    try:
        with Machine(kernel=kernel_path, accel="kvm", qemu=qemu) as machine:
            machine.wait_for(marker, timeout)
    except MachineError as err:
        return False, f"KVM boot did not reach {marker!r}: {err}"
    return True, f"KVM boot reached {marker!r} in {time.monotonic() - started:.2f} s"
