"""A proxy stopped while streams are in flight (issue 14 item 3): when ``--shutdown-timeout``
runs out, every SSE stream still open ends with an error event the official SDKs raise as an
API error, not with a cut connection (``APIConnectionError``).

Real parts: a ``sideproxy serve`` subprocess stopped with SIGTERM, the fake provider streaming
slowly (a chunk every 50 ms, far more chunks than the grace period lets through), and the
``openai`` / ``anthropic`` SDKs as clients. The test waits on events (the first chunk arrived,
the SDK raised), never on the clock.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterable, AsyncIterator
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest
import yaml

from sideproxy.fake_provider import FakeProvider
from tests.proxy.conftest import SECRETS, K, manifests
from tests.reliability.conftest import ProxyProcess, clean_env, free_port

pytestmark = pytest.mark.timeout(90)

MESSAGES = [{"role": "user", "content": "hi"}]


@contextlib.asynccontextmanager
async def _stopping_proxy(tmp_path: Path) -> AsyncIterator[ProxyProcess]:
    """The fake provider (OpenAI-compatible and Anthropic) streaming 2,000 chunks 50 ms apart,
    and a proxy in front of it with a 0.5 s shutdown grace."""
    async with FakeProvider(SECRETS[:2], stream_chunks=2000, stream_interval=0.05) as fake:
        docs = manifests(
            {"custom": fake.base_url, "anthropic": fake.base_url},
            [K("oa-1", SECRETS[0]), K("an-1", SECRETS[1], provider="anthropic")],
        )
        pool = tmp_path / "pool.yaml"
        pool.write_text(yaml.safe_dump_all(docs))
        args = ["--file", str(pool), "--shutdown-timeout", "0.5", "--no-access-log"]
        proxy = await ProxyProcess(args, free_port(), clean_env()).start()
        try:
            yield proxy
        finally:
            await proxy.stop()


async def _stop_during(stream: AsyncIterable[Any], proxy: ProxyProcess) -> None:
    """Read the stream to its end, sending SIGTERM to the proxy once the first event arrived."""
    first = True
    async for _ in stream:
        if first:
            first = False
            assert proxy.process is not None
            proxy.process.terminate()


async def _exit_code(proxy: ProxyProcess) -> int:
    """The exit code of the one SIGTERM already sent (``stop()`` would send a second, which
    may land mid-cleanup and kill the process with the signal's default action)."""
    assert proxy.process is not None
    return await asyncio.wait_for(proxy.process.wait(), 30)


async def test_an_openai_stream_cut_by_shutdown_ends_with_an_error_event(tmp_path: Path) -> None:
    async with (
        _stopping_proxy(tmp_path) as proxy,
        openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0) as client,
    ):
        stream = await client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
        with pytest.raises(openai.APIError) as raised:
            await _stop_during(stream, proxy)
        assert not isinstance(raised.value, openai.APIConnectionError), raised.value
        assert "shutting down" in raised.value.message
        assert await _exit_code(proxy) == 0


async def test_an_anthropic_stream_cut_by_shutdown_ends_with_an_error_event(
    tmp_path: Path,
) -> None:
    async with (
        _stopping_proxy(tmp_path) as proxy,
        anthropic.AsyncAnthropic(
            base_url=proxy.url + "/anthropic", api_key="unused", max_retries=0
        ) as client,
        client.messages.stream(model="claude", max_tokens=16, messages=MESSAGES) as stream,
    ):
        with pytest.raises(anthropic.APIError) as raised:
            await _stop_during(stream, proxy)
        assert not isinstance(raised.value, anthropic.APIConnectionError), raised.value
        assert "shutting down" in raised.value.message
        assert await _exit_code(proxy) == 0
