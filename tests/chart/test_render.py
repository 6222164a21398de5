"""The chart lints, renders with defaults and with every option on, and the API server accepts
what it renders (``kubectl apply --dry-run=server``, strict field validation)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.chart import values_doc
from tests.chart._helm import (
    CHART,
    MANIFESTS,
    all_features,
    apply_dry_run,
    install_chart_crds,
    kinds,
    one,
    render,
    template,
    values_args,
)
from tests.kube import KubeCluster

pytestmark = pytest.mark.kube

LABELS = (
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
    "app.kubernetes.io/component",
    "app.kubernetes.io/managed-by",
    "app.kubernetes.io/part-of",
)


def test_chart_metadata() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2"
    assert chart["version"] == "0.1.0"
    assert chart["appVersion"] == "0.1.0"
    assert chart["kubeVersion"] == ">=1.32.0-0"


@pytest.mark.parametrize("features", ["defaults", "all-on"])
def test_lint_strict(kube: KubeCluster, tmp_path: Path, features: str) -> None:
    values = all_features("sideproxy") if features == "all-on" else None
    proc = kube.helm("lint", "--strict", str(CHART), *values_args(tmp_path, values), check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "[WARNING]" not in proc.stdout
    assert "[ERROR]" not in proc.stdout


def test_defaults_render_the_core(kube: KubeCluster, tmp_path: Path) -> None:
    docs = render(kube, tmp_path, release="team-a", namespace="llm")
    assert kinds(docs) == [
        "ClusterRole/llm-team-a-edit",
        "ClusterRole/llm-team-a-operator",
        "ClusterRole/llm-team-a-view",
        "ClusterRoleBinding/llm-team-a-operator",
        "Deployment/team-a-operator",
        "Deployment/team-a-proxy",
        "Role/team-a-leader",
        "Role/team-a-proxy",
        "RoleBinding/team-a-leader",
        "RoleBinding/team-a-proxy",
        "Service/team-a-proxy",
        "ServiceAccount/team-a-operator",
        "ServiceAccount/team-a-proxy",
    ]
    service = one(docs, "Service")
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["ports"] == [
        {"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP", "appProtocol": "http"}
    ]
    proxy = one(docs, "Deployment", "team-a-proxy")["spec"]["template"]["spec"]
    container = proxy["containers"][0]
    # The pool defaults to the release name; the proxy serves it from the release namespace.
    assert container["args"][:5] == [
        "serve", "--pool=team-a", "--namespace=llm", "--host=0.0.0.0", "--port=8080",
    ]  # fmt: skip
    assert "--no-auth" not in container["args"]
    assert "--shutdown-timeout=50" in container["args"]  # 60 s grace - 5 s preStop - 5 s margin
    assert container["image"] == "ghcr.io/side-proxy/sideproxy:0.1.0"
    assert container["ports"] == [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["lifecycle"]["preStop"] == {"sleep": {"seconds": 5}}
    assert proxy["terminationGracePeriodSeconds"] == 60
    assert proxy["topologySpreadConstraints"][0]["whenUnsatisfiable"] == "ScheduleAnyway"
    assert "preferredDuringSchedulingIgnoredDuringExecution" in proxy["affinity"]["podAntiAffinity"]
    pod_name = {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}
    assert pod_name in container["env"]
    # The pod's uid: its ReplicaReport is owned by (and garbage collected with) the Pod.
    pod_uid = {"name": "POD_UID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.uid"}}}
    assert pod_uid in container["env"]

    operator = one(docs, "Deployment", "team-a-operator")
    assert operator["spec"]["replicas"] == 1
    op = operator["spec"]["template"]["spec"]["containers"][0]
    # No --namespace: cluster-wide, which is what the ClusterRole above grants.
    assert op["args"] == ["operator", "--liveness=http://0.0.0.0:8081/healthz"]
    assert op["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    env = {e["name"]: e.get("value") for e in op["env"]}
    assert env["SIDEPROXY_LEASE_NAME"] == "team-a-operator"
    assert {"POD_NAME", "POD_NAMESPACE"} <= set(env)


def test_all_features_render(kube: KubeCluster, tmp_path: Path) -> None:
    docs = render(kube, tmp_path, all_features("llm"), namespace="llm")
    assert {
        "HorizontalPodAutoscaler/rel-proxy",
        "NetworkPolicy/rel-operator",
        "NetworkPolicy/rel-proxy",
        "PodDisruptionBudget/rel-proxy",
        "Role/rel-operator",
        "RoleBinding/rel-operator",
        "ServiceMonitor/rel-proxy",
    } <= set(kinds(docs))
    cluster_scoped = [d for d in docs if d["kind"].startswith("Cluster")]
    assert {d["metadata"]["labels"]["app.kubernetes.io/component"] for d in cluster_scoped} == {
        "rbac"
    }, "namespaced mode: the only cluster-scoped objects are the aggregated user roles"
    proxy = one(docs, "Deployment", "rel-proxy")
    assert "replicas" not in proxy["spec"], "the HPA owns the replica count"
    args = proxy["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--pool=team-a" in args
    assert args[-1] == "--workers=2"
    operator = one(docs, "Deployment", "rel-operator")
    assert operator["spec"]["strategy"]["type"] == "RollingUpdate"
    assert "--namespace=llm" in operator["spec"]["template"]["spec"]["containers"][0]["args"]
    netpol = one(docs, "NetworkPolicy", "rel-proxy")["spec"]
    assert netpol["ingress"][0]["ports"] == [{"protocol": "TCP", "port": "http"}]
    egress_ports = [p["port"] for rule in netpol["egress"] for p in rule.get("ports", [])]
    assert {53, 443, 6443, 8000} <= set(egress_ports)
    monitor = one(docs, "ServiceMonitor")["spec"]
    assert monitor["endpoints"] == [
        {"port": "http", "path": "/metrics", "scheme": "http", "interval": "15s",
         "scrapeTimeout": "5s"},
    ]  # fmt: skip


def test_defaults_apply_to_the_api_server(
    kube: KubeCluster, namespace: str, tmp_path: Path
) -> None:
    install_chart_crds(kube)
    docs = render(kube, tmp_path, namespace=namespace)
    proc = apply_dry_run(kube, docs)
    assert "Warning" not in proc.stderr, proc.stderr


def test_all_features_apply_to_the_api_server(
    kube: KubeCluster, namespace: str, tmp_path: Path
) -> None:
    install_chart_crds(kube)
    kube.kubectl("apply", "-f", str(MANIFESTS / "servicemonitor-crd.yaml"))
    kube.kubectl(
        "wait", "--for=condition=Established", "--timeout=60s",
        "crd/servicemonitors.monitoring.coreos.com",
    )  # fmt: skip
    docs = render(kube, tmp_path, all_features(namespace), namespace=namespace)
    proc = apply_dry_run(kube, docs)
    assert "Warning" not in proc.stderr, proc.stderr
    # The ServiceMonitor CRD is strict: the dry run above really judged the ServiceMonitor.
    monitor = one(docs, "ServiceMonitor")
    monitor["spec"]["endpoints"][0]["interval"] = "15 seconds"
    bad = apply_dry_run(kube, [monitor], check=False)
    assert bad.returncode != 0
    assert "spec.endpoints[0].interval" in bad.stderr


def test_crds_are_shipped_in_crds_dir(kube: KubeCluster, tmp_path: Path) -> None:
    plain = render(kube, tmp_path)
    assert not [d for d in plain if d["kind"] == "CustomResourceDefinition"]
    with_crds = render(kube, tmp_path, extra=["--include-crds"])
    crds = sorted(
        d["metadata"]["name"] for d in with_crds if d["kind"] == "CustomResourceDefinition"
    )
    assert crds == [
        "creditpools.sideproxy.dev",
        "poolkeys.sideproxy.dev",
        "replicareports.sideproxy.dev",
    ]


def test_labels_and_name_lengths(kube: KubeCluster, tmp_path: Path) -> None:
    release = "a-release-name-that-is-long-enough-to-need-truncation-x"[:53]  # helm's limit
    docs = render(kube, tmp_path, all_features("llm"), release=release, namespace="llm")
    for doc in docs:
        meta = doc["metadata"]
        where = f"{doc['kind']}/{meta['name']}"
        assert len(meta["name"]) <= 63, where
        assert not meta["name"].endswith("-"), where
        for label in LABELS:
            assert label in meta["labels"], f"{where} lacks {label}"
        assert meta["labels"]["app.kubernetes.io/managed-by"] == "Helm"
        assert meta["labels"]["app.kubernetes.io/part-of"] == "sideproxy"
        assert meta["labels"]["team"] == "platform", "commonLabels"
        for value in meta["labels"].values():
            assert len(value) <= 63, where
        template = doc.get("spec", {}).get("template")
        if template:
            selector = doc["spec"]["selector"]["matchLabels"]
            assert selector.items() <= template["metadata"]["labels"].items(), where
            assert "app.kubernetes.io/version" not in selector, "selectors must stay immutable"


def test_image_reference(kube: KubeCluster, tmp_path: Path) -> None:
    def image(values: dict[str, Any]) -> str:
        docs = render(kube, tmp_path, values)
        container = one(docs, "Deployment", "rel-proxy")["spec"]["template"]["spec"]
        return str(container["containers"][0]["image"])

    assert image({}) == "ghcr.io/side-proxy/sideproxy:0.1.0"
    assert image({"image": {"tag": "0.2.0-rc1"}}) == "ghcr.io/side-proxy/sideproxy:0.2.0-rc1"
    digest = "sha256:" + "ab" * 32
    assert image({"image": {"digest": digest}}) == f"ghcr.io/side-proxy/sideproxy@{digest}"


def test_operator_only_and_proxy_only_releases(kube: KubeCluster, tmp_path: Path) -> None:
    operator_only = render(kube, tmp_path, {"proxy": {"enabled": False}})
    assert {d["metadata"]["labels"]["app.kubernetes.io/component"] for d in operator_only} == {
        "operator",
        "rbac",
    }
    proxy_only = render(kube, tmp_path, {"operator": {"enabled": False}, "proxy": {"pool": "b"}})
    assert {d["metadata"]["labels"]["app.kubernetes.io/component"] for d in proxy_only} == {"proxy"}


def test_no_auth_is_opt_in(kube: KubeCluster, tmp_path: Path) -> None:
    docs = render(kube, tmp_path, {"proxy": {"noAuth": True}})
    args = one(docs, "Deployment", "rel-proxy")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--no-auth" in args


def test_notes_tell_the_next_steps(kube: KubeCluster, tmp_path: Path) -> None:
    proc = kube.helm(
        "install", "team-a", str(CHART), "--namespace", "llm", "--dry-run=client",
    )  # fmt: skip
    notes = proc.stdout.split("NOTES:", 1)[1]
    assert "kubectl apply -n llm -f examples/" in notes
    assert 'base_url="http://team-a-proxy.llm.svc/v1"' in notes
    assert "api_key=" in notes
    for command in ("kubectl get poolkeys", "kubectl get creditpools", "kubectl describe poolkey"):
        assert command in notes
    assert "kubectl apply -f crds/" in notes


def _leaves(node: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    if isinstance(node, dict) and node:
        return [leaf for key, value in node.items() for leaf in _leaves(value, (*prefix, key))]
    return [prefix]


def _documented_keys(lines: list[str]) -> dict[tuple[str, ...], bool]:
    """Each key's path, and whether a ``# --`` comment block stands right above it."""
    stack: list[tuple[int, str]] = []
    documented: dict[tuple[str, ...], bool] = {}
    for i, line in enumerate(lines):
        match = re.match(r"^(\s*)([A-Za-z][\w./-]*):", line)
        if not match:
            continue
        indent = len(match.group(1))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, match.group(2)))
        j, doc = i - 1, False
        while j >= 0 and lines[j].strip().startswith("#"):
            doc = doc or lines[j].strip().startswith("# --")
            j -= 1
        documented[tuple(key for _, key in stack)] = doc
    return documented


