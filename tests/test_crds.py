"""One schema, three forms: the pydantic models, ``crds/*.yaml`` and the Helm chart's CRDs.

The chart (``helm/sideproxy``) is written later by copying ``crds/``. Until that directory exists
this test checks the first two forms only; the moment ``helm/sideproxy`` exists, its
``crds/`` must hold byte-identical copies of every file here and nothing else, or this fails.
It deliberately never skips.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from sideproxy import crds
from sideproxy.models import (
    MODEL_PATTERN,
    CreditPoolSpec,
    CreditPoolStatus,
    ModelRoute,
    PoolKeySpec,
    PoolKeyStatus,
    ProviderEndpoint,
    compact_cooling,
)

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "sideproxy"


def test_committed_crds_equal_the_models() -> None:
    committed = {p.name: p.read_text(encoding="utf-8") for p in (ROOT / "crds").glob("*.yaml")}
    generated = crds.crd_texts()
    assert sorted(committed) == sorted(generated), "crds/ holds other files than the generator"
    for name, text in generated.items():
        assert committed[name] == text, f"crds/{name} is stale: python -m sideproxy.crds --write"


def test_helm_chart_crds_equal_crds_dir() -> None:
    # Only the first two forms exist until the chart lands: then this check bites.
    if not CHART.exists():
        return  # two forms until helm/sideproxy exists; from then on, three
    chart_crds = CHART / "crds"
    assert chart_crds.is_dir(), "helm/sideproxy exists but has no crds/ directory"
    ours = {p.name: p.read_bytes() for p in (ROOT / "crds").glob("*.yaml")}
    theirs = {p.name: p.read_bytes() for p in chart_crds.glob("*.yaml")}
    assert sorted(theirs) == sorted(ours), "helm/sideproxy/crds/ must hold exactly crds/*.yaml"
    for name, data in ours.items():
        assert theirs[name] == data, f"helm/sideproxy/crds/{name} differs from crds/{name}"


def _schema(filename: str) -> dict[str, Any]:
    doc = yaml.safe_load((ROOT / "crds" / filename).read_text(encoding="utf-8"))
    assert isinstance(doc, dict)
    version = doc["spec"]["versions"][0]
    return {"doc": doc, "version": version, "root": version["schema"]["openAPIV3Schema"]}


def _walk(node: Any) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    if isinstance(node, dict):
        found.append(node)
        for value in node.values():
            found.extend(_walk(value))
    elif isinstance(node, list):
        for value in node:
            found.extend(_walk(value))
    return found


@pytest.mark.parametrize(
    "filename", ["creditpools.sideproxy.dev.yaml", "poolkeys.sideproxy.dev.yaml"]
)
def test_schema_is_structural(filename: str) -> None:
    root = _schema(filename)["root"]
    for node in _walk(root):
        for banned in ("$ref", "anyOf", "allOf", "oneOf", "title", "$defs", "const"):
            assert banned not in node, f"{banned} survived in {filename}"
        assert node.get("default", 0) is not None
        if "properties" in node:
            assert node.get("type") == "object"
            assert "additionalProperties" not in node
        if "exclusiveMinimum" in node:
            assert node["exclusiveMinimum"] is True


def test_every_model_field_is_in_the_schema() -> None:
    pool = _schema("creditpools.sideproxy.dev.yaml")["root"]["properties"]
    key = _schema("poolkeys.sideproxy.dev.yaml")["root"]["properties"]
    for model, schema in (
        (CreditPoolSpec, pool["spec"]),
        (CreditPoolStatus, pool["status"]),
        (PoolKeySpec, key["spec"]),
        (PoolKeyStatus, key["status"]),
    ):
        aliases = {f.alias or n for n, f in model.model_fields.items()}
        assert set(schema["properties"]) == aliases, model.__name__
        for prop in schema["properties"].values():
            assert prop.get("description"), f"{model.__name__}: a field has no description"


def test_cel_rules_become_validations() -> None:
    spec = _schema("creditpools.sideproxy.dev.yaml")["root"]["properties"]["spec"]
    assert spec["x-kubernetes-validations"] == CreditPoolSpec.cel_rules
    endpoint = spec["properties"]["providers"]["items"]
    assert endpoint["x-kubernetes-validations"] == ProviderEndpoint.cel_rules
    # CEL cost must be bounded: the lists and strings CEL iterates over have limits.
    assert spec["properties"]["providers"]["maxItems"] == 16
    assert endpoint["properties"]["name"]["maxLength"] == 63  # a DNS label: a path prefix
    assert endpoint["properties"]["type"]["maxLength"] == len("openrouter")
    routes = spec["properties"]["routes"]
    assert routes["maxItems"] == 64
    assert routes["items"]["properties"]["targets"]["maxItems"] == 16
    assert routes["items"]["x-kubernetes-validations"] == ModelRoute.cel_rules
    # Unique route models and unique (provider, model) targets cost CEL nothing: list maps.
    assert routes["x-kubernetes-list-map-keys"] == ["model"]
    assert routes["items"]["properties"]["targets"]["x-kubernetes-list-map-keys"] == [
        "provider",
        "model",
    ]


def test_defaults_equal_the_models_defaults() -> None:
    spec = _schema("creditpools.sideproxy.dev.yaml")["root"]["properties"]["spec"]["properties"]
    built = CreditPoolSpec().dump()
    for name, prop in spec.items():
        assert prop["default"] == built[name], name
    weight = _schema("poolkeys.sideproxy.dev.yaml")["root"]["properties"]["spec"]["properties"]
    assert weight["weight"] == {
        # kubectl explain prints only the description, so it carries the default and bounds.
        "description": "Share of the tier's traffic; 0 keeps the key configured but idle. "
        "Default: 1. Range: >= 0, <= 1000.",
        "type": "integer",
        "default": 1,
        "minimum": 0,
        "maximum": 1000,
    }


def test_exclusive_bounds_are_openapi_3_0() -> None:
    retry = _schema("creditpools.sideproxy.dev.yaml")["root"]["properties"]["spec"]
    total = retry["properties"]["retry"]["properties"]["totalTimeoutSeconds"]
    assert total["minimum"] == 0
    assert total["exclusiveMinimum"] is True


def test_conditions_are_a_list_map() -> None:
    for filename in ("creditpools.sideproxy.dev.yaml", "poolkeys.sideproxy.dev.yaml"):
        conditions = _schema(filename)["root"]["properties"]["status"]["properties"]["conditions"]
        assert conditions["x-kubernetes-list-type"] == "map"
        assert conditions["x-kubernetes-list-map-keys"] == ["type"]
        assert "type" in conditions["items"]["required"]


def test_names_columns_and_subresources() -> None:
    pool = _schema("creditpools.sideproxy.dev.yaml")
    key = _schema("poolkeys.sideproxy.dev.yaml")
    assert pool["doc"]["spec"]["names"]["shortNames"] == ["cpool", "cp"]
    assert key["doc"]["spec"]["names"]["shortNames"] == ["pk"]
    for schema in (pool, key):
        assert schema["doc"]["spec"]["names"]["categories"] == ["sideproxy"]
        assert schema["doc"]["spec"]["scope"] == "Namespaced"
        assert schema["version"]["name"] == "v1alpha1"
        assert schema["version"]["subresources"] == {"status": {}}
    key_columns = {c["name"]: c for c in key["version"]["additionalPrinterColumns"]}
    assert [
        c["name"] for c in key["version"]["additionalPrinterColumns"] if not c.get("priority")
    ] == [
        "Pool",
        "Provider",
        "Tier",
        "Weight",
        "State",
        "Cooling",
        "Cooldown-Until",
        "429s",
        "Age",
    ]
    assert key_columns["State"]["jsonPath"] == ".status.phase"
    # A key cooling for one model ("big") reads apart from one out for all ("all models").
    assert key_columns["Cooling"]["jsonPath"] == ".status.cooling"
    assert key_columns["429s"]["jsonPath"] == ".status.rateLimitedCount"
    assert key_columns["Message"]["priority"] == 1
    pool_columns = [
        c["name"] for c in pool["version"]["additionalPrinterColumns"] if not c.get("priority")
    ]
    assert pool_columns == ["Ready", "Keys", "Cooling", "Age"]


def test_check_reports_stale_files(tmp_path: Path) -> None:
    assert crds.check(tmp_path) == sorted(crds.crd_texts())
    crds.write(tmp_path)
    assert crds.check(tmp_path) == []
    (tmp_path / "poolkeys.sideproxy.dev.yaml").write_text("# edited\n", encoding="utf-8")
    assert crds.check(tmp_path) == ["poolkeys.sideproxy.dev.yaml"]
    assert crds.main(["--check", "--dir", str(tmp_path)]) == 1


def test_converter_refuses_what_it_cannot_express() -> None:
    class Either(BaseModel):
        value: int | str

    with pytest.raises(crds.SchemaError, match="anyOf"):
        crds.openapi_schema(Either)


def test_docs_field_reference_is_current() -> None:
    text = crds.DOCS.read_text(encoding="utf-8")
    assert crds.REFERENCE_BEGIN in text
    assert crds.docs_with_reference(text) == text, "run: python -m sideproxy.crds --docs"
    for field in ("spec.weight", "spec.providers[].baseURL", "status.conditions[].type"):
        assert f"`{field}`" in text


def test_issue_11_fields_refuse_bad_input_in_the_api_server() -> None:
    """Unknown scope, negative back-off, an invalid glob: the CRD itself refuses them."""
    pool = _schema("creditpools.sideproxy.dev.yaml")["root"]["properties"]["spec"]["properties"]
    assert pool["cooldown"]["properties"]["scope"]["enum"] == ["model", "key"]
    assert pool["cooldown"]["properties"]["scope"]["default"] == "model"
    quota = pool["quota"]
    assert quota["properties"]["backoffSeconds"]["minimum"] == 1
    assert quota["properties"]["backoffSeconds"]["default"] == 300
    assert quota["properties"]["maxBackoffSeconds"]["default"] == 21600
    assert {
        "rule": "self.maxBackoffSeconds >= self.backoffSeconds",
        "message": "quota.maxBackoffSeconds must be at least quota.backoffSeconds",
    } in quota["x-kubernetes-validations"]
    key = _schema("poolkeys.sideproxy.dev.yaml")["root"]["properties"]
    models = key["spec"]["properties"]["models"]
    assert models["items"]["pattern"] == MODEL_PATTERN
    assert models["maxItems"] == 64
    status = key["status"]["properties"]
    assert "Exhausted" in status["phase"]["enum"]
    assert status["coolingModels"]["maxItems"] == 5


def test_per_model_status_is_compact() -> None:
    cooling = [(f"m{i}", 100.0 + i) for i in range(8)] + [("m0", 200.0), ("old", 5.0)]
    fields = compact_cooling(cooling, key_wide=False, now=50.0, rfc3339=lambda t: f"t{t:g}")
    assert [c["model"] for c in fields["coolingModels"]] == ["m1", "m2", "m3", "m4", "m5"]
    assert fields["coolingMoreModels"] == 3  # m6, m7 and m0 (its later deadline wins)
    assert fields["cooling"] == "m1, m2, m3, m4, m5 and 3 more"
    PoolKeyStatus.model_validate(fields)  # fits the status schema
    assert compact_cooling([], key_wide=True, now=0, rfc3339=str)["cooling"] == "all models"
    assert compact_cooling([], key_wide=False, now=0, rfc3339=str)["cooling"] is None
