"""Bad values fail before anything reaches the cluster, with a message that names the value."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.chart._helm import CHART, one, render, template, values_args
from tests.kube import KubeCluster

pytestmark = pytest.mark.kube

SCHEMA_ERROR = "values don't meet the specifications of the schema(s)"

BAD_VALUES: list[tuple[str, dict[str, Any], str]] = [
    ("unknown key", {"replicaCount": -1}, "additional properties 'replicaCount' not allowed"),
    ("misspelt nested key", {"proxy": {"replica": 2}}, "at '/proxy': additional properties"),
    (
        "wrong type",
        {"proxy": {"replicas": "two"}},
        "at '/proxy/replicas': got string, want integer",
    ),
    ("negative replicas", {"proxy": {"replicas": -1}}, "at '/proxy/replicas': minimum: got -1"),
    ("negative operator", {"operator": {"replicas": -1}}, "at '/operator/replicas': minimum"),
    ("port out of range", {"proxy": {"service": {"port": 70000}}}, "/proxy/service/port"),
    ("enum", {"image": {"pullPolicy": "Sometimes"}}, "value must be one of 'Always'"),
    ("pool name", {"proxy": {"pool": "Team_A"}}, "at '/proxy/pool': 'Team_A' does not match"),
    ("namespaces list", {"operator": {"watchNamespaces": "ns"}}, "got string, want array"),
    ("quantity", {"proxy": {"resources": {"limits": {"memory": "lots"}}}}, "limits/memory"),
    ("duration", {"proxy": {"serviceMonitor": {"interval": "30 seconds"}}}, "/interval"),
    ("boolean", {"proxy": {"noAuth": "yes"}}, "at '/proxy/noAuth': got string, want boolean"),
    ("service type", {"proxy": {"service": {"type": "Ingress"}}}, "/proxy/service/type"),
    ("privileged", {"containerSecurityContext": {"privilege": True}}, "'privilege' not allowed"),
]


@pytest.mark.parametrize(
    ("values", "message"), [c[1:] for c in BAD_VALUES], ids=[c[0] for c in BAD_VALUES]
)
def test_schema_rejects(
    kube: KubeCluster, tmp_path: Path, values: dict[str, Any], message: str
) -> None:
    proc = template(kube, tmp_path, values, check=False)
    assert proc.returncode != 0
    assert SCHEMA_ERROR in proc.stderr
    assert message in proc.stderr, proc.stderr


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"operator": {"replicas": 2, "leaderElection": {"enabled": False}}},
            "operator.replicas above 1 needs operator.leaderElection.enabled",
        ),
        (
            {"proxy": {"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 3}}},
            "proxy.autoscaling.minReplicas (5) is above maxReplicas (3)",
        ),
        (
            {"proxy": {"podDisruptionBudget": {"enabled": True, "minAvailable": ""}}},
            "proxy.podDisruptionBudget needs minAvailable or maxUnavailable",
        ),
        (
            {"operator": {"serviceAccount": {"create": False, "name": ""}}},
            "operator.serviceAccount.name is required when operator.serviceAccount.create is false",
        ),
    ],
    ids=["two-operators-no-lease", "hpa-min-above-max", "empty-pdb", "no-sa-name"],
)
def test_template_rejects_inconsistent_values(
    kube: KubeCluster, tmp_path: Path, values: dict[str, Any], message: str
) -> None:
    proc = template(kube, tmp_path, values, check=False)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr


def test_install_rejects_bad_values_and_creates_nothing(
    kube: KubeCluster, namespace: str, tmp_path: Path
) -> None:
    for name, values, message in BAD_VALUES[:4]:
        proc = kube.helm(
            "install", "bad", str(CHART), "--namespace", namespace,
            *values_args(tmp_path, values, name.replace(" ", "-")),
            check=False,
        )  # fmt: skip
        assert proc.returncode != 0, name
        assert message in proc.stderr, proc.stderr
    assert kube.helm("list", "--namespace", namespace, "--short").stdout.strip() == ""
    leftovers = kube.kubectl("get", "deployments,services,roles", "-n", namespace, "-o", "name")
    assert leftovers.stdout.strip() == ""


def test_null_drops_a_security_field(kube: KubeCluster, tmp_path: Path) -> None:
    """OpenShift picks UIDs itself: ``runAsUser: null`` removes the field, keeps the rest."""
    docs = render(kube, tmp_path, {"podSecurityContext": {"runAsUser": None, "runAsGroup": None}})
    pod = one(docs, "Deployment", "rel-proxy")["spec"]["template"]["spec"]["securityContext"]
    assert pod == {
        "fsGroup": 10001,
        "runAsNonRoot": True,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
