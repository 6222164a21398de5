"""Config sources that must not die (issue 15.3), through a real proxy on a real socket.

A pool file that is valid YAML but not a valid manifest (``metadata: x`` in a Secret) used to
raise ``AttributeError`` inside ``FileSource``: the follow task ended, the fixed file was never
loaded and ``/readyz`` stayed 200. Now the bad file is a rejection like any other, the fixed one
is loaded, and ``/readyz`` tells a source that failed (503) from one whose newest config was
rejected while the last good one serves (200, with the rejection).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from sideproxy.fake_provider import FakeProvider
from sideproxy.proxy import FileSource, SourceEvent
from tests.proxy.conftest import (  # fixtures, registered by the import
    StartProxy,
    eventually,
    fake,
    http,
    keys,
    manifests,
    snapshot,
    start_proxy,
)

__all__ = ["fake", "http", "start_proxy"]


def _write(path: Path, docs: list[dict[str, Any]]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump_all(docs))
    tmp.replace(path)


async def _readyz(http: aiohttp.ClientSession, url: str) -> tuple[int, dict[str, Any]]:
    async with http.get(url + "/readyz") as resp:
        return resp.status, await resp.json()


async def test_a_malformed_pool_file_is_rejected_and_the_fixed_one_loaded(
    tmp_path: Path, fake: FakeProvider, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    path = tmp_path / "pool.yaml"
    good = manifests({"custom": fake.base_url}, keys(2))
    _write(path, good)
    proxy = await start_proxy(FileSource(path, interval=0.02))
    assert (await _readyz(http, proxy.url))[0] == 200

    # Valid YAML, malformed manifest: a Secret whose metadata is a string.
    broken = [dict(doc) for doc in good]
    secret = next(d for d in broken if d["kind"] == "Secret")
    secret["metadata"] = "x"
    _write(path, broken)
    await eventually(lambda: proxy.runtime.last_rejected is not None)
    assert proxy.runtime.last_rejected is not None
    assert "metadata" in proxy.runtime.last_rejected[1]
    status, body = await _readyz(http, proxy.url)
    assert status == 200, "the last good table still serves"
    assert "rejected" in body["reason"]

    # The fixed file (a third key now) is loaded: the source is still following the file.
    _write(path, manifests({"custom": fake.base_url}, keys(3)))
    await eventually(lambda: len(proxy.pool.statuses(0)) == 3)
    status, body = await _readyz(http, proxy.url)
    assert (status, body["reason"]) == (200, "ok")


class _Failing:
    """A source that serves a table, then breaks: a bug in a source, not a bad config."""

    def __init__(self, first: SourceEvent, then: SourceEvent) -> None:
        self._events = [first, then]
        self.calls = 0
        self.broken = asyncio.Event()
        self.repaired = asyncio.Event()
        self.restarted = asyncio.Event()
        self.resume = asyncio.Event()

    async def snapshots(self) -> AsyncIterator[SourceEvent]:
        self.calls += 1
        if self.calls == 1:
            yield self._events[0]
            self.broken.set()
            await self.repaired.wait()
            raise RuntimeError("the source broke")
        self.restarted.set()
        await self.resume.wait()
        yield self._events[1]
        await asyncio.Event().wait()


async def test_a_source_that_fails_is_not_ready_and_is_restarted(
    fake: FakeProvider, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    source = _Failing(
        snapshot(manifests({"custom": fake.base_url}, keys(2)), version=1),
        snapshot(manifests({"custom": fake.base_url}, keys(3)), version=2),
    )
    proxy = await start_proxy(source)
    await source.broken.wait()
    assert (await _readyz(http, proxy.url))[0] == 200
    source.repaired.set()  # ...which makes it raise
    # Restarted (after a back-off), but until it delivers again the proxy learns nothing: not
    # ready, and /readyz says why.
    await asyncio.wait_for(source.restarted.wait(), 10)
    status, body = await _readyz(http, proxy.url)
    assert status == 503
    assert "RuntimeError" in body["reason"]
    source.resume.set()
    await eventually(lambda: len(proxy.pool.statuses(0)) == 3)
    assert source.calls == 2
    status, body = await _readyz(http, proxy.url)
    assert (status, body["reason"]) == (200, "ok")
