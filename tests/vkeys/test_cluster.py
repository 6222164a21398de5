"""Issue 12 step 4 on the real API server: one requests-per-minute limit held by two proxy
processes together, under saturating load, while one of them is killed.

Real parts: kube-apiserver + etcd (tests/kube), two ``sideproxy serve --pool`` processes in
cluster mode (each with a ServiceAccount token allowed to read the pool's table and Secret and
to write ReplicaReports), the official OpenAI SDK as client, and an upstream that is a real
HTTP server recording when each request arrived. The routing table is written straight into
the ConfigMap (what the operator would write): this test is about the proxies.

**Injected window.** A limit window is a calendar minute; to see several windows and a kill
inside one without minutes of waiting, the proxies run with ``SIDEPROXY_VKEY_WINDOW_SECONDS=10``
(the same code path, a shorter window). Admission counts a request in the window of the
moment it was admitted; the upstream bins it by the moment it arrived, a few ms later.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import openai
import pytest
from kubernetes import client as k8s

from sideproxy import translate
from sideproxy.models import TABLE_DATA_KEY, key_secret_name, routing_configmap_name
from tests.e2e.cluster import install_crds
from tests.e2e.procs import ProxyProc
from tests.kube.harness import KubeCluster, free_port

POOL = "p"
WINDOW = 10.0
LIMIT = 60  # requests per window, for both replicas together
VALUE = "vk-CANARY-cluster-0123456789abcdef0123"


class Upstream:
    """A provider that answers every chat completion at once and notes when it came."""

    def __init__(self) -> None:
        self.arrivals: list[float] = []
        lock = threading.Lock()
        arrivals = self.arrivals

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                with lock:
                    arrivals.append(time.time())
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                body = json.dumps(
                    {"id": "c", "object": "chat.completion", "created": 0, "model": "m",
                     "choices": [{"index": 0, "finish_reason": "stop",
                                  "message": {"role": "assistant", "content": "ok"}}],
                     "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
                ).encode()  # fmt: skip
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    server = Upstream()
    try:
        yield server
    finally:
        server.close()


def _write_pool(kube: KubeCluster, namespace: str, upstream: Upstream) -> None:
    """The ConfigMap + Secret the operator would write for a pool with one VirtualKey."""
    docs: list[dict[str, Any]] = [
        {"apiVersion": "sideproxy.dev/v1alpha1", "kind": "CreditPool",
         "metadata": {"name": POOL, "namespace": namespace},
         "spec": {"defaultProvider": "custom",
                  "providers": [{"name": "custom", "baseURL": upstream.url}]}},
        {"apiVersion": "sideproxy.dev/v1alpha1", "kind": "PoolKey", "metadata": {"name": "k1"},
         "spec": {"pool": POOL, "provider": "custom", "secretRef": {"name": "s", "key": "k1"}}},
        {"apiVersion": "sideproxy.dev/v1alpha1", "kind": "VirtualKey",
         "metadata": {"name": "batch"},
         "spec": {"pool": POOL, "secretRef": {"name": "s", "key": "batch"},
                  "limits": {"requestsPerMinute": LIMIT}}},
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"},
         "stringData": {"k1": "sk-CANARY-provider-key-1", "batch": VALUE}},
    ]  # fmt: skip
    pool, keys, secrets = translate.from_manifests(docs)
    result = translate.translate(pool, keys, secrets, time.time())
    table = result.table.sealed(1)
    assert VALUE not in table.to_json()
    kube.apply(
        [
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": routing_configmap_name(POOL)},
                "data": {TABLE_DATA_KEY: table.to_json()},
            },
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": key_secret_name(POOL)},
                "stringData": dict(result.material),
            },
        ],
        namespace,
    )


def _proxy_kubeconfig(kube: KubeCluster, namespace: str) -> Path:
    role = {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
        "metadata": {"name": "sideproxy-proxy"},
        "rules": [
            {"apiGroups": [""], "resources": ["configmaps"],
             "resourceNames": [routing_configmap_name(POOL)], "verbs": ["get", "list", "watch"]},
            {"apiGroups": [""], "resources": ["secrets"],
             "resourceNames": [key_secret_name(POOL)], "verbs": ["get", "list", "watch"]},
            {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]},
            {"apiGroups": ["sideproxy.dev"], "resources": ["replicareports"],
             "verbs": ["get", "list", "watch", "create", "patch", "update"]},
        ],
    }  # fmt: skip
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": {"name": "sideproxy-proxy"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                    "name": "sideproxy-proxy"},
        "subjects": [{"kind": "ServiceAccount", "name": "sideproxy-proxy",
                      "namespace": namespace}],
    }  # fmt: skip
    kube.apply([role, binding], namespace)
    return kube.service_account_kubeconfig(namespace, "sideproxy-proxy")


def _hammer(port: int, stop: threading.Event, outcomes: Counter[int]) -> None:
    """One client asking as fast as it can (a short pause after a refusal)."""
    sdk = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=VALUE, max_retries=0)
    with sdk:
        while not stop.is_set():
            try:
                sdk.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
                outcomes[200] += 1
            except openai.RateLimitError:
                outcomes[429] += 1
                time.sleep(0.01)
            except (openai.APIConnectionError, openai.APIStatusError):
                outcomes[0] += 1  # the killed replica's clients
                time.sleep(0.05)


def test_two_replicas_hold_one_limit_and_a_killed_one_frees_its_share(
    kube: KubeCluster, namespace: str, tmp_path: Path, upstream: Upstream
) -> None:
    install_crds(kube)
    _write_pool(kube, namespace, upstream)
    kubeconfig = _proxy_kubeconfig(kube, namespace)
    env = {**kube.env, "SIDEPROXY_VKEY_WINDOW_SECONDS": str(WINDOW)}
    proxies = {
        name: ProxyProc(name, free_port(), pool=POOL, namespace=namespace,
                        kubeconfig=kubeconfig, log=tmp_path / f"proxy-{name}.log", env=env)
        for name in ("a", "b")
    }  # fmt: skip
    stop = threading.Event()
    outcomes: dict[str, Counter[int]] = {name: Counter() for name in proxies}
    threads: list[threading.Thread] = []
    try:
        for proxy in proxies.values():
            proxy.start()
        for proxy in proxies.values():
            proxy.wait_ready(timeout=60)
        # Start just after a window begins; run three whole windows; kill "a" mid-second.
        now = time.time()
        start = now - now % WINDOW + WINDOW
        time.sleep(start - now + 0.05)
        for name, proxy in proxies.items():
            for _ in range(3):
                thread = threading.Thread(
                    target=_hammer, args=(proxy.port, stop, outcomes[name]), daemon=True
                )
                thread.start()
                threads.append(thread)
        time.sleep(start + 1.5 * WINDOW - time.time())
        proxies["a"].kill()  # SIGKILL: no goodbye, its report stays behind
        time.sleep(start + 3 * WINDOW + 0.2 - time.time())
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
        for proxy in proxies.values():
            proxy.stop(timeout=5)
            proxy.kill()
    bins = Counter(int((t - start) // WINDOW) for t in upstream.arrivals)
    per_window = [bins.get(i, 0) for i in range(3)]
    logs = "\n".join(p.text()[-3000:] for p in proxies.values())
    assert outcomes["a"][429] > 0, logs
    assert outcomes["b"][429] > 0, logs  # both were saturated
    for count in per_window:
        assert count <= LIMIT * 1.05, (per_window, dict(outcomes["a"]), dict(outcomes["b"]))
    # The survivor alone uses (nearly) the whole limit once the dead one's share is free.
    assert per_window[2] >= LIMIT * 0.8, (per_window, logs)
    reports = k8s.CustomObjectsApi(kube.api_client()).list_namespaced_custom_object(
        "sideproxy.dev", "v1alpha1", namespace, "replicareports"
    )
    assert VALUE not in json.dumps(reports)
    print("admitted per window:", per_window, "outcomes:", outcomes)
