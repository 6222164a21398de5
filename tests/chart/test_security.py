"""Every pod the chart can run meets Pod Security "restricted", as the API server judges it.

The namespace enforces ``restricted``; the API server's PodSecurity admission then *warns* about
Deployments whose pod template would violate it and *rejects* such Pods. So the rendered
Deployments must apply (dry run) without a warning, and bare Pods built from their templates
must be admitted. A deliberately weakened render proves the admission is really judging.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.chart._helm import Doc, all_features, apply_dry_run, install_chart_crds, render
from tests.kube import KubeCluster

pytestmark = pytest.mark.kube


def _restrict(kube: KubeCluster, namespace: str) -> None:
    kube.kubectl(
        "label", "--overwrite", "namespace", namespace,
        "pod-security.kubernetes.io/enforce=restricted",
        "pod-security.kubernetes.io/enforce-version=latest",
        "pod-security.kubernetes.io/warn=restricted",
        "pod-security.kubernetes.io/warn-version=latest",
    )  # fmt: skip


def _pods(docs: list[Doc], namespace: str) -> list[Doc]:
    return [
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": f"{d['metadata']['name']}-probe",
                "namespace": namespace,
                "labels": d["spec"]["template"]["metadata"]["labels"],
            },
            "spec": d["spec"]["template"]["spec"],
        }
        for d in docs
        if d["kind"] == "Deployment"
    ]


def _workloads(kube: KubeCluster, tmp_path: Path, namespace: str, values: Any) -> list[Doc]:
    docs = render(kube, tmp_path, values, namespace=namespace)
    # The Deployments and what their pods reference; the rest (RBAC, HPA...) is not a pod.
    return [d for d in docs if d["kind"] in ("Deployment", "ServiceAccount")]


@pytest.mark.parametrize("features", ["defaults", "all-on"])
def test_pods_meet_restricted(
    kube: KubeCluster, namespace: str, tmp_path: Path, features: str
) -> None:
    install_chart_crds(kube)
    _restrict(kube, namespace)
    values = all_features(namespace) if features == "all-on" else None
    docs = _workloads(kube, tmp_path, namespace, values)
    assert len([d for d in docs if d["kind"] == "Deployment"]) == 2

    deployments = apply_dry_run(kube, docs)
    assert "PodSecurity" not in deployments.stderr, deployments.stderr

    pods = _pods(docs, namespace)
    admitted = apply_dry_run(kube, pods, create=True, check=False)
    assert admitted.returncode == 0, admitted.stderr
    assert "PodSecurity" not in admitted.stderr


def test_every_container_is_locked_down(kube: KubeCluster, tmp_path: Path) -> None:
    """The same rules, read off the render (what a reviewer checks by eye)."""
    for doc in render(kube, tmp_path, all_features("llm")):
        if doc["kind"] != "Deployment":
            continue
        pod = doc["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == 10001
        assert pod["securityContext"]["runAsGroup"] == 10001
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod["automountServiceAccountToken"] is True  # both talk to the API server
        assert pod["enableServiceLinks"] is False
        assert {"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}} in pod["volumes"]
        for container in pod["containers"]:
            ctx = container["securityContext"]
            assert ctx["allowPrivilegeEscalation"] is False
            assert ctx["capabilities"] == {"drop": ["ALL"]}
            assert ctx["readOnlyRootFilesystem"] is True
            assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]
            assert set(container["resources"]) == {"requests", "limits"}
            assert {"cpu", "memory"} <= set(container["resources"]["requests"])
            assert "memory" in container["resources"]["limits"]
            assert "livenessProbe" in container
            assert "readinessProbe" in container
    for doc in render(kube, tmp_path):
        if doc["kind"] == "ServiceAccount":
            assert doc["automountServiceAccountToken"] is False, doc["metadata"]["name"]


def test_admission_really_judges(kube: KubeCluster, namespace: str, tmp_path: Path) -> None:
    """Control: a weakened pod is warned about as a Deployment and refused as a Pod."""
    _restrict(kube, namespace)
    weakened = {"containerSecurityContext": {"allowPrivilegeEscalation": True}}
    docs = _workloads(kube, tmp_path, namespace, weakened)
    deployments = apply_dry_run(kube, docs)
    assert 'would violate PodSecurity "restricted:latest"' in deployments.stderr
    assert "allowPrivilegeEscalation != false" in deployments.stderr
    refused = apply_dry_run(kube, _pods(docs, namespace), create=True, check=False)
    assert refused.returncode != 0
    assert "violates PodSecurity" in refused.stderr
