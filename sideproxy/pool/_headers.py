"""Reading providers' rate-limit headers into deadlines and headroom.

Every parser returns ``None`` for anything it does not understand instead of raising: a provider
that sends garbage must never break the request path, only fall back to the pool's default.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from datetime import datetime
from email.utils import parsedate_to_datetime
from typing import Any

# One Go duration component: "1.5h", "6m", "0s", "12ms", "250us".
_GO_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_GO_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_MAX_HEADER = 64  # longer values are not rate-limit headers; don't spend regex time on them

RESET_HEADERS = ("x-ratelimit-reset-requests", "x-ratelimit-reset-tokens")
ANTHROPIC_DIMENSIONS = ("requests", "tokens", "input-tokens", "output-tokens")


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def parse_seconds(value: str) -> float | None:
    """A plain number of seconds, as ``retry-after: 7`` (fractions tolerated)."""
    try:
        seconds = float(value)
    except ValueError:
        return None
    return _finite(seconds)


def parse_go_duration(value: str) -> float | None:
    """Go's ``time.Duration`` text (OpenAI/Groq ``x-ratelimit-reset-*``): ``6m0s``, ``1.2s``."""
    value = value.strip()
    if not value or len(value) > _MAX_HEADER:
        return None
    if value in ("0", "+0", "-0"):
        return 0.0
    pos, total = 0, 0.0
    for match in _GO_PART.finditer(value):
        if match.start() != pos:
            return None
        total += float(match.group(1)) * _GO_UNITS[match.group(2)]
        pos = match.end()
    if pos != len(value):
        # Some providers send bare seconds here ("1.5"); accept that too.
        return parse_seconds(value) if pos == 0 else None
    return _finite(total)


def parse_http_date(value: str, now: float) -> float | None:
    """``retry-after`` as an HTTP-date; returns seconds from ``now``."""
    if len(value) > _MAX_HEADER:
        return None
    try:
        moment = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if moment.tzinfo is None:
        return None
    return _finite(moment.timestamp() - now)


def parse_rfc3339(value: str, now: float) -> float | None:
    """Anthropic's ``anthropic-ratelimit-*-reset``; returns seconds from ``now``."""
    if len(value) > _MAX_HEADER:
        return None
    try:
        moment = datetime.fromisoformat(value.strip())
    except ValueError:
        return None
    if moment.tzinfo is None:
        return None
    try:
        return _finite(moment.timestamp() - now)
    except (OverflowError, OSError):
        return None


def parse_retry_after(value: str, now: float) -> float | None:
    seconds = parse_seconds(value)
    return seconds if seconds is not None else parse_http_date(value, now)


def _number(headers: Mapping[str, str], name: str) -> float | None:
    raw = headers.get(name)
    if raw is None or len(raw) > _MAX_HEADER:
        return None
    return parse_seconds(raw)


def retry_delay(headers: Mapping[str, str], now: float) -> float | None:
    """Seconds until the provider says this key may be used again, if it says so at all.

    ``retry-after-ms`` and ``retry-after`` are explicit answers and win. Otherwise the reset of
    whichever budget is exhausted (remaining == 0); if none is known to be exhausted, the latest
    reset announced.
    """
    raw = headers.get("retry-after-ms")
    if raw is not None:
        ms = parse_seconds(raw)
        if ms is not None:
            return ms / 1000.0
    raw = headers.get("retry-after")
    if raw is not None:
        seconds = parse_retry_after(raw, now)
        if seconds is not None:
            return seconds

    exhausted: list[float] = []
    announced: list[float] = []
    for dimension in ("requests", "tokens"):
        raw = headers.get(f"x-ratelimit-reset-{dimension}")
        if raw is None:
            continue
        delay = parse_go_duration(raw)
        if delay is None:
            continue
        announced.append(delay)
        if _number(headers, f"x-ratelimit-remaining-{dimension}") == 0:
            exhausted.append(delay)
    for dimension in ANTHROPIC_DIMENSIONS:
        raw = headers.get(f"anthropic-ratelimit-{dimension}-reset")
        if raw is None:
            continue
        delay = parse_rfc3339(raw, now)
        if delay is None:
            continue
        announced.append(delay)
        if _number(headers, f"anthropic-ratelimit-{dimension}-remaining") == 0:
            exhausted.append(delay)
    if exhausted:
        return max(exhausted)
    if announced:
        return max(announced)
    return None


