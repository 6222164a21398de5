"""An exhausted key returns only through a token-free probe (issue 11 item 3, proxy side)."""

from __future__ import annotations

import aiohttp

from sideproxy.fake_provider import FakeProvider
from sideproxy.proxy import ProxySettings
from tests.proxy.conftest import SECRETS, K, StartProxy, eventually, manifests, snapshot

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
QUOTA = {"quota": {"backoffSeconds": 1, "maxBackoffSeconds": 2}}


async def test_an_exhausted_key_comes_back_after_one_probe_once_replenished(
    fake: FakeProvider, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    a, b = K("a", SECRETS[0]), K("b", SECRETS[1])
    proxy = await start_proxy(
        snapshot(manifests({"custom": fake.base_url}, [a, b], spec=QUOTA)),
        ProxySettings(probe_interval=0.05),
    )
    fake.exhaust(a.value)
    async with http.post(proxy.base_url + "/chat/completions", json=CHAT) as resp:
        assert (resp.status, resp.headers["x-fake-key"]) == (200, b.fp)
    assert str(proxy.status("a").health) == "exhausted"
    # Probed (GET /models) while still out of quota: stays out, no client request reaches it.
    await eventually(lambda: fake.calls_of(a.value, status=429) >= 2, within=10)
    assert str(proxy.status("a").health) == "exhausted"
    probes_before = fake.calls_of(a.value)
    fake.replenish(a.value)
    await eventually(lambda: str(proxy.status("a").health) == "ready", within=10)
    assert fake.calls_of(a.value) == probes_before + 1  # back within one probe
    chats = [c for c in fake.calls if c[1] == a.fp and c[2] == "POST"]
    assert len(chats) == 1  # only the first request: never a client's request while out
    probes = [c for c in fake.calls if c[1] == a.fp and c[2] == "GET"]
    assert all(path.endswith("/models") for _, _, _, path, _, _ in probes)


async def test_a_probe_costs_no_client_request_and_uses_only_that_key(
    fake: FakeProvider, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    only = K("only", SECRETS[0])
    proxy = await start_proxy(
        snapshot(manifests({"custom": fake.base_url}, [only], spec=QUOTA)),
        ProxySettings(probe_interval=0.05),
    )
    fake.exhaust(only.value)
    async with http.post(proxy.base_url + "/chat/completions", json=CHAT) as resp:
        assert resp.status == 429
        assert (await resp.json())["error"]["code"] == "insufficient_quota"
    fake.replenish(only.value)
    await eventually(lambda: str(proxy.status("only").health) == "ready", within=10)
    metrics = await (await http.get(proxy.url + "/metrics")).text()
    assert 'sideproxy_key_probes_total{provider="custom",result="ok"} 1.0' in metrics
