"""The shared classifier: each documented provider signal, with the exact body or header."""

import json

import pytest

from sideproxy.pool import Outcome, classify


def body(**error: object) -> bytes:
    return json.dumps({"error": error}).encode()


OPENAI_QUOTA = body(
    message="You exceeded your current quota, please check your plan and billing details.",
    type="insufficient_quota",
    param=None,
    code="insufficient_quota",
)
OPENAI_RPM = body(
    message="Rate limit reached for gpt-4o in organization org-x on requests per min (RPM): "
    "Limit 500, Used 500, Requested 1.",
    type="requests",
    param=None,
    code="rate_limit_exceeded",
)
GROQ_TPD = body(
    message="Rate limit reached for model `llama-3.3-70b-versatile` in organization `org_01` "
    "service tier `on_demand` on tokens per day (TPD): Limit 100000, Used 99712, Requested "
    "1253. Please try again in 14m28.8s.",
    type="tokens",
    code="rate_limit_exceeded",
)
GROQ_RPD = GROQ_TPD.replace(b"tokens per day (TPD)", b"requests per day (RPD)")
GROQ_TPM = GROQ_TPD.replace(b"tokens per day (TPD)", b"tokens per minute (TPM)")
ANTHROPIC_CREDIT = json.dumps(
    {
        "type": "error",
        "error": {
            "type": "invalid_request_error",
            "message": "Your credit balance is too low to access the Anthropic API. Please go to "
            "Plans & Billing to upgrade or purchase credits.",
        },
    }
).encode()
ANTHROPIC_BILLING = json.dumps(
    {"type": "error", "error": {"type": "billing_error", "message": "billing issue"}}
).encode()
ANTHROPIC_429 = json.dumps(
    {"type": "error", "error": {"type": "rate_limit_error", "message": "Number of requests..."}}
).encode()


@pytest.mark.parametrize(
    ("status", "headers", "payload", "signal"),
    [
        (429, {}, OPENAI_QUOTA, "insufficient_quota"),
        (
            429,
            {},
            body(code="billing_hard_limit_reached", message="x"),
            "billing_hard_limit_reached",
        ),
        (400, {}, body(code="billing_not_active", message="x"), "billing_not_active"),
        (402, {}, ANTHROPIC_BILLING, "billing_error"),
        (402, {}, body(code=402, message="Insufficient credits"), "402"),
        (402, {}, b"", "402"),
        (400, {}, ANTHROPIC_CREDIT, "credit_balance"),
        (429, {}, GROQ_TPD, "groq_daily_limit"),
        (429, {}, GROQ_RPD, "groq_daily_limit"),
        (
            429,
            {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "2h3m"},
            b"",
            "groq_daily_limit",
        ),
    ],
)
def test_out_of_quota_signals(
    status: int, headers: dict[str, str], payload: bytes, signal: str
) -> None:
    verdict = classify(status, headers, payload)
    assert verdict.outcome is Outcome.EXHAUSTED
    assert verdict.signal == signal
    assert verdict.retry
    assert not verdict.per_model


@pytest.mark.parametrize("payload", [OPENAI_RPM, GROQ_TPM, ANTHROPIC_429, b"", b"not json"])
def test_rate_limits_are_per_model(payload: bytes) -> None:
    headers = {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "6m0s"}
    verdict = classify(429, headers, payload)
    assert verdict.outcome is Outcome.RATE_LIMITED
    assert verdict.per_model
    assert verdict.retry


def test_a_client_cannot_word_its_way_into_a_verdict() -> None:
    """Message text echoes client input; only the Anthropic credit sentence at the start counts."""
    echoed = body(
        type="invalid_request_error", message="bad model 'Your credit balance is too low'"
    )
    assert classify(400, {}, echoed).outcome is Outcome.OK
    assert classify(403, {}, body(message="invalid_api_key")).held
    no_model = body(message="on tokens per day (TPD)", code="rate_limit_exceeded")
    assert classify(429, {}, no_model).outcome is Outcome.RATE_LIMITED


def test_401_and_key_level_403_revoke_other_403s_are_held() -> None:
    assert classify(401, {}, b"").outcome is Outcome.UNAUTHORIZED
    key_level = classify(403, {}, body(code="api_key_revoked", message="m"))
    assert key_level.outcome is Outcome.UNAUTHORIZED
    assert not key_level.held
    held = classify(403, {}, body(code="model_not_allowed", message="m"))
    assert held.held
    assert held.outcome is Outcome.FORBIDDEN
    assert held.retry


def test_success_other_client_errors_and_server_errors() -> None:
    assert classify(200, {}, b"{}").outcome is Outcome.OK
    assert classify(400, {}, body(code="invalid_request", message="m")).outcome is Outcome.OK
    assert not classify(404, {}, b"").retry
    server = classify(529, {}, b"")
    assert server.outcome is Outcome.SERVER_ERROR
    assert server.retry
