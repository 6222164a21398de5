"""The pool's vocabulary: key configuration, policy, health, outcomes, and what it reports."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum, StrEnum
from typing import TYPE_CHECKING

from sideproxy.models import fingerprint as _fingerprint
from sideproxy.pool._headers import retry_delay
from sideproxy.pool._models import check_patterns

if TYPE_CHECKING:
    from sideproxy.models import TableSettings


class KeyHealth(StrEnum):
    """A key's key-wide state. Per-model cool-downs are separate (``KeyStatus.cooling``)."""

    READY = "ready"
    LOW_HEADROOM = "low-headroom"  # usable, but only when no key of its tier has headroom
    COOLING = "cooling"  # rate-limited for every model until ``until``
    OPEN = "open"  # breaker open until ``until``
    HALF_OPEN = "half-open"  # one probe request allowed
    EXHAUSTED = "exhausted"  # out of quota / billing: out for every model; next probe at ``until``
    REVOKED = "revoked"  # 401 (or a key-level 403): out; next probe at ``until``


class LimitScope(StrEnum):
    """Where a 429 applies: the (key, model) it was about, or the key for every model."""

    MODEL = "model"
    KEY = "key"


class Outcome(Enum):
    OK = "ok"  # any answer that says nothing bad about the key (2xx, 4xx other than below)
    RATE_LIMITED = "rate_limited"
    # Out of quota, billing, a daily limit: back-off for minutes to hours, return via a probe.
    EXHAUSTED = "exhausted"
    UNAUTHORIZED = "unauthorized"
    SERVER_ERROR = "server_error"
    CONNECT_ERROR = "connect_error"
    TIMEOUT = "timeout"
    # A 403 that another key did not repeat for the same request: about this key, but maybe only
    # about what it may do (a model, a region), so it counts toward the breaker, never revokes.
    # ``from_status`` never returns it: only the caller can tell, by trying another key.
    FORBIDDEN = "forbidden"
    CANCELLED = "cancelled"  # the client went away; nothing learnt

    @classmethod
    def from_status(cls, status: int) -> Outcome:
        """The outcome a status alone implies. ``classify`` reads the body too: prefer it."""
        if status == 429:
            return cls.RATE_LIMITED
        if status == 402:
            return cls.EXHAUSTED
        if status in (401, 403):
            return cls.UNAUTHORIZED
        if status >= 500:
            return cls.SERVER_ERROR
        return cls.OK


@dataclass(frozen=True, slots=True)
class KeyConfig:
    name: str
    provider: str
    secret: str = field(repr=False)
    tier: int = 0
    weight: int = 1
    quota_scope: str | None = None
    # Models this key may serve: exact names and ``*`` globs; empty = every model.
    models: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.weight < 0 or self.tier < 0:
            raise ValueError(f"key {self.name!r}: weight and tier must be >= 0")
        problem = check_patterns(self.models)
        if problem:
            raise ValueError(f"key {self.name!r}: models: {problem}")

    @property
    def fingerprint(self) -> str:
        return _fingerprint(self.secret)


@dataclass(frozen=True, slots=True)
class PoolPolicy:
    default_cooldown: float = 60.0
    max_cooldown: float = 3600.0
    # Providers sometimes say "retry after 0"; resting a moment keeps us from hammering.
    min_cooldown: float = 0.5
    # MODEL: a 429 about a model cools only (key, model); KEY: every 429 cools the whole key.
    cooldown_scope: LimitScope = LimitScope.MODEL
    failure_threshold: int = 5
    breaker_backoff: float = 10.0
    breaker_max_backoff: float = 300.0
    # A half-open key lets exactly one request through and waits for its ``release``. The
    # timer only covers a release that never comes (a bug or a crash in the caller), so its
    # bound is the longest a request may live: the pool's whole-request timeout (a stream can
    # last minutes) plus a margin. It must never be shorter than a legitimate request.
    probe_timeout: float = 930.0
    # Exhausted keys: first back-off, doubled on each failed probe or repeat, up to the cap.
    # A revoked key (401) is probed every ``quota_max_backoff``.
    quota_backoff: float = 300.0
    quota_max_backoff: float = 21600.0
    # A token-free probe (``GET /models``) that never reports back is offered again after this.
    quota_probe_timeout: float = 30.0
    headroom_floor: int = 1
    headroom_fraction: float = 0.01
    # Without a reset header, a key low on headroom is deprioritised this long.
    headroom_fallback: float = 1.0
    round_robin: bool = False

    @classmethod
    def from_settings(cls, settings: TableSettings) -> PoolPolicy:
        return cls(
            default_cooldown=settings.cooldown.default_seconds,
            max_cooldown=settings.cooldown.max_seconds,
            cooldown_scope=LimitScope(settings.cooldown.scope.value),
            failure_threshold=settings.breaker.failure_threshold,
            breaker_backoff=settings.breaker.backoff_seconds,
            breaker_max_backoff=settings.breaker.max_backoff_seconds,
            probe_timeout=settings.timeouts.total_seconds + 30.0,
            quota_backoff=settings.quota.backoff_seconds,
            quota_max_backoff=settings.quota.max_backoff_seconds,
            round_robin=settings.strategy == "round-robin",
        )

    def cooldown_deadline(self, headers: Mapping[str, str] | None, now: float) -> float:
        """When a key that just answered 429 may be tried again (unix time), capped."""
        delay = retry_delay(headers, now) if headers else None
        if delay is None:
            delay = self.default_cooldown
        return now + min(max(delay, self.min_cooldown), self.max_cooldown)


@dataclass(frozen=True, slots=True)
class Transition:
    """A change worth telling the cluster about. Names and fingerprints only, never a secret."""

    name: str
    fingerprint: str
    health: KeyHealth
    until: float | None
    # RateLimited, Spent (a budget at 0), Exhausted, Unauthorized, CircuitOpen, Recovered
    reason: str
    # The model a rate limit is about; None = the key for every model.
    model: str | None = None


@dataclass(frozen=True, slots=True)
class KeyStatus:
    name: str
    provider: str
    tier: int
    weight: int
    fingerprint: str
    health: KeyHealth
    until: float | None
    requests: int
    rate_limited: int
    failures: int
    # (model, until) of every model this key is cooling for now, earliest deadline first.
    cooling: tuple[tuple[str, float], ...] = ()
    exhausted: int = 0  # cumulative EXHAUSTED answers
    unauthorized: int = 0  # cumulative 401s / key-level 403s
    models: tuple[str, ...] = ()
