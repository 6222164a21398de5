"""Upstream faults, one per row: what the client sees, how many upstream attempts, key state.

Every row runs against a real fake provider and a real proxy on 127.0.0.1 with three keys of
one provider; the fault is scripted on ``key-1``, which a fresh pool tries first. The fake
counts upstream attempts, ``/sideproxy/status`` says what the key learnt. Rows with a stream
prove that nothing is retried once bytes reached the client (one upstream attempt).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any

import aiohttp
import openai
import pytest

from sideproxy.fake_provider import FakeProvider
from sideproxy.models import fingerprint
from sideproxy.pool import Outcome
from tests.proxy.conftest import SECRETS, K, Proxy, StartProxy, keys, manifests, snapshot
from tests.reliability.conftest import CHAT, STREAM, PoolSpy, error_of, key_states, settle

# Small numbers so every row is quick and every cool-down is told apart from the others.
SPEC = {
    "timeouts": {"firstByteSeconds": 0.5, "idleStreamSeconds": 0.5},
    "cooldown": {"defaultSeconds": 7, "maxSeconds": 900},
    "breaker": {"failureThreshold": 3, "backoffSeconds": 0.4, "maxBackoffSeconds": 2},
}
KEY1, KEY2 = fingerprint(SECRETS[0]), fingerprint(SECRETS[1])


def _http_date(seconds: float) -> str:
    return format_datetime(datetime.fromtimestamp(time.time() + seconds, UTC), usegmt=True)


def _rfc3339(seconds: float) -> str:
    return datetime.fromtimestamp(time.time() + seconds, UTC).isoformat().replace("+00:00", "Z")


def _limited(headers: dict[str, str]) -> dict[str, Any]:
    return {"status": 429, "headers": headers}


@dataclass(frozen=True)
class Row:
    fault: Any  # a thunk, so dates are computed when the row runs
    stream: bool = False
    status: int = 200  # what the client sees
    attempts: int = 2  # upstream attempts the fake counted
    served_by: str | None = KEY2  # x-fake-key of the answer
    health: str = "ready"  # key-1 afterwards
    failures: int = 0  # key-1's consecutive failures afterwards
    cooldown: tuple[float, float] | None = None  # key-1's cool-down, seconds from the request
    frames: tuple[str, ...] = ()  # stream: expected error codes of the final frames


ROWS: dict[str, Row] = {
    # --- non-streaming: everything is retried on the next key before any byte is sent
    "reset mid-body": Row(lambda: "reset", failures=1),
    "hung response (no bytes)": Row(lambda: "hang", failures=1),
    "slow headers within first-byte timeout": Row(lambda: "delay:0.2", attempts=1, served_by=KEY1),
    "slow headers past first-byte timeout": Row(lambda: "delay:1.5", failures=1),
    "200 with invalid JSON": Row(lambda: "invalid_json", failures=1),
    "500": Row(lambda: 500, failures=1),
    "502": Row(lambda: 502, failures=1),
    "503": Row(lambda: 503, failures=1),
    "504": Row(lambda: 504, failures=1),
    "401 (key rejected)": Row(lambda: 401, health="revoked"),
    # --- 429 in every header form: the cool-down comes from the provider's own words
    "429 without any header": Row(lambda: 429, health="cooling", cooldown=(6.5, 7.5)),
    "429 retry-after seconds": Row(
        lambda: {"status": 429, "retry_after": 12}, health="cooling", cooldown=(11.5, 12.5)
    ),
    "429 retry-after HTTP-date": Row(
        lambda: _limited({"retry-after": _http_date(20)}), health="cooling", cooldown=(18, 21)
    ),
    "429 retry-after-ms": Row(
        lambda: _limited({"retry-after-ms": "2500"}), health="cooling", cooldown=(2.3, 2.7)
    ),
    "429 x-ratelimit-reset-requests (Go duration)": Row(
        lambda: _limited(
            {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "6m0s"}
        ),
        health="cooling",
        cooldown=(359.5, 360.5),
    ),
    "429 x-ratelimit-reset-tokens (Go duration)": Row(
        lambda: _limited(
            {"x-ratelimit-remaining-tokens": "0", "x-ratelimit-reset-tokens": "1m30s"}
        ),
        health="cooling",
        cooldown=(89.5, 90.5),
    ),
    "429 anthropic RFC 3339 reset": Row(
        lambda: _limited(
            {
                "anthropic-ratelimit-requests-remaining": "0",
                "anthropic-ratelimit-requests-reset": _rfc3339(30),
            }
        ),
        health="cooling",
        cooldown=(28.5, 30.5),
    ),
    "429 retry-after absurd (capped)": Row(
        lambda: {"status": 429, "retry_after": 10**12}, health="cooling", cooldown=(899.5, 900.5)
    ),
    "429 retry-after 0 (floored)": Row(
        lambda: _limited({"retry-after": "0"}), health="cooling", cooldown=(0.4, 0.6)
    ),
    "429 retry-after garbage (default)": Row(
        lambda: _limited({"retry-after": "soon, maybe"}), health="cooling", cooldown=(6.5, 7.5)
    ),
    # --- streams: the first byte has gone out, so no retry; the client is told clearly
    "stream reset mid-body": Row(
        lambda: "reset:2",
        stream=True,
        attempts=1,
        served_by=KEY1,
        failures=1,
        frames=("upstream_stream_error",),
    ),
    "stream stops without [DONE]": Row(
        lambda: "stop_early:2",
        stream=True,
        attempts=1,
        served_by=KEY1,
        failures=1,
        frames=("upstream_stream_incomplete",),
    ),
    "stream sends an error frame inside a 200": Row(
        lambda: "error_frame:1",
        stream=True,
        attempts=1,
        served_by=KEY1,
        failures=1,
        frames=("",),  # the provider's own error frame (code null), nothing added after it
    ),
    "stream hangs before the first byte": Row(lambda: "hang", stream=True, failures=1),
    "stream with 503 before the first byte": Row(lambda: 503, stream=True, failures=1),
}


def _frames(body: bytes) -> list[dict[str, Any]]:
    out = []
    for line in body.decode().splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            out.append(json.loads(line[6:]))
    return out


@pytest.fixture
async def three(fake: FakeProvider, start_proxy: StartProxy) -> Proxy:
    return await start_proxy(snapshot(manifests({"custom": fake.base_url}, keys(3), spec=SPEC)))


@pytest.mark.parametrize("name", list(ROWS))
async def test_fault(
    name: str, fake: FakeProvider, three: Proxy, http: aiohttp.ClientSession
) -> None:
    row = ROWS[name]
    spy = PoolSpy(three.pool)
    fake.add_faults(SECRETS[0], row.fault())
    before = time.time()
    async with http.post(
        three.base_url + "/chat/completions", json=STREAM if row.stream else CHAT
    ) as resp:
        body = await resp.read()
    assert resp.status == row.status, body
    assert resp.headers.get("x-fake-key") == row.served_by
    # Upstream attempts, counted at the provider: a stream is never tried twice.
    assert sum(fake.stats().values()) == row.attempts, fake.stats()
    if row.stream and row.status == 200:
        assert resp.content_type == "text/event-stream"
        frames = _frames(body)
        errors = [f["error"] for f in frames if "error" in f]
        assert [e.get("code") or "" for e in errors] == list(row.frames)
        assert b"[DONE]" not in body or not row.frames
        if row.frames and row.frames[0]:
            error_of(json.dumps({"error": errors[-1]}))  # the proxy's frame: OpenAI shape
    else:
        assert json.loads(body)["object"] == "chat.completion"
    state = (await key_states(http, three.url))["key-1"]
    assert state["failures"] == row.failures
    until = state["until"]
    if row.health == "cooling":
        # A 429 about the request's model cools (key-1, that model); the key stays ready.
        assert state["health"] == "ready"
        [(model, until)] = state["cooling"]
        assert model == CHAT["model"]
    else:
        assert state["health"] == row.health
    if row.cooldown is None:
        assert until is None
    else:
        low, high = row.cooldown
        assert before + low <= until <= time.time() + high
    await settle(lambda: spy.in_flight == 0)


async def test_sdk_sees_a_truncated_stream_as_an_error(fake: FakeProvider, three: Proxy) -> None:
    fake.add_faults(SECRETS[0], "stop_early:2")
    async with openai.AsyncOpenAI(base_url=three.base_url, api_key="x", max_retries=0) as client:
        stream = await client.chat.completions.create(**STREAM)
        got: list[object] = []

        async def consume() -> None:
            async for chunk in stream:
                got.append(chunk)

        with pytest.raises(openai.APIError, match="ended before its final event"):
            await consume()
    assert len(got) == 2
    assert sum(fake.stats().values()) == 1


async def test_every_key_failing_replays_the_last_answer(
    fake: FakeProvider, three: Proxy, http: aiohttp.ClientSession
) -> None:
    for secret in SECRETS[:3]:
        fake.add_faults(secret, 503)
    async with http.post(three.base_url + "/chat/completions", json=CHAT) as resp:
        body = await resp.read()
    assert resp.status == 503
    assert json.loads(body)["error"]["message"] == "fake fault: status 503"
    assert sum(fake.stats().values()) == 3  # one attempt per key, none twice


async def test_every_key_hanging_is_a_504_in_the_error_shape(
    fake: FakeProvider, three: Proxy, http: aiohttp.ClientSession
) -> None:
    for secret in SECRETS[:3]:
        fake.add_faults(secret, "hang")
    started = time.monotonic()
    async with http.post(three.base_url + "/chat/completions", json=CHAT) as resp:
        body = await resp.read()
    assert resp.status == 504
    assert error_of(body)["code"] == "upstream_timeout"
    assert time.monotonic() - started < 4.0  # 3 x 0.5 s first-byte timeouts, bounded
    assert sum(fake.stats().values()) == 3


async def test_every_key_answering_broken_json_is_a_502(
    fake: FakeProvider, three: Proxy, http: aiohttp.ClientSession
) -> None:
    for secret in SECRETS[:3]:
        fake.add_faults(secret, "invalid_json")
    async with http.post(three.base_url + "/chat/completions", json=CHAT) as resp:
        body = await resp.read()
    assert resp.status == 502
    assert error_of(body)["code"] == "upstream_invalid_response"


async def test_connection_refused_fails_fast_and_spares_other_providers(
    fake: FakeProvider,
    start_proxy: StartProxy,
    http: aiohttp.ClientSession,
    unused_tcp_port: int,
) -> None:
    """A provider whose base URL is a closed port: 502, each of its keys tried once, breaker
    opens after the threshold; a second provider of the same pool is untouched."""
    dead = f"http://127.0.0.1:{unused_tcp_port}/v1"
    pool_keys = [*keys(2), K("key-3", SECRETS[2], provider="openai")]
    docs = manifests({"custom": dead, "openai": fake.base_url}, pool_keys, spec=SPEC)
    proxy = await start_proxy(snapshot(docs))
    spy = PoolSpy(proxy.pool)
    for attempt in range(3):
        async with http.post(proxy.base_url + "/chat/completions", json=CHAT) as resp:
            error = error_of(await resp.read())
        assert resp.status == 502
        assert (error["type"], error["code"]) == ("proxy_error", "upstream_unreachable")
        states = await key_states(http, proxy.url)
        expected = "open" if attempt == 2 else "ready"
        assert states["key-1"]["health"] == states["key-2"]["health"] == expected
        async with http.post(proxy.url + "/openai/v1/chat/completions", json=CHAT) as ok:
            assert ok.status == 200
    # Each dead key dialled once per request, never twice; and released each time.
    assert spy.outcomes[Outcome.CONNECT_ERROR] == 6
    assert spy.in_flight == 0
    # Both breakers open: the dead provider is not even dialled; 429 with Retry-After.
    async with http.post(proxy.base_url + "/chat/completions", json=CHAT) as resp:
        assert resp.status == 429
        assert error_of(await resp.read())["code"] == "no_key_available"
        assert resp.headers["Retry-After"] == "1"
    assert spy.outcomes[Outcome.CONNECT_ERROR] == 6  # breakers open: not even dialled
    assert fake.stats() == {fingerprint(SECRETS[2]): 3}
