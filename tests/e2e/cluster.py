"""The whole loop on a real API server: one pool, the operator, proxy replicas, a fake provider.

No pytest here, so ``bench/cluster_propagation.py`` runs the same setup the tests do. Each
replica is its own ``sideproxy serve --pool`` process whose kubeconfig holds a ServiceAccount
token with exactly the chart's proxy Role (get/list/watch of ``<pool>-routing`` and
``<pool>-keys`` by name; get/list/watch/create/patch of ReplicaReports); the operator runs as
``sideproxy operator`` with the admin kubeconfig. Key values here are canaries and never leave
Secrets and process memory.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, cast

from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

from sideproxy.models import TABLE_DATA_KEY, RoutingTable, fingerprint
from tests.e2e.procs import FakeProviderProc, Proc, ProxyProc, environment, wait_until
from tests.kube.harness import KubeCluster, free_port

ROOT = Path(__file__).resolve().parents[2]
GROUP, VERSION = "sideproxy.dev", "v1alpha1"
POOL = "p"
SECRET = "upstream"


def install_crds(kube: KubeCluster) -> None:
    kube.kubectl("apply", "-f", str(ROOT / "crds"))
    kube.kubectl(
        "wait", "--for=condition=Established", "crd/creditpools.sideproxy.dev",
        "crd/poolkeys.sideproxy.dev", "crd/replicareports.sideproxy.dev", "--timeout=60s",
    )  # fmt: skip


def values(n: int, tag: str = "") -> dict[str, str]:
    """``key-1``..``key-n`` -> canary values."""
    return {f"key-{i}": f"sk-CANARY-e2e{tag}-{i:04d}-{'x' * 24}" for i in range(1, n + 1)}


class Loop:
    """A namespace holding pool ``p`` with keys ``key-1..n`` (provider ``custom`` = the fake)."""

    def __init__(self, kube: KubeCluster, namespace: str, workdir: Path) -> None:
        self.kube = kube
        self.ns = namespace
        self.workdir = workdir
        self.procs: list[Proc] = []
        api = kube.api_client()
        self.core = k8s.CoreV1Api(api)
        self.custom = k8s.CustomObjectsApi(api)
        self.fake = FakeProviderProc(free_port(), workdir / "fake.log", kube.env)
        self.procs.append(self.fake)
        self.operator: Proc | None = None
        self.proxies: dict[str, ProxyProc] = {}
        self.secret_values: dict[str, str] = {}
        self.canaries: set[str] = set()  # every key value this loop ever used

    # -- setup ---------------------------------------------------------------------------------

    def start_fake(self) -> None:
        self.fake.start()
        self.fake.wait_ready()

    def apply_pool(self, keys: Mapping[str, str], **spec: Any) -> None:
        """The Secret, the CreditPool and one PoolKey per entry of ``keys`` (name -> value)."""
        self.secret_values = dict(keys)
        self.canaries.update(keys.values())
        pool_spec = {
            "defaultProvider": "custom",
            "providers": [{"name": "custom", "baseURL": self.fake.base_url}],
            "clientAuth": {"disabled": True},
            # scope "key": a 429 rests the key for every model, which these tests watch through
            # each replica's per-key health (the default, "model", rests only that key+model).
            "cooldown": {"defaultSeconds": 5, "scope": "key"},
            **spec,
        }
        docs: list[dict[str, Any]] = [
            self.secret_doc(keys),
            {"apiVersion": f"{GROUP}/{VERSION}", "kind": "CreditPool",
             "metadata": {"name": POOL}, "spec": pool_spec},
        ]  # fmt: skip
        docs += [self.key_doc(name) for name in keys]
        self.apply(docs)

    def rotate(self, name: str, value: str) -> None:
        """Change one key's value in the Secret, as a user (or External Secrets) would."""
        self.secret_values[name] = value
        self.canaries.add(value)
        self.apply(self.secret_doc(self.secret_values))

    def secret_doc(self, keys: Mapping[str, str]) -> dict[str, Any]:
        return {
            "apiVersion": "v1", "kind": "Secret", "metadata": {"name": SECRET},
            "type": "Opaque", "stringData": dict(keys),
        }  # fmt: skip

    def key_doc(self, name: str, **spec: Any) -> dict[str, Any]:
        return {
            "apiVersion": f"{GROUP}/{VERSION}", "kind": "PoolKey", "metadata": {"name": name},
            "spec": {"pool": POOL, "provider": "custom",
                     "secretRef": {"name": SECRET, "key": name}, **spec},
        }  # fmt: skip

    def apply(self, docs: dict[str, Any] | Iterable[dict[str, Any]]) -> None:
        self.kube.apply(docs if isinstance(docs, dict) else list(docs), namespace=self.ns)

    def proxy_kubeconfig(self) -> Path:
        """A ServiceAccount with the chart's proxy Role, and a kubeconfig holding its token."""
        role = {
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
            "metadata": {"name": "sideproxy-proxy"},
            "rules": [
                {"apiGroups": [""], "resources": ["configmaps"],
                 "resourceNames": [f"{POOL}-routing"], "verbs": ["get", "list", "watch"]},
                {"apiGroups": [""], "resources": ["secrets"],
                 "resourceNames": [f"{POOL}-keys"], "verbs": ["get", "list", "watch"]},
                {"apiGroups": [GROUP], "resources": ["replicareports"],
                 "verbs": ["get", "list", "watch", "create", "patch"]},
            ],
        }  # fmt: skip
        binding = {
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
            "metadata": {"name": "sideproxy-proxy"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                        "name": "sideproxy-proxy"},
            "subjects": [{"kind": "ServiceAccount", "name": "sideproxy-proxy",
                          "namespace": self.ns}],
        }  # fmt: skip
        self.apply([role, binding])
        return self.kube.service_account_kubeconfig(self.ns, "sideproxy-proxy")

    def start_operator(self, **env: str) -> Proc:
        if self.operator is None:
            argv = [sys.executable, "-m", "sideproxy", "operator", "--namespace", self.ns]
            extra = {
                "POD_NAME": "op",
                "POD_NAMESPACE": self.ns,
                "SIDEPROXY_LEADER_ELECTION": "false",
                **env,
            }
            self.operator = Proc(
                "operator", argv, {**environment(self.kube.env), **extra},
                self.workdir / "operator.log",
            )  # fmt: skip
            self.procs.append(self.operator)
        return self.operator.start()

    def start_proxies(self, names: Iterable[str], kubeconfig: Path) -> list[ProxyProc]:
        started: list[ProxyProc] = []
        for name in names:
            proxy = ProxyProc(
                name, free_port(), pool=POOL, namespace=self.ns, kubeconfig=kubeconfig,
                log=self.workdir / f"proxy-{name}.log", env=self.kube.env,
            )  # fmt: skip
            self.proxies[name] = proxy
            self.procs.append(proxy)
            proxy.start()
            started.append(proxy)
        return started

    def stop(self) -> None:
        for proc in reversed(self.procs):
            try:
                proc.stop(timeout=10)
            finally:
                proc.kill()

    # -- reads ---------------------------------------------------------------------------------

    def table(self) -> RoutingTable | None:
        try:
            cm = self.core.read_namespaced_config_map(f"{POOL}-routing", self.ns)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        if not cm.data or TABLE_DATA_KEY not in cm.data:
            return None
        try:
            return RoutingTable.from_json(cm.data[TABLE_DATA_KEY])
        except ValueError:
            return None  # not a table a proxy would load

    def table_text(self) -> str | None:
        cm = self.core.read_namespaced_config_map(f"{POOL}-routing", self.ns)
        text: str | None = (cm.data or {}).get(TABLE_DATA_KEY)
        return text

    def key(self, name: str) -> dict[str, Any]:
        try:
            body = cast(
                dict[str, Any],
                self.custom.get_namespaced_custom_object(GROUP, VERSION, self.ns, "poolkeys", name),
            )
        except ApiException as exc:
            if exc.status == 404:
                return {}
            raise
        return body

    def poolkeys(self) -> list[dict[str, Any]]:
        listing = cast(
            dict[str, Any],
            self.custom.list_namespaced_custom_object(GROUP, VERSION, self.ns, "poolkeys"),
        )
        return list(listing["items"])

    def key_status(self, name: str) -> dict[str, Any]:
        return dict(self.key(name).get("status") or {})

    def settled(self, proxies: list[Any]) -> int:
        """Wait until the operator's start-up is over (the pool's status names the ConfigMap's
        table version and every replica in ``proxies`` serves it); that version."""

        def same() -> int | None:
            table = self.table()
            pool = self.custom.get_namespaced_custom_object(
                GROUP, VERSION, self.ns, "creditpools", POOL
            )
            status = dict(pool).get("status") or {}
            if table is None or status.get("tableVersion") != table.version:
                return None
            served = all(p.status()["version"] == table.version for p in proxies)
            return table.version if served else None

        version: int = wait_until(same, 30, "the operator's start-up writes to settle")
        return version

    def reports(self) -> list[dict[str, Any]]:
        """The pool's ReplicaReports (one per proxy replica)."""
        items = self.custom.list_namespaced_custom_object(
            GROUP, VERSION, self.ns, "replicareports", label_selector="sideproxy.dev/pool=p"
        )["items"]
        return [dict(i) for i in items]

    def reported(self, key: str) -> int:
        """429s on ``key`` that the replicas' reports count now, all replicas together."""
        return sum(
            e.get("counts", {}).get("rateLimited", 0)
            for r in self.reports()
            for e in r["spec"].get("keys") or []
            if e["name"] == key
        )

    def fp(self, name: str) -> str:
        return fingerprint(self.secret_values[name])

    def wait_table(self, predicate: Any, timeout: float, what: str) -> RoutingTable:
        table: RoutingTable = wait_until(
            lambda: (t := self.table()) is not None and predicate(t) and t, timeout, what
        )
        return table

    def leaks(self) -> list[str]:
        """Where a key value appears outside Secrets and process memory (it must not)."""
        found = []
        texts = {
            "configmaps": json.dumps(
                [c.to_dict() for c in self.core.list_namespaced_config_map(self.ns).items],
                default=str,
            ),
            "events": json.dumps(
                [e.to_dict() for e in self.core.list_namespaced_event(self.ns).items], default=str
            ),
            "poolkeys": json.dumps(
                self.custom.list_namespaced_custom_object(GROUP, VERSION, self.ns, "poolkeys")
            ),
        }
        for proc in self.procs:
            texts[f"log of {proc.name}"] = proc.text()
        for where, text in texts.items():
            for value in self.canaries:
                if value in text:
                    found.append(where)
        return found
