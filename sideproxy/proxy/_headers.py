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


def _drop_set(raw: RawHeaders, base: frozenset[bytes]) -> frozenset[bytes]:
    """``base`` plus the header names a ``Connection`` header lists (hop-by-hop by RFC 9110)."""
    for name, value in raw:
        if len(name) == 10 and name.lower() == b"connection":
            tokens = value.strip().lower()
            if tokens and tokens not in _PLAIN_CONNECTION:
                return base | {token.strip() for token in tokens.split(b",")}
    return base


def request_headers(incoming: RawHeaders, auth_name: bytes, auth_value: bytes) -> RawHeaders:
    """Client headers minus hop-by-hop, credentials and framing, plus the key's auth header."""
    drop = _drop_set(incoming, _DROP_REQUEST)
    out = [(name, value) for name, value in incoming if name.lower() not in drop]
    out.append((auth_name, auth_value))
    return out


def response_headers(upstream: RawHeaders) -> list[tuple[bytes, bytes]]:
    """Provider headers minus hop-by-hop and Content-Length (the transport frames the body)."""
    drop = _drop_set(upstream, _DROP_RESPONSE)
    return [(name, value) for name, value in upstream if name.lower() not in drop]


def with_json_body(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """Headers for a body the proxy wrote instead of the provider's (JSON, not encoded)."""
    out = [(n, v) for n, v in headers if n.lower() not in (b"content-encoding", b"content-type")]
    out.append((b"Content-Type", b"application/json"))
    return out
