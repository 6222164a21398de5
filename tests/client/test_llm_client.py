"""sideproxy.client.LLMClient against the fake provider, over real sockets."""

import pytest

from sideproxy.client import LLMClient, LLMError
from sideproxy.fake_provider import FakeProvider
from sideproxy.models import fingerprint

KEYS = ["gsk_CLIENT_canary_1", "gsk_CLIENT_canary_2", "gsk_CLIENT_canary_3"]
HELLO = [{"role": "user", "content": "hello"}]


def test_mode_follows_the_seeds_precedence() -> None:
    env = {"GROQ_API_KEY": "g", "SIDE_POOL_KEYS": "a,b", "SIDE_PROXY_URL": "http://p/v1"}
    assert LLMClient.from_env(env).mode == "single"
    del env["GROQ_API_KEY"]
    assert LLMClient.from_env(env).mode == "pool"
    assert len(LLMClient.from_env(env).pool) == 2
    del env["SIDE_POOL_KEYS"]
    assert LLMClient.from_env(env).mode == "proxy"
    with pytest.raises(ValueError, match="SIDE_POOL_KEYS"):
        LLMClient.from_env({})


async def test_pool_mode_rotates_keys() -> None:
    async with FakeProvider(keys=KEYS) as fake:
        env = {
            "SIDE_POOL_KEYS": ",".join(KEYS),
            "SIDE_POOL_PROVIDER": "custom",
            "SIDE_POOL_BASE_URL": fake.base_url,
        }
        async with LLMClient.from_env(env) as llm:
            for _ in range(6):
                reply = await llm.chat(HELLO, model="fake-model")
                assert reply["choices"][0]["message"]["content"]
        assert fake.stats() == {fingerprint(k): 2 for k in KEYS}


async def test_a_key_out_of_headroom_is_spared_before_it_earns_a_429() -> None:
    async with FakeProvider(keys=KEYS, limits={KEYS[0]: "1/60s"}) as fake:
        async with LLMClient(keys=KEYS, provider="custom", base_url=fake.base_url) as llm:
            for _ in range(9):
                await llm.chat(HELLO, model="fake-model")
        # Its one success said "remaining 0, resets in 60s": no 429 was ever provoked.
        assert fake.status_counts()[fingerprint(KEYS[0])] == {200: 1}


async def test_a_429_is_retried_on_the_next_key_and_the_key_rests() -> None:
    faults = {KEYS[0]: [{"action": "status", "status": 429, "retry_after": 60}]}
    async with FakeProvider(keys=KEYS, faults=faults) as fake:
        async with LLMClient(keys=KEYS, provider="custom", base_url=fake.base_url) as llm:
            for _ in range(9):
                await llm.chat(HELLO, model="fake-model")  # never raises: retried at once
            (first,) = [s for s in llm.pool.statuses(0) if s.name == "key-1"]
            assert first.rate_limited == 1
        assert fake.status_counts()[fingerprint(KEYS[0])] == {429: 1}
        assert sum(fake.successes().values()) == 9


async def test_streaming_yields_chunks() -> None:
    async with FakeProvider(keys=KEYS, stream_chunks=4) as fake:
        llm = LLMClient(keys=KEYS, provider="custom", base_url=fake.base_url)
        async with llm:
            chunks = [c async for c in llm.stream_chat(HELLO, model="fake-model")]
    assert len(chunks) >= 4
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)


async def test_every_key_revoked_is_a_clear_error_without_key_values() -> None:
    async with FakeProvider(keys=KEYS, revoked=KEYS) as fake:
        llm = LLMClient(keys=KEYS, provider="custom", base_url=fake.base_url)
        async with llm:
            with pytest.raises(LLMError) as excinfo:
                await llm.chat(HELLO, model="fake-model")
            assert excinfo.value.status == 401
            assert "canary" not in str(excinfo.value)
            # All three are now out of rotation: the next call fails without a request.
            before = sum(fake.stats().values())
            with pytest.raises(LLMError, match="cooling down or revoked"):
                await llm.chat(HELLO, model="fake-model")
            assert sum(fake.stats().values()) == before


async def test_a_403_for_the_request_is_returned_without_revoking_keys() -> None:
    """A 403 is usually about the request (a model the org may not use): asked of one other
    key, then answered; no key is revoked or blamed, so one bad caller cannot drain the pool."""
    async with FakeProvider(keys=KEYS, forbid_models=["forbidden-model"]) as fake:
        llm = LLMClient(keys=KEYS, provider="custom", base_url=fake.base_url)
        async with llm:
            for _ in range(5):
                with pytest.raises(LLMError) as excinfo:
                    await llm.chat(HELLO, model="forbidden-model")
                assert excinfo.value.status == 403
            # Asked of two keys each time, and no key was taken out for the request's fault.
            assert sum(fake.stats().values()) == 10
            assert all(s.health == "ready" and s.failures == 0 for s in llm.pool.statuses(0))
            assert (await llm.chat(HELLO, model="fake-model"))["choices"]
