"""The upstream client against real local servers: keep-alive pools, body framings, TLS with
a CA made for the test, deadlines, the keep-alive race and back-pressure."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from sideproxy.proxy._exchange import ConnectFailed, UpstreamBroken, UpstreamTimedOut
from sideproxy.proxy.http import UpstreamClient, client_context

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"


class Upstream:
    """A scripted HTTP server: each connection runs ``script``; counts connections."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.connections = 0
        self.requests: list[bytes] = []
        self.server: asyncio.Server | None = None
        self.url = ""

    async def on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.script(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def read_request(self, reader: asyncio.StreamReader) -> bytes:
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        request = head + await reader.readexactly(length)
        self.requests.append(request)
        return request


@pytest.fixture
async def upstream() -> AsyncIterator[Callable[..., Awaitable[Upstream]]]:
    started: list[asyncio.Server] = []

    async def start(script: Script, context: ssl.SSLContext | None = None) -> Upstream:
        up = Upstream(script)
        up.server = await asyncio.start_server(up.on_connect, "127.0.0.1", 0, ssl=context)
        port = up.server.sockets[0].getsockname()[1]
        up.url = (
            f"{'https' if context else 'http'}://{'localhost' if context else '127.0.0.1'}:{port}"
        )
        started.append(up.server)
        return up

    yield start
    for server in started:
        server.close()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(2):
                await server.wait_closed()


@pytest.fixture
async def client() -> AsyncIterator[UpstreamClient]:
    c = UpstreamClient(keepalive=30.0)
    yield c
    c.close()


async def send(client: UpstreamClient, url: str, body: bytes = b"", **kw: float):  # type: ignore[no-untyped-def]
    timeouts = {"connect_timeout": 2.0, "first_byte_timeout": 2.0, **kw}
    return await client.send("POST", url, [(b"Authorization", b"Bearer k")], body, **timeouts)


def keep_answering(upstream_box: list[Upstream], answer: bytes = OK) -> Script:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await upstream_box[0].read_request(reader)
            writer.write(answer)
            await writer.drain()

    return script


async def test_keep_alive_reuses_one_connection_and_sends_host_and_length(
    upstream: Callable[..., Awaitable[Upstream]], client: UpstreamClient
) -> None:
    box: list[Upstream] = []
    up = await upstream(keep_answering(box))
    box.append(up)
    for _ in range(3):
        resp = await send(client, up.url + "/v1/chat/completions?x=1", b'{"a":1}')
        assert resp.status == 200
        assert resp.reason == "OK"
        assert resp.content_type == "application/json"
        assert resp.headers.get("content-type") == "application/json"
        assert await resp.read(100) == b"{}"
        resp.release()
    assert up.connections == 1
    first = up.requests[0]
    assert first.startswith(b"POST /v1/chat/completions?x=1 HTTP/1.1\r\n")
    assert f"Host: {up.url.removeprefix('http://')}\r\n".encode() in first
    assert b"Content-Length: 7\r\n" in first
    assert first.endswith(b'{"a":1}')


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\nhello world",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nhello world",
    ],
    ids=["content-length", "chunked", "close-delimited"],
)
async def test_every_body_framing_is_read_whole_and_streamed(
    upstream: Callable[..., Awaitable[Upstream]], client: UpstreamClient, answer: bytes
) -> None:
    box: list[Upstream] = []

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await box[0].read_request(reader)
        head, _, body = answer.partition(b"\r\n\r\n")
        writer.write(head + b"\r\n\r\n")
        await writer.drain()
        for i in range(0, len(body), 7):  # in pieces
            writer.write(body[i : i + 7])
            await writer.drain()
            await asyncio.sleep(0.01)
        if b"close" in head:
            writer.close()

    up = await upstream(script)
    box.append(up)
    resp = await send(client, up.url + "/a")
    assert await resp.read(1000) == b"hello world"
    resp.release()
    resp = await send(client, up.url + "/b")
    pieces = [piece async for piece in resp.chunks(2.0)]
    assert b"".join(pieces) == b"hello world"
    resp.release()


async def test_read_with_a_limit_returns_none_for_a_longer_body(
    upstream: Callable[..., Awaitable[Upstream]], client: UpstreamClient
) -> None:
    box: list[Upstream] = []
    up = await upstream(
        keep_answering(
            box, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n6\r\n123456\r\n0\r\n\r\n"
        )
    )
    box.append(up)
    resp = await send(client, up.url)
    assert await resp.read(5) is None
    resp.close()


def _make_ca_and_cert(tmp: Path) -> tuple[Path, Path, Path]:
    """A CA of the test's own and a certificate for localhost it signed (openssl CLI)."""

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=tmp)

    run(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=sideproxy test CA",
    )
    run(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "srv.key",
        "-out",
        "srv.csr",
        "-subj",
        "/CN=localhost",
    )
    (tmp / "ext.cnf").write_text("subjectAltName=DNS:localhost\n")
    run(
        "x509",
        "-req",
        "-in",
        "srv.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "srv.pem",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
    )
    return tmp / "ca.pem", tmp / "srv.pem", tmp / "srv.key"


