"""The operator against the real kube-apiserver + controller-manager (marker ``kube``).

Key values here are canaries (``gsk_CANARY_...``): after each scenario they must appear
nowhere but in Secrets: not in the ConfigMap, a status, an Event, or the operator's log.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from sideproxy.models import fingerprint
from sideproxy.wire import ReplicaReportSpec, report_body
from tests.kube.harness import KubeCluster
from tests.operator.conftest import (
    ROOT,
    Cluster,
    Operator,
    key_manifest,
    pool_manifest,
    secret_manifest,
)

pytestmark = pytest.mark.kube

A, B, C = "gsk_CANARY_abc123", "gsk_CANARY_def456", "gsk_CANARY_ghi789"
ROTATED = "gsk_CANARY_rotated0"
CANARIES = (A, B, C, ROTATED)


def three_key_pool(cluster: Cluster) -> None:
    cluster.apply(
        [
            secret_manifest("groq", {"a": A, "b": B}),
            secret_manifest("groq-c", {"c": C}),
            pool_manifest("p"),
            key_manifest("k-a", "p", "groq", "a", weight=3),
            key_manifest("k-b", "p", "groq", "b", tier=1),
            key_manifest("k-c", "p", "groq-c", "c"),
        ]
    )


def wait_table(cluster: Cluster, pool: str, names: list[str], timeout: float = 30.0) -> Any:
    def ready() -> Any:
        table = cluster.table(pool)
        return table if table is not None and [k.name for k in table.keys] == names else None

    return cluster.wait(ready, timeout, f"table of {pool} with keys {names}")


def wait_phase(cluster: Cluster, name: str, phase: str, timeout: float = 30.0) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        status = cluster.status("poolkeys", name)
        return status if status.get("phase") == phase else None

    result: dict[str, Any] = cluster.wait(done, timeout, f"PoolKey {name} phase {phase}")
    return result


def assert_no_leak(cluster: Cluster, operators: list[Operator]) -> None:
    """No canary, plain or base64, outside Secrets."""
    texts = {
        "configmaps": json.dumps(
            [cm.to_dict() for cm in cluster.core.list_namespaced_config_map(cluster.ns).items],
            default=str,
        ),
        "events": json.dumps([e.to_dict() for e in cluster.events()], default=str),
    }
    for plural in ("poolkeys", "creditpools"):
        items = cluster.custom.list_namespaced_custom_object(
            "sideproxy.dev", "v1alpha1", cluster.ns, plural
        )["items"]
        texts[plural] = json.dumps(items)
    for op in operators:
        texts[f"log of {op.name}"] = op.text()
    for where, text in texts.items():
        for canary in CANARIES:
            assert canary not in text, f"a key value is in the {where}"
            assert base64.b64encode(canary.encode()).decode() not in text, where


def columns(output: str) -> list[dict[str, str]]:
    lines = [line for line in output.splitlines() if line.strip()]
    header = lines[0]
    starts = [i for i, ch in enumerate(header) if ch != " " and (i == 0 or header[i - 1] == " ")]
    names = [header[s:e].strip() for s, e in zip(starts, [*starts[1:], None], strict=True)]
    rows = []
    for line in lines[1:]:
        cells = [line[s:e].strip() for s, e in zip(starts, [*starts[1:], None], strict=True)]
        rows.append(dict(zip(names, cells, strict=True)))
    return rows


# --------------------------------------------------------------------------- CRDs and examples


def test_crds_are_established_and_explained(kube: KubeCluster, crds: None) -> None:
    for name in ("creditpools.sideproxy.dev", "poolkeys.sideproxy.dev"):
        crd = json.loads(kube.kubectl("get", "crd", name, "-o", "json").stdout)
        conditions = {c["type"]: c["status"] for c in crd["status"]["conditions"]}
        assert conditions["Established"] == "True"
        assert conditions.get("NonStructuralSchema", "False") == "False"

    def explain(field: str) -> str:
        # The OpenAPI document that explain reads is published a moment after Established.
        result = kube.kubectl("explain", field, check=False)
        return " ".join(result.stdout.split()) if result.returncode == 0 else ""

    weight = kube.wait_for(lambda: explain("poolkey.spec.weight"), timeout=30)
    assert "Share of the tier's traffic" in weight
    assert "Default: 1. Range: >= 0, <= 1000." in weight
    name = kube.wait_for(lambda: explain("creditpool.spec.providers.name"), timeout=30)
    assert "Provider served by this pool. One of: groq, openai," in name


def test_examples_apply(kube: KubeCluster, crds: None, namespace: str) -> None:
    kube.kubectl("apply", "-n", namespace, "-f", str(ROOT / "examples"))
    listed = kube.kubectl("get", "sideproxy", "-n", namespace, "-o", "name").stdout.split()
    assert sorted(listed) == [
        "creditpool.sideproxy.dev/team-a",
        "poolkey.sideproxy.dev/groq-primary",
        "poolkey.sideproxy.dev/groq-secondary",
        "poolkey.sideproxy.dev/openai-fallback",
    ]
    for short, count in (("cp", 1), ("cpool", 1), ("pk", 3)):
        assert (
            len(kube.kubectl("get", short, "-n", namespace, "-o", "name").stdout.split()) == count
        )
    # The API server filled in the defaults the models declare.
    pool = json.loads(kube.kubectl("get", "cp", "team-a", "-n", namespace, "-o", "json").stdout)
    assert pool["spec"]["timeouts"]["connectSeconds"] == 5
    key = json.loads(
        kube.kubectl("get", "pk", "groq-primary", "-n", namespace, "-o", "json").stdout
    )
    assert key["spec"]["disabled"] is False
    selected = kube.kubectl(
        "get", "pk", "-n", namespace, "--field-selector", "spec.pool=team-a", "-o", "name"
    ).stdout.split()
    assert len(selected) == 3


INVALID = sorted((ROOT / "examples" / "invalid").glob("*.yaml"))


@pytest.mark.parametrize("path", INVALID, ids=[p.stem for p in INVALID])
def test_invalid_examples_are_rejected(
    kube: KubeCluster, crds: None, namespace: str, path: Path
) -> None:
    expected = path.read_text().splitlines()[0].removeprefix("# expect: ")
    result = kube.kubectl("apply", "-n", namespace, "-f", str(path), check=False)
    assert result.returncode != 0, f"{path.name} was accepted"
    assert expected in " ".join(result.stderr.split()), result.stderr


# --------------------------------------------------------------------------- reconcile


def test_three_keys_make_configmap_secret_and_status(cluster: Cluster, operator: Operator) -> None:
    three_key_pool(cluster)
    table = wait_table(cluster, "p", ["k-a", "k-b", "k-c"])
    assert [k.fingerprint for k in table.keys] == [fingerprint(A), fingerprint(B), fingerprint(C)]
    assert [(k.tier, k.weight) for k in table.keys] == [(0, 3), (1, 1), (0, 1)]
    assert cluster.material("p") == {"k-a": A, "k-b": B, "k-c": C}

    pool = cluster.obj("creditpools", "p")
    assert pool is not None
    for obj in (cluster.configmap("p-routing"), cluster.secret("p-keys")):
        (ref,) = obj.metadata.owner_references
        assert (ref.kind, ref.name, ref.uid) == ("CreditPool", "p", pool["metadata"]["uid"])
        assert ref.controller is True
        assert ref.block_owner_deletion is True
        assert obj.metadata.labels["sideproxy.dev/pool"] == "p"
        assert obj.metadata.labels["app.kubernetes.io/part-of"] == "sideproxy"

    status = wait_phase(cluster, "k-a", "Ready")
    assert status["fingerprint"] == fingerprint(A)
    assert status["observedGeneration"] == 1
    ready = cluster.condition("poolkeys", "k-a", "Ready")
    assert (ready["status"], ready["observedGeneration"]) == ("True", 1)
    assert cluster.condition("poolkeys", "k-a", "SecretResolved")["status"] == "True"

    pool_status = cluster.wait(
        lambda: (s := cluster.status("creditpools", "p")).get("keysSummary") == "3/3" and s,
        what="pool status",
    )
    assert pool_status["ready"] == "True"
    assert pool_status["tableVersion"] == table.version
    assert pool_status["tableHash"] == table.hash

    keys = {row["NAME"]: row for row in columns(cluster.kubectl("get", "poolkeys").stdout)}
    assert keys["k-a"] == {
        "NAME": "k-a",
        "POOL": "p",
        "PROVIDER": "groq",
        "TIER": "0",
        "WEIGHT": "3",
        "STATE": "Ready",
        "COOLING": "",
        "COOLDOWN-UNTIL": "",
        "429S": "0",
        "AGE": keys["k-a"]["AGE"],
    }
    assert keys["k-b"]["TIER"] == "1"
    wide = columns(cluster.kubectl("get", "pk", "-o", "wide").stdout)
    assert {row["MESSAGE"] for row in wide} == {"in rotation"}
    pools = columns(cluster.kubectl("get", "creditpools").stdout)
    assert [(r["NAME"], r["READY"], r["KEYS"], r["COOLING"]) for r in pools] == [
        ("p", "True", "3/3", "0")
    ]
    assert_no_leak(cluster, [operator])


def test_rotation_deletion_and_missing_secret(cluster: Cluster, operator: Operator) -> None:
    three_key_pool(cluster)
    first = wait_table(cluster, "p", ["k-a", "k-b", "k-c"])

    # Rotate k-a's value in place: the key Secret follows without a restart.
    cluster.apply(secret_manifest("groq", {"a": ROTATED, "b": B}))
    cluster.wait(lambda: (cluster.material("p") or {}).get("k-a") == ROTATED, what="rotation")
    rotated = cluster.wait(
        lambda: (t := cluster.table("p")) and t.keys[0].fingerprint == fingerprint(ROTATED) and t,
        what="rotated fingerprint in the table",
    )
    assert rotated.version > first.version
    cluster.wait(
        lambda: cluster.status("poolkeys", "k-a").get("fingerprint") == fingerprint(ROTATED),
        what="rotated fingerprint in status",
    )

    # Delete k-b: out of the table and the Secret at once.
    cluster.kubectl("delete", "poolkey", "k-b")
    wait_table(cluster, "p", ["k-a", "k-c"])
    assert "k-b" not in (cluster.material("p") or {})

    # Delete k-c's Secret: k-c is Invalid with a condition and an Event; k-a keeps serving.
    cluster.kubectl("delete", "secret", "groq-c")
    status = wait_phase(cluster, "k-c", "Invalid")
    assert status["message"] == "Secret 'groq-c' not found"
    resolved = cluster.condition("poolkeys", "k-c", "SecretResolved")
    assert (resolved["status"], resolved["reason"]) == ("False", "SecretNotResolved")
    events = cluster.wait(
        lambda: [e for e in cluster.events("k-c") if e.reason == "SecretNotResolved"],
        what="Event on k-c",
    )
    assert events[0].type == "Warning"
    assert events[0].message == "Secret 'groq-c' not found"
    wait_table(cluster, "p", ["k-a"])
    assert cluster.status("creditpools", "p")["ready"] == "True"

    # A key naming a data key that the Secret lacks.
    cluster.apply(key_manifest("k-d", "p", "groq", "nope"))
    assert wait_phase(cluster, "k-d", "Invalid")["message"] == "Secret 'groq' has no key 'nope'"

    # Bring the Secret back: k-c is Ready again, and says so.
    cluster.apply(secret_manifest("groq-c", {"c": C}))
    wait_phase(cluster, "k-c", "Ready")
    wait_table(cluster, "p", ["k-a", "k-c"])
    assert any(e.type == "Normal" for e in cluster.events("k-c"))
    summary = cluster.wait(
        lambda: (s := cluster.status("creditpools", "p")).get("keysSummary") == "2/3" and s,
        what="pool summary 2/3",
    )
    assert summary["keysInvalid"] == 1
    assert_no_leak(cluster, [operator])


def test_deleting_the_pool_garbage_collects_its_outputs(
    cluster: Cluster, operator: Operator
) -> None:
    three_key_pool(cluster)
    wait_table(cluster, "p", ["k-a", "k-b", "k-c"])
    assert cluster.secret("p-keys") is not None
    cluster.kubectl("delete", "creditpool", "p", "--wait=true")
    cluster.wait(
        lambda: cluster.configmap("p-routing") is None and cluster.secret("p-keys") is None,
        timeout=60,
        what="garbage collection of p-routing and p-keys",
    )
    status = wait_phase(cluster, "k-a", "Invalid")
    assert status["message"] == f"CreditPool 'p' not found in namespace '{cluster.ns}'"
    assert_no_leak(cluster, [operator])


def test_pool_problems_are_conditions_and_events(cluster: Cluster, operator: Operator) -> None:
    cluster.apply(
        [pool_manifest("lonely"), key_manifest("off", "lonely", "none", "x", disabled=True)]
    )
    ready = cluster.wait(
        lambda: (c := cluster.condition("creditpools", "lonely", "Ready")) and c,
        what="Ready condition",
    )
    assert (ready["status"], ready["reason"]) == ("False", "NoUsableKey")
    event = cluster.wait(
        lambda: [e for e in cluster.events("lonely") if e.reason == "NoUsableKey"],
        what="NoUsableKey Event",
    )[0]
    assert event.type == "Warning"
    assert wait_phase(cluster, "off", "Disabled")["message"] == "spec.disabled is true"
    rows = columns(cluster.kubectl("get", "cp", "lonely").stdout)
    assert rows[0]["READY"] == "False"


# --------------------------------------------------------------------------- robustness


def test_restart_converges_and_is_idempotent(
    cluster: Cluster, operators: Callable[[str], Operator]
) -> None:
    op = operators("op-a").start()
    op.wait_healthy()
    three_key_pool(cluster)
    wait_table(cluster, "p", ["k-a", "k-b", "k-c"])
    # Kill it hard in the middle of a change, then change more while it is down.
    cluster.apply(key_manifest("k-b", "p", "groq", "b", tier=2))
    op.kill()
    cluster.kubectl("delete", "poolkey", "k-c")
    cluster.apply(secret_manifest("groq", {"a": ROTATED, "b": B}))

    op.start()
    wait_table(cluster, "p", ["k-a", "k-b"], timeout=60)
    cluster.wait(lambda: (t := cluster.table("p")) and t.keys[1].tier == 2, what="tier 2")
    assert cluster.material("p") == {"k-a": ROTATED, "k-b": B}
    cluster.wait(
        lambda: (
            cluster.status("creditpools", "p").get("tableVersion") == cluster.table("p").version
        ),  # type: ignore[union-attr]
        what="status catches up",
    )
    wait_phase(cluster, "k-a", "Ready")

    # A clean restart with nothing changed writes nothing at all.
    def versions() -> dict[str, str]:
        return {
            "cm": cluster.configmap("p-routing").metadata.resource_version,
            "secret": cluster.secret("p-keys").metadata.resource_version,
            "pool": (cluster.obj("creditpools", "p") or {})["metadata"]["resourceVersion"],
            "k-a": (cluster.obj("poolkeys", "k-a") or {})["metadata"]["resourceVersion"],
        }

    cluster.wait(
        lambda: cluster.status("poolkeys", "k-a").get("fingerprint") == fingerprint(ROTATED)
    )
    before = versions()
    assert op.stop() == 0
    offset = len(op.text())
    op.start()
    log = op.wait_log(f"pool {cluster.ns}/p: table version ", after=offset)
    (line,) = [ln for ln in log.splitlines() if f"pool {cluster.ns}/p: " in ln]
    assert line.endswith("in sync"), line
    writes = op.final_writes()
    assert {k: v for k, v in writes.items() if not k.startswith("leases")} == {}, writes
    assert versions() == before
    assert_no_leak(cluster, [op])


def test_two_replicas_do_not_fight(cluster: Cluster, operators: Callable[[str], Operator]) -> None:
    a, b = operators("op-a").start(), operators("op-b").start()
    a.wait_healthy()
    b.wait_healthy()
    cluster.wait(lambda: a.leader() or b.leader(), timeout=30, what="a leader")
    leader, standby = (a, b) if a.leader() else (b, a)
    three_key_pool(cluster)
    wait_table(cluster, "p", ["k-a", "k-b", "k-c"])
    cluster.wait(lambda: cluster.status("creditpools", "p").get("keysSummary") == "3/3")
    assert leader.leader()

    leader.kill()  # no release: the standby must wait out the Lease
    cluster.wait(standby.leader, timeout=30, what="fail-over")
    cluster.apply(key_manifest("k-d", "p", "groq", "b", tier=3))  # duplicate value: Invalid
    assert (
        wait_phase(cluster, "k-d", "Invalid")["message"]
        == "holds the same key value as PoolKey 'k-b'"
    )
    writes = standby.final_writes()
    # The standby wrote only after it took over: k-d's status (and the pool's), nothing before.
    assert writes.get("poolkeys/status", 0) <= 2, writes
    assert writes.get("ConfigMap/update", 0) == 0, writes  # k-d changes no table
    assert writes.get("ConfigMap/create", 0) == 0, writes
    assert_no_leak(cluster, [a, b])


def test_thousand_keys_without_a_write_storm(
    cluster: Cluster, operator: Operator, tmp_path: Path
) -> None:
    n = 1000
    values = {f"k{i:04d}": f"gsk_{i:04d}_{'x' * 40}" for i in range(n)}
    docs: list[dict[str, Any]] = [
        secret_manifest("many", values),
        pool_manifest("big"),
        *(key_manifest(f"key-{name}", "big", "many", name) for name in values),
    ]
    manifest = tmp_path / "big.yaml"
    manifest.write_text(yaml.safe_dump_all(docs))
    started = time.monotonic()
    cluster.kubectl("create", "-f", str(manifest), "--request-timeout=120s")
    churn = time.monotonic() - started

    table = cluster.wait(
        lambda: (t := cluster.table("big")) and len(t.keys) == n and t,
        timeout=120,
        what="a table with 1,000 keys",
    )
    # Under constant churn a pool is written at most once per SIDEPROXY_MAX_DELAY_SECONDS (2 s):
    # the bound follows how long the 1,001 creates took on this machine, plus a few.
    bound = 4 + int(churn / 2)
    cluster.wait(
        lambda: cluster.status("creditpools", "big").get("keysSummary") == f"{n}/{n}",
        timeout=120,
        what="pool status 1000/1000",
    )
    # Version = number of table writes (it rises by one per content change).
    assert table.version <= bound, f"the ConfigMap was written {table.version} times"
    writes = operator.final_writes()
    print(f"1,000 keys created in {churn:.1f}s: table version {table.version}, writes {writes}")
    assert writes.get("ConfigMap/create", 0) + writes.get("ConfigMap/update", 0) <= bound, writes
    assert writes.get("Secret/create", 0) + writes.get("Secret/update", 0) <= bound, writes
    assert writes.get("creditpools/status", 0) <= bound + 5, writes
    assert n <= writes.get("poolkeys/status", 0) <= n + 50, writes
    statuses = cluster.custom.list_namespaced_custom_object(
        "sideproxy.dev", "v1alpha1", cluster.ns, "poolkeys"
    )["items"]
    assert {s.get("status", {}).get("phase") for s in statuses} == {"Ready"}


def test_survives_an_api_server_outage(
    kube: KubeCluster, cluster: Cluster, operator: Operator
) -> None:
    three_key_pool(cluster)
    wait_table(cluster, "p", ["k-a", "k-b", "k-c"])
    with kube.apiserver_down():
        assert operator.proc is not None
        assert operator.proc.poll() is None
    cluster.apply(secret_manifest("groq", {"a": ROTATED, "b": B}))
    cluster.wait(
        lambda: (cluster.material("p") or {}).get("k-a") == ROTATED,
        timeout=90,
        what="rotation after the outage",
    )
    assert operator.proc.poll() is None
    assert_no_leak(cluster, [operator])


def test_a_reported_cool_down_expires_on_its_own(cluster: Cluster, operator: Operator) -> None:
    """A replica's report of a 4 s cool-down reaches the status (never the table), and ends
    by itself: no trigger but the operator's own timer."""
    three_key_pool(cluster)
    wait_phase(cluster, "k-a", "Ready")
    before = cluster.table("p")
    assert before is not None
    until = time.time() + 4
    spec = ReplicaReportSpec.model_validate({
        "pool": "p", "replica": "r1", "heartbeat": time.time(),
        "keys": [{"name": "k-a", "fingerprint": fingerprint(A),
                  "cooling": [{"model": "", "until": until}], "counts": {"rateLimited": 2}}],
    })  # fmt: skip
    cluster.custom.create_namespaced_custom_object(
        "sideproxy.dev", "v1alpha1", cluster.ns, "replicareports", report_body(cluster.ns, spec)
    )
    status = wait_phase(cluster, "k-a", "CoolingDown")
    stamp = status["cooldownUntil"]
    assert abs(datetime.fromisoformat(stamp).timestamp() - until) < 0.01
    row = {r["NAME"]: r for r in columns(cluster.kubectl("get", "pk").stdout)}["k-a"]
    assert (row["STATE"], row["COOLDOWN-UNTIL"], row["COOLING"], row["429S"]) == (
        "CoolingDown", stamp, "all models", "2"
    )  # fmt: skip
    cluster.wait(lambda: cluster.status("creditpools", "p").get("keysCooling") == 1,
                 what="keysCooling 1")  # fmt: skip

    status = wait_phase(cluster, "k-a", "Ready", timeout=15)
    assert "cooldownUntil" not in status
    assert status["rateLimitedCount"] == 2  # counted once
    after = cluster.table("p")
    assert after is not None
    assert (after.version, after.hash) == (before.version, before.hash)  # health: not the table
