"""The proxy's half of the loop without a cluster: the EventReporter's windows, and a table that
can lengthen a replica's own cool-down but never shorten or reset it (fast, no ``kube``)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest
from kubernetes_asyncio.client.exceptions import ApiException

from sideproxy.models import KeyState, Provider, RoutingTable, TableKey, TableSettings, fingerprint
from sideproxy.pool import KeyHealth, Outcome, Transition
from sideproxy.proxy import POOL, RUNTIME, ProxySettings, Snapshot, create_app
from sideproxy.proxy.kube import EventReporter

NOW = 1_750_000_000.0
V1, V2 = "sk-CANARY-proxy-side-1", "sk-CANARY-proxy-side-2"


class Core:
    """Stands in for CoreV1Api.create_namespaced_event; can hold a POST in flight or fail it."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.failures: list[BaseException] = []
        self.hold: asyncio.Event | None = None
        self.calls = 0

    async def create_namespaced_event(
        self, namespace: str, body: dict[str, Any], _request_timeout: float | None = None
    ) -> None:
        self.calls += 1
        if self.hold is not None:
            await self.hold.wait()
        if self.failures:
            raise self.failures.pop(0)
        self.bodies.append(body)


class Clock:
    now = NOW

    def __call__(self) -> float:
        return self.now


def reporter(clock: Clock) -> tuple[EventReporter, Core]:
    rep = EventReporter(object(), "team", "p", instance="proxy-a", clock=clock)  # type: ignore[arg-type]
    core = Core()
    rep._core = core  # type: ignore[assignment]
    return rep, core


def limited(until: float, fp: str = fingerprint(V1), name: str = "key-1") -> Transition:
    return Transition(name, fp, KeyHealth.COOLING, until, "RateLimited")


async def drain(rep: EventReporter, core: Core, events: int) -> None:
    async with asyncio.timeout(5):
        while len(core.bodies) + rep.dropped < events:  # noqa: ASYNC110 - counters, no event
            await asyncio.sleep(0.005)


@pytest.fixture
async def running() -> Any:
    clock = Clock()
    rep, core = reporter(clock)
    task = asyncio.create_task(rep.run())
    yield rep, core, clock
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_a_storm_of_429s_is_one_event_per_window(running: Any) -> None:
    rep, core, clock = running
    core.hold = asyncio.Event()
    rep.report([limited(NOW + 30)])
    await asyncio.sleep(0.02)  # the first POST is in flight now
    for i in range(50):  # concurrent 429s of one window: deadlines a few ms apart
        rep.report([limited(NOW + 30 + i * 0.003)])
    core.hold.set()
    await drain(rep, core, 1)
    await asyncio.sleep(0.05)
    assert len(core.bodies) == 1
    assert core.calls == 1
    body = core.bodies[0]
    assert body["reason"] == "RateLimited"
    assert body["metadata"]["labels"] == {"sideproxy.dev/report": "true", "sideproxy.dev/pool": "p"}
    assert body["metadata"]["annotations"] == {
        "sideproxy.dev/fingerprint": fingerprint(V1),
        "sideproxy.dev/count": "1",
        "sideproxy.dev/until": f"{NOW + 30:.3f}",
    }
    assert body["involvedObject"]["kind"] == "PoolKey"
    assert body["involvedObject"]["name"] == "key-1"
    assert V1 not in json.dumps(body)

    # The next window is a new Event, carrying the answers folded into the last one.
    clock.now = NOW + 31
    rep.report([limited(NOW + 61)])
    await drain(rep, core, 2)
    assert core.bodies[1]["metadata"]["annotations"]["sideproxy.dev/count"] == "51"
    # A deadline that lengthens the reported one by more than the slack is reported too.
    rep.report([limited(NOW + 90)])
    await drain(rep, core, 3)
    assert len(core.bodies) == 3


async def test_answers_queued_behind_one_report_fold_into_it(running: Any) -> None:
    rep, core, _ = running
    core.hold = asyncio.Event()
    rep.report([limited(NOW + 5, name="other")])  # occupies the sender
    await asyncio.sleep(0.02)
    rep.report([limited(NOW + 30)] * 5)
    rep.report([limited(NOW + 35)])
    core.hold.set()
    await drain(rep, core, 2)
    (mine,) = [b for b in core.bodies if b["involvedObject"]["name"] == "key-1"]
    assert mine["metadata"]["annotations"]["sideproxy.dev/count"] == "6"
    assert mine["metadata"]["annotations"]["sideproxy.dev/until"] == f"{NOW + 35:.3f}"


