"""The operator consuming proxy reports on the real API server, reports posted by the proxy's own
``EventReporter`` (the very body a replica sends), with the admin kubeconfig.

At least once across operator restarts, exactly once otherwise; a longer deadline never
shortens; Unauthorized revokes until the value changes; a report about a rotated-away value
changes nothing; 1,000 keys cooling at once cost a bounded number of writes.
"""

from __future__ import annotations

import asyncio
import json
import time
from datetime import datetime
from typing import Any

import pytest
import yaml

from sideproxy.models import KeyState, fingerprint
from sideproxy.pool import KeyHealth, Transition
from sideproxy.proxy import kube as proxy_kube
from tests.e2e.cluster import POOL, Loop, values
from tests.e2e.procs import wait_until

pytestmark = pytest.mark.kube


def send(loop: Loop, *transitions: Transition, instance: str = "proxy-x") -> None:
    """Post reports exactly as a proxy replica does, and wait until all are sent."""

    async def main() -> None:
        async with proxy_kube.cluster_clients(str(loop.kube.kubeconfig)) as api:
            reporter = proxy_kube.EventReporter(api, loop.ns, POOL, instance=instance)
            task = asyncio.create_task(reporter.run())
            try:
                reporter.report(list(transitions))
                events = len({(t.name, t.reason, t.fingerprint) for t in transitions})
                deadline = time.monotonic() + 60
                while reporter.sent + reporter.dropped < events:
                    assert time.monotonic() < deadline, "reports not sent"
                    await asyncio.sleep(0.01)
                assert reporter.dropped == 0
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    asyncio.run(main())


def limited(loop: Loop, key: str, seconds: float) -> Transition:
    return Transition(key, loop.fp(key), KeyHealth.COOLING, time.time() + seconds, "RateLimited")


def until_of(status: dict[str, Any]) -> float:
    return datetime.fromisoformat(status["cooldownUntil"]).timestamp()


def writes(loop: Loop) -> dict[str, int]:
    """Stop the operator; the API writes it counted in this life (its last log line)."""
    assert loop.operator is not None
    assert loop.operator.stop() == 0, loop.operator.text()[-3000:]
    lines = [ln for ln in loop.operator.text().splitlines() if "API writes: " in ln]
    return dict(json.loads(lines[-1].split("API writes: ", 1)[1]))


def consumed(loop: Loop, key: str) -> list[Any]:
    return [e for e in loop.reports(key) if (e.metadata.labels or {}).get("sideproxy.dev/consumed")]


def wait_status(loop: Loop, key: str, check: Any, what: str, timeout: float = 15) -> Any:
    return wait_until(lambda: (s := loop.key_status(key)) and check(s) and s, timeout, what)


def test_reports_apply_once_and_survive_a_restart(bare_loop: Loop) -> None:
    loop = bare_loop
    loop.apply_pool(values(2))
    loop.start_operator()
    loop.wait_table(lambda t: len(t.keys) == 2, 30, "the table")

    first = limited(loop, "key-1", 30)
    send(loop, first, first, first)  # one report standing for three 429s
    status = wait_status(loop, "key-1", lambda s: s.get("rateLimitedCount") == 3, "3 429s")
    assert status["phase"] == "CoolingDown"
    assert first.until is not None
    assert abs(until_of(status) - first.until) < 0.01
    assert status["lastRateLimited"]
    cond = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert (cond["status"], cond["reason"]) == ("False", "RateLimited")
    table = loop.wait_table(
        lambda t: t.keys[0].state is KeyState.COOLING, 5, "key-1 cooling in the table"
    )
    assert table.keys[0].cooldown_until == pytest.approx(first.until, abs=0.01)
    (event,) = wait_until(lambda: consumed(loop, "key-1"), 5, "the report consumed")
    key_uid = loop.key("key-1")["metadata"]["uid"]
    assert event.involved_object.uid == key_uid  # so that kubectl describe finds it
    described = loop.kube.kubectl("describe", "poolkey", "key-1", "-n", loop.ns).stdout
    assert "RateLimited" in described
    assert "reported by proxy-x" in " ".join(described.split())
    assert writes(loop).get("events/patch") == 1

    # While the operator is down a replica reports a later deadline; the restarted operator
    # applies it, and does not count the consumed one again.
    later = limited(loop, "key-1", 40)
    send(loop, later, later)
    assert not consumed(loop, "key-1")[1:]
    loop.start_operator()
    status = wait_status(loop, "key-1", lambda s: s.get("rateLimitedCount") == 5, "5 429s")
    assert later.until is not None
    assert abs(until_of(status) - later.until) < 0.01
    wait_until(lambda: len(consumed(loop, "key-1")) == 2, 5, "both reports consumed")

    # A shorter deadline counts, and does not shorten the cool-down.
    send(loop, limited(loop, "key-1", 5))
    status = wait_status(loop, "key-1", lambda s: s.get("rateLimitedCount") == 6, "6 429s")
    assert abs(until_of(status) - later.until) < 0.01
    wait_until(lambda: len(consumed(loop, "key-1")) == 3, 5, "three reports consumed")
    time.sleep(1)  # nothing more happens: no write loop, no re-count
    assert loop.key_status("key-1")["rateLimitedCount"] == 6
    assert writes(loop).get("events/patch") == 2
    assert loop.key_status("key-2")["phase"] == "Ready"
    assert not loop.leaks()


