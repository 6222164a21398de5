"""Per-pool workers: batching, deadlines, retries, gating; real time, but only milliseconds."""

from __future__ import annotations

import asyncio
import time

from sideproxy.operator._debounce import Debouncer, Outcome


class Work:
    def __init__(self, outcome: Outcome | None = None, fail: int = 0) -> None:
        self.calls: list[tuple[str, float]] = []
        self.outcome = outcome or Outcome()
        self.fail = fail
        self.done = asyncio.Event()

    async def __call__(self, key: str) -> Outcome:
        self.calls.append((key, time.monotonic()))
        self.done.set()
        if self.fail:
            self.fail -= 1
            raise OSError("API unreachable")
        return self.outcome


async def wait_calls(work: Work, n: int, limit: float = 5.0) -> None:
    async with asyncio.timeout(limit):
        while len(work.calls) < n:
            work.done.clear()
            await work.done.wait()


async def test_a_burst_is_one_reconcile() -> None:
    work = Work()
    workers: Debouncer[str] = Debouncer(work, quiet=0.05, max_delay=1.0)
    for _ in range(100):
        workers.poke("p")
    await wait_calls(work, 1)
    await asyncio.sleep(0.15)
    assert len(work.calls) == 1
    await workers.close()


async def test_constant_churn_is_written_every_max_delay() -> None:
    work = Work()
    workers: Debouncer[str] = Debouncer(work, quiet=0.05, max_delay=0.2)
    start = time.monotonic()
    while time.monotonic() - start < 1.0:
        workers.poke("p")
        await asyncio.sleep(0.01)
    await workers.close()
    assert 3 <= len(work.calls) <= 7  # not 100


async def test_pools_are_independent() -> None:
    work = Work()
    workers: Debouncer[str] = Debouncer(work, quiet=0.02)
    workers.poke("a")
    workers.poke("b")
    await wait_calls(work, 2)
    assert sorted(key for key, _ in work.calls) == ["a", "b"]
    await workers.close()


async def test_wakes_at_the_deadline_without_a_trigger() -> None:
    work = Work(Outcome(deadline=time.time() + 0.2))
    workers: Debouncer[str] = Debouncer(work, quiet=0.01)
    workers.poke("p")
    await wait_calls(work, 1)
    work.outcome = Outcome()
    await wait_calls(work, 2, limit=2.0)
    assert 0.15 <= work.calls[1][1] - work.calls[0][1] <= 1.0
    await workers.close()


async def test_failures_retry_with_backoff() -> None:
    work = Work(fail=2)
    workers: Debouncer[str] = Debouncer(work, quiet=0.01, retry_base=0.05)
    workers.poke("p")
    await wait_calls(work, 3, limit=3.0)
    gaps = [b[1] - a[1] for a, b in zip(work.calls, work.calls[1:], strict=False)]
    assert gaps[1] > gaps[0] * 1.5
    await workers.close()


async def test_worker_exits_when_nothing_is_left() -> None:
    work = Work(Outcome(alive=False))
    workers: Debouncer[str] = Debouncer(work, quiet=0.01)
    workers.poke("gone")
    await wait_calls(work, 1)
    await asyncio.sleep(0.05)
    assert "gone" not in workers
    workers.poke("gone")  # a new trigger makes a new worker
    await wait_calls(work, 2)
    await workers.close()


async def test_gate_holds_every_write_until_leadership() -> None:
    work = Work()
    leader = asyncio.Event()
    workers: Debouncer[str] = Debouncer(work, quiet=0.01, gate=leader.wait)
    workers.poke("p")
    await asyncio.sleep(0.1)
    assert work.calls == []
    leader.set()
    await wait_calls(work, 1)
    await workers.close()
    workers.poke("p")  # after close(): ignored
    assert "p" not in workers
