"""Rotation, cool-down, retry and streaming behaviour, end to end over real sockets."""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections import Counter

import aiohttp
import openai
import pytest

from sideproxy.diag import run_diag
from sideproxy.fake_provider import FakeProvider
from sideproxy.pool import KeyHealth, Transition
from sideproxy.proxy import ProxySettings
from tests.proxy.conftest import (
    SECRETS,
    K,
    Proxy,
    StartProxy,
    eventually,
    keys,
    manifests,
    snapshot,
)

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


async def _chat(
    http: aiohttp.ClientSession, proxy: Proxy, **extra: object
) -> aiohttp.ClientResponse:
    resp = await http.post(proxy.base_url + "/chat/completions", json={**CHAT, **extra})
    await resp.read()
    return resp


async def test_sequential_requests_rotate_over_keys(proxy: Proxy) -> None:
    async with openai.AsyncOpenAI(base_url=proxy.base_url, api_key="x", max_retries=0) as client:
        served = []
        for _ in range(6):
            raw = await client.chat.completions.with_raw_response.create(**CHAT)  # type: ignore[call-overload]
            served.append(raw.headers["x-fake-key"])
    assert all(a != b for a, b in itertools.pairwise(served))
    assert Counter(served) == {K(f"key-{i}", SECRETS[i - 1]).fp: 2 for i in (1, 2, 3)}


