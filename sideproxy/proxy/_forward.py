"""The request path, stage by stage, on any transport (see ``_exchange``)::

    parse and route      _paths.parse_path, _route: provider, upstream URL, model, replayable
    authenticate/admit   the virtual key (``_auth``), its models and limits (``_admit``); a
                         model no key serves: 404 model_not_found
    attempt              loop (max_attempts, retry budget), one ``_attempt.Attempt`` per key:
        key = pool.acquire(provider, now, exclude=tried, model=model)   None -> stop
        send upstream with the key's auth header
        connect error                                        -> next key at once
        5xx, timeout, reset, broken body                     -> next key if replayable
          (see _route._REPLAYABLE_PATHS; a files or batches upload is never sent twice)
        a 2xx whose JSON body is broken (read whole)         -> a failure, next key if replayable
        an error (>= 400, SSE too): read whole, up to 64 KiB, judged by pool.classify:
          429 (per model), 401, out of quota (key-wide)      -> next key at once
          403                                                -> see below
          anything else                                      -> scrubbed of key material, answer
        2xx with a known length <= buffer_limit              -> read whole, answer
        SSE, unsized or large 2xx                            -> relay chunk by chunk, no retry
    relay                _relay: stream, or the whole body; spent: the last provider answer
                         (a 429 gets the pool's Retry-After and a matching retry-after-ms),
                         else 502/504, else 429 no_key_available.

401 is retried: it says the *key* is bad (the pool revokes it), not the request. A 403 is
ambiguous: it is as often about the request (a model, a region) as about the key, and revoking
on it would let one odd client walk a whole pool into revocation. So a 403 revokes only when its
structured ``error.code`` / ``error.type`` says the key itself is invalid or disabled (message
text is ignored: a provider may echo the client's input there). Any other 403 is tried once on
another key: if that key answers 403 too (or any other 4xx), the request is at fault (the answer
goes to the client, neither key learns anything); if it succeeds, the first key's 403 was about
that key and counts toward its circuit breaker (``Outcome.FORBIDDEN``: it opens after
``failure_threshold`` such requests in a row and recovers by itself, it never revokes).

Every ``acquire`` is matched by exactly one ``release`` (``_attempt.Attempt``), on every path
including cancellation.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from sideproxy.pool import Key, ManagedCreditPool, Outcome, Transition, classify
from sideproxy.proxy._access import AccessLog
from sideproxy.proxy._admit import Admission, Ticket, window_from_env
from sideproxy.proxy._answers import ERROR_CAP, Failure, readable, retry_headers, safe_error
from sideproxy.proxy._attempt import Attempt, Learn
from sideproxy.proxy._bodies import is_json, whole_json
from sideproxy.proxy._errors import (
    NoKeyAvailable,
    NotFound,
    NotReady,
    ProxyError,
    Unauthorized,
    UpstreamInvalid,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from sideproxy.proxy._exchange import (
    ConnectFailed,
    Inbound,
    Responder,
    UpstreamBroken,
    UpstreamClient,
    UpstreamResponse,
    UpstreamTimedOut,
)
from sideproxy.proxy._headers import request_headers, response_headers
from sideproxy.proxy._paths import parse_path
from sideproxy.proxy._relay import Relayed, end_broken, missing_final_event, relay
from sideproxy.proxy._route import Route, anthropic_shaped, resolve, upstream_of
from sideproxy.proxy._routed import Routed

if TYPE_CHECKING:
    from sideproxy.proxy._compile import Compiled
    from sideproxy.proxy._metrics import Metrics
    from sideproxy.proxy._settings import ProxySettings

__all__ = ["UNAUTHORIZED", "Forwarder", "TransitionHook"]

TransitionHook = Callable[[list[Transition]], None]

log = logging.getLogger("sideproxy.proxy")

_monotonic = time.monotonic
_STATUS = {status: str(status) for status in range(200, 300)}  # metric labels, made once

UNAUTHORIZED = (
    "missing or invalid virtual key: send it as 'Authorization: Bearer <key>' or 'x-api-key'"
)


class _MoveOn(Exception):
    """This attempt is over without an answer for the client: ``retry`` says whether the
    next key may be tried."""

    def __init__(self, failure: Failure | ProxyError, retry: bool) -> None:
        self.failure = failure
        self.retry = retry


class _Ctx:
    """One request's state across its stages and attempts (the access log reads it too)."""

    __slots__ = (
        "attempts",
        "client_gone",
        "compiled",
        "failure",
        "held",
        "inbound",
        "key",
        "opened",
        "out",
        "provider",
        "route",
        "routed",
        "started",
        "ticket",
    )
    compiled: Compiled  # set by the route stage
    route: Route

    def __init__(self, inbound: Inbound, out: Responder, started: float) -> None:
        self.inbound = inbound
        self.out = out
        self.started = started
        self.provider = "-"
        self.key: Key | None = None
        self.attempts = 0
        self.client_gone = False
        self.failure: Failure | ProxyError | None = None
        # A key whose 403 waits for another key's answer to the same request (see above).
        self.held: Attempt | None = None
        self.opened: list[Attempt] = []
        self.ticket: Ticket | None = None  # an admitted virtual key's request
        self.routed: Routed | None = None  # the request's model names a route (issue 13)

    def settle_held(self, outcome: Outcome) -> None:
        held = self.held
        if held is not None:
            self.held = None
            held.release(outcome, "403")


