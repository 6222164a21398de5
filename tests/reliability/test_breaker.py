"""The circuit breaker, end to end: threshold failures open it, back-off, one probe, recovery."""

from __future__ import annotations

import asyncio
import time

import aiohttp

from sideproxy.fake_provider import FakeProvider
from sideproxy.models import fingerprint
from tests.proxy.conftest import SECRETS, StartProxy, keys, manifests, snapshot
from tests.reliability.conftest import CHAT, PoolSpy, key_states, settle

SPEC = {"breaker": {"failureThreshold": 3, "backoffSeconds": 0.4, "maxBackoffSeconds": 2}}
KEY1 = fingerprint(SECRETS[0])


async def _chat(http: aiohttp.ClientSession, url: str) -> int:
    async with http.post(url + "/v1/chat/completions", json=CHAT) as resp:
        await resp.read()
        return resp.status


async def test_breaker_opens_backs_off_probes_once_and_closes(
    fake: FakeProvider, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(snapshot(manifests({"custom": fake.base_url}, keys(2), spec=SPEC)))
    spy = PoolSpy(proxy.pool)
    fake.add_faults(SECRETS[0], 500, 500, 500)
    # Three consecutive failures of key-1; every client request is still served by key-2.
    for _ in range(10):
        assert await _chat(http, proxy.url) == 200
        if fake.stats().get(KEY1) == 3:
            break
    opened = time.time()
    state = (await key_states(http, proxy.url))["key-1"]
    assert (state["health"], state["failures"]) == ("open", 3)
    assert opened - 1.0 <= state["until"] <= opened + 0.45

    # Open: no traffic reaches key-1.
    for _ in range(6):
        assert await _chat(http, proxy.url) == 200
    assert fake.stats()[KEY1] == 3

    # Back-off over: half-open, and of ten concurrent requests exactly one probes key-1.
    await asyncio.sleep(max(0.0, state["until"] - time.time()) + 0.05)
    assert (await key_states(http, proxy.url))["key-1"]["health"] == "half-open"
    fake.add_faults(SECRETS[0], 500)  # the probe fails...
    probed = time.time()
    statuses = await asyncio.gather(*(_chat(http, proxy.url) for _ in range(10)))
    assert statuses == [200] * 10
    assert fake.stats()[KEY1] == 4
    state = (await key_states(http, proxy.url))["key-1"]
    assert state["health"] == "open"  # ...so it opens again, for twice as long
    assert probed + 0.75 <= state["until"] <= time.time() + 0.85

    # Next back-off over: the probe succeeds and the breaker closes.
    await asyncio.sleep(max(0.0, state["until"] - time.time()) + 0.05)
    for _ in range(10):
        assert await _chat(http, proxy.url) == 200
        if fake.successes().get(KEY1):
            break
    state = (await key_states(http, proxy.url))["key-1"]
    assert (state["health"], state["failures"], state["until"]) == ("ready", 0, None)
    # Closed: key-1 takes its share again.
    before = fake.successes()[KEY1]
    for _ in range(6):
        assert await _chat(http, proxy.url) == 200
    assert fake.successes()[KEY1] - before == 3
    await settle(lambda: spy.in_flight == 0)


async def test_a_probe_whose_client_vanishes_frees_the_probe_slot(
    fake: FakeProvider, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    """The probe's client disconnects: the key stays half-open (nothing learnt) and the next
    request probes it, instead of the key waiting out ``probe_timeout``."""
    proxy = await start_proxy(snapshot(manifests({"custom": fake.base_url}, keys(1), spec=SPEC)))
    spy = PoolSpy(proxy.pool)
    fake.add_faults(SECRETS[0], 500, 500, 500)
    for _ in range(3):
        assert await _chat(http, proxy.url) == 500
    await asyncio.sleep(0.5)
    fake.add_faults(SECRETS[0], "delay:2")
    task = asyncio.create_task(_chat(http, proxy.url))
    await settle(lambda: fake.stats().get(KEY1) == 4)
    task.cancel()  # the probing client goes away mid-request
    await settle(lambda: spy.in_flight == 0)
    assert (await key_states(http, proxy.url))["key-1"]["health"] == "half-open"
    assert await _chat(http, proxy.url) == 200
    assert (await key_states(http, proxy.url))["key-1"]["health"] == "ready"
