"""Fuzz: the request-path parser and the rate-limit header parsers never raise anything
unexpected, never let a path escape the configured base URL, and never yield a negative, NaN or
absurd cool-down (floor ``PoolPolicy.min_cooldown``, cap ``PoolPolicy.max_cooldown``).

Wider than ``tests/pool/test_headers.py``'s fuzz: arbitrary unicode, huge and tiny numbers,
``nan`` / ``inf`` spellings, HTTP-dates and RFC 3339 stamps from year 1 to 9999, Go durations
that overflow, and the pool's own state after learning from such headers.
"""

from __future__ import annotations

import contextlib
import math
import re
from datetime import UTC, datetime, timedelta, timezone
from email.utils import format_datetime

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from yarl import URL

from sideproxy.pool import KeyConfig, ManagedCreditPool, Outcome, PoolPolicy, retry_delay
from sideproxy.pool._headers import headroom_exhausted_until
from sideproxy.proxy._errors import BadRequest, NotFound
from sideproxy.proxy._paths import parse_target

FUZZ = settings(
    max_examples=400,
    deadline=None,
    database=None,  # nothing written to disk
    suppress_health_check=[HealthCheck.too_slow],
)

# --------------------------------------------------------------------------- paths

PIECES = [
    "v1", "v1", "chat", "completions", "models", "groq", "anthropic", "..", ".", "", "%2e",
    "%2E%2e", ".%2e", "%252e%252e", "%2f", "%2F", "%5c", "%255c", "\\", "@", "127.0.0.1:9999",
    "attacker", "%0d%0a", "%0a", "%00", "%7f", "\r\n", "\n", "\t", " ", "#", "?", "?x=1",
    "%3f", "%23", "é", "\u202e", "\x00", ";", ":", "%", "%zz", "~", "*",
]  # fmt: skip
PREFIXES = ["/", "//", "", "http://", "https://attacker/", "\\", "/./", "*"]

paths = st.one_of(
    st.text(max_size=80),
    st.builds(
        lambda pre, parts: pre + "/".join(parts),
        st.sampled_from(PREFIXES),
        st.lists(st.one_of(st.sampled_from(PIECES), st.text(max_size=6)), max_size=8),
    ),
)

BASE = "http://127.0.0.1:9/openai/v1"
_SAFE = re.compile(r"^[\x21-\x7e]*$")


@FUZZ
@given(paths)
def test_parse_target_never_escapes_the_base_url(raw: str) -> None:
    try:
        prefix, rest, query = parse_target(raw)
    except (BadRequest, NotFound):
        return  # a 400 or a 404 in the error shape; nothing else may escape
    assert prefix is None or (prefix and "/" not in prefix)
    assert rest == "" or rest.startswith("/")
    assert _SAFE.match(rest), rest
    assert _SAFE.match(query), query
    assert "#" not in rest + query
    assert "\\" not in rest
    assert "//" not in rest
    segments = rest.split("/")
    assert ".." not in segments
    assert "." not in segments
    lowered = rest.lower()
    for encoded in ("%2e", "%2f", "%5c", "%252e", "%252f", "%255c"):
        assert encoded not in lowered
    target = BASE + rest + (f"?{query}" if query else "")
    url = URL(target, encoded=True)
    assert (url.scheme, url.host, url.port) == ("http", "127.0.0.1", 9)
    assert url.user is None
    assert url.raw_path.startswith("/openai/v1")
    assert not url.fragment


@FUZZ
@given(st.binary(max_size=60))
def test_parse_target_on_raw_bytes_as_aiohttp_decodes_them(data: bytes) -> None:
    raw = data.decode("utf-8", "surrogateescape")
    with contextlib.suppress(BadRequest, NotFound):
        parse_target(raw)


# --------------------------------------------------------------------------- headers

NAMES = [
    "retry-after",
    "retry-after-ms",
    "x-ratelimit-reset-requests",
    "x-ratelimit-reset-tokens",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-limit-requests",
    "x-ratelimit-limit-tokens",
    *(
        f"anthropic-ratelimit-{d}-{part}"
        for d in ("requests", "tokens", "input-tokens", "output-tokens")
        for part in ("reset", "remaining", "limit")
    ),
]
SPECIAL = [
    "nan", "NaN", "-nan", "inf", "+inf", "-inf", "Infinity", "-Infinity", "1e309", "-1e309",
    "1e-320", "0", "-0", "+0", "-1", " 7 ", "0x10", "1_000", "\u0661\u0662", "\uff17", "1e3",
    ".5", "5.",
    "", " ", "\x00", "9" * 64, "9" * 65, "1" * 400, "-" * 10, "0s", "-1s", "1.5.5s", "99999999h",
    "9999999999999999999999h", "1h2m3.5s4ms5us6ns", "12µs", "12μs", "ms", "1hh", "1e9h",
    "Wed, 21 Oct 2015 07:28:00 GMT", "Fri, 31 Dec 9999 23:59:59 GMT",
    "Mon, 01 Jan 0001 00:00:00 GMT",
    "Thu, 01 Jan 1970 00:00:00 GMT", "Sun, 06 Nov 1994 08:49:37 +9999", "Sunday, 06-Nov-94",
    "9999-12-31T23:59:59Z", "0001-01-01T00:00:00+00:00", "2024-02-30T00:00:00Z",
    "2030-01-01T00:00:00", "2030-01-01T00:00:00+23:59", "2030-01-01T00:00:00.123456789Z",
]  # fmt: skip

