"""The health channel on a real API server: ``sideproxy serve --pool`` replicas (processes with
the chart's proxy rights only) share key health through their ReplicaReports, never through the
routing table; and nobody else can speak on that channel (issue 15.11).

Fixture ``loop``: the operator (it writes the routing table), replicas ``a`` and ``b``, the fake
provider. Waits are for events (a replica's status, an object), never fixed sleeps.
"""

from __future__ import annotations

import json
from typing import Any, cast

import pytest

from sideproxy.models import POOL_LABEL
from tests.e2e.cluster import GROUP, POOL, VERSION, Loop
from tests.e2e.procs import ProxyProc, burst, failures, wait_until

pytestmark = pytest.mark.kube


def reports(loop: Loop) -> dict[str, dict[str, Any]]:
    """The namespace's ReplicaReports by name, as the admin sees them."""
    listing = loop.custom.list_namespaced_custom_object(GROUP, VERSION, loop.ns, "replicareports")
    return {item["metadata"]["name"]: item for item in cast(dict[str, Any], listing)["items"]}


MODEL = "fake-model"  # what tests.e2e.procs.CHAT asks for


def cooling(proxy: ProxyProc, key: str, model: str = MODEL) -> float | None:
    """The deadline ``proxy`` holds for ``key`` (for ``model``, or for every model) when it is
    cooling, else None."""
    state = proxy.key(key)
    if state.get("health") == "cooling":
        return float(state["until"])
    deadlines = [float(until) for m, until in state.get("cooling") or () if m == model]
    return max(deadlines) if deadlines else None


def meet_a_429(loop: Loop, proxy: ProxyProc, key: str, retry_after: float) -> None:
    """Make ``key``'s next answer a 429 and send through ``proxy`` until it has met it."""
    # The fake provider knows a key once it has served it: every key serves a few first.
    assert not failures(burst(proxy.port, 6, concurrency=1))
    loop.fake.configure(
        faults={loop.fp(key): [{"action": "status", "status": 429, "retry_after": retry_after}]}
    )

    def met() -> bool:
        outcomes = burst(proxy.port, 3, concurrency=1)
        assert not failures(outcomes), outcomes  # retried on another key: the client sees 200
        return cooling(proxy, key) is not None

    wait_until(met, 30, f"{proxy.name} meets the 429 on {key}", interval=0)


def test_a_429_reaches_the_other_replica_on_the_channel_not_the_table(loop: Loop) -> None:
    a, b = loop.proxies["a"], loop.proxies["b"]
    table_before = loop.table()
    assert table_before is not None

    meet_a_429(loop, a, "key-1", retry_after=60)
    until = cooling(a, "key-1")
    assert until is not None
    # b cools key-1 without a 429 of its own, until the same deadline.
    wait_until(lambda: cooling(b, "key-1") == until, 10, "b cools key-1 to a's deadline")
    assert loop.fake.statuses().get(loop.fp("key-1"), {}).get(429) == 1

    # It travelled on a's ReplicaReport; b's own report does not echo it.
    found = reports(loop)
    (mine,) = [r for r in found.values() if r["spec"]["replica"].startswith("a-")]
    (theirs,) = [r for r in found.values() if r["spec"]["replica"].startswith("b-")]
    assert mine["metadata"]["labels"] == {POOL_LABEL: POOL}
    entry = next(k for k in mine["spec"]["keys"] if k["name"] == "key-1")
    (said,) = entry["cooling"]
    assert said["until"] == until
    assert said["model"] in ("", MODEL)  # per model, or the whole key if the 429 named none
    assert entry["fingerprint"] == loop.fp("key-1")
    assert all(not k.get("cooling") for k in theirs["spec"].get("keys", []))
    # ...and not on the routing table: a 429 never rewrites configuration.
    table_after = loop.table()
    assert table_after is not None
    assert table_after.version == table_before.version

    # A configuration change (key-2's weight) keeps key-1's place: still cooling everywhere.
    loop.apply(loop.key_doc("key-2", weight=3))
    wait_until(
        lambda: (t := loop.table()) is not None and t.version > table_before.version,
        30,
        "the weight change in the table",
    )
    wait_until(
        lambda: next(k for k in b.status()["keys"] if k["name"] == "key-2")["weight"] == 3,
        30,
        "b serving the new table",
    )
    assert cooling(a, "key-1") == until
    assert cooling(b, "key-1") == until

    # A replica that starts now learns the cool-down before it serves its first request.
    (c,) = loop.start_proxies(["c"], loop.proxy_kubeconfig())
    c.wait_ready(timeout=60)
    assert cooling(c, "key-1") == until
    assert loop.fake.statuses().get(loop.fp("key-1"), {}).get(429) == 1
    assert not loop.leaks()


def _forger_kubeconfig(loop: Loop) -> Any:
    """An identity with a broad grant — Events, ConfigMaps, PoolKeys, CreditPools, their status,
    Pods, Leases — and every verb on ReplicaReports except the ones that write them."""
    role = {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
        "metadata": {"name": "forger"},
        "rules": [
            {"apiGroups": [""], "resources": ["events", "configmaps", "pods"], "verbs": ["*"]},
            {"apiGroups": ["events.k8s.io"], "resources": ["events"], "verbs": ["*"]},
            {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["*"]},
            {"apiGroups": [GROUP], "resources": ["poolkeys", "creditpools",
                                                  "poolkeys/status", "creditpools/status"],
             "verbs": ["get", "list", "watch"]},
            {"apiGroups": [GROUP], "resources": ["replicareports"],
             "verbs": ["get", "list", "watch"]},
        ],
    }  # fmt: skip
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": {"name": "forger"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "forger"},
        "subjects": [{"kind": "ServiceAccount", "name": "forger", "namespace": loop.ns}],
    }  # fmt: skip
    loop.apply([role, binding])
    return loop.kube.service_account_kubeconfig(loop.ns, "forger")


