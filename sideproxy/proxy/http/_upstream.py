"""One keep-alive connection to a provider (an httptools response parser on an asyncio
protocol) and the response it delivers: head first, then the body through a small buffer with
flow control (reading pauses above the high water mark until the consumer catches up)."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from typing import TYPE_CHECKING

import httptools

from sideproxy.proxy._exchange import Headers, RawHeaders, UpstreamBroken, UpstreamTimedOut
from sideproxy.proxy.http._flow import FlowControl

if TYPE_CHECKING:
    from sideproxy.proxy.http._client import Pool

__all__ = ["Connection", "Response", "Stale"]

_CONTENT_LENGTH = b"content-length"
_CONTENT_TYPE = b"content-type"
_TRANSFER_ENCODING = b"transfer-encoding"


class Stale(Exception):
    """A reused connection closed before any byte of the answer: safe to send again."""


class Response:
    """What ``UpstreamClient.send`` returns (the ``UpstreamResponse`` protocol)."""

    __slots__ = (
        "_chunks",
        "_complete",
        "_conn",
        "_deadline",
        "_error",
        "_raw",
        "_read_timeout",
        "_reading",
        "_waiter",
        "content_length",
        "content_type",
        "headers",
        "raw_headers",
        "reason",
        "status",
    )

    def __init__(self, conn: Connection, read_timeout: float) -> None:
        self._conn = conn
        self._read_timeout = read_timeout
        self.status = 0
        self.reason = ""
        self._raw: list[tuple[bytes, bytes]] = []  # filled by the parser
        self.raw_headers: RawHeaders = self._raw
        self.headers: Mapping[str, str] = Headers(self._raw)
        self.content_length: int | None = None
        self.content_type = ""
        self._chunks: deque[bytes] = deque()
        self._complete = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._deadline: asyncio.TimerHandle | None = None
        self._reading = False

    # ---------------------------------------------------------------- fed by the connection

    def _head_done(self) -> None:
        for name, value in self.raw_headers:
            size = len(name)
            if size == 14 and name.lower() == _CONTENT_LENGTH:
                self.content_length = int(value)
            elif size == 12 and name.lower() == _CONTENT_TYPE:
                self.content_type = value.partition(b";")[0].strip().lower().decode("latin-1")

    def _feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self._conn.flow.buffered(len(data))
        self._wake()

    def _finish(self) -> None:
        self._complete = True
        self._wake()

    def _fail(self, exc: BaseException) -> None:
        if not self._complete and self._error is None:
            self._error = exc
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # ---------------------------------------------------------------- read by the caller

    async def _next(self, seconds: float) -> bytes:
        """The next piece of the body, b"" at its end."""
        while True:
            if self._chunks:
                data = self._chunks.popleft()
                self._conn.flow.consumed(len(data))
                return data
            if self._error is not None:
                raise self._error
            if self._complete:
                return b""
            loop = self._conn.loop
            waiter = self._waiter = loop.create_future()
            timer = loop.call_later(seconds, _time_out, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
                self._waiter = None

    async def read(self, limit: int) -> bytes | None:
        if self.content_length is not None and self.content_length > limit:
            return None
        self._reading = True
        chunks = self._chunks
        if self._complete and len(chunks) == 1 and self._error is None:
            if len(chunks[0]) > limit:
                return None
            data = chunks.popleft()  # the usual case: it all came with the head
            self._conn.flow.consumed(len(data))
            return data
        parts: list[bytes] = []
        size = 0
        while data := await self._next_or_raise(self._read_timeout):
            size += len(data)
            if size > limit:
                return None
            parts.append(data)
        return b"".join(parts)

    async def _next_or_raise(self, seconds: float) -> bytes:
        try:
            return await self._next(seconds)
        except TimeoutError:
            self._conn.abort()
            raise UpstreamTimedOut("the provider's answer stalled") from None

    def chunks(self, idle_timeout: float) -> AsyncIterator[bytes]:
        self._reading = True
        return self._iterate(idle_timeout)

    async def _iterate(self, idle_timeout: float) -> AsyncIterator[bytes]:
        while data := await self._next_or_raise(idle_timeout):
            yield data

    def release(self) -> None:
        self._cancel_deadline()
        conn = self._conn
        if self._complete and not self._chunks and self._error is None and conn.reusable():
            conn.pool.put(conn)
        else:
            conn.abort()

    def close(self) -> None:
        self._cancel_deadline()
        self._conn.abort()

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None


def _time_out(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


class Connection(asyncio.Protocol):
    """A connection to one origin; one exchange at a time."""

    __slots__ = (
        "_deadline",
        "_deadline_idle",
        "_head_only",
        "_head_waiter",
        "_keep_alive",
        "_received",
        "_timer",
        "flow",
        "loop",
        "parser",
        "pool",
        "response",
        "transport",
        "uses",
    )

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.loop = pool.loop
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.flow: FlowControl = None  # type: ignore[assignment]
        self.parser = httptools.HttpResponseParser(self)
        self.response: Response | None = None
        self._head_waiter: asyncio.Future[Response] | None = None
        self._head_only = False
        self._keep_alive = False
        self._received = 0
        self.uses = 0
        # One timer per connection, moved rather than re-created per request (set_deadline):
        # the idle expiry while pooled, the first-byte deadline while waiting for a head.
        self._timer: asyncio.TimerHandle | None = None
        self._deadline: float | None = None
        self._deadline_idle = False

    # ---------------------------------------------------------------- asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.flow = FlowControl(self.transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.set_deadline(None)
        self.flow.lost()
        self.pool.discard(self)
        response = self.response
        waiter = self._head_waiter
        if waiter is not None and not waiter.done():
            if self._received == 0 and self.uses > 1:
                waiter.set_exception(Stale())
            else:
                waiter.set_exception(UpstreamBroken("the provider closed the connection"))
        if response is not None and not response._complete:
            if exc is None and self._close_delimited(response):
                response._finish()  # the end of a body without a length is the close
            else:
                response._fail(UpstreamBroken("the provider's answer broke off"))

    def pause_writing(self) -> None:
        self.flow.pause_writing()

    def resume_writing(self) -> None:
        self.flow.resume_writing()

    def data_received(self, data: bytes) -> None:
        self._received += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self._broken("the provider's answer is not valid HTTP")

    # ---------------------------------------------------------------- parser callbacks

    def on_status(self, status: bytes) -> None:
        if self.response is not None:
            self.response.reason += status.decode("latin-1")

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.response is not None:
            self.response._raw.append((name, value))

    def on_headers_complete(self) -> None:
        response = self.response
        waiter = self._head_waiter
        if response is None or waiter is None or waiter.done():
            raise UpstreamBroken("an answer nobody asked for")
        self._deadline = None  # the head is in: no first-byte deadline any more
        response.status = self.parser.get_status_code()
        response._head_done()
        if self._head_only:
            response._finish()  # HEAD: no body follows, whatever the head says
        waiter.set_result(response)

    def on_body(self, body: bytes) -> None:
        if self.response is not None:
            self.response._feed(body)

    def on_message_complete(self) -> None:
        self._keep_alive = self.parser.should_keep_alive()  # llhttp forgets it right after
        if self.response is not None:
            self.response._finish()

    # ---------------------------------------------------------------- the exchange

    def set_deadline(self, when: float | None, idle: bool = False) -> None:
        """Act at ``when`` (loop time): close if ``idle``, else fail the head's waiter."""
        self._deadline = when
        self._deadline_idle = idle
        timer = self._timer
        if when is None:
            return  # a pending timer finds no deadline and stops
        if timer is not None:
            if timer.when() <= when:
                return  # it fires first and moves itself to ``when``
            timer.cancel()
        self._timer = self.loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        when = self._deadline
        if when is None:
            return
        if self.loop.time() < when:
            self._timer = self.loop.call_at(when, self._on_timer)
            return
        self._deadline = None
        if not self._deadline_idle:
            waiter = self._head_waiter
            if waiter is not None and not waiter.done():
                waiter.set_exception(UpstreamTimedOut("the provider did not answer in time"))
        self.abort()

    def send(self, data: bytes, head_only: bool, read_timeout: float) -> asyncio.Future[Response]:
        self.uses += 1
        self._received = 0
        self._keep_alive = False
        self._head_only = head_only
        self.response = Response(self, read_timeout)
        waiter = self._head_waiter = self.loop.create_future()
        self.transport.write(data)
        return waiter

    def reusable(self) -> bool:
        return not self._head_only and not self.transport.is_closing() and self._keep_alive

    def abort(self) -> None:
        self.response = None
        if self.transport is not None:
            self.transport.abort()

    def _broken(self, message: str) -> None:
        error = UpstreamBroken(message)
        waiter = self._head_waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)
        if self.response is not None:
            self.response._fail(error)
        self.transport.abort()

    @staticmethod
    def _close_delimited(response: Response) -> bool:
        if response.status == 0 or response.content_length is not None:
            return False
        return not any(
            len(name) == 17 and name.lower() == _TRANSFER_ENCODING
            for name, _ in response.raw_headers
        )


Factory = Callable[[], Connection]
