"""``headroom`` reads a successful answer's budgets exactly as the plain reading of its rule.

``headroom`` is on every successful request, so it is written for speed (fewest lookups, an
``int`` parse for plain counts). ``reference`` below is the plain reading it replaced, kept here
so that the fast one is held to the same answers over random header sets.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sideproxy.pool._headers import (
    ANTHROPIC_DIMENSIONS,
    _count,
    headroom,
    parse_go_duration,
    parse_rfc3339,
)
from sideproxy.proxy._exchange import Headers

NOW = 1_800_000_000.0
_MAX_HEADER = 64


def _seconds(value: str) -> float | None:
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) else None


def _number(headers: Mapping[str, str], name: str) -> float | None:
    raw = headers.get(name)
    if raw is None or len(raw) > _MAX_HEADER:
        return None
    return _seconds(raw)


def reference(
    headers: Mapping[str, str], now: float, floor: int, fraction: float, fallback: float
) -> tuple[float | None, float | None]:
    """The rule read plainly: every budget, every header of it, parsed as a float."""
    budgets = [
        tuple(f"x-ratelimit-{part}-{d}" for part in ("remaining", "limit", "reset"))
        for d in ("requests", "tokens")
    ] + [
        tuple(f"anthropic-ratelimit-{d}-{part}" for part in ("remaining", "limit", "reset"))
        for d in ANTHROPIC_DIMENSIONS
    ]
    low: float | None = None
    spent: float | None = None
    for names in budgets:
        remaining_name, limit_name, reset_name = names
        counts_requests = "requests" in remaining_name
        remaining = _number(headers, remaining_name)
        if remaining is None:
            continue
        limit = _number(headers, limit_name)
        is_low = (counts_requests and remaining <= floor) or (
            limit is not None and limit > 0 and remaining <= limit * fraction
        )
        if not is_low and remaining > 0:
            continue
        reset_raw = headers.get(reset_name)
        delay: float | None = None
        if reset_raw is not None:
            if reset_name.startswith("x-"):
                delay = parse_go_duration(reset_raw)
            else:
                delay = parse_rfc3339(reset_raw, now)
        known = delay is not None and delay > 0
        deadline = now + (delay if delay is not None and known else fallback)
        low = deadline if low is None else max(low, deadline)
        if remaining <= 0 and known:
            spent = deadline if spent is None else max(spent, deadline)
    return low, spent


_DIMENSIONS = [f"x-ratelimit-{{}}-{d}" for d in ("requests", "tokens")] + [
    f"anthropic-ratelimit-{d}-{{}}" for d in ANTHROPIC_DIMENSIONS
]

# Numbers as providers send them, and the odd ones a number parser may read differently.
numbers = st.one_of(
    st.integers(-5, 20_000).map(str),
    st.integers(-(10**20), 10**20).map(str),  # past 2**53: a float rounds them
    st.sampled_from(
        [
            "0",
            "-0",
            "+3",
            " 7 ",
            "\u00a012",  # a non-breaking space around a number: Python's float strips it
            "1_000",
            "\u0661\u0662",  # Arabic-Indic digits: float and int both read them
            "\u00b2",  # a superscript two: a digit to str.isdigit, a number to neither
            "9007199254740993",
            "9" * 64,
            "9" * 65,
            "0.5",
            "1e3",
            "inf",
            "nan",
            "-inf",
            "",
            "x",
        ]
    ),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.text(max_size=8),
)
resets = st.one_of(
    st.sampled_from(["6s", "33ms", "1m0s", "0s", "0", "-1s", "garbage", ""]),
    st.floats(-100, 100_000).map(lambda s: datetime.fromtimestamp(NOW + s, UTC).isoformat()),
    st.text(max_size=8),
)


@st.composite
def budget_headers(draw: st.DrawFn) -> dict[str, str]:
    headers: dict[str, str] = {}
    for pattern in draw(st.lists(st.sampled_from(_DIMENSIONS), unique=True, max_size=6)):
        if draw(st.integers(0, 9)):  # a budget without its remaining is not read at all
            headers[pattern.format("remaining")] = draw(numbers)
        if draw(st.booleans()):
            headers[pattern.format("limit")] = draw(numbers)
        if draw(st.booleans()):
            headers[pattern.format("reset")] = draw(resets)
    if draw(st.booleans()):
        headers["content-type"] = "application/json"
    return headers


# Headers, and the policy's floor, fraction and fallback: what every comparison below draws.
_POLICIES = given(
    budget_headers(),
    st.integers(-1, 100),
    st.sampled_from([0.0, 0.01, 0.1, 0.5, 1.0, 2.0]),
    st.sampled_from([0.0, 1.0, 5.5]),
)


@settings(max_examples=500)
@_POLICIES
def test_headroom_is_the_plain_rule(
    headers: dict[str, str], floor: int, fraction: float, fallback: float
) -> None:
    assert headroom(headers, NOW, floor, fraction, fallback) == reference(
        headers, NOW, floor, fraction, fallback
    )


class Indexed(Mapping[str, str]):
    """As the proxy's Headers: any-case names, values decoded as latin-1, and ``raw_index()``
    (lower-case name bytes -> value bytes) for a reader that would rather have the bytes."""

    def __init__(self, raw: Mapping[bytes, bytes]) -> None:
        self._index = {name.lower(): value for name, value in raw.items()}

    def raw_index(self) -> dict[bytes, bytes]:
        return self._index

    def __getitem__(self, name: str) -> str:
        return self._index[name.lower().encode("latin-1")].decode("latin-1")

    def __iter__(self) -> Iterator[str]:
        return (name.decode("latin-1") for name in self._index)

    def __len__(self) -> int:
        return len(self._index)


def _wire(value: str) -> bytes:
    """A value as a provider could put it on the wire (latin-1 if it can be, else UTF-8)."""
    try:
        return value.encode("latin-1")
    except UnicodeEncodeError:
        return value.encode("utf-8")


@settings(max_examples=500)
@_POLICIES
def test_headroom_through_a_raw_index_is_the_plain_rule(
    headers: dict[str, str], floor: int, fraction: float, fallback: float
) -> None:
    indexed = Indexed({name.upper().encode(): _wire(value) for name, value in headers.items()})
    # What the str interface says, read plainly, is what the bytes must say too.
    plain = {name: indexed[name] for name in indexed}
    assert headroom(indexed, NOW, floor, fraction, fallback) == reference(
        plain, NOW, floor, fraction, fallback
    )


@pytest.mark.parametrize(
    "value",
    [b"\xa012", b"\x8512", b"12\x85", b"\xb2", b"1_0", b" 12\t", b"12\x00", b"0.5", b"\xff"],
)
def test_raw_values_that_ascii_int_refuses_are_read_as_text(value: bytes) -> None:
    indexed = Indexed(
        {b"x-ratelimit-remaining-requests": value, b"x-ratelimit-reset-requests": b"6s"}
    )
    plain = {name: indexed[name] for name in indexed}
    assert headroom(indexed, NOW, 20, 0.01, 1.0) == reference(plain, NOW, 20, 0.01, 1.0)


OPENAI = {
    "x-ratelimit-limit-requests": "14400",
    "x-ratelimit-remaining-requests": "14399",
    "x-ratelimit-reset-requests": "6s",
    "x-ratelimit-limit-tokens": "18000",
    "x-ratelimit-remaining-tokens": "17990",
    "x-ratelimit-reset-tokens": "33ms",
}


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({}, (None, None)),  # the common answer: plenty left
        ({"x-ratelimit-remaining-requests": "1"}, (NOW + 6.0, None)),  # at the floor
        ({"x-ratelimit-remaining-tokens": "180"}, (NOW + 0.033, None)),  # 1% of the limit
        ({"x-ratelimit-remaining-tokens": "181"}, (None, None)),
        ({"x-ratelimit-remaining-tokens": "0"}, (NOW + 0.033, NOW + 0.033)),  # spent
        ({"x-ratelimit-remaining-tokens": "0.0"}, (NOW + 0.033, NOW + 0.033)),
        ({"x-ratelimit-remaining-tokens": "0", "x-ratelimit-reset-tokens": "?"}, (NOW + 1, None)),
        ({"x-ratelimit-remaining-tokens": "nan"}, (None, None)),  # not a number: not read
        ({"x-ratelimit-limit-tokens": "inf", "x-ratelimit-remaining-tokens": "5"}, (None, None)),
        ({"anthropic-ratelimit-output-tokens-remaining": "0"}, (NOW + 1.0, None)),  # no reset
    ],
)
def test_headroom_common_answers(
    changes: dict[str, str], expected: tuple[float | None, float | None]
) -> None:
    headers = OPENAI | changes
    got = headroom(headers, NOW, 1, 0.01, 1.0)
    assert got == pytest.approx(expected)
    assert got == reference(headers, NOW, 1, 0.01, 1.0)
    indexed = Indexed({name.encode(): value.encode() for name, value in headers.items()})
    assert headroom(indexed, NOW, 1, 0.01, 1.0) == got


def test_counts_past_two_to_the_53_compare_as_the_float_would() -> None:
    # float("9007199254740993") is 2**53: as a float the remaining equals the limit (low).
    headers = {
        "x-ratelimit-limit-tokens": "9007199254740992",
        "x-ratelimit-remaining-tokens": "9007199254740993",
    }
    assert headroom(headers, NOW, 1, 1.0, 1.0) == (NOW + 1.0, None)
    assert reference(headers, NOW, 1, 1.0, 1.0) == (NOW + 1.0, None)


def test_many_distinct_limits_read_the_same() -> None:
    for _ in range(2):  # a second reading of the same answers says the same
        for limit in range(1000, 1400):
            headers = {"x-ratelimit-limit-tokens": str(limit), "x-ratelimit-remaining-tokens": "12"}
            expected = reference(headers, NOW, 1, 0.01, 1.0)
            assert expected == ((NOW + 1.0, None) if limit >= 1200 else (None, None))
            assert headroom(headers, NOW, 1, 0.01, 1.0) == expected
            indexed = Indexed({name.encode(): value.encode() for name, value in headers.items()})
            assert headroom(indexed, NOW, 1, 0.01, 1.0) == expected


@settings(max_examples=1000)
@given(
    st.one_of(
        st.text(alphabet="0123456789 _+-.e\t\u00a0\u0661\u00b2", max_size=18),
        st.text(max_size=18),
    )
)
def test_a_count_reads_as_its_float(text: str) -> None:
    number = _seconds(text) if len(text) <= _MAX_HEADER else None
    assert _count(text) == number  # an int where it can be, equal to the float
    raw = text.encode("latin-1", "replace")
    assert _count(raw) == _count(raw.decode("latin-1"))


@settings(max_examples=200)
@_POLICIES
def test_headroom_through_the_proxys_headers_is_the_plain_rule(
    headers: dict[str, str], floor: int, fraction: float, fallback: float
) -> None:
    # The mapping the proxy really passes (it offers raw_index()), names as providers spell them.
    wire = Headers([(name.title().encode(), _wire(value)) for name, value in headers.items()])
    assert hasattr(wire, "raw_index")
    plain = {name: wire[name] for name in wire}
    assert headroom(wire, NOW, floor, fraction, fallback) == reference(
        plain, NOW, floor, fraction, fallback
    )
