"""The pool core: key registry, weighted selection across tiers, cool-down, circuit breaker.

Pure: no I/O, no clock, no sleeps. Every method that depends on time takes ``now`` (unix
seconds), so every transition is testable with plain numbers.
"""

from sideproxy.pool._headers import (
    parse_go_duration,
    parse_retry_after,
    parse_rfc3339,
    retry_delay,
)
from sideproxy.pool._pool import (
    Key,
    KeyConfig,
    KeyHealth,
    KeyStatus,
    ManagedCreditPool,
    Outcome,
    PoolPolicy,
    Transition,
)

__all__ = [
    "Key",
    "KeyConfig",
    "KeyHealth",
    "KeyStatus",
    "ManagedCreditPool",
    "Outcome",
    "PoolPolicy",
    "Transition",
    "parse_go_duration",
    "parse_retry_after",
    "parse_rfc3339",
    "retry_delay",
]
