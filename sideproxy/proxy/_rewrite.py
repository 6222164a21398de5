r"""The request body with another model (issue 13): what a route target is sent instead of the
client's name, so that name never reaches a provider.

A splice, not a re-encode: the body is the client's bytes with only the value of its top-level
``"model"`` key replaced. That key is found as ``_model`` finds it (bytes.find in C, no parse):
an unescaped ``"model"`` token followed by ``:`` is a key (inside a JSON string every quote is
escaped). When the body holds exactly one such key it is the top-level one (``_model`` read a
top-level model from this body, so one exists) and its string value is replaced in place.
Any other body (a second ``"model"`` key nested in a tool schema or metadata, a value written
with escapes) is parsed and dumped whole, which is correct for every body and costs a parse.
So is a body holding ``\u006``: a key spelled with escapes (``"m\u006fdel"``) is invisible
to the token search, and only ASCII letters such as those of ``model`` escape to ``\u006x``,
which no JSON encoder writes unasked.

Routes apply to JSON bodies only: a multipart (audio) request names the provider's own model.
"""

from __future__ import annotations

import json
import re

__all__ = ["with_model"]

_KEY = b'"model"'
_COLON = re.compile(rb"[ \t\r\n]*+:[ \t\r\n]*+")
_ESCAPED_LETTER = b"\\u006"  # how "m", "o", "d", "e", "l" look escaped
_STRING = re.compile(rb'"(?:[^"\\]++|\\.)*+"')


def _escaped(body: bytes, pos: int) -> bool:
    run = 0
    while pos - run > 0 and body[pos - run - 1] == 0x5C:
        run += 1
    return run % 2 == 1


def _value_spans(body: bytes) -> list[tuple[int, int, int]]:
    """(key start, value start, value end) of every ``"model":`` key; value end is -1 when the
    value is not a plain string."""
    spans = []
    pos = body.find(_KEY)
    while pos >= 0:
        if not _escaped(body, pos):
            colon = _COLON.match(body, pos + len(_KEY))
            if colon is not None:
                value = _STRING.match(body, colon.end())
                spans.append((pos, colon.end(), value.end() if value is not None else -1))
        pos = body.find(_KEY, pos + 1)
    return spans


def with_model(body: bytes, old: str, new: str) -> bytes:
    """``body`` with its top-level ``model`` (now ``old``) set to ``new``."""
    spans = _value_spans(body)
    if len(spans) == 1 and _ESCAPED_LETTER not in body:
        _, start, end = spans[0]
        if end > 0 and body[start + 1 : end - 1] == old.encode():
            # The plain spelling of the model the request asked for: splice.
            encoded = json.dumps(new, ensure_ascii=False).encode()
            return body[:start] + encoded + body[end:]
    doc = json.loads(body)
    doc["model"] = new
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()
