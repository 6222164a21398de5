"""Fixtures for the transport tests: a real ``HttpServer`` on a loopback port with a handler
the test chooses, and raw socket helpers (no HTTP client library between the test and the
bytes)."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from sideproxy.proxy.http import Cycle, HttpServer, Limits, Request

Serve = Callable[..., Awaitable[tuple[HttpServer, int]]]


async def echo(request: Request, cycle: Cycle) -> None:
    """Answers with what it got: method, target, body size, header count."""
    body = b"%s %s %d %d" % (
        request.method.encode(),
        request.target,
        len(request.body),
        len(request.headers),
    )
    await cycle.respond(200, [(b"Content-Type", b"text/plain")], body)


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """``await serve(handler=echo, limits=Limits())`` -> (server, port)."""
    servers: list[HttpServer] = []

    async def start(
        handler: Callable[[Request, Cycle], Awaitable[None]] = echo, limits: Limits | None = None
    ) -> tuple[HttpServer, int]:
        server = HttpServer(handler, limits or Limits())
        (_, port), *_ = await server.listen("127.0.0.1", 0)
        servers.append(server)
        return server, port

    yield start
    for server in servers:
        await server.shutdown(0.5)


class Conn:
    """A raw client connection: write bytes, read whole responses."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def response(self, within: float = 5.0) -> tuple[int, bytes, bytes]:
        """(status, head, body) of one response: Content-Length, chunked or until close."""
        async with asyncio.timeout(within):
            head = await self.reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            if status == 100:
                return status, head, b""
            length = re.search(rb"(?i)\r\ncontent-length: (\d+)", head)
            if length is not None:
                return status, head, await self.reader.readexactly(int(length[1]))
            if re.search(rb"(?i)\r\ntransfer-encoding: chunked", head):
                body = b""
                while True:
                    size = int((await self.reader.readuntil(b"\r\n")).strip(), 16)
                    data = await self.reader.readexactly(size + 2)
                    if size == 0:
                        return status, head, body
                    body += data[:-2]
            return status, head, await self.reader.read()

    async def closed(self, within: float = 5.0) -> bool:
        """True once the server closed the connection (EOF or reset)."""
        try:
            async with asyncio.timeout(within):
                while await self.reader.read(65536):
                    pass
        except ConnectionError:
            return True
        return True

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


@pytest.fixture
async def connect() -> AsyncIterator[Callable[[int], Awaitable[Conn]]]:
    conns: list[Conn] = []

    async def open_(port: int) -> Conn:
        conn = Conn(*await asyncio.open_connection("127.0.0.1", port))
        conns.append(conn)
        return conn

    yield open_
    for conn in conns:
        await conn.close()
