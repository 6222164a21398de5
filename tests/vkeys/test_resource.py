"""Issue 12 step 1: the VirtualKey resource, its CRD, and what the routing table carries.

The table (a ConfigMap, readable by more people than the Secret) holds a VirtualKey's name,
SHA-256 digest, models and limits; never its value.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from sideproxy import crds
from sideproxy.models import RoutingTable, VirtualKeySpec, VirtualKeyStatus
from sideproxy.translate import ManifestError, from_manifests, translate
from sideproxy.wire import ReplicaReportSpec

ROOT = Path(__file__).resolve().parents[2]
CANARY = "sp-CANARY-vk-value-0123456789abcdef"


def _docs(*virtual: dict[str, Any], secret: dict[str, str] | None = None) -> list[dict[str, Any]]:
    return [
        {
            "apiVersion": "sideproxy.dev/v1alpha1",
            "kind": "CreditPool",
            "metadata": {"name": "team-a"},
            "spec": {"providers": [{"name": "groq"}]},
        },
        {
            "apiVersion": "sideproxy.dev/v1alpha1",
            "kind": "PoolKey",
            "metadata": {"name": "key-1"},
            "spec": {"pool": "team-a", "secretRef": {"name": "provider", "key": "k1"}},
        },
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "provider"},
            "stringData": {"k1": "gsk-provider-1"},
        },
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "clients"},
            "stringData": secret if secret is not None else {"batch": CANARY, "web": CANARY + "-w"},
        },
        *virtual,
    ]


def _vk(name: str, key: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "sideproxy.dev/v1alpha1",
        "kind": "VirtualKey",
        "metadata": {"name": name},
        "spec": {"pool": "team-a", "secretRef": {"name": "clients", "key": key}, **spec},
    }


def _translate(docs: list[dict[str, Any]]) -> Any:
    pool, keys, secrets = from_manifests(docs)
    return translate(pool, keys, secrets, 0.0)


def test_table_carries_name_digest_models_limits_and_never_the_value() -> None:
    limits = {"requestsPerMinute": 600, "tokensPerMinute": 200000, "maxConcurrent": 16}
    result = _translate(
        _docs(_vk("batch", "batch", models=["small", "llama-*"], limits=limits), _vk("web", "web"))
    )
    table = result.table.sealed(1)
    text = table.to_json()
    assert CANARY not in text
    assert CANARY not in repr(result)
    (batch, web) = table.virtual_keys or []
    assert batch.name == "batch"
    assert batch.digest == hashlib.sha256(CANARY.encode()).hexdigest()
    assert batch.models == ["small", "llama-*"]
    assert batch.limits is not None
    assert batch.limits.dump() == limits
    assert (web.models, web.limits) == (None, None)  # no list, no limit: every model, unlimited
    assert table.settings.client_auth_required  # a VirtualKey makes every client show a key
    assert result.virtual_verdicts["batch"].ready
    assert RoutingTable.from_json(text) == table


def test_a_pool_without_virtual_keys_keeps_its_table_and_hash() -> None:
    result = _translate(_docs())
    body = json.loads(result.table.sealed(1).to_json())
    assert "virtualKeys" not in body
    assert not result.table.settings.client_auth_required  # clientAuth defaults to disabled


def test_anonymous_client_auth_keeps_working_beside_virtual_keys() -> None:
    docs = _docs(_vk("batch", "batch"))
    docs[0]["spec"]["clientAuth"] = {"secretRef": {"name": "clients", "key": "web"}}
    result = _translate(docs)
    assert result.material["virtual-keys"] == CANARY + "-w"
    assert [v.name for v in result.table.virtual_keys or []] == ["batch"]


@pytest.mark.parametrize(
    ("secret", "reason"),
    [
        ({"web": "x"}, "SecretNotResolved"),  # the data key is missing
        ({"batch": "   ", "web": "x"}, "SecretNotResolved"),  # empty
    ],
)
def test_missing_or_empty_secret_authenticates_nothing(secret: dict[str, str], reason: str) -> None:
    result = _translate(_docs(_vk("batch", "batch"), secret=secret))
    verdict = result.virtual_verdicts["batch"]
    assert (verdict.ready, verdict.reason) == (False, reason)
    assert not result.table.virtual_keys
    assert result.table.settings.client_auth_required  # fail closed, not open


def test_a_missing_secret_object_authenticates_nothing() -> None:
    docs = [d for d in _docs(_vk("batch", "batch")) if d["metadata"]["name"] != "clients"]
    verdict = _translate(docs).virtual_verdicts["batch"]
    assert (verdict.ready, verdict.reason) == (False, "SecretNotResolved")
    assert "'clients' not found" in verdict.message


def test_a_duplicate_value_authenticates_nothing_and_names_the_owner() -> None:
    result = _translate(_docs(_vk("a-first", "batch"), _vk("b-copy", "batch")))
    assert [v.name for v in result.table.virtual_keys or []] == ["a-first"]
    verdict = result.virtual_verdicts["b-copy"]
    assert (verdict.ready, verdict.reason) == (False, "DuplicateValue")
    assert "'a-first'" in verdict.message
    assert CANARY not in verdict.message


def test_disabled_and_other_pools_keys_are_not_in_the_table() -> None:
    other = _vk("other", "web")
    other["spec"]["pool"] = "team-b"
    result = _translate(_docs(_vk("batch", "batch", disabled=True), other))
    assert not result.table.virtual_keys
    assert result.virtual_verdicts["batch"].reason == "Disabled"
    assert "other" not in result.virtual_verdicts


def test_a_pool_file_refuses_a_bad_virtual_key_by_field() -> None:
    with pytest.raises(ManifestError, match=r"VirtualKey 'batch': spec\.limits\.maxConcurrent"):
        _translate(_docs(_vk("batch", "batch", limits={"maxConcurrent": 0})))
    with pytest.raises(ValidationError):
        VirtualKeySpec.model_validate(
            {"pool": "p", "secretRef": {"name": "s", "key": "k"}, "models": ["bad model"]}
        )


def test_routing_table_refuses_one_digest_twice() -> None:
    result = _translate(_docs(_vk("batch", "batch"), _vk("web", "web")))
    body = json.loads(result.table.to_json())
    body["virtualKeys"][1]["digest"] = body["virtualKeys"][0]["digest"]
    forged = RoutingTable.model_validate(body).sealed(1)
    with pytest.raises(ValueError, match="digest twice"):
        RoutingTable.from_json(forged.to_json())


def test_crd_has_the_printer_columns_and_matches_the_chart() -> None:
    name = "virtualkeys.sideproxy.dev.yaml"
    text = (ROOT / "crds" / name).read_text(encoding="utf-8")
    assert text == crds.crd_texts()[name]
    assert (ROOT / "helm" / "sideproxy" / "crds" / name).read_text(encoding="utf-8") == text
    doc = yaml.safe_load(text)
    assert doc["spec"]["names"]["plural"] == "virtualkeys"
    assert doc["spec"]["scope"] == "Namespaced"
    version = doc["spec"]["versions"][0]
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns["Ready"] == '.status.conditions[?(@.type=="Ready")].status'
    assert columns["RPM"] == ".spec.limits.requestsPerMinute"
    assert columns["TPM"] == ".spec.limits.tokensPerMinute"
    assert columns["Concurrent"] == ".spec.limits.maxConcurrent"
    assert columns["Requests"] == ".status.currentMinute.requests"
    assert columns["Tokens"] == ".status.currentMinute.tokens"
    assert version["subresources"] == {"status": {}}
    status = version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
    assert {"conditions", "currentMinute", "total", "lastUsed"} <= set(status)
    assert set(status["total"]["properties"]) >= {"requests", "promptTokens", "completionTokens"}


def test_status_model_round_trips() -> None:
    status = VirtualKeyStatus.model_validate(
        {
            "minute": "2026-12-01T15:00:00+00:00",
            "currentMinute": {
                "requests": 3,
                "promptTokens": 10,
                "completionTokens": 5,
                "tokens": 15,
            },
            "total": {"requests": 9},
            "lastUsed": "2026-12-01T15:00:30+00:00",
        }
    )
    assert status.dump()["currentMinute"]["tokens"] == 15


def test_the_health_writers_patch_never_carries_virtual_key_fields() -> None:
    """Both channels merge-patch one ReplicaReport's spec: the health writer's body (a spec
    built without usage) must leave virtualKeys, usageHeartbeat and windowSeconds alone."""
    spec = ReplicaReportSpec(pool="p", replica="r-1", heartbeat=1.0)
    body = spec.dump()
    assert {"virtualKeys", "usageHeartbeat", "windowSeconds"}.isdisjoint(body)
