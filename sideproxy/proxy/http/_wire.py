"""Bytes on the wire, precomputed where they can be: status lines, fixed headers, chunk frames,
and the proxy's own error answers (the OpenAI shape, from ``_errors.error_body``)."""

from __future__ import annotations

from collections.abc import Iterable
from http import HTTPStatus

from sideproxy.proxy._errors import error_body

__all__ = [
    "CHUNKED",
    "CLOSE",
    "CONTINUE",
    "LAST_CHUNK",
    "NO_BODY_STATUS",
    "chunk",
    "error_answer",
    "head",
    "status_line",
]

_LINES: dict[int, bytes] = {
    s.value: b"HTTP/1.1 %d %s\r\n" % (s.value, s.phrase.encode()) for s in HTTPStatus
}
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
CHUNKED = b"Transfer-Encoding: chunked\r\n"
CLOSE = b"Connection: close\r\n"
LAST_CHUNK = b"0\r\n\r\n"
_JSON = b"Content-Type: application/json\r\n"
# Statuses whose responses never carry a body (RFC 9110 6.4.1).
NO_BODY_STATUS = frozenset({204, 304})
# Framing is ours: these never pass from a handler's headers to the wire.
_FRAMING = frozenset({b"transfer-encoding", b"connection", b"keep-alive", b"content-length"})


def status_line(status: int) -> bytes:
    line = _LINES.get(status)
    if line is None:
        line = b"HTTP/1.1 %d Unknown\r\n" % status
    return line


def head(
    status: int, headers: Iterable[tuple[bytes, bytes]], close: bool, length: int | None
) -> bytes:
    """A response head. ``length`` None: chunked; < 0: no body framing (HEAD, 204, 304, or a
    Content-Length the handler passes through for a HEAD answer: it is in ``headers``)."""
    parts = [status_line(status)]
    for name, value in headers:
        if name.lower() in _FRAMING:
            continue
        parts.append(b"%b: %b\r\n" % (name, value))
    if length is None:
        parts.append(CHUNKED)
    elif length >= 0:
        parts.append(b"Content-Length: %d\r\n" % length)
    if close:
        parts.append(CLOSE)
    parts.append(b"\r\n")
    return b"".join(parts)


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


def error_answer(
    status: int,
    message: str,
    type_: str,
    code: str,
    extra: Iterable[tuple[bytes, bytes]] = (),
    *,
    close: bool = True,
) -> bytes:
    """A whole error response in the OpenAI shape; by default it closes the connection."""
    body = error_body(message, type_, code)
    parts = [status_line(status), _JSON, b"Content-Length: %d\r\n" % len(body)]
    parts.extend(b"%b: %b\r\n" % (name, value) for name, value in extra)
    if close:
        parts.append(CLOSE)
    parts.append(b"\r\n")
    parts.append(body)
    return b"".join(parts)