def headroom_exhausted_until(
    headers: Mapping[str, str], now: float, floor: int, fraction: float, fallback: float
) -> float | None:
    """If a budget in a successful response is nearly spent, when it refills (unix time).

    "Nearly spent": remaining <= ``floor`` for requests, or remaining <= ``fraction`` of the
    announced limit for any budget. ``None`` means the key has headroom (or nothing was said).
    """
    return headroom(headers, now, floor, fraction, fallback)[0]


def headroom(
    headers: Mapping[str, str], now: float, floor: int, fraction: float, fallback: float
) -> tuple[float | None, float | None]:
    """(nearly spent until, spent until) from a successful response's budget headers.

    The first is as ``headroom_exhausted_until``. The second is set only when a budget's
    remaining is exactly 0 and the provider says when it resets: the next request would earn a
    429 for sure, so the key rests until then.

    This runs on every successful response, so it does the least work for the common answer
    (each budget absent, or well above its floor): one lookup per budget absent, two (remaining
    and limit) per budget present, an ``int`` parse for a plain count, and the reset only when a
    budget is low. ``tests/pool/test_headroom.py`` pins it to the plain reading of the rule.

    A mapping that can hand over its own index, ``headers.raw_index()`` -> lower-case name
    bytes to value bytes (the values its ``get`` decodes as latin-1), is read through that:
    a dict lookup instead of a method call per header, and no decoding of the values.
    """
    get: Callable[[Any], str | bytes | None]
    budgets: _Budgets
    raw_index = getattr(headers, "raw_index", None)
    if raw_index is not None:
        get = raw_index().get
        budgets = _RAW_BUDGETS
    else:
        get = headers.get
        budgets = _BUDGETS
    low: float | None = None
    spent: float | None = None
    for remaining_name, budget in budgets:
        raw = get(remaining_name)
        if raw is None:
            continue
        remaining = _count(raw)
        if remaining is None:
            continue
        limit_name, reset_name, counts_requests, parse_reset = budget
        if remaining > 0 and not (counts_requests and remaining <= floor):
            # Low only by the fraction of the announced limit.
            raw = get(limit_name)
            if raw is None:
                continue
            limit = _count(raw)
            if limit is None or limit <= 0 or remaining > limit * fraction:
                continue
        reset_raw = get(reset_name)
        delay = parse_reset(_text(reset_raw), now) if reset_raw is not None else None
        known = delay is not None and delay > 0
        deadline = now + (delay if known else fallback)  # type: ignore[operator]
        low = deadline if low is None else max(low, deadline)
        if remaining <= 0 and known:
            spent = deadline if spent is None else max(spent, deadline)
    return low, spent


def _count(raw: str | bytes) -> float | None:
    """A budget header's number, as ``parse_seconds`` reads it (None: not one, or too long).

    A plain count of up to 15 characters ("14399") takes ``int``, twice as fast as ``float``;
    such a count is below 10**15 < 2**53, so it compares exactly as its float would. Anything
    else takes ``parse_seconds``. (``int`` of bytes reads only ASCII; whatever it refuses is
    decoded and read as text.)
    """
    if len(raw) <= 15:
        try:
            return int(raw)
        except ValueError:
            pass
    elif len(raw) > _MAX_HEADER:
        return None
    return parse_seconds(_text(raw))


def _text(raw: str | bytes) -> str:
    return raw if isinstance(raw, str) else raw.decode("latin-1")


def _go_reset(raw: str, now: float) -> float | None:
    return parse_go_duration(raw)


def _rfc_reset(raw: str, now: float) -> float | None:
    return parse_rfc3339(raw, now)


# (remaining header, (limit header, reset header, counts requests, reset parser)): the
# remaining header first, alone, since it is the only one read for a budget that is absent.
# Names are str, or lower-case bytes for a raw_index().
_Budgets = tuple[tuple[Any, tuple[Any, Any, bool, Callable[[str, float], float | None]]], ...]
_BUDGETS: _Budgets = tuple(
    [
        (
            f"x-ratelimit-remaining-{d}",
            (f"x-ratelimit-limit-{d}", f"x-ratelimit-reset-{d}", d == "requests", _go_reset),
        )
        for d in ("requests", "tokens")
    ]
    + [
        (
            f"anthropic-ratelimit-{d}-remaining",
            (
                f"anthropic-ratelimit-{d}-limit",
                f"anthropic-ratelimit-{d}-reset",
                d == "requests",
                _rfc_reset,
            ),
        )
        for d in ANTHROPIC_DIMENSIONS
    ]
)
# The same, as lower-case name bytes for a mapping's raw_index().
_RAW_BUDGETS: _Budgets = tuple(
    (remaining.encode(), (limit.encode(), reset.encode(), requests, parse))
    for remaining, (limit, reset, requests, parse) in _BUDGETS
)
