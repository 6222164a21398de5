"""The official SDKs, unchanged, as clients of the proxy in front of the fake provider."""

from __future__ import annotations

import asyncio

import anthropic
import openai
import pytest

from sideproxy.fake_provider import FakeProvider
from tests.proxy.conftest import SECRETS, VIRTUAL_KEY, K, Proxy, StartProxy, manifests, snapshot

MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture
async def both(fake: FakeProvider, start_proxy: StartProxy) -> Proxy:
    """An OpenAI-compatible default provider and Anthropic, both served by the fake, with auth."""
    docs = manifests(
        {"custom": fake.base_url, "anthropic": fake.base_url},
        [
            K("oa-1", SECRETS[0]),
            K("oa-2", SECRETS[1]),
            K("an-1", SECRETS[2], provider="anthropic"),
            K("an-2", SECRETS[3], provider="anthropic"),
        ],
        virtual_keys=[VIRTUAL_KEY],
    )
    return await start_proxy(snapshot(docs))


def _openai(proxy: Proxy) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=proxy.base_url, api_key=VIRTUAL_KEY, max_retries=0)


async def test_openai_async_chat_completions(both: Proxy) -> None:
    async with _openai(both) as client:
        reply = await client.chat.completions.create(model="m", messages=MESSAGES)
    assert reply.object == "chat.completion"
    assert reply.choices[0].message.content
    assert reply.model == "m"


async def test_openai_sync_client(both: Proxy) -> None:
    def call() -> str:
        with openai.OpenAI(base_url=both.base_url, api_key=VIRTUAL_KEY, max_retries=0) as client:
            reply = client.chat.completions.create(model="m", messages=MESSAGES)
            chunks = client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
            streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            assert streamed.startswith("word0 word1")
            return reply.choices[0].message.content or ""

    # The sync SDK blocks; the proxy lives in this event loop, so run the SDK in a thread.
    text = await asyncio.to_thread(call)
    assert text.startswith("word0")


async def test_openai_streaming(both: Proxy) -> None:
    async with _openai(both) as client:
        stream = await client.chat.completions.create(
            model="m",
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.startswith("word0 word1")
    assert chunks[-1].usage is not None
    assert any(c.choices and c.choices[0].finish_reason == "stop" for c in chunks)


async def test_openai_other_endpoints(both: Proxy) -> None:
    async with _openai(both) as client:
        models = await client.models.list()
        assert [m.id for m in models.data] == ["fake-model"]
        model = await client.models.retrieve("llama-3")
        assert model.id == "llama-3"
        embedded = await client.embeddings.create(model="e", input=["a", "bb"])
        assert len(embedded.data) == 2
        assert len(embedded.data[0].embedding) == 8  # base64 float32, decoded by the SDK
        completion = await client.completions.create(model="m", prompt="say")
        assert completion.choices[0].text


async def test_openai_raw_response_shows_provider_headers(both: Proxy) -> None:
    async with _openai(both) as client:
        raw = await client.chat.completions.with_raw_response.create(model="m", messages=MESSAGES)
    assert raw.headers["x-fake-key"]  # provider headers pass through
    assert raw.headers["content-type"].startswith("application/json")


async def test_anthropic_messages_create_and_stream(both: Proxy) -> None:
    async with anthropic.AsyncAnthropic(
        base_url=both.url + "/anthropic", api_key=VIRTUAL_KEY, max_retries=0
    ) as client:
        message = await client.messages.create(
            model="claude", max_tokens=16, messages=[{"role": "user", "content": "hi"}]
        )
        assert message.content[0].type == "text"
        assert message.stop_reason == "end_turn"
        async with client.messages.stream(
            model="claude", max_tokens=16, messages=[{"role": "user", "content": "hi"}]
        ) as stream:
            text = "".join([t async for t in stream.text_stream])
            final = await stream.get_final_message()
    assert text.startswith("word0")
    assert final.stop_reason == "end_turn"
    # Anthropic traffic went to the Anthropic keys only.
    served = {s.name: s.requests for s in both.pool.statuses(0) if s.requests}
    assert set(served) <= {"an-1", "an-2"}
    assert sum(served.values()) == 2


async def test_anthropic_sync_client(both: Proxy) -> None:
    def call() -> str:
        with anthropic.Anthropic(
            base_url=both.url + "/anthropic", api_key=VIRTUAL_KEY, max_retries=0
        ) as client:
            message = client.messages.create(
                model="claude", max_tokens=16, messages=[{"role": "user", "content": "hi"}]
            )
            block = message.content[0]
            assert block.type == "text"
            return block.text

    assert (await asyncio.to_thread(call)).startswith("word0")


async def test_wrong_virtual_key_is_an_sdk_authentication_error(both: Proxy) -> None:
    async with openai.AsyncOpenAI(base_url=both.base_url, api_key="vk-wrong", max_retries=0) as c:
        with pytest.raises(openai.AuthenticationError) as caught:
            await c.chat.completions.create(model="m", messages=MESSAGES)
    assert caught.value.status_code == 401
    assert caught.value.code == "invalid_virtual_key"
    async with anthropic.AsyncAnthropic(
        base_url=both.url + "/anthropic", api_key="vk-wrong", max_retries=0
    ) as a:
        with pytest.raises(anthropic.AuthenticationError):
            await a.messages.create(
                model="claude", max_tokens=4, messages=[{"role": "user", "content": "hi"}]
            )
