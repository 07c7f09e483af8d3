"""QMP over a socket QEMU connected to: one private asyncio loop, driven by each call (one thread only)."""
from __future__ import annotations

import asyncio
import socket

from qemu.qmp import ExecuteError, QMPClient, QMPError

QMP_TIMEOUT = 10.0         # any single QMP command

# What a QMP exchange can end in when QEMU is gone or slow, besides a command's own error (ExecuteError).
LINK_ERRORS = (QMPError, OSError, EOFError, asyncio.TimeoutError)


class QmpLink:
    def __init__(self):
        self._loop = asyncio.new_event_loop()
        self._client = QMPClient("kgen-machine")
        self.events: list[dict] = []      # every event seen so far, oldest first

    def connect(self, sock: socket.socket, timeout: float) -> None:
        self._run(self._client.connect(sock), timeout)

    def _run(self, coro, timeout: float):
        return self._loop.run_until_complete(asyncio.wait_for(coro, timeout))

    def execute(self, command: str, arguments: dict | None = None, timeout: float = QMP_TIMEOUT) -> object:
        """Raises ExecuteError (QEMU refused) or one of LINK_ERRORS (no answer)."""
        try:
            return self._run(self._client.execute(command, arguments), timeout)
        finally:
            self.events.extend(dict(e) for e in self._client.events.clear())

    def close(self, timeout: float) -> None:
        try:
            self._run(self._client.disconnect(), timeout)
        except LINK_ERRORS:
            pass  # the peer is gone; disconnect still cancels the client's tasks
        self._loop.close()


__all__ = ["ExecuteError", "LINK_ERRORS", "QMP_TIMEOUT", "QmpLink"]
