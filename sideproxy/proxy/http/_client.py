"""``UpstreamClient``: keep-alive connection pools per origin (scheme, host, port), TLS with
the system CA bundle or a configured CA, connect / first-byte / total deadlines.

A reused connection that the provider closed while it sat idle (the keep-alive race) fails
before any byte of the answer; the request is then sent once more on a new connection, the way
browsers and aiohttp handle it. Any later failure is the caller's to judge.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections import deque
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

from sideproxy.proxy._exchange import ConnectFailed, RawHeaders, UpstreamBroken, UpstreamTimedOut
from sideproxy.proxy.http._tls import client_context
from sideproxy.proxy.http._upstream import Connection, Response, Stale

__all__ = ["Pool", "UpstreamClient"]

_SKIP = frozenset({b"host", b"content-length", b"transfer-encoding", b"connection"})
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})

Connect = Callable[["Pool"], Awaitable[Connection]]


class Slots:
    """The cap on open upstream connections of one client, over all its pools (0: none).

    At the cap, a request that needs a new connection closes an idle one of another origin if
    there is one, else waits (within its connect timeout) for a connection to close or to come
    back idle to its own pool."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    def wake(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def release(self) -> None:
        self.used -= 1
        self.wake()

    async def wait(self, loop: asyncio.AbstractEventLoop) -> None:
        waiter = loop.create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        finally:
            if not waiter.done():
                waiter.cancel()


