"""Clients that vanish: mid-stream, before the first byte, or in a crowd. The upstream request is
cancelled, the key released, and no task, socket or file descriptor is left behind."""

from __future__ import annotations

import asyncio
import contextlib

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from sideproxy.fake_provider import FakeProvider
from sideproxy.proxy import ProxySettings
from tests.proxy.conftest import SECRETS, Proxy, StartProxy, keys, manifests, snapshot
from tests.reliability.conftest import CHAT, STREAM, PoolSpy, open_fds, settle, steady

# Short upstream keep-alive, so idle pooled connections go away and the fd count can return
# exactly to where it was.
SETTINGS = ProxySettings(upstream_keepalive=0.3)


def _sample(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


async def _quiet(proxy: Proxy, fake: FakeProvider) -> tuple[int, int]:
    """Wait for idle: no stream at the fake, no pooled upstream connection; (tasks, fds)."""
    await settle(lambda: fake.active_streams == 0)
    await asyncio.sleep(0.5)  # > upstream_keepalive: pooled connections are closed
    return len(asyncio.all_tasks()), open_fds()


async def test_twenty_clients_leaving_mid_stream(
    fake: FakeProvider, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(snapshot(manifests({"custom": fake.base_url}, keys(3))), SETTINGS)
    spy = PoolSpy(proxy.pool)
    fake.configure(stream_chunks=40, stream_interval=0.05)
    tasks, fds = await _quiet(proxy, fake)

    async def leave_after_first_chunk() -> None:
        async with aiohttp.ClientSession() as session:
            resp = await session.post(proxy.base_url + "/chat/completions", json=STREAM)
            assert resp.status == 200
            first = await resp.content.readuntil(b"\n\n")
            assert first.startswith(b"data: {")
            resp.close()  # gone, mid-stream

    async with steady(proxy.url):
        await asyncio.gather(*(leave_after_first_chunk() for _ in range(20)))
        await settle(lambda: fake.active_streams == 0, within=3)
    assert fake.completed_streams == 0  # every upstream stream was cut, none ran to the end
    await settle(lambda: spy.in_flight == 0)
    metrics = await (await http.get(proxy.url + "/metrics")).text()
    cancelled = sum(
        _sample(metrics, "sideproxy_upstream_requests_total", key=f"key-{i}", status="cancelled")
        for i in (1, 2, 3)
    )
    assert cancelled == 20
    assert _sample(metrics, "sideproxy_requests_total", status="499") == 20
    assert _sample(metrics, "sideproxy_inflight_requests") == 0
    await http.close()
    await settle(lambda: (len(asyncio.all_tasks()), open_fds()) <= (tasks, fds), within=5)


async def test_clients_leaving_before_the_first_byte_cancel_the_upstream(
    fake: FakeProvider, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy(snapshot(manifests({"custom": fake.base_url}, keys(3))), SETTINGS)
    spy = PoolSpy(proxy.pool)
    tasks, fds = await _quiet(proxy, fake)
    for secret in SECRETS[:3]:
        fake.add_faults(secret, *(["hang"] * 4))

    async def leave_while_waiting() -> None:
        async with aiohttp.ClientSession() as session:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.3):
                    await session.post(proxy.base_url + "/chat/completions", json=CHAT)

    await asyncio.gather(*(leave_while_waiting() for _ in range(10)))
    await settle(lambda: spy.in_flight == 0)
    assert spy.acquired == 10  # one attempt each: the hang was cut by the client, not retried
    # The fake's hanging handlers were cancelled too (they would otherwise sleep for an hour
    # and show up as tasks); nothing is left of the ten requests.
    await asyncio.sleep(0.5)
    await settle(lambda: (len(asyncio.all_tasks()), open_fds()) <= (tasks, fds), within=5)
    states = {s.name: s for s in proxy.pool.statuses(0)}
    assert all(s.failures == 0 for s in states.values())  # a client leaving teaches nothing
