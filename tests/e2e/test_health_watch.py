"""The cluster watch outlives a malformed watch event (issue 15.5).

A real API server never sends a malformed event, so this is the one place a stand-in serves
the API: a small aiohttp server speaking the list and watch endpoints of the two objects the
proxy reads, over a real socket, to the real ``kubernetes_asyncio`` client and the real
``ClusterSource``. Its first watch of the ConfigMap sends a line that is not an event; the
watch used to end there (an ``Exception`` outside the caught list) and ``snapshots()`` then
waited forever. Now the watch logs it, backs off, lists again and sees the next table.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from kubernetes_asyncio.client import ApiClient, Configuration

from sideproxy.models import TABLE_DATA_KEY, Provider, RoutingTable, TableKey, fingerprint
from sideproxy.proxy.kube import ClusterSource
from sideproxy.proxy.sources import Rejected

VALUE = "sk-CANARY-watch-1"


def _table(version: int) -> str:
    # The weight follows the version: a table whose content did not change is not news.
    key = TableKey(
        name="key-1",
        provider=Provider.CUSTOM,
        tier=0,
        weight=version,
        fingerprint=fingerprint(VALUE),
    )
    return RoutingTable(pool="p", keys=[key]).sealed(version).to_json()


class _Api:
    """``/api/v1/namespaces/ns/{configmaps,secrets}``: list, and watch (chunked JSON lines)."""

    def __init__(self, bad_line: bytes) -> None:
        self.version = 1
        self.bad_line = bad_line
        self.watches = 0
        self.lists = 0
        self.bad_sent = asyncio.Event()

    def _object(self, kind: str) -> dict[str, Any]:
        meta = {"name": f"p-{'routing' if kind == 'configmaps' else 'keys'}", "namespace": "ns",
                "resourceVersion": str(self.version)}  # fmt: skip
        if kind == "configmaps":
            return {"metadata": meta, "data": {TABLE_DATA_KEY: _table(self.version)}}
        return {"metadata": meta, "data": {"key-1": base64.b64encode(VALUE.encode()).decode()}}

    async def handle(self, request: web.Request) -> web.StreamResponse:
        kind = request.match_info["kind"]
        if request.query.get("watch", "").lower() not in ("true", "1"):
            self.lists += 1
            return web.json_response(
                {
                    "metadata": {"resourceVersion": str(self.version)},
                    "items": [self._object(kind)],
                }
            )
        response = web.StreamResponse()
        await response.prepare(request)
        if kind == "configmaps":
            self.watches += 1
            if self.watches == 1:
                # The table moves on, and the event that says so arrives mangled.
                self.version = 2
                await response.write(self.bad_line + b"\n")
                self.bad_sent.set()
        await asyncio.sleep(3600)  # an open watch with nothing more to say
        return response


@pytest.fixture(params=[b'{"type": "MODIFIED"}', b"not json at all", b'{"type": "ADDED", '
                        b'"object": {"metadata": {"name": "p-routing"}, "data": ["x"]}}'],
                ids=["no-object", "not-json", "data-not-a-map"])  # fmt: skip
async def api(request: pytest.FixtureRequest) -> AsyncIterator[tuple[_Api, ApiClient]]:
    fake = _Api(request.param)
    app = web.Application()
    app.router.add_get("/api/v1/namespaces/ns/{kind}", fake.handle)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    configuration = Configuration(host=f"http://127.0.0.1:{port}")
    client = ApiClient(configuration)
    try:
        yield fake, client
    finally:
        await client.close()
        await runner.cleanup()


async def test_the_watch_survives_a_malformed_event_and_sees_the_next_table(
    api: tuple[_Api, ApiClient], caplog: pytest.LogCaptureFixture
) -> None:
    fake, client = api
    caplog.set_level(logging.WARNING, "sideproxy.proxy.kube")
    versions: list[int] = []
    stream = ClusterSource(client, "ns", "p").snapshots()
    try:
        async with asyncio.timeout(20):
            async for event in stream:
                if isinstance(event, Rejected):
                    continue
                versions.append(event[0].version)
                if event[0].version == 2:
                    break
    finally:
        await stream.aclose()
    assert versions[0] == 1
    assert versions[-1] == 2
    assert fake.bad_sent.is_set()
    assert fake.lists >= 3  # configmap and secret once each, then the configmap again
    assert any("configmap ns/p-routing" in r.getMessage() for r in caplog.records)
    assert VALUE not in caplog.text
    assert json.dumps(VALUE) not in caplog.text
