"""Rate-limit headers, as the providers actually send them."""

from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sideproxy.pool import PoolPolicy, parse_go_duration, parse_retry_after, retry_delay

NOW = 1_800_000_000.0


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("6m0s", 360.0),
        ("1.2s", 1.2),
        ("12ms", 0.012),
        ("1h2m3.5s", 3723.5),
        ("250us", 0.00025),
        ("0s", 0.0),
        ("0", 0.0),
        ("2", 2.0),  # some OpenAI-compatible servers send bare seconds
    ],
)
def test_go_durations(text: str, seconds: float) -> None:
    assert parse_go_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "abc", "1.2x", "s", "1s2", "-", "1s 2s"])
def test_go_duration_garbage_is_none(text: str) -> None:
    assert parse_go_duration(text) is None


def test_retry_after_seconds_and_http_date() -> None:
    assert parse_retry_after("7", NOW) == 7.0
    date = format_datetime(datetime.fromtimestamp(NOW + 30, UTC), usegmt=True)
    assert parse_retry_after(date, NOW) == pytest.approx(30.0)
    assert parse_retry_after("soon", NOW) is None


def test_retry_after_ms_wins_over_retry_after() -> None:
    assert retry_delay({"retry-after-ms": "1500", "retry-after": "9"}, NOW) == 1.5


def test_openai_reset_of_the_exhausted_budget() -> None:
    headers = {
        "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-requests": "2.5s",
        "x-ratelimit-remaining-tokens": "9000",
        "x-ratelimit-reset-tokens": "6m0s",
    }
    assert retry_delay(headers, NOW) == pytest.approx(2.5)


def test_latest_reset_when_no_budget_is_known_exhausted() -> None:
    headers = {"x-ratelimit-reset-requests": "2s", "x-ratelimit-reset-tokens": "20s"}
    assert retry_delay(headers, NOW) == pytest.approx(20.0)


def test_anthropic_rfc3339_reset() -> None:
    reset = datetime.fromtimestamp(NOW, UTC) + timedelta(seconds=42)
    headers = {
        "anthropic-ratelimit-requests-remaining": "0",
        "anthropic-ratelimit-requests-reset": reset.isoformat().replace("+00:00", "Z"),
    }
    assert retry_delay(headers, NOW) == pytest.approx(42.0)


def test_no_header_means_the_pools_default() -> None:
    policy = PoolPolicy(default_cooldown=60.0)
    assert retry_delay({}, NOW) is None
    assert policy.cooldown_deadline({}, NOW) == NOW + 60.0
    assert policy.cooldown_deadline(None, NOW) == NOW + 60.0


def test_cooldown_is_capped_and_floored() -> None:
    policy = PoolPolicy(max_cooldown=3600.0, min_cooldown=0.5)
    assert policy.cooldown_deadline({"retry-after": "999999999"}, NOW) == NOW + 3600.0
    assert policy.cooldown_deadline({"retry-after": "0"}, NOW) == NOW + 0.5
    assert policy.cooldown_deadline({"retry-after": "-30"}, NOW) == NOW + 0.5


header_names = st.sampled_from(
    [
        "retry-after",
        "retry-after-ms",
        "x-ratelimit-reset-requests",
        "x-ratelimit-reset-tokens",
        "x-ratelimit-remaining-requests",
        "x-ratelimit-remaining-tokens",
        "anthropic-ratelimit-requests-reset",
        "anthropic-ratelimit-tokens-reset",
        "anthropic-ratelimit-requests-remaining",
    ]
)


@given(st.dictionaries(header_names, st.text(max_size=80), max_size=9))
def test_fuzzed_headers_give_a_bounded_deadline(headers: dict[str, str]) -> None:
    policy = PoolPolicy(max_cooldown=3600.0, min_cooldown=0.5)
    deadline = policy.cooldown_deadline(headers, NOW)
    assert NOW + 0.5 <= deadline <= NOW + 3600.0
