"""One request on a server connection: what arrived (``Request``) and how to answer it
(``Cycle``, the responder handed to the handler). Both are thrown away after the response."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from sideproxy.proxy._exchange import ClientGone, RawHeaders
from sideproxy.proxy.http import _wire

if TYPE_CHECKING:
    from sideproxy.proxy.http._server import ServerProtocol

__all__ = ["Cycle", "Request"]

_CONTENT_LENGTH = b"content-length"


class Request:
    """A whole request: the head as it arrived (raw header pairs, in order) and the body."""

    __slots__ = ("body", "headers", "keep_alive", "method", "peer", "target")

    def __init__(  # noqa: PLR0917 - built once per request, positionally for speed
        self,
        method: str,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        peer: tuple[str, int] | None,
        keep_alive: bool,
    ) -> None:
        self.method = method
        self.target = target
        self.headers = headers
        self.body = body
        self.peer = peer
        self.keep_alive = keep_alive


class Cycle:
    """The responder of one request: ``respond`` for a whole answer, or ``start`` / ``write``
    / ``finish`` for a streamed one. Chunked framing unless the handler passes a
    Content-Length; the body is never framed for HEAD, 204 and 304."""

    __slots__ = ("_chunked", "_no_body", "_proto", "finished", "request", "started", "task")

    def __init__(self, proto: ServerProtocol, request: Request) -> None:
        self._proto = proto
        self.request = request
        self.started = False
        self.finished = False
        self._chunked = False
        self._no_body = request.method == "HEAD"
        self.task: asyncio.Task[None] | None = None

    def closed(self) -> bool:
        """The client is gone (or the connection is being torn down)."""
        return self._proto.lost

    async def respond(self, status: int, headers: RawHeaders, body: bytes) -> None:
        """The whole answer in one write."""
        self._begin()
        proto = self._proto
        close = proto.must_close(self)
        if self._no_body or status in _wire.NO_BODY_STATUS:
            length = _passed_length(headers) if self._no_body else -1
            data = _wire.head(status, headers, close, length)
        else:
            data = _wire.head(status, headers, close, len(body))
            if len(body) <= 65536:
                data += body
            else:
                proto.write(data)
                data = body
        proto.write(data)
        self.finished = True
        proto.response_done(self, close)

    async def start(self, status: int, headers: RawHeaders, length: int | None = None) -> None:
        """Send the head of a streamed answer: Content-Length when ``length`` is known, else
        chunked (or close-delimited for an HTTP/1.0 or ``Connection: close`` client).
        Raises ``ClientGone``."""
        self._begin()
        proto = self._proto
        if proto.lost:
            raise ClientGone("client disconnected")
        framed: int | None = length
        if self._no_body or status in _wire.NO_BODY_STATUS:
            self._no_body = True
            framed = length if (self.request.method == "HEAD" and length is not None) else -1
        elif length is None:
            if self.request.keep_alive:
                self._chunked = True
            else:
                framed = -1  # the end of the body is the close
        proto.write(_wire.head(status, headers, proto.must_close(self), framed))
        try:
            await proto.flow.drain()
        except ConnectionError:
            raise ClientGone("client disconnected") from None

    async def write(self, data: bytes) -> None:
        """One piece of the body; returns once the send buffer is below its low water mark.
        Raises ``ClientGone``."""
        proto = self._proto
        if proto.lost:
            raise ClientGone("client disconnected")
        if data and not self._no_body:
            proto.write(_wire.chunk(data) if self._chunked else data)
        try:
            await proto.flow.drain()
        except ConnectionError:
            raise ClientGone("client disconnected") from None

    async def finish(self) -> None:
        """The end of a streamed answer."""
        if self.finished:
            return
        proto = self._proto
        if self._chunked and not proto.lost:
            proto.write(_wire.LAST_CHUNK)
        self.finished = True
        proto.response_done(self, proto.must_close(self))

    def abort(self) -> None:
        """Cut the connection: the client must not take a truncated body for a whole one."""
        self.finished = True
        self._proto.abort()

    def _begin(self) -> None:
        if self.started:
            raise RuntimeError("response already started")
        self.started = True


def _passed_length(headers: RawHeaders) -> int:
    for name, value in headers:
        if len(name) == 14 and name.lower() == _CONTENT_LENGTH:
            try:
                return int(value)
            except ValueError:
                return -1
    return -1
