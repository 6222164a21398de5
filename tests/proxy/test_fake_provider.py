"""The fake provider itself: real rate-limit headers, fault scripts, runtime control."""

from __future__ import annotations

import time
from datetime import datetime

import aiohttp
import pytest

from sideproxy.fake_provider import FakeProvider, Fault, RateLimit, go_duration
from sideproxy.models import fingerprint
from sideproxy.pool import parse_go_duration

CHAT = {"model": "m", "messages": []}


async def _post(
    http: aiohttp.ClientSession, url: str, key: str, **body: object
) -> aiohttp.ClientResponse:
    resp = await http.post(url, json=body or CHAT, headers={"Authorization": f"Bearer {key}"})
    await resp.read()
    return resp


async def test_openai_rate_limit_headers_and_429(http: aiohttp.ClientSession) -> None:
    async with FakeProvider(["sk-a"], limit="2/1s") as fake:
        url = fake.base_url + "/chat/completions"
        first = await _post(http, url, "sk-a")
        assert first.status == 200
        assert first.headers["x-ratelimit-limit-requests"] == "2"
        assert first.headers["x-ratelimit-remaining-requests"] == "1"
        reset = parse_go_duration(first.headers["x-ratelimit-reset-requests"])
        assert reset is not None
        assert 0 < reset <= 1
        assert (await _post(http, url, "sk-a")).headers["x-ratelimit-remaining-requests"] == "0"
        limited = await _post(http, url, "sk-a")
        assert limited.status == 429
        assert int(limited.headers["retry-after"]) >= 1
        assert 0 < int(limited.headers["retry-after-ms"]) <= 1000
        assert (await limited.json())["error"]["code"] == "rate_limit_exceeded"
        assert fake.stats() == {fingerprint("sk-a"): 3}
        assert fake.status_counts() == {fingerprint("sk-a"): {200: 2, 429: 1}}


async def test_anthropic_rate_limit_headers(http: aiohttp.ClientSession) -> None:
    async with FakeProvider(["sk-a"], limit="1/10s") as fake:
        resp = await http.post(
            fake.base_url + "/messages",
            json={"model": "c", "max_tokens": 1, "messages": []},
            headers={"x-api-key": "sk-a", "anthropic-version": "2023-06-01"},
        )
        assert resp.status == 200
        assert resp.headers["anthropic-ratelimit-requests-remaining"] == "0"
        reset = datetime.fromisoformat(resp.headers["anthropic-ratelimit-requests-reset"])
        assert time.time() < reset.timestamp() <= time.time() + 10
        resp = await http.post(
            fake.base_url + "/messages", json={"messages": []}, headers={"x-api-key": "sk-a"}
        )
        assert resp.status == 429
        assert (await resp.json())["error"]["type"] == "rate_limit_error"


async def test_keys_unknown_revoked_and_open_mode(http: aiohttp.ClientSession) -> None:
    async with FakeProvider(["sk-a", "sk-b"], revoked=["sk-b"]) as fake:
        url = fake.base_url + "/chat/completions"
        assert (await _post(http, url, "sk-a")).status == 200
        assert (await _post(http, url, "sk-b")).status == 401
        assert (await _post(http, url, "sk-unknown")).status == 401
        assert (await http.post(url, json=CHAT)).status == 401
    async with FakeProvider() as open_fake:
        assert (
            await _post(http, open_fake.base_url + "/chat/completions", "anything")
        ).status == 200


async def test_fault_script_is_consumed_in_order(http: aiohttp.ClientSession) -> None:
    async with FakeProvider(["sk-a"], faults={"sk-a": [503, "delay:0.2", "invalid_json"]}) as fake:
        url = fake.base_url + "/chat/completions"
        assert (await _post(http, url, "sk-a")).status == 503
        started = time.monotonic()
        assert (await _post(http, url, "sk-a")).status == 200
        assert time.monotonic() - started >= 0.2
        broken = await _post(http, url, "sk-a")
        assert broken.status == 200
        with pytest.raises(ValueError, match=r"Expecting|Unterminated|JSON"):
            await broken.json()
        assert (await _post(http, url, "sk-a")).status == 200  # script spent: normal again


