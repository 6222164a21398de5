"""The operator's report consumer without a cluster: the pure merge, the book, and the
reconcile against the in-memory API server of tests/operator/fakes.py (fast, no ``kube``).

The same behaviour on the real API server, with real processes, is in test_reports.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import pytest
from kubernetes_asyncio.client.exceptions import ApiException

from sideproxy.models import TABLE_DATA_KEY, CreditPoolSpec, KeyState, RoutingTable, fingerprint
from sideproxy.operator._debounce import Debouncer, Outcome
from sideproxy.operator._reconcile import Indices, Reconciler
from sideproxy.operator._reports import (
    REPORT_SELECTOR,
    Report,
    ReportBook,
    apply_reports,
    rfc3339_ms,
    urgent,
)
from tests.operator.fakes import FakeKube, LiveIndices, key, pool, secret

NS = "team"
NOW = 1_750_000_000.0
A, B = "gsk_CANARY_report_a", "gsk_CANARY_report_b"


def event(
    uid: str,
    key_name: str = "k-a",
    reason: str = "RateLimited",
    *,
    until: float | None = NOW + 30,
    count: int = 1,
    value: str | None = A,
    at: str = "2025-06-15T15:06:40Z",
    consumed: bool = False,
) -> dict[str, Any]:
    annotations = {"sideproxy.dev/count": str(count)}
    if until is not None:
        annotations["sideproxy.dev/until"] = f"{until:.3f}"
    if value is not None:
        annotations["sideproxy.dev/fingerprint"] = fingerprint(value)
    labels = {"sideproxy.dev/report": "true", "sideproxy.dev/pool": "p"}
    if consumed:
        labels["sideproxy.dev/consumed"] = "true"
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {
            "name": f"{key_name}.{uid}",
            "namespace": NS,
            "uid": uid,
            "labels": labels,
            "annotations": annotations,
        },
        "involvedObject": {
            "apiVersion": "sideproxy.dev/v1alpha1",
            "kind": "PoolKey",
            "name": key_name,
            "namespace": NS,
        },
        "reason": reason,
        "count": count,
        "lastTimestamp": at,
    }


def report(uid: str, *args: Any, **kwargs: Any) -> Report:
    parsed = Report.of(event(uid, *args, **kwargs))
    assert parsed is not None
    return parsed


# --------------------------------------------------------------------------- pure


def test_report_of_an_event() -> None:
    r = report("e1", count=3)
    assert (r.key, r.pool, r.reason, r.count, r.until) == ("k-a", "p", "RateLimited", 3, NOW + 30)
    assert r.fingerprint == fingerprint(A)
    assert r.at == datetime.fromisoformat("2025-06-15T15:06:40+00:00").timestamp()
    assert r.consumed is False
    assert r.consumed_patch("uid-k") == {
        "metadata": {"labels": {"sideproxy.dev/consumed": "true"}},
        "involvedObject": {"uid": "uid-k"},
    }
    not_a_key = event("e2")
    not_a_key["involvedObject"]["kind"] = "Pod"
    assert Report.of(not_a_key) is None
    unlabelled = event("e3")
    del unlabelled["metadata"]["labels"]["sideproxy.dev/report"]
    assert Report.of(unlabelled) is None
    odd = event("e4")
    odd["metadata"]["annotations"] = {"sideproxy.dev/until": "soon", "sideproxy.dev/count": "-2"}
    parsed = Report.of(odd)
    assert parsed is not None
    assert (parsed.until, parsed.count, parsed.fingerprint) == (None, 1, None)
    assert REPORT_SELECTOR == "sideproxy.dev/report=true,!sideproxy.dev/consumed"


def test_a_longer_deadline_never_shortens() -> None:
    spec = CreditPoolSpec()
    current = {"cooldownUntil": rfc3339_ms(NOW + 60), "rateLimitedCount": 4}
    applied = apply_reports(
        current, [report("e1", until=NOW + 10, count=2)], fingerprint=fingerprint(A),
        generation=1, spec=spec, now=NOW,
    )  # fmt: skip
    assert applied.status["cooldownUntil"] == current["cooldownUntil"]
    assert applied.status["rateLimitedCount"] == 6
    assert applied.deadline_reason is None
    precise = dataclasses.replace(report("e1"), until=NOW + 90.0001)
    longer = apply_reports(
        current, [precise], fingerprint=fingerprint(A), generation=1, spec=spec, now=NOW
    )
    assert longer.status["cooldownUntil"] == "2025-06-15T15:08:10.001Z"  # rounded up
    assert longer.deadline_reason == "RateLimited"
    # A deadline that is over holds nothing back; a report past its deadline only counts.
    over = {"cooldownUntil": rfc3339_ms(NOW - 5)}
    fresh = apply_reports(
        over, [report("e1", until=NOW + 3)], fingerprint=fingerprint(A), generation=1,
        spec=spec, now=NOW,
    )  # fmt: skip
    assert fresh.status["cooldownUntil"] == rfc3339_ms(NOW + 3)
    late = apply_reports(
        {}, [report("e1", until=NOW - 1)], fingerprint=fingerprint(A), generation=1,
        spec=spec, now=NOW,
    )  # fmt: skip
    assert "cooldownUntil" not in late.status
    assert late.status["rateLimitedCount"] == 1


def test_reports_are_bounded_and_checked_against_the_value() -> None:
    spec = CreditPoolSpec.model_validate({"cooldown": {"maxSeconds": 120}})
    capped = apply_reports(
        {}, [report("e1", until=NOW + 10_000)], fingerprint=fingerprint(A), generation=1,
        spec=spec, now=NOW,
    )  # fmt: skip
    assert capped.status["cooldownUntil"] == rfc3339_ms(NOW + 120)
    stale = apply_reports(
        {}, [report("e1", value="a rotated-away value")], fingerprint=fingerprint(A),
        generation=1, spec=spec, now=NOW,
    )  # fmt: skip
    assert stale.status == {}
    assert [r.uid for r in stale.stale] == ["e1"]
    assert not stale.used
    unreadable = apply_reports(
        {}, [report("e1")], fingerprint=None, generation=1, spec=spec, now=NOW
    )
    assert unreadable.status == {}


def test_unauthorized_and_breaker_reports() -> None:
    spec = CreditPoolSpec()
    revoked = apply_reports(
        {"phase": "Ready"}, [report("e1", reason="Unauthorized", until=None)],
        fingerprint=fingerprint(A), generation=7, spec=spec, now=NOW,
    )  # fmt: skip
    assert revoked.revoked
    assert revoked.status == {"phase": "Revoked", "fingerprint": fingerprint(A),
                              "observedGeneration": 7}  # fmt: skip
    breaker = apply_reports(
        {}, [report("e1", reason="CircuitOpen", until=NOW + 20)], fingerprint=fingerprint(A),
        generation=1, spec=spec, now=NOW,
    )  # fmt: skip
    assert breaker.status == {"cooldownUntil": rfc3339_ms(NOW + 20)}  # no 429 counted
    assert breaker.deadline_reason == "CircuitOpen"


def test_urgency() -> None:
    limited = report("e1", until=NOW + 30)
    assert urgent(limited, None, NOW)
    assert urgent(limited, (False, None), NOW)
    assert not urgent(limited, (False, NOW + 29.5), NOW)  # the other replica's report of it
    assert urgent(limited, (False, NOW + 20), NOW)
    assert not urgent(limited, (True, None), NOW)  # revoked already: nothing to win
    assert not urgent(report("e2", until=NOW - 1), None, NOW)
    assert urgent(report("e3", reason="Unauthorized", until=None), (False, None), NOW)
    assert not urgent(report("e3", reason="Unauthorized", until=None), (True, None), NOW)


def test_the_book_files_each_event_once() -> None:
    book = ReportBook()
    pool_id = (NS, "p")
    assert book.add(pool_id, report("e1"))
    assert not book.add(pool_id, report("e1"))  # re-listed after a watch restart
    assert book.add(pool_id, report("e2", "k-b"))
    book.forget("e2")  # consumed by another replica
    taken = book.take(pool_id)
    assert {k: [r.uid for r in rs] for k, rs in taken.by_key.items()} == {"k-a": ["e1"]}
    assert not book.add(pool_id, report("e1")), "in flight: a re-delivery must not re-apply it"
    book.give_back(pool_id, taken.by_key["k-a"])
    assert [r.uid for r in book.take(pool_id).by_key["k-a"]] == ["e1"]
    book.to_mark(pool_id, [report("e1")], "uid-k-a")
    assert [m[0].uid for m in book.take(pool_id).marks] == ["e1"]


# --------------------------------------------------------------------------- reconcile


class Kube(FakeKube):
    """FakeKube plus Event PATCH (the consumed label) and failure injection by path."""

    def __init__(self) -> None:
        super().__init__()
        self.event_patches: dict[str, dict[str, Any]] = {}
        self.fail_path: dict[str, BaseException] = {}

    async def request(
        self,
        method: str,
        path: str,
        body: Mapping[str, Any] | None = None,
        content_type: str = "application/json",
    ) -> dict[str, Any]:
        for part, exc in list(self.fail_path.items()):
            if part in path and method == "PATCH":
                del self.fail_path[part]
                raise exc
        if method == "PATCH" and "/events/" in path:
            assert body is not None
            self.calls.append((method, path))
            self.event_patches[path.rsplit("/", 1)[1]] = dict(body)
            return dict(body)
        return await super().request(method, path, body, content_type)


class Snapshot:
    """Indices frozen at one moment (kopf's lag behind our own writes), refreshed on demand."""

    def __init__(self, kube: FakeKube) -> None:
        self._kube = kube
        self.now: Indices = kube.indices()

    def refresh(self) -> None:
        self.now = self._kube.indices()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.now, name)


