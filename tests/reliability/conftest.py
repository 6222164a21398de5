"""The reliability suite's tools: real servers on 127.0.0.1, probes that count what leaked.

Reused from ``tests/proxy/conftest.py``: the fake provider (``fake``), ``start_proxy``, ``http``
and the manifest helpers. Added here:

* ``attacker``: a raw TCP listener on another loopback port that counts every connection and
  byte it ever gets; a path trick that reaches it fails the test.
* :class:`PoolSpy`: wraps a live pool's ``acquire`` / ``release`` so a test can prove every
  acquired key was released (nothing stuck in flight, no half-open probe left dangling).
* :class:`Steady`: a well-behaved client sending requests during an attack; it must keep
  getting 200s.
* process probes: open file descriptors and sockets (``/proc/self/fd``), asyncio tasks, RSS.

Nothing here writes to disk except pytest's own ``tmp_path``; every loop is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest

from sideproxy.pool import Key, ManagedCreditPool, Outcome
from tests.proxy.conftest import (  # noqa: F401 - fixtures, re-exported for this folder
    fake,
    http,
    start_proxy,
)

CHAT: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
STREAM: dict[str, Any] = {**CHAT, "stream": True}


def error_of(body: bytes | str) -> dict[str, Any]:
    """The OpenAI error object of a body, checked for shape: message, type, code (strings)."""
    import json  # noqa: PLC0415

    doc = json.loads(body)
    assert isinstance(doc, dict), doc
    error = doc["error"]
    assert isinstance(error, dict), doc
    for name in ("message", "type", "code"):
        assert isinstance(error.get(name), str), (name, doc)
        assert error[name], (name, doc)
    return error


# --------------------------------------------------------------------------- the attacker


@dataclass
class Attacker:
    """A loopback listener that must never hear from the proxy."""

    host: str
    port: int
    connections: int = 0
    received: bytearray = field(default_factory=bytearray)

    @property
    def netloc(self) -> str:
        return f"{self.host}:{self.port}"

    def untouched(self) -> bool:
        return self.connections == 0 and not self.received


@pytest.fixture
async def attacker() -> AsyncIterator[Attacker]:
    found = Attacker("127.0.0.1", 0)

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        found.connections += 1
        with contextlib.suppress(ConnectionError, TimeoutError):
            async with asyncio.timeout(2):
                found.received += await reader.read(65536)
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    found.port = server.sockets[0].getsockname()[1]
    try:
        yield found
    finally:
        server.close()
        await server.wait_closed()


# --------------------------------------------------------------------------- pool balance


class PoolSpy:
    """Counts a live pool's acquires and releases (instance attributes shadow the methods)."""

    def __init__(self, pool: ManagedCreditPool) -> None:
        self.pool = pool
        self.acquired = 0
        self.released = 0
        self.outcomes: Counter[Outcome] = Counter()
        acquire, release = pool.acquire, pool.release

        def spy_acquire(*args: Any, **kwargs: Any) -> Key | None:
            key = acquire(*args, **kwargs)
            if key is not None:
                self.acquired += 1
            return key

        def spy_release(key: Key, outcome: Outcome, *args: Any, **kwargs: Any) -> Any:
            self.released += 1
            self.outcomes[outcome] += 1
            return release(key, outcome, *args, **kwargs)

        pool.acquire = spy_acquire  # type: ignore[method-assign]
        pool.release = spy_release  # type: ignore[method-assign]

    @property
    def in_flight(self) -> int:
        return self.acquired - self.released


# --------------------------------------------------------------------------- a steady client


@dataclass
class Steady:
    """Sequential well-behaved requests while something else happens; statuses counted."""

    url: str
    headers: Mapping[str, str] = field(default_factory=dict)
    statuses: Counter[int] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self, limit: int = 5000) -> None:
        timeout = aiohttp.ClientTimeout(total=10)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            for _ in range(limit):
                if self._stop.is_set():
                    break
                try:
                    async with session.post(
                        self.url + "/v1/chat/completions", json=CHAT, headers=self.headers
                    ) as resp:
                        await resp.read()
                        self.statuses[resp.status] += 1
                except (aiohttp.ClientError, TimeoutError) as exc:
                    self.errors.append(type(exc).__name__)
                await asyncio.sleep(0.005)

    def stop(self) -> None:
        self._stop.set()


@contextlib.asynccontextmanager
async def steady(url: str, headers: Mapping[str, str] | None = None) -> AsyncIterator[Steady]:
    """A :class:`Steady` client running for the body of the ``async with``; it must only have
    seen 200s (and at least a few) when the block ends."""
    client = Steady(url, dict(headers or {}))
    task = asyncio.create_task(client.run())
    await asyncio.sleep(0.02)
    try:
        yield client
    finally:
        # Give it time for at least a few requests even if the block was quick.
        for _ in range(200):
            if sum(client.statuses.values()) >= 3:
                break
            await asyncio.sleep(0.01)
        client.stop()
        await asyncio.wait_for(task, 15)
    assert client.errors == [], client.errors
    assert set(client.statuses) == {200}, client.statuses
    assert sum(client.statuses.values()) >= 3


