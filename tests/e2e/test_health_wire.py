"""The wire contract (``sideproxy.wire``) without a cluster: names, the object a replica writes,
and what a reader refuses."""

from __future__ import annotations

from typing import Any

import pytest

from sideproxy import crds, wire
from sideproxy.models import POOL_LABEL


def _spec(**changes: Any) -> wire.ReplicaReportSpec:
    base: dict[str, Any] = {
        "pool": "team-a",
        "replica": "proxy-7d9f-abc12-1",
        "heartbeat": 1_790_000_000.0,
        "keys": [
            {
                "name": "key-1",
                "fingerprint": "ab12cd34",
                "cooling": [{"model": "big", "until": 1_790_000_060.5}],
                "counts": {"requests": 120, "rateLimited": 3},
            }
        ],
    }
    base.update(changes)
    return wire.ReplicaReportSpec.model_validate(base)


def test_a_written_report_reads_back_the_same() -> None:
    spec = _spec()
    body = wire.report_body("ns", spec, wire.PodRef("proxy-7d9f-abc12", "uid-1"))
    assert body["metadata"]["name"] == "team-a-proxy-7d9f-abc12-1"
    assert body["metadata"]["labels"] == {POOL_LABEL: "team-a"}
    assert body["metadata"]["ownerReferences"] == [
        {"apiVersion": "v1", "kind": "Pod", "name": "proxy-7d9f-abc12", "uid": "uid-1"}
    ]
    assert body["spec"]["keys"][0]["counts"]["rateLimited"] == 3
    parsed = wire.parse_report({**body, "metadata": {**body["metadata"], "namespace": "ns"}})
    assert isinstance(parsed, wire.ReplicaReport)
    assert parsed.spec == spec


def test_no_owner_reference_without_a_pod() -> None:
    assert "ownerReferences" not in wire.report_body("ns", _spec())["metadata"]


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda b: b["metadata"]["labels"].update({POOL_LABEL: "team-b"}), "PoolMismatch"),
        (lambda b: b["metadata"].pop("labels"), "PoolMismatch"),
        (lambda b: b["metadata"].update(name="team-a-someone-else"), "NameMismatch"),
        (lambda b: b["spec"].update(pool="team-b"), "PoolMismatch"),
        (lambda b: b["spec"]["keys"][0].update(cooling=[{"until": "soon"}]), "Malformed"),
        (lambda b: b.pop("spec"), "Malformed"),
    ],
    ids=["label", "no-label", "name", "spec-pool", "bad-deadline", "no-spec"],
)
def test_a_report_that_speaks_for_another_pool_or_is_malformed_is_refused(
    mutate: Any, reason: str
) -> None:
    body = wire.report_body("ns", _spec())
    mutate(body)
    parsed = wire.parse_report(body)
    assert isinstance(parsed, wire.InvalidReport)
    assert parsed.reason == reason


def test_a_newer_proxys_extra_field_is_ignored_not_refused() -> None:
    body = wire.report_body("ns", _spec())
    body["spec"]["keys"][0]["usage"] = {"tokens": 5}
    assert isinstance(wire.parse_report(body), wire.ReplicaReport)


def test_replica_names_are_dns_safe_and_distinct_per_process() -> None:
    assert wire.replica_name("Proxy_7d9f.ABC", 42) == "proxy-7d9f-abc-42"
    assert wire.replica_name("a", 1) != wire.replica_name("a", 2)
    long = wire.replica_name("x" * 300, 4_194_304)
    assert len(wire.report_name("p" * 63, long)) <= 253


def test_the_crd_is_generated_with_its_columns_and_name_rule() -> None:
    doc = crds.crd_documents()["replicareports.sideproxy.dev.yaml"]
    version = doc["spec"]["versions"][0]
    columns = [c["name"] for c in version["additionalPrinterColumns"] if not c.get("priority")]
    assert columns == ["Pool", "Replica", "Keys", "Age"]
    rules = version["schema"]["openAPIV3Schema"]["x-kubernetes-validations"]
    assert "self.spec.pool + '-' + self.spec.replica" in rules[0]["rule"]
    assert version["subresources"] == {"status": {}}
    spec = version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    assert set(spec) == {
        "pool", "replica", "incarnation", "heartbeat", "keysReported", "keys",
        # issue 12 (vkeys): virtual-key usage and claims, written by proxy/_vkshare.py
        "usageHeartbeat", "windowSeconds", "virtualKeys",
    }  # fmt: skip
