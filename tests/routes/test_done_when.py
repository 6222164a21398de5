"""Issue 13's done-when, through a real ``sideproxy serve --file`` with the official SDKs and
fake providers that are real HTTP servers (one per provider endpoint).

Each test asserts on what every upstream received (``FakeProvider.calls``: the model named in
each request body it answered), so "the client's name never reaches a provider" is checked
where it matters: on the providers' side.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import openai
import pytest
import yaml

from tests.routes.conftest import Endpoint, Served, fakes, pool_file, serve

LLAMA, MINI = "llama-3.1-8b-instant", "gpt-4o-mini"
FAST = {
    "model": "fast",
    "targets": [{"provider": "groq", "model": LLAMA}, {"provider": "openai", "model": MINI}],
}
GROQ_ONLY = {"model": "fast", "targets": [{"provider": "groq", "model": LLAMA}]}
RATE_LIMITED = {"action": "status", "status": 429, "retry_after": 120}
HEADER = "x-sideproxy-route-target"


def _groq_openai() -> tuple[Endpoint, Endpoint]:
    return (
        Endpoint("groq", ("gsk_CANARY_groq_1", "gsk_CANARY_groq_2")),
        Endpoint("openai", ("sk-CANARY_openai_1",)),
    )


async def _status(served: Served) -> dict[str, Any]:
    async with (
        aiohttp.ClientSession() as http,
        http.get(served.url + "/sideproxy/status") as resp,
    ):
        body: dict[str, Any] = await resp.json()
        return body


async def _chat(client: openai.AsyncOpenAI, model: str) -> tuple[str, str]:
    """(route target header, model in the answer) of one non-streamed chat."""
    raw = await client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": "hi"}]
    )
    return raw.headers[HEADER], raw.parse().model


async def _chat_stream(client: openai.AsyncOpenAI, model: str) -> tuple[str, str, int]:
    """(route target header, model in the chunks, chunks) of one streamed chat."""
    async with client.chat.completions.with_streaming_response.create(
        model=model, messages=[{"role": "user", "content": "hi"}], stream=True
    ) as resp:
        header = resp.headers[HEADER]
        chunks = [chunk async for chunk in await resp.parse()]
    models = {c.model for c in chunks}
    assert len(models) == 1
    return header, models.pop(), len(chunks)


async def test_every_groq_key_cooling_sends_all_of_fast_to_openai(tmp_path: Path) -> None:
    async with (
        fakes(*_groq_openai()) as (groq, openai_),
        serve(tmp_path, pool_file((groq, openai_), [FAST], default="groq")) as served,
    ):
        for value in groq.keys:
            groq.fake.add_faults(value, RATE_LIMITED)
        async with openai.AsyncOpenAI(
            base_url=served.base_url, api_key="unused", max_retries=0
        ) as client:
            # The first request meets both Groq 429s and is answered by OpenAI.
            assert await _chat(client, "fast") == ("openai/gpt-4o-mini", MINI)
            status = await _status(served)
            keys = {k["name"]: k for k in status["keys"]}
            for name in ("groq-0", "groq-1"):
                assert [m for m, _ in keys[name]["cooling"]] == [LLAMA], keys[name]
            # The route shows which target serves now, and when the other may again.
            (route,) = status["routes"]
            assert route["model"] == "fast"
            groq_target, openai_target = route["targets"]
            assert (groq_target["provider"], groq_target["available"]) == ("groq", False)
            assert groq_target["until"] > status["now"] + 60  # retry-after: 120
            assert (openai_target["provider"], openai_target["available"]) == ("openai", True)
            assert openai_target["until"] is None
            groq_before = len(groq.fake.calls)

            plain = await asyncio.gather(*(_chat(client, "fast") for _ in range(30)))
            streamed = await asyncio.gather(*(_chat_stream(client, "fast") for _ in range(10)))

        assert set(plain) == {("openai/gpt-4o-mini", MINI)}
        assert {(h, m) for h, m, _ in streamed} == {("openai/gpt-4o-mini", MINI)}
        assert all(n > 1 for _, _, n in streamed)
        assert len(groq.fake.calls) == groq_before == 2  # no request reached a cooling key
        # Each upstream saw only its own model names, never the client's "fast".
        assert groq.models_received() == [LLAMA, LLAMA]
        assert openai_.models_received() == [MINI] * 41
        assert {c[5] for c in openai_.fake.calls} == {200}

        logs = await served.logs()
    access = [json.loads(line) for line in logs.splitlines() if '"sideproxy.access"' in line]
    assert len(access) == 41  # 1 + 30 + 10: every client request logged its target
    assert {a.get("route_target") for a in access} == {"openai/gpt-4o-mini"}


async def test_groq_serves_fast_while_it_can_and_a_plain_model_routes_as_today(
    tmp_path: Path,
) -> None:
    async with (
        fakes(*_groq_openai()) as (groq, openai_),
        serve(tmp_path, pool_file((groq, openai_), [FAST], default="groq")) as served,
    ):
        async with openai.AsyncOpenAI(
            base_url=served.base_url, api_key="unused", max_retries=0
        ) as client:
            assert await _chat(client, "fast") == ("groq/llama-3.1-8b-instant", LLAMA)
            assert (await _chat_stream(client, "fast"))[:2] == ("groq/" + LLAMA, LLAMA)
            # Not a route: the default provider, the client's own name, no route header.
            raw = await client.chat.completions.with_raw_response.create(
                model="llama-3.3-70b-versatile", messages=[]
            )
            assert HEADER not in raw.headers
            # An explicit provider prefix names that provider: no route applies either.
            async with openai.AsyncOpenAI(
                base_url=served.url + "/openai/v1", api_key="unused", max_retries=0
            ) as explicit:
                raw = await explicit.chat.completions.with_raw_response.create(
                    model="gpt-4o", messages=[]
                )
                assert HEADER not in raw.headers
            async with aiohttp.ClientSession() as http:
                metrics = await (await http.get(served.url + "/metrics")).text()
        assert groq.models_received() == [LLAMA, LLAMA, "llama-3.3-70b-versatile"]
        assert openai_.models_received() == ["gpt-4o"]
        label = 'sideproxy_route_requests_total{route="fast",status="200",target="groq/'
        assert label + LLAMA + '"} 2.0' in metrics


async def test_weights_within_an_order_share_load(tmp_path: Path) -> None:
    a = Endpoint("vllm-a", ("local-CANARY_a",), type="openai")
    b = Endpoint("vllm-b", ("local-CANARY_b",), type="custom")
    local = {
        "model": "local",
        "targets": [
            {"provider": "vllm-a", "model": "llama3.1:8b", "order": 0, "weight": 3},
            {"provider": "vllm-b", "model": "meta-llama/Llama-3.1-8B", "order": 0},
        ],
    }
    async with (
        fakes(a, b) as (a, b),
        serve(tmp_path, pool_file((a, b), [local], "vllm-a")) as s,
        openai.AsyncOpenAI(base_url=s.base_url, api_key="x", max_retries=0) as client,
    ):
        headers = [(await _chat(client, "local"))[0] for _ in range(40)]
    # Weight 3 : 1, exact over any four picks (+-1): 30 and 10 of 40.
    assert Counter(headers) == {"vllm-a/llama3.1:8b": 30, "vllm-b/meta-llama/Llama-3.1-8B": 10}
    for start in range(0, 40, 4):
        window = Counter(headers[start : start + 4])
        assert abs(window["vllm-a/llama3.1:8b"] - 3) <= 1
    assert set(a.models_received()) == {"llama3.1:8b"}
    assert set(b.models_received()) == {"meta-llama/Llama-3.1-8B"}


async def test_anthropic_sdk_routes_among_anthropic_targets(tmp_path: Path) -> None:
    first = Endpoint("anthropic", ("sk-ant-CANARY_a",))
    second = Endpoint("claude-eu", ("sk-ant-CANARY_b",), type="anthropic")
    groq = Endpoint("groq", ("gsk_CANARY_groq_1",))
    claude = {
        "model": "claude",
        "targets": [
            {"provider": "anthropic", "model": "claude-3-5-haiku-latest"},
            {"provider": "claude-eu", "model": "claude-haiku-eu"},
            {"provider": "groq", "model": LLAMA},  # never for /v1/messages
        ],
    }
    async with (
        fakes(first, second, groq) as (first, second, groq),
        serve(tmp_path, pool_file((first, second, groq), [claude, GROQ_ONLY], "groq")) as served,
    ):
        first.fake.add_faults(first.keys[0], RATE_LIMITED)
        async with anthropic.AsyncAnthropic(
            base_url=served.url, api_key="unused", max_retries=0
        ) as client:
            raw = await client.messages.with_raw_response.create(
                model="claude", max_tokens=16, messages=[{"role": "user", "content": "hi"}]
            )
            assert raw.headers[HEADER] == "claude-eu/claude-haiku-eu"
            assert (await raw.parse()).model == "claude-haiku-eu"
            async with client.messages.with_streaming_response.create(
                model="claude",
                max_tokens=16,
                messages=[{"role": "user", "content": "hi"}],
                stream=True,
            ) as resp:
                assert resp.headers[HEADER] == "claude-eu/claude-haiku-eu"
                events = [event.type async for event in await resp.parse()]
            assert events[-1] == "message_stop"
            # A route with no Anthropic target: 404 model_not_found, no upstream attempt.
            with pytest.raises(anthropic.NotFoundError, match="no target for Anthropic"):
                await client.messages.create(
                    model="fast", max_tokens=16, messages=[{"role": "user", "content": "hi"}]
                )
        async with openai.AsyncOpenAI(
            base_url=served.base_url, api_key="unused", max_retries=0
        ) as client:
            # OpenAI-shaped requests for claude go to its OpenAI-compatible target only.
            assert await _chat(client, "claude") == ("groq/" + LLAMA, LLAMA)
    assert first.models_received() == ["claude-3-5-haiku-latest"]  # the 429
    assert second.models_received() == ["claude-haiku-eu", "claude-haiku-eu"]
    assert groq.models_received() == [LLAMA]


async def test_a_bad_route_never_replaces_the_good_table(tmp_path: Path) -> None:
    async with fakes(*_groq_openai()) as (groq, openai_):
        docs = pool_file((groq, openai_), [FAST], default="groq")
        async with serve(tmp_path, docs, {"SIDE_POOL_FILE_POLL_SECONDS": "0.1"}) as served:
            bad = json.loads(json.dumps(docs))
            bad[0]["spec"]["routes"][0]["targets"][1]["model"] = "gpt-3.5-turbo"
            for doc in bad:  # the OpenAI key may serve gpt-4o* only: nothing serves the target
                if doc.get("kind") == "PoolKey" and doc["spec"]["provider"] == "openai":
                    doc["spec"]["models"] = ["gpt-4o*"]
            (tmp_path / "pool.yaml").write_text(yaml.safe_dump_all(bad))
            async with aiohttp.ClientSession() as http:
                for _ in range(200):
                    metrics = await (await http.get(served.url + "/metrics")).text()
                    if 'sideproxy_config_reloads_total{result="rejected"} 1.0' in metrics:
                        break
                    await asyncio.sleep(0.05)
                else:
                    pytest.fail("the bad pool file was never rejected")
            for value in groq.keys:
                groq.fake.add_faults(value, RATE_LIMITED)
            async with openai.AsyncOpenAI(
                base_url=served.base_url, api_key="unused", max_retries=0
            ) as client:
                assert await _chat(client, "fast") == ("openai/gpt-4o-mini", MINI)
            logs = await served.logs()
    assert "route fast: no PoolKey of provider 'openai' may serve model 'gpt-3.5-turbo'" in logs
    assert "gpt-3.5-turbo" not in openai_.models_received()
