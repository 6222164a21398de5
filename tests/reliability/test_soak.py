"""A soak: sustained concurrent traffic through a proxy subprocess while keys cool down and
recover, a key is rotated in the pool file, and the proxy itself is restarted.

The clients retry connection errors only (connection refused or dropped while the proxy
restarts), nothing else: every other answer counts. The goal is zero client-visible errors,
since a healthy key was available at every moment, and a flat RSS for each proxy process.

Short by default (20 s, 64 clients). The long version::

    SIDEPROXY_SOAK_SECONDS=300 SIDEPROXY_SOAK_CONCURRENCY=200 \\
        .venv/bin/python -m pytest tests/reliability/test_soak.py
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from sideproxy.fake_provider import FakeProvider
from sideproxy.models import fingerprint
from tests.proxy.conftest import K, manifests
from tests.reliability.conftest import (
    CHAT,
    STREAM,
    ProxyProcess,
    clean_env,
    free_port,
    rss_kib,
)

SECONDS = float(os.environ.get("SIDEPROXY_SOAK_SECONDS", "20"))
CONCURRENCY = int(os.environ.get("SIDEPROXY_SOAK_CONCURRENCY", "64"))
PAUSE = 0.3  # between one client's requests: ~CONCURRENCY / 0.3 requests per second offered
VALUES = [f"sk-CANARY-soak-{i}-{'x' * 16}" for i in range(1, 7)]
ROTATED = "sk-CANARY-soak-3-rotated-xxxxxxxx"
# Six keys; key-1 has a tight limit of its own (it cools down and recovers all the time), the
# others have room: ~515 requests/s against ~210 offered, so a healthy key is always there
# even with two keys out (a 429 is injected every second on top).
LIMITS = {VALUES[0]: "15/1s", **{v: "100/1s" for v in VALUES[1:]}, ROTATED: "100/1s"}
SPEC = {
    "cooldown": {"defaultSeconds": 1},
    "timeouts": {"firstByteSeconds": 5},
}
RETRYABLE = (aiohttp.ClientConnectionError,)  # refused, reset, server disconnected


def _pool_file(path: Path, fake: FakeProvider, key3: str) -> None:
    values = [*VALUES[:2], key3, *VALUES[3:]]
    docs = manifests(
        {"custom": fake.base_url},
        [K(f"key-{i}", v) for i, v in enumerate(values, 1)],
        spec=SPEC,
    )
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump_all(docs))
    tmp.replace(path)  # atomic, as a ConfigMap volume update is


class Clients:
    def __init__(self, url: str) -> None:
        self.url = url
        self.results: Counter[str] = Counter()
        self.failures: list[str] = []
        self.connection_retries = 0
        self.stop = asyncio.Event()

    async def one(self, session: aiohttp.ClientSession, stream: bool) -> None:
        for attempt in range(200):  # bounded: 200 x 50 ms = 10 s of retrying at most
            try:
                async with session.post(
                    self.url + "/v1/chat/completions", json=STREAM if stream else CHAT
                ) as resp:
                    body = await resp.read()
            except RETRYABLE:
                self.connection_retries += attempt == 0
                await asyncio.sleep(0.05)
                continue
            complete = resp.status == 200 and (
                body.endswith(b"data: [DONE]\n\n") if stream else b'"chat.completion"' in body
            )
            if complete:
                self.results["ok"] += 1
            else:
                self.results[f"{resp.status}"] += 1
                self.failures.append(body.decode(errors="replace")[:300])
            return
        self.results["gave up"] += 1

    async def client(self, n: int) -> None:
        timeout = aiohttp.ClientTimeout(total=30)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            i = 0
            while not self.stop.is_set() and i < 100_000:
                await self.one(session, stream=(n + i) % 5 == 0)
                i += 1
                await asyncio.sleep(PAUSE)


@pytest.mark.timeout(SECONDS + 120)
async def test_soak_with_cooling_keys_a_rotation_and_a_restart(tmp_path: Path) -> None:
    port = free_port()
    pool = tmp_path / "pool.yaml"
    async with FakeProvider([*VALUES, ROTATED], limits=LIMITS) as fake:
        _pool_file(pool, fake, VALUES[2])
        args = ["--file", str(pool), "--reload-interval", "0.2", "--no-access-log"]
        env = clean_env(SIDE_PROXY_SHUTDOWN_TIMEOUT="10", SIDE_PROXY_LOG_LEVEL="WARNING")
        first = await ProxyProcess(args, port, env).start()
        second: ProxyProcess | None = None
        clients = Clients(first.url)
        tasks = [asyncio.create_task(clients.client(n)) for n in range(CONCURRENCY)]
        rss: dict[str, list[int]] = {"first": [], "second": []}
        cooled: set[str] = set()
        try:
            started = time.monotonic()

            def at(fraction: float) -> float:
                return started + SECONDS * fraction

            async def until(moment: float) -> None:
                """Sleep until ``moment``; every second, make another key answer one 429."""
                while (left := moment - time.monotonic()) > 0:
                    await asyncio.sleep(min(1.0, left))
                    victim = VALUES[int(time.monotonic()) % len(VALUES)]
                    fake.add_faults(victim, {"status": 429, "retry_after": 1})
                    cooled.add(fingerprint(victim))

            await until(at(0.15))
            rss["first"].append(rss_kib(first.pid))
            # Rotation: the provider revokes key-3's old value; a moment later the new value
            # lands in the pool file (as a Secret update would).
            await until(at(0.3))
            fake.revoke(VALUES[2])
            await until(at(0.35))
            _pool_file(pool, fake, ROTATED)
            await until(at(0.55))
            rss["first"].append(rss_kib(first.pid))
            # Restart: SIGTERM (graceful), then a new process on the same port.
            assert await first.stop() == 0
            second = await ProxyProcess(args, port, env).start()
            await until(at(0.7))
            rss["second"].append(rss_kib(second.pid))
            await until(at(1.0))
            rss["second"].append(rss_kib(second.pid))
            async with aiohttp.ClientSession() as session:
                status = await (await session.get(second.url + "/sideproxy/status")).json()
        finally:
            clients.stop.set()
            await asyncio.wait_for(asyncio.gather(*tasks), 60)
            if second is not None:
                await second.stop()
            if first.process is not None and first.process.returncode is None:
                await first.stop()
        counts = fake.status_counts()

    total = sum(clients.results.values())
    summary = {
        "requests": total,
        "results": dict(clients.results),
        "connection retries (restart)": clients.connection_retries,
        "rss_kib": rss,
        "upstream statuses": {fp: dict(c) for fp, c in counts.items()},
    }
    print("\nsoak:", json.dumps(summary, default=str))
    # Zero client-visible errors: every request ended in a complete answer.
    assert clients.results == {"ok": total}, (clients.results, clients.failures[:5])
    assert total >= SECONDS * CONCURRENCY / (PAUSE + 0.2) * 0.5  # the load really ran
    # Keys did cool down and recover: 429s seen upstream, and every key served 200s after.
    assert sum(c.get(429, 0) for c in counts.values()) >= SECONDS / 2
    assert all(counts[fp].get(200, 0) > 0 for fp in cooled)
    # The rotation landed: the new value serves, the old one was answered 401 at most a few
    # times (after the provider revoked it) and the proxy stopped using it.
    assert counts[fingerprint(ROTATED)].get(200, 0) > 0
    assert counts[fingerprint(VALUES[2])].get(401, 0) <= 5
    keys: dict[str, Any] = {k["name"]: k for k in status["keys"]}
    assert keys["key-3"]["fingerprint"] == fingerprint(ROTATED)
    assert keys["key-3"]["health"] != "revoked"
    # The restart cost nothing but connection retries.
    assert clients.connection_retries >= 1
    # Memory flat in each process between its two samples.
    for name, (early, late) in rss.items():
        assert late - early <= 12 * 1024, (name, rss)
