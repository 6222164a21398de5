"""The request path: route, authenticate, read the body once, try keys, answer or stream.

Per request::

    parse_target -> virtual key -> provider -> body (size limit, read timeout, JSON validity)
    loop (max_attempts, retry budget):
        key = pool.acquire(provider, now, exclude=tried)      None -> stop
        send upstream with the key's auth header
        429 / 401 / 5xx / connect error / timeout            -> release, next key at once
          (5xx, timeouts, resets and broken bodies only for replayable requests: see
          _REPLAYABLE_PATHS; a files or batches upload is never sent twice)
        a 2xx whose JSON body is broken (read whole)         -> release (a failure), next key
        403                                                  -> see below
        an error (>= 400): read whole, up to buffer_limit    -> scrubbed of key material, answer
        2xx with a known length <= buffer_limit              -> read whole, answer
        SSE, unsized or large 2xx                            -> stream chunk by chunk, no retry
    spent: the last provider answer (429 gets the pool's Retry-After), else 502/504, else 429.

401 is retried: it says the *key* is bad (the pool revokes it), not the request. A 403 is
ambiguous: it is as often about the request (a model, a region) as about the key, and revoking
on it would let one odd client walk a whole pool into revocation. So a 403 revokes only when its
structured ``error.code`` / ``error.type`` says the key itself is invalid or disabled (message
text is ignored: a provider may echo the client's input there). Any other 403 is tried once on
another key: if that key answers 403 too, the request is at fault (the 403 goes to the client,
neither key learns anything); if it succeeds, the first key's 403 was about that key and counts
toward its circuit breaker (``Outcome.FORBIDDEN``: it opens after ``failure_threshold`` such
requests in a row and recovers by itself, it never revokes).

Upstream error bodies never reach the client with key material in them: a 401 (or key-level
403) body is replaced by the proxy's own error; any other error body has the key's value and
any masked key quote (``sk-abc****wxyz``, ``sk-abc...xyz``) replaced by ``<redacted>``.
An SSE stream of chat/completions (``data: [DONE]``) or Anthropic messages (``message_stop``)
that ends without its final event gets an error event appended, so a client cannot mistake a
truncated answer for a whole one.
Every ``acquire`` is matched by exactly one ``release``, on every path including cancellation.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import time
import zlib
from collections.abc import Callable
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from sideproxy.pool import Key, ManagedCreditPool, Outcome, Transition
from sideproxy.proxy._errors import (
    BadRequest,
    BodyTooLarge,
    NoKeyAvailable,
    NotFound,
    NotReady,
    ProxyError,
    RequestTimeout,
    Unauthorized,
    UpstreamInvalid,
    UpstreamTimeout,
    UpstreamUnreachable,
    error_body,
)
from sideproxy.proxy._headers import request_headers, response_headers
from sideproxy.proxy._paths import parse_target

if TYPE_CHECKING:
    from sideproxy.proxy._compile import Compiled, Upstream
    from sideproxy.proxy._metrics import Metrics
    from sideproxy.proxy._settings import ProxySettings

__all__ = ["Forwarder", "TransitionHook"]

TransitionHook = Callable[[list[Transition]], None]

log = logging.getLogger("sideproxy.proxy")
access_log = logging.getLogger("sideproxy.access")

_RETRY_OUTCOMES = frozenset({Outcome.RATE_LIMITED, Outcome.SERVER_ERROR})
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
# Requests that change nothing at the provider but the bill, so they may be sent again after a
# failure that could have reached the provider (a 5xx, a timeout, a reset, a broken body). Any
# other request (files, batches, fine-tuning jobs, assistants, vector stores, ...) moves to the
# next key only when the provider cannot have acted on it: a refused connection, a 429, a 401.
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_REPLAYABLE_PATHS = frozenset(
    {
        "/chat/completions",
        "/completions",
        "/embeddings",
        "/messages",
        "/messages/count_tokens",
        "/moderations",
        "/responses",
        "/rerank",
        "/images/generations",
        "/audio/speech",
        "/audio/transcriptions",
        "/audio/translations",
    }
)
_INFO = logging.INFO
_monotonic = time.monotonic

_UNAUTHORIZED = (
    "missing or invalid virtual key: send it as 'Authorization: Bearer <key>' or 'x-api-key'"
)

# A 403 whose structured error says this: the key itself is bad, revoke it (as a 401).
_KEY_LEVEL_403 = frozenset(
    {
        "invalid_api_key",
        "invalid_key",
        "api_key_invalid",
        "api_key_revoked",
        "api_key_disabled",
        "api_key_expired",
        "key_revoked",
        "account_deactivated",
        "account_disabled",
        "authentication_error",
    }
)
# Masked key quotes as providers write them: "sk-abc1****...****wxyz", "sk-abc...xyz". Each
# alternative starts at a word boundary and uses possessive quantifiers: linear on any body.
_MASKED = re.compile(
    rb"(?<![\w-])(?:[\w-]*+\*{3,}[\w-]*+|[A-Za-z0-9]++[-_][\w-]*+(?:\.{3}|\xe2\x80\xa6)[\w-]++)"
)
_REDACTED = b"<redacted>"
# 2xx JSON bodies up to this are parsed (a few microseconds); larger ones only have their ends
# checked (O(1)): a float embedding of 30 KB takes ~0.3 ms to parse, too much for the hot path,
# and truncation, the real failure, shows at the end.
_JSON_PARSE_LIMIT = 4 * 1024
_WHITESPACE = b" \t\r\n"
_OPEN = b"{["
_CLOSE = b"}]"


def _scrub(body: bytes, secret: str) -> bytes:
    """An upstream error body without the key's value or any masked quote of a key."""
    raw = secret.encode()
    if raw and raw in body:
        body = body.replace(raw, _REDACTED)
    return _MASKED.sub(_REDACTED, body)