def test_unauthorized_revokes_until_the_value_changes(bare_loop: Loop) -> None:
    loop = bare_loop
    loop.apply_pool(values(2))
    loop.start_operator()
    loop.wait_table(lambda t: len(t.keys) == 2, 30, "the table")

    # A report about a value key-1 no longer holds changes nothing (and is consumed).
    old_value = fingerprint("an old value")
    stale = Transition("key-1", old_value, KeyHealth.REVOKED, None, "Unauthorized")
    send(loop, stale)
    wait_until(lambda: consumed(loop, "key-1"), 10, "the stale report consumed")
    assert loop.key_status("key-1")["phase"] == "Ready"

    send(loop, Transition("key-2", loop.fp("key-2"), KeyHealth.REVOKED, None, "Unauthorized"))
    status = wait_status(loop, "key-2", lambda s: s.get("phase") == "Revoked", "key-2 Revoked")
    assert status["fingerprint"] == loop.fp("key-2")
    assert status["observedGeneration"] == loop.key("key-2")["metadata"]["generation"]
    table = loop.wait_table(
        lambda t: t.keys[1].state is KeyState.REVOKED, 5, "key-2 revoked in the table"
    )
    assert table.keys[0].state is KeyState.READY
    # No second Event from the operator: the proxy's report is the Event.
    events = loop.core.list_namespaced_event(
        loop.ns, field_selector="involvedObject.name=key-2"
    ).items
    assert [e.reason for e in events] == ["Unauthorized"]

    loop.rotate("key-2", "sk-CANARY-e2e-new-key-2")
    wait_status(loop, "key-2", lambda s: s.get("phase") == "Ready", "key-2 Ready again")
    loop.wait_table(lambda t: t.keys[1].state is KeyState.READY, 5, "key-2 back in the table")
    assert not loop.leaks()


def test_an_open_breaker_cools_until_its_deadline(bare_loop: Loop) -> None:
    loop = bare_loop
    loop.apply_pool(values(2))
    loop.start_operator()
    loop.wait_table(lambda t: len(t.keys) == 2, 30, "the table")
    until = time.time() + 3
    send(loop, Transition("key-1", loop.fp("key-1"), KeyHealth.OPEN, until, "CircuitOpen"))
    status = wait_status(loop, "key-1", lambda s: s.get("phase") == "CoolingDown", "cooling")
    cond = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert cond["reason"] == "CircuitOpen"
    assert status.get("rateLimitedCount", 0) == 0
    assert abs(until_of(status) - until) < 0.01
    wait_status(loop, "key-1", lambda s: s.get("phase") == "Ready", "Ready after it", 10)
    loop.wait_table(lambda t: t.keys[0].state is KeyState.READY, 5, "key-1 back in the table")


def test_a_thousand_keys_cooling_at_once_is_a_bounded_number_of_writes(bare_loop: Loop) -> None:
    loop = bare_loop
    n = 1000
    keys = values(n, "big")
    loop.secret_values = keys
    loop.canaries.update(keys.values())
    manifest = loop.workdir / "big.yaml"
    docs = [loop.secret_doc(keys), *(loop.key_doc(name) for name in keys)]
    pool = {
        "apiVersion": "sideproxy.dev/v1alpha1", "kind": "CreditPool", "metadata": {"name": POOL},
        "spec": {"defaultProvider": "custom", "clientAuth": {"disabled": True},
                 "providers": [{"name": "custom", "baseURL": loop.fake.base_url}]},
    }  # fmt: skip
    manifest.write_text(yaml.safe_dump_all([pool, *docs]))
    loop.kube.kubectl("create", "-n", loop.ns, "-f", str(manifest), "--request-timeout=120s")
    loop.start_operator()
    loop.wait_table(lambda t: len(t.keys) == n, 120, "a table of 1,000 keys")
    wait_until(
        lambda: all((i.get("status") or {}).get("phase") == "Ready" for i in loop.poolkeys()),
        120,
        "1,000 Ready keys",
        interval=1,
    )
    before = loop.table()
    assert before is not None
    started = time.time()
    send(loop, *(limited(loop, name, 300) for name in keys))
    table = loop.wait_table(
        lambda t: all(k.state is KeyState.COOLING for k in t.keys), 60, "1,000 keys cooling"
    )
    took = time.time() - started

    def all_cooling() -> bool:
        items = loop.poolkeys()
        return all((i.get("status") or {}).get("phase") == "CoolingDown" for i in items)

    wait_until(all_cooling, 120, "1,000 CoolingDown statuses", interval=1)
    wait_until(
        lambda: (
            len(
                loop.core.list_namespaced_event(
                    loop.ns, label_selector="sideproxy.dev/report=true,!sideproxy.dev/consumed"
                ).items
            )
            == 0
        ),
        60,
        "every report consumed",
        interval=0.5,
    )
    counted = writes(loop)
    table_writes = table.version - before.version
    print(f"1,000 reports: table cooling after {took:.1f}s, {table_writes} table writes, {counted}")
    assert table_writes <= 10, f"the table was written {table_writes} times for 1,000 reports"
    assert counted["ConfigMap/update"] <= 12, counted  # the initial Ready churn included
    assert counted["events/patch"] == n, counted
    assert counted["poolkeys/status"] <= 2 * n + 50, counted  # Ready once, CoolingDown once
