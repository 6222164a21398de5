"""Running the app: uvloop when available, aiohttp's graceful shutdown, optional workers.

Both ways of running (``serve`` and ``running``) use :class:`ProxyRunner`, an ``AppRunner``
whose connection handler answers what aiohttp's HTTP parser rejects (a header line too long,
too many headers, invalid bytes, a bad request line, broken chunking) in the OpenAI error shape
too. aiohttp's own answer is a plain-text body quoting up to 100 bytes of the offending line back
(a header value may be a token); ours names the problem and quotes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import sys
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

from sideproxy.proxy._app import create_app
from sideproxy.proxy._errors import error_response
from sideproxy.proxy._forward import TransitionHook
from sideproxy.proxy._settings import ProxySettings
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


def serve(
    settings: ProxySettings,
    source: ConfigSource,
    *,
    on_transitions: TransitionHook | None = None,
    workers: int = 1,
) -> int:
    """Serve until SIGTERM/SIGINT. Returns an exit code.

    Shutdown is aiohttp's documented order (``web.run_app`` with ``shutdown_timeout``): stop
    listening, close idle keep-alive connections, wait up to ``shutdown_timeout`` for in-flight
    requests and streams, then run cleanup (config source, upstream session).

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
    """``web.run_app``'s life cycle with :class:`ProxyRunner`: serve until SIGTERM/SIGINT
    (``GracefulExit``), then the runner's graceful cleanup, then cancel what is left."""
    loop = new_event_loop()
    asyncio.set_event_loop(loop)
    app = create_app(settings, source, on_transitions=on_transitions)
    app.on_startup.append(_tune_gc)
    main = loop.create_task(_serve_until_stopped(app, settings, reuse_port))
    try:
        loop.run_until_complete(main)
    except (web.GracefulExit, KeyboardInterrupt):
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
    runner = ProxyRunner(
        app,
        handle_signals=True,
        shutdown_timeout=settings.shutdown_timeout,
        keepalive_timeout=settings.keepalive_timeout,
        access_log=None,
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, settings.host, settings.port, reuse_port=reuse_port or None)
        await site.start()
        log.info("listening on %s", ", ".join(str(s.name) for s in runner.sites))
        await asyncio.Event().wait()  # until GracefulExit (a signal) or cancellation
    finally:
        await runner.cleanup()


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

    Uses aiohttp's ``AppRunner`` + ``TCPSite``: the same server and shutdown path as ``serve``.
    """
    runner = ProxyRunner(app, shutdown_timeout=shutdown_timeout)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound = runner.addresses[0]
        shown = f"[{bound[0]}]" if ":" in str(bound[0]) else bound[0]
        yield f"http://{shown}:{bound[1]}"
    finally:
        await runner.cleanup()
