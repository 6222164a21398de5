"""What the request path looks at in bodies: error bodies made safe to show, and 2xx JSON
completeness.

Upstream error bodies never reach the client with key material in them: a 401 (or key-level
403) body is replaced by the proxy's own error (see ``_answers``); any other error body has the
key's value and any masked key quote (``sk-abc****wxyz``, ``sk-abc...xyz``) replaced by
``<redacted>``, whatever its content type (JSON, SSE, text).
"""

from __future__ import annotations

import re
import zlib

from sideproxy.proxy import _json

__all__ = ["decoded", "is_json", "scrub", "whole_json"]

# Masked key quotes as providers write them: "sk-abc1****...****wxyz", "sk-abc...xyz". Each
# alternative starts at a word boundary and uses possessive quantifiers: linear on any body.
_MASKED = re.compile(
    rb"(?<![\w-])(?:[\w-]*+\*{3,}[\w-]*+|[A-Za-z0-9]++[-_][\w-]*+(?:\.{3}|\xe2\x80\xa6)[\w-]++)"
)
_REDACTED = b"<redacted>"
# 2xx JSON bodies up to this are parsed (a few microseconds); larger ones only have their ends
# checked (O(1)): a float embedding of 30 KB takes ~0.3 ms to parse, too much for the hot path,
# and truncation, the real failure, shows at the end.
_JSON_PARSE_LIMIT = 4 * 1024
_WHITESPACE = b" \t\r\n"
_OPEN = b"{["
_CLOSE = b"}]"


def scrub(body: bytes, secret: str) -> bytes:
    """An upstream error body without the key's value or any masked quote of a key."""
    raw = secret.encode()
    if raw and raw in body:
        body = body.replace(raw, _REDACTED)
    return _MASKED.sub(_REDACTED, body)


def is_json(content_type: str) -> bool:
    return content_type == "application/json" or content_type.endswith("+json")


def whole_json(body: bytes) -> bool:
    """A 2xx JSON body that is one complete object or array (truncation is the real fault)."""
    if len(body) <= _JSON_PARSE_LIMIT:
        try:
            _json.loads(body)
        except (ValueError, RecursionError):
            return False
        return True
    start, end = 0, len(body)
    while end > start and body[end - 1] in _WHITESPACE:
        end -= 1
    while start < end and body[start] in _WHITESPACE:
        start += 1
    return end - start >= 2 and body[start] in _OPEN and body[end - 1] in _CLOSE


def decoded(body: bytes, encoding: str | None, cap: int) -> bytes | None:
    """An error body as plain bytes (identity, gzip or deflate, at most ``cap``), else None."""
    if not encoding or encoding.lower() == "identity":
        return body
    if encoding.lower() not in ("gzip", "x-gzip", "deflate"):
        return None
    try:
        inflater = zlib.decompressobj(wbits=47)  # gzip or zlib, by the header
        out = inflater.decompress(body, cap)
    except zlib.error:
        return None
    return None if inflater.unconsumed_tail else out
