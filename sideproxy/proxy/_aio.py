"""The request path on aiohttp, both sides, until ``sideproxy/proxy/http`` replaces them:
``AioUpstream`` is an ``UpstreamClient`` over one ``ClientSession``, ``AioResponder`` a
``Responder`` over one ``web.Request``, and :func:`handler` the route that turns an aiohttp
request into an ``Inbound`` (reading the body under its size limit and read timeout).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from sideproxy.proxy._errors import BodyTooLarge, ProxyError, RequestTimeout
from sideproxy.proxy._exchange import (
    ClientGone,
    ConnectFailed,
    Headers,
    Inbound,
    RawHeaders,
    UpstreamBroken,
    UpstreamTimedOut,
)

if TYPE_CHECKING:
    from sideproxy.proxy._forward import Forwarder
    from sideproxy.proxy._settings import ProxySettings

__all__ = ["AioResponder", "AioUpstream", "AioUpstreamResponse", "handler", "upstream_session"]


def _str_headers(raw: RawHeaders) -> CIMultiDict[str]:
    return CIMultiDict((n.decode("latin-1"), v.decode("latin-1")) for n, v in raw)


# --------------------------------------------------------------------------- upstream side


class AioUpstreamResponse:
    """``UpstreamResponse`` over an ``aiohttp.ClientResponse``."""

    __slots__ = (
        "_resp",
        "content_length",
        "content_type",
        "headers",
        "raw_headers",
        "reason",
        "status",
    )

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self._resp = resp
        self.status = resp.status
        self.reason = resp.reason or ""
        self.headers: Mapping[str, str] = resp.headers  # case-insensitive
        self.raw_headers: RawHeaders = resp.raw_headers
        self.content_length = resp.content_length
        self.content_type = resp.content_type if "Content-Type" in resp.headers else ""

    async def read(self, limit: int) -> bytes | None:
        length = self.content_length
        if length is not None and length > limit:
            return None
        try:
            if length is not None:
                return await self._resp.read()
            return await self._read_capped(limit)
        except TimeoutError:
            raise UpstreamTimedOut("read timeout") from None
        except aiohttp.ClientError as exc:
            raise UpstreamBroken(type(exc).__name__) from None

    async def _read_capped(self, cap: int) -> bytes | None:
        chunks: list[bytes] = []
        size = 0
        content = self._resp.content
        while chunk := await content.readany():
            size += len(chunk)
            if size > cap:
                return None
            chunks.append(chunk)
        return b"".join(chunks)

    async def chunks(self, idle_timeout: float) -> AsyncIterator[bytes]:
        connection = self._resp.connection
        if connection is not None and connection.protocol is not None:
            # Longest silence between chunks from now on (restart the timer with the new value).
            protocol = connection.protocol
            protocol.read_timeout = idle_timeout
            if not protocol._reading_paused:  # paused: aiohttp restarts it on resume
                protocol.start_timeout()
        content = self._resp.content
        while True:
            try:
                chunk = await content.readany()
            except TimeoutError:
                raise UpstreamTimedOut("idle stream") from None
            except aiohttp.ClientError as exc:
                raise UpstreamBroken(type(exc).__name__) from None
            if not chunk:
                return
            yield chunk

    def release(self) -> None:
        self._resp.release()

    def close(self) -> None:
        self._resp.close()


class AioUpstream:
    """``UpstreamClient`` over one ``ClientSession`` (the process's)."""

    __slots__ = ("_session",)

    def __init__(self, session: aiohttp.ClientSession) -> None:
        self._session = session

    async def send(
        self,
        method: str,
        url: str,
        headers: RawHeaders,
        body: bytes,
        *,
        connect_timeout: float,
        first_byte_timeout: float,
        total_timeout: float,
    ) -> AioUpstreamResponse:
        try:
            resp = await self._session.request(
                method,
                URL(url, encoded=True),
                data=body or None,
                headers=_str_headers(headers),
                timeout=aiohttp.ClientTimeout(
                    total=total_timeout,
                    connect=connect_timeout,
                    sock_connect=connect_timeout,
                    sock_read=first_byte_timeout,
                ),
                allow_redirects=False,
            )
        except TimeoutError:
            raise UpstreamTimedOut("no answer in time") from None
        except aiohttp.ClientConnectorError as exc:
            raise ConnectFailed(type(exc).__name__) from None
        except aiohttp.ClientError as exc:
            raise UpstreamBroken(type(exc).__name__) from None
        return AioUpstreamResponse(resp)


def upstream_session(settings: ProxySettings) -> aiohttp.ClientSession:
    """The process's one upstream session."""
    connector = aiohttp.TCPConnector(
        limit=settings.connection_limit,
        ttl_dns_cache=settings.dns_cache_ttl,
        keepalive_timeout=settings.upstream_keepalive,
    )
    return aiohttp.ClientSession(
        connector=connector,
        # Pass provider bytes through untouched, Content-Encoding and all (see _headers).
        auto_decompress=False,
        # Send only what the client sent: no aiohttp User-Agent / Accept-Encoding / Content-Type.
        skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type", "Accept"),
        # A proxy must never store one client's cookies and replay them for another.
        cookie_jar=aiohttp.DummyCookieJar(),
        trust_env=False,
        max_line_size=max(settings.max_header_size, 8190),
        max_field_size=max(settings.max_header_size, 8190),
        timeout=aiohttp.ClientTimeout(total=None),
    )


# --------------------------------------------------------------------------- client side


class AioResponder:
    """``Responder`` over one aiohttp request; ``response`` is what the handler returns."""

    __slots__ = ("_request", "response")

    def __init__(self, request: web.Request) -> None:
        self._request = request
        self.response: web.StreamResponse | None = None

    @property
    def started(self) -> bool:
        return self.response is not None and self.response.prepared

    def closed(self) -> bool:
        transport = self._request.transport
        return transport is None or transport.is_closing()

    async def respond(self, status: int, headers: RawHeaders, body: bytes) -> None:
        # Returned to aiohttp unprepared: it sends it the usual way.
        self.response = web.Response(status=status, body=body, headers=_str_headers(headers))

    async def start(self, status: int, headers: RawHeaders, length: int | None = None) -> None:
        out = self.response = web.StreamResponse(status=status, headers=_str_headers(headers))
        if length is not None:
            out.content_length = length
        try:
            await out.prepare(self._request)
        except ConnectionError:
            raise ClientGone from None

    async def write(self, chunk: bytes) -> None:
        assert self.response is not None, "write before start"
        try:
            await self.response.write(chunk)
        except ConnectionError:
            raise ClientGone from None

    async def finish(self) -> None:
        if self.response is not None:
            with contextlib.suppress(ConnectionError):
                await self.response.write_eof()

    def abort(self) -> None:
        transport = self._request.transport
        if transport is not None:
            transport.abort()


async def _read_body(request: web.Request, settings: ProxySettings) -> bytes:
    if not request.body_exists:
        return b""
    limit = settings.max_body_size
    length = request.content_length
    if length is not None and length > limit:
        raise BodyTooLarge(f"request body is over the {limit}-byte limit")
    try:
        async with asyncio.timeout(settings.body_read_timeout):
            return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise BodyTooLarge(f"request body is over the {limit}-byte limit") from None
    except TimeoutError:
        # A slow (or slowloris) client: answer, then close; the rest of its body is not read.
        raise RequestTimeout(
            f"the request body did not arrive within {settings.body_read_timeout:g}s",
            headers={"Connection": "close"},
        ) from None


def handler(
    forwarder: Forwarder, settings: ProxySettings
) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """The aiohttp route for everything under ``/v1`` and ``/<provider>/v1``."""

    async def handle(request: web.Request) -> web.StreamResponse:
        path, _, query = request.raw_path.partition("?")
        inbound = Inbound(
            request.method,
            path,
            query,
            Headers(request.raw_headers),
            b"",
            peer=request.remote or "-",
        )
        out = AioResponder(request)
        try:
            inbound.body = await _read_body(request, settings)
        except ProxyError as exc:
            await forwarder.refuse(inbound, out, exc)
        else:
            await forwarder.handle(inbound, out)
        assert out.response is not None, "the request path always answers"
        return out.response

    return handle
