"""The VirtualKey CRD on the real API server: accepted, validated, printed by ``kubectl get``."""

from __future__ import annotations

import json
from pathlib import Path

from tests.kube.harness import KubeCluster

ROOT = Path(__file__).resolve().parents[2]
CRD = ROOT / "crds" / "virtualkeys.sideproxy.dev.yaml"


def _vk(name: str, **spec: object) -> dict[str, object]:
    return {
        "apiVersion": "sideproxy.dev/v1alpha1",
        "kind": "VirtualKey",
        "metadata": {"name": name},
        "spec": {"pool": "team-a", "secretRef": {"name": "clients", "key": name}, **spec},
    }


def test_kubectl_get_virtualkeys_shows_ready_limits_and_this_minutes_usage(
    kube: KubeCluster, namespace: str
) -> None:
    kube.kubectl("apply", "-f", str(CRD))
    kube.kubectl(
        "wait", "--for=condition=Established", "crd/virtualkeys.sideproxy.dev", "--timeout=60s"
    )
    limits = {"requestsPerMinute": 600, "tokensPerMinute": 200000, "maxConcurrent": 16}
    kube.apply(_vk("batch", models=["small", "llama-*"], limits=limits), namespace)
    status = {
        "minute": "2026-12-01T15:00:00+00:00",
        "currentMinute": {"requests": 7, "promptTokens": 30, "completionTokens": 12, "tokens": 42},
        "conditions": [
            {"type": "Ready", "status": "True", "reason": "Ready", "message": "ok",
             "lastTransitionTime": "2026-12-01T15:00:00Z"}
        ],
    }  # fmt: skip
    kube.kubectl(
        "patch", "virtualkey", "batch", "-n", namespace, "--subresource=status", "--type=merge",
        "-p", json.dumps({"status": status}),
    )  # fmt: skip
    out = kube.kubectl("get", "vk", "-n", namespace).stdout.split("\n")
    header, row = out[0].split(), out[1].split()
    assert header[:8] == ["NAME", "POOL", "READY", "RPM", "TPM", "CONCURRENT", "REQUESTS", "TOKENS"]
    assert row[:8] == ["batch", "team-a", "True", "600", "200000", "16", "7", "42"]


def test_the_api_server_refuses_a_bad_virtual_key(kube: KubeCluster, namespace: str) -> None:
    kube.kubectl("apply", "-f", str(CRD))
    kube.kubectl(
        "wait", "--for=condition=Established", "crd/virtualkeys.sideproxy.dev", "--timeout=60s"
    )
    for bad in (
        _vk("zero", limits={"maxConcurrent": 0}),
        _vk("glob", models=["no spaces allowed"]),
        _vk("x" * 64),
    ):
        result = kube.kubectl(
            "apply", "-n", namespace, "-f", "-", input=json.dumps(bad), check=False
        )
        assert result.returncode != 0, bad
        assert "Invalid" in result.stderr or "invalid" in result.stderr