def _whole_json(body: bytes) -> bool:
    """A 2xx JSON body that is one complete object or array (truncation is the real fault)."""
    if len(body) <= _JSON_PARSE_LIMIT:
        try:
            json.loads(body)
        except (ValueError, RecursionError):
            return False
        return True
    start, end = 0, len(body)
    while end > start and body[end - 1] in _WHITESPACE:
        end -= 1
    while start < end and body[start] in _WHITESPACE:
        start += 1
    return end - start >= 2 and body[start] in _OPEN and body[end - 1] in _CLOSE


def _key_level(body: bytes) -> bool:
    """Does a 403 body's structured error (code or type, never the message) blame the key?"""
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        return False
    error = doc.get("error") if isinstance(doc, dict) else None
    if not isinstance(error, dict):
        return False
    for field in ("code", "type"):
        value = error.get(field)
        if isinstance(value, str) and value.lower() in _KEY_LEVEL_403:
            return True
    return False


def _decoded(body: bytes, encoding: str | None, cap: int) -> bytes | None:
    """An error body as plain bytes (identity, gzip or deflate, at most ``cap``), else None."""
    if not encoding or encoding.lower() == "identity":
        return body
    if encoding.lower() not in ("gzip", "x-gzip", "deflate"):
        return None
    try:
        inflater = zlib.decompressobj(wbits=47)  # gzip or zlib, by the header
        out = inflater.decompress(body, cap)
    except zlib.error:
        return None
    return None if inflater.unconsumed_tail else out


class _Failure:
    """A provider answer that made us move on; replayed if no attempt is left."""

    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, headers: CIMultiDict[str], body: bytes) -> None:
        self.status = status
        self.headers = headers  # ready to send
        self.body = body


def _is_json(content_type: str) -> bool:
    return content_type == "application/json" or content_type.endswith("+json")


async def _read_capped(resp: aiohttp.ClientResponse, cap: int) -> bytes | None:
    """An unsized body, or None as soon as it grows past ``cap`` bytes."""
    chunks: list[bytes] = []
    size = 0
    content = resp.content
    while chunk := await content.readany():
        size += len(chunk)
        if size > cap:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _own_body(headers: CIMultiDict[str], body: bytes) -> tuple[CIMultiDict[str], bytes]:
    """Headers for a body the proxy wrote instead of the provider's."""
    headers.popall("Content-Encoding", None)
    headers["Content-Type"] = "application/json"
    return headers, body


