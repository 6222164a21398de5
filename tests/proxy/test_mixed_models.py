"""Issue 11's done-when case, as a new user would try it: the official openai SDK through a real
``sideproxy serve`` (a subprocess with a pool file) in front of a provider that limits per model.

4 keys; the provider allows 3 requests per minute per key on ``big`` and has no limit on
``small``; one key is out of quota; ``cooldown.defaultSeconds: 2``; ``big`` and ``small``
alternately at concurrency 8. Expected: no client error on ``small``; at most 2 upstream 429s
per key per window on ``big``; the out-of-quota key sent at most 2 client requests in a minute
(it is probed, token-free, instead) and back within one probe after its quota is restored.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import socket
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import openai
import pytest
import yaml

from sideproxy.fake_provider import FakeProvider
from sideproxy.models import fingerprint
from tests.proxy.conftest import SECRETS, keys, manifests

WINDOW = 60.0
SPEC = {
    "cooldown": {"defaultSeconds": 2},
    # Short back-offs instead of waiting minutes: the exhausted key is probed every 2-4 s.
    "quota": {"backoffSeconds": 2, "maxBackoffSeconds": 4},
}
WORKERS, PER_WORKER = 8, 16
OUT = SECRETS[3]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.asynccontextmanager
async def _serve(pool_file: Path) -> AsyncIterator[str]:
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SIDE_", "KUBECONFIG"))}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sideproxy", "serve", "--port", str(port), "--file", str(pool_file),
        "--no-access-log",
        env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(400):
                with contextlib.suppress(aiohttp.ClientError):
                    if (await http.get(url + "/readyz")).status == 200:
                        break
                await asyncio.sleep(0.05)
            else:
                pytest.fail("sideproxy serve never became ready")
        yield url
    finally:
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), 15)
        except TimeoutError:
            process.kill()
            await process.wait()


async def _load(url: str) -> Counter[tuple[str, str]]:
    """(model, "ok" or the error's status) for every request."""
    seen: Counter[tuple[str, str]] = Counter()
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="-", max_retries=0) as client:

        async def worker(n: int) -> None:
            for i in range(PER_WORKER):
                model = "big" if (n + i) % 2 else "small"
                try:
                    await client.chat.completions.create(
                        model=model, messages=[{"role": "user", "content": "hi"}]
                    )
                    seen[model, "ok"] += 1
                except openai.APIStatusError as exc:
                    seen[model, str(exc.status_code)] += 1

        await asyncio.gather(*(worker(n) for n in range(WORKERS)))
    return seen


async def _health(http: aiohttp.ClientSession, url: str, name: str) -> str:
    async with http.get(url + "/sideproxy/status") as resp:
        body = await resp.json()
    return str(next(k["health"] for k in body["keys"] if k["name"] == name))


class Run:
    """What one mixed-model run through ``sideproxy serve`` saw."""

    def __init__(self) -> None:
        self.seen: Counter[tuple[str, str]] = Counter()
        self.windows = 1
        self.big_429s: dict[str, int] = {}  # upstream 429s on "big", per key fingerprint
        self.out_posts = 0  # client requests that reached the out-of-quota key
        self.out_others: list[tuple[str, str]] = []  # everything else it got: (method, path)
        self.probes_after_restore = -1  # answers to that key after it was replenished


async def _run(tmp_path: Path) -> Run:
    run = Run()
    async with FakeProvider(SECRETS, model_limits={"big": "3/1m"}, out_of_quota=[OUT]) as fake:
        pool_file = tmp_path / "pool.yaml"
        pool_file.write_text(
            yaml.safe_dump_all(manifests({"custom": fake.base_url}, keys(4), spec=SPEC))
        )
        async with _serve(pool_file) as url:
            started = time.time()
            run.seen = await _load(url)
            run.windows = math.ceil((time.time() - started) / WINDOW)
            run.big_429s = {
                fingerprint(s): fake.calls_of(s, model="big", status=429) for s in SECRETS[:3]
            }
            out = [c for c in fake.calls if c[1] == fingerprint(OUT)]
            run.out_posts = sum(1 for c in out if c[2] == "POST")
            run.out_others = [(c[2], c[3]) for c in out if c[2] != "POST"]
            async with aiohttp.ClientSession() as http:
                assert await _health(http, url, "key-4") == "exhausted"
                restored = time.time()
                fake.replenish(OUT)
                for _ in range(400):
                    if await _health(http, url, "key-4") == "ready":
                        break
                    await asyncio.sleep(0.05)
                else:
                    pytest.fail("the replenished key never came back")
            run.probes_after_restore = fake.calls_of(OUT, since=restored)
    return run


async def test_mixed_models_through_sideproxy_serve(tmp_path: Path) -> None:
    run = await _run(tmp_path)
    assert run.seen["small", "ok"] == WORKERS * PER_WORKER // 2, run.seen  # no client error
    assert run.seen["big", "ok"] >= 9, run.seen  # 3 keys x 3 per window: the capacity is used
    # The out-of-quota key: at most 2 client requests a minute; otherwise only probes.
    assert run.out_posts <= 2 * run.windows
    assert all(method == "GET" and path.endswith("/models") for method, path in run.out_others)
    assert run.probes_after_restore == 1  # back within one probe after its quota returned


async def test_at_most_two_upstream_429s_per_key_per_window(tmp_path: Path) -> None:
    run = await _run(tmp_path)
    assert all(n <= 2 * run.windows for n in run.big_429s.values()), run.big_429s
