"""LLMClient on the model-aware pool and the shared classifier, against the fake provider.

Real sockets, the real fake provider; the only thing injected is the client's clock, so back-off
deadlines pass without waiting.
"""

from datetime import UTC, datetime
from email.utils import format_datetime

import pytest

from sideproxy.client import LLMClient, LLMError
from sideproxy.fake_provider import FakeProvider
from sideproxy.models import fingerprint
from sideproxy.pool import KeyHealth, PoolPolicy

KEYS = ["gsk_POLICY_canary_1", "gsk_POLICY_canary_2"]
HELLO = [{"role": "user", "content": "hello"}]


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def test_one_key_and_five_forbidden_model_403s_do_not_lock_the_client_out() -> None:
    """Issue 15 item 4: five 403s opened the only key's breaker; the next valid call failed
    locally with "every key is cooling down or revoked"."""
    async with FakeProvider(keys=KEYS[:1], forbid_models=["forbidden-model"]) as fake:
        async with LLMClient(api_key=KEYS[0], provider="custom", base_url=fake.base_url) as llm:
            assert llm.mode == "single"
            for _ in range(5):
                with pytest.raises(LLMError) as excinfo:
                    await llm.chat(HELLO, model="forbidden-model")
                assert excinfo.value.status == 403
            (status,) = llm.pool.statuses(0)
            assert status.health is KeyHealth.READY
            assert status.failures == 0
            reply = await llm.chat(HELLO, model="fake-model")
            assert reply["choices"][0]["message"]["content"]
        assert fake.status_counts()[fingerprint(KEYS[0])] == {403: 5, 200: 1}


async def test_a_429_for_one_model_leaves_the_key_serving_another() -> None:
    faults = {KEYS[0]: [{"action": "status", "status": 429, "retry_after": 60}]}
    async with FakeProvider(keys=KEYS[:1], faults=faults) as fake:
        clock = Clock()
        async with LLMClient(
            api_key=KEYS[0], provider="custom", base_url=fake.base_url, clock=clock
        ) as llm:
            with pytest.raises(LLMError) as excinfo:
                await llm.chat(HELLO, model="big")
            assert excinfo.value.status == 429
            # The other model is served at once by the same key...
            assert (await llm.chat(HELLO, model="small"))["choices"]
            # ...while "big" waits for the provider's deadline without asking it again.
            with pytest.raises(LLMError) as excinfo:
                await llm.chat(HELLO, model="big")
            assert excinfo.value.retry_after == pytest.approx(60)
            clock.now += 60
            assert (await llm.chat(HELLO, model="big"))["choices"]
        assert fake.status_counts()[fingerprint(KEYS[0])] == {429: 1, 200: 2}


async def test_an_http_date_retry_after_is_read() -> None:
    clock = Clock()
    when = format_datetime(datetime.fromtimestamp(clock.now + 30, UTC), usegmt=True)
    faults = {KEYS[0]: [{"action": "status", "status": 429, "headers": {"retry-after": when}}]}
    async with (
        FakeProvider(keys=KEYS[:1], faults=faults) as fake,
        LLMClient(api_key=KEYS[0], provider="custom", base_url=fake.base_url, clock=clock) as llm,
    ):
        with pytest.raises(LLMError) as excinfo:
            await llm.chat(HELLO, model="big")
        assert excinfo.value.retry_after == pytest.approx(30)
        (status,) = llm.pool.statuses(clock.now)
        assert status.cooling == (("big", clock.now + 30),)


async def test_an_out_of_quota_key_is_skipped_then_returns_through_a_probe() -> None:
    quota = {"action": "status", "status": 429, "code": "insufficient_quota"}
    async with FakeProvider(keys=KEYS, faults={KEYS[0]: [quota]}) as fake:
        clock = Clock()
        policy = PoolPolicy(quota_backoff=300)
        async with LLMClient(
            keys=KEYS, provider="custom", base_url=fake.base_url, policy=policy, clock=clock
        ) as llm:
            for _ in range(6):
                await llm.chat(HELLO, model="fake-model")  # the first is retried on key 2
            exhausted = fingerprint(KEYS[0])
            assert fake.status_counts()[exhausted] == {429: 1}
            assert next(s.health for s in llm.pool.statuses(clock.now)) is KeyHealth.EXHAUSTED
            # Past the back-off, the next call first probes GET /models with that key (no
            # tokens); it answers 200, so the key is back at once.
            clock.now += 300
            for _ in range(4):
                await llm.chat(HELLO, model="fake-model")
            assert fake.status_counts()[exhausted] == {429: 1, 200: 3}
            probes = [r for r in fake.recent if r[0] == "GET" and r[1].endswith("/models")]
            assert len(probes) == 1


async def test_through_a_proxy_an_out_of_quota_answer_is_only_waited_out() -> None:
    """In proxy mode the proxy owns the pool: its answer is passed on and its Retry-After
    honoured; the client never takes its one connection out until a probe."""
    vk = "sk-virtual-POLICY"
    quota = {"action": "status", "status": 429, "code": "insufficient_quota", "retry_after": 5}
    async with FakeProvider(keys=[vk], faults={vk: [quota]}) as fake:
        clock = Clock()
        async with LLMClient(proxy_url=fake.base_url, virtual_key=vk, clock=clock) as llm:
            with pytest.raises(LLMError) as excinfo:
                await llm.chat(HELLO, model="fake-model")
            assert excinfo.value.status == 429
            clock.now += 5
            assert (await llm.chat(HELLO, model="fake-model"))["choices"]
