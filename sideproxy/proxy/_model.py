"""Which model a request asks for, read cheaply from its body (the pool routes on it).

JSON bodies (OpenAI, Anthropic): the value of the top-level ``"model"`` key.
- Up to ``PARSE_LIMIT`` bytes the body is parsed whole by ``json.loads``: the proxy checks a
  JSON request's validity anyway, so the model costs a dict lookup on top of that.
- Larger bodies are never parsed whole on the event loop. One C regex pass walks only the
  strings and brackets (``scan_json``), keeping the depth, and takes the ``"model"`` key found at
  depth 1. The same pass is the validity check at that size: brackets balanced and closed,
  strings closed, nesting at most ``MAX_DEPTH`` (a 100,000-deep array is refused like invalid
  JSON, as ``json.loads`` would); anything subtler is the provider's to reject.

Why a bare ``"model"`` token with a ``:`` after it is exactly a key named model: inside a JSON
string every quote is escaped, and a closing quote is never followed by a letter, so an
unescaped ``"`` followed by ``model"`` opens a string, and a ``:`` after it makes that string a
key. The scan counts depth only outside strings (the string alternative of the regex consumes
escapes), so a ``"model"`` inside ``messages`` or a tool's JSON schema is not taken.

Multipart forms (``/audio/transcriptions``, ``/audio/translations``): the value of the part
named ``model``, found by jumping from boundary to boundary (``bytes.find``) and reading each
part's header block only; the audio bytes are never scanned.

Anything else (no body, other content types, a model that is not a short string): ``None``,
and the request routes as it did before models existed.
"""

from __future__ import annotations

import json
import re

__all__ = ["MAX_DEPTH", "PARSE_LIMIT", "InvalidJSON", "model_of_form", "scan_json"]

PARSE_LIMIT = 64 * 1024
MAX_DEPTH = 512
_MAX_MODEL = 256  # a model name longer than this is not one; route as if none was given

# A whole JSON string (escapes consumed, possessive: linear) or one bracket.
# A lone quote is a string that never closes.
_TOKEN = re.compile(rb'"(?:[^"\\]++|\\.)*+"|[\[\]{}]|"')
_COLON = re.compile(rb"[ \t\r\n]*+:[ \t\r\n]*+")
_MODEL_KEY = b'"model"'
_OPENERS = frozenset(b"[{")
_PAIRS = {ord("]"): ord("["), ord("}"): ord("{")}


class InvalidJSON(ValueError):
    """A body that is not JSON (the request gets 400 invalid_json)."""


def parse_json(body: bytes) -> str | None:
    """Check a small JSON body whole and return its top-level model (or None)."""
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        raise InvalidJSON from None
    model = doc.get("model") if isinstance(doc, dict) else None
    return model if isinstance(model, str) and 0 < len(model) <= _MAX_MODEL else None


def _string_at(body: bytes, pos: int) -> str | None:
    """The JSON string value starting at ``pos`` as a model name, or None."""
    value = _TOKEN.match(body, pos)
    if value is None or body[pos] != 0x22 or not 2 < value.end() - pos <= _MAX_MODEL + 2:
        return None  # a number, null, object...; or not a name: no model
    try:
        model = json.loads(value.group())
    except ValueError:
        return None
    return model if isinstance(model, str) else None


def scan_json(body: bytes) -> str | None:
    """Check a large JSON body's structure and return its top-level model (or None)."""
    start = 0
    end = len(body)
    while start < end and body[start] in b" \t\r\n":
        start += 1
    if start == end or body[start] not in _OPENERS:
        raise InvalidJSON
    stack = bytearray()
    model: str | None = None
    last = start
    for match in _TOKEN.finditer(body, start):
        last = match.end()
        first = body[match.start()]
        if first == 0x22:  # a string
            if last - match.start() == 1:
                raise InvalidJSON  # a lone quote: a string that never closes
            if len(stack) == 1 and stack[0] == 0x7B and match.group() == _MODEL_KEY:
                colon = _COLON.match(body, last)
                if colon is not None:  # a key, not a value that reads "model"
                    model = _string_at(body, colon.end())  # the last one wins, as in json
            continue
        if first in _OPENERS:
            stack.append(first)
            if len(stack) > MAX_DEPTH:
                raise InvalidJSON
            continue
        if not stack or stack.pop() != _PAIRS[first]:
            raise InvalidJSON
        if not stack:
            break
    if stack or body[last:].strip(b" \t\r\n"):
        raise InvalidJSON
    return model


def model_of_form(body: bytes, content_type: str) -> str | None:
    """The ``model`` field of a ``multipart/form-data`` body, or None."""
    boundary = _boundary(content_type)
    if boundary is None:
        return None
    delimiter = b"--" + boundary
    pos = body.find(delimiter)
    while pos >= 0:
        head_start = pos + len(delimiter)
        if body.startswith(b"--", head_start):
            return None  # the closing delimiter
        head_end = body.find(b"\r\n\r\n", head_start, head_start + 2048)
        if head_end < 0:
            return None
        nxt = body.find(b"\r\n" + delimiter, head_end)
        if _names_model(body[head_start:head_end]):
            value = body[head_end + 4 : nxt if nxt >= 0 else len(body)].strip()
            if not 0 < len(value) <= _MAX_MODEL:
                return None
            try:
                return value.decode()
            except UnicodeDecodeError:
                return None
        pos = nxt + 2 if nxt >= 0 else -1
    return None


_NAME = re.compile(rb'(?i)content-disposition:[^\r\n]*;\s*name="?model"?\s*(?:;|\r|$)')
_BOUNDARY = re.compile(r'boundary=(?:"([^"]{1,70})"|([^;\s]{1,70}))', re.IGNORECASE)


def _names_model(head: bytes) -> bool:
    return _NAME.search(head) is not None


def _boundary(content_type: str) -> bytes | None:
    match = _BOUNDARY.search(content_type)
    if match is None:
        return None
    return (match.group(1) or match.group(2)).encode("latin-1")
