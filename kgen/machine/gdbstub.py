"""A small client of QEMU's gdbstub (the GDB remote serial protocol), for two jobs: stop the guest the first time its
CPU reaches an address (`kgen test --kernel ... --ready-at SYMBOL`), then hand the machine back to QMP; stop it at
every time it reaches one (`--check-at`, kgen/harness/checkat.py), stepping past the breakpoint each time.

Why a breakpoint and not sampling: sampling EIP (`--ready-symbol`) finds a place the kernel stays; a place it only
passes through (the first instruction of `kmain`, a function called once) is found only by the CPU itself.

The protocol, as much as is used here (GDB manual, "Remote Protocol"):
- A packet is `$DATA#CC`: CC is the sum of DATA's bytes mod 256 in two hex digits. The receiver answers `+` (got
  it) or `-` (checksum wrong: send it again). Both sides ack; QEMU in system mode does not wait for our ack.
- `Z1,ADDR,KIND` inserts a hardware breakpoint, `Z0,...` a software one, `z1`/`z0` remove them (KIND is the
  instruction length GDB would patch: 1 on x86). Replies: `OK`, `Enn` (error), or an empty packet (not supported).
- `s` runs one instruction and answers with a stop reply (QEMU steps with interrupts and timers held).
- `c` continues the guest; there is no reply until it stops: then a stop reply `T05...` (SIGTRAP: a breakpoint),
  `T02` (SIGINT: we, or QMP `stop`, paused it), `T03`/`W..`/`X..` (the machine shut down, or QEMU is leaving).
- A lone byte 0x03 (not a packet) asks QEMU to stop the guest; it answers with a stop reply.

What QEMU does with it (QEMU 7.2 gdbstub.c, checked on this machine, see tests/harness/test_foreign_ready.py):
- Connecting pauses a running guest (`vm_stop(RUN_STATE_PAUSED)`); a guest held with `-S` stays held. While a client
  is attached, every later stop of the VM, QMP `stop` included, sends it a stop reply.
- Under TCG `Z0` and `Z1` are the same thing: the translator checks the CPU's linear PC (EIP with a flat CS) against
  the breakpoint list before each instruction, so guest memory is never patched. Under KVM `Z0` writes an `int3`
  into guest memory through the page tables current when it is inserted, and `Z1` loads a debug register: so `Z1`
  is tried first, and it is the one that works before the kernel is in RAM (QEMU's Multiboot option ROM copies it
  there during the boot).
- Both compare linear (virtual) addresses: a symbol in code that runs before paging at a load address other than
  its link address is reached at the load address (the caller inserts both).
- Detaching (`D`) resumes the guest. So this client never detaches: it removes its breakpoints and closes the
  socket. QEMU then keeps sending its stop replies to a socket nobody listens on, which drops them; the guest and
  QMP carry on as if no debugger had been there.
"""
from __future__ import annotations

import select
import socket
import time
from pathlib import Path

ACK, NACK, INTERRUPT = b"+", b"-", b"\x03"
REPLY_TIMEOUT = 5.0         # one request and its reply over a local socket: milliseconds unless QEMU is wedged
RESENDS = 3


class GdbStubError(Exception):
    """The stub broke the protocol, refused a request, or went away."""


def checksum(data: bytes) -> bytes:
    return b"%02x" % (sum(data) % 256)


def frame(data: str | bytes) -> bytes:
    """`$DATA#CC`, with `$ # } *` in DATA escaped (`}` then the byte xor 0x20) as the protocol asks."""
    raw = data.encode() if isinstance(data, str) else bytes(data)
    escaped = bytearray()
    for byte in raw:
        if byte in b"$#}*":
            escaped += bytes((0x7D, byte ^ 0x20))
        else:
            escaped.append(byte)
    return b"$" + bytes(escaped) + b"#" + checksum(bytes(escaped))