def _reason(failure: Failure | ProxyError | None) -> str:
    if isinstance(failure, Failure):
        return str(failure.status)
    if isinstance(failure, UpstreamTimeout):
        return "timeout"
    return "error"


class Forwarder:
    """Holds what the request path needs; ``compiled`` is swapped whole by the app on reload,
    ``client`` is the transport's upstream side (set by the app while it runs)."""

    def __init__(
        self,
        settings: ProxySettings,
        pool: ManagedCreditPool,
        metrics: Metrics,
        clock: Callable[[], float] = time.time,
        on_transitions: TransitionHook | None = None,
    ) -> None:
        self.settings = settings
        self.pool = pool
        self.metrics = metrics
        self.clock = clock
        self.on_transitions = on_transitions
        self._compiled: Compiled | None = None
        self.client: UpstreamClient | None = None
        self._buffer_limit = settings.buffer_limit
        self._access = settings.access_log
        self._access_log = AccessLog()
        self._learners: dict[str, Learn] = {}
        self.admission = Admission(metrics.registry, window=window_from_env(), clock=clock)

    @property
    def compiled(self) -> Compiled | None:
        return self._compiled

    @compiled.setter
    def compiled(self, compiled: Compiled | None) -> None:
        """The app swaps tables here; admission learns the VirtualKeys at the same moment, so
        the replica watches the others' claims before it admits a request."""
        self._compiled = compiled
        if compiled is not None:
            self.admission.configure(compiled.virtual_keys.limits, compiled_models(compiled))

    # ------------------------------------------------------------------ entry points

    async def handle(self, inbound: Inbound, out: Responder) -> None:
        """Answer one request (the transport's entry point)."""
        ctx = _Ctx(inbound, out, _monotonic())
        self.metrics.inflight += 1
        status = 499
        try:
            try:
                status = await self._handle(ctx)
            except ProxyError as exc:
                status = await self._refuse(out, exc)
            except asyncio.CancelledError:
                ctx.client_gone = True
                raise
            if ctx.client_gone:
                status = 499
        finally:
            self.metrics.inflight -= 1
            if ctx.ticket is not None:
                ctx.ticket.close(ctx.key.name if ctx.key is not None else None)
            self._account(ctx, status)

    async def refuse(self, inbound: Inbound, out: Responder, error: ProxyError) -> None:
        """Answer a request the transport could not read (413, 408), logged and counted."""
        ctx = _Ctx(inbound, out, _monotonic())
        self._account(ctx, await self._refuse(out, error))

    @staticmethod
    async def _refuse(out: Responder, error: ProxyError) -> int:
        if out.started:
            out.abort()
            return error.status
        status, headers, body = error.parts()
        await out.respond(status, headers, body)
        return status

    def _account(self, ctx: _Ctx, status: int) -> None:
        self.metrics.client(ctx.provider, status)
        routed = ctx.routed
        if routed is not None:
            self.metrics.route(routed.model, routed.label, status)
        if self._access and self._access_log.enabled():
            self._log_access(ctx, status)

    def _log_access(self, ctx: _Ctx, status: int) -> None:
        key = ctx.key
        inbound = ctx.inbound
        ms = round((_monotonic() - ctx.started) * 1000.0, 2)
        path = inbound.path[:512]  # never the query: it may hold tokens
        self._access_log.write(
            {
                "method": inbound.method,
                "path": path,
                "status": status,
                "provider": ctx.provider,
                "key": key.name if key is not None else None,
                "key_fingerprint": key.fingerprint if key is not None else None,
                "attempts": ctx.attempts,
                "route_target": ctx.routed.label if ctx.routed is not None else None,
                "duration_ms": ms,
            },
            f"{inbound.method} {path} {status} {ms:.2f}ms",
        )

    async def _handle(self, ctx: _Ctx) -> int:
        """Parse and route, authenticate, then the attempts."""
        compiled = self.compiled  # one read: this request sees one table from start to end
        if compiled is None:
            raise NotReady("the proxy has no routing table yet", headers={"Retry-After": "1"})
        inbound = ctx.inbound
        prefix, rest, query = parse_path(inbound.path, inbound.query)
        identity = compiled.virtual_keys.identify(inbound.headers)
        if identity is None:
            raise Unauthorized(UNAUTHORIZED)
        upstream = upstream_of(compiled, prefix)
        ctx.provider = upstream.provider
        ctx.compiled = compiled
        route = ctx.route = resolve(inbound, upstream, rest, query)
        # The client's own limits before the pool's: a refusal here touches no key.
        ctx.ticket = self.admission.admit(identity, route.model)
        if prefix is None and compiled.routes:  # /<provider>/v1/... names its provider
            plan = compiled.routes.plan(route.model, anthropic_shaped(rest))
            if plan is not None:
                ctx.routed = routed = Routed(plan, route, inbound, ctx.out, (rest, query))
                ctx.out, ctx.provider = routed.out, routed.provider
                return await self._attempts(ctx)
        if route.model is not None and not self.pool.serves(upstream.provider, route.model):
            raise NotFound(
                f"no key of this pool serves model {route.model[:128]!r}",
                code="model_not_found",
            )
        return await self._attempts(ctx)

    # ------------------------------------------------------------------ attempts

    async def _attempts(self, ctx: _Ctx) -> int:
        provider = ctx.provider
        try:
            for n in range(ctx.compiled.max_attempts):
                first_byte = self._first_byte(ctx, n)
                if first_byte is None:
                    break
                key = self._acquire(ctx)
                if key is None:
                    break
                provider = ctx.provider  # a route target may have changed it
                if n:
                    self.metrics.retry(provider, _reason(ctx.failure))
                attempt = Attempt(key, self._learner(provider), ctx.route.model)
                ctx.opened.append(attempt)
                ctx.key, ctx.attempts = key, n + 1
                try:
                    return await self._attempt(attempt, ctx, first_byte)
                except _MoveOn as move:
                    ctx.failure = move.failure
                    if not move.retry:
                        break
        except BaseException as exc:
            label = "cancelled" if isinstance(exc, asyncio.CancelledError) else "error"
            for attempt in ctx.opened:
                attempt.abandon(label)
            raise
        # Nobody else could answer a held 403: it is replayed, the key learns nothing.
        ctx.settle_held(Outcome.OK)
        return await self._spent(ctx)

    def _acquire(self, ctx: _Ctx) -> Key | None:
        """The next attempt's key: the provider's, or a route target's (``_targets``)."""
        tried = [a.key.name for a in ctx.opened]
        routed = ctx.routed
        if routed is None:
            return self.pool.acquire(ctx.provider, self.clock(), tried, model=ctx.route.model)
        key = routed.acquire(self.pool, self.clock(), tried)
        if key is not None:
            ctx.route, ctx.provider = routed.route, routed.provider
        return key

    @staticmethod
    def _first_byte(ctx: _Ctx, n: int) -> float | None:
        """How long attempt ``n`` may wait for its first byte (None: the budget is spent)."""
        compiled = ctx.compiled
        if not n:
            return min(compiled.first_byte, compiled.retry_budget)
        remaining = ctx.started + compiled.retry_budget - _monotonic()
        return min(compiled.first_byte, remaining) if remaining > 0 else None

    async def _attempt(self, attempt: Attempt, ctx: _Ctx, first_byte: float) -> int:
        """One key: send, then stream, or read whole and judge."""
        sent = _monotonic()
        resp = await self._send(attempt, ctx, first_byte)
        status = resp.status
        error = status >= 400
        cap = ERROR_CAP if error else self._buffer_limit
        length = resp.content_length
        if not error and (
            length is None or length > cap or resp.content_type == "text/event-stream"
        ):
            # Another key served what a held key refused: that 403 was about the key.
            ctx.settle_held(Outcome.FORBIDDEN)
            return await self._stream(attempt, resp, sent, ctx)
        # Error bodies (SSE ones too) are read whole, so they can be scrubbed and judged.
        payload = await self._read(attempt, resp, cap, ctx)
        self.metrics.latency(ctx.provider, _monotonic() - sent)
        if not error:
            return await self._success(attempt, resp, payload, ctx)
        return await self._error(attempt, resp, payload, ctx)

    async def _send(self, attempt: Attempt, ctx: _Ctx, first_byte: float) -> UpstreamResponse:
        client = self.client
        if client is None:
            raise NotReady("the proxy is starting or stopping")
        route, compiled, inbound = ctx.route, ctx.compiled, ctx.inbound
        upstream = route.upstream
        secret = upstream.auth_prefix + attempt.key.secret.encode()
        failure: ProxyError
        try:
            return await client.send(
                inbound.method,
                route.url,
                request_headers(inbound.headers.raw, upstream.auth_name, secret),
                route.body,
                connect_timeout=compiled.connect,
                first_byte_timeout=first_byte,
                total_timeout=max(0.001, compiled.total - (_monotonic() - ctx.started)),
            )
        except UpstreamTimedOut:
            attempt.release(Outcome.TIMEOUT, "timeout")
            failure = UpstreamTimeout(f"provider {ctx.provider} did not answer in time")
            raise _MoveOn(failure, route.replayable) from None
        except ConnectFailed as exc:
            attempt.release(Outcome.CONNECT_ERROR, "error")
            failure = UpstreamUnreachable(f"provider {ctx.provider} is unreachable ({exc})")
            raise _MoveOn(failure, True) from None  # the provider cannot have seen it
        except UpstreamBroken as exc:
            attempt.release(Outcome.CONNECT_ERROR, "error")
            failure = UpstreamUnreachable(f"provider {ctx.provider} is unreachable ({exc})")
            raise _MoveOn(failure, route.replayable) from None

    @staticmethod
    async def _read(attempt: Attempt, resp: UpstreamResponse, cap: int, ctx: _Ctx) -> bytes | None:
        """The whole body (None: over ``cap``). Nothing has reached the client, so a body that
        breaks off is still retryable."""
        failure: ProxyError
        try:
            payload = await resp.read(cap)
        except UpstreamTimedOut:
            resp.close()
            attempt.release(Outcome.TIMEOUT, "timeout")
            failure = UpstreamTimeout(f"provider {ctx.provider} stopped sending the response")
            raise _MoveOn(failure, ctx.route.replayable) from None
        except UpstreamBroken as exc:
            resp.close()
            attempt.release(Outcome.SERVER_ERROR, "error")
            failure = UpstreamUnreachable(f"provider {ctx.provider} broke off the response ({exc})")
            raise _MoveOn(failure, ctx.route.replayable) from None
        except BaseException:
            resp.close()
            raise
        if payload is None:
            resp.close()
        else:
            resp.release()
        return payload

    async def _success(
        self,
        attempt: Attempt,
        resp: UpstreamResponse,
        payload: bytes | None,
        ctx: _Ctx,
    ) -> int:
        if (
            payload
            and is_json(resp.content_type)
            and "content-encoding" not in resp.headers
            and not whole_json(payload)
        ):
            attempt.release(Outcome.SERVER_ERROR, "invalid_json")
            failure = UpstreamInvalid(
                f"provider {ctx.provider} answered {resp.status} with a broken JSON body"
            )
            raise _MoveOn(failure, ctx.route.replayable)
        # The answer first, then what the pool, the ticket and the metrics learn from it: the
        # fast transport's respond never yields, so nothing can run in between.
        self.metrics.ttfb(ctx.provider, _monotonic() - ctx.started)
        await ctx.out.respond(resp.status, response_headers(resp.raw_headers), payload or b"")
        attempt.release(Outcome.OK, _STATUS.get(resp.status) or str(resp.status), resp.headers)
        ctx.settle_held(Outcome.FORBIDDEN)
        if ctx.ticket is not None:
            ctx.ticket.usage(payload)
        return resp.status

    async def _error(
        self, attempt: Attempt, resp: UpstreamResponse, payload: bytes | None, ctx: _Ctx
    ) -> int:
        """An error answer, judged by the pool's ``classify`` (the one policy it shares with
        LLMClient), made safe to show, then retried elsewhere or answered."""
        status = resp.status
        plain = readable(resp, payload)
        verdict = classify(status, resp.headers, plain)
        outcome = verdict.outcome
        rejected = outcome is Outcome.UNAUTHORIZED
        headers, shown = safe_error(
            attempt.key.secret, resp, payload, ctx.provider, plain=plain, rejected=rejected
        )
        # After a 5xx the provider may have acted: only a replayable request goes again.
        retry = verdict.retry and (ctx.route.replayable or outcome is not Outcome.SERVER_ERROR)
        if verdict.held:
            if ctx.held is None and len(ctx.opened) < ctx.compiled.max_attempts:
                # Ask another key before blaming this one; released when that one answers.
                ctx.held = attempt
                raise _MoveOn(Failure(status, headers, shown), True)
            # The same request refused twice (or no one left to ask): the request's fault,
            # nothing learnt about either key.
            outcome, retry = Outcome.OK, False
        attempt.release(outcome, str(status), resp.headers, key_wide=not verdict.per_model)
        if retry:
            raise _MoveOn(Failure(status, headers, shown), True)
        # A 4xx from another key does not show that a held key was at fault.
        ctx.settle_held(Outcome.OK)
        self.metrics.ttfb(ctx.provider, _monotonic() - ctx.started)
        await ctx.out.respond(status, headers, shown)
        return status

    async def _spent(self, ctx: _Ctx) -> int:
        """Every attempt is spent: replay the last answer, or say why there was none."""
        failure, provider = ctx.failure, ctx.provider
        if isinstance(failure, Failure):
            headers = failure.headers
            if failure.status == 429:
                headers = retry_headers(headers, self._retry_after(ctx))
            await ctx.out.respond(failure.status, headers, failure.body)
            return failure.status
        if failure is not None:
            raise failure
        self.metrics.no_key(provider)
        seconds = self._retry_after(ctx)
        routed = ctx.routed
        what = f"provider {provider}" if routed is None else f"any target of route {routed.model}"
        raise NoKeyAvailable(
            f"no key of {what} is available: every key is cooling down or out of "
            f"rotation; retry after {seconds}s",
            headers={"Retry-After": str(seconds), "retry-after-ms": str(seconds * 1000)},
        )

    def _retry_after(self, ctx: _Ctx) -> int:
        now = self.clock()
        routed = ctx.routed
        if routed is None:
            recovery = self.pool.next_recovery(ctx.provider, now, model=ctx.route.model)
        else:
            recovery = routed.plan.next_recovery(self.pool, now)
        if recovery is None:  # no key will recover by itself (all revoked, or none)
            return max(1, math.ceil(ctx.compiled.policy.default_cooldown))
        return max(1, math.ceil(recovery - now))

    # ------------------------------------------------------------------ streaming

    async def _stream(
        self, attempt: Attempt, resp: UpstreamResponse, sent: float, ctx: _Ctx
    ) -> int:
        """A 2xx relayed as it arrives (SSE, unsized or large): no retry once it started."""
        provider, out = ctx.provider, ctx.out
        seen = Relayed()
        try:
            await relay(resp, out, ctx.compiled.idle_stream, seen)
        except asyncio.CancelledError:
            # The server's shutdown grace ran out (a client that left fails every write):
            # an SSE stream gets its error event and a clean close, anything else is cut.
            resp.close()
            await self._cut(out, resp, seen, ctx)
            raise
        except BaseException:
            resp.close()
            raise
        self.metrics.latency(provider, _monotonic() - sent)
        if seen.first_at is not None:
            self.metrics.ttfb(provider, seen.first_at - ctx.started)
        if seen.client_gone:
            resp.close()
            attempt.abandon()
            ctx.client_gone = True
            return 499
        anthropic = ctx.route.upstream.anthropic
        if seen.broke or seen.timed_out:
            resp.close()
            attempt.release(
                Outcome.TIMEOUT if seen.timed_out else Outcome.SERVER_ERROR,
                "timeout" if seen.timed_out else "error",
            )
            _warn(attempt.key, provider, "idle timeout" if seen.timed_out else "broke off")
            await end_broken(out, resp, seen, anthropic=anthropic)
            return resp.status
        resp.release()
        if ctx.ticket is not None:
            ctx.ticket.usage(seen.window, streamed=True)
        terminator = ctx.route.terminator if resp.status == 200 else None
        if missing_final_event(seen, terminator) and resp.content_type == "text/event-stream":
            # Ended cleanly but short of its final event: a failure of the key, and the client
            # must not take it for a whole answer. If the provider's own error event ended it,
            # that says enough; otherwise the proxy adds one.
            attempt.release(Outcome.SERVER_ERROR, "incomplete")
            _warn(attempt.key, provider, "ended without its final event")
            window = seen.window
            if b'"error":' not in window and b"event: error" not in window:
                await end_broken(out, resp, seen, anthropic=anthropic)
                return resp.status
        else:
            attempt.release(Outcome.OK, str(resp.status), resp.headers)
        await out.finish()
        return resp.status

    @staticmethod
    async def _cut(out: Responder, resp: UpstreamResponse, seen: Relayed, ctx: _Ctx) -> None:
        terminator = ctx.route.terminator if resp.status == 200 else None
        if terminator is not None and not missing_final_event(seen, terminator):
            await out.finish()  # it was whole: the cancel only caught its last write
            return
        seen.cut = True
        await end_broken(out, resp, seen, anthropic=ctx.route.upstream.anthropic)

    # ------------------------------------------------------------------ learning

    def _learner(self, provider: str) -> Learn:
        """What an ``Attempt`` calls on release (one function per provider, made once)."""
        found = self._learners.get(provider)
        if found is not None:
            return found

        def learn(
            key: Key,
            outcome: Outcome,
            headers: Mapping[str, str] | None,
            label: str,
            model: str | None,
        ) -> None:
            self.metrics.upstream(key.name, provider, label)
            transitions = self.pool.release(key, outcome, self.clock(), headers, model=model)
            if transitions:
                self.report(transitions)

        self._learners[provider] = learn
        return learn

    def report(self, transitions: list[Transition]) -> None:
        self.metrics.transitions(transitions)
        now = self.clock()
        for t in transitions:
            left = f", for {max(0.0, t.until - now):.1f}s" if t.until is not None else ""
            log.info(
                "key %s (%s) is %s: %s%s",
                t.name,
                t.fingerprint,
                t.health,
                t.reason,
                left,
                extra={
                    "key": t.name,
                    "key_fingerprint": t.fingerprint,
                    "health": str(t.health),
                    "reason": t.reason,
                    "until": t.until,
                },
            )
        hook = self.on_transitions
        if hook is not None:
            try:
                hook(transitions)
            except Exception:
                log.exception("on_transitions hook failed")


def compiled_models(compiled: Compiled) -> set[str]:
    """The models a table's PoolKeys name: what a ``model`` metric label may say."""
    return {model for key in compiled.keys for model in key.models}


def _warn(key: Key, provider: str, what: str) -> None:
    log.warning(
        "stream from provider %s via key %s (%s): %s", provider, key.name, key.fingerprint, what
    )