def _forged_report(name: str, pool: str, fp: str, until: float) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "ReplicaReport",
        "metadata": {"name": name, "labels": {POOL_LABEL: POOL}},
        "spec": {"pool": pool, "replica": name.removeprefix(f"{pool}-"), "heartbeat": until - 600,
                 "keys": [{"name": "key-1", "fingerprint": fp, "revoked": True,
                           "cooling": [{"model": "", "until": until}]}]},
    }  # fmt: skip


def _old_style_event(namespace: str, key: str, fp: str, until: float) -> dict[str, Any]:
    """A report as proxies filed them before the channel: an Event anyone could create."""
    return {
        "apiVersion": "v1", "kind": "Event",
        "metadata": {"generateName": f"{key}.",
                     "labels": {"sideproxy.dev/report": "true", POOL_LABEL: POOL},
                     "annotations": {"sideproxy.dev/until": f"{until:.3f}",
                                     "sideproxy.dev/fingerprint": fp,
                                     "sideproxy.dev/count": "1000"}},
        "involvedObject": {"apiVersion": f"{GROUP}/{VERSION}", "kind": "PoolKey", "name": key,
                           "namespace": namespace},
        "reason": "RateLimited", "message": "forged", "type": "Warning",
    }  # fmt: skip


def test_an_identity_outside_the_proxy_grant_cannot_change_health(loop: Loop) -> None:
    a, b = loop.proxies["a"], loop.proxies["b"]
    fp1 = loop.fp("key-1")
    status_before = loop.key_status("key-1")
    forger = _forger_kubeconfig(loop)
    until = float(a.status()["now"]) + 600

    # Writing a ReplicaReport is refused by the API server's authorizer...
    for verb, args in (
        ("create", ["create", "-f", "-"]),
        ("apply", ["apply", "-f", "-"]),
    ):
        result = loop.kube.kubectl(
            *args, "-n", loop.ns, kubeconfig=forger, check=False,
            input=json.dumps(_forged_report(f"{POOL}-forged", POOL, fp1, until)),
        )  # fmt: skip
        assert result.returncode != 0, verb
        assert "forbidden" in result.stderr.lower(), result.stderr
    honest = next(iter(reports(loop)))
    patched = loop.kube.kubectl(
        "patch", "replicareport", honest, "-n", loop.ns, "--type=merge",
        "-p", json.dumps({"spec": {"keys": [{"name": "key-1", "fingerprint": fp1,
                                              "revoked": True}]}}),
        kubeconfig=forger, check=False,
    )  # fmt: skip
    assert patched.returncode != 0
    assert "forbidden" in patched.stderr.lower(), patched.stderr

    # ...while what it may create, old-style report Events, is heard by no one.
    for _ in range(3):
        loop.kube.kubectl(
            "create", "-f", "-", "-n", loop.ns, kubeconfig=forger,
            input=json.dumps(_old_style_event(loop.ns, "key-1", fp1, until)),
        )  # fmt: skip

    # Within the proxy's own grant, a report that speaks for another pool (its label says p,
    # its name and spec say q) is admitted by the API server but refused by every replica.
    proxy_identity = loop.proxy_kubeconfig()
    loop.kube.kubectl(
        "create", "-f", "-", "-n", loop.ns, kubeconfig=proxy_identity,
        input=json.dumps(_forged_report("q-liar", "q", fp1, until)),
    )  # fmt: skip
    wait_until(
        lambda: "refused (PoolMismatch)" in a.text() and "refused (PoolMismatch)" in b.text(),
        30,
        "both replicas refusing the report of pool q",
    )

    # Nothing changed: key-1 serves on every replica. A replica started now (it lists every
    # report) does not learn anything either.
    (c,) = loop.start_proxies(["c"], proxy_identity)
    c.wait_ready(timeout=60)
    for proxy in (a, b, c):
        assert proxy.key("key-1")["health"] == "ready", proxy.name
        assert cooling(proxy, "key-1") is None, proxy.name
    outcomes = burst(b.port, 12, concurrency=2)
    assert not failures(outcomes)
    assert fp1 in {o.served_by for o in outcomes}

    # The operator refuses the liar too, in the report's own status, and PoolKey.status is
    # what it was.
    def refusal() -> Any:
        liar = reports(loop).get("q-liar") or {}
        conditions = (liar.get("status") or {}).get("conditions") or []
        return next((c for c in conditions if c["type"] == "Accepted"), None)

    condition = wait_until(refusal, 30, "the operator's verdict on q-liar")
    assert (condition["status"], condition["reason"]) == ("False", "PoolMismatch")
    after = loop.key_status("key-1")
    for field in ("phase", "cooldownUntil", "rateLimitedCount"):
        assert after.get(field) == status_before.get(field), field
