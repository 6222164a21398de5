"""``create_app``: the aiohttp application, its background tasks and operational endpoints.

Endpoints::

    /healthz                 200 while the process runs (liveness)
    /readyz                  200 once a routing table is loaded that has at least one key that is
                             usable now or will be by itself (cooling keys count: a pool that
                             answers 429 + Retry-After is better than a Service with no
                             endpoints); 503 before the first table or when every key is
                             revoked / there are none
    /metrics                 Prometheus text, from the app's own registry
    /sideproxy/status        JSON: table version and hash, providers, each key's health (names
    /status                  and fingerprints only), each route's targets and whether each can
                             serve now; needs the virtual key when auth is on
    /v1/..., /<provider>/v1/...   the proxy (see ``sideproxy.proxy._paths``)

Lifecycle (``cleanup_ctx``, in order): the upstream ``ClientSession`` (one per process), the
config-source task, then the key-probe task (``_probes``: token-free ``GET <baseURL>/models``
for exhausted and revoked keys). On shutdown aiohttp stops listening, waits for in-flight
requests (streams included) up to ``shutdown_timeout``, and only then unwinds these in reverse:
probes, source task, session last.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from sideproxy.models import TableRoute
from sideproxy.pool import ManagedCreditPool
from sideproxy.proxy._aio import AioUpstream, handler, upstream_session
from sideproxy.proxy._compile import Compiled, CompileError, compile_snapshot
from sideproxy.proxy._errors import ProxyError, Unauthorized, error_response
from sideproxy.proxy._forward import Forwarder, TransitionHook
from sideproxy.proxy._metrics import Metrics
from sideproxy.proxy._probes import Prober
from sideproxy.proxy._settings import ProxySettings
from sideproxy.proxy.sources import ConfigSource, HealthPeer, Rejected, Snapshot, SourceEvent

__all__ = [
    "FORWARDER",
    "METRICS",
    "POOL",
    "RUNTIME",
    "SETTINGS",
    "ConfigRuntime",
    "create_app",
]

log = logging.getLogger("sideproxy.proxy")
server_log = logging.getLogger("sideproxy.server")


class _ClientErrorFilter(logging.Filter):
    """Rewrites aiohttp's record of a request its HTTP parser rejected (a client's fault: too
    long, too many or invalid header lines, a bad request line, broken chunking) into one line
    that names the problem's class and nothing the client sent: no exception text, no
    traceback. The client got a 400 (in the OpenAI shape when served by ``ProxyRunner``) and its
    connection was closed."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, BadHttpMessage):
            remote = record.args[0] if isinstance(record.args, tuple) and record.args else "-"
            record.msg = "rejected a malformed request from %s: %s (HTTP 400, connection closed)"
            record.args = (remote, type(exc).__name__)
            record.exc_info = None
            record.exc_text = None
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


server_log.addFilter(_ClientErrorFilter())

POOL = web.AppKey("sideproxy.pool", ManagedCreditPool)
FORWARDER = web.AppKey("sideproxy.forwarder", Forwarder)
METRICS = web.AppKey("sideproxy.metrics", Metrics)
SETTINGS = web.AppKey("sideproxy.settings", ProxySettings)


