"""The body rewrite (``_rewrite.with_model``): only the top-level model changes, whatever the
body looks like; property-tested against ``json.loads``."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from sideproxy.proxy._rewrite import with_model


def _check(body: bytes, old: str, new: str) -> bytes:
    out = with_model(body, old, new)
    before, after = json.loads(body), json.loads(out)
    assert after["model"] == new
    before["model"] = new
    assert after == before  # nothing else changed
    return out


def test_a_plain_body_is_spliced_byte_for_byte() -> None:
    body = b'{"messages": [{"role": "user", "content": "say \\"model\\": fast"}], "model": "fast"}'
    out = _check(body, "fast", "gpt-4o-mini")
    assert out == body.replace(b'"model": "fast"', b'"model": "gpt-4o-mini"')


def test_a_nested_model_key_is_left_alone() -> None:
    body = json.dumps(
        {
            "model": "fast",
            "tools": [{"parameters": {"properties": {"model": {"type": "string"}}}}],
            "metadata": {"model": "fast"},
        }
    ).encode()
    out = _check(body, "fast", "x")
    assert json.loads(out)["metadata"] == {"model": "fast"}


def test_escaped_spellings_are_parsed() -> None:
    _check(b'{"m\\u006fdel": "fast", "metadata": {"model": "fast"}}', "fast", "x")
    _check(b'{"model": "f\\u0061st"}', "fast", "x")
    _check(b'{"model": "a\\/b"}', "a/b", "x")


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.sampled_from(["model", "m", "content", "x"]), inner, max_size=3)
    ),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(
    rest=st.dictionaries(st.sampled_from(["messages", "metadata", "tools"]), _JSON, max_size=3),
    old=st.sampled_from(["fast", "a/b", "llama3.1:8b"]),
    first=st.booleans(),
    ascii_=st.booleans(),
    indent=st.sampled_from([None, 2]),
)
def test_only_the_top_level_model_changes(
    rest: dict[str, Any], old: str, first: bool, ascii_: bool, indent: int | None
) -> None:
    doc = {"model": old, **rest} if first else {**rest, "model": old}
    body = json.dumps(doc, ensure_ascii=ascii_, indent=indent).encode()
    _check(body, old, "gpt-4o-mini")
