"""Per-pool workers: batching, deadlines, retries, gating; real time, but only milliseconds.

No assertion here depends on the machine being fast: time bounds are lower bounds (a slow run
only makes them easier), and "it happened" is awaited, never slept for."""

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
    """Pokes every 10 ms never leave the 50 ms quiet period: only max_delay gets a run out,
    and the runs stay far fewer than the pokes."""
    work = Work()
    workers: Debouncer[str] = Debouncer(work, quiet=0.05, max_delay=0.2)
    pokes = 0
    async with asyncio.timeout(10):
        while len(work.calls) < 2:  # runs while the churn goes on
            workers.poke("p")
            pokes += 1
            await asyncio.sleep(0.01)
    await workers.close()
    assert len(work.calls) * 5 <= pokes  # at least 0.2 s of pokes per run


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
    await wait_calls(work, 2, limit=10.0)
    assert work.calls[1][1] - work.calls[0][1] >= 0.15
    await workers.close()


async def test_failures_retry_with_backoff() -> None:
    work = Work(fail=2)
    workers: Debouncer[str] = Debouncer(work, quiet=0.01, retry_base=0.05)
    workers.poke("p")
    await wait_calls(work, 3, limit=10.0)
    gaps = [b[1] - a[1] for a, b in zip(work.calls, work.calls[1:], strict=False)]
    assert gaps[0] >= 0.05  # retry_base
    assert gaps[1] >= 0.1  # doubled
    await workers.close()


async def test_worker_exits_when_nothing_is_left() -> None:
    work = Work(Outcome(alive=False))
    workers: Debouncer[str] = Debouncer(work, quiet=0.01)
    workers.poke("gone")
    await wait_calls(work, 1)
    async with asyncio.timeout(5):
        while "gone" in workers:  # noqa: ASYNC110 (a worker's exit has no event to await)
            await asyncio.sleep(0.01)
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


async def test_close_lets_a_running_reconcile_finish() -> None:
    """SIGTERM's path: close(grace) waits for work in progress instead of cutting it."""
    release = asyncio.Event()
    finished: list[str] = []
    started = asyncio.Event()

    async def work(key: str) -> Outcome:
        started.set()
        await release.wait()
        finished.append(key)
        return Outcome()

    workers: Debouncer[str] = Debouncer(work, quiet=0.01)
    workers.poke("p")
    await started.wait()
    closing = asyncio.create_task(workers.close(grace=30))
    await asyncio.sleep(0)
    release.set()
    await closing
    assert finished == ["p"]


async def test_close_cuts_work_that_outlives_the_grace() -> None:
    started = asyncio.Event()

    async def work(key: str) -> Outcome:
        started.set()
        await asyncio.Event().wait()
        return Outcome()

    workers: Debouncer[str] = Debouncer(work, quiet=0.01)
    workers.poke("p")
    await started.wait()
    await workers.close(grace=0.01)
    assert workers.keys() == []