async def test_traffic_spreads_by_weight(
    fake: FakeProvider, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    heavy, light = K("heavy", SECRETS[0], weight=3), K("light", SECRETS[1], weight=1)
    proxy = await start_proxy(snapshot(manifests({"custom": fake.base_url}, [heavy, light])))
    for _ in range(40):
        assert (await _chat(http, proxy)).status == 200
    assert fake.stats() == {heavy.fp: 30, light.fp: 10}


async def test_rate_limited_key_rests_until_its_deadline(
    fake: FakeProvider, proxy: Proxy, http: aiohttp.ClientSession
) -> None:
    first = K("key-1", SECRETS[0])
    fake.add_faults(first.value, {"status": 429, "retry_after": 30})
    before = time.time()
    resp = await _chat(http, proxy)
    assert resp.status == 200  # the 429 was retried on the next key at once
    assert resp.headers["x-fake-key"] != first.fp
    # The 429 was about model "m": key-1 rests for that model, until the provider's deadline.
    until = proxy.cooling("key-1", CHAT["model"])
    assert until is not None
    assert before + 29 <= until <= time.time() + 30.5
    for _ in range(10):
        assert (await _chat(http, proxy)).status == 200
    assert fake.stats()[first.fp] == 1  # never tried again while cooling


async def test_cooldown_ends_at_the_provider_deadline(
    fake: FakeProvider, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    only = K("only", SECRETS[0])
    proxy = await start_proxy(snapshot(manifests({"custom": fake.base_url}, [only])))
    fake.add_faults(only.value, {"status": 429, "retry_after": 0.3})
    assert (await _chat(http, proxy)).status == 429
    assert (await _chat(http, proxy)).status == 429  # resting: not even sent upstream
    assert fake.stats()[only.fp] == 1
    await asyncio.sleep(0.6)
    assert (await _chat(http, proxy)).status == 200


async def test_every_key_cooling_answers_429_with_retry_after(
    fake: FakeProvider, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    a, b = K("a", SECRETS[0]), K("b", SECRETS[1])
    proxy = await start_proxy(snapshot(manifests({"custom": fake.base_url}, [a, b])))
    fake.add_faults(a.value, {"status": 429, "retry_after": 7})
    fake.add_faults(b.value, {"status": 429, "retry_after": 9})
    # Both keys answer 429: the client gets the provider's last 429, with the pool's Retry-After.
    resp = await _chat(http, proxy)
    assert resp.status == 429
    assert resp.headers["Retry-After"] in ("6", "7")
    assert (await resp.json())["error"]["code"] == "rate_limit_exceeded"  # the provider's body
    # Now no key is available at all: the proxy's own 429, same deadline.
    resp = await _chat(http, proxy)
    assert resp.status == 429
    assert resp.headers["Retry-After"] in ("6", "7")
    body = await resp.json()
    assert body["error"]["code"] == "no_key_available"
    assert body["error"]["type"] == "rate_limit_error"
    assert set(body["error"]) == {"message", "type", "code"}
    recovery = proxy.pool.next_recovery("custom", time.time(), model=CHAT["model"])
    assert recovery is not None
    assert int(resp.headers["Retry-After"]) == max(1, math.ceil(recovery - time.time()))
    assert fake.stats() == {a.fp: 1, b.fp: 1}


async def test_revoked_key_stays_out(
    fake: FakeProvider, proxy: Proxy, http: aiohttp.ClientSession
) -> None:
    second = K("key-2", SECRETS[1])
    fake.revoke(second.value)
    for _ in range(12):
        assert (await _chat(http, proxy)).status == 200
    assert fake.stats()[second.fp] == 1  # one 401, then never again
    assert proxy.status("key-2").health is KeyHealth.REVOKED


async def test_server_errors_and_broken_bodies_are_retried(
    fake: FakeProvider, proxy: Proxy, http: aiohttp.ClientSession
) -> None:
    fake.add_faults(SECRETS[0], 503)
    fake.add_faults(SECRETS[1], "reset")
    resp = await _chat(http, proxy)
    assert resp.status == 200
    assert resp.headers["x-fake-key"] == K("k", SECRETS[2]).fp
    assert fake.stats() == {K("k", s).fp: 1 for s in SECRETS[:3]}


async def test_attempts_are_bounded_and_the_last_answer_is_replayed(
    fake: FakeProvider, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    docs = manifests({"custom": fake.base_url}, keys(4), spec={"retry": {"maxAttempts": 2}})
    proxy = await start_proxy(snapshot(docs))
    for secret in SECRETS:
        fake.add_faults(secret, 500)
    resp = await _chat(http, proxy)
    assert resp.status == 500
    assert (await resp.json())["error"]["message"] == "fake fault: status 500"
    assert sum(fake.stats().values()) == 2


async def test_hanging_key_times_out_and_the_next_key_answers(
    fake: FakeProvider, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    docs = manifests(
        {"custom": fake.base_url}, keys(2), spec={"timeouts": {"firstByteSeconds": 0.3}}
    )
    proxy = await start_proxy(snapshot(docs))
    fake.add_faults(SECRETS[0], "hang")
    resp = await _chat(http, proxy)
    assert resp.status == 200
    assert resp.headers["x-fake-key"] == K("k", SECRETS[1]).fp


async def test_unreachable_provider_is_a_502_in_the_error_shape(
    start_proxy: StartProxy, http: aiohttp.ClientSession, unused_tcp_port: int
) -> None:
    dead = f"http://127.0.0.1:{unused_tcp_port}/v1"
    proxy = await start_proxy(snapshot(manifests({"custom": dead}, keys(2))))
    resp = await _chat(http, proxy)
    assert resp.status == 502
    body = await resp.json()
    assert body["error"]["code"] == "upstream_unreachable"
    assert body["error"]["type"] == "proxy_error"


async def test_all_timeouts_is_a_504(
    fake: FakeProvider, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    docs = manifests(
        {"custom": fake.base_url},
        keys(1),
        spec={"timeouts": {"firstByteSeconds": 0.2}, "retry": {"maxAttempts": 1}},
    )
    proxy = await start_proxy(snapshot(docs))
    fake.add_faults(SECRETS[0], "hang")
    resp = await _chat(http, proxy)
    assert resp.status == 504
    assert (await resp.json())["error"]["code"] == "upstream_timeout"


async def test_first_chunk_reaches_the_client_while_the_provider_is_still_sending(
    fake: FakeProvider, proxy: Proxy, http: aiohttp.ClientSession
) -> None:
    fake.configure(stream_chunks=5, stream_interval=0.3)
    async with http.post(
        proxy.base_url + "/chat/completions", json={**CHAT, "stream": True}
    ) as resp:
        assert resp.status == 200
        assert resp.content_type == "text/event-stream"
        first = await resp.content.readuntil(b"\n\n")
        assert first.startswith(b"data: {")
        assert fake.active_streams == 1  # the provider has not finished...
        assert fake.completed_streams == 0
        rest = await resp.read()  # ...and the rest follows as it is produced
    assert rest.endswith(b"data: [DONE]\n\n")
    assert fake.completed_streams == 1


async def test_stream_failure_after_first_byte_ends_the_stream_without_retry(
    fake: FakeProvider, proxy: Proxy
) -> None:
    fake.add_faults(SECRETS[0], "reset:2")
    async with openai.AsyncOpenAI(base_url=proxy.base_url, api_key="x", max_retries=0) as client:
        stream = await client.chat.completions.create(**CHAT, stream=True)  # type: ignore[call-overload]
        received: list[object] = []

        async def consume() -> None:
            async for chunk in stream:
                received.append(chunk)

        with pytest.raises(openai.APIError, match="upstream stream broke off"):
            await consume()
    assert len(received) == 2
    assert sum(fake.stats().values()) == 1  # no duplicate output from another key


async def test_provider_error_frame_passes_through(fake: FakeProvider, proxy: Proxy) -> None:
    fake.add_faults(SECRETS[0], "error_frame:1")
    async with openai.AsyncOpenAI(base_url=proxy.base_url, api_key="x", max_retries=0) as client:
        stream = await client.chat.completions.create(**CHAT, stream=True)  # type: ignore[call-overload]
        with pytest.raises(openai.APIError, match="fake stream error"):
            async for _ in stream:
                pass


async def test_client_disconnect_cancels_the_upstream_stream(
    fake: FakeProvider, proxy: Proxy, http: aiohttp.ClientSession
) -> None:
    fake.configure(stream_chunks=50, stream_interval=0.1)
    resp = await http.post(proxy.base_url + "/chat/completions", json={**CHAT, "stream": True})
    await resp.content.readuntil(b"\n\n")
    assert fake.active_streams == 1
    resp.close()  # the client goes away mid-stream
    await eventually(lambda: fake.active_streams == 0, within=3)
    assert fake.completed_streams == 0
    metrics = await (await http.get(proxy.url + "/metrics")).text()
    assert (
        'sideproxy_upstream_requests_total{key="key-1",provider="custom",status="cancelled"} 1.0'
        in metrics
    )
    assert 'sideproxy_requests_total{provider="custom",status="499"} 1.0' in metrics


async def test_on_transitions_hook_sees_cooldowns(
    fake: FakeProvider, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    seen: list[Transition] = []
    proxy = await start_proxy(
        snapshot(manifests({"custom": fake.base_url}, keys(2))), on_transitions=seen.extend
    )
    fake.add_faults(SECRETS[0], {"status": 429, "retry_after": 5})
    assert (await _chat(http, proxy)).status == 200
    assert [(t.name, t.reason, t.health) for t in seen] == [
        ("key-1", "RateLimited", KeyHealth.COOLING)
    ]
    assert seen[0].until is not None
    assert seen[0].fingerprint == K("k", SECRETS[0]).fp


async def test_real_rate_limit_headers_keep_traffic_flowing(
    start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    async with FakeProvider(SECRETS[:3], limit="3/1s") as fake:
        proxy = await start_proxy(snapshot(manifests({"custom": fake.base_url}, keys(3))))
        statuses = Counter([(await _chat(http, proxy)).status for _ in range(9)])
    assert statuses == {200: 9}


async def test_100_concurrent_requests_through_diag_spread_by_weight(
    fake: FakeProvider, start_proxy: StartProxy
) -> None:
    pool_keys = [K("w2", SECRETS[0], weight=2), K("w1a", SECRETS[1]), K("w1b", SECRETS[2])]
    proxy = await start_proxy(
        snapshot(manifests({"custom": fake.base_url}, pool_keys)),
        ProxySettings(access_log=False),
    )
    result = await run_diag(proxy.url, requests=100, concurrency=100)
    assert result.statuses == {"200": 100}
    assert result.failed == 0
    assert result.per_key is not None
    assert sum(result.per_key.values()) == 100
    assert abs(result.per_key["w2"] - 50) <= 2
    assert abs(result.per_key["w1a"] - 25) <= 2
    assert abs(result.per_key["w1b"] - 25) <= 2


async def test_403_is_asked_of_one_other_key_and_never_revokes(
    fake: FakeProvider, proxy: Proxy, http: aiohttp.ClientSession
) -> None:
    # The 403 decision (docs/reliability.md; tests/reliability/test_forbidden.py has the rest).
    fake.add_faults(SECRETS[0], 403)
    resp = await _chat(http, proxy)
    assert resp.status == 200  # another key served it
    assert sum(fake.stats().values()) == 2
    assert proxy.status("key-1").health is KeyHealth.READY


async def test_idle_stream_timeout_ends_the_stream_with_an_error_frame(
    fake: FakeProvider, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    docs = manifests(
        {"custom": fake.base_url}, keys(1), spec={"timeouts": {"idleStreamSeconds": 0.2}}
    )
    proxy = await start_proxy(snapshot(docs))
    fake.configure(stream_chunks=3, stream_interval=0.6)
    async with http.post(
        proxy.base_url + "/chat/completions", json={**CHAT, "stream": True}
    ) as resp:
        assert resp.status == 200
        body = (await resp.read()).decode()
    frames = [line for line in body.splitlines() if line.startswith("data: ")]
    assert len(frames) == 2  # the first chunk, then the proxy's error frame
    assert '"code": "upstream_timeout"' in frames[-1]
    assert "[DONE]" not in body
