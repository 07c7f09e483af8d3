"""The QEMU process: its private directory, the sockets it connects to, its start, and its certain end.

No orphan QEMU: every launched process is registered until it has been reaped; an atexit hook and a SIGTERM
handler kill whatever is still registered, and PR_SET_PDEATHSIG has the kernel kill QEMU if the harness itself is
SIGKILLed. No orphan directory: each directory is named after the harness's pid (`kgen-qemu-<pid>-...`), so a later
run removes the directories of harnesses that are gone (SIGKILL leaves no chance to clean up).
"""
from __future__ import annotations

import atexit
import ctypes
import os
import select
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from kgen import scratch

MACHINE_DIR_KIND = "qemu"
TMP_PREFIX = f"{scratch.PREFIX}{MACHINE_DIR_KIND}-"
SOCKET_PATH_MAX = 107       # sun_path is 108 bytes with its terminating NUL

_live: set = set()          # objects with a `_kill_hard()`: machines whose QEMU has not been reaped yet
_previous_sigterm: object = None
_hooks_installed = False

try:
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # not Linux: rely on the atexit/SIGTERM hooks alone
    _prctl = None
_PR_SET_PDEATHSIG = 1
_SIGKILL = int(signal.SIGKILL)


def die_with_parent() -> None:
    # Runs in the forked child before exec: if the harness is SIGKILLed (no atexit, no handler), the kernel kills
    # QEMU too. Linux ties this to the thread that forked, so launch machines from a thread that outlives them.
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, _SIGKILL)


def _kill_all_live() -> None:
    # list() of a set is one C call: safe against other threads adding or removing machines meanwhile, and no lock
    # is taken, so this can run inside a signal handler that interrupted a thread holding one.
    for owner in list(_live):
        owner._kill_hard()


def _on_sigterm(signum: int, frame: object) -> None:
    _kill_all_live()
    if callable(_previous_sigterm):
        _previous_sigterm(signum, frame)
    elif _previous_sigterm != signal.SIG_IGN:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)


def install_hooks() -> None:
    global _hooks_installed, _previous_sigterm
    if _hooks_installed:
        return
    atexit.register(_kill_all_live)
    if threading.current_thread() is threading.main_thread():  # signal.signal works only there
        _previous_sigterm = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, _on_sigterm)
    _hooks_installed = True


def register(owner) -> None:
    _live.add(owner)


def unregister(owner) -> None:
    _live.discard(owner)


# --- directories -------------------------------------------------------------------------------------------------

def sweep_stale_dirs(root: Path | None = None) -> list[Path]:
    """Remove the directories of kgen processes that are gone; returns what was removed."""
    return scratch.sweep_stale_dirs(root)


def make_dir() -> Path:
    """A private directory for one machine, named after this process so a later run can tell whether it is stale."""
    root = Path(tempfile.gettempdir())
    # The sockets live in this directory and AF_UNIX paths stop at 107 bytes: a long TMPDIR falls back to /tmp.
    if len(str(root)) + len(TMP_PREFIX) + 40 > SOCKET_PATH_MAX and Path("/tmp").is_dir():
        root = Path("/tmp")
    return scratch.scratch_dir(MACHINE_DIR_KIND, root)


# --- the process -------------------------------------------------------------------------------------------------

def listen(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        sock.listen(1)
    except OSError:
        sock.close()
        raise
    return sock


def caller_cwd() -> Path | None:
    """This process's working directory, or None when it was removed under us."""
    try:
        return Path(os.getcwd())
    except OSError:
        return None


def spawn(command, cwd: Path, log) -> subprocess.Popen:
    return subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=cwd,
                            preexec_fn=die_with_parent)


def accept(listener: socket.socket, proc: subprocess.Popen, deadline: float) -> socket.socket | None:
    """The connection QEMU makes to `listener`; None if QEMU exited first or the deadline passed (the caller
    tells which by `proc.poll()`). Polls in short slices so a QEMU that exits on a bad option is seen now."""
    while time.monotonic() < deadline:
        if select.select([listener], [], [], 0.02)[0]:
            conn, _ = listener.accept()
            return conn
        if proc.poll() is not None:
            return None
    return None


def kill_and_reap(proc: subprocess.Popen | None, timeout: float = 5.0) -> bool:
    """SIGKILL `proc` if it is alive and reap it. True if it would not die."""
    if proc is None or proc.returncode is not None:
        return False
    try:
        proc.kill()
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        return True
    return False
