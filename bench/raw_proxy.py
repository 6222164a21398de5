"""Prototype (reference only): the pool core behind raw asyncio protocols instead of aiohttp.

    python bench/raw_proxy.py --port 9305 --upstream 127.0.0.1:9100 --keys k1,k2 --vk bench-vk

What this measures: how much CPU a request costs when the HTTP layers are asyncio.Protocol
objects with httptools (llhttp) parsers on both sides, uvloop, keep-alive upstream connections,
and Side Proxy's own ``ManagedCreditPool`` for acquire/release with the response headers. It
checks the virtual key (SHA-256 + compare_digest, like ``VirtualKeys``), drops hop-by-hop and
client-auth headers, injects the pool key, and re-frames the response (Content-Length or
chunked, so SSE streams pass chunk by chunk). It does not retry, log, count metrics or handle
pipelining, timeouts or large bodies: it is a floor for a redesigned data plane, not a proxy.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import time
from http import HTTPStatus

import httptools
import uvloop

from sideproxy.pool import KeyConfig, ManagedCreditPool, Outcome

REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}
DROP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"host",
        b"content-length",
        b"authorization",
        b"x-api-key",
    }
)


class Upstream(asyncio.Protocol):
    """One keep-alive connection to the provider; serves one exchange at a time."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.down: Downstream | None = None
        self.headers: list[tuple[bytes, bytes]] = []
        self.chunked = False
        self.key = None
        self.ready = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.ready.set_result(None)

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.proxy.discard(self)
        if self.down is not None:
            self.down.upstream_failed()

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        head = [b"HTTP/1.1 %d %b\r\n" % (status, REASONS.get(status, b"Unknown"))]
        length = None
        for name, value in self.headers:
            low = name.lower()
            if low == b"content-length":
                length = value
            elif low not in DROP:
                head.append(name + b": " + value + b"\r\n")
        self.chunked = length is None
        head.append(
            b"Transfer-Encoding: chunked\r\n\r\n"
            if self.chunked
            else b"Content-Length: " + length + b"\r\n\r\n"
        )
        if self.down is not None:
            self.down.write(b"".join(head))
        self.status = status

    def on_body(self, body: bytes) -> None:
        if self.down is not None:
            self.down.write(b"%x\r\n%b\r\n" % (len(body), body) if self.chunked else body)

    def on_message_complete(self) -> None:
        down, self.down = self.down, None
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in self.headers}
        self.headers = []
        self.proxy.pool.release(self.key, Outcome.from_status(self.status), time.time(), headers)
        if down is not None:
            if self.chunked:
                down.write(b"0\r\n\r\n")
            down.done()
        self.proxy.idle.append(self)


class Downstream(asyncio.Protocol):
    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.close()

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        headers, self.headers = self.headers, []
        body, self.body = b"".join(self.body), []
        url, self.url = self.url, b""
        method = self.parser.get_method()
        auth = b""
        out = []
        for name, value in headers:
            low = name.lower()
            if low == b"authorization":
                auth = value
            elif low not in DROP:
                out.append(name + b": " + value + b"\r\n")
        token = auth[7:] if auth[:7].lower() == b"bearer " else b""
        if not self.proxy.check(token):
            self.write(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n")
            return
        key = self.proxy.pool.acquire("custom", time.time())
        if key is None or not url.startswith(b"/v1/"):
            self.write(b"HTTP/1.1 429 Too Many Requests\r\nContent-Length: 0\r\n\r\n")
            return
        request = b"".join(
            [
                method + b" " + self.proxy.prefix + url[3:] + b" HTTP/1.1\r\n",
                self.proxy.host_header,
                b"Authorization: Bearer " + key.secret.encode() + b"\r\n",
                *out,
                b"Content-Length: %d\r\n\r\n" % len(body),
                body,
            ]
        )
        self.proxy.send(self, key, request)

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def done(self) -> None:
        pass

    def upstream_failed(self) -> None:
        if self.transport is not None:
            self.transport.close()


class Proxy:
    def __init__(self, upstream: str, keys: list[str], vks: list[str]) -> None:
        host, _, port = upstream.partition(":")
        self.host, self.port = host, int(port)
        self.prefix = b"/v1"
        self.host_header = b"Host: " + upstream.encode() + b"\r\n"
        self.pool = ManagedCreditPool(
            KeyConfig(f"key-{i}", "custom", k) for i, k in enumerate(keys, 1)
        )
        self.digests = [hashlib.sha256(v.encode()).digest() for v in vks]
        self.idle: list[Upstream] = []

    def check(self, token: bytes) -> bool:
        digest = hashlib.sha256(token).digest()
        ok = False
        for known in self.digests:
            ok |= hmac.compare_digest(digest, known)
        return ok

    def discard(self, conn: Upstream) -> None:
        if conn in self.idle:
            self.idle.remove(conn)

    def send(self, down: Downstream, key: object, request: bytes) -> None:
        if self.idle:
            conn = self.idle.pop()
            conn.down, conn.key = down, key
            conn.transport.write(request)  # type: ignore[union-attr]
            return
        asyncio.get_running_loop().create_task(self._connect_and_send(down, key, request))

    async def _connect_and_send(self, down: Downstream, key: object, request: bytes) -> None:
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(lambda: Upstream(self), self.host, self.port)
        conn.down, conn.key = down, key
        conn.transport.write(request)  # type: ignore[union-attr]


async def serve(args: argparse.Namespace) -> None:
    proxy = Proxy(args.upstream, args.keys.split(","), [args.vk])
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: Downstream(proxy), "127.0.0.1", args.port, backlog=1024
    )
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="host:port")
    parser.add_argument("--keys", required=True)
    parser.add_argument("--vk", required=True)
    uvloop.run(serve(parser.parse_args()))


if __name__ == "__main__":
    main()
