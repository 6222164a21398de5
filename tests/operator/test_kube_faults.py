"""The operator under faults, on the real API server: unrelated Secrets, hand edits of what it
owns, failing status writes, deleted pools (issue 16, items 2, 3, 4 and 6)."""

from __future__ import annotations

import base64
import json
import secrets
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client as k8s

from sideproxy.models import fingerprint
from tests.operator.conftest import Cluster, Operator, key_manifest, pool_manifest, secret_manifest

pytestmark = pytest.mark.kube

A, B = "gsk_CANARY_faults_a", "gsk_CANARY_faults_b"
MB = 1024 * 1024


def two_key_pool(cluster: Cluster) -> None:
    cluster.apply(
        [
            secret_manifest("groq", {"a": A, "b": B}),
            pool_manifest("p"),
            key_manifest("k-a", "p", "groq", "a"),
            key_manifest("k-b", "p", "groq", "b"),
        ]
    )
    cluster.wait(
        lambda: (t := cluster.table("p")) is not None and len(t.keys) == 2,
        what="table of p with two keys",
    )


def rss_mb(op: Operator) -> float:
    assert op.proc is not None
    status = Path(f"/proc/{op.proc.pid}/status").read_text()
    line = next(ln for ln in status.splitlines() if ln.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def rotate_and_wait(cluster: Cluster, value: str) -> None:
    """Rotate k-a and wait for the key Secret to follow: the operator's Secret watch has then
    delivered every Secret event that came before (a watch is ordered)."""
    cluster.apply(secret_manifest("groq", {"a": value, "b": B}))
    cluster.wait(
        lambda: (cluster.material("p") or {}).get("k-a") == value,
        timeout=60,
        what="rotation reaching p-keys",
    )


def test_memory_is_flat_against_unrelated_secrets(
    cluster: Cluster, operators: Any, tmp_path: Path
) -> None:
    """50 Secrets of ~0.9 MB each that nothing references: the operator never reads their data,
    so its RSS neither grows while they arrive nor at a restart that lists them."""
    op = operators("op-a").start()
    op.wait_healthy()
    two_key_pool(cluster)
    rotate_and_wait(cluster, A + "0")
    fresh = rss_mb(op)

    blob = base64.b64encode(secrets.token_bytes(900 * 1024 * 3 // 4)).decode()
    for i in range(50):
        cluster.core.create_namespaced_secret(
            cluster.ns,
            k8s.V1Secret(metadata=k8s.V1ObjectMeta(name=f"unrelated-{i:02d}"), data={"x": blob}),
        )
    rotate_and_wait(cluster, A + "1")
    with_them = rss_mb(op)

    assert op.stop() == 0
    op.start()
    op.wait_healthy()
    rotate_and_wait(cluster, A + "2")
    restarted = rss_mb(op)
    print(f"RSS: fresh {fresh:.0f} MB, +45 MB of Secrets {with_them:.0f}, restart {restarted:.0f}")
    assert with_them - fresh < 15, (fresh, with_them)
    assert restarted - fresh < 15, (fresh, restarted)
    assert "CANARY" not in op.text()


def test_a_deleted_or_edited_routing_configmap_is_repaired_at_once(
    cluster: Cluster, operator: Operator
) -> None:
    """Repair comes from the watch, not the 300 s resync; a foreign object in the way is a
    condition (TableWritten=False, NotOwned) for as long as it is there."""
    two_key_pool(cluster)
    good = cluster.table("p")
    assert good is not None

    cluster.kubectl("delete", "configmap", "p-routing")
    back = cluster.wait(lambda: cluster.table_or_none("p"), timeout=10, what="p-routing recreated")
    assert back.hash == good.hash
    assert back.version > good.version  # never backwards, though the ConfigMap was gone

    cm = cluster.configmap("p-routing")
    edited = json.loads(cm.data["table.json"])
    edited["keys"][0]["weight"] = 999
    cm.data["table.json"] = json.dumps(edited)
    cluster.core.replace_namespaced_config_map("p-routing", cluster.ns, cm)
    repaired = cluster.wait(
        lambda: (t := cluster.table_or_none("p")) and t.keys[0].weight == 1 and t,
        timeout=10,
        what="hand edit undone",
    )
    assert repaired.version > back.version

    cluster.kubectl("delete", "secret", "p-keys")
    cluster.wait(lambda: cluster.material("p") == {"k-a": A, "k-b": B}, timeout=10,
                 what="p-keys recreated")  # fmt: skip

    # Someone else's ConfigMap in the way: a condition while it is there, repair once it is not.
    # (In one write: a delete then a create would race the repair, which is that fast.)
    foreign = cluster.configmap("p-routing")
    foreign.metadata.owner_references = None
    foreign.metadata.labels = None
    foreign.data = {"table.json": "{}"}
    cluster.core.replace_namespaced_config_map("p-routing", cluster.ns, foreign)
    cond = cluster.wait(
        lambda: (
            (c := cluster.condition("creditpools", "p", "TableWritten"))
            and c["status"] == "False"
            and c
        ),
        timeout=10,
        what="TableWritten=False",
    )
    assert cond["reason"] == "NotOwned"
    cluster.kubectl("delete", "configmap", "p-routing")
    cluster.wait(lambda: cluster.table_or_none("p"), timeout=10, what="p-routing ours again")
    cluster.wait(
        lambda: cluster.condition("creditpools", "p", "TableWritten").get("status") == "True",
        timeout=10,
        what="TableWritten=True again",
    )
    final = cluster.table("p")
    assert final is not None
    assert fingerprint(A) in {k.fingerprint for k in final.keys}
