"""Helpers of the chaos tests, over ``tests/e2e`` (Loop, processes, traffic)."""

from __future__ import annotations

import base64
import http.client
import json
import secrets
from collections.abc import Mapping, Sequence
from typing import Any, cast

from kubernetes.client.exceptions import ApiException

from tests.e2e.cluster import GROUP, VERSION, Loop
from tests.e2e.procs import Outcome, ProxyProc, failures, http_json

TOKEN = secrets.token_hex(6)


def canaries(n: int, tag: str = "") -> dict[str, str]:
    """``key-1``..``key-n`` -> distinctive values ``gsk_CANARY_<random>...``."""
    return {f"key-{i}": f"gsk_CANARY_{TOKEN}{tag}_{i:04d}_{'z' * 16}" for i in range(1, n + 1)}


def start(loop: Loop, keys: Mapping[str, str], proxies: Sequence[str], **env: str) -> None:
    """Pool ``p`` with ``keys``, the operator (with ``env``) and proxies, all serving."""
    loop.apply_pool(keys)
    loop.start_operator(**env)
    started = loop.start_proxies(proxies, loop.proxy_kubeconfig())
    for proxy in started:
        proxy.wait_ready(timeout=60)


def assert_all_ok(outcomes: Sequence[Outcome], what: str) -> None:
    bad = failures(outcomes)
    assert outcomes, f"no {what} at all"
    assert not bad, f"{len(bad)} of {len(outcomes)} {what} failed, e.g. {bad[:3]}"


def events_on(loop: Loop, kind: str, name: str) -> list[Any]:
    items = loop.core.list_namespaced_event(
        loop.ns, field_selector=f"involvedObject.kind={kind},involvedObject.name={name}"
    ).items
    return list(items)


def pool_status(loop: Loop, name: str) -> dict[str, Any]:
    try:
        body = cast(
            dict[str, Any],
            loop.custom.get_namespaced_custom_object(GROUP, VERSION, loop.ns, "creditpools", name),
        )
    except ApiException:
        return {}
    return dict(body.get("status") or {})


def condition(status: Mapping[str, Any], type_: str) -> dict[str, Any]:
    for cond in status.get("conditions") or []:
        if cond.get("type") == type_:
            return dict(cond)
    return {}


def leaks(loop: Loop, extra: Mapping[str, str] | None = None) -> list[str]:
    """Where a canary (plain or base64) appears outside Secrets and process memory.

    Beyond ``Loop.leaks`` (ConfigMaps, Events, PoolKeys, every process log): CreditPools, every
    proxy's ``/metrics`` and ``/sideproxy/status`` page, and ``extra`` (error bodies seen).
    """
    found = list(loop.leaks())
    texts: dict[str, str] = dict(extra or {})
    texts["creditpools"] = json.dumps(
        loop.custom.list_namespaced_custom_object(GROUP, VERSION, loop.ns, "creditpools")
    )
    texts["poolkeys"] = json.dumps(loop.poolkeys())
    texts["events"] = json.dumps(
        [e.to_dict() for e in loop.core.list_namespaced_event(loop.ns).items], default=str
    )
    texts["configmaps"] = json.dumps(
        [c.to_dict() for c in loop.core.list_namespaced_config_map(loop.ns).items], default=str
    )
    for proc in loop.procs:
        texts[f"log of {proc.name}"] = proc.text()
    for proxy in loop.proxies.values():
        if proxy.alive():
            texts[f"metrics of {proxy.name}"] = metrics(proxy)
            texts[f"status of {proxy.name}"] = json.dumps(proxy.status())
    for where, text in texts.items():
        for value in loop.canaries:
            if value in text or base64.b64encode(value.encode()).decode() in text:
                found.append(where)
    return sorted(set(found))


def metrics(proxy: ProxyProc) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=5)
    try:
        conn.request("GET", "/metrics")
        response = conn.getresponse()
        assert response.status == 200
        return response.read().decode(errors="replace")
    finally:
        conn.close()


def error_body(port: int) -> str:
    """One request's full answer body, as text (kept for the canary search)."""
    status, body = http_json(
        port,
        "POST",
        "/v1/chat/completions",
        {"model": "fake-model", "messages": [{"role": "user", "content": "x"}]},
    )
    return json.dumps([status, body])
