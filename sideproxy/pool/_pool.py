"""The ManagedCreditPool: which key serves the next request, and what each answer teaches us.

Selection is stride scheduling (earliest virtual finish time), the heap form of smooth weighted
round-robin: key *i* is due at virtual times ``base_i + (n + 1/2) / weight_i`` (bases staggered
across the tier); the pool always serves the key due first. Over any ``sum(weights)``
consecutive picks each key gets its weight within ±1, equal weights degrade to plain
round-robin, and a pick costs O(log n) heap operations in C: flat in practice from 10 to 10,000
keys.

Unavailable keys are not skipped at pick time: a state change bumps the key's ``token``, which
turns its heap entries stale (dropped lazily when they surface), and schedules a timer for its
recovery. Timers are checked with one heap peek per pick.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum, StrEnum
from typing import TYPE_CHECKING

from sideproxy.models import fingerprint as _fingerprint
from sideproxy.pool._headers import headroom_exhausted_until, retry_delay

if TYPE_CHECKING:
    from sideproxy.models import TableSettings

# Heap entries: (due, order, token, key). ``order`` is the key's config position, so ties break
# the same way every time (that is what makes equal weights exact round-robin).
_Entry = tuple[float, int, int, "Key"]


class KeyHealth(StrEnum):
    READY = "ready"
    LOW_HEADROOM = "low-headroom"  # usable, but only when no key of its tier has headroom
    COOLING = "cooling"  # rate-limited until ``until``
    OPEN = "open"  # breaker open until ``until``
    HALF_OPEN = "half-open"  # one probe request allowed
    REVOKED = "revoked"  # 401 (or a 403 that says the key is bad): out until reconfigured


_IN_ROTATION = frozenset({KeyHealth.READY, KeyHealth.HALF_OPEN})


class Outcome(Enum):
    OK = "ok"  # any answer that says nothing bad about the key (2xx, 4xx other than below)
    RATE_LIMITED = "rate_limited"
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
        if status == 429:
            return cls.RATE_LIMITED
        if status in (401, 403):
            return cls.UNAUTHORIZED
        if status >= 500:
            return cls.SERVER_ERROR
        return cls.OK


_FAILURES = frozenset(
    {Outcome.SERVER_ERROR, Outcome.CONNECT_ERROR, Outcome.TIMEOUT, Outcome.FORBIDDEN}
)


@dataclass(frozen=True, slots=True)
class KeyConfig:
    name: str
    provider: str
    secret: str = field(repr=False)
    tier: int = 0
    weight: int = 1
    quota_scope: str | None = None

    @property
    def fingerprint(self) -> str:
        return _fingerprint(self.secret)


@dataclass(frozen=True, slots=True)
class PoolPolicy:
    default_cooldown: float = 60.0
    max_cooldown: float = 3600.0
    # Providers sometimes say "retry after 0"; resting a moment keeps us from hammering.
    min_cooldown: float = 0.5
    failure_threshold: int = 5
    breaker_backoff: float = 10.0
    breaker_max_backoff: float = 300.0
    # A half-open probe whose result never comes back (client vanished) frees the slot after this.
    probe_timeout: float = 30.0
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
            failure_threshold=settings.breaker.failure_threshold,
            breaker_backoff=settings.breaker.backoff_seconds,
            breaker_max_backoff=settings.breaker.max_backoff_seconds,
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
    reason: str  # RateLimited, Unauthorized, CircuitOpen, Recovered


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


class Key:
    """A key's live state in one pool: ``acquire`` hands it out, ``release`` takes it back."""

    __slots__ = (
        "backoff",
        "base",
        "config",
        "failures",
        "fingerprint",
        "health",
        "name",
        "order",
        "picks",
        "probing",
        "provider",
        "rate_limited",
        "requests",
        "secret",
        "stride",
        "tier",
        "token",
        "until",
        "weight",
    )

    def __init__(self, config: KeyConfig, order: int, round_robin: bool) -> None:
        self.config = config
        self.name = config.name
        self.provider = config.provider
        self.secret = config.secret
        self.tier = config.tier
        self.weight = config.weight
        self.fingerprint = config.fingerprint
        self.order = order
        self.stride = (1.0 if round_robin else 1.0 / config.weight) if config.weight > 0 else 0.0
        self.health = KeyHealth.READY
        self.until: float | None = None
        self.failures = 0
        self.backoff = 0.0
        self.probing = False
        self.token = 0
        self.base = 0.0
        self.picks = 0
        self.requests = 0
        self.rate_limited = 0

    def __repr__(self) -> str:
        return f"Key({self.name!r}, {self.provider}, tier={self.tier}, {self.health.value})"

    @property
    def due(self) -> float:
        return self.base + (self.picks + 0.5) * self.stride


