"""Running the proxy: the ``/v1`` path on Side Proxy's own HTTP transport, aiohttp behind it.

One port. ``sideproxy.proxy.http.HttpServer`` (asyncio protocols + httptools) accepts every
connection: requests for the operations endpoints (``/healthz``, ``/readyz``, ``/metrics``,
``/sideproxy/status``, ``/status``) are relayed, whole, to the aiohttp application over a
private unix socket (Linux's abstract namespace: no file, no port); every other request goes to
the forwarder's ``handle`` with the fast ``UpstreamClient``. aiohttp stays the application: its
startup and cleanup (config source, background tasks), its routes and middleware for the
operations endpoints. Why the hot path leaves aiohttp: docs/benchmarks.md.

Shutdown (SIGTERM/SIGINT): stop listening, close idle keep-alive connections, let requests and
streams in flight finish for up to ``shutdown_timeout``, cut what is left, then aiohttp's own
cleanup (config source, sessions).

``ProxyRunner`` (the aiohttp runner whose parser rejections are in the OpenAI error shape) still
serves the internal site.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import secrets
import signal
import socket
import sys
import tempfile
from collections.abc import AsyncIterator

from aiohttp import web
from aiohttp.http_exceptions import (
    BadHttpMessage,
    BadHttpMethod,
    BadStatusLine,
    InvalidHeader,
    InvalidURLError,
    LineTooLong,
    PayloadEncodingError,
)
from aiohttp.web_protocol import RequestHandler

from sideproxy.proxy._app import FORWARDER, SETTINGS, create_app
from sideproxy.proxy._errors import (
    BodyTooLarge,
    NotFound,
    ProxyError,
    RequestTimeout,
    Unauthorized,
    error_response,
)
from sideproxy.proxy._exchange import Headers, Inbound, UpstreamFailure
from sideproxy.proxy._forward import UNAUTHORIZED, Forwarder, TransitionHook
from sideproxy.proxy._settings import ProxySettings
from sideproxy.proxy.http import Cycle, HttpServer, Limits, Refusal, Request, UpstreamClient
from sideproxy.proxy.http._wire import error_answer
from sideproxy.proxy.sources import ConfigSource

__all__ = ["ProxyRunner", "new_event_loop", "running", "serve"]

log = logging.getLogger("sideproxy.proxy")


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's loop if it is installed (it is, off Windows), else asyncio's."""
    try:
        import uvloop  # noqa: PLC0415
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


async def _tune_gc(app: web.Application) -> None:
    """After startup (first table loaded): move what exists now out of the collector's sight
    and collect less often. The request path makes short-lived, acyclic objects; scanning the
    long-lived ones (modules, pool, compiled table) on every gen-2 pass is pure overhead."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 50, 100)


# What aiohttp's parser rejected, in the order of the checks: (exception class, code, message).
_PARSER_ERRORS: tuple[tuple[type[BaseException], str, str], ...] = (
    (LineTooLong, "header_too_large", "a request line or header line is over the size limit"),
    (InvalidHeader, "invalid_header", "a header name or value holds bytes HTTP does not allow"),
    (BadHttpMethod, "invalid_method", "the request method is not valid HTTP"),
    (InvalidURLError, "invalid_path", "the request target is not a valid URL path"),
    (BadStatusLine, "invalid_request_line", "the request line is not valid HTTP"),
    (PayloadEncodingError, "invalid_body_framing", "the body's framing is invalid"),
)


class _Handler(RequestHandler):
    """aiohttp's per-connection handler, with its error answers in the OpenAI shape."""

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        # aiohttp's own: logs (through the filtered logger), refuses once bytes were sent.
        super().handle_error(request, status, exc, message)
        if status >= 500:
            type_, code, text = "proxy_error", f"http_{status}", "internal proxy error"
        else:
            type_, code, text = (
                "invalid_request_error",
                "malformed_request",
                "the request is not valid HTTP (request line, headers or framing)",
            )
            if isinstance(exc, BadHttpMessage) and "Too many headers" in str(exc.message):
                code, text = "too_many_headers", "the request has too many header lines"
            else:
                for kind, known_code, known_text in _PARSER_ERRORS:
                    if isinstance(exc, kind):
                        code, text = known_code, known_text
                        break
        response = error_response(status, text, type_, code)
        response.force_close()
        return response


class _Server(web.Server):
    def __call__(self) -> RequestHandler:
        return _Handler(self, loop=self._loop, **self._kwargs)


class ProxyRunner(web.AppRunner):
    """``web.AppRunner`` whose connections use :class:`_Handler` (see the module docstring).

    aiohttp offers no public hook for its connection handler class; this one swaps the class of
    the server ``AppRunner`` builds, which adds behaviour and no state. A test pins it
    (tests/reliability/test_bad_input.py): if aiohttp changes here, that test says so.
    """

    __slots__ = ()

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = _Server
        return server


