"""The interface between the request path and an HTTP transport (either side of the proxy).

::

    client ──▶ transport (aiohttp in _aio.py; sideproxy/proxy/http/ on asyncio + httptools)
                 │ reads the request line, headers and the whole body (limits, timeouts: 413, 408)
                 │ builds an Inbound and a Responder for that request, then
                 ▼
               await forwarder.handle(inbound, responder)          (the request path)
                 │ parse and route -> authenticate and admit -> attempt -> relay
                 │ sends upstream through an UpstreamClient
                 ▼
               UpstreamResponse: status, headers, read(limit) | chunks(idle), release / close

A request that the transport itself refuses (body too large, too slow) goes to
``forwarder.refuse(inbound, responder, error)`` so it is logged and counted like any other.

Headers cross this interface as the raw ``(name, value)`` byte pairs a parser produces (httptools
and aiohttp's ``raw_headers`` both give them): nothing builds a dict per request unless a stage
asks a question, and :class:`Headers` answers the few that are asked (auth, content type) with
one lazily built lower-case index.

Upstream failures, by what they say about the request (the next key may be tried, see
``_attempt``)::

    UpstreamFailure
    ├── ConnectFailed       no connection was made: the provider cannot have seen the request
    ├── UpstreamTimedOut    connect, first-byte, idle-stream or total deadline passed
    └── UpstreamBroken      reset, malformed answer or broken body after the request went out

Client side: :class:`ClientGone` (a ``ConnectionError``) from ``Responder.start`` / ``write``
means the client disconnected; nothing more can reach it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from typing import Protocol

__all__ = [
    "ClientGone",
    "ConnectFailed",
    "Headers",
    "Inbound",
    "RawHeaders",
    "Responder",
    "UpstreamBroken",
    "UpstreamClient",
    "UpstreamFailure",
    "UpstreamResponse",
    "UpstreamTimedOut",
]

# Header lines as they were (or will be) on the wire: latin-1 bytes, order and case kept.
RawHeaders = Sequence[tuple[bytes, bytes]]


class UpstreamFailure(Exception):
    """The upstream exchange failed without a usable HTTP answer. Messages name no secret."""


class ConnectFailed(UpstreamFailure):
    """No connection (refused, DNS, TLS handshake): the request never reached the provider."""


class UpstreamTimedOut(UpstreamFailure):
    """A deadline passed: connect, first byte, silence between chunks, or the whole request."""


class UpstreamBroken(UpstreamFailure):
    """The connection broke (reset, malformed response, body cut short) after sending."""


class ClientGone(ConnectionError):
    """The client disconnected; raised by ``Responder.start`` / ``write``."""


_NAMES: dict[str, bytes] = {}  # "Content-Type" -> b"content-type": the few names ever asked


def _key(name: str) -> bytes:
    key = _NAMES.get(name)
    if key is None:
        key = name.lower().encode("latin-1")
        if len(_NAMES) < 256:
            _NAMES[name] = key
    return key


class Headers(Mapping[str, str]):
    """Case-insensitive read access to raw header pairs (first value of a name wins).

    Lookups take the name in any case; iteration yields lower-case names. The index (lower-case
    name bytes -> value bytes) is built on the first lookup, and a value is decoded only when
    asked for, so a request whose headers nobody reads pays nothing for them.
    """

    __slots__ = ("_index", "raw")

    def __init__(self, raw: RawHeaders) -> None:
        self.raw = raw
        self._index: dict[bytes, bytes] | None = None

    def _build(self) -> dict[bytes, bytes]:
        index = {name.lower(): value for name, value in reversed(self.raw)}
        self._index = index
        return index

    def raw_index(self) -> Mapping[bytes, bytes]:
        """Lower-case name bytes -> value bytes: the pool's headroom reads it without decoding
        (``pool._headers``, duck-typed)."""
        return self._index if self._index is not None else self._build()

    def get(self, name: str, default: str | None = None) -> str | None:  # type: ignore[override]
        index = self._index if self._index is not None else self._build()
        value = index.get(_key(name))
        return default if value is None else value.decode("latin-1")

    def __getitem__(self, name: str) -> str:
        value = self.get(name)
        if value is None:
            raise KeyError(name)
        return value

    def __contains__(self, name: object) -> bool:
        index = self._index if self._index is not None else self._build()
        return isinstance(name, str) and _key(name) in index

    def __iter__(self) -> Iterator[str]:
        index = self._index if self._index is not None else self._build()
        return (name.decode("latin-1") for name in index)

    def __len__(self) -> int:
        index = self._index if self._index is not None else self._build()
        return len(index)

    def __repr__(self) -> str:
        return f"Headers({len(self.raw)} lines)"  # values may be credentials: never shown


class Inbound:
    """One client request, whole: the transport has read (and bounded) its body.

    ``path`` is the raw, still percent-encoded path without the query; ``query`` the raw query
    string without ``?`` (``""`` when none). ``peer`` is the client's address for logs.
    """

    __slots__ = ("body", "headers", "method", "path", "peer", "query")

    def __init__(
        self,
        method: str,
        path: str,
        query: str,
        headers: Headers,
        body: bytes,
        *,
        peer: str = "-",
    ) -> None:
        self.method = method
        self.path = path
        self.query = query
        self.headers = headers
        self.body = body
        self.peer = peer


class Responder(Protocol):
    """Writes one answer to the client. Either ``respond`` once, or ``start`` then any number
    of ``write`` then ``finish`` (or ``abort``). Headers never include ``Content-Length`` or
    ``Transfer-Encoding``: the transport frames the body itself."""

    @property
    def started(self) -> bool:
        """True once any byte of the answer may have reached the client (no retry after)."""

    def closed(self) -> bool:
        """True when the client has disconnected."""

    async def respond(self, status: int, headers: RawHeaders, body: bytes) -> None:
        """A whole answer with a known length."""

    async def start(self, status: int, headers: RawHeaders, length: int | None = None) -> None:
        """Send the status line and headers of a streamed answer (``length``: its exact size,
        else chunked or close-delimited). Raises :class:`ClientGone`."""

    async def write(self, chunk: bytes) -> None:
        """Send a chunk and wait until the transport can take more (back-pressure).
        Raises :class:`ClientGone`."""

    async def finish(self) -> None:
        """End a streamed answer cleanly. Never raises for a client that left."""

    def abort(self) -> None:
        """Drop the connection mid-answer, so the client cannot take a truncated body for a
        whole one."""


class UpstreamResponse(Protocol):
    """A provider's answer whose headers have arrived; its body is read at most once, by
    ``read`` or ``chunks``. Exactly one of ``release`` / ``close`` ends it."""

    status: int
    reason: str
    # Case-insensitive lookups (``headers.get("retry-after")``), what the pool reads.
    headers: Mapping[str, str]
    raw_headers: RawHeaders
    content_length: int | None
    content_type: str  # the media type only, lower case ("" when none)

    async def read(self, limit: int) -> bytes | None:
        """The whole body, or None (without reading on) when it is longer than ``limit``.
        Raises :class:`UpstreamTimedOut` / :class:`UpstreamBroken`."""

    def chunks(self, idle_timeout: float) -> AsyncIterator[bytes]:
        """The body as it arrives; :class:`UpstreamTimedOut` after ``idle_timeout`` seconds of
        silence, :class:`UpstreamBroken` when it breaks off."""

    def release(self) -> None:
        """Body fully read: the connection may be reused."""

    def close(self) -> None:
        """Drop the connection (body not read to its end, or broken)."""


class UpstreamClient(Protocol):
    """Sends requests to providers over pooled keep-alive connections."""

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
    ) -> UpstreamResponse:
        """Send a request; return when the response headers arrived. ``url`` is absolute and
        already encoded. ``first_byte_timeout`` bounds the wait for the headers and every later
        read of a body read whole; ``total_timeout`` the whole exchange, body included.
        Raises :class:`ConnectFailed`, :class:`UpstreamTimedOut`, :class:`UpstreamBroken`."""
