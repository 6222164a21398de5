"""Issue 12 step 3 through the official OpenAI SDK: each limit holds on one replica.

A refused request costs no upstream attempt (the fake provider's counters stay put) and never
touches the pool's keys (every key stays ready). The window is a calendar minute on an injected
clock, so no test can straddle a real minute boundary.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import aiohttp
import openai
import pytest

from sideproxy.fake_provider import FakeProvider
from sideproxy.proxy import FORWARDER
from tests.proxy.conftest import Proxy, eventually
from tests.vkeys.conftest import ANONYMOUS, VK_VALUES, Clock

MESSAGES: Any = [{"role": "user", "content": "hi"}]


def client(proxy: Proxy, name: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=proxy.base_url, api_key=VK_VALUES[name], max_retries=0)


def upstream(fake: FakeProvider) -> int:
    return sum(fake.stats().values())


def keys_untouched(proxy: Proxy) -> bool:
    """Every key of the pool is ready: nothing it learnt came from a refused request."""
    return all(str(s.health) == "ready" for s in proxy.pool.statuses(time.time()))


async def chat(c: openai.AsyncOpenAI, model: str = "m", **kw: Any) -> Any:
    return await c.chat.completions.create(model=model, messages=MESSAGES, **kw)


async def test_requests_per_minute(start_vk_proxy: Any, fake: FakeProvider, clock: Clock) -> None:
    proxy = await start_vk_proxy(batch={"limits": {"requestsPerMinute": 3}})
    async with client(proxy, "batch") as c:
        for _ in range(3):
            await chat(c)
        with pytest.raises(openai.RateLimitError) as refused:
            await chat(c)
        assert upstream(fake) == 3  # the fourth never went upstream
        error = refused.value
        assert error.code == "virtual_key_limit"
        assert error.type == "rate_limit_error"
        assert int(error.response.headers["retry-after"]) >= 1
        assert "3 requests per minute" in error.message
        assert keys_untouched(proxy)
        clock.now += 60  # the next minute
        await chat(c)
    assert upstream(fake) == 4


async def test_limits_are_per_virtual_key(start_vk_proxy: Any, fake: FakeProvider) -> None:
    proxy = await start_vk_proxy(
        batch={"limits": {"requestsPerMinute": 1}}, web={"limits": {"requestsPerMinute": 1}}
    )
    async with client(proxy, "batch") as b, client(proxy, "web") as w:
        await chat(b)
        await chat(w)
        with pytest.raises(openai.RateLimitError):
            await chat(b)
    anonymous = openai.AsyncOpenAI(base_url=proxy.base_url, api_key=ANONYMOUS, max_retries=0)
    async with anonymous:
        for _ in range(3):  # clientAuth keys: anonymous, no limits
            await chat(anonymous)
    assert upstream(fake) == 5


async def test_max_concurrent(start_vk_proxy: Any, fake: FakeProvider) -> None:
    proxy = await start_vk_proxy(batch={"limits": {"maxConcurrent": 2}})
    fake.configure(latency=1.5)
    async with client(proxy, "batch") as c:
        slow = [asyncio.create_task(chat(c)) for _ in range(2)]
        await eventually(lambda: upstream(fake) == 2, within=10)
        with pytest.raises(openai.RateLimitError) as refused:
            await chat(c)
        assert refused.value.code == "virtual_key_limit"
        assert "2 requests in flight" in refused.value.message
        assert upstream(fake) == 2
        await asyncio.gather(*slow)
        fake.configure(latency=0.0)
        await chat(c)  # the slots are free again
    assert upstream(fake) == 3
    assert keys_untouched(proxy)


async def test_tokens_per_minute_counts_usage(start_vk_proxy: Any, fake: FakeProvider) -> None:
    # The fake answers every chat with usage 5 prompt + 5 completion tokens.
    proxy = await start_vk_proxy(batch={"limits": {"tokensPerMinute": 15}})
    async with client(proxy, "batch") as c:
        await chat(c)  # 10 tokens
        await chat(c)  # 10 < 15 when admitted: it runs, the minute is at 20
        with pytest.raises(openai.RateLimitError) as refused:
            await chat(c)
    assert "15 tokens per minute" in refused.value.message
    assert upstream(fake) == 2


async def test_tokens_per_minute_counts_the_last_chunk_of_a_stream(
    start_vk_proxy: Any, fake: FakeProvider
) -> None:
    proxy = await start_vk_proxy(batch={"limits": {"tokensPerMinute": 8}})
    async with client(proxy, "batch") as c:
        stream = await chat(c, stream=True, stream_options={"include_usage": True})
        chunks = [chunk async for chunk in stream]
        assert chunks[-1].usage is not None
        with pytest.raises(openai.RateLimitError):
            await chat(c)


async def test_a_stream_without_usage_counts_no_tokens_and_is_counted_as_unmetered(
    start_vk_proxy: Any, fake: FakeProvider, http: aiohttp.ClientSession
) -> None:
    proxy = await start_vk_proxy(batch={"limits": {"tokensPerMinute": 8}})
    async with client(proxy, "batch") as c:
        for _ in range(2):
            stream = await chat(c, stream=True)
            assert all(chunk.usage is None for chunk in [c async for c in stream])
        await chat(c)  # still admitted: the streams reported nothing
    async with http.get(proxy.url + "/metrics") as resp:
        text = await resp.text()
    assert 'sideproxy_virtual_key_unmetered_streams_total{virtual_key="batch"} 2.0' in text


async def test_model_allow_list(start_vk_proxy: Any, fake: FakeProvider) -> None:
    proxy = await start_vk_proxy(batch={"models": ["small", "llama-*"]})
    async with client(proxy, "batch") as c:
        await chat(c, "small")
        await chat(c, "llama-3.1-8b")
        for model in ("big", "llama", "smaller"):
            with pytest.raises(openai.PermissionDeniedError) as refused:
                await chat(c, model)
            assert refused.value.code == "model_not_allowed"
            assert refused.value.status_code == 403
    assert upstream(fake) == 2
    assert keys_untouched(proxy)


async def test_unknown_and_disabled_keys_are_refused(
    start_vk_proxy: Any, fake: FakeProvider
) -> None:
    proxy = await start_vk_proxy(batch={"disabled": True})
    for value in (VK_VALUES["batch"], "vk-not-a-key", VK_VALUES["batch"][:-1]):
        c = openai.AsyncOpenAI(base_url=proxy.base_url, api_key=value, max_retries=0)
        async with c:
            with pytest.raises(openai.AuthenticationError):
                await chat(c)
    assert upstream(fake) == 0


async def test_metrics_per_virtual_key_without_values(
    start_vk_proxy: Any, fake: FakeProvider, http: aiohttp.ClientSession
) -> None:
    proxy = await start_vk_proxy(
        batch={"models": ["small"], "limits": {"requestsPerMinute": 2}}, web={}
    )
    async with client(proxy, "batch") as b, client(proxy, "web") as w:
        await chat(b, "small")
        await chat(b, "small")
        with pytest.raises(openai.RateLimitError):
            await chat(b, "small")
        await chat(w, "made-up-model-name")
    async with http.get(proxy.url + "/metrics") as resp:
        text = await resp.text()
    assert 'sideproxy_tokens_total{kind="prompt",model="small",virtual_key="batch"} 10.0' in text
    assert 'sideproxy_tokens_total{kind="completion",model="small",virtual_key="batch"} 10.0' in (
        text
    )
    # A model nobody names is 'other': client input never becomes a label.
    assert 'sideproxy_tokens_total{kind="prompt",model="other",virtual_key="web"} 5.0' in text
    assert "made-up-model-name" not in text
    assert 'sideproxy_virtual_key_requests_total{result="admitted",virtual_key="batch"} 2.0' in text
    assert 'sideproxy_virtual_key_requests_total{result="limited",virtual_key="batch"} 1.0' in text
    for value in (*VK_VALUES.values(), ANONYMOUS):
        assert value not in text


async def test_pool_keys_count_the_tokens_they_served(
    start_vk_proxy: Any, fake: FakeProvider
) -> None:
    proxy = await start_vk_proxy(batch={})
    async with client(proxy, "batch") as c:
        for _ in range(3):
            await chat(c)
    tallies = proxy.app[FORWARDER].admission.pool_key_tokens
    assert sum(p for p, _ in tallies.values()) == 15
    assert sum(c for _, c in tallies.values()) == 15
    assert set(tallies) <= {"key-1", "key-2"}


async def test_no_virtual_key_value_in_logs(
    start_vk_proxy: Any, fake: FakeProvider, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    proxy = await start_vk_proxy(
        batch={"models": ["small"], "limits": {"requestsPerMinute": 1}}, web={"disabled": True}
    )
    async with client(proxy, "batch") as b, client(proxy, "web") as w:
        await chat(b, "small")
        with pytest.raises(openai.RateLimitError):
            await chat(b, "small")
        with pytest.raises(openai.PermissionDeniedError):
            await chat(b, "big")
        with pytest.raises(openai.AuthenticationError):
            await chat(w)
    assert caplog.records  # the access log spoke
    for value in (*VK_VALUES.values(), ANONYMOUS):
        assert value not in caplog.text
