"""A fake LLM provider: a real aiohttp server for tests, ``sideproxy demo`` and benchmarks.

It speaks enough of both APIs for the official SDKs::

    POST .../v1/chat/completions    OpenAI chat, JSON or SSE (``data: {...}`` ... ``data: [DONE]``)
    POST .../v1/completions         OpenAI legacy completions, JSON or SSE
    POST .../v1/embeddings          floats, or base64 float32 (the OpenAI SDK's default)
    GET  .../v1/models[/{id}]
    POST .../v1/messages            Anthropic messages, JSON or its event stream

(``...`` is any prefix, so ``http://fake/openai/v1`` works as a Groq-style base URL.)

Keys come as ``Authorization: Bearer <key>`` or ``x-api-key``. With ``keys=None`` any key is
accepted; otherwise an unknown key gets 401, as does a revoked one. Each key can have a rate
limit (``"5/1s"``: 5 requests per fixed window of 1 s); every answer for a limited key carries
real headers: ``x-ratelimit-limit-requests``, ``x-ratelimit-remaining-requests``,
``x-ratelimit-reset-requests`` (Go duration, ``1.2s``) on OpenAI paths,
``anthropic-ratelimit-requests-limit/-remaining/-reset`` (RFC 3339) on ``/v1/messages``, and a
429 with ``retry-after`` / ``retry-after-ms`` and the provider's error body when exceeded.
Responses carry ``x-fake-key: <fingerprint>`` so a test can tell which key served.

Limits as real providers set them (issue 11):

- ``model_limits={"big": "3/1m"}``: a window per (key, model), as OpenAI, Anthropic and Groq
  count; the same headers as above, for that model's budget, and a 429 with ``retry-after`` when
  it is spent. Models without a limit of their own fall under the key's ``limit``, if any.
- ``out_of_quota=[key]`` (or ``exhaust`` at runtime): every request, ``GET /models`` included,
  gets OpenAI's 429 ``{"error": {"message": "You exceeded your current quota, ...",
  "code": "insufficient_quota", ...}}`` with no reset header, until ``replenish``.
- ``daily_limits={key: n}``: Groq's requests per day; past ``n`` model requests, a 429 whose
  message says ``on requests per day (RPD)`` and ``x-ratelimit-remaining-requests: 0`` with a
  reset two hours out. ``replenish`` starts the day over.
- ``GET /models`` lists, per key, ``key_models[key]`` if set, else the default model and every
  model with a limit.
- ``calls`` logs every answer (time, key fingerprint, method, path, model, status);
  ``calls_of(key, model=, status=, since=)`` counts them.

Fault scripts
-------------
Each key has a list of faults, consumed one per request in order (requests after the script
runs out behave normally). A fault is a :class:`Fault`, or in JSON / Python shorthand:

    ============================ =================================================================
    ``503`` or ``"503"``          answer that status with the provider's error body
                                  (``{"action": "status", "status": 503, "retry_after": 2}``)
    ``"delay:0.5"``               wait 0.5 s before the headers, then answer normally
    ``"hang"``                    never answer (until the client gives up)
    ``"reset"`` / ``"reset:2"``   send the headers and part of the body (or 2 stream chunks),
                                  then reset the TCP connection
    ``"invalid_json"``            200 whose body is not JSON (or an SSE frame that is not)
    ``"stop_early:2"``            a stream that ends cleanly after 2 chunks, without its final
                                  event / ``[DONE]``
    ``"error_frame:1"``           a stream that sends 1 chunk, then an error event, then ends
    ============================ =================================================================

Any dict form also takes ``"delay"`` (seconds before headers). A status fault also takes
``"headers"`` (sent with the error, e.g. ``{"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}``;
a 429 fault with neither ``retry_after`` nor ``headers`` carries no rate-limit header at all) and
``"code"`` (the error's ``code``; Anthropic: its ``type``) and ``"echo": true`` (the message
quotes the presented key in full, as a careless provider might in any error) and ``"sse": true``
(the error goes out as one ``text/event-stream`` frame, as some providers send stream errors).
Faults do not count against the rate limit; a ``delay`` fault's request does.

Auth errors: ``echo_keys="masked"`` makes a 401 for an unknown or revoked key quote the presented
key the way OpenAI does (``Incorrect API key provided: sk-abc***...***wxyz``), ``"full"`` quotes
all of it (some providers do); the default ``"none"`` quotes nothing. ``forbid_models`` answers
403 (``permission_error``, "model not allowed") to any key for requests naming those models: a 403
caused by the request, not the key.

Runtime control (JSON): ``GET /_fake/stats`` -> ``{fingerprint: requests}``;
``GET /_fake/stats/status`` -> ``{fingerprint: {status: count}}``; ``POST /_fake/reset`` zeroes
counters and windows; ``POST /_fake/config`` with any of ``limit`` (``"5/1s"`` or null),
``limits`` (``{key_or_fp: "2/1s" | null}``), ``revoke`` / ``restore`` (lists of keys or
fingerprints), ``faults`` (``{key_or_fp: [fault, ...]}``, appended), ``keys`` (values to accept),
``latency_ms``, ``stream_chunks``, ``stream_interval_ms``, ``echo_keys``, ``forbid_models``,
``model_limits`` (``{model: "3/1m" | null}``), ``daily_limits`` (``{key_or_fp: n | null}``),
``key_models`` (``{key_or_fp: [model, ...] | null}``), and the quota switches ``exhaust`` /
``replenish`` (lists of keys or fingerprints: the admin endpoint that restores a quota).
Stats never show key values. ``recent`` keeps the last 1,000 requests as seen on the wire
(method, raw target, headers with credentials masked) so a test can check what arrived.

Use: ``python -m sideproxy.fake_provider --port 9000 --limit 5/1s --keys k1,k2``, or in tests
``async with FakeProvider(keys=[...], limit="5/1s") as fake: fake.base_url``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import contextlib
import itertools
import json
import math
import os
import re
import socket
import struct
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import Enum
from typing import Any, Self

from aiohttp import web

from sideproxy.models import fingerprint

__all__ = ["FakeProvider", "Fault", "RateLimit", "go_duration", "main"]

_LIMIT = re.compile(r"^\s*(\d+)\s*(?:/\s*(\d+(?:\.\d*)?)?\s*(ms|s|m|h)?)?\s*$")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
_FP = re.compile(r"^[0-9a-f]{8}$")


@dataclass(frozen=True, slots=True)
class RateLimit:
    requests: int
    window: float = 1.0

    @classmethod
    def parse(cls, spec: str | RateLimit | None) -> RateLimit | None:
        """``"5/1s"``, ``"5/500ms"``, ``"100/1m"``, ``"5/s"``, ``"5"`` (per second), or None."""
        if spec is None or isinstance(spec, RateLimit):
            return spec
        match = _LIMIT.match(spec)
        if match is None:
            raise ValueError(f"rate limit {spec!r} is not like '5/1s'")
        count, amount, unit = match.groups()
        window = float(amount or 1) * _UNIT[unit]
        if int(count) < 1 or window <= 0:
            raise ValueError(f"rate limit {spec!r} must allow at least 1 request per window")
        return cls(int(count), window)

    def __str__(self) -> str:
        return f"{self.requests}/{go_duration(self.window)}"


class _Unset(Enum):
    UNSET = 0


_UNSET = _Unset.UNSET

_ECHO = frozenset({"none", "masked", "full"})
_CREDENTIALS = frozenset({"authorization", "x-api-key", "api-key"})

_ACTIONS = frozenset(
    {"status", "delay", "hang", "reset", "invalid_json", "stop_early", "error_frame"}
)


@dataclass(frozen=True, slots=True)
class Fault:
    """One scripted misbehaviour; see the module docstring for the shorthand forms."""

    action: str
    status: int = 500
    delay: float = 0.0  # seconds before the response headers
    after: int = 1  # stream chunks sent before reset / stop_early / error_frame
    retry_after: float | None = None  # for a status fault: a retry-after header
    headers: tuple[tuple[str, str], ...] = ()  # for a status fault: extra response headers
    code: str | None = None  # for a status fault: the error's code (Anthropic: its type)
    echo: bool = False  # for a status fault: quote the presented key (in full) in the message
    sse: bool = False  # for a status fault: send the error as one text/event-stream frame

    def __post_init__(self) -> None:
        if self.action not in _ACTIONS:
            raise ValueError(f"unknown fault action {self.action!r}: one of {sorted(_ACTIONS)}")
        if isinstance(self.headers, Mapping):
            object.__setattr__(
                self, "headers", tuple((str(k), str(v)) for k, v in self.headers.items())
            )

    @classmethod
    def parse(cls, spec: Fault | int | str | Mapping[str, Any]) -> Fault:
        if isinstance(spec, Fault):
            return spec
        if isinstance(spec, int):
            return cls("status", status=spec)
        if isinstance(spec, str):
            name, _, arg = spec.strip().partition(":")
            if name.isdigit():
                return cls("status", status=int(name))
            if name == "delay":
                return cls("delay", delay=float(arg or 1))
            if name in ("reset", "stop_early", "error_frame"):
                return cls(name, after=int(arg or 1))
            return cls(name)
        data = dict(spec)
        action = str(data.pop("action", "status" if "status" in data else ""))
        seconds = data.pop("seconds", None)
        if seconds is not None:
            data["delay"] = float(seconds)
        return cls(action, **data)


def go_duration(seconds: float) -> str:
    """Seconds as Go's ``time.Duration`` text, the way OpenAI sends resets: 1.2s, 12ms, 6m0s."""
    if seconds <= 0:
        return "0s"
    if seconds < 1:
        return f"{max(1, round(seconds * 1000))}ms"
    if seconds < 60:
        return f"{round(seconds, 3):g}s"
    minutes, rest = divmod(seconds, 60)
    if minutes < 60:
        return f"{int(minutes)}m{round(rest, 3):g}s"
    hours, minutes = divmod(minutes, 60)
    return f"{int(hours)}h{int(minutes)}m{round(rest, 3):g}s"


