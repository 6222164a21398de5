"""Header rules, as precomputed sets over raw byte pairs: what goes upstream, what comes back.

Compression: the upstream client passes bodies through undecoded and the client's own
``Accept-Encoding`` is forwarded (the client adds none of its own), so a compressed provider
answer reaches the client byte for byte with its ``Content-Encoding``. The proxy never parses
success bodies, so decompressing and recompressing would only burn CPU on the hot path.
"""

from __future__ import annotations

from sideproxy.proxy._exchange import RawHeaders

__all__ = [
    "AUTHORIZATION",
    "X_API_KEY",
    "request_headers",
    "response_headers",
    "with_json_body",
]

# RFC 9110 section 7.6.1 hop-by-hop headers, plus the ones the proxy recomputes or replaces.
_HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
# The client's credentials (its virtual key) never travel upstream; the proxy injects the key's.
_CLIENT_AUTH = frozenset({b"authorization", b"x-api-key", b"api-key"})
# Which organisation or project a pool key bills to is the pool's decision, not the client's:
# forwarded, these would let a client spend another org or project the key can reach.
_KEY_SCOPE = frozenset({b"openai-organization", b"openai-project"})
# Host and framing are the upstream client's to write.
_DROP_REQUEST = _HOP_BY_HOP | _CLIENT_AUTH | _KEY_SCOPE | {b"host", b"content-length", b"expect"}
_DROP_RESPONSE = _HOP_BY_HOP | {b"content-length"}
_PLAIN_CONNECTION = frozenset({b"keep-alive", b"close"})

AUTHORIZATION = b"Authorization"
X_API_KEY = b"x-api-key"


def _filtered(raw: RawHeaders, drop: frozenset[bytes]) -> list[tuple[bytes, bytes]]:
    """``raw`` without the names in ``drop``, nor those a ``Connection`` header lists as
    hop-by-hop (RFC 9110 7.6.1). One pass; a second only when such a list exists (rare)."""
    out = []
    listed: set[bytes] | None = None
    for name, value in raw:
        lowered = name.lower()
        if lowered in drop:
            if lowered == b"connection":
                tokens = value.strip().lower()
                if tokens and tokens not in _PLAIN_CONNECTION:
                    listed = {token.strip() for token in tokens.split(b",")}
            continue
        out.append((name, value))
    if listed:
        out = [(name, value) for name, value in out if name.lower() not in listed]
    return out


def request_headers(incoming: RawHeaders, auth_name: bytes, auth_value: bytes) -> RawHeaders:
    """Client headers minus hop-by-hop, credentials and framing, plus the key's auth header."""
    out = _filtered(incoming, _DROP_REQUEST)
    out.append((auth_name, auth_value))
    return out


def response_headers(upstream: RawHeaders) -> list[tuple[bytes, bytes]]:
    """Provider headers minus hop-by-hop and Content-Length (the transport frames the body)."""
    return _filtered(upstream, _DROP_RESPONSE)


def with_json_body(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """Headers for a body the proxy wrote instead of the provider's (JSON, not encoded)."""
    out = [(n, v) for n, v in headers if n.lower() not in (b"content-encoding", b"content-type")]
    out.append((b"Content-Type", b"application/json"))
    return out
