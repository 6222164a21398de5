"""helm install, upgrade and uninstall against the real API server.

Nothing runs the pods (the test control plane has no kubelet): these prove what Helm and the API
server do with the chart: the objects, the CRDs from crds/, a changed value rolling into the
Deployment, two releases side by side (one pool each), and an uninstall that leaves the CRDs
and the user's pools alone.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.chart._helm import CHART, Doc, get_json
from tests.kube import KubeCluster

pytestmark = pytest.mark.kube

CRDS = ("creditpools.sideproxy.dev", "poolkeys.sideproxy.dev")


def _exists(kube: KubeCluster, *args: str) -> bool:
    proc = kube.kubectl("get", *args, "-o", "name", "--ignore-not-found")
    return bool(proc.stdout.strip())


def _pool(name: str) -> Doc:
    return {
        "apiVersion": "sideproxy.dev/v1alpha1",
        "kind": "CreditPool",
        "metadata": {"name": name},
        "spec": {"providers": [{"name": "groq"}], "clientAuth": {"disabled": True}},
    }


def test_install_upgrade_uninstall(kube: KubeCluster, namespace: str, tmp_path: Path) -> None:
    ns = namespace
    cluster_role = f"{ns}-team-a-operator"
    try:
        kube.helm("install", "team-a", str(CHART), "--namespace", ns)
        for kind_name in (
            "deployment/team-a-operator",
            "deployment/team-a-proxy",
            "service/team-a-proxy",
            "serviceaccount/team-a-operator",
            "serviceaccount/team-a-proxy",
            "role/team-a-proxy",
            "rolebinding/team-a-proxy",
            "role/team-a-leader",
        ):
            assert _exists(kube, kind_name, "-n", ns), kind_name
        assert _exists(kube, f"clusterrole/{cluster_role}")
        assert _exists(kube, f"clusterrolebinding/{cluster_role}")
        assert _exists(kube, f"clusterrole/{ns}-team-a-view")
        for crd in CRDS:  # from crds/ (skipped by Helm if an earlier install created them)
            established = kube.kubectl(
                "get", f"crd/{crd}", "-o",
                "jsonpath={.status.conditions[?(@.type=='Established')].status}",
            )  # fmt: skip
            assert established.stdout == "True", crd

        service = get_json(kube, "service/team-a-proxy", "-n", ns)
        assert service["spec"]["ports"][0]["port"] == 80
        assert service["spec"]["ports"][0]["name"] == "http"

        # The user's pool, created after the chart.
        kube.apply(_pool("team-a"), ns)

        before = get_json(kube, "deployment/team-a-proxy", "-n", ns)
        assert before["spec"]["replicas"] == 2
        kube.helm(
            "upgrade", "team-a", str(CHART), "--namespace", ns, "--reuse-values",
            "--set", "proxy.replicas=3", "--set", "proxy.logLevel=DEBUG",
        )  # fmt: skip
        after = get_json(kube, "deployment/team-a-proxy", "-n", ns)
        assert after["spec"]["replicas"] == 3
        assert after["metadata"]["generation"] > before["metadata"]["generation"]
        args = after["spec"]["template"]["spec"]["containers"][0]["args"]
        assert "--log-level=DEBUG" in args
        assert "--log-level=INFO" not in args
        history = json.loads(kube.helm("history", "team-a", "-n", ns, "-o", "json").stdout)
        assert [h["revision"] for h in history] == [1, 2]
        assert history[-1]["status"] == "deployed"

        kube.helm("uninstall", "team-a", "--namespace", ns, "--wait", "--timeout=60s")
        for kind_name in (
            "deployment/team-a-operator",
            "deployment/team-a-proxy",
            "service/team-a-proxy",
            "serviceaccount/team-a-proxy",
            "role/team-a-proxy",
            "role/team-a-leader",
        ):
            assert not _exists(kube, kind_name, "-n", ns), f"{kind_name} survived uninstall"
        assert not _exists(kube, f"clusterrole/{cluster_role}")
        assert not _exists(kube, f"clusterrolebinding/{cluster_role}")
        assert not _exists(kube, f"clusterrole/{ns}-team-a-view")
        # What Helm never deletes: the CRDs, and with them the user's pools.
        for crd in CRDS:
            assert _exists(kube, f"crd/{crd}"), crd
        assert _exists(kube, "creditpool/team-a", "-n", ns)
    finally:
        kube.helm("uninstall", "team-a", "--namespace", ns, "--wait=false", check=False)


def test_one_release_per_pool(kube: KubeCluster, namespace: str) -> None:
    """Several pools = several releases; the operator runs in one of them only."""
    ns = namespace
    try:
        kube.helm(
            "install", "team-a", str(CHART), "--namespace", ns,
            "--set", f"operator.watchNamespaces={{{ns}}}",
        )  # fmt: skip
        kube.helm(
            "install", "team-b", str(CHART), "--namespace", ns,
            "--set", "operator.enabled=false", "--skip-crds",
        )  # fmt: skip
        deployments = kube.kubectl("get", "deployments", "-n", ns, "-o", "name").stdout.split()
        assert sorted(deployments) == [
            "deployment.apps/team-a-operator",
            "deployment.apps/team-a-proxy",
            "deployment.apps/team-b-proxy",
        ]
        role = get_json(kube, "role/team-b-proxy", "-n", ns)
        assert role["rules"][1]["resourceNames"] == ["team-b-keys"]
        operator = get_json(kube, "deployment/team-a-operator", "-n", ns)
        args = operator["spec"]["template"]["spec"]["containers"][0]["args"]
        assert f"--namespace={ns}" in args
    finally:
        for release in ("team-b", "team-a"):
            kube.helm("uninstall", release, "--namespace", ns, "--wait=false", check=False)