class ConfigRuntime:
    """Applies source events: compile, configure the pool, swap ``Compiled`` in one assignment."""

    def __init__(
        self,
        *,
        settings: ProxySettings,
        source: ConfigSource,
        pool: ManagedCreditPool,
        forwarder: Forwarder,
        metrics: Metrics,
        clock: Callable[[], float],
    ) -> None:
        self.settings = settings
        self.source = source
        self.pool = pool
        self.forwarder = forwarder
        self.metrics = metrics
        self.clock = clock
        self.first_event = asyncio.Event()
        self.last_rejected: tuple[float, str] | None = None
        # Set while the newest config event was a rejection (the last good table serves).
        self.rejected_now = False
        # Why the source failed, until it delivers again (``/readyz`` answers 503 meanwhile).
        self.source_error: str | None = None
        self.applied = 0
        if isinstance(source, HealthPeer):
            source.attach(pool)

    @property
    def compiled(self) -> Compiled | None:
        return self.forwarder.compiled

    def apply(self, event: SourceEvent) -> bool:
        """Serve ``event`` if it is a good snapshot; otherwise keep the current one. Never raises
        for a bad config."""
        if isinstance(event, Rejected):
            return self._reject(event.reason)
        if not isinstance(event, Snapshot):
            event = Snapshot(event[0], event[1])
        current = self.forwarder.compiled
        if (
            current is not None
            and current.snapshot.table.hash
            and current.snapshot.table.hash == event.table.hash
            and current.snapshot.material == event.material
        ):
            log.debug("routing table %s unchanged; nothing to do", event.table.hash[:12])
            return True
        now = self.clock()
        origin = f"{event.origin}: " if event.origin else ""
        try:
            compiled = compile_snapshot(event, self.settings, now)
            if self.settings.require_client_auth and not compiled.virtual_keys.required:
                return self._reject(
                    f"{origin}the pool turns client auth off (clientAuth.disabled) and this "
                    "proxy was not started with --no-auth (SIDE_PROXY_NO_AUTH=1): refusing to "
                    "serve it to anyone who can reach the port"
                )
            self.pool.configure(compiled.keys, compiled.policy)
        except (CompileError, ValueError) as exc:
            return self._reject(f"{origin}{exc}")
        self.forwarder.compiled = compiled  # the swap
        if compiled.held_back:
            log.warning(
                "%d key(s) held back until the table and the key material agree: %s",
                len(compiled.held_back),
                ", ".join(compiled.held_back[:20]),
            )
        self.applied += 1
        self.metrics.reloads.labels("applied").inc()
        self.metrics.table_version.set(event.table.version)
        self.metrics.forget_keys({k.name for k in compiled.keys})
        table = event.table
        log.info(
            "serving routing table %s version %d (%s) from %s: %d keys, providers %s, "
            "client auth %s",
            table.pool,
            table.version,
            table.hash[:12] or "unhashed",
            event.origin or "source",
            len(compiled.keys),
            ", ".join(sorted(compiled.upstreams)),
            "on" if compiled.virtual_keys.required else "off",
        )
        return True

    def _reject(self, reason: str) -> bool:
        self.last_rejected = (self.clock(), reason)
        self.rejected_now = True
        self.metrics.reloads.labels("rejected").inc()
        if self.forwarder.compiled is None:
            log.error("config rejected, no routing table to serve yet: %s", reason)
        else:
            log.error(
                "config rejected, still serving version %d: %s",
                self.forwarder.compiled.version,
                reason,
            )
        return False

    async def follow(self) -> None:
        """Consume the source for the life of the app; a source that fails is started again
        (back-off 1 s doubling to 30 s), the last good table serving meanwhile."""
        backoff = _SOURCE_BACKOFF[0]
        try:
            while True:
                try:
                    async for event in self.source.snapshots():
                        self.source_error = None
                        backoff = _SOURCE_BACKOFF[0]
                        if self.apply(event):
                            self.rejected_now = False
                        self.first_event.set()
                    return  # a source that is done (an EnvSource yields once)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    # The type only: a source's message could quote what it read.
                    self.source_error = f"config source failed ({type(exc).__name__})"
                    log.error(
                        "config source %s failed (%s); keeping the last good table, "
                        "restarting it in %.0fs",
                        _describe(self.source),
                        type(exc).__name__,
                        backoff,
                    )
                    self.first_event.set()
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, _SOURCE_BACKOFF[1])
        finally:
            self.first_event.set()

    def ready(self) -> tuple[bool, str]:
        compiled = self.forwarder.compiled
        if compiled is None:
            return False, self.source_error or "no routing table loaded yet"
        if self.source_error is not None:
            return False, f"{self.source_error}; serving the last good table meanwhile"
        now = self.clock()
        for provider in self.pool.providers():
            if self.pool.next_recovery(provider, now) is not None:
                if self.rejected_now and self.last_rejected is not None:
                    return True, "ok; the newest config was rejected, the last good one serves"
                return True, "ok"
        return False, "no key is usable or will recover: all revoked, or none configured"

    def status(self) -> dict[str, Any]:
        compiled = self.forwarder.compiled
        now = self.clock()
        body: dict[str, Any] = {"now": now, "ready": self.ready()[0]}
        if compiled is not None:
            table = compiled.snapshot.table
            body.update(
                pool=table.pool,
                namespace=table.namespace,
                version=table.version,
                hash=table.hash,
                origin=compiled.snapshot.origin,
                loaded_at=compiled.loaded_at,
                default_provider=table.settings.default_provider,
                providers={p: u.base for p, u in sorted(compiled.upstreams.items())},
                client_auth=compiled.virtual_keys.required,
                held_back=list(compiled.held_back),
                routes=[self._route_status(route, now) for route in table.routes or ()],
            )
        if self.last_rejected is not None:
            body["last_rejected"] = {"at": self.last_rejected[0], "reason": self.last_rejected[1]}
        body["keys"] = [{**asdict(s), "health": str(s.health)} for s in self.pool.statuses(now)]
        return body

    def _route_status(self, route: TableRoute, now: float) -> dict[str, Any]:
        """A route and each target: may it serve now, else when (None: not by itself)."""
        targets = []
        for t in route.targets:
            at = self.pool.next_recovery(t.provider, now, model=t.model)
            targets.append(
                {
                    "provider": t.provider,
                    "model": t.model,
                    "order": t.order,
                    "weight": t.weight,
                    "available": at is not None and at <= now,
                    "until": at if at is not None and at > now else None,
                }
            )
        return {"model": route.model, "targets": targets}


