"""Routes keep the attempt rules of today (in-process proxy over real sockets, fake providers
as real servers): the next target only before the first byte reached the client and only for a
replayable request; JSON bodies only."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import openai
import pytest

from sideproxy.fake_provider import FakeProvider
from tests.proxy.conftest import K, Proxy, StartProxy, http, manifests, snapshot, start_proxy

__all__ = ["http", "start_proxy"]  # fixtures, used by name

ROUTE = {
    "model": "fast",
    "targets": [
        {"provider": "groq", "model": "llama-3.1-8b-instant"},
        {"provider": "openai", "model": "gpt-4o-mini"},
    ],
}
GROQ, OPENAI = "gsk_CANARY_routes_groq", "sk-CANARY_routes_openai"


@pytest.fixture
async def two() -> AsyncIterator[tuple[FakeProvider, FakeProvider]]:
    async with FakeProvider([GROQ]) as groq, FakeProvider([OPENAI]) as openai_:
        yield groq, openai_


@pytest.fixture
async def routed(two: tuple[FakeProvider, FakeProvider], start_proxy: StartProxy) -> Proxy:
    groq, openai_ = two
    docs = manifests(
        {"groq": groq.base_url, "openai": openai_.base_url},
        [K("g", GROQ, provider="groq"), K("o", OPENAI, provider="openai")],
        spec={"routes": [ROUTE]},
    )
    return await start_proxy(snapshot(docs))


def _models(fake: FakeProvider) -> list[str | None]:
    return [call[4] for call in fake.calls]


async def test_a_5xx_moves_a_replayable_request_to_the_next_target(
    routed: Proxy, two: tuple[FakeProvider, FakeProvider]
) -> None:
    groq, openai_ = two
    groq.add_faults(GROQ, 503)
    async with openai.AsyncOpenAI(base_url=routed.base_url, api_key="x", max_retries=0) as c:
        raw = await c.chat.completions.with_raw_response.create(model="fast", messages=[])
    assert raw.headers["x-sideproxy-route-target"] == "openai/gpt-4o-mini"
    assert (_models(groq), _models(openai_)) == (["llama-3.1-8b-instant"], ["gpt-4o-mini"])


async def test_a_stream_that_breaks_after_its_first_byte_is_not_retried(
    routed: Proxy, two: tuple[FakeProvider, FakeProvider]
) -> None:
    groq, openai_ = two
    groq.add_faults(GROQ, "reset:2")
    async with openai.AsyncOpenAI(base_url=routed.base_url, api_key="x", max_retries=0) as c:
        stream = await c.chat.completions.create(model="fast", messages=[], stream=True)
        with pytest.raises(openai.APIError):
            async for _ in stream:
                pass
    assert _models(openai_) == []  # the client had bytes from Groq: no second target


async def test_a_route_takes_json_bodies_only(routed: Proxy, http: aiohttp.ClientSession) -> None:
    form = aiohttp.FormData()
    form.add_field("model", "fast")
    form.add_field("file", b"\x00" * 64, filename="a.mp3")
    async with http.post(routed.base_url + "/audio/transcriptions", data=form) as resp:
        assert resp.status == 400
        body = await resp.json()
    assert "routes serve JSON requests only" in body["error"]["message"]


async def test_every_target_resting_answers_429_with_the_earliest_recovery(
    routed: Proxy, two: tuple[FakeProvider, FakeProvider], http: aiohttp.ClientSession
) -> None:
    groq, openai_ = two
    groq.add_faults(GROQ, {"action": "status", "status": 429, "retry_after": 300})
    openai_.add_faults(OPENAI, {"action": "status", "status": 429, "retry_after": 40})
    body = {"model": "fast", "messages": []}
    async with http.post(routed.base_url + "/chat/completions", json=body) as resp:
        assert resp.status == 429  # the last target's own answer, with the pool's advice
        assert resp.headers["x-sideproxy-route-target"] == "openai/gpt-4o-mini"
        assert 30 <= int(resp.headers["Retry-After"]) <= 40
    async with http.post(routed.base_url + "/chat/completions", json=body) as resp:
        assert resp.status == 429
        assert 30 <= int(resp.headers["Retry-After"]) <= 40  # OpenAI's, the earlier one
        error = (await resp.json())["error"]
    assert error["code"] == "no_key_available"
    assert "no key of any target of route fast is available" in error["message"]
    assert (len(groq.calls), len(openai_.calls)) == (1, 1)  # nothing sent to a resting key