# --------------------------------------------------------------------------- process probes


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def open_sockets(pid: int | str = "self") -> int:
    count = 0
    base = f"/proc/{pid}/fd"
    for name in os.listdir(base):
        with contextlib.suppress(OSError):
            if os.readlink(f"{base}/{name}").startswith("socket:"):
                count += 1
    return count


def rss_kib(pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS in /proc status")


def live_objects() -> int:
    gc.collect()
    return len(gc.get_objects())


async def settle(check: Callable[[], bool], within: float = 10.0) -> None:
    """Wait (bounded) until ``check()`` holds."""
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


async def key_states(session: aiohttp.ClientSession, url: str, **headers: str) -> dict[str, Any]:
    """``/sideproxy/status`` keys by name."""
    async with session.get(url + "/sideproxy/status", headers=headers) as resp:
        assert resp.status == 200
        body = await resp.json()
    return {k["name"]: k for k in body["keys"]}


# --------------------------------------------------------------------------- a fake elsewhere


class FakeProcess:
    """``python -m sideproxy.fake_provider`` in its own process (its sockets and tasks are not
    the proxy's, and it gets a core of its own); driven through its HTTP control endpoints."""

    def __init__(self, process: asyncio.subprocess.Process, base_url: str) -> None:
        self.process = process
        self.base_url = base_url  # http://127.0.0.1:<port>/v1
        self.url = base_url.removesuffix("/v1")

    async def _call(self, method: str, path: str, body: Any = None) -> Any:
        async with (
            aiohttp.ClientSession() as session,
            session.request(method, self.url + path, json=body) as resp,
        ):
            assert resp.status == 200, await resp.text()
            return await resp.json()

    async def configure(self, **body: Any) -> None:
        await self._call("POST", "/_fake/config", body)

    async def stats(self) -> dict[str, int]:
        return dict(await self._call("GET", "/_fake/stats"))

    async def status_stats(self) -> dict[str, dict[str, int]]:
        return dict(await self._call("GET", "/_fake/stats/status"))


@contextlib.asynccontextmanager
async def fake_process(*args: str) -> AsyncIterator[FakeProcess]:
    import sys  # noqa: PLC0415

    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sideproxy.fake_provider", "--port", "0", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), 15)
        url = line.decode().strip().rpartition(" ")[2]
        assert url.startswith("http://127.0.0.1:"), line
        yield FakeProcess(process, url)
    finally:
        if process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), 10)
            except TimeoutError:
                process.kill()
                await process.wait()


# --------------------------------------------------------------------------- a proxy elsewhere


def free_port() -> int:
    import socket  # noqa: PLC0415

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without any SIDE_* setting (or KUBECONFIG), plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SIDE_", "KUBECONFIG"))}
    env.update(extra)
    return env


class ProxyProcess:
    """``python -m sideproxy serve --port P ...`` as a subprocess (or ``command`` + ``args``);
    stderr collected, never printed."""

    def __init__(
        self,
        args: list[str],
        port: int,
        env: Mapping[str, str],
        command: list[str] | None = None,
    ) -> None:
        import sys  # noqa: PLC0415

        self.command = command or [sys.executable, "-m", "sideproxy", "serve", "--port", str(port)]
        self.args = args
        self.port = port
        self.env = dict(env)
        self.url = f"http://127.0.0.1:{port}"
        self.stderr = bytearray()
        self.process: asyncio.subprocess.Process | None = None
        self._drain: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    async def start(self, ready: bool = True) -> ProxyProcess:
        self.process = await asyncio.create_subprocess_exec(
            *self.command, *self.args,
            env=self.env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        self._drain = asyncio.create_task(self._collect())
        if ready:
            await self.wait_ready()
        return self

    async def _collect(self) -> None:
        assert self.process is not None
        assert self.process.stderr is not None
        while chunk := await self.process.stderr.read(65536):
            self.stderr += chunk

    async def readyz(self) -> int:
        try:
            async with (
                aiohttp.ClientSession() as session,
                session.get(self.url + "/readyz", timeout=aiohttp.ClientTimeout(total=2)) as resp,
            ):
                return resp.status
        except (aiohttp.ClientError, TimeoutError):
            return 0

    async def wait_ready(self, within: float = 20.0) -> None:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.returncode is not None:
                raise AssertionError(f"proxy exited: {self.stderr.decode(errors='replace')}")
            if await self.readyz() == 200:
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"proxy not ready: {self.stderr.decode(errors='replace')[-2000:]}")

    async def stop(self, grace: float = 15.0) -> int:
        """SIGTERM (graceful shutdown), then wait; the exit code."""
        process = self.process
        assert process is not None
        if process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), grace)
            except TimeoutError:
                process.kill()
                await process.wait()
        if self._drain is not None:
            await asyncio.wait_for(self._drain, 5)
        assert process.returncode is not None
        return process.returncode


@contextlib.asynccontextmanager
async def proxy_process(
    args: list[str], port: int | None = None, env: Mapping[str, str] | None = None
) -> AsyncIterator[ProxyProcess]:
    proxy = ProxyProcess(args, port or free_port(), env or clean_env())
    try:
        yield await proxy.start()
    finally:
        if proxy.process is not None:
            await proxy.stop()
