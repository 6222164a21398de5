"""The operator under faults, on the real API server: unrelated Secrets, hand edits of what it
owns, failing status writes, deleted pools (issue 16, items 2, 3, 4 and 6)."""

from __future__ import annotations

import base64
import json
import secrets
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client as k8s

from sideproxy.models import fingerprint
from tests.operator.conftest import (
    GROUP,
    VERSION,
    Cluster,
    Operator,
    key_manifest,
    pool_manifest,
    secret_manifest,
)

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


def admission_policy(namespace: str, key: str) -> list[dict[str, Any]]:
    """A ValidatingAdmissionPolicy that refuses every status write of one PoolKey (422)."""
    name = f"deny-status-{namespace}"
    return [
        {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingAdmissionPolicy",
            "metadata": {"name": name},
            "spec": {
                "failurePolicy": "Fail",
                "matchConstraints": {
                    "resourceRules": [
                        {"apiGroups": ["sideproxy.dev"], "apiVersions": ["v1alpha1"],
                         "operations": ["UPDATE"], "resources": ["poolkeys/status"]}
                    ]
                },
                "validations": [
                    {"expression": f"object.metadata.name != '{key}'",
                     "message": f"status writes of {key} are refused by policy"}
                ],
            },
        },
        {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingAdmissionPolicyBinding",
            "metadata": {"name": name},
            "spec": {
                "policyName": name,
                "validationActions": ["Deny"],
                "matchResources": {"namespaceSelector": {"matchLabels": {
                    "kubernetes.io/metadata.name": namespace}}},
            },
        },
    ]  # fmt: skip


def test_a_key_whose_status_cannot_be_written_does_not_freeze_the_pool(
    kube: Any, cluster: Cluster, operator: Operator
) -> None:
    two_key_pool(cluster)
    cluster.apply(key_manifest("k-bad", "p", "groq", "a", tier=1))  # (a DuplicateKey: Invalid)
    cluster.wait(lambda: cluster.status("poolkeys", "k-bad").get("phase"), what="k-bad status")
    policy = admission_policy(cluster.ns, "k-bad")
    kube.apply(policy)
    try:
        # The policy takes effect a moment after it is created: wait until it refuses.
        def refused() -> bool:
            probe = cluster.kubectl(
                "patch", "poolkey", "k-bad", "--subresource=status", "--type=merge",
                "-p", '{"status":{"message":"probe"}}', check=False,
            )  # fmt: skip
            return probe.returncode != 0 and "refused by policy" in probe.stderr

        cluster.wait(refused, timeout=30, what="the admission policy in force")
        # A change to every key (their generation) and to the table (k-a's weight).
        cluster.apply(key_manifest("k-a", "p", "groq", "a", weight=5))
        cluster.apply(key_manifest("k-bad", "p", "groq", "a", tier=2))
        cond = cluster.wait(
            lambda: (
                (c := cluster.condition("creditpools", "p", "KeysWritten"))
                and c["status"] == "False"
                and c
            ),
            timeout=30,
            what="KeysWritten=False",
        )
        assert cond["reason"] == "StatusWriteFailed"
        assert "k-bad" in cond["message"]
        assert "k-a" not in cond["message"]
        # The other keys and the pool are written regardless.
        cluster.wait(
            lambda: cluster.status("poolkeys", "k-a").get("observedGeneration") == 2,
            what="k-a's status written",
        )
        table = cluster.table("p")
        assert table is not None
        assert [k.weight for k in table.keys if k.name == "k-a"] == [5]
        cluster.wait(
            lambda: cluster.status("creditpools", "p").get("tableVersion") == table.version,
            what="the pool status follows the table",
        )
        # The table version never goes backwards, even with the ConfigMap gone.
        cluster.kubectl("delete", "configmap", "p-routing")
        back = cluster.wait(lambda: cluster.table_or_none("p"), timeout=10, what="p-routing back")
        assert back.version > table.version
    finally:
        for doc in reversed(policy):
            kube.kubectl("delete", doc["kind"].lower(), doc["metadata"]["name"], check=False)
    cluster.wait(
        lambda: cluster.condition("creditpools", "p", "KeysWritten").get("status") == "True",
        timeout=60,
        what="KeysWritten=True once the policy is gone",
    )
    assert cluster.status("poolkeys", "k-bad").get("observedGeneration") == 2


def test_deleting_a_pool_of_many_keys_is_one_event_and_paced_writes(
    cluster: Cluster, operator: Operator, tmp_path: Path
) -> None:
    n = 150
    values = {f"k{i:03d}": f"gsk_{i:03d}_{'x' * 20}" for i in range(n)}
    docs = [
        secret_manifest("many", values),
        pool_manifest("big"),
        *(key_manifest(f"key-{name}", "big", "many", name) for name in values),
    ]
    manifest = tmp_path / "big.yaml"
    manifest.write_text(yaml.safe_dump_all(docs))
    cluster.kubectl("create", "-f", str(manifest), "--request-timeout=120s")

    def all_phases(phase: str) -> bool:
        items = cluster.custom.list_namespaced_custom_object(GROUP, VERSION, cluster.ns, "poolkeys")
        return all((i.get("status") or {}).get("phase") == phase for i in items["items"])

    cluster.wait(lambda: all_phases("Ready"), timeout=120, what="every key Ready")
    key_versions = {i["metadata"]["name"]: i["metadata"]["resourceVersion"] for i in
                    cluster.custom.list_namespaced_custom_object(
                        GROUP, VERSION, cluster.ns, "poolkeys")["items"]}  # fmt: skip

    # Deleted and re-created at once: no key status is written at all.
    offset = len(operator.text())
    cluster.kubectl("delete", "creditpool", "big", "--wait=true")
    cluster.apply(pool_manifest("big"))
    operator.wait_log(f"pool {cluster.ns}/big: table version", timeout=60, after=offset)
    now = {i["metadata"]["name"]: i["metadata"]["resourceVersion"] for i in
           cluster.custom.list_namespaced_custom_object(
               GROUP, VERSION, cluster.ns, "poolkeys")["items"]}  # fmt: skip
    assert now == key_versions

    # Deleted for good: after the grace period the keys turn Invalid, paced, with one Event.
    cluster.kubectl("delete", "creditpool", "big", "--wait=true")
    cluster.wait(lambda: all_phases("Invalid"), timeout=120, what="every key Invalid")
    events = cluster.events()
    on_pool = [e for e in events if e.involved_object.kind == "CreditPool"
               and e.reason == "PoolNotFound"]  # fmt: skip
    on_keys = [e for e in events if e.involved_object.kind == "PoolKey"
               and e.reason == "PoolNotFound"]  # fmt: skip
    assert len(on_pool) == 1, [e.message for e in on_pool]
    assert f"its {n} PoolKey(s) are Invalid" in on_pool[0].message
    assert on_keys == []
