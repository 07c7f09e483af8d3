"""COM1 as the harness sees it: a thread keeps reading the guest's output into a buffer that `wait_for` searches.

The thread receives only while holding the buffer's lock (it waits for data outside it, then reads what is there
without blocking), so `reset()` can empty the socket and replace the buffer with no chunk of the previous run
slipping in afterwards: a restored machine starts from its snapshot's COM1 text, not from a mix.
"""
from __future__ import annotations

import codecs
import select
import socket
import sys
import threading

_POLL = 0.1     # how often the reader looks at whether it should stop, while no byte comes


class SerialLog:
    def __init__(self, sock: socket.socket, echo: bool = False):
        self.sock = sock
        self.echo = echo
        self._buffer = bytearray()
        self._cursor = 0          # where the next wait_for starts looking
        self._cond = threading.Condition()
        self._eof = threading.Event()
        self._closing = False
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        sock.setblocking(False)
        self._thread = threading.Thread(target=self._pump, name="kgen-com1", daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        try:
            while not self._closing:
                try:
                    ready = select.select([self.sock], [], [], _POLL)[0]
                except (OSError, ValueError):
                    break
                if not ready:
                    continue
                with self._cond:
                    data = self._recv_nowait()
                    if data is None:
                        continue
                    if not data:
                        break
                    self._buffer += data
                    self._cond.notify_all()
                self._echo(data)
        finally:
            self._eof.set()
            with self._cond:
                self._cond.notify_all()

    def _echo(self, data: bytes) -> None:
        if self.echo:
            try:
                sys.stdout.write(self._decoder.decode(data))
                sys.stdout.flush()
            except (OSError, ValueError):
                self.echo = False   # stdout went away (`| head`): keep reading, stop echoing

    def _recv_nowait(self) -> bytes | None:
        """Bytes waiting in the socket, b"" at end of stream, None if none are there right now."""
        try:
            return self.sock.recv(65536)
        except BlockingIOError:
            return None
        except OSError:
            return b""

    # --- reading -------------------------------------------------------------------------------------------------

    @property
    def text(self) -> str:
        with self._cond:
            return self._buffer.decode("utf-8", "replace")

    def tail(self, size: int) -> str:
        with self._cond:
            return self._buffer[-size:].decode("utf-8", "replace")

    def find_next(self, needle: bytes) -> str | None:
        """If `needle` is there after the cursor: move the cursor past it and return all text; else None."""
        with self._cond:
            found = self._buffer.find(needle, self._cursor)
            if found < 0:
                return None
            self._cursor = found + len(needle)
            return self._buffer.decode("utf-8", "replace")

    def wait(self, timeout: float) -> None:
        """Sleep until more bytes arrive, the stream ends, or `timeout` passes."""
        with self._cond:
            if not self._eof.is_set():
                self._cond.wait(timeout)

    def drain(self, timeout: float) -> None:
        """Wait for the end of the stream (QEMU has exited, so its last bytes are on their way)."""
        self._eof.wait(timeout)

    # --- snapshots -----------------------------------------------------------------------------------------------

    def state(self) -> tuple[bytes, int]:
        """The text and cursor to restore later. Call with the guest stopped: what QEMU wrote before the stop may
        still be in the socket, not yet read by the thread (a busy host runs it late), and it belongs to this
        state; `reset()` would otherwise drop it, and a restored machine would lack bytes its guest has written."""
        late = bytearray()
        with self._cond:
            while data := self._recv_nowait():
                late += data
            if late:
                self._buffer += late
                self._cond.notify_all()
            state = bytes(self._buffer), self._cursor
        if late:
            self._echo(bytes(late))
        return state

    def reset(self, state: tuple[bytes, int]) -> None:
        """Drop what the socket still holds and make the buffer `state` (from `state()`). Call with the guest
        stopped: QEMU then writes no more, so what is in the socket is the previous run's."""
        with self._cond:
            while self._recv_nowait():
                pass
            self._buffer = bytearray(state[0])
            self._cursor = state[1]

    def close(self, timeout: float) -> None:
        self._closing = True
        self._thread.join(timeout)
        self.sock.close()


class SerialSink:
    """A serial port the harness does not read yet, kept flowing: a thread reads and drops what the guest writes
    until `stop()`.

    Why COM2 needs one: QEMU's 16550 hands each byte to the chardev at once, and when the socket is full (a unix
    stream socket takes a few hundred 1-byte writes nobody reads) it parks the byte in the transmit shift register
    and retries when the socket becomes writable. OVMF writes its console to every serial port, COM2 too, so an
    unread COM2 fills during the firmware's boot and the byte parked there is sent whenever the harness first
    reads COM2: into the middle of the first call (docs/toolchain.md). Read from launch on, the socket never
    fills, so nothing is parked and everything the firmware wrote is in the socket, to be dropped, long before
    the kernel serves calls.

    Like SerialLog's reader, the thread waits for data outside its lock and receives inside it: once `stop()`
    returns it takes no byte more, and the port's bytes are the caller's."""

    def __init__(self, sock: socket.socket, name: str):
        self.sock = sock
        self._lock = threading.Lock()
        self._stopped = False
        self._thread = threading.Thread(target=self._pump, name=f"kgen-{name}-sink", daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        while True:
            try:
                ready = select.select([self.sock], [], [], _POLL)[0]
            except (OSError, ValueError):
                return
            with self._lock:
                if self._stopped:
                    return
                if not ready:
                    continue
                try:
                    data = self.sock.recv(65536, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    continue
                except OSError:
                    return
                if not data:
                    return

    def stop(self) -> None:
        """Read no more: what arrives from now on stays in the socket for the caller."""
        with self._lock:
            self._stopped = True

    def close(self, timeout: float) -> None:
        self.stop()
        self._thread.join(timeout)
