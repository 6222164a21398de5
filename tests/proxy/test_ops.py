"""Operational endpoints: health, readiness, metrics, status; and the public surface."""

from __future__ import annotations

import subprocess
import sys

import aiohttp
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

import sideproxy.proxy
from sideproxy.fake_provider import FakeProvider
from sideproxy.proxy import ProxySettings
from tests.proxy.conftest import (
    SECRETS,
    VIRTUAL_KEY,
    K,
    Proxy,
    StartProxy,
    keys,
    manifests,
    snapshot,
)

CHAT = {"model": "m", "messages": []}


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


async def test_metrics(fake: FakeProvider, proxy: Proxy, http: aiohttp.ClientSession) -> None:
    fake.add_faults(SECRETS[0], {"status": 429, "retry_after": 30})
    for _ in range(4):
        assert (await http.post(proxy.base_url + "/chat/completions", json=CHAT)).status == 200
    resp = await http.get(proxy.url + "/metrics")
    assert resp.status == 200
    assert resp.content_type == "text/plain"
    samples = _samples(await resp.text())
    up = "sideproxy_upstream_requests_total"
    assert samples[(up, (("key", "key-1"), ("provider", "custom"), ("status", "429")))] == 1
    assert samples[(up, (("key", "key-2"), ("provider", "custom"), ("status", "200")))] == 2
    assert samples[("sideproxy_requests_total", (("provider", "custom"), ("status", "200")))] == 4
    assert samples[("sideproxy_retries_total", (("provider", "custom"), ("reason", "429")))] == 1
    assert (
        samples[("sideproxy_key_transitions_total", (("key", "key-1"), ("reason", "RateLimited")))]
        == 1
    )
    # The 429 was about model "m": key-1 cools for that model only, and stays ready.
    state = "sideproxy_key_state"
    assert samples[(state, (("key", "key-1"), ("provider", "custom"), ("state", "ready")))] == 1
    assert samples[(state, (("key", "key-3"), ("provider", "custom"), ("state", "ready")))] == 1
    cooling = "sideproxy_key_models_cooling"
    assert samples[(cooling, (("key", "key-1"), ("provider", "custom")))] == 1
    assert samples[(cooling, (("key", "key-2"), ("provider", "custom")))] == 0
    # No PoolKey names "m": it never becomes a label.
    assert not any(name == "sideproxy_key_model_cooling_seconds" for name, _ in samples)
    assert samples[("sideproxy_upstream_latency_seconds_count", (("provider", "custom"),))] == 5
    assert samples[("sideproxy_time_to_first_byte_seconds_count", (("provider", "custom"),))] == 4
    assert samples[("sideproxy_table_version", ())] == 1
    assert samples[("sideproxy_config_reloads_total", (("result", "applied"),))] == 1