@pytest.fixture
def kube() -> Kube:
    k = Kube()
    k.put("secrets", secret(NS, "groq", {"a": A, "b": B}))
    k.put("creditpools", pool(NS, "p", {"providers": [{"name": "groq"}]}))
    k.put("poolkeys", key(NS, "k-a", "p", "groq", "a"))
    k.put("poolkeys", key(NS, "k-b", "p", "groq", "b"))
    return k


class Clock:
    now = NOW

    def __call__(self) -> float:
        return self.now


def make(kube: Kube, indices: Any = None) -> tuple[Reconciler, list[tuple[str, Any]]]:
    rec = Reconciler(kube, indices or LiveIndices(kube), clock=Clock())  # type: ignore[arg-type]
    pokes: list[tuple[str, Any]] = []
    rec.workers.poke = lambda k: pokes.append(("poke", k))  # type: ignore[method-assign,assignment]
    rec.workers.hurry = lambda k: pokes.append(("hurry", k))  # type: ignore[method-assign,assignment]
    return rec, pokes


def the_table(kube: Kube) -> RoutingTable:
    cm = kube.get("configmaps", NS, "p-routing")
    assert cm is not None
    return RoutingTable.from_json(cm["data"][TABLE_DATA_KEY])


def key_status(kube: Kube, name: str) -> dict[str, Any]:
    obj = kube.get("poolkeys", NS, name)
    assert obj is not None
    return dict(obj.get("status") or {})