OPS_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/sideproxy/status", "/status"})
_OPS_ORIGIN = "http://sideproxy-ops"
_OPS_BODY_LIMIT = 64 * 1024 * 1024


class Front:
    """What the fast server runs for each request: the forwarder, or the aiohttp app for the
    operations endpoints."""

    __slots__ = ("_client", "_forwarder")

    def __init__(self, forwarder: Forwarder, client: UpstreamClient) -> None:
        self._forwarder = forwarder
        self._client = client

    async def handle(self, request: Request, cycle: Cycle) -> None:
        target = request.target.decode("utf-8", "surrogateescape")
        path, _, query = target.partition("?")
        if path in OPS_PATHS:
            await self._relay(request, cycle, target)
            return
        inbound = _inbound(request, path, query)
        if path[:1] != "/" and "://" not in path:
            # "OPTIONS *", "CONNECT host:port": no route (as aiohttp's router answered them).
            error = NotFound(f"no route for {path[:200]}", code="unknown_route")
            await self._forwarder.refuse(inbound, cycle, error)
            return
        await self._forwarder.handle(inbound, cycle)

    def screen(self, target: bytes, headers: list[tuple[bytes, bytes]]) -> Refusal | None:
        """Before a large or unsized body is read: a request without a valid virtual key is
        refused unread (the server then answers through ``refuse``, logged and counted)."""
        compiled = self._forwarder.compiled
        if compiled is None:
            return None  # not ready: the request path answers 503 once the body is in
        path = target.partition(b"?")[0].decode("utf-8", "surrogateescape")
        if path in OPS_PATHS or compiled.virtual_keys.identify(Headers(headers)) is not None:
            return None
        return 401, UNAUTHORIZED, Unauthorized.code

    async def refuse(
        self, request: Request, cycle: Cycle, status: int, message: str, code: str
    ) -> None:
        """413 / 408 / 401 from the server, answered (and logged, counted) by the forwarder."""
        target = request.target.decode("utf-8", "surrogateescape")
        path, _, query = target.partition("?")
        error: ProxyError
        if status == 413:
            error = BodyTooLarge(message)
        elif status == 401:
            error = Unauthorized(message, headers={"Connection": "close"})
        else:
            error = RequestTimeout(message, headers={"Connection": "close"})
        await self._forwarder.refuse(_inbound(request, path, query), cycle, error)

    async def _relay(self, request: Request, cycle: Cycle, target: str) -> None:
        try:
            answer = await self._client.send(
                request.method,
                _OPS_ORIGIN + target,
                request.headers,
                request.body,
                connect_timeout=5.0,
                first_byte_timeout=60.0,
            )
            body = await answer.read(_OPS_BODY_LIMIT)
        except UpstreamFailure:
            log.exception("the operations endpoint did not answer")
            await cycle.respond(*_parts(503, "operations endpoint unavailable", "not_ready"))
            return
        if body is None:
            answer.close()
            await cycle.respond(*_parts(502, "operations answer too large", "internal_error"))
            return
        answer.release()
        await cycle.respond(answer.status, answer.raw_headers, body)


def _inbound(request: Request, path: str, query: str) -> Inbound:
    peer = request.peer
    return Inbound(
        request.method,
        path,
        query,
        Headers(request.headers),
        request.body,
        peer=peer[0] if peer is not None else "-",
    )


def _parts(status: int, message: str, code: str) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    raw = error_answer(status, message, "proxy_error", code, close=False)
    return status, [(b"Content-Type", b"application/json")], raw.partition(b"\r\n\r\n")[2]


def _ops_socket() -> tuple[socket.socket, str]:
    """A listening place for the internal aiohttp site nobody else can guess or reach by TCP."""
    name = f"sideproxy-ops-{os.getpid()}-{secrets.token_hex(8)}"
    path = "\0" + name if sys.platform == "linux" else os.path.join(tempfile.gettempdir(), name)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    return sock, path


