"""Bad input: every rejection is a clear 4xx in the OpenAI error shape, decided by the proxy."""

from __future__ import annotations

import asyncio
import contextlib
import json

import aiohttp
import pytest

from sideproxy.fake_provider import FakeProvider
from sideproxy.proxy import ProxySettings, _paths
from sideproxy.proxy._errors import BadRequest, NotFound
from sideproxy.proxy._paths import parse_target
from tests.proxy.conftest import (
    VIRTUAL_KEY,
    Proxy,
    StartProxy,
    keys,
    manifests,
    raw_request,
    snapshot,
)


def _shape(body: bytes) -> dict[str, str]:
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "code"}
    assert all(isinstance(v, str) and v for v in error.values())
    return error  # type: ignore[no-any-return]


@pytest.fixture
async def guarded(fake: FakeProvider, start_proxy: StartProxy) -> Proxy:
    docs = manifests({"custom": fake.base_url}, keys(2), virtual_keys=[VIRTUAL_KEY])
    return await start_proxy(snapshot(docs), ProxySettings(max_body_size=1024))


AUTH = {"Authorization": f"Bearer {VIRTUAL_KEY}"}


async def test_malformed_json_is_400(
    guarded: Proxy, http: aiohttp.ClientSession, fake: FakeProvider
) -> None:
    resp = await http.post(
        guarded.base_url + "/chat/completions",
        data=b'{"model": "m", "messages": [',
        headers={**AUTH, "Content-Type": "application/json"},
    )
    assert resp.status == 400
    error = _shape(await resp.read())
    assert (error["type"], error["code"]) == ("invalid_request_error", "invalid_json")
    assert fake.stats() == {}  # never sent upstream


async def test_non_json_content_type_is_not_parsed(
    guarded: Proxy, http: aiohttp.ClientSession
) -> None:
    resp = await http.post(
        guarded.base_url + "/chat/completions",
        data=b"not json at all",
        headers={**AUTH, "Content-Type": "text/plain"},
    )
    assert resp.status == 400  # the provider's own 400, passed through
    assert "param" in json.loads(await resp.read())["error"]


async def test_oversized_body_is_413(guarded: Proxy, http: aiohttp.ClientSession) -> None:
    resp = await http.post(
        guarded.base_url + "/embeddings", json={"input": "x" * 2000}, headers=AUTH
    )
    assert resp.status == 413
    error = _shape(await resp.read())
    assert error["code"] == "body_too_large"


async def test_oversized_chunked_body_is_413(guarded: Proxy, http: aiohttp.ClientSession) -> None:
    async def chunks():  # type: ignore[no-untyped-def]
        for _ in range(10):
            yield b"x" * 500

    resp = await http.post(
        guarded.base_url + "/embeddings",
        data=chunks(),
        headers={**AUTH, "Content-Type": "application/octet-stream"},
    )
    assert resp.status == 413
    assert _shape(await resp.read())["code"] == "body_too_large"


async def _head_only(proxy: Proxy, key: str, *, then: bytes = b"") -> bytes:
    """A chat request's head declaring 8 MiB and asking 100-continue; ``then`` is sent after
    the first answer. Everything the proxy wrote until it closed (or 5 s of silence)."""
    host, port = proxy.url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            b"Authorization: Bearer %b\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\nExpect: 100-continue\r\n\r\n" % (key.encode(), 8 << 20)
        )
        first = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        if then:
            writer.write(then)
        with contextlib.suppress(TimeoutError):
            return first + await asyncio.wait_for(reader.read(), 5)
        return first
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def test_a_large_body_without_a_valid_virtual_key_is_401_before_it_is_read(
    fake: FakeProvider, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(
        snapshot(manifests({"custom": fake.base_url}, keys(2), virtual_keys=[VIRTUAL_KEY]))
    )
    answer = await _head_only(proxy, "not-a-key")
    assert answer.startswith(b"HTTP/1.1 401 ")  # no 100 Continue: the 8 MiB never come
    assert _shape(answer.partition(b"\r\n\r\n")[2])["code"] == "invalid_virtual_key"
    assert b"Connection: close" in answer
    assert fake.stats() == {}
    metrics = await (await http.get(proxy.url + "/metrics")).text()
    assert 'sideproxy_requests_total{provider="-",status="401"} 1.0' in metrics


async def test_a_large_body_with_a_valid_virtual_key_is_read(
    fake: FakeProvider, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy(
        snapshot(manifests({"custom": fake.base_url}, keys(2), virtual_keys=[VIRTUAL_KEY]))
    )
    start, end = b'{"model": "m", "messages": [], "pad": "', b'"}'
    body = start + b"x" * ((8 << 20) - len(start) - len(end)) + end
    answer = await _head_only(proxy, VIRTUAL_KEY, then=body)
    assert answer.startswith(b"HTTP/1.1 100 Continue")
    assert b"HTTP/1.1 200 OK" in answer  # read whole, sent upstream, answered
    assert sum(fake.stats().values()) == 1


async def test_unknown_provider_prefix_is_404(guarded: Proxy, http: aiohttp.ClientSession) -> None:
    resp = await http.post(guarded.url + "/nope/v1/chat/completions", json={}, headers=AUTH)
    assert resp.status == 404
    error = _shape(await resp.read())
    assert error["code"] == "unknown_provider"
    assert "custom" in error["message"]  # says what is served


async def test_unknown_route_is_404_in_the_error_shape(
    guarded: Proxy, http: aiohttp.ClientSession
) -> None:
    for method, path in (("GET", "/"), ("GET", "/favicon.ico"), ("POST", "/healthz")):
        resp = await http.request(method, guarded.url + path, headers=AUTH)
        assert resp.status == 404, path
        assert _shape(await resp.read())["code"] == "unknown_route"


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer vk-wrong"},
        {"x-api-key": "vk-wrong"},
        {"Authorization": VIRTUAL_KEY},
    ],
)
async def test_missing_or_wrong_virtual_key_is_401(
    guarded: Proxy, http: aiohttp.ClientSession, headers: dict[str, str]
) -> None:
    resp = await http.post(guarded.base_url + "/chat/completions", json={}, headers=headers)
    assert resp.status == 401
    error = _shape(await resp.read())
    assert (error["type"], error["code"]) == ("authentication_error", "invalid_virtual_key")