async def test_tls_to_an_upstream_with_its_own_ca(
    upstream: Callable[..., Awaitable[Upstream]], tmp_path: Path
) -> None:
    ca, cert, key = _make_ca_and_cert(tmp_path)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    box: list[Upstream] = []
    up = await upstream(keep_answering(box), server_ctx)
    box.append(up)

    trusting = UpstreamClient(ssl_context=client_context(str(ca)))
    try:
        for _ in range(2):
            resp = await send(trusting, up.url + "/v1/models")
            assert resp.status == 200
            assert await resp.read(100) == b"{}"
            resp.release()
        assert up.connections == 1  # TLS connections are pooled too
    finally:
        trusting.close()

    system_only = UpstreamClient()  # the system CA bundle does not know the test's CA
    try:
        with pytest.raises(ConnectFailed):
            await send(system_only, up.url + "/v1/models")
    finally:
        system_only.close()


async def test_connection_refused_is_connect_failed(client: UpstreamClient) -> None:
    probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = probe.sockets[0].getsockname()[1]
    probe.close()
    await probe.wait_closed()
    with pytest.raises(ConnectFailed):
        await send(client, f"http://127.0.0.1:{port}/v1/models")


async def test_a_silent_upstream_is_a_first_byte_timeout(
    upstream: Callable[..., Awaitable[Upstream]], client: UpstreamClient
) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    up = await upstream(silent)
    with pytest.raises(UpstreamTimedOut):
        await send(client, up.url, first_byte_timeout=0.2)


async def test_a_stream_that_goes_quiet_is_an_idle_timeout_and_a_cut_one_is_broken(
    upstream: Callable[..., Awaitable[Upstream]], client: UpstreamClient
) -> None:
    box: list[Upstream] = []

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await box[0].read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
        await writer.drain()
        if b"/quiet" in request:
            await asyncio.sleep(5)
        # else: close mid-body

    up = await upstream(script)
    box.append(up)
    resp = await send(client, up.url + "/quiet")
    got: list[bytes] = []

    async def drain_quiet() -> None:
        async for piece in resp.chunks(0.2):
            got.append(piece)

    with pytest.raises(UpstreamTimedOut):
        await drain_quiet()
    assert got == [b"abc"]
    resp.close()
    resp = await send(client, up.url + "/cut")

    async def drain_cut() -> None:
        async for _ in resp.chunks(2.0):
            pass

    with pytest.raises(UpstreamBroken):
        await drain_cut()
    resp.close()


async def test_an_idle_connection_the_upstream_closed_is_replaced_transparently(
    upstream: Callable[..., Awaitable[Upstream]], client: UpstreamClient
) -> None:
    box: list[Upstream] = []

    async def one_and_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await box[0].read_request(reader)
        writer.write(OK)  # says keep-alive, then closes right after (the keep-alive race)
        await writer.drain()
        await asyncio.sleep(0.05)

    up = await upstream(one_and_close)
    box.append(up)
    for _ in range(3):
        resp = await send(client, up.url)
        assert await resp.read(10) == b"{}"
        resp.release()
        await asyncio.sleep(0.1)
    assert up.connections == 3


async def test_a_slow_consumer_pauses_reading_from_the_upstream(
    upstream: Callable[..., Awaitable[Upstream]], client: UpstreamClient
) -> None:
    """Back-pressure: the client buffers at most about the high water mark (plus the socket
    buffers) of a body nobody reads; the upstream's writes then block."""
    box: list[Upstream] = []
    sent = 0
    stuck = asyncio.Event()

    async def flood(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal sent
        await box[0].read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        piece = b"%x\r\n%b\r\n" % (65536, b"x" * 65536)
        while sent < 64 * 1024 * 1024:
            writer.write(piece)
            try:
                async with asyncio.timeout(0.5):
                    await writer.drain()
            except TimeoutError:
                stuck.set()
                await writer.drain()
            sent += 65536

    up = await upstream(flood)
    box.append(up)
    resp = await send(client, up.url)
    async with asyncio.timeout(20):
        await stuck.wait()
    assert sent < 16 * 1024 * 1024
    before = sent
    got = 0
    async for piece in resp.chunks(5.0):  # reading on lets the upstream write again
        got += len(piece)
        if got >= before + 1024 * 1024:
            break
    assert sent > before
    resp.close()


async def test_the_connection_cap_makes_requests_wait_for_a_free_connection(
    upstream: Callable[..., Awaitable[Upstream]],
) -> None:
    """``limit`` (SIDE_PROXY_UPSTREAM_CONNECTIONS) caps open connections: at the cap a request
    waits for one to come back idle, or times out within its connect timeout."""
    box: list[Upstream] = []
    up = await upstream(keep_answering(box))
    box.append(up)
    capped = UpstreamClient(limit=1)
    try:
        first = await send(capped, up.url + "/1")
        second = asyncio.ensure_future(send(capped, up.url + "/2"))
        await asyncio.sleep(0.1)
        assert not second.done()  # waiting: the only connection is in use
        assert await first.read(10) == b"{}"
        first.release()
        resp = await asyncio.wait_for(second, 5)
        assert await resp.read(10) == b"{}"
        busy = resp  # keep it: the cap is reached again
        with pytest.raises(UpstreamTimedOut):
            await send(capped, up.url + "/3", connect_timeout=0.2)
        busy.release()
        assert up.connections == 1
    finally:
        capped.close()
