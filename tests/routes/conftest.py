"""A real ``sideproxy serve --file`` in front of fake providers that are real HTTP servers, one
per provider endpoint, so each test can assert on what every upstream received."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from sideproxy.fake_provider import FakeProvider
from sideproxy.models import fingerprint

API = "sideproxy.dev/v1alpha1"
ROOT = Path(__file__).resolve().parent.parent.parent


@dataclass
class Endpoint:
    """One provider endpoint of the pool: its fake server and its keys."""

    name: str
    keys: tuple[str, ...]
    type: str | None = None
    fake: FakeProvider = field(init=False)

    def models_received(self) -> list[str | None]:
        """The model of every request this upstream answered, as its body named it."""
        return [call[4] for call in self.fake.calls]

    def served_by(self, value: str) -> int:
        return self.fake.calls_of(value)

    @property
    def fingerprints(self) -> set[str]:
        return {fingerprint(v) for v in self.keys}


def pool_file(
    endpoints: Iterable[Endpoint], routes: list[dict[str, Any]], default: str
) -> list[dict[str, Any]]:
    endpoints = list(endpoints)
    providers = []
    for e in endpoints:
        entry = {"name": e.name, "baseURL": e.fake.base_url}
        if e.type:
            entry["type"] = e.type
        providers.append(entry)
    docs: list[dict[str, Any]] = [
        {
            "apiVersion": API,
            "kind": "CreditPool",
            "metadata": {"name": "routed"},
            "spec": {"defaultProvider": default, "providers": providers, "routes": routes},
        },
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "keys"},
            "stringData": {f"{e.name}-{i}": v for e in endpoints for i, v in enumerate(e.keys)},
        },
    ]
    for e in endpoints:
        for i in range(len(e.keys)):
            docs.append(
                {
                    "apiVersion": API,
                    "kind": "PoolKey",
                    "metadata": {"name": f"{e.name}-{i}"},
                    "spec": {
                        "pool": "routed",
                        "provider": e.name,
                        "secretRef": {"name": "keys", "key": f"{e.name}-{i}"},
                    },
                }
            )
    return docs


@dataclass
class Served:
    url: str
    process: asyncio.subprocess.Process
    log: Path

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    async def logs(self) -> str:
        """Stop the proxy and return what it logged (JSON lines)."""
        if self.process.returncode is None:
            self.process.terminate()
            await asyncio.wait_for(self.process.wait(), 30)
        return self.log.read_text()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.asynccontextmanager
async def serve(
    tmp_path: Path, docs: list[dict[str, Any]], env: Mapping[str, str] | None = None
) -> AsyncIterator[Served]:
    """``sideproxy serve --file`` on ``docs``, ready; killed on exit."""
    path = tmp_path / "pool.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    port = _free_port()
    log = tmp_path / "proxy.log"
    with log.open("wb") as sink:
        process = await _start(path, port, sink, env)
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(400):
                with contextlib.suppress(aiohttp.ClientError):
                    if (await http.get(url + "/readyz")).status == 200:
                        break
                if process.returncode is not None:
                    pytest.fail("sideproxy serve exited: " + log.read_text())
                await asyncio.sleep(0.05)
            else:
                pytest.fail("sideproxy serve never became ready")
        yield Served(url, process, log)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def _start(
    path: Path, port: int, sink: Any, env: Mapping[str, str] | None
) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sideproxy", "serve", "--file", str(path), "--port", str(port),
        "--log-format", "json",
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        stdout=asyncio.subprocess.DEVNULL,
        stderr=sink,
    )  # fmt: skip


@contextlib.asynccontextmanager
async def fakes(*endpoints: Endpoint) -> AsyncIterator[tuple[Endpoint, ...]]:
    async with contextlib.AsyncExitStack() as stack:
        for e in endpoints:
            e.fake = await stack.enter_async_context(FakeProvider(e.keys))
        yield endpoints