datetimes = st.datetimes(
    min_value=datetime(1, 1, 2),  # hypothesis wants naive bounds
    max_value=datetime(9999, 12, 30),
    timezones=st.sampled_from([UTC, timezone(timedelta(hours=14)), timezone(timedelta(hours=-12))]),
)
go_durations = st.lists(
    st.tuples(
        st.one_of(st.integers(0, 10**20).map(str), st.floats(0, 1e12).map(lambda f: f"{f:f}")),
        st.sampled_from(["ns", "us", "µs", "ms", "s", "m", "h"]),
    ),
    min_size=1,
    max_size=4,
).map(lambda parts: "".join(n + u for n, u in parts))
values = st.one_of(
    st.text(max_size=40),
    st.sampled_from(SPECIAL),
    st.integers(-(10**40), 10**40).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    datetimes.map(lambda d: format_datetime(d.astimezone(UTC), usegmt=True)),
    datetimes.map(lambda d: d.isoformat()),
    datetimes.map(lambda d: d.isoformat().replace("+00:00", "Z")),
    go_durations,
)
# A budget said to be (nearly) spent, with whatever reset: what the headroom logic reads.
_BUDGETS = [
    ("x-ratelimit-remaining-requests", "x-ratelimit-reset-requests"),
    ("x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens"),
    *(
        (f"anthropic-ratelimit-{d}-remaining", f"anthropic-ratelimit-{d}-reset")
        for d in ("requests", "tokens", "input-tokens", "output-tokens")
    ),
]
spent = st.builds(
    lambda names, remaining, reset: {names[0]: remaining, names[1]: reset},
    st.sampled_from(_BUDGETS),
    st.sampled_from(["0", "1", "0.0"]),
    values,
)
headers = st.one_of(
    st.dictionaries(st.sampled_from(NAMES), values, max_size=8),
    spent,
    st.builds(lambda a, b: {**a, **b}, spent, st.dictionaries(st.sampled_from(NAMES), values)),
)
nows = st.one_of(st.floats(0, 4e9), st.sampled_from([0.0, 1.0, 1_800_000_000.0, 253402300799.0]))
policies = st.builds(
    lambda default, cap: PoolPolicy(default_cooldown=default, max_cooldown=cap),
    st.floats(0.1, 86400),
    st.floats(1, 86400),
)


@FUZZ
@given(headers, nows, policies)
def test_cooldown_is_always_within_floor_and_cap(
    hdrs: dict[str, str], now: float, policy: PoolPolicy
) -> None:
    delay = retry_delay(hdrs, now)
    assert delay is None or math.isfinite(delay)
    deadline = policy.cooldown_deadline(hdrs, now)
    assert math.isfinite(deadline)
    wait = deadline - now
    slack = 1e-6 * max(1.0, now)  # float rounding of now + delay
    assert policy.min_cooldown - slack <= wait <= policy.max_cooldown + slack, (hdrs, wait)


@FUZZ
@given(headers, nows)
def test_headroom_parser_is_finite(hdrs: dict[str, str], now: float) -> None:
    until = headroom_exhausted_until(hdrs, now, 1, 0.01, 1.0)
    assert until is None or (math.isfinite(until) and until > now - 1e-6 * max(1.0, now))


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(list(Outcome)), headers), max_size=12), nows, policies)
def test_pool_state_after_any_headers_is_bounded(
    events: list[tuple[Outcome, dict[str, str]]], now: float, policy: PoolPolicy
) -> None:
    """Whatever a provider sends with whatever answer, no key is out (or deprioritised) for
    longer than the cap, and selection keeps working."""
    pool = ManagedCreditPool([KeyConfig("a", "p", "sk-a"), KeyConfig("b", "p", "sk-b")], policy)
    for outcome, hdrs in events:
        key = pool.acquire("p", now)
        if key is None:
            break
        pool.release(key, outcome, now, hdrs)
    cap = max(
        policy.max_cooldown,
        policy.breaker_max_backoff,
        policy.probe_timeout,
        policy.quota_max_backoff,  # an exhausted key's next probe
    )
    for status in pool.statuses(now):
        if status.until is not None:
            assert math.isfinite(status.until)
            assert status.until - now <= cap + 1e-6 * max(1.0, now), status
    recovery = pool.next_recovery("p", now)
    assert recovery is None or recovery - now <= cap + 1e-6 * max(1.0, now)
