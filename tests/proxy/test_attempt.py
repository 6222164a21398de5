"""Every acquire is matched by exactly one release, on every path (issue 15 item 10).

These drive ``Forwarder.handle`` through in-memory transports (the ``_exchange`` protocols),
so a test can stop the request at the exact step it names: while sending, while a held 403
waits, mid-stream. The same paths over real sockets are in tests/reliability (PoolSpy).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from sideproxy.pool import ManagedCreditPool, Outcome
from sideproxy.proxy import ProxySettings
from sideproxy.proxy._attempt import Attempt
from sideproxy.proxy._compile import compile_snapshot
from sideproxy.proxy._exchange import ClientGone, Headers, Inbound, RawHeaders
from sideproxy.proxy._forward import Forwarder
from sideproxy.proxy._metrics import Metrics
from tests.proxy.conftest import keys, manifests, snapshot
from tests.reliability.conftest import PoolSpy

BODY = b'{"model": "m", "messages": []}'


class _Response:
    def __init__(self, status: int, chunks: list[bytes], sse: bool = False) -> None:
        self.status = status
        self.reason = ""
        ctype = b"text/event-stream" if sse else b"application/json"
        self.raw_headers: RawHeaders = [(b"Content-Type", ctype)]
        self.headers = Headers(self.raw_headers)
        self.content_length = None if sse else sum(map(len, chunks))
        self.content_type = ctype.decode()
        self._chunks = chunks
        self.ended = ""

    async def read(self, limit: int) -> bytes | None:
        return b"".join(self._chunks)

    async def chunks(self, idle_timeout: float) -> AsyncIterator[bytes]:
        for chunk in self._chunks:
            yield chunk

    def release(self) -> None:
        self.ended += "released"

    def close(self) -> None:
        self.ended += "closed"


class _Client:
    """Answers from a script, one per send: a _Response, or "hang" (never answers)."""

    def __init__(self, *script: Any) -> None:
        self.script = list(script)
        self.hanging = asyncio.Event()  # set when a send reached a "hang" step

    async def send(self, *_: Any, **__: Any) -> Any:
        step = self.script.pop(0)
        if step == "hang":
            self.hanging.set()
            await asyncio.Event().wait()
        return step


class _Out:
    def __init__(self, gone_after: int | None = None) -> None:
        self.status = 0
        self.writes = 0
        self.gone_after = gone_after
        self.started = False

    def closed(self) -> bool:
        return False

    async def respond(self, status: int, headers: RawHeaders, body: bytes) -> None:
        self.status = status

    async def start(self, status: int, headers: RawHeaders, length: int | None = None) -> None:
        self.status, self.started = status, True

    async def write(self, chunk: bytes) -> None:
        if self.gone_after is not None and self.writes >= self.gone_after:
            raise ClientGone
        self.writes += 1

    async def finish(self) -> None:
        pass

    def abort(self) -> None:
        pass


def _forwarder(client: _Client, n_keys: int = 3) -> tuple[Forwarder, PoolSpy]:
    snap = snapshot(manifests({"custom": "http://127.0.0.1:9/v1"}, keys(n_keys)))
    settings = ProxySettings()
    compiled = compile_snapshot(snap, settings, 0.0)
    pool = ManagedCreditPool()
    pool.configure(compiled.keys, compiled.policy)
    forwarder = Forwarder(settings, pool, Metrics(pool))
    forwarder.compiled = compiled
    forwarder.client = client  # type: ignore[assignment]
    return forwarder, PoolSpy(pool)


def _inbound() -> Inbound:
    headers = Headers([(b"Content-Type", b"application/json")])
    return Inbound("POST", "/v1/chat/completions", "", headers, BODY)


def test_release_is_idempotent() -> None:
    calls: list[Outcome] = []
    attempt = Attempt(object(), lambda key, outcome, *_: calls.append(outcome))  # type: ignore[arg-type]
    attempt.release(Outcome.OK, "200")
    attempt.release(Outcome.SERVER_ERROR, "500")
    attempt.abandon()
    assert calls == [Outcome.OK]


async def test_cancelled_while_sending_releases_once_as_cancelled() -> None:
    client = _Client("hang")
    forwarder, spy = _forwarder(client)
    task = asyncio.create_task(forwarder.handle(_inbound(), _Out()))  # type: ignore[arg-type]
    await client.hanging.wait()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert (spy.acquired, spy.released) == (1, 1)
    assert spy.outcomes == {Outcome.CANCELLED: 1}


async def test_cancelled_while_a_403_is_held_releases_both_once() -> None:
    client = _Client(_Response(403, [b'{"error": {"code": "nope"}}']), "hang")
    forwarder, spy = _forwarder(client)
    task = asyncio.create_task(forwarder.handle(_inbound(), _Out()))  # type: ignore[arg-type]
    await client.hanging.wait()  # the second key is being asked; the first one's 403 is held
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert (spy.acquired, spy.released) == (2, 2)
    assert spy.outcomes == {Outcome.CANCELLED: 2}


async def test_a_client_gone_mid_stream_releases_once_and_closes_upstream() -> None:
    frames = [b"data: {}\n\n"] * 5
    resp = _Response(200, frames, sse=True)
    forwarder, spy = _forwarder(_Client(resp))
    out = _Out(gone_after=2)
    await forwarder.handle(_inbound(), out)  # type: ignore[arg-type]
    assert (spy.acquired, spy.released) == (1, 1)
    assert spy.outcomes == {Outcome.CANCELLED: 1}
    assert resp.ended == "closed"
    assert forwarder.metrics.client_counts == {("custom", "499"): 1}


async def test_every_key_failing_releases_each_once() -> None:
    script = [_Response(500, [b'{"error": {}}']) for _ in range(3)]
    forwarder, spy = _forwarder(_Client(*script))
    out = _Out()
    await forwarder.handle(_inbound(), out)  # type: ignore[arg-type]
    assert out.status == 500
    assert (spy.acquired, spy.released) == (3, 3)
    assert spy.outcomes == {Outcome.SERVER_ERROR: 3}