def decode(body: bytes) -> bytes:
    """A received packet's DATA with escapes and run-length encoding (`X*n`: X repeated n - 29 more times) undone."""
    out = bytearray()
    i = 0
    while i < len(body):
        byte = body[i]
        if byte == 0x7D and i + 1 < len(body):
            out.append(body[i + 1] ^ 0x20)
            i += 2
        elif byte == 0x2A and out and i + 1 < len(body):
            out += bytes((out[-1],)) * (body[i + 1] - 29)
            i += 2
        else:
            out.append(byte)
            i += 1
    return bytes(out)


class StopReply(str):
    """A stop reply packet (`T05thread:01;`): `signal` is its signal number, `final` says the guest will not run
    again (the machine shut down, or QEMU exited)."""

    @property
    def signal(self) -> int | None:
        return int(self[1:3], 16) if self[:1] in ("T", "S") and len(self) >= 3 else None

    @property
    def final(self) -> bool:
        return self[:1] in ("W", "X") or self.signal == 3


class GdbStub:
    """One connection to a QEMU's gdbstub on a unix socket (`-gdb chardev:...` of a server socket chardev)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._sock: socket.socket | None = None
        self._buffer = bytearray()
        self._pending: list[StopReply] = []    # stop replies that arrived while we waited for something else
        self.breakpoints: list[tuple[str, int]] = []    # (type "0"/"1", address) inserted and not removed yet

    # --- connection ----------------------------------------------------------------------------------------------

    def connect(self, timeout: float = REPLY_TIMEOUT) -> GdbStub:
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(self.path))
                break
            except (FileNotFoundError, ConnectionRefusedError) as err:
                sock.close()
                if time.monotonic() >= deadline:
                    raise GdbStubError(f"cannot connect to the gdbstub at {self.path}: {err}") from None
                time.sleep(0.01)
        self._sock = sock
        return self

    def close(self) -> None:
        """Hang up without `D` (which would resume the guest): the guest stays as it is."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> GdbStub:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- packets -------------------------------------------------------------------------------------------------

    def _recv(self, deadline: float | None) -> bool:
        """More bytes into the buffer; False if none came by the deadline."""
        wait = None if deadline is None else max(0.0, deadline - time.monotonic())
        if not select.select([self._sock], [], [], wait)[0]:
            return False
        data = self._sock.recv(4096)
        if not data:
            raise GdbStubError("the gdbstub closed the connection (QEMU exited?)")
        self._buffer += data
        return True

    def _next(self, deadline: float | None) -> bytes | None:
        """The next ack byte (`+`/`-`) or whole packet's data (checked, and acked), or None at the deadline."""
        while True:
            while self._buffer[:1] and self._buffer[:1] not in (b"$", ACK, NACK):
                del self._buffer[:1]        # noise between packets (a stray 0x03 echo, a newline) is skipped
            if self._buffer[:1] in (ACK, NACK):
                byte = bytes(self._buffer[:1])
                del self._buffer[:1]
                return byte
            end = self._buffer.find(b"#")
            if self._buffer[:1] == b"$" and end >= 0 and len(self._buffer) >= end + 3:
                body, sent = bytes(self._buffer[1:end]), bytes(self._buffer[end + 1:end + 3]).lower()
                del self._buffer[:end + 3]
                if checksum(body) != sent:
                    self._sock.sendall(NACK)
                    continue
                self._sock.sendall(ACK)
                return b"$" + decode(body)
            if not self._recv(deadline):
                return None

    def _send(self, data: str) -> None:
        packet = frame(data)
        deadline = time.monotonic() + REPLY_TIMEOUT
        for _ in range(RESENDS):
            self._sock.sendall(packet)
            while True:
                got = self._next(deadline)
                if got is None:
                    raise GdbStubError(f"no ack for {data!r} within {REPLY_TIMEOUT:g} s")
                if got in (ACK, NACK):
                    break
                self._keep(got)     # a stop reply that crossed our packet
            if got == ACK:
                return
        raise GdbStubError(f"{data!r} was refused {RESENDS} times (checksum errors)")

    def _keep(self, packet: bytes) -> None:
        text = packet[1:].decode("ascii", "replace")
        if text[:1] in ("T", "S", "W", "X"):
            self._pending.append(StopReply(text))

    def request(self, data: str) -> str:
        """Send one packet and return the data of its reply packet."""
        self._send(data)
        deadline = time.monotonic() + REPLY_TIMEOUT
        while True:
            got = self._next(deadline)
            if got is None:
                raise GdbStubError(f"no reply to {data!r} within {REPLY_TIMEOUT:g} s")
            if got in (ACK, NACK):
                continue
            text = got[1:].decode("ascii", "replace")
            if data[:1] not in ("?", "c", "s") and text[:1] in ("T", "S") and len(text) >= 3:
                self._pending.append(StopReply(text))   # asynchronous stop, not the answer to this request
                continue
            return text

    # --- what kgen uses ------------------------------------------------------------------------------------------

    def insert_breakpoint(self, addr: int) -> str:
        """Break at linear address `addr`: hardware (`Z1`) if the stub takes it, else software (`Z0`). Returns the
        type used ("1" or "0"); raises GdbStubError if neither is accepted."""
        answers = []
        for kind in ("1", "0"):
            reply = self.request(f"Z{kind},{addr:x},1")
            if reply == "OK":
                self.breakpoints.append((kind, addr))
                return kind
            answers.append(f"Z{kind}: {reply or 'not supported'}")
        raise GdbStubError(f"the gdbstub refused a breakpoint at {addr:#x} ({'; '.join(answers)})")

    def remove_breakpoints(self) -> None:
        while self.breakpoints:
            kind, addr = self.breakpoints.pop()
            reply = self.request(f"z{kind},{addr:x},1")
            if reply != "OK":
                raise GdbStubError(f"the gdbstub did not remove the breakpoint at {addr:#x}: {reply or 'no answer'}")

    def step(self, timeout: float = REPLY_TIMEOUT) -> StopReply:
        """Run one instruction (`s`; QEMU steps with interrupts and timers held) and return the stop reply it ends
        with."""
        self._pending.clear()
        self._send("s")
        stop = self.wait_stop(timeout)
        if stop is None:
            raise GdbStubError(f"a single step did not end within {timeout:g} s")
        return stop

    def step_over_breakpoints(self) -> StopReply:
        """Get the CPU past the breakpoint it is stopped at, the breakpoints in again afterwards: the protocol
        leaves that to the client (under KVM a `Z0` is an int3 in guest memory; a `Z1` fires again at once), so
        all are taken out, one instruction is stepped and they go back as they were."""
        inserted = list(self.breakpoints)
        self.remove_breakpoints()
        stop = self.step()
        for kind, addr in inserted:
            reply = self.request(f"Z{kind},{addr:x},1")
            if reply != "OK":
                raise GdbStubError(f"the gdbstub did not put the breakpoint at {addr:#x} back: {reply or 'no answer'}")
            self.breakpoints.append((kind, addr))
        return stop

    def cont(self) -> None:
        """Let the guest run; its next stop arrives as a stop reply (`wait_stop`)."""
        self._pending.clear()
        self._send("c")

    def wait_stop(self, timeout: float) -> StopReply | None:
        """The next stop reply, or None if the guest is still running after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while not self._pending:
            got = self._next(deadline)
            if got is None:
                return None
            if got not in (ACK, NACK):
                self._keep(got)
        return self._pending.pop(0)

    def interrupt(self, timeout: float = REPLY_TIMEOUT) -> StopReply:
        """Stop a running guest (the protocol's 0x03) and return its stop reply."""
        self._sock.sendall(INTERRUPT)
        stop = self.wait_stop(timeout)
        if stop is None:
            raise GdbStubError(f"the guest did not stop within {timeout:g} s of an interrupt")
        return stop
