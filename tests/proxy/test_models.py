"""The proxy routes on the request's model (issue 11, proxy side)."""

from __future__ import annotations

import aiohttp

from sideproxy.fake_provider import FakeProvider
from sideproxy.models import fingerprint
from sideproxy.proxy import EnvSource
from tests.proxy.conftest import SECRETS, K, Proxy, StartProxy, manifests, snapshot

CHAT = {"messages": [{"role": "user", "content": "hi"}]}


async def _chat(http: aiohttp.ClientSession, proxy: Proxy, model: str) -> aiohttp.ClientResponse:
    async with http.post(
        proxy.base_url + "/chat/completions", json={**CHAT, "model": model}
    ) as resp:
        await resp.read()
        return resp


async def test_a_model_no_key_serves_is_404_with_no_upstream_attempt(
    fake: FakeProvider, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    pool_keys = [K("key-1", SECRETS[0], models=("llama-*",)), K("key-2", SECRETS[1], models=("m",))]
    proxy = await start_proxy(snapshot(manifests({"custom": fake.base_url}, pool_keys)))
    async with http.post(
        proxy.base_url + "/chat/completions", json={**CHAT, "model": "gpt-4o"}
    ) as resp:
        body = await resp.json()
    assert resp.status == 404
    assert body["error"]["code"] == "model_not_found"
    assert body["error"]["type"] == "invalid_request_error"
    assert "gpt-4o" in body["error"]["message"]
    assert fake.stats() == {}
    assert (await _chat(http, proxy, "llama-3")).headers["x-fake-key"] == fingerprint(SECRETS[0])
    assert (await _chat(http, proxy, "m")).headers["x-fake-key"] == fingerprint(SECRETS[1])


async def test_a_429_for_one_model_leaves_the_key_serving_others(
    fake: FakeProvider, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    only = K("only", SECRETS[0])
    proxy = await start_proxy(snapshot(manifests({"custom": fake.base_url}, [only])))
    fake.add_faults(only.value, {"status": 429, "retry_after": 60})
    assert (await _chat(http, proxy, "big")).status == 429
    assert (await _chat(http, proxy, "big")).status == 429  # resting for "big": not sent
    assert (await _chat(http, proxy, "small")).status == 200
    assert fake.stats() == {only.fp: 2}
    assert proxy.cooling("only", "big") is not None
    assert proxy.cooling("only", "small") is None


async def test_out_of_quota_takes_the_key_out_for_every_model(
    fake: FakeProvider, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    a, b = K("a", SECRETS[0]), K("b", SECRETS[1])
    proxy = await start_proxy(snapshot(manifests({"custom": fake.base_url}, [a, b])))
    fake.add_faults(a.value, {"status": 429, "code": "insufficient_quota"})
    resp = await _chat(http, proxy, "big")
    assert (resp.status, resp.headers["x-fake-key"]) == (200, b.fp)  # moved on at once
    assert str(proxy.status("a").health) == "exhausted"
    for model in ("big", "small", "other"):
        assert (await _chat(http, proxy, model)).headers["x-fake-key"] == b.fp
    assert fake.stats()[a.fp] == 1


async def test_requests_without_a_model_route_as_before(
    fake: FakeProvider, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    pool_keys = [K("key-1", SECRETS[0], models=("m",))]
    proxy = await start_proxy(snapshot(manifests({"custom": fake.base_url}, pool_keys)))
    async with http.get(proxy.base_url + "/models") as resp:
        assert resp.status == 200


async def test_side_pool_keys_route_on_the_model_the_same_way(
    fake: FakeProvider, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    """``SIDE_POOL_KEYS`` (EnvSource) gets the same per-model cool-down and exhaustion."""
    proxy = await start_proxy(EnvSource(SECRETS[:2], "custom", fake.base_url))
    fake.add_faults(SECRETS[0], {"status": 429, "retry_after": 60})
    fake.add_faults(SECRETS[1], {"status": 429, "retry_after": 60})
    assert (await _chat(http, proxy, "big")).status == 429
    assert (await _chat(http, proxy, "small")).status == 200
    fake.exhaust(SECRETS[0])
    fake.exhaust(SECRETS[1])
    async with http.post(
        proxy.base_url + "/chat/completions", json={**CHAT, "model": "small"}
    ) as resp:
        assert (await resp.json())["error"]["code"] == "insufficient_quota"
    assert {str(proxy.status(n).health) for n in ("key-1", "key-2")} == {"exhausted"}