RUNTIME = web.AppKey("sideproxy.runtime", ConfigRuntime)
# Restart back-off of a failed config source: first and longest wait, seconds.
_SOURCE_BACKOFF = (1.0, 30.0)


# --------------------------------------------------------------------------- middleware

_HTTP_ERRORS = {
    404: ("invalid_request_error", "unknown_route"),
    405: ("invalid_request_error", "method_not_allowed"),
    413: ("invalid_request_error", "body_too_large"),
}


@web.middleware
async def _error_shape(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Whatever aiohttp or a handler raises leaves in the OpenAI error shape."""
    try:
        return await handler(request)
    except ProxyError as exc:
        return exc.response()
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        type_, code = _HTTP_ERRORS.get(
            exc.status,
            ("invalid_request_error" if exc.status < 500 else "proxy_error", f"http_{exc.status}"),
        )
        extra = {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "retry-after")}
        return error_response(exc.status, exc.reason, type_, code, extra)
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path[:200])
        return error_response(500, "internal proxy error", "proxy_error", "internal_error")


# --------------------------------------------------------------------------- handlers


def _json(body: dict[str, Any], status: int = 200) -> web.Response:
    return web.Response(
        status=status, body=json.dumps(body).encode(), content_type="application/json"
    )


async def _healthz(request: web.Request) -> web.Response:
    return _json({"status": "ok"})


async def _readyz(request: web.Request) -> web.Response:
    ready, why = request.app[RUNTIME].ready()
    return _json({"ready": ready, "reason": why}, 200 if ready else 503)


async def _metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[METRICS].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _status(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    compiled = runtime.compiled
    if compiled is not None and not compiled.virtual_keys.check(request.headers):
        raise Unauthorized(
            "missing or invalid virtual key: the status endpoint needs one when auth is on"
        )
    return _json(runtime.status())


# --------------------------------------------------------------------------- app


def create_app(
    settings: ProxySettings | None = None,
    source: ConfigSource | None = None,
    *,
    on_transitions: TransitionHook | None = None,
    pool: ManagedCreditPool | None = None,
    clock: Callable[[], float] = time.time,
) -> web.Application:
    """The proxy as an aiohttp application.

    ``source`` yields routing tables (see ``sideproxy.proxy.sources``); without one the app
    serves 503 until something calls ``app[RUNTIME].apply(snapshot)``. ``on_transitions`` is
    called (synchronously, keep it quick: enqueue, don't await) with every non-empty list of key
    health changes the pool reports; the cluster reporter plugs in there. ``clock`` is unix
    time, for tests.
    """
    settings = settings or ProxySettings()
    if source is not None and not callable(getattr(source, "snapshots", None)):
        raise TypeError(f"source must have a snapshots() method, not {type(source).__name__}")
    pool = pool if pool is not None else ManagedCreditPool()
    app = web.Application(
        client_max_size=settings.max_body_size,
        middlewares=[_error_shape],
        handler_args={
            "max_line_size": settings.max_header_size,
            "max_field_size": settings.max_header_size,
            "max_headers": settings.max_headers,
            "keepalive_timeout": settings.keepalive_timeout,
            # aiohttp logs a request its parser rejects with a traceback holding the first 100
            # bytes of the offending line (a header value: maybe a token). Ours says less.
            "logger": server_log,
            # A client that disconnects cancels its handler, which cancels the upstream request.
            "handler_cancellation": True,
            "access_log": None,  # our own, cheaper one lives in the forwarder
        },
    )
    metrics = Metrics(pool, clock)
    forwarder = Forwarder(settings, pool, metrics, clock, on_transitions)
    attach = getattr(source, "attach_admission", None)
    if callable(attach):  # cluster mode: virtual-key limits shared through ReplicaReports
        attach(forwarder.admission)
    runtime = ConfigRuntime(
        settings=settings,
        source=source or _NoSource(),
        pool=pool,
        forwarder=forwarder,
        metrics=metrics,
        clock=clock,
    )
    app[SETTINGS] = settings
    app[POOL] = pool
    app[METRICS] = metrics
    app[FORWARDER] = forwarder
    app[RUNTIME] = runtime

    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/sideproxy/status", _status)
    app.router.add_get("/status", _status)
    # (?s): a decoded path may hold a newline; the forwarder, not the router, rejects it.
    app.router.add_route("*", "/{tail:(?s:.*)}", handler(forwarder, settings))

    app.cleanup_ctx.append(_session_ctx)
    app.cleanup_ctx.append(_source_ctx)
    app.cleanup_ctx.append(_probe_ctx)
    return app


def _describe(source: object) -> str:
    """A source's name for logs: its type only. A repr could print key material."""
    return type(source).__name__


class _NoSource:
    def __repr__(self) -> str:
        return "no source"

    async def snapshots(self) -> AsyncIterator[SourceEvent]:
        return
        yield  # pragma: no cover - makes this an async generator


async def _session_ctx(app: web.Application) -> AsyncIterator[None]:
    session = upstream_session(app[SETTINGS])
    app[FORWARDER].client = AioUpstream(session)
    try:
        yield
    finally:
        app[FORWARDER].client = None
        await session.close()


async def _source_ctx(app: web.Application) -> AsyncIterator[None]:
    runtime = app[RUNTIME]
    task = asyncio.create_task(runtime.follow(), name="sideproxy-config-source")
    timeout = app[SETTINGS].initial_config_timeout
    try:
        await asyncio.wait_for(runtime.first_event.wait(), timeout)
    except TimeoutError:
        log.warning(
            "no routing table from %s after %.0fs; answering 503 until one arrives",
            _describe(runtime.source),
            timeout,
        )
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _probe_ctx(app: web.Application) -> AsyncIterator[None]:
    """Token-free probes of exhausted and revoked keys, for the life of the app."""
    prober = Prober(app[FORWARDER], app[SETTINGS].probe_interval)
    task = asyncio.create_task(prober.run(), name="sideproxy-key-probes")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def snapshot_of(app: web.Application) -> Snapshot | None:
    compiled = app[RUNTIME].compiled
    return compiled.snapshot if compiled is not None else None
