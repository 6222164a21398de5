"""10,000 mixed requests (faults, streams, clients leaving, bad input) and nothing leaks.

The proxy runs in this process (so its tasks can be counted); the fake provider runs in its
own (its sockets are not the proxy's, and it gets the second core). After a warm-up of 1,000
requests and after the 10,000, the test waits for quiet (no request in flight, pooled upstream
connections past their short keep-alive) and compares: asyncio tasks, open file descriptors and
sockets of this process, live Python objects and RSS; every acquired key released; every
request answered.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections import Counter
from typing import Any

import aiohttp
import pytest
from yarl import URL

from sideproxy.proxy import METRICS, ProxySettings
from tests.proxy.conftest import SECRETS, StartProxy, keys, manifests, snapshot
from tests.reliability.conftest import (
    CHAT,
    STREAM,
    PoolSpy,
    fake_process,
    live_objects,
    open_fds,
    open_sockets,
    rss_kib,
    settle,
)

REQUESTS = int(os.environ.get("SIDEPROXY_LEAK_REQUESTS", "10000"))
WARMUP = 1000
CONCURRENCY = 48
SPEC = {
    "timeouts": {"firstByteSeconds": 0.5, "idleStreamSeconds": 2},
    "breaker": {"failureThreshold": 5, "backoffSeconds": 0.3, "maxBackoffSeconds": 1},
    "cooldown": {"defaultSeconds": 0.5},
}
SETTINGS = ProxySettings(access_log=False, upstream_keepalive=0.4)
# Per key, cycled: 1 in 4 requests meets a fault; a 429 is rare enough to leave keys available.
SCRIPT: list[Any] = [
    *(["delay:0"] * 8), 500, "reset", *(["delay:0"] * 8), "invalid_json", 503,
    *(["delay:0"] * 8), "stop_early:2", "reset:2", *(["delay:0"] * 8), "error_frame:1", 502,
    *(["delay:0"] * 8), "hang", "delay:0.05", *(["delay:0"] * 8), 504, "reset:1",
]  # fmt: skip
RARE_429 = {"status": 429, "headers": {"retry-after-ms": "500"}}


async def _one(session: aiohttp.ClientSession, base: str, i: int) -> str:
    """Request ``i`` of the mix; returns a label for what the client saw."""
    kind = i % 20
    if kind < 11 or kind == 19:
        path, body = (
            ("/v1/embeddings", {"input": "x"}) if kind == 19 else ("/v1/chat/completions", CHAT)
        )
        async with session.post(base + path, json=body) as resp:
            data = await resp.read()
            if resp.status != 200:
                _shaped(data)
                # Only a request whose every attempt met a fault may get here: the last 5xx, or
                # a 429 when every key happened to be cooling or open at once.
                return "spent" if resp.status >= 500 or resp.status == 429 else str(resp.status)
            return "200"
    if kind < 15:
        async with session.post(base + "/v1/chat/completions", json=STREAM) as resp:
            data = await resp.read()
            if resp.status != 200:
                _shaped(data)
                # As above: every attempt met a fault before the stream's first byte (a 5xx,
                # a reset, a hang past the first-byte timeout), so the last one is answered.
                spent = resp.status >= 500 or resp.status == 429
                return "spent-stream" if spent else str(resp.status)
            return "200-stream" if data.endswith(b"data: [DONE]\n\n") else "200-stream-error"
    if kind == 15:  # leaves after the first chunk
        async with session.post(base + "/v1/chat/completions", json=STREAM) as resp:
            if resp.status == 200:
                await resp.content.readuntil(b"\n\n")
            resp.close()
            return "left"
    if kind == 16:
        async with session.post(
            base + "/v1/chat/completions",
            data=b'{"model": ',
            headers={"Content-Type": "application/json"},
        ) as resp:
            assert _shaped(await resp.read())["code"] == "invalid_json"
            return str(resp.status)
    if kind == 17:
        async with session.get(URL(base + "/v1/%2e%2e/secrets", encoded=True)) as resp:
            assert _shaped(await resp.read())["code"] == "invalid_path"
            return str(resp.status)
    async with session.get(base + "/nope/v1/models") as resp:
        assert _shaped(await resp.read())["code"] == "unknown_provider"
        return str(resp.status)


def _shaped(body: bytes) -> dict[str, Any]:
    error = json.loads(body)["error"]
    assert isinstance(error["message"], str)
    assert error.get("code") != "internal_error", error  # the proxy never crashed
    return error  # type: ignore[no-any-return]


async def _run(base: str, start: int, count: int) -> Counter[str]:
    seen: Counter[str] = Counter()
    todo = iter(range(start, start + count))
    connector = aiohttp.TCPConnector(limit=CONCURRENCY)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def worker() -> None:
            for i in todo:
                try:
                    seen[await _one(session, base, i)] += 1
                except aiohttp.ClientError as exc:
                    seen[f"client-error {type(exc).__name__}"] += 1

        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return seen


async def _quiet(spy: PoolSpy) -> dict[str, int]:
    await settle(lambda: spy.in_flight == 0, within=10)
    await asyncio.sleep(1.0)  # > upstream keep-alive (0.4 s): pooled connections closed
    return {
        "tasks": len(asyncio.all_tasks()),
        "fds": open_fds(),
        "sockets": open_sockets(),
        "objects": live_objects(),
        "rss_kib": rss_kib(),
    }


@pytest.mark.timeout(120)
async def test_ten_thousand_mixed_requests_leak_nothing(start_proxy: StartProxy) -> None:
    async with fake_process("--keys", ",".join(SECRETS[:4])) as fake:
        await fake.configure(
            faults={s: SCRIPT * 60 + [RARE_429] + SCRIPT * 60 for s in SECRETS[:4]}
        )
        docs = manifests({"custom": fake.base_url}, keys(4), spec=SPEC)
        proxy = await start_proxy(snapshot(docs), SETTINGS)
        spy = PoolSpy(proxy.pool)

        warm = await _run(proxy.url, 0, WARMUP)
        assert sum(warm.values()) == WARMUP
        before = await _quiet(spy)
        seen = await _run(proxy.url, WARMUP, REQUESTS)
        after = await _quiet(spy)
        upstream = await fake.stats()

    # Every request was answered, and answered sensibly: a non-streamed request that met a
    # fault was retried to a 200 (a handful met a fault on every one of their 4 attempts: they
    # got the last answer, a 5xx in the error shape); a stream that broke after its first byte
    # ended with an error event (never retried); bad input got its 4xx and never went upstream.
    assert sum(seen.values()) == REQUESTS
    expected = {
        *("200", "spent", "200-stream", "200-stream-error", "spent-stream"),
        *("400", "404", "left"),
    }
    assert set(seen) <= expected, seen
    assert seen["200"] + seen["spent"] == 12 * REQUESTS // 20
    streams = seen["200-stream"] + seen["200-stream-error"] + seen["spent-stream"]
    assert streams == 4 * REQUESTS // 20
    assert seen["spent"] + seen["spent-stream"] <= 16 * REQUESTS // 20 // 500, seen  # ≤ 0.2%
    assert seen["400"] == 2 * REQUESTS // 20
    assert seen["404"] == REQUESTS // 20
    assert seen["left"] == REQUESTS // 20
    assert sum(upstream.values()) >= 0.75 * REQUESTS  # the mix really went upstream
    print(f"\nleak check: {dict(seen)}; upstream attempts {sum(upstream.values())}")
    print(f"before {before}\nafter  {after}")

    # Nothing in flight, every key given back.
    assert spy.acquired == spy.released
    assert proxy.app[METRICS].inflight == 0
    # Nothing left behind: tasks, descriptors, sockets exactly as before; memory flat.
    assert after["tasks"] <= before["tasks"], (before, after)
    assert after["fds"] <= before["fds"], (before, after)
    assert after["sockets"] <= before["sockets"], (before, after)
    assert after["objects"] - before["objects"] <= 2000, (before, after)
    assert after["rss_kib"] - before["rss_kib"] <= 12 * 1024, (before, after)
