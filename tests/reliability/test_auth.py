"""Client auth: constant-time virtual-key checks, and no accidental open proxy in cluster mode.

Cluster mode (``sideproxy serve --pool X``) takes its client auth from the CreditPool. A pool
with ``clientAuth.disabled: true`` is now served beyond loopback only when the proxy was also
started with ``--no-auth`` / ``SIDE_PROXY_NO_AUTH=1``: otherwise the table is rejected like an
invalid one (the proxy stays not ready, or keeps serving the last table that had auth), with a
log line saying why.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import inspect
import logging
import re
import sys
import textwrap
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from sideproxy.fake_provider import FakeProvider
from sideproxy.proxy import ProxySettings, QueueSource
from sideproxy.proxy._auth import VirtualKeys
from tests.proxy.conftest import VIRTUAL_KEY, StartProxy, keys, manifests, snapshot
from tests.reliability.conftest import CHAT, ProxyProcess, clean_env, error_of, free_port


def test_virtual_key_check_is_one_hmac_compare_digest_of_digests(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The presented value is hashed, its digest looked up (O(1) at any number of keys), and a
    hit confirmed with exactly one constant-time compare of SHA-256 digests, never of values."""
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    from multidict import CIMultiDict, CIMultiDictProxy  # noqa: PLC0415

    for count in (5, 5_000):
        vks = VirtualKeys([f"vk-{i}" for i in range(count)], required=True)
        for presented, expected in (("vk-0", True), ("vk-4", True), ("nope", False), ("", False)):
            calls.clear()
            headers = CIMultiDictProxy(CIMultiDict({"Authorization": f"Bearer {presented}"}))
            assert vks.check(headers) is expected
            if not expected:
                assert calls == []  # no stored digest matches: nothing to confirm
                continue
            digest = hashlib.sha256(presented.encode()).digest()
            assert calls == [(digest, digest)]  # one compare, of 32-byte digests, at any count
    source = inspect.getsource(VirtualKeys.identify)
    assert "hmac.compare_digest" in source
    # No short-circuiting comparison of key material anywhere in the check.
    assert not re.search(
        r"(digest|known|presented|token)\s*(==|!=)|(==|!=)\s*(digest|known)", source
    )


def _unauthenticated(fake: FakeProvider) -> list[dict[str, Any]]:
    return manifests({"custom": fake.base_url}, keys(2))  # no clientAuth: disabled by default


async def test_required_auth_refuses_a_table_without_it(
    fake: FakeProvider,
    start_proxy: StartProxy,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    source = QueueSource()
    source.push(snapshot(_unauthenticated(fake)))
    settings = ProxySettings(require_client_auth=True, initial_config_timeout=1)
    proxy = await start_proxy(source, settings)
    assert (await http.get(proxy.url + "/readyz")).status == 503
    resp = await http.post(proxy.base_url + "/chat/completions", json=CHAT)
    assert resp.status == 503
    assert error_of(await resp.read())["code"] == "not_ready"
    assert fake.stats() == {}
    assert "clientAuth.disabled" in caplog.text
    assert "--no-auth" in caplog.text
    # A table with client auth is served...
    source.push(snapshot(manifests({"custom": fake.base_url}, keys(2), virtual_keys=[VIRTUAL_KEY])))
    for _ in range(100):
        if (await http.get(proxy.url + "/readyz")).status == 200:
            break
        await asyncio.sleep(0.02)
    auth = {"Authorization": f"Bearer {VIRTUAL_KEY}"}
    assert (
        await http.post(proxy.base_url + "/chat/completions", json=CHAT, headers=auth)
    ).status == 200
    # ...and a later one that turns it off is refused: the last good table (with auth) stays.
    source.push(snapshot(_unauthenticated(fake), version=3))
    await asyncio.sleep(0.1)
    resp = await http.post(proxy.base_url + "/chat/completions", json=CHAT)
    assert resp.status == 401
    status = await (await http.get(proxy.url + "/sideproxy/status", headers=auth)).json()
    assert status["client_auth"] is True
    assert "clientAuth.disabled" in status["last_rejected"]["reason"]


_CLUSTER = textwrap.dedent(
    """
    import sys
    import sideproxy.proxy.kube
    from sideproxy.proxy import FileSource
    from sideproxy.cli import main

    # A stand-in for the Kubernetes source: the same tables, from a file.
    sideproxy.proxy.kube.KubeSource = lambda pool, namespace, kubeconfig: FileSource(sys.argv[1])
    raise SystemExit(main(sys.argv[2:]))
    """
)


async def _cluster_proxy(pool: Path, host: str, **env: str) -> ProxyProcess:
    port = free_port()
    argv = [str(pool), "serve", "--pool", "p", "--host", host, "--port", str(port)]
    command = [sys.executable, "-c", _CLUSTER]
    return await ProxyProcess(argv, port, clean_env(**env), command).start(ready=False)


@pytest.mark.parametrize(
    ("host", "env", "ready"),
    [
        ("0.0.0.0", {}, False),  # the test talks to 127.0.0.1 only
        ("0.0.0.0", {"SIDE_PROXY_NO_AUTH": "1"}, True),
        ("127.0.0.1", {}, True),  # loopback: only local processes can reach it
    ],
    ids=["beyond-loopback-refused", "no-auth-explicit", "loopback"],
)
async def test_cluster_mode_without_client_auth_needs_no_auth(
    fake: FakeProvider, tmp_path: Path, host: str, env: dict[str, str], ready: bool
) -> None:
    pool = tmp_path / "pool.yaml"
    pool.write_text(yaml.safe_dump_all(_unauthenticated(fake)))
    proxy = await _cluster_proxy(pool, host, **env)
    try:
        if ready:
            await proxy.wait_ready()
        else:
            # It comes up, loads the table, refuses it: listening, but never ready.
            for _ in range(400):  # 20 s at most
                if b"config rejected" in proxy.stderr and await proxy.readyz() != 0:
                    break
                await asyncio.sleep(0.05)
            assert b"config rejected" in proxy.stderr
            assert await proxy.readyz() == 503
    finally:
        assert await proxy.stop() == 0
    stderr = proxy.stderr.decode()
    if not ready:
        assert "clientAuth.disabled" in stderr
        assert "--no-auth" in stderr
        assert fake.stats() == {}