async def test_a_report_reaches_status_table_and_is_consumed(kube: Kube) -> None:
    rec, pokes = make(kube)
    await rec.reconcile((NS, "p"))
    rec.report_event(event("e1", count=2), deleted=False)
    assert pokes == [("hurry", (NS, "p"))]
    writes_before = dict(kube.writes)
    await rec.reconcile((NS, "p"))

    a = the_table(kube).keys[0]
    assert (a.name, a.state, a.cooldown_until) == ("k-a", KeyState.COOLING, NOW + 30)
    st = key_status(kube, "k-a")
    assert st["phase"] == "CoolingDown"
    assert st["cooldownUntil"] == rfc3339_ms(NOW + 30)
    assert st["rateLimitedCount"] == 2
    assert st["lastRateLimited"] == "2025-06-15T15:06:40Z"
    ready = next(c for c in st["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "RateLimited")
    assert kube.event_patches["k-a.e1"] == {
        "metadata": {"labels": {"sideproxy.dev/consumed": "true"}},
        "involvedObject": {"uid": "uid-k-a"},
    }
    assert kube.events == [], "the proxy's report is the Event; the operator adds none"
    # Table first, then the key, then the pool, then the mark: one write each.
    delta = {k: v - writes_before.get(k, 0) for k, v in kube.writes.items()}
    assert {k: v for k, v in delta.items() if v} == {
        "ConfigMap/update": 1, "poolkeys/status": 1, "creditpools/status": 1, "events/patch": 1,
    }  # fmt: skip

    # The consumed Event leaves the watch (DELETED); the same report re-listed is not re-counted.
    rec.report_event(event("e1", count=2, consumed=True), deleted=True)
    rec.report_event(event("e1", count=2, consumed=True), deleted=False)
    await rec.reconcile((NS, "p"))
    assert key_status(kube, "k-a")["rateLimitedCount"] == 2
    assert kube.writes["events/patch"] == 1


async def test_a_failed_status_write_applies_the_report_once_on_retry(kube: Kube) -> None:
    rec, _ = make(kube)
    await rec.reconcile((NS, "p"))
    rec.report_event(event("e1", count=2), deleted=False)
    kube.fail_path["/poolkeys/k-a/status"] = ApiException(status=500, reason="boom")
    with pytest.raises(ApiException):
        await rec.reconcile((NS, "p"))
    assert "k-a.e1" not in kube.event_patches
    await rec.reconcile((NS, "p"))
    assert key_status(kube, "k-a")["rateLimitedCount"] == 2
    assert "k-a.e1" in kube.event_patches


async def test_a_failed_mark_is_retried_without_recounting(kube: Kube) -> None:
    rec, _ = make(kube)
    await rec.reconcile((NS, "p"))
    rec.report_event(event("e1", count=2), deleted=False)
    kube.fail_path["/events/k-a.e1"] = ApiException(status=503, reason="busy")
    with pytest.raises(ApiException):
        await rec.reconcile((NS, "p"))
    assert key_status(kube, "k-a")["rateLimitedCount"] == 2
    await rec.reconcile((NS, "p"))
    assert key_status(kube, "k-a")["rateLimitedCount"] == 2
    assert "k-a.e1" in kube.event_patches


async def test_reports_build_on_our_own_patch_before_its_echo(kube: Kube) -> None:
    """kopf's index lags behind our status patch: the next report must add to the patched
    count, not to the one the index still shows."""
    indices = Snapshot(kube)
    rec, _ = make(kube, indices)
    await rec.reconcile((NS, "p"))
    indices.refresh()
    rec.report_event(event("e1", count=2), deleted=False)
    await rec.reconcile((NS, "p"))
    rec.report_event(event("e2", count=3, until=NOW + 40), deleted=False)
    await rec.reconcile((NS, "p"))  # the index still holds k-a from before e1
    st = key_status(kube, "k-a")
    assert st["rateLimitedCount"] == 5
    assert st["cooldownUntil"] == rfc3339_ms(NOW + 40)
    # The echoes arrive: ours, so no trigger; the freshest state is the index's again.
    indices.refresh()
    body = kube.get("poolkeys", NS, "k-a")
    assert body is not None
    pokes: list[Any] = []
    rec.workers.poke = pokes.append  # type: ignore[method-assign,assignment]
    rec.key_event(body, deleted=False)
    assert pokes == []


async def test_reports_for_unknown_keys_or_values_are_consumed_unapplied(kube: Kube) -> None:
    rec, _ = make(kube)
    await rec.reconcile((NS, "p"))
    rec.report_event(event("e1", "k-gone"), deleted=False)
    rec.report_event(event("e2", value="an old value"), deleted=False)
    await rec.reconcile((NS, "p"))
    assert set(kube.event_patches) == {"k-gone.e1", "k-a.e2"}
    assert key_status(kube, "k-a")["phase"] == "Ready"
    assert "rateLimitedCount" not in key_status(kube, "k-a")


async def test_unauthorized_revokes_and_a_breaker_says_so(kube: Kube) -> None:
    rec, _ = make(kube)
    await rec.reconcile((NS, "p"))
    rec.report_event(event("e1", "k-b", "Unauthorized", until=None, value=B), deleted=False)
    rec.report_event(event("e2", "k-a", "CircuitOpen", until=NOW + 10), deleted=False)
    await rec.reconcile((NS, "p"))
    a, b = the_table(kube).keys
    assert (a.state, b.state) == (KeyState.COOLING, KeyState.REVOKED)
    st = key_status(kube, "k-b")
    assert (st["phase"], st["fingerprint"], st["observedGeneration"]) == (
        "Revoked", fingerprint(B), 1,
    )  # fmt: skip
    ready = next(c for c in key_status(kube, "k-a")["conditions"] if c["type"] == "Ready")
    assert (ready["reason"], ready["message"]) == (
        "CircuitOpen", "circuit breaker open after repeated upstream failures",
    )  # fmt: skip
    assert [e["reason"] for e in kube.events] == ["NoUsableKey"]  # the pool's; none per key
    # Without new reports the reason stays CircuitOpen (no flapping rewrite) until the end.
    before = kube.writes["poolkeys/status"]
    await rec.reconcile((NS, "p"))
    assert kube.writes["poolkeys/status"] == before


async def test_hurry_skips_the_quiet_period() -> None:
    calls: list[float] = []
    ran = asyncio.Event()

    async def work(_: str) -> Outcome:
        calls.append(time.monotonic())
        ran.set()
        return Outcome()

    workers: Debouncer[str] = Debouncer(work, quiet=1.0, max_delay=2.0, urgent_quiet=0.01)
    try:
        started = time.monotonic()
        workers.hurry("p")
        async with asyncio.timeout(0.5):
            await ran.wait()
        assert calls[0] - started < 0.2
        workers.poke("p")
        await asyncio.sleep(0.3)
        assert len(calls) == 1, "a plain poke still waits for quiet"
    finally:
        await workers.close()


def test_the_event_watch_is_narrowed_by_the_api_server() -> None:
    """kopf's handler ``labels=`` filter is client-side; the selector in the settings is what
    the API server sees, so the operator lists and watches only unconsumed reports."""
    from kopf._cogs.structs.references import Resource  # noqa: PLC0415

    from sideproxy.operator._runner import kopf_settings  # noqa: PLC0415

    settings = kopf_settings()
    events = Resource("", "v1", "events", kind="Event", namespaced=True)
    assert settings.watching.label_selectors.collect(events) == [REPORT_SELECTOR]
    secrets = Resource("", "v1", "secrets", kind="Secret", namespaced=True)
    assert settings.watching.label_selectors.collect(secrets) == []
