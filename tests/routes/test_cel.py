"""Routes on the real kube-apiserver (marker ``kube``): the CreditPool CRD refuses bad routes
and accepts good ones over named providers; the real operator writes routes into the table and
refuses a route no key may serve, keeping the last good table.

A target naming a provider the pool does not serve is refused by a rule whose message cannot
name the route (a messageExpression that does is over the API server's CEL cost budget); the
order rule's message does. The spec model names the route in both (tests/routes/test_contract.py).
"""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from sideproxy.models import TableRoute, TableTarget
from tests.kube.harness import KubeCluster
from tests.operator.conftest import (
    Cluster,
    Operator,
    cluster,
    crds,
    key_manifest,
    operator,
    operators,
    pool_manifest,
    secret_manifest,
)

__all__ = ["cluster", "crds", "operator", "operators"]  # fixtures, used by name

pytestmark = pytest.mark.kube


def _pool(routes: list[dict[str, Any]], providers: list[dict[str, Any]]) -> str:
    return yaml.safe_dump(
        {
            "apiVersion": "sideproxy.dev/v1alpha1",
            "kind": "CreditPool",
            "metadata": {"name": "routed"},
            "spec": {"providers": providers, "routes": routes},
        }
    )


def _apply(kube: KubeCluster, namespace: str, text: str) -> tuple[int, str]:
    result = kube.kubectl("apply", "-n", namespace, "-f", "-", input=text, check=False)
    return result.returncode, result.stderr


GROQ_OPENAI = [{"name": "groq"}, {"name": "openai"}]
FAST = {"model": "fast", "targets": [{"provider": "groq", "model": "llama-3.1-8b-instant"}]}


@pytest.mark.usefixtures("crds")
def test_crd_refuses_bad_routes_naming_them(kube: KubeCluster, namespace: str) -> None:
    unknown = {
        "model": "fast",
        "targets": [
            {"provider": "groq", "model": "llama-3.1-8b-instant"},
            {"provider": "mistral", "model": "mistral-small"},
        ],
    }
    code, err = _apply(kube, namespace, _pool([unknown], GROQ_OPENAI))
    assert code != 0
    assert "a route target names a provider this pool does not serve" in err

    mixed = {
        "model": "fast",
        "targets": [
            {"provider": "groq", "model": "llama-3.1-8b-instant", "order": 0},
            {"provider": "openai", "model": "gpt-4o-mini"},
        ],
    }
    code, err = _apply(kube, namespace, _pool([mixed], GROQ_OPENAI))
    assert code != 0
    assert "route fast: set order on every target or on none" in err

    code, err = _apply(kube, namespace, _pool([FAST, FAST], GROQ_OPENAI))
    assert code != 0
    assert "Duplicate value" in err

    untyped = [{"name": "vllm-a", "baseURL": "http://vllm-a:8000/v1"}]
    code, err = _apply(kube, namespace, _pool([], untyped))
    assert code != 0
    assert "a provider whose name is not a provider type needs a type" in err


@pytest.mark.usefixtures("crds")
def test_crd_accepts_routes_over_named_providers(kube: KubeCluster, namespace: str) -> None:
    providers = [
        {"name": "groq"},
        {"name": "openai"},
        {"name": "vllm-a", "type": "openai", "baseURL": "http://vllm-a:8000/v1"},
        {"name": "vllm-b", "type": "custom", "baseURL": "http://vllm-b:8000/v1"},
    ]
    local = {
        "model": "local",
        "targets": [
            {"provider": "vllm-a", "model": "llama3.1:8b", "order": 0, "weight": 3},
            {"provider": "vllm-b", "model": "llama3.1:8b", "order": 0},
            {"provider": "openai", "model": "gpt-4o-mini", "order": 1},
        ],
    }
    code, err = _apply(kube, namespace, _pool([FAST, local], providers))
    assert code == 0, err


def test_operator_writes_routes_and_keeps_the_last_good_table(
    cluster: Cluster, operator: Operator
) -> None:
    fast = {
        "model": "fast",
        "targets": [
            {"provider": "groq", "model": "llama-3.1-8b-instant"},
            {"provider": "openai", "model": "gpt-4o-mini"},
        ],
    }
    cluster.apply(
        [
            secret_manifest("keys", {"g": "gsk_CANARY_route_g", "o": "sk-CANARY_route_o"}),
            pool_manifest("p", providers=[{"name": "groq"}, {"name": "openai"}], routes=[fast]),
            key_manifest("k-g", "p", "keys", "g", provider="groq"),
            key_manifest("k-o", "p", "keys", "o", provider="openai", models=["gpt-4o*"]),
        ]
    )
    good = cluster.wait(
        lambda: (t := cluster.table("p")) is not None and len(t.keys) == 2 and t,
        what="a table with both keys",
    )
    assert good.routes == [
        TableRoute(
            model="fast",
            targets=[
                TableTarget(provider="groq", model="llama-3.1-8b-instant", order=0, weight=1),
                TableTarget(provider="openai", model="gpt-4o-mini", order=1, weight=1),
            ],
        )
    ]
    fast["targets"][1]["model"] = "gpt-3.5-turbo"  # type: ignore[index]
    cluster.apply(
        pool_manifest("p", providers=[{"name": "groq"}, {"name": "openai"}], routes=[fast])
    )
    ready = cluster.wait(
        lambda: (
            (c := cluster.condition("creditpools", "p", "Ready")).get("reason") == "InvalidSpec"
            and c
        ),
        what="the pool refused",
    )
    assert ready["message"] == (
        "route fast: no PoolKey of provider 'openai' may serve model 'gpt-3.5-turbo' (spec.models)"
    )
    assert cluster.table("p") == good  # the last good table stays
