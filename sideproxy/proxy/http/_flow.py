"""Flow control, one tiny class used the same way on the client side and the upstream side.

Write side: asyncio calls ``pause_writing`` / ``resume_writing`` on the protocol when the
transport's send buffer crosses its high / low water marks; the protocol forwards them here and
writers ``await drain()``. Read side: whoever buffers received bytes reports them with
``buffered(n)`` / ``consumed(n)``; above ``high`` the transport stops reading (the kernel's
receive window then pushes back on the peer), below ``low`` it reads again.
"""

from __future__ import annotations

import asyncio

__all__ = ["HIGH_WATER", "LOW_WATER", "FlowControl"]

HIGH_WATER = 256 * 1024
LOW_WATER = 64 * 1024


class FlowControl:
    __slots__ = ("_buffered", "_lost", "_read_paused", "_transport", "_waiter", "_write_paused")

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._write_paused = False
        self._read_paused = False
        self._waiter: asyncio.Future[None] | None = None
        self._buffered = 0
        self._lost = False

    # ---------------------------------------------------------------- write side

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake()

    def lost(self) -> None:
        """The connection is gone: wake a writer blocked in ``drain`` (it then raises)."""
        self._lost = True
        self._wake()

    async def drain(self) -> None:
        """Return once the send buffer is below its low water mark; ConnectionError if the
        connection is gone."""
        if self._lost:
            raise ConnectionResetError("connection lost")
        if not self._write_paused:
            return
        waiter = self._waiter
        if waiter is None:
            waiter = self._waiter = asyncio.get_running_loop().create_future()
        await asyncio.shield(waiter)
        if self._lost:
            raise ConnectionResetError("connection lost")

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # ---------------------------------------------------------------- read side

    def pause_reading(self) -> None:
        if not self._read_paused and not self._lost:
            self._read_paused = True
            self._transport.pause_reading()

    def resume_reading(self) -> None:
        if self._read_paused and not self._lost:
            self._read_paused = False
            self._transport.resume_reading()

    def buffered(self, n: int) -> None:
        self._buffered += n
        if self._buffered > HIGH_WATER:
            self.pause_reading()

    def consumed(self, n: int) -> None:
        self._buffered -= n
        if self._buffered < LOW_WATER:
            self.resume_reading()