def _rfc3339(unix: float) -> str:
    return (
        datetime.fromtimestamp(unix, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    )


class _Key:
    __slots__ = (
        "count",
        "daily_limit",
        "daily_used",
        "faults",
        "fp",
        "limit",
        "model_windows",
        "models",
        "quota_out",
        "requests",
        "revoked",
        "statuses",
        "value",
        "window_start",
    )

    def __init__(self, value: str) -> None:
        self.value = value
        self.fp = fingerprint(value)
        self.revoked = False
        self.quota_out = False  # every request: 429 insufficient_quota, GET /models too
        self.daily_limit: int | None = None  # Groq-style requests per day (model requests)
        self.daily_used = 0
        self.model_windows: dict[str, list[float]] = {}  # model -> [window start, count]
        self.models: tuple[str, ...] | None = None  # what GET /models lists for this key
        self.limit: RateLimit | None = None
        self.window_start = 0.0
        self.count = 0
        self.faults: collections.deque[Fault] = collections.deque()
        self.requests = 0
        self.statuses: collections.Counter[int] = collections.Counter()


@dataclass
class _Budget:
    limit: int
    window: float
    remaining: int
    reset: float  # seconds from now
    exceeded: bool


@dataclass
class _Call:
    """One request as the handlers see it."""

    key: _Key
    anthropic: bool
    body: dict[str, Any]
    budget: _Budget | None
    fault: Fault | None
    headers: dict[str, str] = field(default_factory=dict)


class FakeProvider:
    """The server. Configure with the constructor, :meth:`configure` or ``POST /_fake/config``."""

    def __init__(
        self,
        keys: Iterable[str] | None = None,
        *,
        limit: str | RateLimit | None = None,
        limits: Mapping[str, str | RateLimit | None] | None = None,
        revoked: Iterable[str] = (),
        faults: Mapping[str, Sequence[Fault | int | str | Mapping[str, Any]]] | None = None,
        latency: float = 0.0,
        stream_chunks: int = 5,
        stream_interval: float = 0.0,
        host: str = "127.0.0.1",
        port: int = 0,
        model: str = "fake-model",
        echo_keys: str = "none",
        forbid_models: Iterable[str] = (),
        model_limits: Mapping[str, str | RateLimit | None] | None = None,
        out_of_quota: Iterable[str] = (),
        daily_limits: Mapping[str, int | None] | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.model = model
        self.open = keys is None  # accept any key
        self._keys: dict[str, _Key] = {}
        self._by_fp: dict[str, _Key] = {}
        self.limit = RateLimit.parse(limit)
        self.latency = latency
        self.stream_chunks = stream_chunks
        self.stream_interval = stream_interval
        self.active_streams = 0  # streams being sent right now
        self.completed_streams = 0
        self._ids = itertools.count(1)
        self._runner: web.AppRunner | None = None
        self.echo_keys = "none"
        self.forbid_models: frozenset[str] = frozenset()
        # Per (key, model) windows, as OpenAI, Anthropic and Groq count: model -> limit.
        self.model_limits: dict[str, RateLimit] = {}
        # Every model request and probe as answered: (unix time, key fingerprint, method,
        # path, model or None, status). What a test counts per key, model and window.
        self.calls: collections.deque[tuple[float, str, str, str, str | None, int]] = (
            collections.deque(maxlen=100_000)
        )
        # The last requests as they arrived: (method, raw target, headers, credentials masked).
        self.recent: collections.deque[tuple[str, str, list[tuple[str, str]]]] = collections.deque(
            maxlen=1000
        )
        for value in keys or ():
            self._add(value)
        self.configure(
            limits=limits,
            revoke=revoked,
            faults=faults,
            echo_keys=echo_keys,
            forbid_models=forbid_models,
            model_limits=model_limits,
            exhaust=out_of_quota,
            daily_limits=daily_limits,
        )

    # ------------------------------------------------------------------ configuration

    def _add(self, value: str) -> _Key:
        state = self._keys.get(value)
        if state is None:
            state = self._keys[value] = _Key(value)
            self._by_fp[state.fp] = state
        return state

    def _find(self, ident: str, create: bool = True) -> _Key:
        state = self._keys.get(ident) or self._by_fp.get(ident)
        if state is not None:
            return state
        if create and not _FP.match(ident):
            return self._add(ident)
        raise KeyError("no such key (by value or fingerprint)")

    def configure(
        self,
        *,
        limit: str | RateLimit | _Unset | None = _UNSET,
        limits: Mapping[str, str | RateLimit | None] | None = None,
        revoke: Iterable[str] = (),
        restore: Iterable[str] = (),
        faults: Mapping[str, Sequence[Fault | int | str | Mapping[str, Any]]] | None = None,
        keys: Iterable[str] = (),
        latency: float | None = None,
        stream_chunks: int | None = None,
        stream_interval: float | None = None,
        echo_keys: str | None = None,
        forbid_models: Iterable[str] | None = None,
        model_limits: Mapping[str, str | RateLimit | None] | None = None,
        exhaust: Iterable[str] = (),
        replenish: Iterable[str] = (),
        daily_limits: Mapping[str, int | None] | None = None,
        key_models: Mapping[str, Sequence[str] | None] | None = None,
    ) -> None:
        """Change behaviour at runtime; arguments left out stay as they are."""
        self._configure_quota(model_limits, exhaust, replenish, daily_limits, key_models)
        if echo_keys is not None:
            if echo_keys not in _ECHO:
                raise ValueError(f"echo_keys must be one of {sorted(_ECHO)}")
            self.echo_keys = echo_keys
        if forbid_models is not None:
            self.forbid_models = frozenset(forbid_models)
        if not isinstance(limit, _Unset):
            self.limit = RateLimit.parse(limit)
        for value in keys:
            self._add(value)
        for ident, spec in (limits or {}).items():
            self._find(ident).limit = RateLimit.parse(spec)
        for ident in revoke:
            self._find(ident).revoked = True
        for ident in restore:
            self._find(ident).revoked = False
        for ident, script in (faults or {}).items():
            self._find(ident).faults.extend(Fault.parse(f) for f in script)
        if latency is not None:
            self.latency = latency
        if stream_chunks is not None:
            self.stream_chunks = max(1, stream_chunks)
        if stream_interval is not None:
            self.stream_interval = stream_interval

    def _configure_quota(
        self,
        model_limits: Mapping[str, str | RateLimit | None] | None,
        exhaust: Iterable[str],
        replenish: Iterable[str],
        daily_limits: Mapping[str, int | None] | None,
        key_models: Mapping[str, Sequence[str] | None] | None,
    ) -> None:
        for model, spec in (model_limits or {}).items():
            limit = RateLimit.parse(spec)
            if limit is None:
                self.model_limits.pop(model, None)
            else:
                self.model_limits[model] = limit
        for ident in exhaust:
            self._find(ident).quota_out = True
        for ident in replenish:  # the quota is back: out-of-quota and daily counts cleared
            state = self._find(ident)
            state.quota_out = False
            state.daily_used = 0
        for ident, per_day in (daily_limits or {}).items():
            if per_day is not None and per_day < 1:
                raise ValueError("a daily limit must allow at least 1 request")
            self._find(ident).daily_limit = per_day
        for ident, listed in (key_models or {}).items():
            self._find(ident).models = None if listed is None else tuple(listed)

    def exhaust(self, key: str) -> None:
        """The key runs out of quota: 429 ``insufficient_quota`` until :meth:`replenish`."""
        self.configure(exhaust=[key])

    def replenish(self, key: str) -> None:
        """The key's quota is back (and its daily count starts over)."""
        self.configure(replenish=[key])

    def calls_of(
        self, key: str, *, model: str | None = None, status: int | None = None, since: float = 0
    ) -> int:
        """Answers given to ``key`` (value or fingerprint), filtered."""
        fp = self._find(key, create=False).fp
        return sum(
            1
            for at, who, _, _, m, code in self.calls
            if who == fp
            and at >= since
            and (model is None or m == model)
            and (status is None or code == status)
        )

    def revoke(self, key: str) -> None:
        self.configure(revoke=[key])

    def add_faults(self, key: str, *faults: Fault | int | str | Mapping[str, Any]) -> None:
        self.configure(faults={key: faults})

    def reset_stats(self) -> None:
        for state in self._keys.values():
            state.requests = 0
            state.statuses.clear()
            state.count = 0
            state.window_start = 0.0
            state.model_windows.clear()
        self.calls.clear()

    def stats(self) -> dict[str, int]:
        """Requests per key fingerprint (every request that named a known key)."""
        return {s.fp: s.requests for s in self._keys.values() if s.requests}

    def status_counts(self) -> dict[str, dict[int, int]]:
        return {s.fp: dict(s.statuses) for s in self._keys.values() if s.statuses}

    def successes(self) -> dict[str, int]:
        """200s answered per key fingerprint."""
        return {s.fp: s.statuses[200] for s in self._keys.values() if s.statuses.get(200)}

    def served(self, key: str) -> int:
        """200s answered for ``key`` (value or fingerprint)."""
        return self._find(key, create=False).statuses.get(200, 0)

    def _limit_of(self, state: _Key) -> RateLimit | None:
        return state.limit or self.limit

    # ------------------------------------------------------------------ lifecycle

    @property
    def url(self) -> str:
        """``http://host:port`` (no path)."""
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        """``http://host:port/v1``: what a provider base URL looks like."""
        return self.url + "/v1"

    def app(self) -> web.Application:
        app = web.Application(
            client_max_size=64 * 1024 * 1024, handler_args={"handler_cancellation": True}
        )
        r = app.router
        r.add_get("/_fake/stats", self._h_stats)
        r.add_get("/_fake/stats/status", self._h_status_stats)
        r.add_get("/_fake/config", self._h_get_config)
        r.add_post("/_fake/config", self._h_config)
        r.add_post("/_fake/reset", self._h_reset)
        r.add_route("*", "/{tail:.*}", self._h_api)
        return app

    async def start(self) -> Self:
        runner = web.AppRunner(self.app(), access_log=None, shutdown_timeout=0.25)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port)
        await site.start()
        self._runner = runner
        if self.port == 0:
            self.port = int(runner.addresses[0][1])
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, *_: object) -> None:
        await self.stop()

    # ------------------------------------------------------------------ control endpoints

    async def _h_stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats())

    async def _h_status_stats(self, request: web.Request) -> web.Response:
        return web.json_response(
            {fp: {str(k): v for k, v in c.items()} for fp, c in self.status_counts().items()}
        )

    async def _h_get_config(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "limit": str(self.limit) if self.limit else None,
                "latency_ms": self.latency * 1000,
                "stream_chunks": self.stream_chunks,
                "stream_interval_ms": self.stream_interval * 1000,
                "echo_keys": self.echo_keys,
                "forbid_models": sorted(self.forbid_models),
                "keys": {
                    s.fp: {
                        "limit": str(s.limit) if s.limit else None,
                        "revoked": s.revoked,
                        "faults": len(s.faults),
                    }
                    for s in self._keys.values()
                },
            }
        )

    async def _h_reset(self, request: web.Request) -> web.Response:
        self.reset_stats()
        return web.json_response({"ok": True})

    async def _h_config(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
            if not isinstance(body, dict):
                raise ValueError("body must be a JSON object")
            kwargs: dict[str, Any] = {}
            if "limit" in body:
                kwargs["limit"] = body["limit"]
            for name in ("limits", "faults"):
                if name in body:
                    kwargs[name] = body[name]
            for name in ("revoke", "restore", "keys"):
                if name in body:
                    kwargs[name] = list(body[name])
            if "latency_ms" in body:
                kwargs["latency"] = float(body["latency_ms"]) / 1000
            if "stream_chunks" in body:
                kwargs["stream_chunks"] = int(body["stream_chunks"])
            if "stream_interval_ms" in body:
                kwargs["stream_interval"] = float(body["stream_interval_ms"]) / 1000
            if "echo_keys" in body:
                kwargs["echo_keys"] = str(body["echo_keys"])
            if "forbid_models" in body:
                kwargs["forbid_models"] = [str(m) for m in body["forbid_models"]]
            for name in ("model_limits", "daily_limits", "key_models"):
                if name in body:
                    kwargs[name] = dict(body[name])
            for name in ("exhaust", "replenish"):
                if name in body:
                    kwargs[name] = [str(k) for k in body[name]]
            self.configure(**kwargs)
        except (ValueError, TypeError, KeyError) as exc:
            return web.json_response({"error": {"message": str(exc)}}, status=400)
        return web.json_response({"ok": True})

    # ------------------------------------------------------------------ the API

    def _error(
        self,
        anthropic: bool,
        status: int,
        message: str,
        headers: Mapping[str, str] | None = None,
        code: str | None = None,
    ) -> web.Response:
        if anthropic:
            kind = code or {
                400: "invalid_request_error",
                401: "authentication_error",
                403: "permission_error",
                404: "not_found_error",
                429: "rate_limit_error",
                529: "overloaded_error",
            }.get(status, "api_error")
            body: dict[str, Any] = {"type": "error", "error": {"type": kind, "message": message}}
        else:
            kind, default_code = {
                400: ("invalid_request_error", None),
                401: ("invalid_request_error", "invalid_api_key"),
                403: ("invalid_request_error", None),
                404: ("invalid_request_error", "unknown_url"),
                429: ("requests", "rate_limit_exceeded"),
            }.get(status, ("server_error", None))
            body = {
                "error": {
                    "message": message,
                    "type": kind,
                    "param": None,
                    "code": code or default_code,
                }
            }
        return web.json_response(body, status=status, headers=headers)

    def _budget(self, state: _Key, now: float) -> _Budget | None:
        limit = self._limit_of(state)
        if limit is None:
            return None
        if now >= state.window_start + limit.window:
            state.window_start = now
            state.count = 0
        state.count += 1
        reset = state.window_start + limit.window - now
        return _Budget(
            limit.requests,
            limit.window,
            max(0, limit.requests - state.count),
            reset,
            state.count > limit.requests,
        )

    @staticmethod
    def _limit_headers(call: _Call, now: float) -> None:
        budget = call.budget
        h = call.headers
        if budget is None:
            return
        if call.anthropic:
            h["anthropic-ratelimit-requests-limit"] = str(budget.limit)
            h["anthropic-ratelimit-requests-remaining"] = str(budget.remaining)
            h["anthropic-ratelimit-requests-reset"] = _rfc3339(now + budget.reset)
        else:
            h["x-ratelimit-limit-requests"] = str(budget.limit)
            h["x-ratelimit-remaining-requests"] = str(budget.remaining)
            h["x-ratelimit-reset-requests"] = go_duration(budget.reset)
        if budget.exceeded:
            h["retry-after"] = str(max(1, math.ceil(budget.reset)))
            h["retry-after-ms"] = str(max(1, round(budget.reset * 1000)))

    def _record(self, request: web.Request) -> None:
        headers = [
            (name, "<credential>" if name.lower() in _CREDENTIALS else value)
            for name, value in request.headers.items()
        ]
        self.recent.append((request.method, request.raw_path, headers))

    def _rejected_key(self, value: str, why: str) -> str:
        """A 401 message; with ``echo_keys``, quoting the key as some providers do."""
        if self.echo_keys == "full":
            return f"Incorrect API key provided: {value}. {why}"
        if self.echo_keys == "masked":
            shown = value[:8] + "*" * max(3, len(value) - 12) + value[-4:]
            return (
                f"Incorrect API key provided: {shown}. You can find your API key at "
                f"https://platform.example/api-keys. ({why})"
            )
        return why

    async def _h_api(self, request: web.Request) -> web.StreamResponse:
        self._record(request)
        path = request.path
        anthropic = path.endswith("/v1/messages")
        if "/v1" not in path:
            return self._error(anthropic, 404, f"unknown path {path}")
        auth = request.headers.get("Authorization", "")
        value = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
        value = value or request.headers.get("x-api-key", "").strip()
        if not value:
            return self._error(anthropic, 401, "no API key provided")
        state = self._keys.get(value)
        if state is None:
            if not self.open:
                return self._error(anthropic, 401, self._rejected_key(value, "invalid API key"))
            state = self._add(value)
        state.requests += 1
        named: list[str | None] = [None]
        response = await self._answer(request, state, anthropic, path, named)
        state.statuses[response.status] += 1
        self.calls.append((time.time(), state.fp, request.method, path, named[0], response.status))
        return response

    async def _answer(
        self,
        request: web.Request,
        state: _Key,
        anthropic: bool,
        path: str,
        named: list[str | None],
    ) -> web.StreamResponse:
        """The answer to one request; ``named[0]`` learns the model it named."""
        fault = state.faults.popleft() if state.faults else None
        delay = self.latency + (fault.delay if fault else 0.0)
        if fault is not None and fault.action == "delay":
            fault = None
        body: dict[str, Any] = {}
        if request.method == "POST" and request.body_exists:
            try:
                parsed = await request.json()
            except ValueError:
                return self._error(anthropic, 400, "request body is not valid JSON")
            body = parsed if isinstance(parsed, dict) else {}
        if delay > 0:
            await asyncio.sleep(delay)
        if state.revoked:
            return self._error(
                anthropic, 401, self._rejected_key(state.value, "this API key has been revoked")
            )
        model = body.get("model")
        if isinstance(model, str) and model in self.forbid_models:
            return self._error(
                anthropic,
                403,
                f"this organisation may not use model {model!r}",
                {"x-fake-key": state.fp},
                code="permission_error" if anthropic else "model_not_allowed",
            )
        model_name = model if isinstance(model, str) else None
        named[0] = model_name
        now = time.time()
        refused = self._refuse(state, anthropic, request.method, model_name, now)
        if refused is not None:
            return refused
        budget = None if fault is not None else self._budget(state, now)
        if budget is None and fault is None and request.method == "POST" and model_name:
            budget = self._model_budget(state, model_name, now)
        call = _Call(state, anthropic, body, budget, fault, {"x-fake-key": state.fp})
        self._limit_headers(call, now)
        if budget is not None and budget.exceeded:
            return self._error(
                anthropic,
                429,
                f"Rate limit reached: limit {budget.limit} requests per "
                f"{go_duration(budget.window)}",
                call.headers,
            )
        if fault is not None:
            if fault.action == "status":
                if fault.retry_after is not None:
                    call.headers["retry-after"] = f"{fault.retry_after:g}"
                call.headers.update(fault.headers)
                message = f"fake fault: status {fault.status}"
                if fault.echo:
                    message += f" for API key {state.value}"
                answer = self._error(
                    anthropic, fault.status, message, call.headers, code=fault.code
                )
                return _as_sse(answer) if fault.sse else answer
            if fault.action == "hang":
                await asyncio.sleep(3600)
                return self._error(anthropic, 504, "fake fault: hang ended")
        stream = bool(body.get("stream"))
        if path.endswith("/chat/completions") and request.method == "POST":
            return await (self._chat_stream(request, call) if stream else self._chat(request, call))
        if path.endswith("/completions") and request.method == "POST":
            return await (
                self._completion_stream(request, call)
                if stream
                else self._completion(request, call)
            )
        if path.endswith("/embeddings") and request.method == "POST":
            return await self._embeddings(request, call)
        if path.endswith("/messages") and request.method == "POST":
            return await (
                self._messages_stream(request, call) if stream else self._messages(request, call)
            )
        if request.method == "GET" and path.endswith("/models"):
            names = state.models if state.models is not None else self._listed()
            data = [self._model(name) for name in names]
            return await self._json(request, call, {"object": "list", "data": data})
        if request.method == "GET" and "/models/" in path:
            return await self._json(request, call, self._model(path.rsplit("/", 1)[1]))
        return self._error(anthropic, 404, f"unknown path {path}")

    def _listed(self) -> list[str]:
        return [self.model, *sorted(set(self.model_limits) - {self.model})]

    def _refuse(
        self, state: _Key, anthropic: bool, method: str, model: str | None, now: float
    ) -> web.Response | None:
        """Out of quota (any request, probes too) or over the day's requests (model requests),
        answered the way OpenAI and Groq do."""
        headers = {"x-fake-key": state.fp}
        if state.quota_out:
            return self._error(
                anthropic,
                429,
                "You exceeded your current quota, please check your plan and billing details.",
                headers,
                code="insufficient_quota",
            )
        if state.daily_limit is None or method != "POST" or not model:
            return None
        state.daily_used += 1
        if state.daily_used <= state.daily_limit:
            return None
        headers.update(
            {
                "x-ratelimit-limit-requests": str(state.daily_limit),
                "x-ratelimit-remaining-requests": "0",
                "x-ratelimit-reset-requests": "2h0m0s",
                "retry-after": "7200",
            }
        )
        return self._error(
            anthropic,
            429,
            f"Rate limit reached for model `{model}` in organization `org_fake` service tier "
            f"`on_demand` on requests per day (RPD): Limit {state.daily_limit}, Used "
            f"{state.daily_limit}, Requested 1. Please try again in 2h0m0s.",
            headers,
        )

    def _model_budget(self, state: _Key, model: str, now: float) -> _Budget | None:
        """The (key, model) window, for models with a limit of their own."""
        limit = self.model_limits.get(model)
        if limit is None:
            return None
        window = state.model_windows.setdefault(model, [0.0, 0.0])
        if now >= window[0] + limit.window:
            window[0], window[1] = now, 0
        window[1] += 1
        used = int(window[1])
        reset = window[0] + limit.window - now
        return _Budget(
            limit.requests,
            limit.window,
            max(0, limit.requests - used),
            reset,
            used > limit.requests,
        )

    def _model(self, name: str | None = None) -> dict[str, Any]:
        return {"id": name or self.model, "object": "model", "created": 0, "owned_by": "fake"}

    def _words(self, call: _Call) -> list[str]:
        n = self.stream_chunks
        return [f"word{i} " for i in range(n - 1)] + [f"via {call.key.fp}"]

    # ------------------------------------------------------------------ non-streaming bodies

    async def _json(
        self, request: web.Request, call: _Call, payload: dict[str, Any]
    ) -> web.StreamResponse:
        fault = call.fault
        data = json.dumps(payload).encode()
        if fault is not None and fault.action == "invalid_json":
            data = data[: max(1, len(data) // 2)]
        if fault is not None and fault.action == "reset":
            response = web.StreamResponse(headers=call.headers)
            response.content_type = "application/json"
            response.content_length = len(data)
            await response.prepare(request)
            await response.write(data[: len(data) // 2])
            _reset(request)
            return response
        return web.Response(body=data, content_type="application/json", headers=call.headers)

    async def _chat(self, request: web.Request, call: _Call) -> web.StreamResponse:
        n = next(self._ids)
        text = "".join(self._words(call))
        return await self._json(
            request,
            call,
            {
                "id": f"chatcmpl-fake-{n}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": call.body.get("model", self.model),
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "finish_reason": "stop",
                        "logprobs": None,
                    }
                ],
                "usage": {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10},
            },
        )

    async def _completion(self, request: web.Request, call: _Call) -> web.StreamResponse:
        n = next(self._ids)
        return await self._json(
            request,
            call,
            {
                "id": f"cmpl-fake-{n}",
                "object": "text_completion",
                "created": int(time.time()),
                "model": call.body.get("model", self.model),
                "choices": [
                    {
                        "index": 0,
                        "text": "".join(self._words(call)),
                        "finish_reason": "stop",
                        "logprobs": None,
                    }
                ],
                "usage": {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10},
            },
        )

    async def _embeddings(self, request: web.Request, call: _Call) -> web.StreamResponse:
        raw = call.body.get("input", "")
        inputs = raw if isinstance(raw, list) else [raw]
        as_base64 = call.body.get("encoding_format") == "base64"
        data = []
        for i, item in enumerate(inputs):
            seed = len(str(item)) + i
            vector = [((seed * (j + 1)) % 17) / 17.0 for j in range(8)]
            embedding: Any = (
                base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
                if as_base64
                else vector
            )
            data.append({"object": "embedding", "index": i, "embedding": embedding})
        return await self._json(
            request,
            call,
            {
                "object": "list",
                "data": data,
                "model": call.body.get("model", self.model),
                "usage": {"prompt_tokens": len(inputs), "total_tokens": len(inputs)},
            },
        )

    async def _messages(self, request: web.Request, call: _Call) -> web.StreamResponse:
        n = next(self._ids)
        return await self._json(
            request,
            call,
            {
                "id": f"msg_fake_{n}",
                "type": "message",
                "role": "assistant",
                "model": call.body.get("model", self.model),
                "content": [{"type": "text", "text": "".join(self._words(call))}],
                "stop_reason": "end_turn",
                "stop_sequence": None,
                "usage": {"input_tokens": 5, "output_tokens": 5},
            },
        )

    # ------------------------------------------------------------------ streams

    async def _sse(
        self,
        request: web.Request,
        call: _Call,
        frames: list[bytes],
        final: list[bytes],
        error: bytes,
    ) -> web.StreamResponse:
        """Send ``frames`` (the content) then ``final``, applying any stream fault."""
        response = web.StreamResponse(headers=call.headers)
        response.content_type = "text/event-stream"
        response.headers["Cache-Control"] = "no-cache"
        fault = call.fault
        cut = fault.after if fault is not None else len(frames)
        self.active_streams += 1
        try:
            await response.prepare(request)
            for i, frame in enumerate(frames):
                if fault is not None and i == cut and fault.action != "invalid_json":
                    break
                if i and self.stream_interval:
                    await asyncio.sleep(self.stream_interval)
                garbage = fault is not None and fault.action == "invalid_json" and i == 0
                await response.write(b"data: {not json\n\n" if garbage else frame)
            else:
                if self.stream_interval:
                    await asyncio.sleep(self.stream_interval)
                for frame in final:
                    await response.write(frame)
                await response.write_eof()
                self.completed_streams += 1
                return response
            # A fault cut the stream short.
            if fault is not None and fault.action == "reset":
                _reset(request)
                return response
            if fault is not None and fault.action == "error_frame":
                await response.write(error)
            await response.write_eof()
            return response
        finally:
            self.active_streams -= 1

    @staticmethod
    def _data(obj: dict[str, Any]) -> bytes:
        return b"data: " + json.dumps(obj).encode() + b"\n\n"

    @staticmethod
    def _event(name: str, obj: dict[str, Any]) -> bytes:
        return f"event: {name}\n".encode() + b"data: " + json.dumps(obj).encode() + b"\n\n"

    async def _chat_stream(self, request: web.Request, call: _Call) -> web.StreamResponse:
        n = next(self._ids)
        base = {
            "id": f"chatcmpl-fake-{n}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": call.body.get("model", self.model),
        }

        def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
            return self._data(
                {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            )

        words = self._words(call)
        frames = [chunk({"role": "assistant", "content": words[0]})]
        frames += [chunk({"content": w}) for w in words[1:]]
        final = [chunk({}, "stop")]
        options = call.body.get("stream_options")
        if isinstance(options, dict) and options.get("include_usage"):
            usage = {"prompt_tokens": 5, "completion_tokens": len(words), "total_tokens": 10}
            final.append(self._data({**base, "choices": [], "usage": usage}))
        final.append(b"data: [DONE]\n\n")
        error = self._data(
            {"error": {"message": "fake stream error", "type": "server_error", "code": None}}
        )
        return await self._sse(request, call, frames, final, error)

    async def _completion_stream(self, request: web.Request, call: _Call) -> web.StreamResponse:
        n = next(self._ids)
        base = {
            "id": f"cmpl-fake-{n}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": call.body.get("model", self.model),
        }
        frames = [
            self._data({**base, "choices": [{"index": 0, "text": w, "finish_reason": None}]})
            for w in self._words(call)
        ]
        final = [
            self._data({**base, "choices": [{"index": 0, "text": "", "finish_reason": "stop"}]}),
            b"data: [DONE]\n\n",
        ]
        error = self._data({"error": {"message": "fake stream error", "type": "server_error"}})
        return await self._sse(request, call, frames, final, error)

    async def _messages_stream(self, request: web.Request, call: _Call) -> web.StreamResponse:
        n = next(self._ids)
        words = self._words(call)
        message = {
            "id": f"msg_fake_{n}",
            "type": "message",
            "role": "assistant",
            "model": call.body.get("model", self.model),
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": 5, "output_tokens": 1},
        }
        frames = [
            self._event("message_start", {"type": "message_start", "message": message})
            + self._event(
                "content_block_start",
                {
                    "type": "content_block_start",
                    "index": 0,
                    "content_block": {"type": "text", "text": ""},
                },
            )
            + self._event("ping", {"type": "ping"})
        ]
        frames += [
            self._event(
                "content_block_delta",
                {
                    "type": "content_block_delta",
                    "index": 0,
                    "delta": {"type": "text_delta", "text": w},
                },
            )
            for w in words
        ]
        final = [
            self._event("content_block_stop", {"type": "content_block_stop", "index": 0}),
            self._event(
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                    "usage": {"output_tokens": len(words)},
                },
            ),
            self._event("message_stop", {"type": "message_stop"}),
        ]
        error = self._event(
            "error",
            {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}},
        )
        # The first frame (message_start etc.) always goes out, so "after" counts text deltas.
        if call.fault is not None and call.fault.action in ("reset", "stop_early", "error_frame"):
            call.fault = Fault(call.fault.action, after=call.fault.after + 1)
        return await self._sse(request, call, frames, final, error)


def _as_sse(answer: web.Response) -> web.Response:
    """An error answer as some providers stream it: one ``data:`` frame of the JSON body."""
    assert isinstance(answer.body, bytes)
    headers = {k: v for k, v in answer.headers.items() if k.lower() != "content-type"}
    return web.Response(
        status=answer.status,
        body=b"data: " + answer.body + b"\n\n",
        content_type="text/event-stream",
        headers=headers,
    )


def _reset(request: web.Request) -> None:
    """Abort the connection with a TCP RST (SO_LINGER 0), as a crashing server would."""
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


# --------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    env = os.environ.get
    p = argparse.ArgumentParser(
        prog="python -m sideproxy.fake_provider",
        description="A fake, rate-limited OpenAI/Anthropic-compatible provider (for tests, "
        "demos and benchmarks). Never exposes key values.",
    )
    p.add_argument(
        "--host",
        default=env("FAKE_PROVIDER_HOST", "127.0.0.1"),
        help="listen address (env FAKE_PROVIDER_HOST; default 127.0.0.1)",
    )
    p.add_argument(
        "--port",
        type=int,
        default=int(env("FAKE_PROVIDER_PORT", "9000")),
        help="listen port, 0 for any (env FAKE_PROVIDER_PORT; default 9000)",
    )
    p.add_argument(
        "--keys",
        default=env("FAKE_PROVIDER_KEYS"),
        help="comma-separated keys to accept; omit to accept any (env FAKE_PROVIDER_KEYS)",
    )
    p.add_argument(
        "--revoked",
        default=env("FAKE_PROVIDER_REVOKED", ""),
        help="comma-separated keys answered 401 (env FAKE_PROVIDER_REVOKED)",
    )
    p.add_argument(
        "--limit",
        default=env("FAKE_PROVIDER_LIMIT"),
        help="per-key rate limit like 5/1s; omit for none (env FAKE_PROVIDER_LIMIT)",
    )
    p.add_argument(
        "--model-limits",
        default=env("FAKE_PROVIDER_MODEL_LIMITS", ""),
        help="per (key, model) limits like big=3/1m,other=10/1s (env FAKE_PROVIDER_MODEL_LIMITS)",
    )
    p.add_argument(
        "--out-of-quota",
        default=env("FAKE_PROVIDER_OUT_OF_QUOTA", ""),
        help="comma-separated keys answered 429 insufficient_quota until replenished "
        "(env FAKE_PROVIDER_OUT_OF_QUOTA)",
    )
    p.add_argument(
        "--latency-ms",
        type=float,
        default=float(env("FAKE_PROVIDER_LATENCY_MS", "0")),
        help="fixed delay before each answer (env FAKE_PROVIDER_LATENCY_MS)",
    )
    p.add_argument(
        "--stream-chunks",
        type=int,
        default=int(env("FAKE_PROVIDER_STREAM_CHUNKS", "5")),
        help="content chunks per stream (env FAKE_PROVIDER_STREAM_CHUNKS; default 5)",
    )
    p.add_argument(
        "--stream-interval-ms",
        type=float,
        default=float(env("FAKE_PROVIDER_STREAM_INTERVAL_MS", "0")),
        help="pause between stream chunks (env FAKE_PROVIDER_STREAM_INTERVAL_MS)",
    )
    return p


def _split(text: str | None) -> list[str]:
    return [part.strip() for part in (text or "").split(",") if part.strip()]


def _pairs(text: str) -> dict[str, str]:
    """``big=3/1m,other=10/1s`` -> ``{"big": "3/1m", "other": "10/1s"}``."""
    pairs = (part.partition("=") for part in _split(text))
    return {name.strip(): value.strip() for name, _, value in pairs}


async def _serve(args: argparse.Namespace) -> None:
    keys = _split(args.keys) if args.keys is not None else None
    fake = FakeProvider(
        keys,
        limit=args.limit,
        revoked=_split(args.revoked),
        latency=args.latency_ms / 1000,
        stream_chunks=args.stream_chunks,
        stream_interval=args.stream_interval_ms / 1000,
        host=args.host,
        port=args.port,
        model_limits=_pairs(args.model_limits),
        out_of_quota=_split(args.out_of_quota),
    )
    async with fake:
        print(f"fake provider listening on {fake.base_url}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        import signal  # noqa: PLC0415

        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        await stop.wait()


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        RateLimit.parse(args.limit)
        for spec in _pairs(args.model_limits).values():
            RateLimit.parse(spec)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        import uvloop  # noqa: PLC0415
    except ImportError:
        runner: Any = asyncio.run
    else:
        runner = uvloop.run
    with contextlib.suppress(KeyboardInterrupt):
        runner(_serve(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