class _Ctx:
    """What the access log line and the client metric need to know about one request."""

    __slots__ = ("attempts", "client_gone", "key", "provider")

    def __init__(self) -> None:
        self.provider = "-"
        self.key: Key | None = None
        self.attempts = 0
        self.client_gone = False


def _reason(failure: _Failure | ProxyError | None) -> str:
    if isinstance(failure, _Failure):
        return str(failure.status)
    if isinstance(failure, UpstreamTimeout):
        return "timeout"
    return "error"


class Forwarder:
    """Holds what the hot path needs; ``compiled`` is swapped whole by the app on reload."""

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
        self.compiled: Compiled | None = None
        self.session: aiohttp.ClientSession | None = None
        self._max_body = settings.max_body_size
        self._buffer_limit = settings.buffer_limit
        self._body_timeout = settings.body_read_timeout
        self._access = settings.access_log

    # ------------------------------------------------------------------ entry point

    async def handle(self, request: web.Request) -> web.StreamResponse:
        started = _monotonic()
        ctx = _Ctx()
        metrics = self.metrics
        metrics.inflight.inc()
        status = 499
        try:
            try:
                response = await self._handle(request, started, ctx)
            except ProxyError as exc:
                response = exc.response()
            status = 499 if ctx.client_gone else response.status
            return response
        finally:
            metrics.inflight.dec()
            metrics.client(ctx.provider, status)
            if self._access and access_log.isEnabledFor(_INFO):
                self._log_access(request, status, ctx, started)

    def _log_access(self, request: web.Request, status: int, ctx: _Ctx, started: float) -> None:
        key = ctx.key
        ms = round((_monotonic() - started) * 1000.0, 2)
        path = request.raw_path.partition("?")[0][:512]  # never the query: it may hold tokens
        access_log.info(
            "%s %s %d %.2fms",
            request.method,
            path,
            status,
            ms,
            extra={
                "method": request.method,
                "path": path,
                "status": status,
                "provider": ctx.provider,
                "key": key.name if key is not None else None,
                "key_fingerprint": key.fingerprint if key is not None else None,
                "attempts": ctx.attempts,
                "duration_ms": ms,
            },
        )

    async def _handle(self, request: web.Request, started: float, ctx: _Ctx) -> web.StreamResponse:
        compiled = self.compiled  # one read: this request sees one table from start to end
        if compiled is None:
            raise NotReady("the proxy has no routing table yet", headers={"Retry-After": "1"})
        prefix, rest, query = parse_target(request.raw_path)
        if not compiled.virtual_keys.check(request.headers):
            raise Unauthorized(_UNAUTHORIZED)
        if prefix is None:
            upstream = compiled.default
            if upstream is None:
                raise NotFound("this pool has no default provider", code="unknown_provider")
        else:
            found = compiled.upstreams.get(prefix)
            if found is None:
                served = ", ".join(sorted(compiled.upstreams))
                raise NotFound(
                    f"unknown provider {prefix[:64]!r}: this pool serves {served}",
                    code="unknown_provider",
                )
            upstream = found
        ctx.provider = upstream.provider
        body = await self._read_body(request)
        target = upstream.base + rest
        if query:
            target += "?" + query
        terminator: bytes | None = None
        if rest.endswith(("/chat/completions", "/completions")) and not upstream.anthropic:
            terminator = b"[DONE]"
        elif upstream.anthropic and rest.endswith("/messages"):
            terminator = b"message_stop"
        replayable = request.method in _SAFE_METHODS or rest in _REPLAYABLE_PATHS
        return await self._forward(
            request,
            compiled,
            upstream,
            URL(target, encoded=True),
            body,
            started,
            ctx,
            terminator,
            replayable,
        )

    async def _read_body(self, request: web.Request) -> bytes:
        if not request.body_exists:
            return b""
        limit = self._max_body
        length = request.content_length
        if length is not None and length > limit:
            raise BodyTooLarge(f"request body is over the {limit}-byte limit")
        try:
            async with asyncio.timeout(self._body_timeout):
                body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise BodyTooLarge(f"request body is over the {limit}-byte limit") from None
        except TimeoutError:
            # A slow (or slowloris) client: answer, then close; the rest of its body is not read.
            raise RequestTimeout(
                f"the request body did not arrive within {self._body_timeout:g}s",
                headers={"Connection": "close"},
            ) from None
        if body and request.method in _BODY_METHODS:
            ctype = request.content_type
            if (ctype == "application/json" or ctype.endswith("+json")) and (
                "Content-Encoding" not in request.headers
            ):
                try:
                    json.loads(body)  # validity only: the bytes go upstream untouched
                except (ValueError, RecursionError):
                    raise BadRequest(
                        "request body is not valid JSON", code="invalid_json"
                    ) from None
        return body

    # ------------------------------------------------------------------ attempts

    # One function on purpose: this is the hot path, and every call layer costs microseconds.
    async def _forward(  # noqa: PLR0915, PLR0917
        self,
        request: web.Request,
        compiled: Compiled,
        upstream: Upstream,
        url: URL,
        body: bytes,
        started: float,
        ctx: _Ctx,
        terminator: bytes | None,
        replayable: bool,
    ) -> web.StreamResponse:
        session = self.session
        if session is None:
            raise NotReady("the proxy is starting or stopping")
        pool = self.pool
        clock = self.clock
        metrics = self.metrics
        provider = upstream.provider
        method = request.method
        incoming = request.headers
        data = body or None
        retry_deadline = started + compiled.retry_budget
        max_attempts = compiled.max_attempts
        cap = self._buffer_limit
        error_cap = max(cap, 65536)  # error bodies are read (and scrubbed) even when cap is 0
        tried: list[str] = []
        failure: _Failure | ProxyError | None = None
        # A key whose 403 waits for another key's answer to the same request (see the docstring).
        held: Key | None = None

        try:
            for attempt in range(max_attempts):
                timeout = compiled.timeout
                if attempt:
                    now_mono = _monotonic()
                    remaining = retry_deadline - now_mono
                    if remaining <= 0:
                        break
                    timeout = aiohttp.ClientTimeout(
                        total=max(0.001, compiled.total - (now_mono - started)),
                        connect=compiled.connect,
                        sock_connect=compiled.connect,
                        sock_read=min(compiled.first_byte, remaining),
                    )
                key = pool.acquire(provider, clock(), tried)
                if key is None:
                    break
                if attempt:
                    metrics.retry(provider, _reason(failure))
                tried.append(key.name)
                ctx.key = key
                ctx.attempts = attempt + 1
                headers = request_headers(
                    incoming, upstream.auth_name, upstream.auth_prefix + key.secret
                )
                sent = _monotonic()
                try:
                    resp = await session.request(
                        method,
                        url,
                        data=data,
                        headers=headers,
                        timeout=timeout,
                        allow_redirects=False,
                    )
                except asyncio.CancelledError:
                    self._release(key, Outcome.CANCELLED, None, provider, "cancelled")
                    ctx.client_gone = True
                    raise
                except TimeoutError:
                    self._release(key, Outcome.TIMEOUT, None, provider, "timeout")
                    failure = UpstreamTimeout(f"provider {provider} did not answer in time")
                    if not replayable:
                        break
                    continue
                except aiohttp.ClientError as exc:
                    self._release(key, Outcome.CONNECT_ERROR, None, provider, "error")
                    failure = UpstreamUnreachable(
                        f"provider {provider} is unreachable ({type(exc).__name__})"
                    )
                    if not replayable and not isinstance(exc, aiohttp.ClientConnectorError):
                        break  # the request may have reached the provider
                    continue
                except BaseException:
                    self._release(key, Outcome.CANCELLED, None, provider, "error")
                    raise

                status = resp.status
                # A 403 is judged below (key-level code, or another key's answer).
                outcome = Outcome.from_status(status) if status != 403 else Outcome.OK
                retry = status == 401 or (
                    outcome in _RETRY_OUTCOMES and (replayable or status == 429)
                )
                error = status >= 400
                sse = resp.content_type == "text/event-stream"
                length = resp.content_length
                if (not error and (length is None or length > cap or sse)) or (
                    error and sse and not retry and status != 403
                ):
                    if held is not None:
                        # Another key served what ``held`` refused: that 403 was about the key.
                        self._release(held, Outcome.FORBIDDEN, None, provider, "403")
                        held = None
                    return await self._stream(
                        request,
                        resp,
                        key,
                        outcome,
                        compiled,
                        upstream,
                        started,
                        sent,
                        ctx,
                        terminator if status == 200 and sse else None,
                    )

                # Read whole: nothing has reached the client, so a broken body is still
                # retryable. Error bodies are read up to the buffer limit, however they come.
                try:
                    limit = error_cap if error else cap
                    if length is not None and length > limit:
                        payload = None
                    elif length is not None:
                        payload = await resp.read()
                    else:
                        payload = await _read_capped(resp, limit)
                except asyncio.CancelledError:
                    resp.close()
                    self._release(key, Outcome.CANCELLED, None, provider, "cancelled")
                    ctx.client_gone = True
                    raise
                except TimeoutError:
                    resp.close()
                    self._release(key, Outcome.TIMEOUT, None, provider, "timeout")
                    failure = UpstreamTimeout(f"provider {provider} stopped sending the response")
                    if not replayable:
                        break
                    continue
                except aiohttp.ClientError as exc:
                    resp.close()
                    self._release(key, Outcome.SERVER_ERROR, None, provider, "error")
                    failure = UpstreamUnreachable(
                        f"provider {provider} broke off the response ({type(exc).__name__})"
                    )
                    if not replayable:
                        break
                    continue
                except BaseException:
                    resp.close()
                    self._release(key, Outcome.CANCELLED, None, provider, "error")
                    raise
                if payload is None:
                    resp.close()
                else:
                    resp.release()
                metrics.latency(provider, _monotonic() - sent)

                if not error:
                    if (
                        payload
                        and method != "HEAD"
                        and _is_json(resp.content_type)
                        and "Content-Encoding" not in resp.headers
                        and not _whole_json(payload)
                    ):
                        self._release(key, Outcome.SERVER_ERROR, None, provider, "invalid_json")
                        failure = UpstreamInvalid(
                            f"provider {provider} answered {status} with a broken JSON body"
                        )
                        if not replayable:
                            break
                        continue
                    self._release(key, outcome, resp.headers, provider, str(status))
                    if held is not None:
                        self._release(held, Outcome.FORBIDDEN, None, provider, "403")
                        held = None
                    metrics.ttfb(provider, _monotonic() - started)
                    return web.Response(
                        status=status,
                        reason=resp.reason,
                        body=payload,
                        headers=response_headers(resp.headers),
                    )

                # An error answer: make the body safe to show, then decide.
                out_headers = response_headers(resp.headers)
                plain = (
                    None
                    if payload is None
                    else _decoded(payload, resp.headers.get("Content-Encoding"), error_cap)
                )
                if status == 401 or (status == 403 and plain is not None and _key_level(plain)):
                    outcome, retry = Outcome.UNAUTHORIZED, True
                    out_headers, shown = _own_body(
                        out_headers,
                        error_body(
                            f"provider {provider} rejected a key of this pool (HTTP {status}); "
                            "that key is out of rotation until its Secret or PoolKey changes, "
                            "and no other key could answer",
                            "authentication_error",
                            "upstream_key_rejected",
                        ),
                    )
                elif plain is None:
                    why = "too large" if payload is None else "encoded"
                    out_headers, shown = _own_body(
                        out_headers,
                        error_body(
                            f"provider {provider} answered HTTP {status} (its error body is "
                            f"{why} to show)",
                            "proxy_error" if status >= 500 else "invalid_request_error",
                            "upstream_error",
                        ),
                    )
                else:
                    shown = _scrub(plain, key.secret)
                    if plain is not payload:
                        out_headers.popall("Content-Encoding", None)

                if status == 403 and not retry:
                    if held is None and attempt + 1 < max_attempts:
                        # Ask another key before blaming this one; released when that answers.
                        held = key
                        failure = _Failure(status, out_headers, shown)
                        continue
                    # The same request refused twice (or no one left to ask): the request's
                    # fault, nothing learnt about either key.
                    self._release(key, Outcome.OK, None, provider, "403")
                    if held is not None:
                        self._release(held, Outcome.OK, None, provider, "403")
                        held = None
                    return web.Response(status=status, body=shown, headers=out_headers)

                self._release(key, outcome, resp.headers, provider, str(status))
                if retry:
                    failure = _Failure(status, out_headers, shown)
                    continue
                if held is not None:
                    # A 4xx from another key: it does not show the first key was at fault.
                    self._release(held, Outcome.OK, None, provider, "403")
                    held = None
                metrics.ttfb(provider, _monotonic() - started)
                return web.Response(
                    status=status, reason=resp.reason, body=shown, headers=out_headers
                )
        except BaseException:
            if held is not None:
                self._release(held, Outcome.CANCELLED, None, provider, "cancelled")
                held = None
            raise
        if held is not None:
            # Nobody else could answer: the 403 is replayed, the key learns nothing.
            self._release(held, Outcome.OK, None, provider, "403")
        return self._spent(failure, provider, compiled)

    def _spent(
        self, failure: _Failure | ProxyError | None, provider: str, compiled: Compiled
    ) -> web.Response:
        if isinstance(failure, _Failure):
            headers = failure.headers
            if failure.status == 429:
                headers["Retry-After"] = str(self._retry_after(provider, compiled))
            return web.Response(status=failure.status, body=failure.body, headers=headers)
        if failure is not None:
            raise failure
        self.metrics.no_key(provider)
        seconds = self._retry_after(provider, compiled)
        raise NoKeyAvailable(
            f"no key of provider {provider} is available: every key is cooling down or out of "
            f"rotation; retry after {seconds}s",
            headers={"Retry-After": str(seconds)},
        )

    def _retry_after(self, provider: str, compiled: Compiled) -> int:
        now = self.clock()
        recovery = self.pool.next_recovery(provider, now)
        if recovery is None:  # no key will recover by itself (all revoked, or none)
            return max(1, math.ceil(compiled.policy.default_cooldown))
        return max(1, math.ceil(recovery - now))

    # ------------------------------------------------------------------ streaming

    async def _stream(  # noqa: PLR0915, PLR0917 - hot path, see _forward
        self,
        request: web.Request,
        resp: aiohttp.ClientResponse,
        key: Key,
        outcome: Outcome,
        compiled: Compiled,
        upstream: Upstream,
        started: float,
        sent: float,
        ctx: _Ctx,
        terminator: bytes | None,
    ) -> web.StreamResponse:
        """Pass the body through chunk by chunk. ``terminator``: the final event an SSE stream
        must end with (``[DONE]``, ``message_stop``), or None when there is none to check."""
        provider = upstream.provider
        metrics = self.metrics
        out = web.StreamResponse(
            status=resp.status, reason=resp.reason, headers=response_headers(resp.headers)
        )
        if resp.content_length is not None:
            out.content_length = resp.content_length
        connection = resp.connection
        if connection is not None and connection.protocol is not None:
            # Longest silence between chunks from now on (restart the timer with the new value).
            protocol = connection.protocol
            protocol.read_timeout = compiled.idle_stream
            if not protocol._reading_paused:  # paused: aiohttp restarts it on resume
                protocol.start_timeout()
        content = resp.content
        broke: BaseException | None = None
        client_gone = False
        first = True
        tail = prev = b""
        try:
            try:
                await out.prepare(request)
            except ConnectionError:
                client_gone = True
            while not client_gone:
                try:
                    chunk = await content.readany()
                except (aiohttp.ClientError, TimeoutError) as exc:
                    broke = exc
                    break
                if not chunk:
                    break
                try:
                    await out.write(chunk)
                except ConnectionError:
                    client_gone = True
                    break
                if first:
                    first = False
                    metrics.ttfb(provider, _monotonic() - started)
                prev, tail = tail, chunk
        except BaseException as exc:  # CancelledError: the client went away
            resp.close()
            self._release(key, Outcome.CANCELLED, None, provider, "cancelled")
            ctx.client_gone = isinstance(exc, asyncio.CancelledError)
            raise
        metrics.latency(provider, _monotonic() - sent)
        if client_gone:
            resp.close()
            self._release(key, Outcome.CANCELLED, None, provider, "cancelled")
            ctx.client_gone = True
            return out
        if broke is not None:
            resp.close()
            timed_out = isinstance(broke, TimeoutError)
            self._release(
                key,
                Outcome.TIMEOUT if timed_out else Outcome.SERVER_ERROR,
                None,
                provider,
                "timeout" if timed_out else "error",
            )
            log.warning(
                "stream from provider %s via key %s (%s) broke off: %s",
                provider,
                key.name,
                key.fingerprint,
                "idle timeout" if timed_out else type(broke).__name__,
            )
            await self._end_broken_stream(
                request=request,
                out=out,
                resp=resp,
                upstream=upstream,
                tail=tail,
                timed_out=timed_out,
            )
            return out
        if terminator is not None:
            window = tail[-512:] if len(tail) >= 512 else prev[-512:] + tail
            if terminator not in window:
                # Ended cleanly but short of its final event: a failure of the key, and the
                # client must not take it for a whole answer. If the provider's own error event
                # is what ended it, that says enough; otherwise the proxy adds one.
                resp.release()
                self._release(key, Outcome.SERVER_ERROR, None, provider, "incomplete")
                log.warning(
                    "stream from provider %s via key %s (%s) ended without its final event",
                    provider,
                    key.name,
                    key.fingerprint,
                )
                if b'"error":' not in window and b"event: error" not in window:
                    await self._end_broken_stream(
                        request=request,
                        out=out,
                        resp=resp,
                        upstream=upstream,
                        tail=tail,
                        timed_out=False,
                        incomplete=True,
                    )
                return out
        resp.release()
        self._release(key, outcome, resp.headers, provider, str(resp.status))
        return out

    async def _end_broken_stream(
        self,
        *,
        request: web.Request,
        out: web.StreamResponse,
        resp: aiohttp.ClientResponse,
        upstream: Upstream,
        tail: bytes,
        timed_out: bool,
        incomplete: bool = False,
    ) -> None:
        """SSE: a final error event, then a clean end. Anything else: abort the connection so
        the client cannot mistake a truncated body for a complete one."""
        if resp.content_type != "text/event-stream":
            transport = request.transport
            if transport is not None:
                transport.abort()
            return
        if incomplete:
            message = "upstream stream ended before its final event"
            code = "upstream_stream_incomplete"
        elif timed_out:
            message, code = "upstream stream timed out", "upstream_timeout"
        else:
            message, code = "upstream stream broke off", "upstream_stream_error"
        if upstream.anthropic:
            frame = (
                b"event: error\ndata: "
                + json.dumps(
                    {"type": "error", "error": {"type": "api_error", "message": message}}
                ).encode()
            )
        else:
            frame = (
                b"data: "
                + json.dumps(
                    {"error": {"message": message, "type": "proxy_error", "code": code}}
                ).encode()
            )
        prefix = b"" if not tail or tail.endswith(b"\n\n") else b"\n\n"
        try:
            await out.write(prefix + frame + b"\n\n")
            await out.write_eof()
        except ConnectionError:
            pass

    # ------------------------------------------------------------------ learning

    def _release(
        self,
        key: Key,
        outcome: Outcome,
        headers: CIMultiDictProxy[str] | None,
        provider: str,
        label: str,
    ) -> None:
        self.metrics.upstream(key.name, provider, label)
        transitions = self.pool.release(key, outcome, self.clock(), headers)
        if transitions:
            self.report(transitions)

    def report(self, transitions: list[Transition]) -> None:
        self.metrics.transitions(transitions)
        now = self.clock()
        for t in transitions:
            if t.until is not None:
                log.info(
                    "key %s (%s) is %s: %s, for %.1fs",
                    t.name,
                    t.fingerprint,
                    t.health,
                    t.reason,
                    max(0.0, t.until - now),
                    extra={
                        "key": t.name,
                        "key_fingerprint": t.fingerprint,
                        "health": str(t.health),
                        "reason": t.reason,
                        "until": t.until,
                    },
                )
            else:
                log.info(
                    "key %s (%s) is %s: %s",
                    t.name,
                    t.fingerprint,
                    t.health,
                    t.reason,
                    extra={
                        "key": t.name,
                        "key_fingerprint": t.fingerprint,
                        "health": str(t.health),
                        "reason": t.reason,
                        "until": None,
                    },
                )
        hook = self.on_transitions
        if hook is not None:
            try:
                hook(transitions)
            except Exception:
                log.exception("on_transitions hook failed")
