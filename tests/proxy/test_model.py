"""Reading the model from a request body: the bounded scan agrees with ``json.loads``.

The scan (``scan_json``, used above ``PARSE_LIMIT``) must take exactly the top-level ``model``
that a full parse takes, on any JSON, including bodies built to fool a text search: a
``"model"`` inside strings, escaped quotes, nested objects, tool schemas, duplicate keys.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sideproxy.proxy._model import (
    PARSE_LIMIT,
    InvalidJSON,
    model_of_form,
    parse_json,
    scan_json,
)

_KEYS = st.sampled_from(["model", "messages", 'a"model', "model\\", "x", "\u00e9", "mod el"])
_TEXT = st.sampled_from(['"model": "evil"', '\\"model\\":', "model", "}", "]", "\\", "\u2028", ""])
_LEAVES = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=8), _TEXT
)
_JSON = st.recursive(
    _LEAVES,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.one_of(_KEYS, st.text(max_size=5)), inner)
    ),
    max_leaves=30,
)


def _expected(doc: Any) -> str | None:
    model = doc.get("model") if isinstance(doc, dict) else None
    return model if isinstance(model, str) and 0 < len(model) <= 256 else None


@settings(max_examples=200, deadline=None)
@given(doc=st.dictionaries(st.one_of(_KEYS, st.text(max_size=5)), _JSON), spaced=st.booleans())
def test_scan_agrees_with_json_loads(doc: dict[str, Any], spaced: bool) -> None:
    body = json.dumps(doc, indent=1 if spaced else None, ensure_ascii=spaced).encode()
    assert scan_json(body) == _expected(doc) == parse_json(body)


@pytest.mark.parametrize(
    ("body", "model"),
    [
        (b'{"messages": [{"content": "\\"model\\": \\"evil\\""}], "model": "good"}', "good"),
        (b'{"a\\"model": "evil", "model": "good"}', "good"),
        (
            b'{"tools": [{"parameters": {"properties": {"model": "evil"}}}], "model": "good"}',
            "good",
        ),
        (b'{"x": "model", "y": {"model": "evil"}}', None),
        (b'{"model": "first", "model": "last"}', "last"),
        (b'{"model": {"name": "evil"}}', None),
        (b'{"model":"a\\u00e9"}', "a\u00e9"),
        (b'{"content": "\\\\", "model": "good"}', "good"),
    ],
)
def test_adversarial_bodies(body: bytes, model: str | None) -> None:
    assert scan_json(body) == model == parse_json(body)


@pytest.mark.parametrize(
    "body",
    [
        b'{"model": "a", "messages": [',
        b"[" * 100_000 + b"]" * 100_000,
        b'{"model": "a"} x',
        b"",
        b"   ",
        b'"model"',
        b'[{"model": "evil"}]',
    ],
)
def test_truncated_or_non_object_bodies_are_refused(body: bytes) -> None:
    with pytest.raises(InvalidJSON):
        scan_json(body)


def test_a_large_chat_body_with_the_model_last() -> None:
    """The OpenAI SDK sends ``messages`` before ``model``: the model is at the far end."""
    messages = [{"role": "user", "content": "x" * 1000 + ' "model": "evil" '}] * 200
    body = json.dumps({"messages": messages, "model": "big"}).encode()
    assert len(body) > PARSE_LIMIT
    assert scan_json(body) == "big"


def _form(boundary: str, *parts: tuple[str, bytes]) -> bytes:
    out = b""
    for head, value in parts:
        out += f"--{boundary}\r\n{head}\r\n\r\n".encode() + value + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


def test_the_model_field_of_a_multipart_form() -> None:
    audio = b'\x00name="model"\r\n\r\nevil' * 100
    body = _form(
        "b0undary",
        ('Content-Disposition: form-data; name="file"; filename="a.mp3"', audio),
        ('Content-Disposition: form-data; name="model"', b"whisper-large-v3"),
    )
    ctype = "multipart/form-data; boundary=b0undary"
    assert model_of_form(body, ctype) == "whisper-large-v3"
    assert model_of_form(body, 'multipart/form-data; boundary="b0undary"') == "whisper-large-v3"
    no_model = _form("b0undary", ('Content-Disposition: form-data; name="file"', audio))
    assert model_of_form(no_model, ctype) is None
    assert model_of_form(body, "multipart/form-data") is None