class _Tier:
    __slots__ = ("level", "ready", "reserve", "vtime")

    def __init__(self, level: int) -> None:
        self.level = level
        self.ready: list[_Entry] = []
        self.reserve: list[_Entry] = []
        self.vtime = 0.0


class _Group:
    """All keys of one provider: tiers in order, and the recovery timers."""

    __slots__ = ("keys", "tiers", "timers")

    def __init__(self, keys: list[Key]) -> None:
        self.keys = keys
        levels = sorted({k.tier for k in keys})
        self.tiers = [_Tier(level) for level in levels]
        self.timers: list[_Entry] = []


class ManagedCreditPool:
    """A registry of keys with health, and weighted selection across tiers. Pure: ``now`` in."""

    def __init__(self, keys: Iterable[KeyConfig] = (), policy: PoolPolicy | None = None) -> None:
        self._policy = policy or PoolPolicy()
        self._keys: dict[str, Key] = {}
        self._by_secret: dict[str, str] = {}
        self._groups: dict[str, _Group] = {}
        self._tier_of: dict[tuple[str, int], _Tier] = {}
        self._scopes: dict[str, list[Key]] = {}
        self.configure(keys)

    # ------------------------------------------------------------------ configuration

    @property
    def policy(self) -> PoolPolicy:
        return self._policy

    def configure(self, keys: Iterable[KeyConfig], policy: PoolPolicy | None = None) -> None:
        """Replace the key set. Health survives for keys that are still the same key.

        Cool-downs and breaker state carry over when name, provider and value are unchanged; a
        revocation carries over only when nothing at all changed in the key's configuration.
        """
        if policy is not None:
            self._policy = policy
        old = self._keys
        fresh: dict[str, Key] = {}
        for order, config in enumerate(keys):
            if config.name in fresh:
                raise ValueError(f"key {config.name!r} is configured twice")
            if config.weight < 0 or config.tier < 0:
                raise ValueError(f"key {config.name!r}: weight and tier must be >= 0")
            key = Key(config, order, self._policy.round_robin)
            previous = old.get(config.name)
            if (
                previous is not None
                and previous.provider == key.provider
                and previous.secret == key.secret
            ):
                key.requests, key.rate_limited = previous.requests, previous.rate_limited
                key.failures, key.backoff = previous.failures, previous.backoff
                if previous.health is not KeyHealth.REVOKED or previous.config == config:
                    key.health, key.until = previous.health, previous.until
                if key.health is KeyHealth.HALF_OPEN:
                    key.probing = False
            fresh[config.name] = key

        by_provider: dict[str, list[Key]] = {}
        scopes: dict[str, list[Key]] = {}
        for key in fresh.values():
            by_provider.setdefault(key.provider, []).append(key)
            if key.config.quota_scope:
                scopes.setdefault(key.config.quota_scope, []).append(key)
        self._keys = fresh
        self._by_secret = {k.secret: k.name for k in fresh.values()}
        self._scopes = scopes
        self._groups = {p: _Group(ks) for p, ks in by_provider.items()}
        self._tier_of = {(p, tier.level): tier for p, g in self._groups.items() for tier in g.tiers}
        tier_members: dict[tuple[str, int], list[Key]] = {}
        for key in fresh.values():
            tier_members.setdefault((key.provider, key.tier), []).append(key)
        for members in tier_members.values():
            # Stagger first due times across the tier, (rank + 1/2) / n of a stride: equal
            # weights become round-robin in configuration order, and light keys don't bunch
            # up behind a heavy one.
            n = len(members)
            for rank, key in enumerate(members):
                key.base = key.stride * ((rank + 0.5) / n - 0.5)
                self._place(key, fresh_start=True)

    def providers(self) -> set[str]:
        return set(self._groups)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, name: object) -> bool:
        return name in self._keys

    # ------------------------------------------------------------------ selection

    def acquire(self, provider: str, now: float, exclude: Collection[str] = ()) -> Key | None:
        """The key to use for the next request to ``provider``, or None if none is usable."""
        group = self._groups.get(provider)
        if group is None:
            return None
        timers = group.timers
        if timers and timers[0][0] <= now:
            self._expire(group, now)
        for tier in group.tiers:
            key = self._pick(tier, tier.ready, exclude, now)
            if key is None and tier.reserve:
                key = self._pick(tier, tier.reserve, exclude, now)
            if key is not None:
                key.requests += 1
                return key
        return None

    def _pick(
        self, tier: _Tier, heap: list[_Entry], exclude: Collection[str], now: float
    ) -> Key | None:
        skipped: list[_Entry] = []
        chosen: Key | None = None
        while heap:
            entry = heap[0]
            key = entry[3]
            if entry[2] != key.token:
                heapq.heappop(heap)  # stale: the key changed state since this was pushed
                continue
            if exclude and key.name in exclude:
                skipped.append(heapq.heappop(heap))
                continue
            tier.vtime = entry[0]
            key.picks += 1
            if key.health is KeyHealth.HALF_OPEN:
                # One probe at a time: out of rotation until it reports back (or times out).
                heapq.heappop(heap)
                key.probing = True
                key.token += 1
                self._timer(key, now + self._policy.probe_timeout)
            else:
                heapq.heapreplace(heap, (key.due, key.order, key.token, key))
            chosen = key
            break
        for entry in skipped:
            heapq.heappush(heap, entry)
        return chosen

    def next_recovery(self, provider: str, now: float) -> float | None:
        """Earliest unix time a key of ``provider`` is usable: ``now`` if one is, None if never."""
        group = self._groups.get(provider)
        if group is None:
            return None
        self._expire(group, now)
        for tier in group.tiers:
            if self._live(tier.ready) or self._live(tier.reserve):
                return now
        timers = group.timers
        while timers and timers[0][2] != timers[0][3].token:
            heapq.heappop(timers)
        return timers[0][0] if timers else None

    @staticmethod
    def _live(heap: list[_Entry]) -> bool:
        while heap and heap[0][2] != heap[0][3].token:
            heapq.heappop(heap)
        return bool(heap)

    # ------------------------------------------------------------------ learning

    def release(
        self,
        key: Key,
        outcome: Outcome,
        now: float,
        headers: Mapping[str, str] | None = None,
    ) -> list[Transition]:
        """Record what the provider answered through ``key``. Returns the changes worth reporting.

        ``headers`` is a case-insensitive mapping (aiohttp's) or one with lower-case names.
        """
        current = self._keys.get(key.name)
        if current is not key:
            # Reconfigured while the request was in flight: teach the key's successor, if it
            # is still the same key.
            if current is None or current.secret != key.secret:
                return []
            key = current
        policy = self._policy
        if outcome is Outcome.OK:
            key.failures = 0
            if key.health is KeyHealth.HALF_OPEN:
                key.backoff = 0.0
                self._set(key, KeyHealth.READY, None, now)
                return [self._transition(key, "Recovered")]
            if headers and key.health in (KeyHealth.READY, KeyHealth.LOW_HEADROOM):
                until = headroom_exhausted_until(
                    headers,
                    now,
                    policy.headroom_floor,
                    policy.headroom_fraction,
                    policy.headroom_fallback,
                )
                if until is not None:
                    # Deprioritised, not out; still never for longer than any cool-down.
                    until = min(until, now + policy.max_cooldown)
                    if key.health is not KeyHealth.LOW_HEADROOM or (key.until or 0) < until:
                        self._set(key, KeyHealth.LOW_HEADROOM, until, now)
                elif key.health is KeyHealth.LOW_HEADROOM:
                    self._set(key, KeyHealth.READY, None, now)
            return []
        if outcome is Outcome.RATE_LIMITED:
            key.rate_limited += 1
            key.failures = 0
            until = policy.cooldown_deadline(headers, now)
            peers = self._scopes.get(key.config.quota_scope or "", [key])
            if key not in peers:
                peers = [key]
            changed = []
            for peer in peers:
                if self._cool(peer, until, now):
                    changed.append(self._transition(peer, "RateLimited"))
            return changed
        if outcome is Outcome.UNAUTHORIZED:
            if key.health is KeyHealth.REVOKED:
                return []
            self._set(key, KeyHealth.REVOKED, None, now)
            return [self._transition(key, "Unauthorized")]
        if outcome in _FAILURES:
            key.failures += 1
            if key.health is KeyHealth.HALF_OPEN:
                key.backoff = min(key.backoff * 2, policy.breaker_max_backoff)
            elif key.failures >= policy.failure_threshold and key.health in (
                KeyHealth.READY,
                KeyHealth.LOW_HEADROOM,
            ):
                key.backoff = min(policy.breaker_backoff, policy.breaker_max_backoff)
            else:
                return []
            self._set(key, KeyHealth.OPEN, now + key.backoff, now)
            return [self._transition(key, "CircuitOpen")]
        # CANCELLED: nothing learnt; a probe that never finished may be retried.
        if key.health is KeyHealth.HALF_OPEN and key.probing:
            self._set(key, KeyHealth.HALF_OPEN, None, now)
        return []

    def impose_cooldown(self, name: str, until: float, now: float) -> bool:
        """Apply a cool-down learnt elsewhere (the cluster's table). Only ever lengthens one."""
        key = self._keys.get(name)
        if key is None or until <= now:
            return False
        return self._cool(key, min(until, now + self._policy.max_cooldown), now)

    def revoke(self, name: str, now: float) -> bool:
        """Take a key out until its configuration changes (the cluster says it is revoked)."""
        key = self._keys.get(name)
        if key is None or key.health is KeyHealth.REVOKED:
            return False
        self._set(key, KeyHealth.REVOKED, None, now)
        return True

    def _cool(self, key: Key, until: float, now: float) -> bool:
        if key.health is KeyHealth.REVOKED:
            return False
        if key.health in (KeyHealth.COOLING, KeyHealth.OPEN) and (key.until or 0) >= until:
            return False  # a longer deadline never shortens
        self._set(key, KeyHealth.COOLING, until, now)
        return True

    # ------------------------------------------------------------------ the seed's API

    def get_next_key(self, provider: str, now: float) -> str | None:
        """The next key value for ``provider`` (fire and forget: no release needed)."""
        key = self.acquire(provider, now)
        return key.secret if key is not None else None

    def mark_as_cooling(
        self, key: str, now: float, seconds: float | None = None
    ) -> list[Transition]:
        """Take a key (by name or value) out of rotation for ``seconds`` (default: the pool's)."""
        name = key if key in self._keys else self._by_secret.get(key)
        if name is None:
            raise KeyError("no such key in this pool")  # never echo what might be a secret
        live = self._keys[name]
        delay = self._policy.default_cooldown if seconds is None else seconds
        until = now + min(max(delay, 0.0), self._policy.max_cooldown)
        return [self._transition(live, "RateLimited")] if self._cool(live, until, now) else []

    # ------------------------------------------------------------------ reading

    def statuses(self, now: float) -> list[KeyStatus]:
        for group in self._groups.values():
            self._expire(group, now)
        return [
            KeyStatus(
                name=k.name,
                provider=k.provider,
                tier=k.tier,
                weight=k.weight,
                fingerprint=k.fingerprint,
                health=k.health,
                until=k.until,
                requests=k.requests,
                rate_limited=k.rate_limited,
                failures=k.failures,
            )
            for k in self._keys.values()
        ]

    # ------------------------------------------------------------------ mechanics

    def _transition(self, key: Key, reason: str) -> Transition:
        return Transition(key.name, key.fingerprint, key.health, key.until, reason)

    def _set(self, key: Key, health: KeyHealth, until: float | None, now: float) -> None:
        key.token += 1  # every heap and timer entry of the old state is now stale
        key.health = health
        key.until = until
        key.probing = False
        self._place(key, fresh_start=False)

    def _place(self, key: Key, fresh_start: bool) -> None:
        """Put a key where its health says: a rotation heap, a timer, or nowhere."""
        tier = self._tier_of[(key.provider, key.tier)]
        if key.until is not None:
            self._timer(key, key.until)
        if key.stride == 0.0 or key.health not in (*_IN_ROTATION, KeyHealth.LOW_HEADROOM):
            return
        if not fresh_start:
            # Rejoin at the tier's present, half a stride out: no burst to "catch up".
            key.base, key.picks = tier.vtime, 0
        heap = tier.reserve if key.health is KeyHealth.LOW_HEADROOM else tier.ready
        heapq.heappush(heap, (key.due, key.order, key.token, key))
        if len(heap) > 64 and len(heap) > 3 * len(self._keys):
            # Many state flips left stale entries behind; compact instead of growing.
            heap[:] = [e for e in heap if e[2] == e[3].token]
            heapq.heapify(heap)

    def _timer(self, key: Key, when: float) -> None:
        if math.isfinite(when):
            heapq.heappush(self._groups[key.provider].timers, (when, key.order, key.token, key))

    def _expire(self, group: _Group, now: float) -> None:
        timers = group.timers
        while timers and timers[0][0] <= now:
            _, _, token, key = heapq.heappop(timers)
            if token != key.token:
                continue
            if key.health in (KeyHealth.OPEN, KeyHealth.HALF_OPEN):
                # Back-off over (or a probe that timed out): let one probe through.
                self._set(key, KeyHealth.HALF_OPEN, None, now)
            elif key.health in (KeyHealth.COOLING, KeyHealth.LOW_HEADROOM):
                self._set(key, KeyHealth.READY, None, now)