def test_every_value_has_a_comment() -> None:
    """helm-docs style: every value (a scalar, a list or an empty map) has a ``# --`` comment
    above it or above the map it belongs to (e.g. resources, a selector)."""
    text = (CHART / "values.yaml").read_text()
    documented = _documented_keys(text.splitlines())
    missing = [
        ".".join(leaf)
        for leaf in _leaves(yaml.safe_load(text))
        if not any(documented.get(leaf[:n]) for n in range(1, len(leaf) + 1))
    ]
    assert not missing, f"values.yaml: no '# --' comment for {missing}"


def test_docs_values_table_is_current() -> None:
    generated = values_doc.table((CHART / "values.yaml").read_text())
    assert values_doc.documented(values_doc.DOC.read_text()) == generated, (
        "docs/helm.md's values table is stale: python -m tests.chart.values_doc --write"
    )
    assert len(values_doc.rows((CHART / "values.yaml").read_text())) > 60


def test_schema_is_closed_everywhere() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    open_objects = []

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            if "properties" in node and node.get("additionalProperties") is not False:
                open_objects.append(path)
            for key, value in node.items():
                walk(value, f"{path}/{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{path}/{i}")

    walk(schema, "#")
    assert not open_objects, open_objects


def test_schema_covers_every_value() -> None:
    """Every key of values.yaml is declared in the schema (so none is only 'allowed' by a hole)."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    definitions = schema["definitions"]

    def resolve(node: dict[str, Any]) -> dict[str, Any]:
        while "$ref" in node:
            node = definitions[node["$ref"].rsplit("/", 1)[1]]
        return node

    def check(value: Any, node: dict[str, Any], path: str) -> None:
        node = resolve(node)
        if isinstance(value, dict) and "properties" in node:
            for key, sub in value.items():
                assert key in node["properties"], f"{path}.{key} is not in values.schema.json"
                check(sub, node["properties"][key], f"{path}.{key}")

    check(values, schema, "values")


def test_template_is_deterministic(kube: KubeCluster, tmp_path: Path) -> None:
    first = template(kube, tmp_path, all_features("llm")).stdout
    second = template(kube, tmp_path, all_features("llm")).stdout
    assert first == second
