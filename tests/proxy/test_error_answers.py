"""What the client gets when the provider answers with an error (issue 15 items 2, 6, 8)."""

from __future__ import annotations

import time

import aiohttp

from sideproxy.fake_provider import FakeProvider
from tests.proxy.conftest import SECRETS, Proxy, StartProxy, keys, manifests, snapshot

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
MASKED = "sk-SECRE" + "*" * 6 + "ry-1"


async def test_an_sse_error_body_is_scrubbed_of_the_key(
    fake: FakeProvider, proxy: Proxy, http: aiohttp.ClientSession
) -> None:
    """15.2: a 400 sent as text/event-stream quoting the key reaches the client scrubbed."""
    for secret in SECRETS[:3]:
        fake.add_faults(secret, {"status": 400, "echo": True, "sse": True})
    async with http.post(proxy.base_url + "/chat/completions", json=CHAT) as resp:
        body = await resp.read()
        assert resp.status == 400
    assert b"fake fault: status 400" in body  # the provider's message, scrubbed, not replaced
    assert b"<redacted>" in body
    for secret in SECRETS:
        assert secret.encode() not in body


async def test_an_sse_error_body_loses_masked_key_quotes(
    fake: FakeProvider, proxy: Proxy, http: aiohttp.ClientSession
) -> None:
    message = f"quota exceeded for key {MASKED}"
    fake.add_faults(SECRETS[0], {"status": 400, "sse": True, "code": message})
    async with http.post(proxy.base_url + "/chat/completions", json=CHAT) as resp:
        body = await resp.read()
    assert resp.status == 400
    assert MASKED.encode() not in body
    assert b"<redacted>" in body


async def test_when_every_key_answered_429_both_retry_headers_agree(
    fake: FakeProvider, proxy: Proxy, http: aiohttp.ClientSession
) -> None:
    """15.6: the OpenAI SDK reads retry-after-ms first; it must say what Retry-After says."""
    fake.add_faults(SECRETS[0], {"status": 429, "headers": {"retry-after-ms": "5000"}})
    fake.add_faults(SECRETS[1], {"status": 429, "headers": {"retry-after-ms": "30000"}})
    fake.add_faults(SECRETS[2], {"status": 429, "headers": {"retry-after-ms": "30000"}})
    async with http.post(proxy.base_url + "/chat/completions", json=CHAT) as resp:
        assert resp.status == 429
        seconds = int(resp.headers["Retry-After"])
        assert 4 <= seconds <= 5  # key-1 recovers first, in 5 s
        assert resp.headers.getall("retry-after-ms") == [str(seconds * 1000)]
    assert sum(fake.stats().values()) == 3


async def test_no_key_available_carries_both_retry_headers(
    fake: FakeProvider, proxy: Proxy, http: aiohttp.ClientSession
) -> None:
    for name in ("key-1", "key-2", "key-3"):
        proxy.pool.impose_cooldown(name, time.time() + 20, time.time())
    async with http.post(proxy.base_url + "/chat/completions", json=CHAT) as resp:
        assert resp.status == 429
        assert (await resp.json())["error"]["code"] == "no_key_available"
        seconds = int(resp.headers["Retry-After"])
        assert resp.headers["retry-after-ms"] == str(seconds * 1000)


async def test_a_held_403_is_not_blamed_for_another_keys_sse_4xx(
    fake: FakeProvider, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    """15.8: key-1 answers 403, key-2 a 400 as SSE: the request is at fault, not key-1."""
    spec = {"breaker": {"failureThreshold": 1, "backoffSeconds": 30, "maxBackoffSeconds": 60}}
    proxy = await start_proxy(snapshot(manifests({"custom": fake.base_url}, keys(3), spec=spec)))
    fake.add_faults(SECRETS[0], 403)
    fake.add_faults(SECRETS[1], {"status": 400, "sse": True})
    async with http.post(proxy.base_url + "/chat/completions", json=CHAT) as resp:
        assert resp.status == 400
    first = proxy.status("key-1")
    assert (str(first.health), first.failures) == ("ready", 0)
