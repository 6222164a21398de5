"""The HTTP/1.1 server: one ``ServerProtocol`` per connection moves bytes and httptools
callbacks; each whole request becomes a ``Cycle`` run by the handler in its own task.

What it does (docs/server-behavior.md, pinned by tests/http/test_server.py):
- keep-alive by default for HTTP/1.1; ``Connection: close`` or HTTP/1.0: close after the answer;
- the whole body is read (Content-Length or chunked) before the handler runs, within
  ``body_timeout`` from the end of the headers (408 after that), up to ``max_body`` (413);
- a body over ``SCREEN_ABOVE`` declared bytes, or chunked, is read only once the server's
  ``screen`` (the proxy: is the virtual key valid?) accepted the head; a refused one is answered
  unread and the connection closes, so no one without a key makes the proxy buffer megabytes;
- ``Expect: 100-continue``: ``100 Continue`` once the head is accepted (413, or the screen's
  refusal, instead);
- pipelining is handled: requests that arrive while one is answered queue up (reading pauses
  while any wait) and are answered in order;
- limits: request line and each header line ``max_line`` bytes, ``max_headers`` lines, the head
  as a whole bounded too; a new or idle connection that does not finish a request head within
  ``keepalive_timeout`` is closed (slowloris);
- every error the server itself answers is in the OpenAI error shape and closes the connection;
- a client that goes away cancels its handler's task (as aiohttp's ``handler_cancellation``);
- shutdown: stop listening, close idle connections, let answers in flight finish within the
  grace; then cancel the handlers left. A handler may answer the cancel with last bytes and a
  clean finish (the proxy ends an SSE stream with an error event, sideproxy/proxy/_relay.py):
  those connections close (``transport.close()`` flushes) within ``LAST_WORDS`` seconds; every
  other one is aborted (``abort()`` discards what is buffered).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable

import httptools

from sideproxy.proxy.http import _wire
from sideproxy.proxy.http._cycle import Cycle, Request
from sideproxy.proxy.http._flow import FlowControl
from sideproxy.proxy.http._limits import Limits

__all__ = [
    "LAST_WORDS",
    "SCREEN_ABOVE",
    "Handler",
    "HttpServer",
    "Refusal",
    "Refuse",
    "Screen",
    "ServerProtocol",
]

log = logging.getLogger("sideproxy.server")

Handler = Callable[[Request, Cycle], Awaitable[None]]
# Answers a request the server refused to read on (413, 408, or what the screen said): (request,
# responder, status, message, code). Without one the server writes the error itself.
Refuse = Callable[[Request, Cycle, int, str, str], Awaitable[None]]
# (status, message, code) of a request refused before its body is read.
Refusal = tuple[int, str, str]
# Looks at a request's head (target, header lines) before a large or unsized body is read:
# a Refusal refuses it unread, None lets the body come.
Screen = Callable[[bytes, list[tuple[bytes, bytes]]], Refusal | None]
# Bodies up to this many declared bytes are read without asking the screen: small ones cost
# nothing to read, and the request path checks them anyway.
SCREEN_ABOVE = 64 * 1024

_CONTENT_LENGTH = b"content-length"
_EXPECT = b"expect"
_TRANSFER_ENCODING = b"transfer-encoding"
_100_CONTINUE = b"100-continue"
_INVALID = "invalid_request_error"
_MALFORMED = "the request is not valid HTTP (request line, headers or framing)"
# After the grace: how long cancelled handlers get to write their last bytes and those bytes
# to leave (a client that stopped reading must not hold the shutdown).
LAST_WORDS = 1.0


class _Stop(Exception):
    """Raised from a parser callback after the connection was answered and closed."""


class ServerProtocol(asyncio.Protocol):
    __slots__ = (
        "_active",
        "_body",
        "_body_deadline",
        "_body_size",
        "_body_timer",
        "_closing",
        "_head_bytes",
        "_headers",
        "_in_body",
        "_in_head",
        "_ka_deadline",
        "_ka_timer",
        "_limits",
        "_loop",
        "_queue",
        "_refused",
        "_server",
        "_url",
        "flow",
        "lost",
        "parser",
        "peer",
        "transport",
    )

    def __init__(self, server: HttpServer) -> None:
        self._server = server
        self._limits = server.limits
        self._loop = server.loop
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.flow: FlowControl = None  # type: ignore[assignment]
        self.peer: tuple[str, int] | None = None
        self.lost = False
        self._closing = False
        self._active: Cycle | None = None
        self._queue: deque[Request] = deque()
        self._ka_timer: asyncio.TimerHandle | None = None
        self._ka_deadline: float | None = None  # None: a request head has arrived
        self._body_timer: asyncio.TimerHandle | None = None
        self._body_deadline = 0.0
        self._in_body = False
        self._refused = False
        self._head_bytes = 0  # since the end of the last head: bounds a head still arriving
        self._reset_message()

    def _reset_message(self) -> None:
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._body: list[bytes] = []
        self._body_size = 0
        self._in_head = False

    # ---------------------------------------------------------------- asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.flow = FlowControl(self.transport)
        peer = transport.get_extra_info("peername")
        self.peer = (peer[0], peer[1]) if isinstance(peer, tuple) else None
        self._server.connections.add(self)
        self._arm_keepalive()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.flow.lost()
        self._server.forget(self)
        self._cancel_timers()
        self._queue.clear()
        active = self._active
        if active is not None and not active.finished and active.task is not None:
            active.task.cancel()  # the client went away: so does the work for it

    def eof_received(self) -> bool | None:
        return None  # close: a half-closed client is a gone client (as aiohttp)

    def pause_writing(self) -> None:
        self.flow.pause_writing()

    def resume_writing(self) -> None:
        self.flow.resume_writing()

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # answering a refusal; what follows is not read
        if not self._in_body:
            self._head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            return  # CONNECT / Upgrade: the request was parsed; its answer closes (see below)
        except httptools.HttpParserError as exc:
            if self._refused or self.lost or self.transport.is_closing():
                return  # a callback already answered (its _Stop surfaces as a parser error)
            self._reject_malformed(exc)
            return
        if self._in_body:
            if self._body_timer is None and not self._refused:
                self._body_timer = self._loop.call_at(self._body_deadline, self._body_timed_out)
        elif self._head_bytes > self._limits.max_head:
            self._answer_and_close(
                400, "the request head is over the size limit", "header_too_large"
            )

    # ---------------------------------------------------------------- parser callbacks

    def on_message_begin(self) -> None:
        self._reset_message()
        self._in_head = True

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > self._limits.max_line:
            self._fail(
                400, "a request line or header line is over the size limit", "header_too_large"
            )

    def on_header(self, name: bytes, value: bytes) -> None:
        headers = self._headers
        if len(name) + len(value) + 2 > self._limits.max_line:
            self._fail(
                400, "a request line or header line is over the size limit", "header_too_large"
            )
        if len(headers) >= self._limits.max_headers:
            self._fail(400, "the request has too many header lines", "too_many_headers")
        headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._in_body = True
        self._head_bytes = 0
        self._ka_deadline = None  # the timer, if pending, sees this and does nothing
        has_body = False
        expect = False
        declared = -1  # no Content-Length (chunked: no telling how much will come)
        for name, value in self._headers:
            size = len(name)
            if size == 14 and name.lower() == _CONTENT_LENGTH:
                declared = int(value)
                if declared > self._limits.max_body:
                    self._refuse(413, self._too_large(), "body_too_large")
                    raise _Stop
                has_body = declared > 0
            elif size == 17 and name.lower() == _TRANSFER_ENCODING:
                has_body = True
            elif size == 6 and name.lower() == _EXPECT:
                expect = value.lower() == _100_CONTINUE
        if has_body:
            screen = self._server.screen
            if screen is not None and (declared < 0 or declared > SCREEN_ABOVE):
                refusal = screen(self._url, self._headers)
                if refusal is not None:  # e.g. no valid virtual key: the body is not worth reading
                    self._refuse(*refusal)
                    raise _Stop
            if expect and self.parser.get_http_version() == "1.1":
                self.transport.write(_wire.CONTINUE)
            # Armed when this data ends mid-body (data_received): most bodies arrive whole.
            self._body_deadline = self._loop.time() + self._limits.body_timeout

    def on_body(self, body: bytes) -> None:
        self._body_size += len(body)
        if self._body_size > self._limits.max_body:
            self._refuse(413, self._too_large(), "body_too_large")
            raise _Stop
        self._body.append(body)

    def on_message_complete(self) -> None:
        self._in_body = False
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
        parser = self.parser
        body = self._body
        request = Request(
            parser.get_method().decode("ascii"),
            self._url,
            self._headers,
            body[0] if len(body) == 1 else b"".join(body),
            self.peer,
            parser.should_keep_alive()
            and not parser.should_upgrade()
            and parser.get_http_version() == "1.1",
        )
        self._reset_message()
        if self._active is None:
            self._start(request)
        else:  # pipelined: answered in order; stop reading until the queue empties
            self._queue.append(request)
            self.flow.pause_reading()

    # ---------------------------------------------------------------- cycles

    def _start(self, request: Request) -> None:
        cycle = Cycle(self, request)
        self._active = cycle
        cycle.task = self._loop.create_task(self._run(cycle, self._server.handler(request, cycle)))

    async def _run(self, cycle: Cycle, work: Awaitable[None]) -> None:
        server = self._server
        server.running.add(cycle)
        try:
            await work
            if not cycle.finished:
                if cycle.started:
                    await cycle.finish()
                else:
                    log.error("request handler returned without answering")
                    self._answer_and_close(
                        500, "internal proxy error", "internal_error", "proxy_error"
                    )
        except asyncio.CancelledError:
            if not self.lost and not cycle.finished:
                self.abort()  # cancelled by shutdown: nothing more will be sent
        except Exception:
            log.exception("request handler failed")
            if cycle.started:
                cycle.abort()
            else:
                self._answer_and_close(500, "internal proxy error", "internal_error", "proxy_error")
        finally:
            server.running.discard(cycle)
            server.wake()

    def must_close(self, cycle: Cycle) -> bool:
        return self._closing or not cycle.request.keep_alive

    def response_done(self, cycle: Cycle, close: bool) -> None:
        if self._active is cycle:
            self._active = None
        if close or self.lost:
            self.transport.close()
            return
        if self._queue:
            self._start(self._queue.popleft())
            if not self._queue:
                self.flow.resume_reading()
        elif self._closing:
            self.transport.close()
        else:
            self._arm_keepalive()

    def write(self, data: bytes) -> None:
        if not self.lost:
            self.transport.write(data)

    def abort(self) -> None:
        self._cancel_timers()
        if not self.lost:
            self.transport.abort()

    def idle(self) -> bool:
        return self._active is None and not self._queue

    def shutdown(self) -> None:
        """Graceful stop: close now if idle, else after the answer in flight."""
        self._closing = True
        if self._active is None and not self._queue and not self.lost:
            self.transport.close()

    # ---------------------------------------------------------------- errors and timers

    def _fail(self, status: int, message: str, code: str) -> None:
        self._answer_and_close(status, message, code)
        raise _Stop

    def _answer_and_close(
        self, status: int, message: str, code: str, type_: str = _INVALID
    ) -> None:
        self._cancel_timers()
        if self._active is not None and self._active.started:
            self.abort()  # an answer is already on the wire: no second one
            return
        if not self.lost and not self.transport.is_closing():
            self.transport.write(_wire.error_answer(status, message, type_, code))
            self.transport.close()

    def _reject_malformed(self, exc: httptools.HttpParserError) -> None:
        code = "malformed_request"
        if isinstance(exc, httptools.HttpParserInvalidMethodError):
            code = "invalid_method"
        elif isinstance(exc, httptools.HttpParserInvalidURLError):
            code = "invalid_request_line"
        log.info(
            "rejected a malformed request from %s: %s (HTTP 400, connection closed)",
            self.peer[0] if self.peer else "-",
            type(exc).__name__,
        )
        self._answer_and_close(400, _MALFORMED, code)

    def _arm_keepalive(self) -> None:
        # One timer per connection, not one per request: a pending timer is kept and, when it
        # fires early, moved to the current deadline (see _keepalive_expired).
        deadline = self._loop.time() + self._limits.keepalive_timeout
        self._ka_deadline = deadline
        if self._ka_timer is None:
            self._ka_timer = self._loop.call_at(deadline, self._keepalive_expired)

    def _keepalive_expired(self) -> None:
        self._ka_timer = None
        deadline = self._ka_deadline
        if deadline is None or self._active is not None or self._queue:
            return  # busy: the end of its answer arms a new deadline
        if self._loop.time() < deadline:
            self._ka_timer = self._loop.call_at(deadline, self._keepalive_expired)
            return
        self.transport.close()

    def _body_timed_out(self) -> None:
        self._body_timer = None
        self._refuse(
            408,
            f"the request body did not arrive within {self._limits.body_timeout:g}s",
            "body_read_timeout",
        )

    def _too_large(self) -> str:
        return f"request body is over the {self._limits.max_body}-byte limit"

    def _refuse(self, status: int, message: str, code: str) -> None:
        """Stop reading a request whose head arrived: answer it (through the server's
        ``refuse`` hook when there is one, so it is logged and counted), then close."""
        self._refused = True
        self._cancel_timers()
        refuse = self._server.refuse
        if refuse is None or self._active is not None or self.lost:
            self._answer_and_close(status, message, code)
            return
        request = Request(
            self.parser.get_method().decode("ascii"),
            self._url,
            self._headers,
            b"",
            self.peer,
            False,
        )
        self._reset_message()
        cycle = Cycle(self, request)
        self._active = cycle
        work = refuse(request, cycle, status, message, code)
        cycle.task = self._loop.create_task(self._run(cycle, work))

    def _cancel_timers(self) -> None:
        if self._ka_timer is not None:
            self._ka_timer.cancel()
            self._ka_timer = None
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None


class HttpServer:
    """Listens, tracks connections and running cycles, and stops gracefully."""

    def __init__(
        self,
        handler: Handler,
        limits: Limits | None = None,
        refuse: Refuse | None = None,
        screen: Screen | None = None,
    ) -> None:
        self.handler = handler
        self.refuse = refuse
        self.screen = screen
        self.limits = limits or Limits()
        self.loop = asyncio.get_running_loop()
        self.connections: set[ServerProtocol] = set()
        self.running: set[Cycle] = set()
        self._servers: list[asyncio.Server] = []
        self._idle: asyncio.Event | None = None
        self._gone: asyncio.Event | None = None  # set once no connection is left (shutdown)

    async def listen(
        self, host: str, port: int, *, reuse_port: bool = False, backlog: int = 1024
    ) -> list[tuple[str, int]]:
        server = await self.loop.create_server(
            lambda: ServerProtocol(self),
            host,
            port,
            reuse_port=reuse_port or None,
            backlog=backlog,
        )
        self._servers.append(server)
        return [s.getsockname()[:2] for s in server.sockets]

    def forget(self, conn: ServerProtocol) -> None:
        self.connections.discard(conn)
        if self._gone is not None and not self.connections:
            self._gone.set()

    def wake(self) -> None:
        if self._idle is not None and not self.running:
            self._idle.set()

    async def shutdown(self, grace: float) -> None:
        """Stop listening; close idle connections; let answers in flight (streams too) finish
        within ``grace`` seconds; then cancel what is left, give the handlers' last bytes
        ``LAST_WORDS`` seconds to leave (module docstring) and abort the rest."""
        for server in self._servers:
            server.close()
        for conn in list(self.connections):
            conn.shutdown()
        if self.running:
            self._idle = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace):
                    await self._idle.wait()
        tasks = [cycle.task for cycle in self.running if cycle.task is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=LAST_WORDS)
        self._gone = asyncio.Event()
        for conn in list(self.connections):
            if not conn.transport.is_closing():
                conn.abort()  # nothing more to say on it
        if self.connections:  # closing after their last bytes: let them flush
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(LAST_WORDS):
                    await self._gone.wait()
        for conn in list(self.connections):
            conn.abort()
        for server in self._servers:
            with contextlib.suppress(Exception):
                await server.wait_closed()