async def test_reset_mid_body(http: aiohttp.ClientSession) -> None:
    async with FakeProvider(["sk-a"], faults={"sk-a": ["reset"]}) as fake:
        with pytest.raises(aiohttp.ClientPayloadError):
            await _post(http, fake.base_url + "/chat/completions", "sk-a")


async def test_streams_and_stream_faults(http: aiohttp.ClientSession) -> None:
    async with FakeProvider(["sk-a"], stream_chunks=3) as fake:
        url = fake.base_url + "/chat/completions"
        body = await _post(http, url, "sk-a", **CHAT, stream=True)
        text = (await body.read()).decode()
        assert text.count("data: ") == 5  # 3 content chunks, the finish chunk, [DONE]
        assert text.endswith("data: [DONE]\n\n")
        fake.add_faults("sk-a", "stop_early:1", "error_frame:2")
        early = (await (await _post(http, url, "sk-a", **CHAT, stream=True)).read()).decode()
        assert early.count("data: ") == 1
        assert "[DONE]" not in early
        errored = (await (await _post(http, url, "sk-a", **CHAT, stream=True)).read()).decode()
        assert errored.count("data: ") == 3
        assert '"error"' in errored.splitlines()[-2]


async def test_anthropic_event_stream(http: aiohttp.ClientSession) -> None:
    async with FakeProvider(["sk-a"], stream_chunks=2) as fake:
        resp = await http.post(
            fake.base_url + "/messages",
            json={"model": "c", "max_tokens": 5, "messages": [], "stream": True},
            headers={"x-api-key": "sk-a"},
        )
        text = (await resp.read()).decode()
    events = [line[7:] for line in text.splitlines() if line.startswith("event: ")]
    assert events == [
        "message_start", "content_block_start", "ping", "content_block_delta",
        "content_block_delta", "content_block_stop", "message_delta", "message_stop",
    ]  # fmt: skip


async def test_runtime_control_endpoints(http: aiohttp.ClientSession) -> None:
    async with FakeProvider(["sk-SECRET-a", "sk-SECRET-b"]) as fake:
        url = fake.base_url + "/chat/completions"
        fp_b = fingerprint("sk-SECRET-b")
        resp = await http.post(
            fake.url + "/_fake/config",
            json={"limit": "1/10s", "revoke": [fp_b], "faults": {"sk-SECRET-a": ["500"]}},
        )
        assert resp.status == 200
        assert (await _post(http, url, "sk-SECRET-a")).status == 500  # the fault
        assert (await _post(http, url, "sk-SECRET-a")).status == 200
        assert (await _post(http, url, "sk-SECRET-a")).status == 429  # the new limit
        assert (await _post(http, url, "sk-SECRET-b")).status == 401  # revoked by fingerprint
        stats = await (await http.get(fake.url + "/_fake/stats")).text()
        detail = await (await http.get(fake.url + "/_fake/stats/status")).text()
        config = await (await http.get(fake.url + "/_fake/config")).text()
        for text in (stats, detail, config):
            assert "SECRET" not in text
        assert (await (await http.get(fake.url + "/_fake/stats")).json()) == {
            fingerprint("sk-SECRET-a"): 3,
            fp_b: 1,
        }
        assert (await http.post(fake.url + "/_fake/reset")).status == 200
        assert fake.stats() == {}
        bad = await http.post(fake.url + "/_fake/config", json={"limit": "lots"})
        assert bad.status == 400


