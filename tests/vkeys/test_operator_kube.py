"""VirtualKeys through the operator on the real API server (issue 12 steps 1, 5 and 6).

The operator puts each good VirtualKey's digest, models and limits in the routing table and
marks it Ready; a key whose Secret data is missing, or whose value duplicates another's, gets
Ready=False with the reason and a Warning Event, and authenticates nothing. A proxy in cluster
mode serves the good key (official OpenAI SDK), publishes its usage in its ReplicaReport, and
the operator writes it to the VirtualKey's status. No value appears in any status, Event,
ConfigMap, report or log.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.e2e.cluster import GROUP, POOL, VERSION, Loop, install_crds, values
from tests.e2e.procs import ProxyProc, wait_until
from tests.kube.harness import KubeCluster, free_port
from tests.vkeys.test_cluster import _proxy_kubeconfig

BATCH = "vk-CANARY-operator-batch-0123456789abcdef"
WINDOW = 600.0  # injected: long enough that this test never straddles a window's end


@pytest.fixture
def loop(kube: KubeCluster, namespace: str, tmp_path: Path) -> Iterator[Loop]:
    install_crds(kube)
    lp = Loop(kube, namespace, tmp_path)
    try:
        lp.start_fake()
        yield lp
    finally:
        lp.stop()


def _vk(name: str, key: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "VirtualKey", "metadata": {"name": name},
        "spec": {"pool": POOL, "secretRef": {"name": "clients", "key": key}, **spec},
    }  # fmt: skip


def _status(lp: Loop, name: str) -> dict[str, Any]:
    body = lp.custom.get_namespaced_custom_object(GROUP, VERSION, lp.ns, "virtualkeys", name)
    status = body.get("status") or {}
    return dict(status)


def _ready(status: dict[str, Any]) -> tuple[str, str] | None:
    for cond in status.get("conditions") or ():
        if cond.get("type") == "Ready":
            return str(cond["status"]), str(cond["reason"])
    return None


def test_operator_tables_virtual_keys_and_marks_bad_ones(loop: Loop) -> None:
    lp = loop
    lp.apply_pool(values(2))
    lp.canaries.add(BATCH)
    lp.apply(
        [
            {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "clients"},
             "stringData": {"batch": BATCH}},
            _vk("batch", "batch", models=["m"], limits={"requestsPerMinute": 5}),
            _vk("missing", "nope"),
            _vk("zcopy", "batch"),
        ]
    )  # fmt: skip
    lp.start_operator()
    digest = hashlib.sha256(BATCH.encode()).hexdigest()
    table = lp.wait_table(
        lambda t: [v.digest for v in t.virtual_keys or []] == [digest], 60, "a table with batch"
    )
    assert table.settings.client_auth_required
    assert [v.name for v in table.virtual_keys or []] == ["batch"]
    wait_until(lambda: _ready(_status(lp, "batch")) == ("True", "Ready"), 30, "batch Ready")
    wait_until(
        lambda: _ready(_status(lp, "missing")) == ("False", "SecretNotResolved"), 30, "missing"
    )
    wait_until(lambda: _ready(_status(lp, "zcopy")) == ("False", "DuplicateValue"), 30, "zcopy")
    events = lp.core.list_namespaced_event(lp.ns).items
    warned = {(e.involved_object.name, e.reason) for e in events if e.type == "Warning"}
    assert {("missing", "SecretNotResolved"), ("zcopy", "DuplicateValue")} <= warned

    # A proxy serves the table: the limit and the model list hold, usage reaches the status.
    proxy = ProxyProc(
        "a", free_port(), pool=POOL, namespace=lp.ns, kubeconfig=_proxy_kubeconfig(lp.kube, lp.ns),
        log=lp.workdir / "proxy-a.log",
        env={**lp.kube.env, "SIDEPROXY_VKEY_WINDOW_SECONDS": str(WINDOW)},
    )  # fmt: skip
    lp.procs.append(proxy)
    proxy.start()
    proxy.wait_ready(timeout=60)
    sdk = openai.OpenAI(base_url=f"http://127.0.0.1:{proxy.port}/v1", api_key=BATCH, max_retries=0)
    messages: Any = [{"role": "user", "content": "hi"}]
    with sdk:
        for _ in range(5):
            sdk.chat.completions.create(model="m", messages=messages)
        with pytest.raises(openai.RateLimitError):
            sdk.chat.completions.create(model="m", messages=messages)
        with pytest.raises(openai.PermissionDeniedError):
            sdk.chat.completions.create(model="other", messages=messages)

    def usage() -> dict[str, Any] | None:
        status = _status(lp, "batch")
        minute = status.get("currentMinute") or {}
        return status if minute.get("requests") == 5 else None

    status = wait_until(usage, 30, "usage in the VirtualKey status")
    assert status["currentMinute"]["tokens"] == 50  # the fake reports 10 tokens per answer
    assert status["total"]["requests"] == 5
    assert status["lastUsed"]

    # The PoolKeys that answered count the tokens too (the health report's 30 s heartbeat
    # carries them; the operator folds them into PoolKey.status).
    def pool_key_tokens() -> int | None:
        total = sum(int(k.get("status", {}).get("promptTokens", 0)) for k in lp.poolkeys())
        return total if total == 25 else None

    wait_until(pool_key_tokens, 90, "prompt tokens in PoolKey.status")
    out = lp.kube.kubectl("get", "virtualkeys", "-n", lp.ns).stdout
    assert "batch" in out

    leaks = lp.leaks()
    extra = {
        "virtualkeys": lp.custom.list_namespaced_custom_object(
            GROUP, VERSION, lp.ns, "virtualkeys"
        ),
        "replicareports": lp.custom.list_namespaced_custom_object(
            GROUP, VERSION, lp.ns, "replicareports"
        ),
    }
    for where, body in extra.items():
        if BATCH in json.dumps(body):
            leaks.append(where)
    assert not leaks
