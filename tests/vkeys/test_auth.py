"""Issue 12 step 2: the presented key is found by digest, with one constant-time compare."""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

import pytest

from sideproxy.models import TableVirtualKey
from sideproxy.proxy import _auth
from sideproxy.proxy._auth import ANONYMOUS, VirtualKeys
from sideproxy.proxy._exchange import Headers


def _table(n: int) -> VirtualKeys:
    named = [
        TableVirtualKey(name=f"vk-{i}", digest=hashlib.sha256(f"v-{i}".encode()).hexdigest())
        for i in range(n)
    ]
    return VirtualKeys(["anon-1"], required=True, named=named)


def _bearer(value: str) -> Headers:
    return Headers([(b"Authorization", f"Bearer {value}".encode())])


@pytest.mark.parametrize("n", [10, 10_000])
def test_one_constant_time_compare_whatever_the_number_of_keys(
    n: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys = _table(n)
    calls: list[Any] = []
    original = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append(1)
        return original(a, b)

    monkeypatch.setattr(_auth.hmac, "compare_digest", counting)
    found = keys.identify(_bearer(f"v-{n - 1}"))
    assert found is not None
    assert found.name == f"vk-{n - 1}"
    assert len(calls) == 1
    assert keys.identify(_bearer("v-unknown")) is None
    assert len(calls) == 1  # a digest nobody has: not even one compare


def test_x_api_key_and_anonymous_keys() -> None:
    keys = _table(3)
    found = keys.identify(Headers([(b"x-api-key", b"v-1")]))
    assert found is not None
    assert found.name == "vk-1"
    anonymous = keys.identify(_bearer("anon-1"))
    assert anonymous is not None
    assert anonymous.name is None
    assert keys.identify(Headers([])) is None
    assert keys.identify(Headers([(b"Authorization", b"Basic v-1")])) is None


def test_a_virtual_key_wins_over_an_anonymous_key_with_the_same_value() -> None:
    named = [TableVirtualKey(name="batch", digest=hashlib.sha256(b"same").hexdigest())]
    found = VirtualKeys(["same"], required=True, named=named).identify(_bearer("same"))
    assert found is not None
    assert found.name == "batch"  # its limits cannot be dodged through clientAuth


def test_without_required_auth_everyone_is_anonymous_but_a_virtual_key_is_itself() -> None:
    named = [TableVirtualKey(name="batch", digest=hashlib.sha256(b"vk").hexdigest())]
    keys = VirtualKeys([], required=False, named=named)
    assert keys.identify(Headers([])) is ANONYMOUS
    assert keys.identify(_bearer("whatever")) is ANONYMOUS
    found = keys.identify(_bearer("vk"))
    assert found is not None
    assert found.name == "batch"


def test_no_digest_or_value_in_reprs() -> None:
    keys = _table(2)
    found = keys.identify(_bearer("v-1"))
    text = repr(keys) + repr(found)
    assert "v-1" not in text.replace("vk-1", "")
    assert hashlib.sha256(b"v-1").hexdigest()[:8] not in text
