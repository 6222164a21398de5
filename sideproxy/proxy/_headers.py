"""Header rules, as precomputed sets: what goes upstream, what comes back.

Compression: the upstream session runs with ``auto_decompress=False`` and the client's own
``Accept-Encoding`` is forwarded (aiohttp adds none of its own), so a compressed provider answer
reaches the client byte for byte with its ``Content-Encoding``. The proxy never parses response
bodies, so decompressing and recompressing would only burn CPU on the hot path.
"""

from __future__ import annotations

from collections.abc import Iterable

from multidict import CIMultiDict, CIMultiDictProxy, istr

__all__ = ["request_headers", "response_headers"]

# RFC 9110 section 7.6.1 hop-by-hop headers, plus the ones the proxy recomputes or replaces.
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
# The client's credentials (its virtual key) never travel upstream; the proxy injects the key's.
_CLIENT_AUTH = frozenset({"authorization", "x-api-key", "api-key"})
# Which organisation or project a pool key bills to is the pool's decision, not the client's:
# forwarded, these would let a client spend another org or project the key can reach.
_KEY_SCOPE = frozenset({"openai-organization", "openai-project"})
_DROP_REQUEST = _HOP_BY_HOP | _CLIENT_AUTH | _KEY_SCOPE | {"host", "content-length", "expect"}
_DROP_RESPONSE = _HOP_BY_HOP | {"content-length"}

AUTHORIZATION = istr("Authorization")
X_API_KEY = istr("x-api-key")


def _connection_tokens(value: str | None) -> frozenset[str]:
    if not value:
        return frozenset()
    return frozenset(token.strip().lower() for token in value.split(","))


def request_headers(
    incoming: CIMultiDictProxy[str], auth_name: istr, auth_value: str
) -> CIMultiDict[str]:
    """Client headers minus hop-by-hop, credentials and framing, plus the key's auth header."""
    drop: Iterable[str] = _DROP_REQUEST
    connection = incoming.get("Connection")
    if connection and connection.lower() not in ("keep-alive", "close"):
        drop = _DROP_REQUEST | _connection_tokens(connection)
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in incoming.items():
        if name.lower() not in drop:
            out.add(name, value)
    out[auth_name] = auth_value
    return out


def response_headers(upstream: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    """Provider headers minus hop-by-hop and Content-Length (aiohttp writes its own)."""
    drop: Iterable[str] = _DROP_RESPONSE
    connection = upstream.get("Connection")
    if connection and connection.lower() not in ("keep-alive", "close"):
        drop = _DROP_RESPONSE | _connection_tokens(connection)
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in upstream.items():
        if name.lower() not in drop:
            out.add(name, value)
    return out
