"""Shared fixtures for the proxy tests: a real fake provider, a real proxy, real sockets."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from yarl import URL

from sideproxy import translate
from sideproxy.fake_provider import FakeProvider
from sideproxy.models import fingerprint
from sideproxy.pool import KeyStatus, ManagedCreditPool
from sideproxy.proxy import (
    POOL,
    RUNTIME,
    ConfigRuntime,
    ConfigSource,
    ProxySettings,
    Snapshot,
    StaticSource,
    create_app,
    running,
)

# Distinctive values: any test may grep logs, metrics and bodies for them.
SECRETS = ("sk-SECRET-canary-1", "sk-SECRET-canary-2", "sk-SECRET-canary-3", "sk-SECRET-canary-4")
VIRTUAL_KEY = "vk-SECRET-virtual-canary"
API = "sideproxy.dev/v1alpha1"


@dataclass(frozen=True)
class K:
    """One PoolKey for a test pool."""

    name: str
    value: str
    tier: int = 0
    weight: int = 1
    provider: str = "custom"
    models: tuple[str, ...] = ()  # PoolKey.spec.models: empty = every model

    @property
    def fp(self) -> str:
        return fingerprint(self.value)


def keys(n: int = 3, **kw: Any) -> list[K]:
    return [K(f"key-{i + 1}", SECRETS[i], **kw) for i in range(n)]


def manifests(
    providers: Mapping[str, str],
    pool_keys: Iterable[K],
    *,
    default: str | None = None,
    virtual_keys: Iterable[str] | None = None,
    spec: Mapping[str, Any] | None = None,
    name: str = "test",
) -> list[dict[str, Any]]:
    """CreditPool + PoolKeys + Secrets, as a user would write them."""
    pool_keys = list(pool_keys)
    body: dict[str, Any] = {
        "defaultProvider": default or next(iter(providers)),
        "providers": [{"name": p, "baseURL": url} for p, url in providers.items()],
        **(spec or {}),
    }
    docs: list[dict[str, Any]] = [
        {"apiVersion": API, "kind": "CreditPool", "metadata": {"name": name}, "spec": body},
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "keys"},
            "stringData": {k.name: k.value for k in pool_keys},
        },
    ]
    if virtual_keys is not None:
        body["clientAuth"] = {"secretRef": {"name": "clients", "key": "virtual-keys"}}
        docs.append(
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": "clients"},
                "stringData": {"virtual-keys": "\n".join(virtual_keys)},
            }
        )
    for k in pool_keys:
        docs.append(
            {
                "apiVersion": API,
                "kind": "PoolKey",
                "metadata": {"name": k.name},
                "spec": {
                    "pool": name,
                    "provider": k.provider,
                    "tier": k.tier,
                    "weight": k.weight,
                    "secretRef": {"name": "keys", "key": k.name},
                    **({"models": list(k.models)} if k.models else {}),
                },
            }
        )
    return docs


def snapshot(docs: list[dict[str, Any]], version: int = 1) -> Snapshot:
    pool, pool_keys, secrets = translate.from_manifests(docs)
    result = translate.translate(pool, pool_keys, secrets, time.time())
    return Snapshot(result.table.sealed(version), result.material, "test")


@dataclass
class Proxy:
    url: str
    app: web.Application

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    @property
    def pool(self) -> ManagedCreditPool:
        return self.app[POOL]

    @property
    def runtime(self) -> ConfigRuntime:
        return self.app[RUNTIME]

    def status(self, name: str) -> KeyStatus:
        return next(s for s in self.pool.statuses(time.time()) if s.name == name)

    def cooling(self, name: str, model: str) -> float | None:
        """When key ``name`` may serve ``model`` again, if it is cooling for that model."""
        return dict(self.status(name).cooling).get(model)


StartProxy = Callable[..., Awaitable[Proxy]]


@pytest.fixture
async def fake() -> AsyncIterator[FakeProvider]:
    async with FakeProvider(SECRETS) as provider:
        yield provider


@pytest.fixture
async def start_proxy() -> AsyncIterator[StartProxy]:
    """``await start_proxy(source_or_snapshot, settings=None, **create_app_kwargs)``."""
    async with contextlib.AsyncExitStack() as stack:

        async def start(
            source: ConfigSource | Snapshot | tuple[Any, Any] | None = None,
            settings: ProxySettings | None = None,
            **kwargs: Any,
        ) -> Proxy:
            if isinstance(source, tuple):  # a Snapshot, or a plain (table, material)
                source = StaticSource(source)
            app = create_app(settings or ProxySettings(), source, **kwargs)
            url = await stack.enter_async_context(running(app, shutdown_timeout=1.0))
            return Proxy(url, app)

        yield start


@pytest.fixture
async def proxy(fake: FakeProvider, start_proxy: StartProxy) -> Proxy:
    """Three equal keys of a 'custom' provider pointing at the fake provider, no client auth."""
    return await start_proxy(snapshot(manifests({"custom": fake.base_url}, keys(3))))


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def raw_request(
    url: str, request_line: str, headers: str = "", body: bytes = b""
) -> tuple[int, bytes]:
    """Send bytes exactly as given (no client-side URL normalisation); (status, body)."""
    parsed = URL(url)
    reader, writer = await asyncio.open_connection(parsed.host, parsed.port)
    try:
        head = (
            f"{request_line}\r\nHost: {parsed.host}:{parsed.port}\r\nConnection: close\r\n{headers}"
        )
        if body:
            head += f"Content-Length: {len(body)}\r\n"
        writer.write(head.encode() + b"\r\n" + body)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    status = int(data.split(b" ", 2)[1])
    return status, data.partition(b"\r\n\r\n")[2]


async def eventually(check: Callable[[], bool], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)
