"""The whole loop with the chart's own identities: the chart's RBAC is enough, and no more.

The chart is installed (namespaced mode, the tightest RBAC), the user's path from NOTES.txt is
followed (``kubectl apply -f examples/``, then the pool's providers pointed at a local fake),
and the two components run as local processes with exactly the arguments and environment of the
chart's Deployments, but each with a kubeconfig holding a token of its chart ServiceAccount
instead of the in-cluster one. The operator must reconcile the pool; the proxy must then serve a
chat completion to the official ``openai`` SDK with one of the pool's virtual keys.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml

from sideproxy.models import TABLE_DATA_KEY, RoutingTable
from tests.chart._helm import CHART, ROOT, Doc, get_json
from tests.kube import KubeCluster
from tests.kube.harness import free_port

pytestmark = pytest.mark.kube

EXAMPLES = ROOT / "examples"
RELEASE = POOL = "team-a"  # the examples' pool; the chart's pool defaults to the release name


def _examples() -> list[Doc]:
    docs: list[Doc] = []
    for path in sorted(EXAMPLES.glob("*.yaml")):
        docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return docs


def _secret_value(docs: list[Doc], name: str, key: str) -> str:
    for doc in docs:
        if doc["kind"] == "Secret" and doc["metadata"]["name"] == name:
            return str(doc["stringData"][key])
    raise AssertionError(f"examples/ has no Secret {name}")


class Process:
    """A local subprocess with its output in a file; stopped with SIGTERM, then SIGKILL."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.name = name
        self.log = log
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )  # fmt: skip

    def alive(self) -> bool:
        return self.proc.poll() is None

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-6000:]

    def check_alive(self) -> None:
        if not self.alive():
            raise AssertionError(f"{self.name} exited {self.proc.returncode}:\n{self.output()}")

    def stop(self) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def _environment() -> dict[str, str]:
    """This machine's environment without cluster hints or proxies for loopback."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBE")}
    no_proxy = ",".join(filter(None, [env.get("NO_PROXY", ""), "127.0.0.1,localhost"]))
    env.update({"NO_PROXY": no_proxy, "no_proxy": no_proxy, "PYTHONUNBUFFERED": "1"})
    return env


def _container(kube: KubeCluster, namespace: str, deployment: str) -> dict[str, Any]:
    spec = get_json(kube, f"deployment/{deployment}", "-n", namespace)["spec"]["template"]["spec"]
    container: dict[str, Any] = spec["containers"][0]
    return container


def _env_of(container: dict[str, Any], pod: str, namespace: str) -> dict[str, str]:
    """The container's env as the kubelet would resolve it for a pod named ``pod``."""
    # No kubelet here, so no Pod: an empty uid, as for a process outside a pod (no ownerReference
    # to a Pod that does not exist, which the garbage collector would act on).
    fields = {"metadata.name": pod, "metadata.namespace": namespace, "metadata.uid": ""}
    env: dict[str, str] = {}
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
        else:
            env[var["name"]] = fields[var["valueFrom"]["fieldRef"]["fieldPath"]]
    return env


def _replace(args: list[str], flag: str, value: str) -> list[str]:
    out = [a for a in args if not a.startswith(f"{flag}=")]
    assert len(out) == len(args) - 1, f"the chart does not pass {flag}"
    return [*out, f"{flag}={value}"]


def _http_status(url: str) -> int:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=2) as response:
            status: int = response.status
            return status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


@pytest.fixture
def processes() -> Iterator[list[Process]]:
    started: list[Process] = []
    yield started
    for proc in reversed(started):
        proc.stop()


