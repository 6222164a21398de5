"""Rendering and inspecting the chart with the pinned helm of tests/kube (never a helm on PATH)."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from tests.kube import KubeCluster

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "sideproxy"
MANIFESTS = Path(__file__).resolve().parent / "manifests"

Doc = dict[str, Any]


def values_args(
    tmp_path: Path, values: Mapping[str, Any] | None, name: str = "values"
) -> list[str]:
    """``-f <file>`` for a values mapping (a file, not --set, so types survive exactly)."""
    if not values:
        return []
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(dict(values), sort_keys=False))
    return ["-f", str(path)]


def template(
    kube: KubeCluster,
    tmp_path: Path,
    values: Mapping[str, Any] | None = None,
    *,
    release: str = "rel",
    namespace: str = "sideproxy",
    extra: Iterable[str] = (),
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    return kube.helm(
        "template", release, str(CHART), "--namespace", namespace,
        *values_args(tmp_path, values), *extra,
        check=check,
    )  # fmt: skip


def render(
    kube: KubeCluster,
    tmp_path: Path,
    values: Mapping[str, Any] | None = None,
    *,
    release: str = "rel",
    namespace: str = "sideproxy",
    extra: Iterable[str] = (),
) -> list[Doc]:
    """The chart's objects (CRDs excluded unless ``--include-crds`` is in ``extra``)."""
    out = template(kube, tmp_path, values, release=release, namespace=namespace, extra=extra)
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def one(docs: Iterable[Doc], kind: str, name: str | None = None) -> Doc:
    found = [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def kinds(docs: Iterable[Doc]) -> list[str]:
    return sorted(f"{d['kind']}/{d['metadata']['name']}" for d in docs)


def all_features(namespace: str) -> dict[str, Any]:
    """Values that switch every optional part of the chart on (and the operator namespaced)."""
    return {
        "imagePullSecrets": [{"name": "regcred"}],
        "commonLabels": {"team": "platform"},
        "operator": {
            "replicas": 2,
            "watchNamespaces": [namespace],
            "extraEnv": [{"name": "SIDEPROXY_RESYNC_SECONDS", "value": "120"}],
            "podAnnotations": {"example.com/owner": "platform"},
            "tolerations": [
                {"key": "dedicated", "operator": "Equal", "value": "llm", "effect": "NoSchedule"}
            ],
            "priorityClassName": "",
        },
        "proxy": {
            "pool": "team-a",
            "noAuth": False,
            "logFormat": "json",
            "extraArgs": ["--workers=2"],
            "podLabels": {"tier": "gateway"},
            "nodeSelector": {"kubernetes.io/os": "linux"},
            "service": {"annotations": {"example.com/scrape": "true"}},
            "podDisruptionBudget": {"enabled": True, "minAvailable": 1},
            "autoscaling": {
                "enabled": True,
                "minReplicas": 2,
                "maxReplicas": 6,
                "targetCPUUtilizationPercentage": 60,
            },
            "serviceMonitor": {
                "enabled": True,
                "interval": "15s",
                "scrapeTimeout": "5s",
                "labels": {"release": "prometheus"},
            },
        },
        "networkPolicy": {
            "enabled": True,
            "ingressFrom": [
                {"namespaceSelector": {"matchLabels": {"sideproxy.dev/client": "true"}}},
                {"podSelector": {"matchLabels": {"app": "backend"}}},
            ],
            "apiServer": {"cidrs": ["10.0.0.1/32"], "ports": [443, 6443]},
            "providers": {"cidrs": ["0.0.0.0/0"], "except": ["10.0.0.0/8"], "ports": [443]},
            "extraEgress": [
                {
                    "to": [{"podSelector": {"matchLabels": {"app": "vllm"}}}],
                    "ports": [{"protocol": "TCP", "port": 8000}],
                },
            ],
        },
    }


def apply_dry_run(
    kube: KubeCluster, docs: Iterable[Doc], *, create: bool = False, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """``kubectl apply`` (or ``create``) ``--dry-run=server``: the real API server's verdict."""
    text = yaml.safe_dump_all(list(docs), sort_keys=False)
    verb = "create" if create else "apply"
    return kube.kubectl(verb, "--dry-run=server", "-f", "-", input=text, check=check)


def install_chart_crds(kube: KubeCluster) -> None:
    """What ``helm install`` does with crds/ on a first install, for tests that only render."""
    kube.kubectl("apply", "-f", str(CHART / "crds"))
    kube.kubectl(
        "wait", "--for=condition=Established", "--timeout=60s",
        "crd/creditpools.sideproxy.dev", "crd/poolkeys.sideproxy.dev",
    )  # fmt: skip


def can_i(kube: KubeCluster, kubeconfig: Path, *args: str) -> bool:
    """``kubectl auth can-i`` as the identity in ``kubeconfig``: the authorizer's yes or no."""
    proc = kube.kubectl("auth", "can-i", *args, kubeconfig=kubeconfig, check=False)
    answer = proc.stdout.strip()
    assert answer in ("yes", "no"), f"kubectl auth can-i {' '.join(args)}: {proc.stderr}"
    return answer == "yes"


def get_json(kube: KubeCluster, *args: str) -> Doc:
    out: Doc = json.loads(kube.kubectl("get", *args, "-o", "json").stdout)
    return out
