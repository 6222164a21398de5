"""``sideproxy demo``: keys rotating, cooling down and recovering, in one command, offline.

Starts the fake provider with four keys, each rate-limited to a few requests per second, and the
proxy in front of it (both on free loopback ports), built from the same CreditPool / PoolKey /
Secret manifests a user would apply to a cluster::

    key-a  tier 0  weight 2  4 req/s    takes the most traffic, so it hits its limit
    key-b  tier 0  weight 1  3 req/s
    key-c  tier 0  weight 1  3 req/s    revoked by the "provider" a third of the way in
    key-d  tier 1  weight 1  10 req/s   the spare: serves only when tier 0 is resting

Then it sends ~10 requests per second (every fourth one streamed) through the official ``openai``
SDK (with the SDK's own retries off, so every success is the proxy's doing), or through aiohttp
if the SDK is missing, and shows a live table. Exit code 0 iff the client saw no error.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import IO, Any

from sideproxy import translate
from sideproxy.fake_provider import FakeProvider
from sideproxy.pool import KeyHealth, KeyStatus, ManagedCreditPool
from sideproxy.proxy import POOL, ProxySettings, Snapshot, StaticSource, create_app, running

__all__ = ["run_demo"]

_KEYS = (  # name, tier, weight, limit
    ("key-a", 0, 2, "4/1s"),
    ("key-b", 0, 1, "3/1s"),
    ("key-c", 0, 1, "3/1s"),
    ("key-d", 1, 1, "10/1s"),
)
_REVOKED = "key-c"


def _manifests(base_url: str, values: dict[str, str], virtual_key: str) -> list[dict[str, Any]]:
    api = "sideproxy.dev/v1alpha1"
    docs: list[dict[str, Any]] = [
        {
            "apiVersion": api,
            "kind": "CreditPool",
            "metadata": {"name": "demo"},
            "spec": {
                "defaultProvider": "custom",
                "providers": [{"name": "custom", "baseURL": base_url}],
                "cooldown": {"defaultSeconds": 2},
                "clientAuth": {"secretRef": {"name": "demo-clients", "key": "virtual-keys"}},
            },
        },
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "demo-keys"},
         "stringData": values},
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "demo-clients"},
         "stringData": {"virtual-keys": virtual_key}},
    ]  # fmt: skip
    for name, tier, weight, _ in _KEYS:
        docs.append(
            {
                "apiVersion": api,
                "kind": "PoolKey",
                "metadata": {"name": name},
                "spec": {
                    "pool": "demo",
                    "provider": "custom",
                    "tier": tier,
                    "weight": weight,
                    "secretRef": {"name": "demo-keys", "key": name},
                },
            }
        )
    return docs


@dataclass
class _Traffic:
    sent: int = 0
    ok: int = 0
    streamed: int = 0
    errors: int = 0
    last_error: str = ""


_STYLE = {
    KeyHealth.READY: "green",
    KeyHealth.LOW_HEADROOM: "yellow",
    KeyHealth.COOLING: "cyan",
    KeyHealth.OPEN: "red",
    KeyHealth.HALF_OPEN: "magenta",
    KeyHealth.REVOKED: "bold red",
}


def _rest(status: KeyStatus, now: float) -> str:
    return f"{max(0.0, status.until - now):.1f}s" if status.until is not None else ""


def _client(
    base_url: str, virtual_key: str
) -> tuple[Callable[[bool], Awaitable[None]], Callable[[], Awaitable[None]]]:
    """(send one request, close) through the openai SDK if installed, else aiohttp."""
    messages: Any = [{"role": "user", "content": "Say hello."}]
    try:
        import openai  # noqa: PLC0415
    except ImportError:
        import aiohttp  # noqa: PLC0415

        session = aiohttp.ClientSession(headers={"Authorization": f"Bearer {virtual_key}"})

        async def send_aiohttp(stream: bool) -> None:
            body = {"model": "demo", "messages": messages, "stream": stream}
            async with session.post(base_url + "/chat/completions", json=body) as resp:
                await resp.read()
                if resp.status != 200:
                    raise RuntimeError(f"HTTP {resp.status}")

        return send_aiohttp, session.close

    client = openai.AsyncOpenAI(base_url=base_url, api_key=virtual_key, max_retries=0)

    async def send_openai(stream: bool) -> None:
        if stream:
            chunks = await client.chat.completions.create(
                model="demo",
                messages=messages,
                stream=True,
            )
            async for _ in chunks:
                pass
        else:
            await client.chat.completions.create(model="demo", messages=messages)

    return send_openai, client.close


class _Display:
    def __init__(self, out: IO[str], live: bool) -> None:
        self.out = out
        self.live: Any = None
        self._last_line = 0.0
        if live:
            try:
                from rich.console import Console  # noqa: PLC0415
                from rich.live import Live  # noqa: PLC0415
            except ImportError:
                return
            self.live = Live(console=Console(file=out), refresh_per_second=8, transient=False)

    def __enter__(self) -> _Display:
        if self.live is not None:
            self.live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live is not None:
            self.live.__exit__(None, None, None)

    def update(self, statuses: list[KeyStatus], served: dict[str, int], traffic: _Traffic,
               elapsed: float, seconds: float) -> None:  # fmt: skip
        now = time.time()
        if self.live is not None:
            self.live.update(
                self._table(statuses, served, traffic, elapsed=elapsed, seconds=seconds, now=now)
            )
            return
        if elapsed - self._last_line < 1.0:
            return
        self._last_line = elapsed
        keys = "  ".join(
            f"{s.name}:{s.health}{'(' + _rest(s, now) + ')' if s.until else ''}"
            f"/{served.get(s.fingerprint, 0)}"
            for s in statuses
        )
        print(
            f"t={elapsed:4.1f}s sent={traffic.sent} ok={traffic.ok} errors={traffic.errors} | "
            f"{keys}",
            file=self.out,
            flush=True,
        )

    @staticmethod
    def _table(statuses: list[KeyStatus], served: dict[str, int], traffic: _Traffic, *,
               elapsed: float, seconds: float, now: float) -> Any:  # fmt: skip
        from rich.table import Table  # noqa: PLC0415

        table = Table(
            title=f"sideproxy demo: {elapsed:4.1f}s of {seconds:.0f}s",
            caption=(
                "served: 200s the provider sent via the key; tries: upstream attempts\n"
                f"client: {traffic.sent} sent, {traffic.ok} ok ({traffic.streamed} streamed), "
                f"[{'red' if traffic.errors else 'green'}]{traffic.errors} errors[/]"
            ),
        )
        for column in ("key", "fp", "tier·w", "state", "rests", "served", "429s", "tries"):
            table.add_column(
                column, justify="left" if column in ("key", "state") else "right", no_wrap=True
            )
        for s in statuses:
            style = _STYLE.get(s.health, "")
            table.add_row(
                s.name, s.fingerprint, f"{s.tier}·{s.weight}", f"[{style}]{s.health}[/]",
                _rest(s, now), str(served.get(s.fingerprint, 0)), str(s.rate_limited),
                str(s.requests),
            )  # fmt: skip
        return table


async def _drive(
    *,
    send: Callable[[bool], Awaitable[None]],
    pool: ManagedCreditPool,
    fake: FakeProvider,
    revoke: str,
    display: _Display,
    seconds: float,
    rate: float,
) -> _Traffic:
    """Send ``rate`` requests per second for ``seconds`` (every 4th streamed); count outcomes."""
    traffic = _Traffic()
    tasks: set[asyncio.Task[None]] = set()

    async def one(stream: bool) -> None:
        try:
            await send(stream)
        except Exception as exc:  # the demo's whole point is counting these
            traffic.errors += 1
            traffic.last_error = f"{type(exc).__name__}: {str(exc)[:160]}"
        else:
            traffic.ok += 1
            traffic.streamed += stream

    started = time.monotonic()
    revoked = False
    try:
        while (elapsed := time.monotonic() - started) < seconds:
            if not revoked and elapsed >= seconds / 3:
                fake.revoke(revoke)  # the provider starts answering 401 for this key
                revoked = True
            while traffic.sent < int(elapsed * rate) + 1:
                task = asyncio.create_task(one(traffic.sent % 4 == 3))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                traffic.sent += 1
            display.update(pool.statuses(time.time()), fake.successes(), traffic, elapsed, seconds)
            await asyncio.sleep(0.05)
        if tasks:
            await asyncio.wait(tasks, timeout=10)
        display.update(pool.statuses(time.time()), fake.successes(), traffic, seconds, seconds)
    finally:
        for task in tasks:
            task.cancel()
    return traffic


async def run_demo(
    seconds: float = 15.0, rate: float = 10.0, out: IO[str] | None = None, live: bool | None = None
) -> int:
    """Run the demo; returns the exit code (0 iff the client saw no error)."""
    out = out or sys.stdout
    live = out.isatty() if live is None else live
    values = {name: f"sk-demo-{name}-{secrets.token_hex(8)}" for name, *_ in _KEYS}
    virtual_key = f"vk-demo-{secrets.token_hex(8)}"
    limits = {values[name]: limit for name, _, _, limit in _KEYS}
    async with FakeProvider(values.values(), limits=limits, stream_chunks=4) as fake:
        pool_input, keys, secret_data = translate.from_manifests(
            _manifests(fake.base_url, values, virtual_key)
        )
        translation = translate.translate(pool_input, keys, secret_data, time.time())
        snapshot = Snapshot(translation.table.sealed(1), translation.material, "demo manifests")
        app = create_app(ProxySettings(access_log=False), StaticSource(snapshot))
        async with running(app) as proxy_url:
            print(f"fake provider at {fake.base_url}; proxy at {proxy_url}/v1", file=out)
            send, close = _client(proxy_url + "/v1", virtual_key)
            try:
                with _Display(out, live) as display:
                    traffic = await _drive(
                        send=send,
                        pool=app[POOL],
                        fake=fake,
                        revoke=values[_REVOKED],
                        display=display,
                        seconds=seconds,
                        rate=rate,
                    )
            finally:
                with contextlib.suppress(Exception):
                    await close()
    verdict = "no errors" if traffic.errors == 0 else f"{traffic.errors} errors"
    print(
        f"done: {traffic.ok} of {traffic.sent} requests succeeded ({traffic.streamed} streamed), "
        f"{verdict}; {_REVOKED} was revoked a third of the way in and the pool routed around it.",
        file=out,
    )
    if traffic.errors:
        print(f"last error: {traffic.last_error}", file=out)
    return 0 if traffic.errors == 0 else 1
