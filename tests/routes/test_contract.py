"""Issue 13, the contract: named providers, routes in the CreditPool, and what is refused.

The refusal cases are golden files too (``tests/golden/<case>/refused.yaml`` with the exact
message in ``expected-error.txt``); ``SIDEPROXY_UPDATE_GOLDEN=1`` rewrites the messages.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from sideproxy.models import CreditPoolSpec, ModelRoute, Provider, ProviderEndpoint, RoutingTable
from sideproxy.proxy._compile import compile_snapshot
from sideproxy.proxy._settings import ProxySettings
from sideproxy.proxy.sources import Snapshot
from sideproxy.translate import from_manifests, translate

GOLDEN = Path(__file__).resolve().parent.parent / "golden"
REFUSED = sorted(p.name for p in GOLDEN.iterdir() if (p / "refused.yaml").exists())
UPDATE = os.environ.get("SIDEPROXY_UPDATE_GOLDEN", "") not in ("", "0", "false")


def _translate(path: Path) -> None:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    pool, keys, secrets = from_manifests(docs)
    translate(pool, keys, secrets, now=0.0)


@pytest.mark.parametrize("case", REFUSED)
def test_refused_routes_name_the_route(case: str) -> None:
    with pytest.raises(ValueError, match="route fast") as caught:
        _translate(GOLDEN / case / "refused.yaml")
    message = str(caught.value)
    assert "route fast" in message
    expected = GOLDEN / case / "expected-error.txt"
    if UPDATE:
        expected.write_text(message + "\n")
    assert expected.read_text() == message + "\n"


def test_every_refusal_case_is_checked() -> None:
    assert set(REFUSED) >= {"route-model-no-key-serves", "route-unknown-provider"}


def test_a_provider_name_is_a_type_or_names_one() -> None:
    assert ProviderEndpoint.model_validate({"name": "groq"}).kind is Provider.GROQ
    named = ProviderEndpoint.model_validate(
        {"name": "vllm-a", "type": "openai", "baseURL": "http://a:8000/v1"}
    )
    assert (named.kind, named.url) == (Provider.OPENAI, "http://a:8000/v1")
    with pytest.raises(ValidationError, match="'vllm-a' is not a provider type: set its type"):
        ProviderEndpoint.model_validate({"name": "vllm-a", "baseURL": "http://a:8000/v1"})
    with pytest.raises(ValidationError, match="a custom provider needs a baseURL"):
        ProviderEndpoint.model_validate({"name": "mine", "type": "custom"})


def test_two_endpoints_of_one_type_serve_one_pool() -> None:
    spec = CreditPoolSpec.model_validate(
        {
            "defaultProvider": "vllm-a",
            "providers": [
                {"name": "vllm-a", "type": "openai", "baseURL": "http://a:8000/v1"},
                {"name": "vllm-b", "type": "openai", "baseURL": "http://b:8000/v1"},
            ],
        }
    )
    assert [p.kind for p in spec.providers] == [Provider.OPENAI, Provider.OPENAI]


def test_order_is_position_unless_every_target_sets_it() -> None:
    chain = ModelRoute.model_validate(
        {
            "model": "fast",
            "targets": [{"provider": "a", "model": "x"}, {"provider": "b", "model": "y"}],
        }
    )
    assert chain.orders() == [0, 1]
    shared = ModelRoute.model_validate(
        {
            "model": "fast",
            "targets": [
                {"provider": "a", "model": "x", "order": 0, "weight": 3},
                {"provider": "b", "model": "y", "order": 0},
                {"provider": "c", "model": "z", "order": 1},
            ],
        }
    )
    assert shared.orders() == [0, 0, 1]
    with pytest.raises(ValidationError, match="route fast: set order on every target or on none"):
        ModelRoute.model_validate(
            {
                "model": "fast",
                "targets": [
                    {"provider": "a", "model": "x", "order": 0},
                    {"provider": "b", "model": "y"},
                ],
            }
        )
    with pytest.raises(ValidationError, match=r"route fast: a target \(provider, model\) appears"):
        ModelRoute.model_validate(
            {"model": "fast", "targets": [{"provider": "a", "model": "x"}] * 2}
        )


def test_a_route_model_appears_once() -> None:
    route = {"model": "fast", "targets": [{"provider": "groq", "model": "x"}]}
    with pytest.raises(ValidationError, match="each route model may appear once"):
        CreditPoolSpec.model_validate({"routes": [route, route]})


def test_table_without_routes_keeps_its_hash() -> None:
    # A table written before routes existed: no "routes" / "types" in it, same hash as before.
    golden = (GOLDEN / "three-keys" / "expected-table.json").read_text()
    table = RoutingTable.from_json(golden)
    assert table.routes is None
    assert table.settings.types is None


def test_named_endpoints_compile_by_type() -> None:
    docs = [
        d
        for d in yaml.safe_load_all(
            (GOLDEN / "routes-and-named-providers" / "input.yaml").read_text()
        )
        if d
    ]
    pool, keys, secrets = from_manifests(docs)
    translation = translate(pool, keys, secrets, now=0.0)
    snapshot = Snapshot(translation.table.sealed(1), translation.material, "test")
    compiled = compile_snapshot(snapshot, ProxySettings(), now=0.0)
    up = compiled.upstreams
    assert up["vllm-a"].base == "http://vllm-a.models.svc:8000/v1"
    assert up["vllm-a"].auth_prefix == b"Bearer "
    assert up["anthropic"].anthropic
    assert not up["vllm-a"].anthropic
    assert {k.provider for k in compiled.keys} == {
        "groq",
        "openai",
        "anthropic",
        "vllm-a",
        "vllm-b",
    }
