"""What a provider's answer says about the key that got it: one policy for proxy and client.

``classify(status, headers, body)`` is pure and reads only the structured parts of an error
(``error.code`` / ``error.type``, status, headers) except where a provider offers nothing
structured (noted below). Message text is otherwise ignored: a provider may echo the client's
input there, and a client must not be able to walk a pool into revocation by choosing words.

Signals recognised (exact bodies / headers as the providers send them):

Out of quota -> ``Outcome.EXHAUSTED`` (key-wide; back-off, return via a token-free probe):

- OpenAI, 429 ``{"error": {"message": "You exceeded your current quota, please check your plan
  and billing details. ...", "type": "insufficient_quota", "param": null,
  "code": "insufficient_quota"}}``.
- OpenAI billing codes, any 4xx: ``"code": "billing_hard_limit_reached"`` ("Billing hard limit
  has been reached"), ``"code": "billing_not_active"`` ("Your account is not active, please
  check your billing details on our website.").
- Any 402 (Payment Required): Anthropic ``{"type": "error", "error": {"type": "billing_error",
  "message": "..."}}``, OpenRouter ``{"error": {"code": 402, "message": "Insufficient credits
  ..."}}``, DeepSeek ``{"error": {"message": "Insufficient Balance", ...}}``.
- Anthropic credit balance, 400 ``{"type": "error", "error": {"type": "invalid_request_error",
  "message": "Your credit balance is too low to access the Anthropic API. Please go to Plans &
  Billing to upgrade or purchase credits."}}``: the type is generic, so only a message that
  *starts* with "Your credit balance is too low" counts (client input is never at the start).
- Groq daily limits, 429 ``{"error": {"message": "Rate limit reached for model `<model>` in
  organization `org_...` service tier `on_demand` on tokens per day (TPD): Limit 100000,
  Used 99712, Requested 1253. Please try again in 14m28.8s. ...", "type": "tokens",
  "code": "rate_limit_exceeded"}}`` (``requests per day (RPD)`` likewise), and a 429 whose
  ``x-ratelimit-remaining-requests`` is ``0`` with an ``x-ratelimit-reset-requests`` of an hour
  or more (Groq's ``x-ratelimit-*-requests`` headers count requests per *day*, its ``-tokens``
  headers per minute). Groq names the day in its message only, so that phrase is matched after
  the backticked model name (which the provider has validated: an unknown model gets a 404).

Rate limited -> ``Outcome.RATE_LIMITED``: any other 429 (OpenAI ``"code":
"rate_limit_exceeded"``, Anthropic ``"type": "rate_limit_error"``, Groq per-minute limits).
OpenAI, Anthropic and Groq count these per model, so ``per_model`` is True; the pool cools the
whole key only when the pool says ``cooldown.scope: key`` or the request named no model.

Unauthorized -> ``Outcome.UNAUTHORIZED``: 401, and a 403 whose ``error.code`` / ``error.type``
is one of ``KEY_LEVEL_403``. Any other 403 is ``held``: it is as often about the request (a
model, a region) as about the key, so the caller asks one other key; if that key answers 403
too the request is at fault and neither key learns anything (release both with ``OK``); if it
succeeds the first key gets ``Outcome.FORBIDDEN`` (counts toward its breaker, never revokes).
With no other key to ask, the 403 goes to the client and the key learns nothing.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sideproxy.pool._headers import parse_go_duration
from sideproxy.pool._types import Outcome

# A 403 whose structured error says this: the key itself is bad, revoke it (as a 401).
KEY_LEVEL_403 = frozenset(
    {
        "invalid_api_key",
        "invalid_key",
        "api_key_invalid",
        "api_key_revoked",
        "api_key_disabled",
        "api_key_expired",
        "key_revoked",
        "account_deactivated",
        "account_disabled",
        "authentication_error",
    }
)
# error.code / error.type values that mean "out of money or quota".
EXHAUSTED_CODES = frozenset(
    {
        "insufficient_quota",
        "billing_hard_limit_reached",
        "billing_not_active",
        "billing_error",
        "insufficient_balance",
        "insufficient_credits",
    }
)
_ANTHROPIC_CREDIT = "your credit balance is too low"
# Groq: "... model `llama-3.3-70b-versatile` in organization `org_x` ... on tokens per day (TPD)"
_GROQ_DAILY = re.compile(r"`[^`]*`[^`]*? on (?:requests|tokens) per day \((?:RPD|TPD)\)")
_DAY_LIKE = 3600.0
_BODY_LIMIT = 65536  # error bodies larger than this are not parsed


@dataclass(frozen=True, slots=True)
class Verdict:
    """What to release the key with, and what the caller may do next."""

    outcome: Outcome
    # A rate limit (or headroom) about the request's model only; False: about the whole key.
    per_model: bool = True
    # Another key may answer differently: try the next one (before any byte reached the client;
    # whether a request may be sent twice after a 5xx is the caller's rule, not this one's).
    retry: bool = False
    # A 403 to be judged by another key's answer (see the module docstring).
    held: bool = False
    # Which documented signal matched, for logs: "insufficient_quota", "groq_daily_limit", ...
    signal: str = ""


_OK = Verdict(Outcome.OK)
_SERVER_ERROR = Verdict(Outcome.SERVER_ERROR, retry=True, signal="5xx")


def classify(status: int, headers: Mapping[str, str] | None, body: bytes | None) -> Verdict:
    """The verdict on one provider answer. ``headers``: lower-case names or case-insensitive."""
    if status < 400:
        return _OK
    if status >= 500:
        return _SERVER_ERROR
    error = _error(body)
    code = _code(error)
    if code in EXHAUSTED_CODES or status == 402:
        return Verdict(Outcome.EXHAUSTED, per_model=False, retry=True, signal=code or "402")
    if status == 429:
        if _groq_daily(error, headers):
            return Verdict(
                Outcome.EXHAUSTED, per_model=False, retry=True, signal="groq_daily_limit"
            )
        return Verdict(Outcome.RATE_LIMITED, retry=True, signal=code or "429")
    if status == 401:
        return Verdict(Outcome.UNAUTHORIZED, per_model=False, retry=True, signal="401")
    if status == 403:
        if key_level_403(error):
            return Verdict(Outcome.UNAUTHORIZED, per_model=False, retry=True, signal=code)
        return Verdict(Outcome.FORBIDDEN, per_model=False, retry=True, held=True, signal="403")
    if status == 400 and _message(error).lower().startswith(_ANTHROPIC_CREDIT):
        return Verdict(Outcome.EXHAUSTED, per_model=False, retry=True, signal="credit_balance")
    return _OK


def key_level_403(error: Mapping[str, Any] | None) -> bool:
    """Does a 403's structured error (code or type, never the message) blame the key?"""
    if error is None:
        return False
    for name in ("code", "type"):
        value = error.get(name)
        if isinstance(value, str) and value.lower() in KEY_LEVEL_403:
            return True
    return False


