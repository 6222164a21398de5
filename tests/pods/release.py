"""The chart installed on the pod cluster, a fake provider Deployment as its upstream, a pool.

:class:`Release` is what the pod tests share: namespace ``sp``, release ``team-a`` (so pool
``team-a``, Deployments ``team-a-proxy`` / ``team-a-operator``, Service ``team-a-proxy``), the fake
provider as Deployment + Service ``fake`` running this tree's image
(``python -m sideproxy.fake_provider``), and clients that run the openai SDK inside the node's
network namespace (:mod:`tests.pods.client`).
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from tests.kube.harness import REPO_ROOT, wait_for
from tests.kube.images import Image
from tests.kube.node import PodCluster

CHART = REPO_ROOT / "helm" / "sideproxy"
NAMESPACE = "sp"
RELEASE = POOL = "team-a"
PROXY = f"{RELEASE}-proxy"
OPERATOR = f"{RELEASE}-operator"
FAKE = "fake"
CLIENT_SECRET = f"{POOL}-clients"
VIRTUAL_KEY = "sp-pods-test-virtual-key-0b5d7c1e9a3f46d2"
KEY_SECRET = "fake-keys"
# Canary-style values: a test can grep any output for them.
KEYS = {
    "key-1": "fk-CANARY-pods-0001-xxxxxxxxxxxxxxxxxxxxxxxx",
    "key-2": "fk-CANARY-pods-0002-xxxxxxxxxxxxxxxxxxxxxxxx",
}
GROUP = "sideproxy.dev/v1alpha1"
READY_TIMEOUT = 240.0


def chart_values(image: Image, **overrides: Any) -> dict[str, Any]:
    """What a user sets for an image they built and loaded themselves (see README)."""
    values: dict[str, Any] = {
        "image": {"repository": image.repository, "tag": image.tag, "pullPolicy": "Never"},
        "operator": {"watchNamespaces": [NAMESPACE]},
        "proxy": {
            "podDisruptionBudget": {"enabled": True},
            # shutdown-timeout = 20 - 5 - 5 = 10 s: short enough for the streams test.
            "terminationGracePeriodSeconds": 20,
            "preStopSleepSeconds": 5,
        },
    }
    for key, value in overrides.items():
        values[key] = {**values.get(key, {}), **value}
    return values


class Release:
    def __init__(self, cluster: PodCluster, image: Image, workdir: Path) -> None:
        self.cluster = cluster
        self.image = image
        self.workdir = workdir
        self.ns = NAMESPACE

    # -- kubectl / helm -----------------------------------------------------------------------

    def kubectl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.cluster.kubectl(*args, "-n", self.ns, check=check)

    def get(self, *args: str) -> Any:
        return json.loads(self.kubectl("get", *args, "-o", "json").stdout)

    def helm(self, verb: str, *args: str, values: Mapping[str, Any] | None = None) -> None:
        extra: list[str] = []
        if values is not None:
            path = self.workdir / f"values-{verb}.yaml"
            path.write_text(yaml.safe_dump(dict(values), sort_keys=False))
            extra = ["-f", str(path)]
        self.cluster.helm(verb, RELEASE, *args, "--namespace", self.ns, *extra, timeout=600.0)

    def install(self, **overrides: Any) -> None:
        self.cluster.create_namespace(self.ns)
        self.helm("install", str(CHART), values=chart_values(self.image, **overrides))

    # -- the upstream and the pool ------------------------------------------------------------

    def deploy_fake(self) -> None:
        labels = {"app": FAKE}
        security = {
            "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
            "runAsNonRoot": True, "capabilities": {"drop": ["ALL"]},
        }  # fmt: skip
        deployment = {
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": FAKE, "labels": labels},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": labels},
                "template": {"metadata": {"labels": labels}, "spec": {
                    "automountServiceAccountToken": False,
                    "securityContext": {"runAsUser": 10001, "runAsGroup": 10001,
                                        "seccompProfile": {"type": "RuntimeDefault"}},
                    "containers": [{
                        "name": "fake", "image": self.image.ref, "imagePullPolicy": "Never",
                        "command": ["python", "-m", "sideproxy.fake_provider"],
                        "args": ["--host=0.0.0.0", "--port=8080",
                                 f"--keys={','.join(KEYS.values())}"],
                        "ports": [{"name": "http", "containerPort": 8080}],
                        "readinessProbe": {"httpGet": {"path": "/_fake/stats", "port": "http"},
                                           "periodSeconds": 2},
                        "securityContext": security,
                        "resources": {"requests": {"cpu": "50m", "memory": "64Mi"}},
                    }],
                }},
            },
        }  # fmt: skip
        service = {
            "apiVersion": "v1", "kind": "Service", "metadata": {"name": FAKE},
            "spec": {"selector": labels, "ports": [{"name": "http", "port": 80,
                                                    "targetPort": "http"}]},
        }  # fmt: skip
        self.cluster.apply([deployment, service], self.ns)
        self.wait_available(FAKE)

    def apply_pool(self) -> None:
        """The keys' Secret, the clients' Secret, CreditPool ``team-a`` and one PoolKey per key.

        The provider's baseURL is the fake's ClusterIP: the cluster has no DNS.
        """
        fake_ip = self.cluster.cluster_ip(self.ns, FAKE)
        docs: list[dict[str, Any]] = [
            {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": KEY_SECRET},
             "type": "Opaque", "stringData": dict(KEYS)},
            {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": CLIENT_SECRET},
             "type": "Opaque", "stringData": {"virtual-keys": VIRTUAL_KEY}},
            {"apiVersion": GROUP, "kind": "CreditPool", "metadata": {"name": POOL},
             "spec": {
                 "defaultProvider": "custom",
                 "providers": [{"name": "custom", "baseURL": f"http://{fake_ip}/v1"}],
                 "clientAuth": {"secretRef": {"name": CLIENT_SECRET, "key": "virtual-keys"}},
                 "cooldown": {"defaultSeconds": 30},
             }},
        ]  # fmt: skip
        docs += [
            {"apiVersion": GROUP, "kind": "PoolKey", "metadata": {"name": name},
             "spec": {"pool": POOL, "provider": "custom",
                      "secretRef": {"name": KEY_SECRET, "key": name}}}
            for name in KEYS
        ]  # fmt: skip
        self.cluster.apply(docs, self.ns)

    # -- waiting ------------------------------------------------------------------------------

    def wait_available(self, deployment: str, timeout: float = READY_TIMEOUT) -> None:
        """Every replica of the current template Ready (``kubectl rollout status``)."""
        self.cluster.kubectl(
            "rollout", "status", f"deployment/{deployment}", "-n", self.ns,
            f"--timeout={int(timeout)}s", timeout=timeout + 30,
        )  # fmt: skip

    def pods(self, component: str) -> list[dict[str, Any]]:
        """Pods of ``proxy`` or ``operator`` (or the fake: ``app=fake``), not terminating."""
        selector = (
            f"app={FAKE}" if component == FAKE else f"app.kubernetes.io/component={component}"
        )
        items = self.get("pods", "-l", selector)["items"]
        return [p for p in items if not p["metadata"].get("deletionTimestamp")]

    @staticmethod
    def ready(pod: Mapping[str, Any]) -> bool:
        conditions = pod.get("status", {}).get("conditions", [])
        return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)

    # -- clients in the node's network namespace ----------------------------------------------

    @property
    def service_url(self) -> str:
        return f"http://{self.cluster.cluster_ip(self.ns, PROXY)}/v1"

    def client_argv(self, *args: str) -> list[str]:
        argv = [sys.executable, "-m", "tests.pods.client", "--key", VIRTUAL_KEY, *args]
        return self.cluster.nsenter(argv)

    def run_client(self, *args: str, timeout: float = 120.0) -> dict[str, Any]:
        proc = subprocess.run(
            self.client_argv(*args), capture_output=True, text=True, cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL, timeout=timeout, check=False,
        )  # fmt: skip
        assert proc.returncode == 0, f"client failed:\n{proc.stdout}\n{proc.stderr}"
        result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
        return result

    def start_client(self, *args: str) -> subprocess.Popen[str]:
        """A client in the background; returns once it printed STARTED (its first success)."""
        proc = subprocess.Popen(
            self.client_argv(*args), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT,
        )  # fmt: skip
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if line.strip() != "STARTED":
            proc.kill()
            _, err = proc.communicate(timeout=30)
            raise AssertionError(f"client did not start: {line}\n{err}")
        return proc

    @staticmethod
    def finish_client(proc: subprocess.Popen[str], timeout: float = 120.0) -> dict[str, Any]:
        out, err = proc.communicate(input="", timeout=timeout)  # closing stdin stops a load
        assert proc.returncode == 0, f"client failed:\n{out}\n{err}"
        result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
        return result

    # -- the fake provider's control API (through its Service, in the namespace) ---------------

    def fake(self, path: str, body: Mapping[str, Any] | None = None) -> Any:
        url = f"http://{self.cluster.cluster_ip(self.ns, FAKE)}{path}"
        data = json.dumps(body).encode() if body is not None else None

        def call() -> Any:
            request = urllib.request.Request(url, data=data, method="POST" if data else "GET")
            request.add_header("Content-Type", "application/json")
            with urllib.request.urlopen(request, timeout=10) as r:
                return json.loads(r.read() or b"null")

        return self.cluster.in_net(call)

    # -- what `kubectl get poolkeys` shows ------------------------------------------------------

    def poolkeys_table(self) -> dict[str, dict[str, str]]:
        """``kubectl get poolkeys`` as a user sees it: name -> {COLUMN: value}."""
        out = self.kubectl("get", "poolkeys").stdout.splitlines()
        header = out[0]
        # Column starts from the header (values never contain runs of spaces).
        names = header.split()
        starts = [header.index(n) for n in names]
        table: dict[str, dict[str, str]] = {}
        for line in out[1:]:
            cells = [line[s:e].strip() for s, e in zip(starts, [*starts[1:], None], strict=True)]
            row = dict(zip(names, cells, strict=True))
            table[row["NAME"]] = row
        return table


def wait(predicate: Any, timeout: float = READY_TIMEOUT, message: str = "") -> Any:
    return wait_for(predicate, timeout, 1.0, message=message)


def names(pods: Sequence[Mapping[str, Any]]) -> set[str]:
    return {p["metadata"]["name"] for p in pods}
