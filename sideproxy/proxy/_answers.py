"""What the client is told when a provider said no: error bodies made safe, retry advice.

A provider's error answer is replayed to the client only after ``safe_error``: a 401 (or a
403 whose code says the key itself is bad) is replaced by the proxy's own body, because it
describes the pool's key, not the client's request; a body the proxy cannot read (too large,
an encoding it does not decode) is replaced too; any other body is scrubbed (``_bodies``).
"""

from __future__ import annotations

from sideproxy.proxy._bodies import decoded, scrub
from sideproxy.proxy._errors import error_body
from sideproxy.proxy._exchange import UpstreamResponse
from sideproxy.proxy._headers import response_headers, with_json_body

__all__ = ["ERROR_CAP", "Failure", "readable", "retry_headers", "safe_error"]

ERROR_CAP = 65536  # error bodies are read (and scrubbed) up to this even when buffer_limit is 0


class Failure:
    """A provider answer that made us move on; replayed if no attempt is left."""

    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        self.status = status
        self.headers = headers  # ready to send
        self.body = body


def readable(resp: UpstreamResponse, payload: bytes | None) -> bytes | None:
    """An error body as plain bytes (identity, gzip or deflate), or None when it cannot be."""
    if payload is None:
        return None
    return decoded(payload, resp.headers.get("content-encoding"), ERROR_CAP)


def safe_error(
    secret: str,
    resp: UpstreamResponse,
    payload: bytes | None,
    provider: str,
    *,
    plain: bytes | None,
    rejected: bool,
) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """(headers, a body safe to show) for an error answer: ``payload`` as read (None: over the
    cap), ``plain`` as decoded (``readable``). ``rejected``: it says the key itself is bad."""
    status = resp.status
    headers = response_headers(resp.raw_headers)
    if rejected:
        body = error_body(
            f"provider {provider} rejected a key of this pool (HTTP {status}); that key is "
            "out of rotation until a probe finds it working again, and no other key could "
            "answer",
            "authentication_error",
            "upstream_key_rejected",
        )
        return with_json_body(headers), body
    if plain is None:
        why = "too large" if payload is None else "encoded"
        body = error_body(
            f"provider {provider} answered HTTP {status} (its error body is {why} to show)",
            "proxy_error" if status >= 500 else "invalid_request_error",
            "upstream_error",
        )
        return with_json_body(headers), body
    if plain is not payload:  # decoded here: the client gets it plain
        headers = [(n, v) for n, v in headers if n.lower() != b"content-encoding"]
    return headers, scrub(plain, secret)


def retry_headers(headers: list[tuple[bytes, bytes]], seconds: int) -> list[tuple[bytes, bytes]]:
    """The pool's retry advice in both forms the SDKs read (``retry-after-ms`` first) so they
    agree; the last provider's own would speak for one key only."""
    kept = [(n, v) for n, v in headers if n.lower() not in (b"retry-after", b"retry-after-ms")]
    kept.append((b"Retry-After", str(seconds).encode()))
    kept.append((b"retry-after-ms", str(seconds * 1000).encode()))
    return kept