async def test_a_model_label_only_for_models_a_poolkey_names(
    fake: FakeProvider, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    named = [K(f"key-{i + 1}", SECRETS[i], models=("m", "gpt-*")) for i in range(2)]
    proxy = await start_proxy(snapshot(manifests({"custom": fake.base_url}, named)))
    fake.add_faults(SECRETS[0], {"status": 429, "retry_after": 30})
    fake.add_faults(SECRETS[1], {"status": 429, "retry_after": 30})
    assert (await http.post(proxy.base_url + "/chat/completions", json=CHAT)).status == 429
    for model in ("gpt-4o", "gpt-" + "x" * 40):  # served by the glob, cooling, never labels
        fake.add_faults(SECRETS[0], {"status": 429, "retry_after": 30})
        fake.add_faults(SECRETS[1], {"status": 429, "retry_after": 30})
        body = {**CHAT, "model": model}
        assert (await http.post(proxy.base_url + "/chat/completions", json=body)).status == 429
    samples = _samples(await (await http.get(proxy.url + "/metrics")).text())
    labelled = {
        dict(labels)["model"]
        for name, labels in samples
        if name == "sideproxy_key_model_cooling_seconds"
    }
    assert labelled == {"m"}
    cooling = "sideproxy_key_models_cooling"
    assert samples[(cooling, (("key", "key-1"), ("provider", "custom")))] == 3
    seconds = samples[
        (
            "sideproxy_key_model_cooling_seconds",
            (("key", "key-1"), ("model", "m"), ("provider", "custom")),
        )
    ]
    assert 25 < seconds <= 30


async def test_each_app_has_its_own_registry(
    fake: FakeProvider, start_proxy: StartProxy, proxy: Proxy
) -> None:
    other = await start_proxy(snapshot(manifests({"custom": fake.base_url}, keys(1))))
    assert (
        other.app[sideproxy.proxy.METRICS].registry
        is not proxy.app[sideproxy.proxy.METRICS].registry
    )
    assert REGISTRY.get_sample_value("sideproxy_inflight_requests") is None


async def test_health_and_readiness(
    fake: FakeProvider, proxy: Proxy, http: aiohttp.ClientSession
) -> None:
    assert (await http.get(proxy.url + "/healthz")).status == 200
    resp = await http.get(proxy.url + "/readyz")
    assert resp.status == 200
    assert (await resp.json())["ready"] is True
    # Cooling keys keep the proxy ready (it answers 429 + Retry-After); only revoked-all is not.
    for secret in SECRETS[:3]:
        fake.revoke(secret)
    assert (await http.post(proxy.base_url + "/chat/completions", json=CHAT)).status == 401
    resp = await http.get(proxy.url + "/readyz")
    assert resp.status == 503
    assert "revoked" in (await resp.json())["reason"]


async def test_status_endpoint_needs_the_virtual_key_when_auth_is_on(
    fake: FakeProvider, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    docs = manifests({"custom": fake.base_url}, keys(2), virtual_keys=[VIRTUAL_KEY])
    proxy = await start_proxy(snapshot(docs))
    for path in ("/status", "/sideproxy/status"):
        resp = await http.get(proxy.url + path)
        assert resp.status == 401
        assert (await resp.json())["error"]["code"] == "invalid_virtual_key"
        resp = await http.get(proxy.url + path, headers={"Authorization": f"Bearer {VIRTUAL_KEY}"})
        assert resp.status == 200
        body = await resp.json()
        assert body["pool"] == "test"
        assert body["client_auth"] is True
        assert body["version"] == 1
        assert len(body["hash"]) == 64
        assert [k["name"] for k in body["keys"]] == ["key-1", "key-2"]
        assert set(body["keys"][0]) == {
            "name", "provider", "tier", "weight", "fingerprint", "health", "until",
            "requests", "rate_limited", "failures", "cooling", "exhausted", "unauthorized",
            "models",
        }  # fmt: skip
    # /healthz, /readyz and /metrics need no key.
    for path in ("/healthz", "/readyz", "/metrics"):
        assert (await http.get(proxy.url + path)).status == 200, path


async def test_standalone_virtual_keys_from_settings(
    fake: FakeProvider, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(
        snapshot(manifests({"custom": fake.base_url}, keys(1))),
        ProxySettings(virtual_keys=(VIRTUAL_KEY,)),
    )
    assert (await http.get(proxy.base_url + "/models")).status == 401
    resp = await http.get(proxy.base_url + "/models", headers={"x-api-key": VIRTUAL_KEY})
    assert resp.status == 200


def test_proxy_never_imports_kopf_or_the_kubernetes_client() -> None:
    code = (
        "import sys, sideproxy.proxy, sideproxy.cli, sideproxy.fake_provider; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('kopf', 'kubernetes_asyncio', "
        "'kubernetes') or m.startswith('sideproxy.operator')]; print(bad); sys.exit(bool(bad))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


async def test_a_forgotten_key_leaves_no_series_behind(
    fake: FakeProvider, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    """15.9: per-key series (attempts and transitions) go when the key leaves the table."""
    proxy = await start_proxy(snapshot(manifests({"custom": fake.base_url}, keys(3))))
    fake.add_faults(SECRETS[0], {"status": 429, "retry_after": 30})
    assert (await http.post(proxy.base_url + "/chat/completions", json=CHAT)).status == 200
    text = await (await http.get(proxy.url + "/metrics")).text()
    assert 'sideproxy_key_transitions_total{key="key-1"' in text
    assert proxy.runtime.apply(snapshot(manifests({"custom": fake.base_url}, keys(3)[1:]), 2))
    text = await (await http.get(proxy.url + "/metrics")).text()
    assert 'key="key-1"' not in text
    assert 'key="key-2"' in text
