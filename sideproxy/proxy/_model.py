"""Which model a request asks for, read cheaply from its body (the pool routes on it).

JSON bodies (OpenAI, Anthropic): the value of the top-level ``"model"`` key.
- Up to ``PARSE_LIMIT`` bytes the body is parsed whole (``_json.loads``: orjson, with
  ``json.loads``'s verdict): the proxy checks a JSON request's validity anyway, so the model
  costs a dict lookup on top of that.
- Larger bodies are never parsed whole on the event loop. ``bytes.rfind`` locates each
  ``"model"`` token from the end; one followed by ``:`` is a key; it is the top-level one when
  the brackets outside strings on its shorter side (before it, or after it) leave exactly one
  object open. Every pass runs in C (``rfind``, one regex ``sub`` that drops strings,
  ``count``): a 1 MB chat body with the model last costs ~5 µs instead of a ~2 ms parse
  (``bench/model_read.py``). A body with more than ``_MAX_CANDIDATES`` such keys is parsed
  whole instead. The validity check at that
  size is the outline a truncated or non-object body fails (one object: ``{`` ... ``}``); what
  is subtler is the provider's to reject.

Why a bare ``"model"`` token with a ``:`` after it is exactly a key named model, in valid JSON:
inside a string every quote is escaped (an odd run of backslashes before it), and a closing
quote is never followed by a letter, so an unescaped ``"`` followed by ``model"`` opens a
string, and a ``:`` after it makes that string a key. A ``"model"`` inside ``messages`` or a
tool's JSON schema is deeper than one object, so it is not taken.

Multipart forms (``/audio/transcriptions``, ``/audio/translations``): the value of the part
named ``model``, found by jumping from boundary to boundary (``bytes.find``) and reading each
part's header block only; the audio bytes are never scanned.

Anything else (no body, other content types, a model that is not a short string): ``None``,
and the request routes as it did before models existed.
"""

from __future__ import annotations

import re

from sideproxy.proxy import _json

__all__ = [
    "PARSE_LIMIT",
    "InvalidJSON",
    "model_of_form",
    "model_span",
    "parse_json",
    "scan_json",
]

PARSE_LIMIT = 64 * 1024
_MAX_MODEL = 256  # a model name longer than this is not one; route as if none was given

# A whole JSON string (escapes consumed, possessive: linear) or one bracket.
_STRING = re.compile(rb'"(?:[^"\\]++|\\.)*+"')
_TOKEN = re.compile(rb'"(?:[^"\\]++|\\.)*+"|[\[\]{}]')
_MAX_CANDIDATES = 8  # "model" keys looked at before the scan gives way to a full parse
_COLON = re.compile(rb"[ \t\r\n]*+:[ \t\r\n]*+")
_MODEL_KEY = b'"model"'


class InvalidJSON(ValueError):
    """A body that is not JSON (the request gets 400 invalid_json)."""


def parse_json(body: bytes) -> str | None:
    """Check a small JSON body whole and return its top-level model (or None)."""
    try:
        doc = _json.loads(body)
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
        model = _json.loads(value.group())
    except ValueError:
        return None
    return model if isinstance(model, str) else None


def _depth(segment: bytes) -> int:
    """Openers minus closers outside strings (every pass in C: one regex sub, four counts)."""
    bare = _STRING.sub(b"", segment)
    return bare.count(b"{") + bare.count(b"[") - bare.count(b"}") - bare.count(b"]")


def _top_level(body: bytes, start: int, key: int, after: int, end: int) -> bool:
    """Is the key at ``key`` (value from ``after``) directly inside the outermost object?
    Counted over the shorter side: the prefix must leave one bracket open, the suffix close
    exactly one."""
    if key - start <= end - after:
        return _depth(body[start:key]) == 1
    return _depth(body[after:end]) == -1


def _escaped(body: bytes, pos: int) -> bool:
    """Is the quote at ``pos`` escaped (an odd run of backslashes before it)?"""
    run = 0
    while pos - run > 0 and body[pos - run - 1] == 0x5C:
        run += 1
    return run % 2 == 1


def scan_json(body: bytes) -> str | None:
    """Check a large JSON body's outline and return its top-level model (or None)."""
    start, end = _outline(body)
    at = _model_value(body, start, end)
    if at is None:
        return parse_json(body)  # built to be expensive to scan: the full parse decides
    return None if at < 0 else _string_at(body, at)


def model_span(body: bytes) -> tuple[int, int] | None:
    """Where the top-level model's value is written, quotes included: ``body[start:end]``,
    found as ``scan_json`` finds it, for a caller that replaces it (routes, ``_rewrite``).
    None when the scan cannot tell (no plain top-level ``"model"`` key, a value that is not a
    string, more candidates than it looks at): parse the body instead. Raises
    :class:`InvalidJSON` for a body that is not one object."""
    start, end = _outline(body)
    at = _model_value(body, start, end)
    if at is None or at < 0:
        return None
    value = _STRING.match(body, at)
    return None if value is None else (at, value.end())


def _outline(body: bytes) -> tuple[int, int]:
    """The object's first and past-last byte, whitespace aside; or InvalidJSON."""
    start, end = 0, len(body)
    while start < end and body[start] in b" \t\r\n":
        start += 1
    while end > start and body[end - 1] in b" \t\r\n":
        end -= 1
    if end - start < 2 or body[start] != 0x7B or body[end - 1] != 0x7D:
        raise InvalidJSON  # a request body is one object; truncation shows at its end
    return start, end


def _model_value(body: bytes, start: int, end: int) -> int | None:
    """Where the top-level ``"model"`` key's value starts; -1: there is none; None: more
    candidates than ``_MAX_CANDIDATES`` (the caller parses)."""
    # From the end: the last top-level key wins (as in json.loads), and SDKs write "model"
    # after "messages", so the first candidate is usually the answer.
    pos = body.rfind(_MODEL_KEY, start, end)
    for _ in range(_MAX_CANDIDATES):
        if pos < 0:
            return -1
        colon = None if _escaped(body, pos) else _COLON.match(body, pos + len(_MODEL_KEY))
        if colon is not None and _top_level(body, start, pos, colon.end(), end):
            return colon.end()
        pos = body.rfind(_MODEL_KEY, start, pos + len(_MODEL_KEY) - 1)
    return None


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