@contextlib.asynccontextmanager
async def _serving(
    app: web.Application,
    host: str,
    port: int,
    *,
    shutdown_timeout: float,
    reuse_port: bool = False,
) -> AsyncIterator[list[tuple[str, int]]]:
    """The app started (aiohttp runner on the private socket) and the fast server listening
    on ``host:port``; yields the bound addresses. On exit: the graceful shutdown above."""
    settings = app[SETTINGS]
    runner = ProxyRunner(
        app,
        handle_signals=False,
        shutdown_timeout=min(shutdown_timeout, 5.0),  # operations requests are short
        keepalive_timeout=settings.keepalive_timeout,
        access_log=None,
    )
    await runner.setup()
    client = UpstreamClient(keepalive=settings.upstream_keepalive, limit=settings.connection_limit)
    try:
        sock, path = _ops_socket()
        await web.SockSite(runner, sock).start()
        client.add_unix_origin(_OPS_ORIGIN, path)
        forwarder = app[FORWARDER]
        forwarder.client = client
        front = Front(forwarder, client)
        server = HttpServer(
            front.handle, Limits.from_settings(settings), front.refuse, front.screen
        )
        bound = await server.listen(host, port, reuse_port=reuse_port)
        try:
            yield bound
        finally:
            await server.shutdown(shutdown_timeout)
    finally:
        client.close()
        await runner.cleanup()


def serve(
    settings: ProxySettings,
    source: ConfigSource,
    *,
    on_transitions: TransitionHook | None = None,
    workers: int = 1,
) -> int:
    """Serve until SIGTERM/SIGINT, then shut down gracefully (module docstring). Returns an
    exit code.

    ``workers > 1`` forks that many processes sharing the port (``SO_REUSEPORT``). Each worker
    keeps its own pool state, so a 429 one worker sees is not known to the others until the
    cluster routing table carries it.
    """
    if workers > 1:
        return _serve_workers(settings, source, on_transitions, workers)
    _run(settings, source, on_transitions, reuse_port=False)
    return 0


def _run(
    settings: ProxySettings,
    source: ConfigSource,
    on_transitions: TransitionHook | None,
    *,
    reuse_port: bool,
) -> None:
    loop = new_event_loop()
    asyncio.set_event_loop(loop)
    app = create_app(settings, source, on_transitions=on_transitions)
    app.on_startup.append(_tune_gc)
    main = loop.create_task(_serve_until_stopped(app, settings, reuse_port))
    try:
        loop.run_until_complete(main)
    except KeyboardInterrupt:
        pass
    finally:
        try:
            if not main.done():
                main.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    loop.run_until_complete(main)
        finally:
            _cancel_all(loop)
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()


async def _serve_until_stopped(
    app: web.Application, settings: ProxySettings, reuse_port: bool
) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with _serving(
        app,
        settings.host,
        settings.port,
        shutdown_timeout=settings.shutdown_timeout,
        reuse_port=reuse_port,
    ) as bound:
        shown = ", ".join(f"http://{_netloc(h, p)}" for h, p in bound)
        log.info("listening on %s", shown)
        await stop.wait()
        log.info(
            "shutting down: finishing requests in flight (up to %gs)", settings.shutdown_timeout
        )


def _netloc(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _cancel_all(loop: asyncio.AbstractEventLoop) -> None:
    tasks = asyncio.all_tasks(loop)
    if not tasks:
        return
    for task in tasks:
        task.cancel()
    loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
    for task in tasks:
        if not task.cancelled() and task.exception() is not None:
            loop.call_exception_handler(
                {
                    "message": "unhandled exception during shutdown",
                    "exception": task.exception(),
                    "task": task,
                }
            )


def _serve_workers(
    settings: ProxySettings,
    source: ConfigSource,
    on_transitions: TransitionHook | None,
    workers: int,
) -> int:
    if not hasattr(os, "fork"):
        log.error("--workers needs fork(); running a single process")
        _run(settings, source, on_transitions, reuse_port=False)
        return 0
    children: list[int] = []
    for _ in range(workers):
        pid = os.fork()
        if pid == 0:  # child
            code = 0
            try:
                _run(settings, source, on_transitions, reuse_port=True)
            except BaseException:
                log.exception("worker failed")
                code = 1
            finally:
                logging.shutdown()  # os._exit skips atexit: write what is batched first
                sys.stderr.flush()
                os._exit(code)
        children.append(pid)
    log.info("started %d workers: %s", workers, ", ".join(map(str, children)))

    def forward(signum: int, _frame: object) -> None:
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    worst = 0
    for child in children:
        _, status = os.waitpid(child, 0)
        worst = max(worst, os.waitstatus_to_exitcode(status))
    return 1 if worst else 0


@contextlib.asynccontextmanager
async def running(
    app: web.Application, host: str = "127.0.0.1", port: int = 0, shutdown_timeout: float = 5.0
) -> AsyncIterator[str]:
    """Serve ``app`` in the current event loop (tests, the demo, benchmarks); yields its URL.

    The same server and shutdown path as ``serve``.
    """
    async with _serving(app, host, port, shutdown_timeout=shutdown_timeout) as bound:
        yield f"http://{_netloc(*bound[0])}"