async def test_virtual_key_works_as_bearer_or_x_api_key(
    guarded: Proxy, http: aiohttp.ClientSession
) -> None:
    body = {"model": "m", "messages": []}
    for headers in (AUTH, {"x-api-key": VIRTUAL_KEY}, {"authorization": f"bearer {VIRTUAL_KEY}"}):
        resp = await http.post(guarded.base_url + "/chat/completions", json=body, headers=headers)
        assert resp.status == 200, headers


@pytest.mark.parametrize(
    "target",
    [
        "/v1/../admin",
        "/v1/chat/../../x",
        "/v1/./models",
        "/v1/%2e%2e/secret",
        "/v1/%2E%2E/secret",
        "/v1/a%2fb",
        "/v1/a%5cb",
        "/v1/%252e%252e/x",
        "/v1//evil.example/x",
        "//evil.example/v1/models",
        "/v1/a\\b",
        "/v1/models%00",
        "/v1/models%0d%0aX-Injected:%201",
        "http://evil.example/v1/models",
        "/custom/v1/../../v1/models",
    ],
)
async def test_path_tricks_are_400(guarded: Proxy, target: str, fake: FakeProvider) -> None:
    status, body = await raw_request(
        guarded.url, f"GET {target} HTTP/1.1", f"Authorization: Bearer {VIRTUAL_KEY}\r\n"
    )
    assert status == 400, target
    assert _shape(body)["code"] == "invalid_path"
    assert fake.stats() == {}


async def test_query_string_passes_through_and_path_is_appended(
    guarded: Proxy, http: aiohttp.ClientSession
) -> None:
    resp = await http.get(guarded.base_url + "/models/llama-3.1?x=1&y=%2F", headers=AUTH)
    assert resp.status == 200
    assert (await resp.json())["id"] == "llama-3.1"


async def test_no_table_yet_is_503(start_proxy: StartProxy, http: aiohttp.ClientSession) -> None:
    proxy = await start_proxy(None, ProxySettings(initial_config_timeout=0.01))
    resp = await http.get(proxy.base_url + "/models")
    assert resp.status == 503
    assert _shape(await resp.read())["code"] == "not_ready"
    assert (await http.get(proxy.url + "/readyz")).status == 503
    assert (await http.get(proxy.url + "/healthz")).status == 200


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("/v1/chat/completions", (None, "/chat/completions", "")),
        ("/v1", (None, "", "")),
        ("/v1/models?limit=2", (None, "/models", "limit=2")),
        ("/groq/v1/chat/completions", ("groq", "/chat/completions", "")),
        ("/anthropic/v1/messages?beta=true", ("anthropic", "/messages", "beta=true")),
        ("/v1/files/file-abc.jsonl/content", (None, "/files/file-abc.jsonl/content", "")),
    ],
)
def test_parse_target(raw: str, expected: tuple[str | None, str, str]) -> None:
    assert parse_target(raw) == expected


@pytest.mark.parametrize("raw", ["/", "/v2/models", "/groq/models", "/a/b/v1/models", "/v1x"])
def test_parse_target_outside_v1_is_not_found(raw: str) -> None:
    with pytest.raises(NotFound):
        parse_target(raw)


@pytest.mark.parametrize("raw", ["/v1/..", "/v1/.", "/v1/a/..", "v1/models", "/v1/a b", "/v1/é"])
def test_parse_target_rejects_unsafe(raw: str) -> None:
    with pytest.raises(BadRequest):
        parse_target(raw)


@pytest.mark.parametrize("raw", ["/v1/models?a=\x7f", "/v1/models?a=é", "/v1/models?a=1#frag"])
def test_parse_target_rejects_unsafe_queries(raw: str) -> None:
    with pytest.raises(BadRequest):
        parse_target(raw)


def test_a_path_parses_the_same_when_remembered_and_the_memory_stays_bounded() -> None:
    first = parse_target("/groq/v1/chat/completions?a=1")
    assert parse_target("/groq/v1/chat/completions?b=2") == (first[0], first[1], "b=2")
    # Remembering a path never lets an unsafe query through with it.
    with pytest.raises(BadRequest):
        parse_target("/groq/v1/chat/completions?a=\x7f")
    for n in range(3 * _paths._PASSED_MAX):
        parse_target(f"/v1/models/m{n}")
    assert len(_paths._PASSED) <= _paths._PASSED_MAX
    assert parse_target("/groq/v1/chat/completions") == ("groq", "/chat/completions", "")
