"""Per-pool workers: coalesce triggers, reconcile one pool at a time, wake at its deadline.

Why a task per pool rather than kopf daemons or timers: triggers come from three kinds of
objects (the pool, its PoolKeys, the Secrets they name) and must land in *one* reconcile of
the pool, which kopf's per-object handlers cannot express; a kopf timer runs at a fixed
interval, while a cool-down needs a wake-up at an exact, changing deadline. A plain asyncio task
per pool does both, and holds no state that the cluster does not (restart-safe by design).

Coalescing: after the first trigger a worker waits until ``quiet`` seconds pass without another
one, but never more than ``max_delay`` seconds in all. ``kubectl apply`` of a pool with its keys
and Secrets becomes one reconcile; 1,000 keys created one by one become a handful; a steady
stream of changes still gets written every ``max_delay`` seconds.

:meth:`Debouncer.close` takes a grace period: work already running finishes (SIGTERM never cuts
a reconcile in half when it need not), nothing new starts, then the rest is cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

from kubernetes_asyncio.client.exceptions import ApiException

from sideproxy.operator._kube import Conflict, NotFound, describe

log = logging.getLogger("sideproxy.operator")

K = TypeVar("K", bound=Hashable)


@dataclass(frozen=True, slots=True)
class Outcome:
    deadline: float | None = None  # wall-clock time to reconcile again at (a cool-down's end)
    alive: bool = True  # False: nothing left to reconcile for this key; the worker may exit


async def _always() -> None:
    return None


class Debouncer(Generic[K]):
    def __init__(
        self,
        work: Callable[[K], Awaitable[Outcome]],
        *,
        quiet: float = 0.15,
        max_delay: float = 2.0,
        resync: float = 300.0,
        gate: Callable[[], Awaitable[None]] = _always,
        clock: Callable[[], float] = time.time,
        retry_base: float = 0.5,
        retry_max: float = 30.0,
    ) -> None:
        self._work = work
        self._quiet = quiet
        self._max_delay = max_delay
        self._resync = resync
        self._gate = gate
        self._clock = clock
        self._retry_base = retry_base
        self._retry_max = retry_max
        self._wakes: dict[K, asyncio.Event] = {}
        self._tasks: dict[K, asyncio.Task[None]] = {}
        self._busy: set[K] = set()  # keys whose work is running now
        self._idle = asyncio.Event()
        self._idle.set()
        self._closed = False
        self.runs = 0

    def __contains__(self, key: object) -> bool:
        return key in self._tasks

    def keys(self) -> list[K]:
        return list(self._tasks)

    def poke(self, key: K) -> None:
        if self._closed:
            return
        wake = self._wakes.get(key)
        if wake is None:
            wake = self._wakes[key] = asyncio.Event()
            self._tasks[key] = asyncio.create_task(self._run(key, wake), name=f"reconcile {key}")
        wake.set()

    async def close(self, grace: float = 0.0) -> None:
        """Take no more pokes; let work already running finish (up to ``grace`` seconds, so a
        SIGTERM never cuts a reconcile in half when it need not); then cancel the rest."""
        self._closed = True
        for wake in self._wakes.values():
            wake.clear()
        if grace > 0 and self._busy:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), grace)
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        self._wakes.clear()

    async def _settle(self, key: K, wake: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        while True:
            wake.clear()
            remaining = self._max_delay - (loop.time() - start)
            if remaining <= 0:
                return
            quiet = self._quiet
            if quiet <= 0:
                return
            try:
                await asyncio.wait_for(wake.wait(), min(quiet, remaining))
            except TimeoutError:
                return

    async def _run(self, key: K, wake: asyncio.Event) -> None:
        deadline: float | None = None
        failures = 0
        while True:
            if not wake.is_set():
                timeout = None if deadline is None else max(0.0, deadline - self._clock())
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), timeout)
            await self._settle(key, wake)
            await self._gate()
            if self._closed:
                await asyncio.Event().wait()  # closing: start nothing new; close() cancels us
            self._busy.add(key)
            self._idle.clear()
            try:
                self.runs += 1
                outcome = await self._work(key)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failures += 1
                delay = min(self._retry_max, self._retry_base * 2 ** (failures - 1))
                if failures == 1 or failures % 10 == 0:
                    log.warning(
                        "reconcile %s failed (%s); retrying in %.1fs", key, describe(exc), delay
                    )
                if not _expected(exc):
                    log.error("reconcile %s: unexpected %s", key, type(exc).__name__, exc_info=exc)
                deadline = self._clock() + delay
                continue
            finally:
                self._busy.discard(key)
                if not self._busy:
                    self._idle.set()
            failures = 0
            if not outcome.alive and not wake.is_set():
                del self._tasks[key], self._wakes[key]
                return
            deadline = self._clock() + self._resync
            if outcome.deadline is not None:
                deadline = min(deadline, outcome.deadline + 0.05)


def _expected(exc: BaseException) -> bool:
    return isinstance(exc, ApiException | Conflict | NotFound | OSError | TimeoutError)
