"""Reports from real proxy replicas reach ``kubectl``: a 429 through ``sideproxy serve --pool``
becomes the replica's ReplicaReport, which the operator folds into PoolKey status exactly once.

The operator's folding rules (high-water marks, leader changes, refusals) are tested on their
own in tests/operator/test_kube_reports.py with reports written by hand; here the writer is the
proxy itself. ``send`` / ``limited`` write a report exactly as a replica does, for tests that
need many reports without the traffic (tests/chaos).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from datetime import datetime
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException

from sideproxy.pool import KeyHealth, Transition
from sideproxy.wire import PLURAL, Cooling, KeyCounts, KeyReport, ReplicaReportSpec, report_body
from tests.e2e.cluster import GROUP, POOL, VERSION, Loop
from tests.e2e.procs import ProxyProc, burst, failures, wait_until
from tests.e2e.test_health_channel import MODEL, cooling, meet_a_429, reports

pytestmark = pytest.mark.kube

# Cumulative 429s per (namespace, replica, key), as a replica's counters are.
_SENT: Counter[tuple[str, str, str]] = Counter()


def limited(loop: Loop, key: str, seconds: float) -> Transition:
    return Transition(key, loop.fp(key), KeyHealth.COOLING, time.time() + seconds, "RateLimited")


def send(loop: Loop, *transitions: Transition, instance: str = "proxy-x") -> None:
    """Write replica ``instance``'s report as a proxy does (create, then merge patches of the
    spec): each transition is one 429 answered for its key, cooling it until ``until``."""
    latest: dict[str, Transition] = {}
    for change in transitions:
        _SENT[(loop.ns, instance, change.name)] += 1
        if change.name not in latest or (latest[change.name].until or 0) < (change.until or 0):
            latest[change.name] = change
    entries = [
        KeyReport(
            name=name,
            fingerprint=change.fingerprint,
            cooling=[Cooling(model=change.model or "", until=change.until)] if change.until else [],
            counts=KeyCounts(rate_limited=_SENT[(loop.ns, instance, name)]),
        )
        for name, change in sorted(latest.items())
    ]
    spec = ReplicaReportSpec(
        pool=POOL, replica=instance, heartbeat=time.time(), keys_reported=len(entries), keys=entries
    )
    body = report_body(loop.ns, spec)
    try:
        loop.custom.create_namespaced_custom_object(GROUP, VERSION, loop.ns, PLURAL, body)
    except ApiException as exc:
        if exc.status != 409:
            raise
        loop.custom.patch_namespaced_custom_object(
            GROUP, VERSION, loop.ns, PLURAL, body["metadata"]["name"], {"spec": body["spec"]}
        )


def until_of(status: dict[str, Any]) -> float:
    return datetime.fromisoformat(status["cooldownUntil"]).timestamp()


def writes(loop: Loop) -> dict[str, int]:
    """Stop the operator; the API writes it counted in this life (its last log line)."""
    assert loop.operator is not None
    assert loop.operator.stop() == 0, loop.operator.text()[-3000:]
    lines = [ln for ln in loop.operator.text().splitlines() if "API writes: " in ln]
    return dict(json.loads(lines[-1].split("API writes: ", 1)[1]))


def own_report(loop: Loop, proxy: ProxyProc) -> dict[str, Any]:
    (mine,) = [
        r for r in reports(loop).values() if r["spec"]["replica"].startswith(f"{proxy.name}-")
    ]
    return mine


def test_a_429_through_a_replica_is_counted_once_in_poolkey_status(loop: Loop) -> None:
    a = loop.proxies["a"]
    meet_a_429(loop, a, "key-1", retry_after=60)
    until = cooling(a, "key-1")
    assert until is not None

    status = wait_until(
        lambda: (s := loop.key_status("key-1")).get("rateLimitedCount") == 1 and s,
        30,
        "key-1's 429 in its status",
    )
    # Per model (the 429 named the model: key-1 serves other models, its phase stays Ready and
    # `kubectl get pk` lists the model cooling) or for every model (phase CoolingDown).
    if status.get("cooldownUntil"):
        assert status["phase"] == "CoolingDown"
        assert abs(until_of(status) - until) < 0.01
    else:
        (model,) = status["coolingModels"]
        assert model["model"] == MODEL
        assert abs(datetime.fromisoformat(model["until"]).timestamp() - until) < 0.01
        assert status["cooling"] == MODEL
    entry = next(k for k in own_report(loop, a)["spec"]["keys"] if k["name"] == "key-1")
    assert entry["counts"]["rateLimited"] == 1

    # a writes its report again (a 429 on key-2 now): key-1's count, already folded, stays 1.
    meet_a_429(loop, a, "key-2", retry_after=60)
    wait_until(
        lambda: loop.key_status("key-2").get("rateLimitedCount") == 1, 30, "key-2's 429 folded"
    )
    assert loop.key_status("key-1").get("rateLimitedCount") == 1
    assert not failures(burst(a.port, 6, concurrency=2))  # key-3 still serves everyone

    # kubectl shows whose report it is.
    table = loop.kube.kubectl("get", "replicareports", "-n", loop.ns).stdout
    header = table.splitlines()[0].split()
    assert header[:4] == ["NAME", "POOL", "REPLICA", "KEYS"]
    assert f"{POOL}-a-" in table
    assert not loop.leaks()
