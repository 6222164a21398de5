"""Stage 4, relay: pass a streamed answer through chunk by chunk, and end it honestly.

The relay only moves bytes and reports what it saw (:class:`Relayed`); the forwarder decides
what the key learns. Back-pressure: ``Responder.write`` waits until the client takes the chunk,
so a slow client slows the upstream read instead of filling memory.

An SSE stream of chat/completions (``data: [DONE]``) or Anthropic messages (``message_stop``)
that ends without its final event gets an error event appended, so a client cannot mistake a
truncated answer for a whole one; a non-SSE body that breaks off has its connection aborted.
The same holds for a stream the proxy itself cuts when its shutdown grace runs out (``cut``).
"""

from __future__ import annotations

import json
import time

from sideproxy.proxy._exchange import (
    ClientGone,
    Responder,
    UpstreamBroken,
    UpstreamResponse,
    UpstreamTimedOut,
)
from sideproxy.proxy._headers import response_headers

__all__ = ["Relayed", "end_broken", "missing_final_event", "relay"]

_WINDOW = 512


class Relayed:
    """What one streamed relay saw."""

    __slots__ = ("broke", "client_gone", "cut", "first_at", "prev", "tail", "timed_out")

    def __init__(self) -> None:
        self.client_gone = False
        self.cut = False  # the proxy is shutting down: its task was cancelled mid-stream
        self.broke = False  # the upstream broke off (reset, malformed)
        self.timed_out = False  # the upstream went silent past the idle timeout
        self.first_at: float | None = None  # monotonic time the first chunk reached the client
        self.prev = b""
        self.tail = b""

    @property
    def window(self) -> bytes:
        """The stream's last bytes (at least ``_WINDOW`` when there were that many)."""
        tail = self.tail
        return tail[-_WINDOW:] if len(tail) >= _WINDOW else self.prev[-_WINDOW:] + tail


async def relay(
    resp: UpstreamResponse, out: Responder, idle: float, seen: Relayed | None = None
) -> Relayed:
    """Start the client's answer with the provider's status and headers, then copy chunks.
    ``seen`` (the caller's, when it must know what went out even if this is cancelled)."""
    if seen is None:
        seen = Relayed()
    try:
        await out.start(resp.status, response_headers(resp.raw_headers), resp.content_length)
    except ClientGone:
        seen.client_gone = True
        return seen
    try:
        async for chunk in resp.chunks(idle):
            # Recorded before the write: a cancel while it waits on the client still knows
            # how the bytes on the wire end (end_broken's prefix).
            seen.prev, seen.tail = seen.tail, chunk
            await out.write(chunk)
            if seen.first_at is None:
                seen.first_at = time.monotonic()
    except ClientGone:
        seen.client_gone = True
    except UpstreamTimedOut:
        seen.timed_out = True
    except UpstreamBroken:
        seen.broke = True
    return seen


def missing_final_event(seen: Relayed, terminator: bytes | None) -> bool:
    return terminator is not None and terminator not in seen.window


def _frame(anthropic: bool, message: str, code: str) -> bytes:
    if anthropic:
        error = {"type": "error", "error": {"type": "api_error", "message": message}}
        return b"event: error\ndata: " + json.dumps(error).encode()
    return (
        b"data: "
        + json.dumps({"error": {"message": message, "type": "proxy_error", "code": code}}).encode()
    )


async def end_broken(
    out: Responder, resp: UpstreamResponse, seen: Relayed, *, anthropic: bool
) -> None:
    """SSE: a final error event, then a clean end. Anything else: abort the connection."""
    if resp.content_type != "text/event-stream":
        out.abort()
        return
    if seen.cut:
        message, code = "the proxy is shutting down: stream cut before its end", "proxy_shutdown"
    elif not (seen.broke or seen.timed_out):
        message, code = "upstream stream ended before its final event", "upstream_stream_incomplete"
    elif seen.timed_out:
        message, code = "upstream stream timed out", "upstream_timeout"
    else:
        message, code = "upstream stream broke off", "upstream_stream_error"
    tail = seen.tail
    prefix = b"" if not tail or tail.endswith(b"\n\n") else b"\n\n"
    try:
        await out.write(prefix + _frame(anthropic, message, code) + b"\n\n")
    except ClientGone:
        return
    await out.finish()
