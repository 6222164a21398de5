"""The request path's JSON reads (``_json.loads``): orjson's speed, ``json.loads``'s verdict."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sideproxy.proxy import _json
from sideproxy.proxy._bodies import whole_json
from sideproxy.proxy._model import InvalidJSON, parse_json

_SCALARS = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text()
_DOCS = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@given(_DOCS)
def test_reads_what_json_reads(doc: object) -> None:
    body = json.dumps(doc).encode()
    assert _json.loads(body) == json.loads(body)


@pytest.mark.parametrize(
    "body",
    [
        b'{"model": "m", "temperature": NaN}',  # json's extension: orjson refuses it
        b'{"text": "\\ud800"}',  # a lone surrogate escape
        '{"model": "m"}'.encode("utf-16"),  # json.loads detects UTF-16 bytes
    ],
)
def test_what_only_json_accepts_is_still_accepted(body: bytes) -> None:
    assert _json.loads(body) == json.loads(body)


_REFUSED = (json.JSONDecodeError, UnicodeDecodeError)


@pytest.mark.parametrize("body", [b"", b"{", b'{"model": "m",}', b"\xff\xfe{", b"[1, 2"])
def test_what_json_refuses_is_refused(body: bytes) -> None:
    with pytest.raises(_REFUSED):
        json.loads(body)
    with pytest.raises(_REFUSED):
        _json.loads(body)


def test_an_integer_past_64_bits_reads_as_a_float() -> None:
    # The one documented difference: valid either way, never a token count or a model.
    assert _json.loads(b'{"seed": 123456789012345678901234567890}') == {
        "seed": 1.2345678901234568e29
    }


def test_the_stages_keep_their_verdicts() -> None:
    assert parse_json(b'{"model": "llama", "x": NaN}') == "llama"
    with pytest.raises(InvalidJSON):
        parse_json(b'{"model": "llama",')
    assert whole_json(b'{"usage": {"prompt_tokens": Infinity}}')
    assert not whole_json(b'{"choices": [')
