"""Config sources, reloads and the last-good-table rule."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from sideproxy.fake_provider import FakeProvider
from sideproxy.models import Provider
from sideproxy.proxy import (
    EnvSource,
    FileSource,
    ProxySettings,
    QueueSource,
    Rejected,
    Snapshot,
    load_file,
)
from sideproxy.translate import ManifestError
from tests.proxy.conftest import (
    SECRETS,
    VIRTUAL_KEY,
    K,
    StartProxy,
    eventually,
    keys,
    manifests,
    snapshot,
)

CHAT = {"model": "m", "messages": []}


def _write(path: Path, docs: list[dict[str, Any]]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump_all(docs))
    tmp.replace(path)  # atomic, as an editor or a ConfigMap volume would do


async def test_file_mode_reloads_on_change_and_keeps_the_last_good_file(
    tmp_path: Path, fake: FakeProvider, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    path = tmp_path / "pool.yaml"
    _write(path, manifests({"custom": fake.base_url}, keys(2)))
    proxy = await start_proxy(FileSource(path, interval=0.05))
    assert proxy.runtime.compiled is not None
    assert {s.name for s in proxy.pool.statuses(0)} == {"key-1", "key-2"}
    resp = await http.post(proxy.base_url + "/chat/completions", json=CHAT)
    assert resp.status == 200

    _write(path, manifests({"custom": fake.base_url}, keys(3)))
    await eventually(lambda: len(proxy.pool.statuses(0)) == 3)
    compiled = proxy.runtime.compiled
    assert compiled is not None
    assert compiled.version == 2

    path.write_text("kind: CreditPool\n  bad: [indentation\n")
    await eventually(lambda: proxy.runtime.last_rejected is not None)
    assert proxy.runtime.last_rejected is not None
    assert "line" in proxy.runtime.last_rejected[1]
    assert proxy.runtime.compiled is compiled  # still serving version 2
    resp = await http.post(proxy.base_url + "/chat/completions", json=CHAT)
    assert resp.status == 200

    # Structurally valid YAML, invalid pool: also rejected, with a message naming the field.
    docs = manifests({"custom": fake.base_url}, keys(3), spec={"retry": {"maxAttempts": 0}})
    _write(path, docs)
    await eventually(lambda: "maxAttempts" in (proxy.runtime.last_rejected or (0, ""))[1])
    assert proxy.runtime.compiled is compiled
    status = await (await http.get(proxy.url + "/sideproxy/status")).json()
    assert status["version"] == 2
    assert "maxAttempts" in status["last_rejected"]["reason"]

    _write(path, manifests({"custom": fake.base_url}, keys(1)))
    await eventually(lambda: len(proxy.pool.statuses(0)) == 1)


async def test_reload_does_not_drop_an_in_flight_stream(
    tmp_path: Path, fake: FakeProvider, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    path = tmp_path / "pool.yaml"
    _write(path, manifests({"custom": fake.base_url}, keys(2)))
    proxy = await start_proxy(FileSource(path, interval=0.05))
    fake.configure(stream_chunks=6, stream_interval=0.1)
    async with http.post(
        proxy.base_url + "/chat/completions", json={**CHAT, "stream": True}
    ) as resp:
        await resp.content.readuntil(b"\n\n")
        _write(path, manifests({"custom": fake.base_url}, [K("other", SECRETS[3])]))
        await eventually(lambda: [s.name for s in proxy.pool.statuses(0)] == ["other"])
        body = await resp.read()
    assert body.endswith(b"data: [DONE]\n\n")


async def test_health_carries_over_a_reload(
    fake: FakeProvider, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    source = QueueSource()
    source.push(snapshot(manifests({"custom": fake.base_url}, keys(2))))
    proxy = await start_proxy(source)
    fake.add_faults(SECRETS[0], {"status": 429, "retry_after": 60})
    assert (await http.post(proxy.base_url + "/chat/completions", json=CHAT)).status == 200
    until = proxy.cooling("key-1", CHAT["model"])
    assert until is not None
    source.push(snapshot(manifests({"custom": fake.base_url}, keys(3)), version=2))
    await eventually(lambda: len(proxy.pool.statuses(0)) == 3)
    assert proxy.cooling("key-1", CHAT["model"]) == until  # the same key, still resting
    source.close()


async def test_keys_without_matching_material_sit_out(
    fake: FakeProvider, start_proxy: StartProxy
) -> None:
    snap = snapshot(manifests({"custom": fake.base_url}, keys(3)))
    material = dict(snap.material)
    del material["key-1"]
    material["key-2"] = "sk-rotated-but-table-not-yet"
    proxy = await start_proxy((snap.table, material))  # a plain tuple, as kube.ClusterSource yields
    assert [s.name for s in proxy.pool.statuses(0)] == ["key-3"]
    compiled = proxy.runtime.compiled
    assert compiled is not None
    assert compiled.held_back == ("key-1", "key-2")


async def test_an_invalid_snapshot_keeps_the_last_good_one(
    fake: FakeProvider, start_proxy: StartProxy
) -> None:
    source = QueueSource()
    good = snapshot(manifests({"custom": fake.base_url}, keys(2)))
    source.push(good)
    proxy = await start_proxy(source)
    first = proxy.runtime.compiled
    bad_urls = good.table.settings.model_copy(
        update={"base_urls": {Provider.CUSTOM: "http://user:pw@evil.example/v1"}}
    )
    bad = good.table.model_copy(update={"settings": bad_urls}).sealed(2)
    source.push(Snapshot(bad, good.material))
    source.push(Rejected("the API server went away"))
    await eventually(lambda: (proxy.runtime.last_rejected or (0, ""))[1].startswith("the API"))
    assert proxy.runtime.compiled is first
    source.close()


async def test_table_virtual_keys_from_key_material(
    fake: FakeProvider, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    docs = manifests(
        {"custom": fake.base_url}, keys(1), virtual_keys=["vk-one", f"vk-two,{VIRTUAL_KEY}"]
    )
    proxy = await start_proxy(snapshot(docs))
    for vk in ("vk-one", "vk-two", VIRTUAL_KEY):
        resp = await http.get(proxy.base_url + "/models", headers={"Authorization": f"Bearer {vk}"})
        assert resp.status == 200, vk
    assert (await http.get(proxy.base_url + "/models")).status == 401


async def test_env_source(
    fake: FakeProvider, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(
        EnvSource(SECRETS[:2], "custom", fake.base_url),
        ProxySettings(virtual_keys=(VIRTUAL_KEY,)),
    )
    assert [s.name for s in proxy.pool.statuses(0)] == ["key-1", "key-2"]
    resp = await http.get(proxy.base_url + "/models", headers={"x-api-key": VIRTUAL_KEY})
    assert resp.status == 200
    assert (await http.get(proxy.base_url + "/models")).status == 401


async def test_env_source_with_a_bad_provider_is_rejected() -> None:
    events = [e async for e in EnvSource(["k"], "nonsense").snapshots()]
    assert len(events) == 1
    assert isinstance(events[0], Rejected)


def test_load_file_errors_name_the_problem(tmp_path: Path) -> None:
    path = tmp_path / "pool.yaml"
    path.write_text("- a list\n")
    with pytest.raises(ManifestError, match="mapping"):
        load_file(path)
    path.write_text(yaml.safe_dump({"kind": "PoolKey", "metadata": {"name": "x"}}))
    with pytest.raises(ManifestError, match="unsupported apiVersion/kind"):
        load_file(path)
    path.write_text("")
    with pytest.raises(ManifestError, match="exactly one CreditPool"):
        load_file(path)


async def test_file_source_reports_a_missing_file_once(tmp_path: Path) -> None:
    source = FileSource(tmp_path / "missing.yaml", interval=0.01)
    events: list[object] = []

    async def collect() -> None:
        async for event in source.snapshots():
            events.append(event)

    task = asyncio.create_task(collect())
    await asyncio.sleep(0.1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(events) == 1
    assert isinstance(events[0], Rejected)
    assert "cannot read" in events[0].reason