async def test_revocations_are_per_value(running: Any) -> None:
    rep, core, _ = running
    revoked = Transition("key-1", fingerprint(V1), KeyHealth.REVOKED, None, "Unauthorized")
    rep.report([revoked])
    await drain(rep, core, 1)
    # The key's value is rotated, the new one is rejected too: that is news.
    rep.report([Transition("key-1", fingerprint(V2), KeyHealth.REVOKED, None, "Unauthorized")])
    await drain(rep, core, 2)
    assert [b["metadata"]["annotations"]["sideproxy.dev/fingerprint"] for b in core.bodies] == [
        fingerprint(V1), fingerprint(V2),
    ]  # fmt: skip
    assert "sideproxy.dev/until" not in core.bodies[0]["metadata"]["annotations"]


async def test_unreachable_api_is_retried_and_a_refusal_dropped(running: Any) -> None:
    rep, core, _ = running
    core.failures = [aiohttp.ClientConnectionError("refused"), TimeoutError()]
    rep.report([limited(NOW + 30)] * 3)
    await drain(rep, core, 1)
    assert core.calls == 3
    assert core.bodies[0]["metadata"]["annotations"]["sideproxy.dev/count"] == "3"
    core.failures = [ApiException(status=403, reason="Forbidden")]
    rep.report([limited(NOW + 30, name="key-2")])
    await drain(rep, core, 2)
    assert rep.dropped == 1
    assert len(core.bodies) == 1


# --------------------------------------------------------------------------- the compile step


def table(version: int, *keys: TableKey) -> RoutingTable:
    return RoutingTable(
        pool="p",
        version=version,
        settings=TableSettings(
            default_provider=Provider.CUSTOM,
            base_urls={Provider.CUSTOM: "http://127.0.0.1:9/v1"},
        ),
        keys=list(keys),
    ).sealed(version)


def entry(name: str, value: str, weight: int = 1, until: float | None = None) -> TableKey:
    return TableKey(
        name=name,
        provider=Provider.CUSTOM,
        tier=0,
        weight=weight,
        fingerprint=fingerprint(value),
        state=KeyState.COOLING if until else KeyState.READY,
        cooldown_until=until,
    )


def test_a_table_never_shortens_or_resets_a_local_cool_down() -> None:
    clock = Clock()
    app = create_app(ProxySettings(), clock=clock)
    runtime, pool = app[RUNTIME], app[POOL]
    material = {"key-1": V1, "key-2": V2}
    assert runtime.apply(Snapshot(table(1, entry("key-1", V1), entry("key-2", V2)), material))

    def health() -> tuple[str, float | None]:
        (status,) = [s for s in pool.statuses(clock.now) if s.name == "key-1"]
        return status.health.value, status.until

    # This replica sees a 429 on key-1: cooling for 30 s by its own knowledge.
    while (key := pool.acquire("custom", clock.now)) is not None and key.name != "key-1":
        pool.release(key, Outcome.OK, clock.now)
    assert key is not None
    pool.release(key, Outcome.RATE_LIMITED, clock.now, {"retry-after": "30"})
    assert health() == ("cooling", NOW + 30)

    # A new table (another key changed) still says key-1 is ready: it stays cooling.
    assert runtime.apply(
        Snapshot(table(2, entry("key-1", V1), entry("key-2", V2, weight=5)), material)
    )
    assert health() == ("cooling", NOW + 30)
    # The cluster knows a longer cool-down: it lengthens ours...
    assert runtime.apply(
        Snapshot(table(3, entry("key-1", V1, until=NOW + 60), entry("key-2", V2)), material)
    )
    assert health() == ("cooling", NOW + 60)
    # ...and a shorter one, or none, never shortens it.
    assert runtime.apply(
        Snapshot(table(4, entry("key-1", V1, until=NOW + 10), entry("key-2", V2)), material)
    )
    assert health() == ("cooling", NOW + 60)
    assert runtime.apply(Snapshot(table(5, entry("key-1", V1), entry("key-2", V2)), material))
    assert health() == ("cooling", NOW + 60)
    clock.now = NOW + 61
    assert health() == ("ready", None)
    assert runtime.compiled is not None
    assert runtime.compiled.version == 5
