"""No key value and no virtual key, anywhere the outside world can look."""

from __future__ import annotations

import json
import logging
import sys

import aiohttp
import openai
import pytest

from sideproxy.fake_provider import FakeProvider
from sideproxy.pool import KeyConfig
from sideproxy.proxy import configure_logging
from sideproxy.proxy._compile import compile_snapshot
from sideproxy.proxy._logging import JsonFormatter, TextFormatter
from sideproxy.proxy._settings import ProxySettings
from tests.proxy.conftest import SECRETS, VIRTUAL_KEY, StartProxy, keys, manifests, snapshot

CANARIES = (*SECRETS, VIRTUAL_KEY)


def _clean(text: str, where: str) -> None:
    for canary in CANARIES:
        assert canary not in text, f"{where} leaks a key value"
    assert "SECRET" not in text, f"{where} leaks a key value"


async def test_no_key_value_in_logs_metrics_status_or_errors(
    fake: FakeProvider,
    start_proxy: StartProxy,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    docs = manifests({"custom": fake.base_url}, keys(4), virtual_keys=[VIRTUAL_KEY])
    proxy = await start_proxy(snapshot(docs), ProxySettings(virtual_keys=("vk-SECRET-standalone",)))
    fake.revoke(SECRETS[0])
    fake.add_faults(SECRETS[1], {"status": 429, "retry_after": 3}, 500)
    fake.add_faults(SECRETS[2], "reset:1")
    bodies: list[str] = []
    async with openai.AsyncOpenAI(
        base_url=proxy.base_url, api_key=VIRTUAL_KEY, max_retries=0
    ) as client:
        for _ in range(6):
            await client.chat.completions.create(model="m", messages=[])
        stream = await client.chat.completions.create(model="m", messages=[], stream=True)
        try:
            async for _ in stream:
                pass
        except openai.APIError as exc:
            bodies.append(str(exc.body))
    for secret in SECRETS:
        fake.add_faults(secret, 503)
    responses = [
        await http.post(
            proxy.base_url + "/chat/completions",
            json={},
            headers={"Authorization": f"Bearer {VIRTUAL_KEY}"},
        ),
        await http.post(
            proxy.base_url + "/chat/completions",
            json={},
            headers={"Authorization": f"Bearer {SECRETS[0]}"},
        ),
        await http.post(
            proxy.base_url + "/chat/completions",
            data=b"{",
            headers={"x-api-key": VIRTUAL_KEY, "Content-Type": "application/json"},
        ),
        await http.get(proxy.url + "/nope/v1/models", headers={"x-api-key": VIRTUAL_KEY}),
        await http.get(proxy.url + f"/v1/models?key={SECRETS[1]}", headers={"x-api-key": "wrong"}),
    ]
    for resp in responses:
        bodies.append(await resp.text())
        bodies.append(str(dict(resp.headers)))
    metrics = await (await http.get(proxy.url + "/metrics")).text()
    status = await (
        await http.get(proxy.url + "/sideproxy/status", headers={"x-api-key": VIRTUAL_KEY})
    ).text()
    assert "key-1" in metrics
    assert "key-1" in status
    _clean(metrics, "/metrics")
    _clean(status, "/sideproxy/status")
    for body in bodies:
        _clean(body, "an error body or header")
    assert caplog.records, "expected some logs"
    _clean(caplog.text, "the logs")
    json_fmt, text_fmt = JsonFormatter(), TextFormatter()
    for record in caplog.records:
        _clean(json_fmt.format(record), "a JSON log line")
        _clean(text_fmt.format(record), "a text log line")
    assert any(getattr(r, "key", None) == "key-1" for r in caplog.records)  # names are logged


def test_reprs_hold_no_secret() -> None:
    snap = snapshot(
        manifests({"custom": "http://127.0.0.1:9/v1"}, keys(2), virtual_keys=[VIRTUAL_KEY])
    )
    compiled = compile_snapshot(snap, ProxySettings(virtual_keys=("vk-SECRET-x",)), 0.0)
    for text in (
        repr(snap),
        repr(compiled),
        repr(compiled.virtual_keys),
        repr(KeyConfig("a", "b", SECRETS[0])),
    ):
        _clean(text, "a repr")


def test_json_log_format_is_one_object_per_line(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    saved, level = list(root.handlers), root.level
    configure_logging("json", "INFO", sys.stderr)
    try:
        logging.getLogger("sideproxy.test").info("hello %s", "there", extra={"key": "key-1"})
    finally:
        root.handlers[:] = saved
        root.setLevel(level)
    line = json.loads(capsys.readouterr().err.strip())
    assert line["msg"] == "hello there"
    assert line["key"] == "key-1"
    assert line["level"] == "info"
