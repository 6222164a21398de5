"""Reports from real proxy replicas reach ``kubectl``: a 429 through ``sideproxy serve --pool``
becomes the replica's ReplicaReport, which the operator folds into PoolKey status exactly once.

The operator's folding rules (high-water marks, leader changes, refusals) are tested on their
own in tests/operator/test_kube_reports.py with reports written by hand; here the writer is the
proxy itself.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import pytest

from tests.e2e.cluster import POOL, Loop
from tests.e2e.procs import ProxyProc, burst, failures, wait_until
from tests.e2e.test_health_channel import MODEL, cooling, meet_a_429, reports

pytestmark = pytest.mark.kube


def until_of(status: dict[str, Any]) -> float:
    return datetime.fromisoformat(status["cooldownUntil"]).timestamp()


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