class Pool:
    """Idle keep-alive connections to one origin, newest first; each closes after
    ``keepalive`` seconds unused."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        host_line: bytes,
        connect: Connect,
        keepalive: float,
        slots: Slots,
    ) -> None:
        self.loop = loop
        self.slots = slots
        self.host_line = host_line
        self._connect = connect
        self._keepalive = keepalive
        self._idle: list[Connection] = []
        self.open: set[Connection] = set()

    def take(self) -> Connection | None:
        idle = self._idle
        while idle:
            conn = idle.pop()
            conn.set_deadline(None)
            if not conn.transport.is_closing():
                return conn
        return None

    async def connect(self) -> Connection:
        slots = self.slots
        slots.used += 1
        try:
            conn = await self._connect(self)
        except BaseException:
            slots.release()
            raise
        self.open.add(conn)
        return conn

    def put(self, conn: Connection) -> None:
        conn.response = None
        conn.set_deadline(self.loop.time() + self._keepalive, idle=True)
        self._idle.append(conn)
        self.slots.wake()

    def discard(self, conn: Connection) -> None:
        if conn in self.open:
            self.open.discard(conn)
            self.slots.release()
        if conn in self._idle:
            self._idle.remove(conn)

    def evict_idle(self) -> bool:
        """Close the connection idle longest; False when none is idle."""
        if not self._idle:
            return False
        self._idle.pop(0).abort()
        return True

    def close(self) -> None:
        for conn in list(self.open):
            conn.abort()
        self._idle.clear()


class UpstreamClient:
    """The fast ``UpstreamClient`` (see ``sideproxy.proxy._exchange``)."""

    def __init__(
        self,
        *,
        ssl_context: ssl.SSLContext | None = None,
        keepalive: float = 30.0,
        limit: int = 0,
    ) -> None:
        self._ssl = ssl_context
        self._keepalive = keepalive
        self._slots = Slots(limit)
        self._pools: dict[str, Pool] = {}

    @property
    def pools(self) -> dict[str, Pool]:
        return self._pools

    async def send(
        self,
        method: str,
        url: str,
        headers: RawHeaders,
        body: bytes,
        *,
        connect_timeout: float,
        first_byte_timeout: float,
        total_timeout: float | None = None,
    ) -> Response:
        start = url.find("/", url.find("://") + 3)
        origin, target = (url, "/") if start < 0 else (url[:start], url[start:])
        pool = self._pools.get(origin)
        if pool is None:
            pool = self._new_pool(origin, connect_timeout)
        lines = [b"%s %s HTTP/1.1\r\n" % (method.encode("ascii"), target.encode()), pool.host_line]
        for name, value in headers:
            if len(name) <= 17 and name.lower() in _SKIP:
                continue
            lines.append(b"%b: %b\r\n" % (name, value))
        if body or method in _BODY_METHODS:
            lines.append(b"Content-Length: %d\r\n\r\n" % len(body))
            lines.append(body)
        else:
            lines.append(b"\r\n")
        data = b"".join(lines)
        head_only = method == "HEAD"
        for _ in range(2):
            conn = pool.take()
            if conn is None:
                conn = await self._connection(pool, connect_timeout)
            waiter = conn.send(data, head_only, first_byte_timeout)
            conn.set_deadline(pool.loop.time() + first_byte_timeout)
            try:
                response = await waiter
            except Stale:
                continue
            except BaseException:
                conn.abort()
                raise
            if total_timeout is not None:
                response._deadline = pool.loop.call_later(total_timeout, _past_deadline, response)
            return response
        raise UpstreamBroken("the provider closed a fresh connection before answering")

    def add_unix_origin(self, origin: str, path: str) -> None:
        """Send requests for ``origin`` (``http://name``) over the unix socket at ``path``
        (a leading NUL: Linux's abstract namespace)."""
        loop = asyncio.get_running_loop()

        async def connect(pool: Pool) -> Connection:
            # Connected by hand: uvloop's create_unix_connection refuses abstract names.
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                await loop.sock_connect(sock, path)
            except BaseException:
                sock.close()
                raise
            _, conn = await loop.create_unix_connection(lambda: Connection(pool), sock=sock)
            return conn

        host = urlsplit(origin).hostname or "localhost"
        self._pools[origin] = Pool(
            loop, b"Host: %b\r\n" % host.encode(), connect, self._keepalive, Slots(0)
        )

    async def _connection(self, pool: Pool, connect_timeout: float) -> Connection:
        """A new connection, within the cap on open connections (``Slots``)."""
        slots = self._slots
        if not slots.limit or slots.used < slots.limit:
            return await _connect(pool, connect_timeout)
        try:
            async with asyncio.timeout(connect_timeout):
                while slots.used >= slots.limit:
                    for other in self._pools.values():
                        if other is not pool and other.evict_idle():
                            break  # its close frees a slot: wait for it below
                    await slots.wait(pool.loop)
                    conn = pool.take()
                    if conn is not None:
                        return conn
        except TimeoutError:
            raise UpstreamTimedOut(
                "no upstream connection free within the connect timeout"
            ) from None
        return await _connect(pool, connect_timeout)

    def _new_pool(self, origin: str, connect_timeout: float) -> Pool:
        parts = urlsplit(origin)
        scheme = parts.scheme.lower()
        host = parts.hostname or ""
        if scheme not in ("http", "https") or not host:
            raise ConnectFailed(f"not an http(s) URL: {origin[:100]}")
        tls = scheme == "https"
        port = parts.port or (443 if tls else 80)
        context = None
        if tls:
            context = self._ssl = self._ssl or client_context()
        default_port = port == (443 if tls else 80)
        host_value = f"[{host}]" if ":" in host else host
        if not default_port:
            host_value += f":{port}"
        loop = asyncio.get_running_loop()

        async def connect(pool: Pool) -> Connection:
            _, conn = await loop.create_connection(
                lambda: Connection(pool),
                host,
                port,
                ssl=context,
                server_hostname=host if context is not None else None,
            )
            return conn

        pool = Pool(
            loop,
            b"Host: %b\r\n"
            % (host_value.encode() if host_value.isascii() else host_value.encode("idna")),
            connect,
            self._keepalive,
            self._slots,
        )
        self._pools[origin] = pool
        return pool

    def close(self) -> None:
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()


async def _connect(pool: Pool, seconds: float) -> Connection:
    try:
        async with asyncio.timeout(seconds):
            return await pool.connect()
    except TimeoutError:
        raise UpstreamTimedOut("connecting to the provider timed out") from None
    except (OSError, ssl.SSLError) as exc:
        raise ConnectFailed(f"cannot connect to the provider: {type(exc).__name__}") from None


def _past_deadline(response: Response) -> None:
    response._fail(UpstreamTimedOut("the provider's answer took longer than allowed"))
    response._conn.abort()