def test_chart_identities_run_the_whole_loop(
    kube: KubeCluster, namespace: str, tmp_path: Path, processes: list[Process]
) -> None:
    ns = namespace
    examples = _examples()
    provider_keys = [
        _secret_value(examples, "groq-keys", "primary"),
        _secret_value(examples, "groq-keys", "secondary"),
        _secret_value(examples, "openai-key", "api-key"),
    ]
    virtual_key = _secret_value(examples, "team-a-clients", "virtual-keys").split()[0]

    # 1. The chart, namespaced: the operator gets a Role in this namespace only.
    kube.helm(
        "install", RELEASE, str(CHART), "--namespace", ns,
        "--set", f"operator.watchNamespaces={{{ns}}}",
    )  # fmt: skip
    try:
        # 2. A fake provider that accepts exactly the examples' provider keys.
        fake_port = free_port()
        fake = Process(
            "fake provider",
            [sys.executable, "-m", "sideproxy.fake_provider", "--port", str(fake_port),
             "--keys", ",".join(provider_keys)],
            _environment(), tmp_path / "fake.log",
        )  # fmt: skip
        processes.append(fake)
        fake_url = f"http://127.0.0.1:{fake_port}"
        kube.wait_for(
            lambda: fake.check_alive() or _http_status(f"{fake_url}/_fake/stats") == 200,
            timeout=30, message="the fake provider",
        )  # fmt: skip

        # 3. The user's path: apply the examples, point the pool's providers at the fake.
        kube.kubectl("apply", "-n", ns, "-f", str(EXAMPLES))
        providers = [
            {"name": "groq", "baseURL": f"{fake_url}/openai/v1"},
            {"name": "openai", "baseURL": f"{fake_url}/v1"},
        ]
        kube.kubectl(
            "patch", "creditpool", POOL, "-n", ns, "--type=merge",
            "-p", yaml.safe_dump({"spec": {"providers": providers}}),
        )  # fmt: skip

        # 4. The operator, as the chart's Deployment runs it, with the chart's ServiceAccount.
        op_container = _container(kube, ns, f"{RELEASE}-operator")
        op_config = kube.service_account_kubeconfig(ns, f"{RELEASE}-operator")
        op_args = _replace(
            op_container["args"], "--liveness", f"http://127.0.0.1:{free_port()}/healthz"
        )
        assert f"--namespace={ns}" in op_args
        operator = Process(
            "operator",
            [sys.executable, "-m", "sideproxy", *op_args, f"--kubeconfig={op_config}"],
            {**_environment(), **_env_of(op_container, f"{RELEASE}-operator-0", ns)},
            tmp_path / "operator.log",
        )
        processes.append(operator)

        def reconciled() -> RoutingTable | None:
            operator.check_alive()
            pool = get_json(kube, f"creditpool/{POOL}", "-n", ns)
            if (pool.get("status") or {}).get("ready") != "True":
                return None
            cm = kube.kubectl(
                "get", "configmap", f"{POOL}-routing", "-n", ns, "--ignore-not-found", "-o",
                "jsonpath={.data.table\\.json}",
            ).stdout  # fmt: skip
            if not cm:
                return None
            table = RoutingTable.from_json(cm)
            return table if table.settings.base_urls.get("groq", "").startswith(fake_url) else None

        table = kube.wait_for(reconciled, timeout=90, interval=0.5, message="the pool reconciled")
        assert TABLE_DATA_KEY == "table.json"
        assert {k.name for k in table.keys} == {"groq-primary", "groq-secondary", "openai-fallback"}
        assert table.settings.client_auth_required
        assert kube.kubectl("get", "secret", f"{POOL}-keys", "-n", ns, "-o", "name").stdout.strip()

        # 5. The proxy, as the chart's Deployment runs it, with the chart's ServiceAccount.
        px_container = _container(kube, ns, f"{RELEASE}-proxy")
        px_config = kube.service_account_kubeconfig(ns, f"{RELEASE}-proxy")
        port = free_port()
        px_args = _replace(px_container["args"], "--host", "127.0.0.1")
        px_args = _replace(px_args, "--port", str(port))
        assert f"--pool={POOL}" in px_args
        assert "--no-auth" not in px_args
        proxy = Process(
            "proxy",
            [sys.executable, "-m", "sideproxy", *px_args, f"--kubeconfig={px_config}"],
            {**_environment(), **_env_of(px_container, f"{RELEASE}-proxy-0", ns)},
            tmp_path / "proxy.log",
        )
        processes.append(proxy)
        base = f"http://127.0.0.1:{port}"
        kube.wait_for(
            lambda: proxy.check_alive() or _http_status(f"{base}/readyz") == 200,
            timeout=60, interval=0.3, message="the proxy's /readyz",
        )  # fmt: skip

        # 6. A backend: the official SDK, the Service's /v1 path, a virtual key.
        with openai.OpenAI(
            base_url=f"{base}/v1", api_key=virtual_key, max_retries=0, timeout=30
        ) as client:
            raw = client.chat.completions.with_raw_response.create(
                model="llama-3.1-8b-instant",
                messages=[{"role": "user", "content": "hello through the pool"}],
            )
            assert raw.status_code == 200
            completion = raw.parse()
            assert completion.choices[0].message.content

        with (
            openai.OpenAI(
                base_url=f"{base}/v1", api_key="not-a-virtual-key", max_retries=0, timeout=30
            ) as stranger,
            pytest.raises(openai.AuthenticationError),
        ):
            stranger.chat.completions.create(
                model="llama-3.1-8b-instant", messages=[{"role": "user", "content": "hi"}]
            )

        # Neither process hit a permission error on the way.
        for proc in (operator, proxy):
            proc.check_alive()
            assert "Forbidden" not in proc.output(), f"{proc.name} was refused:\n{proc.output()}"
            for key in (*provider_keys, virtual_key):
                assert key not in proc.output(), f"{proc.name} logged key material"
    finally:
        for proc in reversed(processes):
            proc.stop()
        with contextlib.suppress(Exception):
            kube.helm("uninstall", RELEASE, "--namespace", ns, "--wait=false", check=False)
