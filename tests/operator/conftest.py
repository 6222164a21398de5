"""Fixtures for the operator's tests against the real API server (tests/kube).

``crds`` installs ``crds/*.yaml`` once per session and waits for Established. ``operator``
runs ``python -m sideproxy.operator`` as a subprocess with the admin kubeconfig, watching the
test's namespace, with its own Lease there; its whole log is kept for leak checks.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

from sideproxy.models import TABLE_DATA_KEY, RoutingTable
from tests.kube.harness import KubeCluster, free_port

ROOT = Path(__file__).resolve().parent.parent.parent
GROUP, VERSION = "sideproxy.dev", "v1alpha1"


@pytest.fixture(scope="session")
def crds(kube: KubeCluster) -> None:
    kube.kubectl("apply", "-f", str(ROOT / "crds"))
    kube.kubectl(
        "wait",
        "--for=condition=Established",
        "crd/creditpools.sideproxy.dev",
        "crd/poolkeys.sideproxy.dev",
        "crd/replicareports.sideproxy.dev",
        "--timeout=60s",
    )


class Operator:
    """One operator process; ``start()`` again after ``kill()`` or ``stop()`` for a restart."""

    def __init__(self, kube: KubeCluster, namespace: str, workdir: Path, name: str) -> None:
        self.kube = kube
        self.namespace = namespace
        self.name = name
        self.log = workdir / f"operator-{name}.log"
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self, **env: str) -> Operator:
        assert self.proc is None or self.proc.poll() is not None
        self.port = free_port()
        environment = {k: v for k, v in os.environ.items() if not k.startswith("KUBE")}
        no_proxy = ",".join(filter(None, [environment.get("NO_PROXY", ""), "127.0.0.1,localhost"]))
        environment.update(
            {
                "NO_PROXY": no_proxy,
                "no_proxy": no_proxy,
                "PYTHONUNBUFFERED": "1",
                "POD_NAME": self.name,
                "POD_NAMESPACE": self.namespace,
                "SIDEPROXY_LEASE_SECONDS": "3",
                **env,
            }
        )
        self.starts += 1
        with self.log.open("ab") as out:
            out.write(f"\n===== start {self.starts}\n".encode())
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "sideproxy.operator",
                    "--namespace",
                    self.namespace,
                    "--kubeconfig",
                    str(self.kube.kubeconfig),
                    "--liveness",
                    f"http://127.0.0.1:{self.port}/healthz",
                ],
                cwd=ROOT,
                env=environment,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        return self

    def health(self) -> dict[str, Any] | None:
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.port}/healthz", timeout=2
            ) as response:
                return dict(json.loads(response.read()))
        except OSError:
            return None

    def wait_healthy(self, timeout: float = 60.0) -> dict[str, Any]:
        def healthy() -> dict[str, Any] | None:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"operator exited {self.proc.returncode}:\n{self.text()}")
            return self.health()

        return self.kube.wait_for(healthy, timeout=timeout, message=f"{self.name} /healthz")

    def leader(self) -> bool:
        """Whether this process holds the Lease right now (read from the Lease itself; kopf
        caches /healthz answers for 10 s)."""
        lease = self.kube.kubectl(
            "get", "lease", "sideproxy-operator", "-n", self.namespace,
            "-o", "jsonpath={.spec.holderIdentity}", check=False,
        ).stdout  # fmt: skip
        return lease.startswith(f"{self.name}-")

    def wait_log(self, text: str, timeout: float = 30.0, after: int = 0) -> str:
        """Wait until ``text`` appears in the log after offset ``after``; the log from there."""

        def seen() -> str | None:
            log = self.text()[after:]
            return log if text in log else None

        found: str = self.kube.wait_for(seen, timeout=timeout, message=f"{text!r} in {self.name}")
        return found

    def final_writes(self) -> dict[str, int]:
        """Stop the operator; the API writes it counted in its life (its last log line)."""
        code = self.stop()
        assert code == 0, self.text()
        lines = [ln for ln in self.text().splitlines() if "API writes: " in ln]
        assert lines, self.text()
        return dict(json.loads(lines[-1].split("API writes: ", 1)[1]))

    def stop(self, timeout: float = 20.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise AssertionError(
                f"operator ignored SIGTERM for {timeout}s:\n{self.text()}"
            ) from None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@pytest.fixture
def operators(
    kube: KubeCluster, crds: None, namespace: str, tmp_path: Path
) -> Iterator[Callable[[str], Operator]]:
    """Factory of operator processes for this namespace; all stopped at teardown."""
    made: list[Operator] = []

    def make(name: str = "op-a") -> Operator:
        op = Operator(kube, namespace, tmp_path, name)
        made.append(op)
        return op

    yield make
    for op in made:
        try:
            op.stop()
        finally:
            op.kill()


@pytest.fixture
def operator(operators: Callable[[str], Operator]) -> Operator:
    op = operators("op-a").start()
    op.wait_healthy()
    return op


class Cluster:
    """Reads of one namespace through the official sync client."""

    def __init__(self, kube: KubeCluster, namespace: str) -> None:
        self.kube = kube
        self.ns = namespace
        api = kube.api_client()
        self.core = k8s.CoreV1Api(api)
        self.custom = k8s.CustomObjectsApi(api)

    def obj(self, plural: str, name: str) -> dict[str, Any] | None:
        try:
            return dict(
                self.custom.get_namespaced_custom_object(GROUP, VERSION, self.ns, plural, name)
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def status(self, plural: str, name: str) -> dict[str, Any]:
        body = self.obj(plural, name) or {}
        return dict(body.get("status") or {})

    def condition(self, plural: str, name: str, type_: str) -> dict[str, Any]:
        for cond in self.status(plural, name).get("conditions") or []:
            if cond["type"] == type_:
                return dict(cond)
        return {}

    def configmap(self, name: str) -> Any:
        try:
            return self.core.read_namespaced_config_map(name, self.ns)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def secret(self, name: str) -> Any:
        try:
            return self.core.read_namespaced_secret(name, self.ns)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def table(self, pool: str) -> RoutingTable | None:
        cm = self.configmap(f"{pool}-routing")
        if cm is None or not cm.data or TABLE_DATA_KEY not in cm.data:
            return None
        return RoutingTable.from_json(cm.data[TABLE_DATA_KEY])

    def table_or_none(self, pool: str) -> RoutingTable | None:
        """The table, or None while the ConfigMap is missing or holds no valid table."""
        try:
            return self.table(pool)
        except ValueError:
            return None

    def material(self, pool: str) -> dict[str, str] | None:
        sec = self.secret(f"{pool}-keys")
        if sec is None:
            return None
        return {k: base64.b64decode(v).decode() for k, v in (sec.data or {}).items()}

    def events(self, name: str | None = None) -> list[Any]:
        selector = f"involvedObject.name={name}" if name else None
        items = self.core.list_namespaced_event(self.ns, field_selector=selector).items
        return list(items)

    def apply(self, manifest: Any) -> None:
        self.kube.apply(manifest, namespace=self.ns)

    def kubectl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.kube.kubectl(*args, "-n", self.ns, check=check)

    def wait(self, predicate: Callable[[], Any], timeout: float = 30.0, what: str = "") -> Any:
        return self.kube.wait_for(predicate, timeout=timeout, interval=0.1, message=what)


@pytest.fixture
def cluster(kube: KubeCluster, namespace: str) -> Cluster:
    return Cluster(kube, namespace)


def secret_manifest(name: str, data: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name},
        "type": "Opaque",
        "stringData": data,
    }


def pool_manifest(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "CreditPool",
        "metadata": {"name": name},
        "spec": spec or {"providers": [{"name": "groq"}]},
    }


def key_manifest(name: str, pool: str, secret: str, key: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "PoolKey",
        "metadata": {"name": name},
        "spec": {"pool": pool, "secretRef": {"name": secret, "key": key}, **spec},
    }
