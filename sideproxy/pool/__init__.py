"""The pool core: key registry, per-model selection across tiers, cool-down, quota, breaker.

Pure: no I/O, no clock, no sleeps. Every method that depends on time takes ``now`` (unix
seconds), so every transition is testable with plain numbers.

The API (``model`` is the request's model, None for a request without one)::

    pool = ManagedCreditPool(keys: Iterable[KeyConfig], policy: PoolPolicy | None = None)
    pool.configure(keys, policy=None) -> frozenset[str]     # names that left (drop their metrics)
        # an unchanged key keeps its health, probe in flight and place in every schedule;
        # a new key joins at its tier's current virtual time
    pool.serves(provider, model) -> bool                    # False: answer 404 model_not_found
    pool.acquire(provider, now, exclude=(), model=None) -> Key | None
    pool.release(key, outcome, now, headers=None, model=None) -> list[Transition]
        # model: the model the answer is about (429, headroom); None = about the whole key.
        # Pass model=None when classify() says per_model=False.
    pool.next_recovery(provider, now, model=None) -> float | None
    pool.probes_due(now) -> list[Key]           # exhausted / revoked keys to probe now, once each
    pool.probe_result(key, ok: bool, now) -> list[Transition]
        # the caller probes with GET <baseURL>/models using key.secret (costs no tokens)
    pool.impose_cooldown(name, until, now, model=None) -> bool     # what another replica saw
    pool.exhaust(name, until, now) -> bool
    pool.revoke(name, now) -> bool
    pool.restore(name, now) -> bool              # another replica's probe brought it back
    pool.statuses(now) -> list[KeyStatus]       # reads only; KeyStatus.cooling = ((model, until),)

    classify(status, headers, body: bytes | None) -> Verdict
        # Verdict(outcome, per_model, retry, held, signal): the one retry/403 policy shared by
        # the proxy and LLMClient; its docstring lists every provider signal recognised.
    retry_delay(headers, now) / parse_retry_after(value, now)   # seconds or HTTP-date

Key-wide states (``KeyHealth``): READY, LOW_HEADROOM, COOLING (``cooldown.scope: key`` or a 429
without a model), OPEN / HALF_OPEN (breaker), EXHAUSTED (out of quota: back-off from
``quota_backoff`` doubling to ``quota_max_backoff``, back only through a probe), REVOKED (401;
probed every ``quota_max_backoff``). Per (key, model): a cool-down and low headroom.
``Transition.model`` is set for a per-model cool-down (None = the whole key).
"""

from sideproxy.pool._classify import (
    EXHAUSTED_CODES,
    KEY_LEVEL_403,
    Verdict,
    classify,
    error_object,
    key_level_403,
)
from sideproxy.pool._headers import (
    parse_go_duration,
    parse_retry_after,
    parse_rfc3339,
    retry_delay,
)
from sideproxy.pool._models import check_patterns
from sideproxy.pool._pool import Key, ManagedCreditPool
from sideproxy.pool._types import (
    KeyConfig,
    KeyHealth,
    KeyStatus,
    LimitScope,
    Outcome,
    PoolPolicy,
    Transition,
)

__all__ = [
    "EXHAUSTED_CODES",
    "KEY_LEVEL_403",
    "Key",
    "KeyConfig",
    "KeyHealth",
    "KeyStatus",
    "LimitScope",
    "ManagedCreditPool",
    "Outcome",
    "PoolPolicy",
    "Transition",
    "Verdict",
    "check_patterns",
    "classify",
    "error_object",
    "key_level_403",
    "parse_go_duration",
    "parse_retry_after",
    "parse_rfc3339",
    "retry_delay",
]
