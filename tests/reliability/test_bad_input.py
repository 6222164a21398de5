"""Hostile and broken clients: every attack gets a clear 4xx, nothing reaches a host other than
the configured provider, nothing crashes, and a well-behaved client keeps getting 200s.

Each attack runs while a :class:`~tests.reliability.conftest.Steady` client shares the proxy;
an "attacker" listener on another loopback port must never see a single connection, and the
fake provider's record of what arrived (``recent``) must hold only clean requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest

from sideproxy.fake_provider import FakeProvider
from sideproxy.proxy import ProxySettings
from tests.proxy.conftest import VIRTUAL_KEY, Proxy, StartProxy, keys, manifests, raw_request
from tests.proxy.conftest import snapshot as make_snapshot
from tests.reliability.conftest import Attacker, error_of, open_fds, settle, steady

AUTH = {"Authorization": f"Bearer {VIRTUAL_KEY}"}
AUTH_LINE = f"Authorization: Bearer {VIRTUAL_KEY}\r\n"
# 256 KiB: room for the 200 KB nested-JSON body below, small enough to test 413 quickly.
SETTINGS = ProxySettings(
    max_body_size=256 * 1024,
    max_headers=64,
    body_read_timeout=0.5,
    keepalive_timeout=1.0,
)
# Slow-client tests wait for the proxy's answer or close (the event) in 0.1 s steps, at most
# this many: far beyond every timeout configured here, so only a proxy that never cuts a slow
# client off fails, however busy the machine.
_PATIENCE = 300
CLEAN_PATH = re.compile(r"^/v1/[a-z/]+(\?[A-Za-z0-9=&%.]*)?$")


@pytest.fixture
async def guarded(fake: FakeProvider, start_proxy: StartProxy) -> Proxy:
    docs = manifests({"custom": fake.base_url}, keys(2), virtual_keys=[VIRTUAL_KEY])
    return await start_proxy(make_snapshot(docs), SETTINGS)


def _clean_arrivals(fake: FakeProvider) -> None:
    """Everything the provider ever got was a plain request on its own paths."""
    for method, path, headers in fake.recent:
        assert CLEAN_PATH.match(path), (method, path)
        names = {name.lower() for name, _ in headers}
        assert "x-injected" not in names, headers
        for _, value in headers:
            assert "\r" not in value
            assert "\n" not in value


async def _open(url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = url.removeprefix("http://").split(":")
    return await asyncio.open_connection(host, int(port))


async def _first_answer(url: str, data: bytes) -> bytes:
    """Send ``data``, read one response (head + Content-Length body), hang up."""
    reader, writer = await _open(url)
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(5):
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(re.search(rb"Content-Length: (\d+)", head)[1])  # type: ignore[index]
            return head + await reader.readexactly(length)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


# The request target, and what the proxy must answer: status and error code. Rows whose code
# is None are refused by aiohttp's HTTP parser before the app sees them; they still get the
# OpenAI error shape (sideproxy.proxy._server.ProxyRunner), whatever the code.
TARGETS = [
    ("GET /v1/../../x", 400, "invalid_path"),
    ("GET /v1/chat/../../../x", 400, "invalid_path"),
    ("GET /v1/%2e%2e/%2e%2e/x", 400, "invalid_path"),
    ("GET /v1/%2E%2E/models", 400, "invalid_path"),
    ("GET /v1/%252e%252e/x", 400, "invalid_path"),
    ("GET /v1/.%2e/x", 400, "invalid_path"),
    ("GET //{attacker}/v1/models", 400, "invalid_path"),
    ("GET /v1//{attacker}/models", 400, "invalid_path"),
    ("GET http://{attacker}/v1/chat/completions", 400, "invalid_path"),
    ("POST http://{attacker}/v1/chat/completions", 400, "invalid_path"),
    ("GET https://{attacker}/v1/models", 400, "invalid_path"),
    ("GET {attacker}/v1/models", 400, None),
    ("CONNECT {attacker}", 404, "unknown_route"),
    ("OPTIONS *", 404, "unknown_route"),
    ("GET /v1@{attacker}/models", 404, "unknown_route"),
    ("GET /@{attacker}/v1/models", 404, "unknown_provider"),
    ("GET /v1\\..\\..\\x", 400, "invalid_path"),
    ("GET /v1/\\\\{attacker}/x", 400, "invalid_path"),
    ("GET /v1/%5c%5c{attacker}/x", 400, "invalid_path"),
    ("GET /v1/models%0d%0aHost:%20{attacker}", 400, "invalid_path"),
    ("GET /v1/models%0aX-Injected:%201", 400, "invalid_path"),
    ("GET /v1/models%00", 400, "invalid_path"),
    ("GET /v1/models#@{attacker}", 400, "invalid_path"),
    ("GET /v1/models?x=1#frag", 400, "invalid_path"),
    ("GET /v1/models\rX-Injected: 1", 400, None),
    ("GET /nope/v1/models", 404, "unknown_provider"),
    ("GET /../v1/models", 400, "invalid_path"),
    ("GET /admin", 404, "unknown_route"),
]


@pytest.mark.parametrize(("line", "status", "code"), TARGETS, ids=[t[0] for t in TARGETS])
async def test_path_and_target_tricks(
    guarded: Proxy,
    fake: FakeProvider,
    attacker: Attacker,
    line: str,
    status: int,
    code: str | None,
) -> None:
    target = line.format(attacker=attacker.netloc)
    async with steady(guarded.url, AUTH):
        for _ in range(3):
            got, body = await raw_request(guarded.url, f"{target} HTTP/1.1", AUTH_LINE)
            assert got == status, (target, body)
            error = error_of(body)
            assert code is None or error["code"] == code
    assert attacker.untouched(), attacker
    _clean_arrivals(fake)


async def test_host_header_and_forwarding_headers_do_not_pick_the_upstream(
    guarded: Proxy, fake: FakeProvider, attacker: Attacker
) -> None:
    headers = (
        f"{AUTH_LINE}X-Forwarded-Host: {attacker.netloc}\r\nForwarded: host={attacker.netloc}\r\n"
        f"X-Original-URL: http://{attacker.netloc}/v1/models\r\n"
    )
    async with steady(guarded.url, AUTH):
        answer = await _first_answer(
            guarded.url,
            f"GET /v1/models HTTP/1.1\r\nHost: {attacker.netloc}\r\n{headers}\r\n".encode(),
        )
    assert answer.startswith(b"HTTP/1.1 200")
    body = answer.partition(b"\r\n\r\n")[2]
    assert json.loads(body)["object"] == "list"  # answered by the configured provider
    assert attacker.untouched()


async def test_encoded_crlf_in_the_query_stays_encoded(
    guarded: Proxy, fake: FakeProvider, attacker: Attacker
) -> None:
    """The query passes through verbatim: still percent-encoded, so no header is born."""
    query = f"x=%0d%0aX-Injected:%201%0d%0aHost:%20{attacker.netloc}"
    async with steady(guarded.url, AUTH):
        status, _ = await raw_request(guarded.url, f"GET /v1/models?{query} HTTP/1.1", AUTH_LINE)
    assert status == 200
    arrived = [entry for entry in fake.recent if entry[1].startswith("/v1/models?")]
    assert [path for _, path, _ in arrived] == [f"/v1/models?{query}"]
    assert "x-injected" not in {name.lower() for name, _ in arrived[0][2]}
    assert attacker.untouched()


async def test_header_injection_through_the_model_name_stays_in_the_body(
    guarded: Proxy, fake: FakeProvider, http: aiohttp.ClientSession, attacker: Attacker
) -> None:
    evil = f"m\r\nX-Injected: 1\r\nHost: {attacker.netloc}\r\n\r\nGET / HTTP/1.1"
    async with steady(guarded.url, AUTH):
        resp = await http.post(
            guarded.base_url + "/chat/completions",
            json={"model": evil, "messages": []},
            headers=AUTH,
        )
        body = await resp.json()
    assert resp.status == 200
    assert body["model"] == evil  # a string in the body, all the way
    assert "X-Injected" not in resp.headers
    # A raw CR/LF byte inside a JSON string is not JSON at all.
    status, raw = await raw_request(
        guarded.url,
        "POST /v1/chat/completions HTTP/1.1",
        AUTH_LINE + "Content-Type: application/json\r\n",
        b'{"model": "m\r\nX-Injected: 1", "messages": []}',
    )
    assert status == 400
    assert error_of(raw)["code"] == "invalid_json"
    _clean_arrivals(fake)
    assert attacker.untouched()


@pytest.mark.parametrize(
    ("headers", "body"),
    [
        ("Content-Type: application/json\r\n", b'{"model": "m", "messages": ['),
        ("Content-Type: application/json\r\n", b"\xff\xfe\x00garbage"),
        ("Content-Type: application/json\r\n", b"[" * 100_000 + b"]" * 100_000),
        ("Content-Type: application/json; charset=utf-8\r\n", b"{'single': 'quotes'}"),
        ("Content-Type: application/vnd.api+json\r\n", b"{nope}"),
    ],
    ids=["truncated", "binary", "nested-100k", "python-repr", "plus-json"],
)
async def test_malformed_json_is_400_and_never_sent(
    guarded: Proxy, fake: FakeProvider, headers: str, body: bytes
) -> None:
    async with steady(guarded.url, AUTH):
        before = len(fake.recent)
        status, raw = await raw_request(
            guarded.url, "POST /v1/chat/completions HTTP/1.1", AUTH_LINE + headers, body
        )
        assert status == 400, raw
        assert error_of(raw)["code"] == "invalid_json"
        assert all(path == "/v1/chat/completions" for _, path, _ in list(fake.recent)[before:])


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "image/png", ""]
)
async def test_wrong_content_types_get_a_clear_4xx(
    guarded: Proxy, http: aiohttp.ClientSession, content_type: str
) -> None:
    headers = {**AUTH, "Content-Type": content_type} if content_type else AUTH
    async with steady(guarded.url, AUTH):
        resp = await http.post(
            guarded.base_url + "/chat/completions", data=b"model=m", headers=headers
        )
        assert resp.status == 400
        assert json.loads(await resp.read())["error"]["message"]  # the provider's own 400


async def test_huge_bodies_are_413_sized_or_chunked(
    guarded: Proxy, http: aiohttp.ClientSession, fake: FakeProvider
) -> None:
    big = b'{"input": "' + b"x" * (SETTINGS.max_body_size + 10) + b'"}'

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(big), 65536):
            yield big[start : start + 65536]

    async with steady(guarded.url, AUTH):
        before = len(fake.recent)
        for data in (big, chunks()):
            resp = await http.post(
                guarded.base_url + "/embeddings",
                data=data,
                headers={**AUTH, "Content-Type": "application/json"},
            )
            assert resp.status == 413
            assert error_of(await resp.read())["code"] == "body_too_large"
        # A Content-Length over the limit is refused before any byte of the body is read.
        answer = await _first_answer(
            guarded.url,
            b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\n"
            + AUTH_LINE.encode()
            + f"Content-Length: {10**12}\r\n\r\n".encode(),
        )
        assert answer.startswith(b"HTTP/1.1 413")
        assert error_of(answer.partition(b"\r\n\r\n")[2])["code"] == "body_too_large"
        assert all(path == "/v1/chat/completions" for _, path, _ in list(fake.recent)[before:])


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ("X-Big: " + "a" * 9000 + "\r\n", "header_too_large"),
        ("".join(f"X-Many-{i}: 1\r\n" for i in range(80)), "too_many_headers"),
        ("X-Nul: a\x00b\r\n", "malformed_request"),
        ("X-Bare-LF: a\nX-Injected: 1\r\n", "malformed_request"),
        (" X-Obs-Fold: a\r\n", "malformed_request"),
        ("Transfer-Encoding: chunked\r\nContent-Length: 5\r\n", "malformed_request"),
    ],
    ids=["huge-header", "too-many-headers", "nul-byte", "bare-lf", "obs-fold", "te-and-cl"],
)
async def test_bad_header_blocks_are_400_and_logged_without_their_bytes(
    guarded: Proxy,
    fake: FakeProvider,
    headers: str,
    expected: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level("DEBUG")
    secretish = "tok-SECRET-in-a-header"
    async with steady(guarded.url, AUTH):
        status, body = await raw_request(
            guarded.url,
            "POST /v1/chat/completions HTTP/1.1",
            AUTH_LINE + headers.replace("a", secretish, 1),
            b"{}",
        )
        assert status == 400
        error = error_of(body)  # the OpenAI shape, from aiohttp's parser rejection too
    assert error["code"] == expected
    assert secretish not in body.decode(errors="replace")  # nothing quoted back
    assert secretish not in caplog.text
    assert "Traceback" not in caplog.text
    _clean_arrivals(fake)


async def test_long_request_line_is_400(guarded: Proxy, fake: FakeProvider) -> None:
    async with steady(guarded.url, AUTH):
        status, body = await raw_request(
            guarded.url, f"GET /v1/models?{'q' * 9000} HTTP/1.1", AUTH_LINE
        )
        assert status == 400
        assert error_of(body)["code"] == "header_too_large"
    _clean_arrivals(fake)


async def test_unknown_provider_and_missing_virtual_key(
    guarded: Proxy, http: aiohttp.ClientSession, fake: FakeProvider
) -> None:
    async with steady(guarded.url, AUTH):
        resp = await http.post(guarded.url + "/attacker/v1/chat/completions", json={}, headers=AUTH)
        assert resp.status == 404
        assert error_of(await resp.read())["code"] == "unknown_provider"
        for headers in ({}, {"Authorization": "Bearer nope"}, {"x-api-key": "\u00e9\u00e9"}):
            resp = await http.post(guarded.base_url + "/chat/completions", json={}, headers=headers)
            assert resp.status == 401
            assert error_of(await resp.read())["code"] == "invalid_virtual_key"


# --------------------------------------------------------------------------- slow clients


async def test_slowloris_body_is_cut_off_with_a_408(guarded: Proxy, fake: FakeProvider) -> None:
    """A client that trickles its body one byte at a time gets 408 after body_read_timeout
    (0.5 s here; 30 s by default), and its connection is closed."""
    async with steady(guarded.url, AUTH):
        reader, writer = await _open(guarded.url)
        try:
            writer.write(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                b"\r\nContent-Length: 1000\r\n" + AUTH_LINE.encode() + b"\r\n{"
            )
            started = time.monotonic()
            answer = b""
            for _ in range(_PATIENCE):  # until the proxy answers: the event under test
                writer.write(b" ")
                with contextlib.suppress(ConnectionError):
                    await writer.drain()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.1):
                        answer += await reader.read(65536)
                if answer:
                    break
            elapsed = time.monotonic() - started
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
    assert answer.startswith(b"HTTP/1.1 408"), answer[:100]
    # Never before the timeout (a timer cannot fire early); no upper bound: a busy machine may
    # answer late, and a proxy that never answers fails the loop above.
    assert elapsed >= SETTINGS.body_read_timeout * 0.9
    error = error_of(answer.partition(b"\r\n\r\n")[2])
    assert error["code"] == "body_read_timeout"
    assert b"Connection: close" in answer
    _clean_arrivals(fake)


async def test_slowloris_headers_are_cut_off_by_the_keepalive_timeout(guarded: Proxy) -> None:
    """Headers trickled one byte at a time: aiohttp's keep-alive timer, started at connect,
    closes the connection after keepalive_timeout (1 s here; 75 s by default)."""
    async with steady(guarded.url, AUTH):
        reader, writer = await _open(guarded.url)
        started = time.monotonic()
        closed_after = None
        try:
            writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nX-Slow: ")
            for _ in range(_PATIENCE):  # until the proxy closes: the event under test
                try:
                    writer.write(b"a")
                    await writer.drain()
                    async with asyncio.timeout(0.1):
                        if await reader.read(65536) == b"":
                            closed_after = time.monotonic() - started
                            break
                except TimeoutError:
                    continue
                except ConnectionError:
                    closed_after = time.monotonic() - started
                    break
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
    assert closed_after is not None
    assert closed_after >= SETTINGS.keepalive_timeout * 0.9  # never before the timeout


async def test_fifty_slowloris_connections_at_once_are_all_closed(guarded: Proxy) -> None:
    async def trickle() -> bool:
        """True once the proxy answered (408) or closed the connection."""
        reader, writer = await _open(guarded.url)
        try:
            writer.write(
                b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n"
                + AUTH_LINE.encode()
                + b"\r\n"
            )
            for _ in range(_PATIENCE):
                writer.write(b"x")
                try:
                    await writer.drain()
                    async with asyncio.timeout(0.1):
                        await reader.read(65536)  # an answer, or b"" when closed
                        return True
                except TimeoutError:
                    continue
                except ConnectionError:  # closed hard (a reset): cut off too
                    return True
            return False
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async with steady(guarded.url, AUTH) as good:
        await settle(lambda: sum(good.statuses.values()) >= 3)
        fds = open_fds()  # the steady client's connections (and the proxy's upstream) are open
        cut_off = await asyncio.gather(*(trickle() for _ in range(50)))
        assert all(cut_off)
        await settle(lambda: open_fds() <= fds, within=30)  # the event, not a time bound


async def test_half_a_body_then_gone_sends_nothing_upstream(
    guarded: Proxy, fake: FakeProvider
) -> None:
    tasks = len(asyncio.all_tasks())
    before = len(fake.recent)
    for _ in range(10):  # sequential: the task count is read with no steady client running
        _, writer = await _open(guarded.url)
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\n"
            + AUTH_LINE.encode()
            + b'\r\n{"model": "m", "mess'
        )
        await writer.drain()
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    await settle(lambda: len(asyncio.all_tasks()) <= tasks, within=5)
    assert len(fake.recent) == before
