"""Lease leader election, step by step with a fake clock and the in-memory API."""

from __future__ import annotations

import asyncio

from sideproxy.operator._leader import LeaseElector
from tests.operator.fakes import FakeKube


class Clock:
    now = 1000.0

    def __call__(self) -> float:
        return self.now


def elector(api: FakeKube, identity: str, clock: Clock) -> LeaseElector:
    return LeaseElector(api, "ns", "op", identity, lease_seconds=15, clock=clock)


async def test_one_holder_then_fail_over_after_the_lease_expires() -> None:
    api, clock = FakeKube(), Clock()
    a, b = elector(api, "a", clock), elector(api, "b", clock)
    assert await a.try_acquire_or_renew()
    assert not await b.try_acquire_or_renew()
    clock.now += 10
    assert await a.try_acquire_or_renew()  # renewal changes the record...
    clock.now += 10
    assert not await b.try_acquire_or_renew()  # ...so b's 15 s count restarted
    clock.now += 16  # a is gone: no renewal for longer than the lease
    assert await b.try_acquire_or_renew()
    lease = api.get("leases", "ns", "op")
    assert lease is not None
    assert lease["spec"]["holderIdentity"] == "b"
    assert lease["spec"]["leaseTransitions"] == 1
    assert not await a.try_acquire_or_renew()


async def test_release_hands_over_at_once() -> None:
    api, clock = FakeKube(), Clock()
    a, b = elector(api, "a", clock), elector(api, "b", clock)
    assert await a.try_acquire_or_renew()
    assert not await b.try_acquire_or_renew()
    await a.release()
    assert await b.try_acquire_or_renew()


async def test_run_sets_and_clears_leading() -> None:
    api = FakeKube()
    changes: list[bool] = []
    a = LeaseElector(
        api, "ns", "op", "a", lease_seconds=1, retry_seconds=0.01, on_change=changes.append
    )
    task = asyncio.create_task(a.run())
    async with asyncio.timeout(5):
        await a.wait_leading()
    assert a.leading
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert changes == [True]
    assert not a.leading
    lease = api.get("leases", "ns", "op")
    assert lease is not None
    assert lease["spec"]["holderIdentity"] == ""  # released on the way out
