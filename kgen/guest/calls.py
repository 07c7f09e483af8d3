"""Calling kernel routines from the host by symbol name, over the kernel's COM2 call channel (templates/calls.s).

    session.call("pmm_alloc")            -> eax
    session.call_full("pmm_free", frame) -> CallResult(eax, edx, cycles)
    channel.probe(vaddr, "write")        -> Probe: did the CPU fault, with which error code

Arguments and results are words of the kernel's architecture (32-bit on i386, 64-bit on x86_64); a routine follows
kgen's convention (arguments on the stack, templates/serial.s; on x86_64 the first six are also in the System V
registers). `eax`/`edx` of a result hold the whole xax/xdx. `cycles` is the kernel's rdtsc delta around the call:
instructions under TCG with -icount shift=0, cycles under KVM.
"""
from __future__ import annotations

import socket
import struct
import time
from dataclasses import dataclass

from kgen import protocol
from kgen.arch import hw
from kgen.guest.diagnose import find_exception, find_panic, tail
from kgen.guest.elfinfo import ElfInfo
from kgen.errors import KgenError
from kgen.build.layout import Layout

REPLY_WORDS = len(protocol.CALL_REPLY_FIELDS)
CALL_TIMEOUT = 30.0


class CallError(KgenError):
    """A call that could not be made or did not come back: unknown symbol, refused, faulted, hung."""


@dataclass(frozen=True)
class CallResult:
    eax: int
    edx: int
    cycles: int

    @property
    def value64(self) -> int:
        return self.edx << 32 | self.eax


@dataclass(frozen=True)
class Probe:
    """What the CPU did with one access probe_access tried (templates/peek.s): went through, or page-faulted with
    `error` (the PF_* bits) at `cr2`."""
    kind: str
    vaddr: int
    faulted: bool
    error: int = 0
    cr2: int = 0

    @classmethod
    def of(cls, kind: str, vaddr: int, result: CallResult) -> Probe:
        if not result.eax & protocol.PROBE_FAULTED:
            return cls(kind, vaddr, False)
        return cls(kind, vaddr, True, result.eax & ~protocol.PROBE_FAULTED, result.edx)

    def describe(self) -> str:
        if not self.faulted:
            return f"a {self.kind} at {self.vaddr:#x} went through"
        return (f"a {self.kind} at {self.vaddr:#x} faulted at {self.cr2:#x} "
                f"({hw.describe_page_fault_error(self.error)})")


class CallChannel:
    def __init__(self, machine, elf: ElfInfo, layout: Layout):
        self.machine = machine
        self.elf = elf
        self.layout = layout

    def address_of(self, routine: str | int) -> int:
        if isinstance(routine, int):
            return routine
        sym = self.elf.symbols.get(routine)
        if sym is None:
            raise CallError(f"no symbol {routine!r} in {self.elf.path.name}: cannot call it")
        return sym.value

    def call_full(self, routine: str | int, *args: int, timeout: float = CALL_TIMEOUT) -> CallResult:
        name = routine if isinstance(routine, str) else f"{routine:#x}"
        address = self.address_of(routine)
        if len(args) > protocol.CALL_MAX_ARGS:
            raise CallError(f"call {name}: {len(args)} arguments, the channel carries at most "
                            f"{protocol.CALL_MAX_ARGS}")
        arch = self.layout.arch
        words = [protocol.CALL_REQUEST_MAGIC, address, len(args)] + [a & arch.word_mask for a in args]
        word = "I" if arch.word_size == 4 else "Q"
        sock: socket.socket = self.machine.com2
        # The kernel writes COM2 only in reply to a request: bytes already there are nobody's reply (one to a call
        # that timed out), and would shift every word of this one.
        self.machine.drain_com2()
        try:
            sock.sendall(struct.pack(f"<{len(words)}{word}", *words))
            reply = self._receive(sock, arch.word_size * REPLY_WORDS, timeout)
        except (OSError, TimeoutError) as err:
            raise CallError(self._why_no_reply(name, err)) from None
        fields = dict(zip(protocol.CALL_REPLY_FIELDS, struct.unpack(f"<{REPLY_WORDS}{word}", reply)))
        if fields["magic"] != protocol.CALL_REPLY_MAGIC:
            raise CallError(f"call {name}: reply has magic {fields['magic']:#x}, expected "
                            f"{protocol.CALL_REPLY_MAGIC:#x}")
        if fields["status"] != protocol.CALL_STATUS_RAN:
            raise CallError(f"call {name}: the kernel refused address {address:#x} (outside its text)")
        return CallResult(fields["xax"], fields["xdx"], fields["tsc_high"] << 32 | fields["tsc_low"])

    def call(self, routine: str | int, *args: int, timeout: float = CALL_TIMEOUT) -> int:
        return self.call_full(routine, *args, timeout=timeout).eax

    def probe(self, vaddr: int, kind: str, timeout: float = CALL_TIMEOUT) -> Probe:
        """Make the CPU try one access ("read", "write" or "fetch") at vaddr; a page fault is contained and
        returned, not a failed call."""
        return Probe.of(kind, vaddr, self.call_full("probe_access", vaddr, protocol.PROBE_KINDS[kind],
                                                    timeout=timeout))

    @staticmethod
    def _receive(sock: socket.socket, size: int, timeout: float) -> bytes:
        deadline = time.monotonic() + timeout
        data = bytearray()
        while len(data) < size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no reply within {timeout:g} s")
            sock.settimeout(remaining)
            try:
                chunk = sock.recv(size - len(data))
            except socket.timeout:
                raise TimeoutError(f"no reply within {timeout:g} s") from None
            if not chunk:
                raise ConnectionError("COM2 closed: QEMU is gone")
            data += chunk
        return bytes(data)

    def _why_no_reply(self, name: str, err: BaseException) -> str:
        if isinstance(err, ConnectionError):
            try:    # QEMU is exiting: let its last serial bytes arrive before reading them
                self.machine.wait_exit(2.0)
            except KgenError:
                pass
        serial = self.machine.serial
        fault = find_exception(serial)
        if fault is not None:
            return f"call {name} faulted: {fault.describe(self.elf)}"
        panic = find_panic(serial)
        if panic is not None:
            return f"call {name} stopped the kernel: panic: {panic}"
        return f"call {name}: {err}; last output:\n{tail(serial, 5)}"
