"""Running the app: uvloop when available, aiohttp's graceful shutdown, optional workers."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from sideproxy.proxy._app import create_app
from sideproxy.proxy._forward import TransitionHook
from sideproxy.proxy._settings import ProxySettings
from sideproxy.proxy.sources import ConfigSource

__all__ = ["new_event_loop", "running", "serve"]

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


def _log_print(*args: Any, **_: Any) -> None:
    log.info(" ".join(str(a) for a in args).strip())


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
    loop = new_event_loop()
    asyncio.set_event_loop(loop)
    app = create_app(settings, source, on_transitions=on_transitions)
    app.on_startup.append(_tune_gc)
    web.run_app(
        app,
        host=settings.host,
        port=settings.port,
        shutdown_timeout=settings.shutdown_timeout,
        keepalive_timeout=settings.keepalive_timeout,
        access_log=None,
        print=_log_print,
        loop=loop,
        reuse_port=reuse_port or None,
        handle_signals=True,
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
    runner = web.AppRunner(app, shutdown_timeout=shutdown_timeout)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound = runner.addresses[0]
        shown = f"[{bound[0]}]" if ":" in str(bound[0]) else bound[0]
        yield f"http://{shown}:{bound[1]}"
    finally:
        await runner.cleanup()