def error_object(body: bytes | None) -> Mapping[str, Any] | None:
    """The ``error`` object of an OpenAI- or Anthropic-shaped error body, if there is one."""
    return _error(body)


def _error(body: bytes | None) -> Mapping[str, Any] | None:
    if not body or len(body) > _BODY_LIMIT:
        return None
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        return None
    error = doc.get("error") if isinstance(doc, dict) else None
    return error if isinstance(error, dict) else None


def _code(error: Mapping[str, Any] | None) -> str:
    """The first of error.code / error.type that names an exhausted signal, else error.code."""
    if error is None:
        return ""
    found = ""
    for name in ("code", "type"):
        value = error.get(name)
        if isinstance(value, str):
            lowered = value.lower()
            if lowered in EXHAUSTED_CODES:
                return lowered
            found = found or lowered
    return found


def _message(error: Mapping[str, Any] | None) -> str:
    message = error.get("message") if error is not None else None
    return message if isinstance(message, str) else ""


def _groq_daily(error: Mapping[str, Any] | None, headers: Mapping[str, str] | None) -> bool:
    if headers is not None and headers.get("x-ratelimit-remaining-requests") == "0":
        # Groq's request budget is per day; OpenAI's is per minute, so a spent request
        # budget counts as daily only when it resets an hour or more from now.
        reset = parse_go_duration(headers.get("x-ratelimit-reset-requests", ""))
        if reset is not None and reset >= _DAY_LIKE:
            return True
    return _GROQ_DAILY.search(_message(error)[:1024]) is not None
