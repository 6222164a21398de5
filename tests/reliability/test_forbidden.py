"""The 403 decision (docs/reliability.md, "403"): a bad client must not be able to take keys out.

* A 403 whose structured ``error.code`` / ``error.type`` says the key is invalid or disabled
  revokes the key, like a 401, and the request goes to the next key.
* Any other 403 is asked of one other key. Refused again: the request's fault, the 403 goes to
  the client and neither key learns anything. Served: the first key's 403 counts toward its
  breaker (which opens after ``failure_threshold`` such requests in a row and heals by itself).
"""

from __future__ import annotations

import asyncio
import json

import aiohttp

from sideproxy.fake_provider import FakeProvider
from sideproxy.models import fingerprint
from tests.proxy.conftest import SECRETS, StartProxy, keys, manifests, snapshot
from tests.reliability.conftest import CHAT, PoolSpy, key_states, settle, steady

SPEC = {"breaker": {"failureThreshold": 3, "backoffSeconds": 0.3, "maxBackoffSeconds": 1}}
KEY1, KEY2 = fingerprint(SECRETS[0]), fingerprint(SECRETS[1])


async def _post(
    http: aiohttp.ClientSession, url: str, model: str = "m"
) -> tuple[int, dict[str, str], bytes]:
    async with http.post(url + "/v1/chat/completions", json={**CHAT, "model": model}) as resp:
        return resp.status, dict(resp.headers), await resp.read()


async def test_key_level_403_revokes_and_the_request_moves_on(
    fake: FakeProvider, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(snapshot(manifests({"custom": fake.base_url}, keys(3), spec=SPEC)))
    fake.add_faults(SECRETS[0], {"status": 403, "code": "account_deactivated"})
    fake.add_faults(SECRETS[1], {"status": 403, "code": "invalid_api_key"})
    status, headers, _ = await _post(http, proxy.url)
    assert (status, headers["x-fake-key"]) == (200, fingerprint(SECRETS[2]))
    assert sum(fake.stats().values()) == 3
    states = await key_states(http, proxy.url)
    assert states["key-1"]["health"] == states["key-2"]["health"] == "revoked"
    assert states["key-3"]["health"] == "ready"


async def test_a_403_only_one_key_gives_is_served_by_another_and_never_revokes(
    fake: FakeProvider, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(snapshot(manifests({"custom": fake.base_url}, keys(2), spec=SPEC)))
    spy = PoolSpy(proxy.pool)
    # key-1 refuses everything (say, its project lost access), without a key-level code.
    fake.add_faults(SECRETS[0], *([403] * 3))
    for _ in range(3):
        status, headers, _ = await _post(http, proxy.url)
        assert (status, headers["x-fake-key"]) == (200, KEY2)
    assert fake.stats() == {KEY1: 3, KEY2: 3}  # each request: key-1's 403, key-2's 200
    state = (await key_states(http, proxy.url))["key-1"]
    # Three confirmed 403s in a row: the breaker opened; it is not revoked.
    assert (state["health"], state["failures"]) == ("open", 3)
    await asyncio.sleep(0.4)
    # Healed by itself: the half-open probe gets a 200 and the key is back.
    for _ in range(6):
        status, _, _ = await _post(http, proxy.url)
        assert status == 200
    state = (await key_states(http, proxy.url))["key-1"]
    assert (state["health"], state["failures"]) == ("ready", 0)
    assert fake.successes().get(KEY1, 0) >= 1
    await settle(lambda: spy.in_flight == 0)


async def test_a_bad_client_cannot_walk_the_pool_into_revocation(
    fake: FakeProvider, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    """60 requests for a model the organisation may not use: each gets the provider's 403
    after exactly two upstream attempts; no key is revoked or opened; a good client sharing
    the pool gets only 200s throughout."""
    proxy = await start_proxy(snapshot(manifests({"custom": fake.base_url}, keys(3), spec=SPEC)))
    spy = PoolSpy(proxy.pool)
    fake.configure(forbid_models=["forbidden-model"])
    async with steady(proxy.url):
        results = [await _post(http, proxy.url, "forbidden-model") for _ in range(60)]
    for status, _, body in results:
        assert status == 403
        error = json.loads(body)["error"]
        assert error["code"] == "model_not_allowed"
        assert "forbidden-model" in error["message"]  # the provider's reason reaches the client
    forbidden = sum(n.get(403, 0) for n in fake.status_counts().values())
    assert forbidden == 120  # two attempts per bad request, never more
    states = await key_states(http, proxy.url)
    assert {s["health"] for s in states.values()} == {"ready"}
    assert {s["failures"] for s in states.values()} == {0}
    await settle(lambda: spy.in_flight == 0)


async def test_a_403_with_no_other_key_to_ask_passes_through_untouched(
    fake: FakeProvider, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(snapshot(manifests({"custom": fake.base_url}, keys(1), spec=SPEC)))
    for _ in range(5):
        fake.add_faults(SECRETS[0], 403)
        status, _, _ = await _post(http, proxy.url)
        assert status == 403
    assert fake.stats() == {KEY1: 5}
    state = (await key_states(http, proxy.url))["key-1"]
    assert (state["health"], state["failures"]) == ("ready", 0)


async def test_with_one_attempt_a_403_is_not_retried(
    fake: FakeProvider, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    docs = manifests({"custom": fake.base_url}, keys(2), spec={**SPEC, "retry": {"maxAttempts": 1}})
    proxy = await start_proxy(snapshot(docs))
    fake.add_faults(SECRETS[0], 403)
    status, _, _ = await _post(http, proxy.url)
    assert status == 403
    assert sum(fake.stats().values()) == 1
    assert (await key_states(http, proxy.url))["key-1"]["health"] == "ready"


async def test_anthropic_permission_error_is_not_key_level(
    fake: FakeProvider, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    """Anthropic's 403 type is ``permission_error`` for any refusal: judged like any 403."""
    from tests.proxy.conftest import K  # noqa: PLC0415

    pool_keys = [K(f"key-{i}", SECRETS[i - 1], provider="anthropic") for i in (1, 2)]
    docs = manifests({"anthropic": fake.base_url}, pool_keys, spec=SPEC)
    proxy = await start_proxy(snapshot(docs))
    fake.configure(forbid_models=["claude-forbidden"])
    body = {"model": "claude-forbidden", "max_tokens": 4, "messages": []}
    async with http.post(proxy.url + "/anthropic/v1/messages", json=body) as resp:
        assert resp.status == 403
        assert (await resp.json())["error"]["type"] == "permission_error"
    assert sum(fake.stats().values()) == 2
    states = await key_states(http, proxy.url)
    assert {s["health"] for s in states.values()} == {"ready"}