def test_limit_fault_and_duration_parsing() -> None:
    assert RateLimit.parse("5/1s") == RateLimit(5, 1.0)
    assert RateLimit.parse("5/500ms") == RateLimit(5, 0.5)
    assert RateLimit.parse("100/1m") == RateLimit(100, 60.0)
    assert RateLimit.parse("3") == RateLimit(3, 1.0)
    assert RateLimit.parse(None) is None
    with pytest.raises(ValueError, match="like"):
        RateLimit.parse("x/y")
    assert Fault.parse(429) == Fault("status", status=429)
    assert Fault.parse("reset:3") == Fault("reset", after=3)
    assert Fault.parse({"action": "delay", "seconds": 0.5}).delay == 0.5
    assert Fault.parse({"status": 503, "retry_after": 2}) == Fault("status", 503, retry_after=2)
    with pytest.raises(ValueError, match="unknown fault"):
        Fault.parse("explode")
    for seconds in (0.012, 0.5, 1.2, 59.0, 360.0, 3725.5):
        assert parse_go_duration(go_duration(seconds)) == pytest.approx(seconds, abs=0.001)
    assert go_duration(360) == "6m0s"
    assert go_duration(1.2) == "1.2s"
    assert go_duration(0.012) == "12ms"


# --------------------------------------------------------------------------- limits as providers


async def test_per_key_per_model_windows(http: aiohttp.ClientSession) -> None:
    """Each (key, model) has its own window; other models and other keys are untouched."""
    async with FakeProvider(["sk-a", "sk-b"], model_limits={"big": "2/1m"}) as fake:
        url = fake.base_url + "/chat/completions"
        big = {"model": "big", "messages": []}
        first = await _post(http, url, "sk-a", **big)
        assert first.headers["x-ratelimit-remaining-requests"] == "1"
        assert (await _post(http, url, "sk-a", **big)).status == 200
        limited = await _post(http, url, "sk-a", **big)
        assert limited.status == 429
        assert 50 <= int(limited.headers["retry-after"]) <= 60
        reset = parse_go_duration(limited.headers["x-ratelimit-reset-requests"])
        assert reset is not None
        assert 50 < reset <= 60
        assert (await _post(http, url, "sk-a", model="small", messages=[])).status == 200
        assert (await _post(http, url, "sk-b", **big)).status == 200
        assert fake.calls_of("sk-a", model="big", status=429) == 1


async def test_out_of_quota_until_replenished(http: aiohttp.ClientSession) -> None:
    async with FakeProvider(["sk-a"], out_of_quota=["sk-a"]) as fake:
        url = fake.base_url + "/chat/completions"
        answer = await http.post(url, json=CHAT, headers={"Authorization": "Bearer sk-a"})
        body = await answer.json()
        assert answer.status == 429
        assert body["error"]["code"] == "insufficient_quota"
        assert "retry-after" not in answer.headers  # no reset: money, not time
        models = await http.get(fake.base_url + "/models", headers={"x-api-key": "sk-a"})
        assert models.status == 429  # the token-free probe sees it too
        control = await http.post(fake.url + "/_fake/config", json={"replenish": ["sk-a"]})
        assert control.status == 200
        assert (await _post(http, url, "sk-a")).status == 200
        models = await http.get(fake.base_url + "/models", headers={"x-api-key": "sk-a"})
        assert models.status == 200


async def test_groq_daily_limit(http: aiohttp.ClientSession) -> None:
    async with FakeProvider(["sk-a"], daily_limits={"sk-a": 2}) as fake:
        url = fake.base_url + "/chat/completions"
        assert (await _post(http, url, "sk-a")).status == 200
        assert (await _post(http, url, "sk-a")).status == 200
        answer = await http.post(url, json=CHAT, headers={"Authorization": "Bearer sk-a"})
        body = await answer.json()
        assert answer.status == 429
        assert "on requests per day (RPD)" in body["error"]["message"]
        assert answer.headers["x-ratelimit-remaining-requests"] == "0"
        fake.replenish("sk-a")
        assert (await _post(http, url, "sk-a")).status == 200


async def test_models_listed_per_key(http: aiohttp.ClientSession) -> None:
    async with FakeProvider(["sk-a", "sk-b"], model_limits={"big": "3/1m"}) as fake:
        fake.configure(key_models={"sk-b": ["small"]})

        async def listed(key: str) -> list[str]:
            async with http.get(
                fake.base_url + "/models", headers={"Authorization": f"Bearer {key}"}
            ) as resp:
                return [m["id"] for m in (await resp.json())["data"]]

        assert await listed("sk-a") == ["fake-model", "big"]
        assert await listed("sk-b") == ["small"]
