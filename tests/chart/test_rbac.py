"""Least privilege, proved by the real API server's authorizer with the chart's own identities.

The chart is installed; each component's ServiceAccount gets a token (TokenRequest) and every
check below is asked as that ServiceAccount: ``kubectl auth can-i`` for the authorizer's verdict,
and real reads for what the proxy actually does (a list with and without the field selector).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

import pytest

from tests.chart._helm import CHART, ROOT, can_i, render, values_args
from tests.kube import KubeCluster

pytestmark = pytest.mark.kube

POOL = "team-a"


def _install(kube: KubeCluster, tmp_path: Path, namespace: str, values: dict[str, Any]) -> None:
    kube.helm(
        "install", "rel", str(CHART), "--namespace", namespace, *values_args(tmp_path, values),
    )  # fmt: skip


@pytest.fixture
def release(kube: KubeCluster, namespace: str, tmp_path: Path) -> Any:
    """The chart installed in namespaced mode: the operator serves only ``namespace``."""
    _install(kube, tmp_path, namespace, {"proxy": {"pool": POOL}, "operator": {
        "watchNamespaces": [namespace]}})  # fmt: skip
    yield namespace
    kube.helm("uninstall", "rel", "--namespace", namespace, "--wait=false", check=False)


def _secret(kube: KubeCluster, namespace: str, name: str) -> None:
    kube.kubectl(
        "create", "secret", "generic", name, "-n", namespace, "--from-literal=k=v",
    )  # fmt: skip


def _configmap(kube: KubeCluster, namespace: str, name: str) -> None:
    kube.kubectl("create", "configmap", name, "-n", namespace, "--from-literal=k=v")


def test_proxy_reads_two_named_objects_and_nothing_else(kube: KubeCluster, release: str) -> None:
    ns = release
    for name in (f"{POOL}-keys", "unrelated"):
        _secret(kube, ns, name)
    for name in (f"{POOL}-routing", "unrelated"):
        _configmap(kube, ns, name)
    proxy = kube.service_account_kubeconfig(ns, "rel-proxy")

    def allowed(*args: str) -> bool:
        return can_i(kube, proxy, *args, "-n", ns)

    assert allowed("get", f"secret/{POOL}-keys")
    assert allowed("watch", f"secret/{POOL}-keys")
    assert allowed("get", f"configmap/{POOL}-routing")
    assert allowed("watch", f"configmap/{POOL}-routing")
    # Health travels on ReplicaReports, which only this identity may write (issue 15.11).
    for verb in ("create", "patch", "get", "list", "watch"):
        assert allowed(verb, "replicareports.sideproxy.dev")
    assert not allowed("delete", "replicareports.sideproxy.dev")
    assert not allowed("create", "events")
    assert not allowed("get", "secret/unrelated")
    assert not allowed("list", "secrets")
    assert not allowed("watch", "secrets")
    assert not allowed("get", "configmap/unrelated")
    assert not allowed("list", "configmaps")
    assert not allowed("update", f"configmap/{POOL}-routing")
    assert not allowed("delete", "configmaps")
    assert not allowed("patch", f"secret/{POOL}-keys")
    assert not allowed("list", "events")
    assert not allowed("get", "creditpools.sideproxy.dev")
    assert not allowed("list", "poolkeys.sideproxy.dev")
    assert not allowed("get", "pods")
    assert not can_i(kube, proxy, "get", f"secret/{POOL}-keys", "-n", "default")

    # What the proxy really does: list and watch by field selector, which RBAC maps to the name.
    named = kube.kubectl("get", "secret", f"{POOL}-keys", "-n", ns, "-o", "name", kubeconfig=proxy)
    assert named.stdout.strip() == f"secret/{POOL}-keys"
    selected = kube.kubectl(
        "get", "configmaps", "-n", ns, f"--field-selector=metadata.name={POOL}-routing",
        "-o", "name", kubeconfig=proxy,
    )  # fmt: skip
    assert selected.stdout.strip() == f"configmap/{POOL}-routing"
    watch = kube.kubectl(
        "get", "--raw",
        f"/api/v1/namespaces/{ns}/configmaps?watch=1&timeoutSeconds=1"
        f"&fieldSelector=metadata.name%3D{POOL}-routing",
        kubeconfig=proxy,
    )  # fmt: skip
    assert '"type":"ADDED"' in watch.stdout
    assert f'"name":"{POOL}-routing"' in watch.stdout

    everything = kube.kubectl("get", "secrets", "-n", ns, kubeconfig=proxy, check=False)
    assert everything.returncode != 0
    assert "Forbidden" in everything.stderr
    assert "cannot list resource" in everything.stderr
    other = kube.kubectl("get", "secret", "unrelated", "-n", ns, kubeconfig=proxy, check=False)
    assert other.returncode != 0
    assert "Forbidden" in other.stderr


def test_operator_is_confined_to_what_it_manages(kube: KubeCluster, release: str) -> None:
    ns = release
    operator = kube.service_account_kubeconfig(ns, "rel-operator")

    def allowed(*args: str, namespace: str = ns) -> bool:
        return can_i(kube, operator, *args, "-n", namespace)

    assert allowed("list", "creditpools.sideproxy.dev")
    assert allowed("watch", "poolkeys.sideproxy.dev")
    assert allowed("patch", "poolkeys.sideproxy.dev", "--subresource=status")
    assert allowed("patch", "creditpools.sideproxy.dev", "--subresource=status")
    assert allowed("update", "creditpools.sideproxy.dev", "--subresource=finalizers")
    assert allowed("create", "secrets")
    assert allowed("update", "configmaps")
    assert allowed("create", "events")
    assert not allowed("list", "events")  # health comes from ReplicaReports, never Events
    assert allowed("watch", "replicareports.sideproxy.dev")
    assert not allowed("create", "replicareports.sideproxy.dev")  # only the proxies write them
    assert allowed("get", "leases.coordination.k8s.io/rel-operator")
    assert allowed("update", "leases.coordination.k8s.io/rel-operator")
    assert allowed("create", "leases.coordination.k8s.io")

    # Nothing it does not manage, and no deletes: the garbage collector cleans up.
    assert not allowed("patch", "poolkeys.sideproxy.dev")  # specs and metadata are the user's
    assert not allowed("delete", "creditpools.sideproxy.dev")
    assert not allowed("delete", "secrets")
    assert not allowed("delete", "configmaps")
    assert not allowed("update", "leases.coordination.k8s.io/someone-else")
    assert not allowed("get", "pods")
    assert not allowed("create", "pods")
    assert not allowed("create", "deployments.apps")
    assert not allowed("create", "rolebindings.rbac.authorization.k8s.io")
    assert not allowed("create", "serviceaccounts/token")
    assert not can_i(kube, operator, "delete", "namespaces/default")
    assert not can_i(kube, operator, "list", "namespaces")
    assert not can_i(kube, operator, "list", "customresourcedefinitions.apiextensions.k8s.io")
    # Namespaced mode: nothing at all outside its namespaces.
    assert not allowed("list", "secrets", namespace="default")
    assert not allowed("list", "creditpools.sideproxy.dev", namespace="default")
    assert not can_i(kube, operator, "list", "secrets", "--all-namespaces")


def test_cluster_wide_operator(kube: KubeCluster, namespace: str, tmp_path: Path) -> None:
    """watchNamespaces empty: a ClusterRole with the same rules, still nothing else."""
    _install(kube, tmp_path, namespace, {"proxy": {"enabled": False}})
    try:
        operator = kube.service_account_kubeconfig(namespace, "rel-operator")
        assert can_i(kube, operator, "list", "secrets", "--all-namespaces")
        assert can_i(kube, operator, "patch", "poolkeys.sideproxy.dev", "--subresource=status",
                     "-n", "default")  # fmt: skip
        assert not can_i(kube, operator, "delete", "secrets", "-n", "default")
        assert not can_i(kube, operator, "get", "pods", "-n", "default")
        assert not can_i(kube, operator, "create", "deployments.apps", "-n", namespace)
        assert not can_i(kube, operator, "delete", "namespaces/default")
        # The Lease stays in the release namespace.
        assert not can_i(kube, operator, "create", "leases.coordination.k8s.io", "-n", "default")
    finally:
        kube.helm("uninstall", "rel", "--namespace", namespace, "--wait=false", check=False)


def test_default_roles_learn_the_crds(kube: KubeCluster, release: str) -> None:
    """``view`` reads pools and keys, ``edit`` changes them; neither gets more than that."""
    ns = release
    viewer = kube.service_account_kubeconfig(ns, "viewer")
    editor = kube.service_account_kubeconfig(ns, "editor")
    for who, role in (("viewer", "view"), ("editor", "edit")):
        kube.kubectl(
            "create", "rolebinding", who, "-n", ns, f"--clusterrole={role}",
            f"--serviceaccount={ns}:{who}",
        )  # fmt: skip
    kube.wait_for(
        lambda: can_i(kube, viewer, "list", "poolkeys.sideproxy.dev", "-n", ns)
        and can_i(kube, editor, "create", "creditpools.sideproxy.dev", "-n", ns),
        timeout=30, message="the aggregation controller to fill view/edit",
    )  # fmt: skip
    assert can_i(kube, viewer, "get", "creditpools.sideproxy.dev", "-n", ns)
    assert not can_i(kube, viewer, "create", "poolkeys.sideproxy.dev", "-n", ns)
    assert not can_i(kube, viewer, "patch", "poolkeys.sideproxy.dev", "--subresource=status",
                     "-n", ns)  # fmt: skip
    assert can_i(kube, editor, "delete", "poolkeys.sideproxy.dev", "-n", ns)
    assert not can_i(kube, editor, "patch", "creditpools.sideproxy.dev", "--subresource=status",
                     "-n", ns)  # fmt: skip


# ------------------------------------------------------------------------------------------
# The operator's own account of its calls, and the chart's rules, must be the same thing.


def _documented_operator_rules() -> dict[tuple[str, str], set[str]]:
    """The RBAC table of sideproxy/operator/__init__.py, as {(group, resource): verbs}."""
    source = (ROOT / "sideproxy" / "operator" / "__init__.py").read_text()
    doc = ast.get_docstring(ast.parse(source)) or ""
    rules: dict[tuple[str, str], set[str]] = {}
    row = re.compile(
        r'^ {4}(?P<group>"" \(core\)|[a-z0-9.-]+)\s+(?P<resources>[a-z/]+(?:, [a-z/]+)*)'
        r"(?:\s+\([^)]*\))?\s{2,}(?P<verbs>[a-z]+(?:, [a-z]+)*)\b"
    )
    for line in doc.splitlines():
        match = row.match(line)
        if not match:
            continue
        group = "" if match["group"].startswith('""') else match["group"]
        for resource in match["resources"].split(", "):
            rules.setdefault((group, resource), set()).update(match["verbs"].split(", "))
    return rules


def _rendered_rules(kube: KubeCluster, tmp_path: Path) -> dict[tuple[str, str], set[str]]:
    docs = render(kube, tmp_path, {"operator": {"watchNamespaces": ["a"]}})
    rules: dict[tuple[str, str], set[str]] = {}
    for doc in docs:
        if doc["kind"] != "Role" or doc["metadata"]["labels"]["app.kubernetes.io/component"] != (
            "operator"
        ):
            continue
        for rule in doc["rules"]:
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    rules.setdefault((group, resource), set()).update(rule["verbs"])
    return rules


def test_operator_rules_match_its_documented_calls(kube: KubeCluster, tmp_path: Path) -> None:
    documented = _documented_operator_rules()
    assert documented, "no RBAC table found in sideproxy/operator/__init__.py"
    assert ("coordination.k8s.io", "leases") in documented
    assert _rendered_rules(kube, tmp_path) == documented


def test_proxy_rules_are_exactly_the_contract(kube: KubeCluster, tmp_path: Path) -> None:
    docs = render(kube, tmp_path, {"proxy": {"pool": POOL}})
    roles = [
        d for d in docs
        if d["kind"] == "Role" and d["metadata"]["labels"]["app.kubernetes.io/component"] == "proxy"
    ]  # fmt: skip
    assert len(roles) == 1
    assert roles[0]["rules"] == [
        {"apiGroups": [""], "resources": ["configmaps"], "resourceNames": [f"{POOL}-routing"],
         "verbs": ["get", "list", "watch"]},
        {"apiGroups": [""], "resources": ["secrets"], "resourceNames": [f"{POOL}-keys"],
         "verbs": ["get", "list", "watch"]},
        {"apiGroups": ["sideproxy.dev"], "resources": ["replicareports"],
         "verbs": ["get", "list", "watch", "create", "patch"]},
    ]  # fmt: skip
    # And the proxy's code watches exactly those two names (sideproxy/proxy/kube.py).
    source = (ROOT / "sideproxy" / "proxy" / "kube.py").read_text()
    assert '"field_selector": f"metadata.name={name}"' in source
