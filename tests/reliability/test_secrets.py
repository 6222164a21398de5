"""No key value leaves the proxy: not in a log line, a metric, the status endpoint, an error
body or header, or an exception the SDK raises, whatever the provider echoes back.

The pool holds random canaries (``sk-CANARY-<24 hex>``). The fake provider quotes presented keys
in its errors, in full and masked the way OpenAI does (``sk-CANAR****...****a1b2``). The proxy
replaces 401 bodies with its own and scrubs every other upstream error body (docs/reliability.md,
"Secrets"). Then the test searches everything it captured for the canaries, for any 10-character
window of their random part, and for a masked quote of their last four characters.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import yaml

from sideproxy import translate
from sideproxy.fake_provider import FakeProvider
from sideproxy.proxy import ProxySettings, QueueSource, Rejected, Snapshot
from sideproxy.proxy._logging import JsonFormatter, TextFormatter
from tests.proxy.conftest import K, StartProxy, manifests
from tests.reliability.conftest import CHAT, STREAM, clean_env, proxy_process

CANARIES = [f"sk-CANARY-{secrets.token_hex(12)}" for _ in range(4)]
ROTATED = f"sk-CANARY-{secrets.token_hex(12)}"
VIRTUAL = f"vk-CANARY-{secrets.token_hex(12)}"
ALL = [*CANARIES, ROTATED, VIRTUAL]
SPEC = {"timeouts": {"firstByteSeconds": 0.3, "idleStreamSeconds": 0.5}}


def _fragments(value: str) -> list[str]:
    random_part = value.split("-", 2)[2]
    return [
        value,
        *(random_part[i : i + 10] for i in range(len(random_part) - 9)),
        "*" + value[-4:],
    ]


FRAGMENTS = [f for value in ALL for f in _fragments(value)]


def assert_clean(texts: Iterable[str], where: str) -> int:
    n = 0
    for text in texts:
        n += 1
        for fragment in FRAGMENTS:
            assert fragment not in text, f"{where} holds key material: ...{fragment[-6:]}"
        assert "Incorrect API key provided" not in text, where
    return n


def _docs(url: str, values: list[str]) -> list[dict[str, Any]]:
    pool_keys = [K(f"key-{i}", v) for i, v in enumerate(values, 1)]
    return manifests({"custom": url}, pool_keys, virtual_keys=[VIRTUAL], spec=SPEC)


def _snapshot(docs: list[dict[str, Any]], version: int) -> Snapshot:
    pool, pool_keys, found = translate.from_manifests(docs)
    result = translate.translate(pool, pool_keys, found, time.time())
    return Snapshot(result.table.sealed(version), result.material, "test")


async def _scenarios(url: str, fake: FakeProvider, texts: list[str]) -> None:
    """A representative run: faults, echoes, bad input, auth failures. Every answer, header and
    exception text lands in ``texts``."""
    auth = {"Authorization": f"Bearer {VIRTUAL}"}

    async def post(path: str = "/v1/chat/completions", **kw: Any) -> None:
        async with aiohttp.ClientSession() as session:
            if "data" not in kw:
                kw.setdefault("json", CHAT)
            kw["headers"] = {**auth, **kw.get("headers", {})}
            async with session.post(url + path, **kw) as resp:
                texts.append((await resp.read()).decode(errors="replace"))
                texts.append(json.dumps(dict(resp.headers)))

    a, b, c, d = CANARIES
    # Providers quoting the key in every kind of error, before a healthy key answers.
    fake.add_faults(a, {"status": 429, "echo": True, "retry_after": 1})
    fake.add_faults(b, {"status": 500, "echo": True})
    fake.add_faults(c, {"status": 400, "echo": True})  # passed through, scrubbed
    fake.add_faults(d, {"status": 403, "echo": True})
    for _ in range(4):
        await post()
    for value in CANARIES:
        fake.add_faults(value, "reset", "invalid_json", "hang", "stop_early:1", "reset:1")
    for _ in range(6):
        await post()
        await post(json=STREAM)
    # Bad input, including a pool key presented as if it were a virtual key.
    await post(data=b"{", headers={"Content-Type": "application/json"})
    await post("/v1/%2e%2e/x")
    await post("/nope/v1/x")
    await post(headers={"Authorization": f"Bearer {a}"})
    await post(f"/v1/chat/completions?api_key={b}")
    await post(headers={"X-Big": c * 400})  # a header too long: aiohttp's own 400
    # The SDK: errors raised with bodies the proxy produced.
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key=VIRTUAL, max_retries=0) as sdk:
        for value in CANARIES:
            fake.add_faults(value, {"status": 503, "echo": True})
        try:
            await sdk.chat.completions.create(**CHAT)
        except openai.APIError as exc:
            texts.extend([str(exc), repr(exc.body)])
        # Every key revoked (and the provider quoting it, masked and in full).
        for mode in ("masked", "full"):
            fake.configure(echo_keys=mode)
            for value in CANARIES:
                fake.revoke(value)
            try:
                await sdk.chat.completions.create(**CHAT)
            except openai.APIError as exc:
                texts.extend([str(exc), repr(exc.body)])
        async with aiohttp.ClientSession() as session:
            for path in ("/metrics", "/sideproxy/status", "/readyz"):
                async with session.get(url + path, headers=auth) as resp:
                    texts.append(await resp.text())


async def test_in_process_nothing_leaks(
    start_proxy: StartProxy, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    texts: list[str] = []
    async with FakeProvider([*CANARIES, ROTATED], echo_keys="full") as fake:
        source = QueueSource()
        source.push(_snapshot(_docs(fake.base_url, CANARIES), 1))
        proxy = await start_proxy(source, ProxySettings(virtual_keys=(VIRTUAL,)))
        await _scenarios(proxy.url, fake, texts)
        # Reloads: a rotation, a table whose material does not match, a rejected config.
        fake.configure(restore=CANARIES)
        source.push(_snapshot(_docs(fake.base_url, [ROTATED, *CANARIES[1:]]), 2))
        bad = _snapshot(_docs(fake.base_url, CANARIES), 3)
        source.push(Snapshot(bad.table, {**bad.material, "key-2": ROTATED}, "test"))
        source.push(Rejected("file pool.yaml: mapping values are not allowed at line 12"))
        await asyncio.sleep(0.2)
        async with aiohttp.ClientSession() as session:
            async with session.get(
                proxy.url + "/sideproxy/status", headers={"x-api-key": VIRTUAL}
            ) as resp:
                status = await resp.text()
                texts.append(status)
            texts.append(await (await session.get(proxy.url + "/metrics")).text())
        assert "held_back" in status
        texts.append(repr(proxy.runtime.compiled))
        texts.append(repr(proxy.pool.statuses(time.time())))
        texts.append(str([repr(k) for k in proxy.pool._keys.values()]))
    assert len(caplog.records) > 20
    texts.append(caplog.text)
    json_fmt, text_fmt = JsonFormatter(), TextFormatter()
    texts.extend(json_fmt.format(r) for r in caplog.records)
    texts.extend(text_fmt.format(r) for r in caplog.records)
    assert_clean(texts, "an answer, log line, metric or status")
    # The scrubbing did happen (the bodies were there to scrub).
    assert any("<redacted>" in t for t in texts)
    assert any("upstream_key_rejected" in t for t in texts)


async def test_subprocess_logs_nothing_either(tmp_path: Path) -> None:
    texts: list[str] = []
    pool = tmp_path / "pool.yaml"
    async with FakeProvider([*CANARIES, ROTATED], echo_keys="full") as fake:
        args = ["--file", str(pool), "--reload-interval", "0.1", "--log-level", "DEBUG"]
        for fmt in ("json", "text"):
            pool.write_text(yaml.safe_dump_all(_docs(fake.base_url, CANARIES)))
            env = clean_env(SIDE_PROXY_LOG_FORMAT=fmt)
            async with proxy_process(args, env=env) as proxy:
                fake.configure(restore=CANARIES, echo_keys="full")
                await _scenarios(proxy.url, fake, texts)
                # A broken file (the YAML error sits on a key's line), then a rotation.
                text = pool.read_text()
                assert f"key-1: {CANARIES[0]}" in text
                pool.write_text(text.replace(f"key-1: {CANARIES[0]}", f"key-1: {CANARIES[0]}: :"))
                await asyncio.sleep(0.4)
                pool.write_text(text.replace(CANARIES[0], ROTATED))
                await asyncio.sleep(0.4)
                fake.configure(restore=CANARIES)
                await _scenarios(proxy.url, fake, texts)
            stderr = proxy.stderr.decode(errors="replace")
            assert "config rejected" in stderr
            assert "serving routing table" in stderr
            texts.append(stderr)
    assert_clean(texts, "a subprocess answer or stderr line")
