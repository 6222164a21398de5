"""The ManagedCreditPool: which key serves the next request, and what each answer teaches us.

Selection is stride scheduling (earliest virtual finish time), the heap form of smooth weighted
round-robin: a key is due again one stride (``1 / weight``) after its last pick; the pool always
serves the key due first. Over any ``sum(weights)`` consecutive picks each key gets its weight
within ±1, equal weights degrade to plain round-robin, and a pick costs O(log n) heap
operations in C.

Every model has its own schedule (a *lane*: tiers of heaps over the keys that may serve it,
built on the model's first request and kept until the key set changes), so the ±1 holds per
model however requests for different models interleave, and a pick never looks at other models.
Requests without a model use the lane ``None``.

A rotation heap entry is one int, ``(due << 32) | slot``: virtual time in fixed point (one
unit = 2**32, a weight-1 key's stride) with the key's slot (a number never reused) in the low
bits, so ties break by slot and a comparison touches no tuple. Each lane keeps the live entry of
every key it has in rotation (``lane.ready`` / ``lane.reserve``: slot -> entry); a state change
replaces or drops that (one dict operation per lane), which turns the old heap entry stale
(dropped lazily when it surfaces), and schedules a timer for the recovery. Timers are checked
with one heap peek per pick. So a pick costs the same whatever the number of models in play or
of models a key is cooling for, and O(log n) in the keys serving the model; small int entries
keep the cache misses of 100 heaps of 10,000 keys low.

``configure`` keeps the schedule: an unchanged key keeps its place in every lane, a key whose
weight changed keeps the same fraction of its stride still to run, and a new key joins at its
tier's current virtual time.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Collection, Iterable, Mapping

from sideproxy.pool._headers import headroom
from sideproxy.pool._models import Matcher, compile_patterns, serves
from sideproxy.pool._types import (
    KeyConfig,
    KeyHealth,
    KeyStatus,
    LimitScope,
    Outcome,
    PoolPolicy,
    Transition,
)

# Timer entries: (deadline, order, token, model token, key); stale when a token moved on.
_Entry = tuple[float, int, int, int, "Key"]
SCALE = 1 << 32  # fixed-point virtual time: one unit is the stride of a weight-1 key
SLOT_BITS = 32
SLOT_MASK = (1 << SLOT_BITS) - 1

# The members the request path tests on every pick and every answer, as module constants: on
# Python 3.11 reading an enum member off its class (``KeyHealth.READY``) is a descriptor call,
# ~70 ns each, a module global ~10 ns.
_READY = KeyHealth.READY
_LOW_HEADROOM = KeyHealth.LOW_HEADROOM
_HALF_OPEN = KeyHealth.HALF_OPEN
_OK = Outcome.OK
_KEY_SCOPE = LimitScope.KEY

_IN_ROTATION = frozenset({KeyHealth.READY, KeyHealth.HALF_OPEN, KeyHealth.LOW_HEADROOM})
_PROBED = frozenset({KeyHealth.EXHAUSTED, KeyHealth.REVOKED})
_FAILURES = frozenset(
    {Outcome.SERVER_ERROR, Outcome.CONNECT_ERROR, Outcome.TIMEOUT, Outcome.FORBIDDEN}
)
# Lanes kept per provider. Model names come from clients, so the number of lanes is bounded,
# and so is their memory (one heap entry per key per lane, ~100 bytes): at most MAX_LANES, and
# at most MAX_LANE_ENTRIES entries in all (200 lanes at 10,000 keys). Past that the least
# recently used lane is dropped (its keys' places in it are forgotten, nothing else).
MAX_LANES = 512
MIN_LANES = 32
MAX_LANE_ENTRIES = 2_000_000


class _ModelState:
    """One (key, model)'s rate-limit state: a cool-down and a headroom deadline."""

    __slots__ = ("cool_until", "low_until", "token")

    def __init__(self) -> None:
        self.cool_until: float | None = None
        self.low_until: float | None = None
        self.token = 1  # never 0: 0 is "no model state", so old entries can't come back


class Key:
    """A key's live state in one pool: ``acquire`` hands it out, ``release`` takes it back."""

    __slots__ = (
        "backoff",
        "config",
        "exhausted",
        "failures",
        "fingerprint",
        "health",
        "limits",
        "matcher",
        "name",
        "order",
        "picks",
        "probe_deadline",
        "probing",
        "provider",
        "quota_backoff",
        "rate_limited",
        "requests",
        "secret",
        "slot",
        "stride",
        "tier",
        "token",
        "unauthorized",
        "until",
        "weight",
    )

    def __init__(self, config: KeyConfig, order: int, round_robin: bool, slot: int) -> None:
        self.slot = slot
        self.name = config.name
        self.provider = config.provider
        self.secret = config.secret
        self.fingerprint = config.fingerprint
        self._apply(config, order, round_robin)
        self.health = KeyHealth.READY
        self.until: float | None = None
        self.failures = 0
        self.backoff = 0.0
        self.quota_backoff = 0.0
        self.probing = False
        self.probe_deadline: float | None = None
        self.token = 0
        self.picks = 0
        self.requests = 0
        self.rate_limited = 0
        self.exhausted = 0
        self.unauthorized = 0
        self.limits: dict[str, _ModelState] = {}

    def _apply(self, config: KeyConfig, order: int, round_robin: bool) -> None:
        """Take on a (possibly changed) configuration of the same key value."""
        self.config = config
        self.tier = config.tier
        self.weight = config.weight
        self.order = order
        weight = 1 if round_robin else config.weight
        self.stride = (SCALE + weight // 2) // weight if config.weight > 0 else 0
        self.matcher: Matcher = compile_patterns(config.models)

    def __repr__(self) -> str:
        return f"Key({self.name!r}, {self.provider}, tier={self.tier}, {self.health.value})"

    def __lt__(self, other: Key) -> bool:
        # Heap entries that tie on everything before the key (a stale entry of a key that
        # left, beside its successor's) must still compare: the order between them is moot.
        return False

    def serves(self, model: str | None) -> bool:
        return serves(self.matcher, model)

    def mtoken(self, model: str | None) -> int:
        state = self.limits.get(model) if model is not None and self.limits else None
        return state.token if state is not None else 0


class _Tier:
    __slots__ = ("level", "ready", "reserve", "vtime")

    def __init__(self, level: int) -> None:
        self.level = level
        self.ready: list[int] = []  # entries (due << SLOT_BITS) | slot
        self.reserve: list[int] = []
        self.vtime = 0


class _Lane:
    """The schedule of one model (None: requests without one) over the keys that serve it."""

    __slots__ = ("model", "ready", "reserve", "size", "tier_of", "tiers", "timers", "used")

    def __init__(self, model: str | None) -> None:
        self.model = model
        self.size = 0  # keys that serve this model, whatever their health
        self.tiers: list[_Tier] = []
        self.tier_of: dict[int, _Tier] = {}
        # The live entry of each key in rotation here, by slot: any other entry is stale.
        self.ready: dict[int, int] = {}
        self.reserve: dict[int, int] = {}
        self.timers: list[_Entry] = []  # this model's cool-down and headroom deadlines
        self.used = 0.0

    def tier(self, level: int) -> _Tier:
        tier = self.tier_of.get(level)
        if tier is None:
            tier = self.tier_of[level] = _Tier(level)
            self.tiers.append(tier)
            self.tiers.sort(key=lambda t: t.level)
        return tier

    def due(self, key: Key) -> int | None:
        """Where ``key`` stands in this lane's schedule, if it is in rotation here."""
        entry = self.ready.get(key.slot)
        if entry is None:
            entry = self.reserve.get(key.slot)
        return None if entry is None else entry >> SLOT_BITS

    def drop(self, key: Key) -> None:
        """Take ``key`` out of rotation here (its heap entry turns stale)."""
        self.ready.pop(key.slot, None)
        self.reserve.pop(key.slot, None)


class _Group:
    """All keys of one provider: the lanes, and the key-wide recovery timers."""

    __slots__ = ("keys", "lanes", "timers")

    def __init__(self) -> None:
        self.keys: list[Key] = []
        self.lanes: dict[str | None, _Lane] = {}
        self.timers: list[_Entry] = []


class ManagedCreditPool:
    """A registry of keys with health, and weighted selection across tiers. Pure: ``now`` in."""

    def __init__(self, keys: Iterable[KeyConfig] = (), policy: PoolPolicy | None = None) -> None:
        self._policy = policy or PoolPolicy()
        self._keys: dict[str, Key] = {}
        self._by_secret: dict[str, str] = {}
        self._groups: dict[str, _Group] = {}
        self._scopes: dict[str, list[Key]] = {}
        self._probes: list[_Entry] = []  # when exhausted / revoked keys are due a probe
        self._slots: dict[int, Key] = {}
        self._next_slot = 0
        self.configure(keys)

    # ------------------------------------------------------------------ configuration

    @property
    def policy(self) -> PoolPolicy:
        return self._policy

    def configure(
        self, keys: Iterable[KeyConfig], policy: PoolPolicy | None = None
    ) -> frozenset[str]:
        """Replace the key set; returns the names of keys that left (to drop their metrics).

        A key is the same key when name, provider and value are unchanged: it keeps its health,
        per-model state, counters, a probe in flight, and its place in every schedule (so an
        unchanged key is not touched at all: the cost is O(keys), not O(keys x models)). A key
        whose weight changed keeps the fraction of its stride still to run; one whose tier or
        models changed, and a new key, join at the tier's current virtual time. A revocation
        carries over only when nothing at all changed in the key's configuration.
        """
        configs = list(keys)
        policy = policy or self._policy
        if policy == self._policy and configs == [k.config for k in self._keys.values()]:
            return frozenset()  # the same table again: nothing to do, nothing to disturb
        names: set[str] = set()
        for config in configs:
            if config.name in names:
                raise ValueError(f"key {config.name!r} is configured twice")
            names.add(config.name)
        old = self._keys
        self._policy = policy
        fresh: dict[str, Key] = {}
        moved: dict[Key, tuple[int, int, Matcher]] = {}  # old (stride, tier, matcher)
        joined: list[Key] = []
        for order, config in enumerate(configs):
            key = old.get(config.name)
            if key is None or key.provider != config.provider or key.secret != config.secret:
                key = Key(config, order, policy.round_robin, self._next_slot)
                self._next_slot += 1
                self._slots[key.slot] = key
                joined.append(key)
            else:
                if key.health is KeyHealth.REVOKED and key.config != config:
                    key.health, key.until, key.probing = KeyHealth.READY, None, False
                    moved[key] = (key.stride, key.tier, key.matcher)
                before = (key.stride, key.tier, key.config.models)
                placed = (key.stride, key.tier, key.matcher)
                key._apply(config, order, policy.round_robin)
                if (key.stride, key.tier, key.config.models) != before:
                    moved[key] = placed
            fresh[config.name] = key
        left = [k for n, k in old.items() if fresh.get(n) is not k]
        self._forget(left)
        self._keys = fresh
        self._by_secret = {k.secret: k.name for k in fresh.values()}
        scopes: dict[str, list[Key]] = {}
        groups: dict[str, _Group] = {}
        for key in fresh.values():
            group = groups.get(key.provider)
            if group is None:
                group = groups[key.provider] = self._groups.get(key.provider) or _Group()
                group.keys = []
            group.keys.append(key)
            if key.config.quota_scope:
                scopes.setdefault(key.config.quota_scope, []).append(key)
        self._scopes = scopes
        self._groups = groups
        for key in left:
            self._resize(key, key.matcher, None, has=False)
        self._move(moved)
        for key in joined:
            self._resize(key, None, key.matcher, had=False)
            for lane in self._groups[key.provider].lanes.values():
                if key.serves(lane.model):
                    self._place(lane, key, None, -math.inf)
        return frozenset(k.name for k in left)

    def _forget(self, left: list[Key]) -> None:
        """Keys that left: every timer and rotation entry of theirs turns stale."""
        for key in left:
            key.token += 1
            del self._slots[key.slot]
            for lane in self._groups[key.provider].lanes.values():
                lane.drop(key)

    def _resize(
        self, key: Key, before: Matcher, after: Matcher, had: bool = True, has: bool = True
    ) -> None:
        """Keep each lane's count of the keys serving its model right."""
        group = self._groups.get(key.provider)
        if group is None:
            return
        for lane in group.lanes.values():
            model = lane.model
            lane.size += int(has and serves(after, model)) - int(had and serves(before, model))

    def _move(self, moved: Mapping[Key, tuple[int, int, Matcher]]) -> None:
        """Re-place keys whose stride, tier or models changed, keeping what can be kept."""
        if not moved:
            return
        by_group: dict[str, list[Key]] = {}
        for key in moved:
            by_group.setdefault(key.provider, []).append(key)
        for provider, keys in by_group.items():
            group = self._groups[provider]
            for key in keys:
                stride, tier, matcher = moved[key]
                self._resize(key, matcher, key.matcher)
                key.token += 1  # its old timers are stale
                self._timers_of(key)
                for model, lane in group.lanes.items():
                    due = lane.due(key)
                    lane.drop(key)
                    if not key.serves(model):
                        continue
                    if due is not None and (tier != key.tier or stride <= 0 or key.stride <= 0):
                        due = None  # another tier, or from idle: join at the present
                    if due is not None:
                        vtime = lane.tier(key.tier).vtime
                        due = vtime + (due - vtime) * key.stride // stride
                    self._place(lane, key, due, -math.inf)

    def providers(self) -> set[str]:
        return set(self._groups)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, name: object) -> bool:
        return name in self._keys

    def serves(self, provider: str, model: str | None) -> bool:
        """Does any key of ``provider`` serve ``model`` (whatever its health)?"""
        group = self._groups.get(provider)
        if group is None:
            return False
        lane = group.lanes.get(model)
        if lane is not None:
            return lane.size > 0
        return self._build_lane(group, model, 0.0).size > 0

    # ------------------------------------------------------------------ selection

    def acquire(
        self,
        provider: str,
        now: float,
        exclude: Collection[str] = (),
        model: str | None = None,
    ) -> Key | None:
        """The key to use for the next request to ``provider`` for ``model``, or None.

        Only keys that may serve ``model`` and are not cooling for it (nor out key-wide).
        """
        group = self._groups.get(provider)
        if group is None:
            return None
        lane = group.lanes.get(model)
        if lane is None:
            lane = self._build_lane(group, model, now)
        lane.used = now
        timers = group.timers
        if timers and timers[0][0] <= now:
            self._expire(group, now)
        if lane.timers and lane.timers[0][0] <= now:
            self._expire_lane(lane, now)
        for tier in lane.tiers:
            key = self._pick(tier, tier.ready, lane.ready, exclude, now)
            if key is None and tier.reserve:
                key = self._pick(tier, tier.reserve, lane.reserve, exclude, now)
            if key is not None:
                key.requests += 1
                return key
        return None

    def _pick(
        self,
        tier: _Tier,
        heap: list[int],
        live: dict[int, int],
        exclude: Collection[str],
        now: float,
    ) -> Key | None:
        skipped: list[int] | None = None
        chosen: Key | None = None
        while heap:
            entry = heap[0]
            slot = entry & SLOT_MASK
            if live.get(slot) != entry:
                heapq.heappop(heap)  # stale: the key changed state since this was pushed
                continue
            key = self._slots[slot]
            if exclude and key.name in exclude:
                if skipped is None:
                    skipped = []
                skipped.append(heapq.heappop(heap))
                continue
            tier.vtime = entry >> SLOT_BITS
            key.picks += 1
            if key.health is _HALF_OPEN:
                # One probe at a time: out of rotation (every lane) until it is released.
                heapq.heappop(heap)
                key.probing = True
                key.probe_deadline = now + self._policy.probe_timeout
                key.token += 1
                for lane in self._groups[key.provider].lanes.values():
                    lane.drop(key)
                self._timer(key, key.probe_deadline)
            else:
                entry += key.stride << SLOT_BITS
                heapq.heapreplace(heap, entry)
                live[slot] = entry
            chosen = key
            break
        if skipped is not None:
            for entry in skipped:
                heapq.heappush(heap, entry)
        return chosen

    def next_recovery(self, provider: str, now: float, model: str | None = None) -> float | None:
        """Earliest unix time a key of ``provider`` can serve ``model``: ``now`` if one can,
        None if none will by itself (all revoked or exhausted: they return through probes)."""
        group = self._groups.get(provider)
        if group is None:
            return None
        lane = group.lanes.get(model)
        if lane is None:
            lane = self._build_lane(group, model, now)
        self._expire(group, now)
        self._expire_lane(lane, now)
        for tier in lane.tiers:
            if self._live(tier.ready, lane.ready) or self._live(tier.reserve, lane.reserve):
                return now
        # The error path only (no key usable): a scan of the lane's keys is fine here.
        times = [
            t
            for k in group.keys
            if k.serves(model) and (t := self._recovery(k, model, now)) is not None
        ]
        return min(times) if times else None

    def _recovery(self, key: Key, model: str | None, now: float) -> float | None:
        if key.stride == 0.0 or key.health in _PROBED:
            return None
        at = now
        if key.health is KeyHealth.HALF_OPEN and key.probing:
            at = key.probe_deadline or now
        elif key.health not in (KeyHealth.READY, KeyHealth.HALF_OPEN) and key.until is not None:
            at = key.until
        state = key.limits.get(model) if model is not None else None
        if state is not None and state.cool_until is not None:
            at = max(at, state.cool_until)
        return at

    @staticmethod
    def _live(heap: list[int], live: dict[int, int]) -> bool:
        while heap and live.get(heap[0] & SLOT_MASK) != heap[0]:
            heapq.heappop(heap)
        return bool(heap)

    # ------------------------------------------------------------------ learning

    def release(
        self,
        key: Key,
        outcome: Outcome,
        now: float,
        headers: Mapping[str, str] | None = None,
        model: str | None = None,
    ) -> list[Transition]:
        """Record what the provider answered through ``key``. Returns the changes worth reporting.

        ``model``: the model the request named, when the answer is about that model (a 429,
        headroom); None for a request without a model or an answer about the whole key.
        ``headers`` is a case-insensitive mapping (aiohttp's) or one with lower-case names.
        """
        current = self._keys.get(key.name)
        if current is not key:
            # Reconfigured with a new value while the request was in flight: not this key.
            return []
        if self._policy.cooldown_scope is _KEY_SCOPE:
            model = None
        if outcome is _OK:
            return self._ok(key, now, headers, model)
        if outcome is Outcome.RATE_LIMITED:
            key.rate_limited += 1
            key.failures = 0
            if key.health is KeyHealth.HALF_OPEN and key.probing:
                # The probe was answered, just not served: the next request probes again.
                self._set(key, KeyHealth.HALF_OPEN, None, now)
            until = self._policy.cooldown_deadline(headers, now)
            return self._rest(key, until, now, model, "RateLimited")
        if outcome is Outcome.EXHAUSTED:
            key.exhausted += 1
            return [
                self._transition(peer, "Exhausted")
                for peer in self._peers(key)
                if self._exhaust(peer, None, now)
            ]
        if outcome is Outcome.UNAUTHORIZED:
            key.unauthorized += 1
            return [self._transition(key, "Unauthorized")] if self._revoke(key, now) else []
        if outcome in _FAILURES:
            return self._failure(key, now)
        # CANCELLED: nothing learnt; a probe that never finished may be retried.
        if key.health is KeyHealth.HALF_OPEN and key.probing:
            self._set(key, KeyHealth.HALF_OPEN, None, now)
        return []

    def _ok(
        self, key: Key, now: float, headers: Mapping[str, str] | None, model: str | None
    ) -> list[Transition]:
        key.failures = 0
        key.quota_backoff = 0.0  # a real answer: the quota is back for good
        health = key.health
        if health is _HALF_OPEN:
            key.backoff = 0.0
            self._set(key, KeyHealth.READY, None, now)
            return [self._transition(key, "Recovered")]
        if headers is None or (health is not _READY and health is not _LOW_HEADROOM):
            return []
        policy = self._policy
        until, spent = headroom(
            headers,
            now,
            policy.headroom_floor,
            policy.headroom_fraction,
            policy.headroom_fallback,
        )
        if until is None:  # (and so spent is None)
            # Headroom: the common answer. A low mark from before goes, unless the headers
            # were empty (an answer that says nothing clears nothing).
            if model is not None:
                state = key.limits.get(model)
                if state is not None and state.low_until is not None and headers:
                    self._set_model(key, model, state.cool_until, None, now)
            elif health is _LOW_HEADROOM and headers:
                self._set(key, KeyHealth.READY, None, now)
            return []
        if spent is not None:
            # A budget at 0 with a known reset: the next request would earn a 429 for sure,
            # so the key (and its quotaScope, which shares the budget) rests until the reset.
            return self._rest(key, min(spent, now + policy.max_cooldown), now, model, "Spent")
        # Deprioritised, not out; still never for longer than any cool-down.
        until = min(until, now + policy.max_cooldown)
        if model is not None:
            state = key.limits.get(model)
            if state is None or (state.low_until or 0) < until:
                self._set_model(key, model, state.cool_until if state else None, until, now)
        elif health is not _LOW_HEADROOM or (key.until or 0) < until:
            self._set(key, KeyHealth.LOW_HEADROOM, until, now)
        return []

    def _rest(
        self, key: Key, until: float, now: float, model: str | None, reason: str
    ) -> list[Transition]:
        """Cool a key and its quotaScope peers, for one model or (model None) every model."""
        changed = []
        for peer in self._peers(key):
            if model is None:
                if self._cool(peer, until, now):
                    changed.append(self._transition(peer, reason))
            elif self._cool_model(peer, model, until, now):
                changed.append(self._transition(peer, reason, model, until))
        return changed

    def _failure(self, key: Key, now: float) -> list[Transition]:
        policy = self._policy
        key.failures += 1
        if key.health is KeyHealth.HALF_OPEN:
            key.backoff = min(
                max(key.backoff * 2, policy.breaker_backoff), policy.breaker_max_backoff
            )
        elif key.failures >= policy.failure_threshold and key.health in (
            KeyHealth.READY,
            KeyHealth.LOW_HEADROOM,
        ):
            key.backoff = min(policy.breaker_backoff, policy.breaker_max_backoff)
        else:
            return []
        self._set(key, KeyHealth.OPEN, now + key.backoff, now)
        return [self._transition(key, "CircuitOpen")]

    def _peers(self, key: Key) -> list[Key]:
        """The key and the keys sharing its quotaScope (one organisation's quota)."""
        peers = self._scopes.get(key.config.quota_scope or "", [key])
        return peers if key in peers else [key]

    # ------------------------------------------------------------------ probes

    def probes_due(self, now: float) -> list[Key]:
        """Exhausted and revoked keys whose next probe is due; each is handed out once.

        The caller probes each with ``GET <baseURL>/models`` (costs no tokens) and reports with
        ``probe_result``. A probe that never reports back is offered again after
        ``policy.quota_probe_timeout``.
        """
        due: list[Key] = []
        probes = self._probes
        while probes and probes[0][0] <= now:
            _, _, token, _, key = heapq.heappop(probes)
            if token != key.token or key.health not in _PROBED:
                continue
            key.probing = True
            key.probe_deadline = now + self._policy.quota_probe_timeout
            heapq.heappush(probes, (key.probe_deadline, key.order, key.token, 0, key))
            due.append(key)
        return due

    def probe_result(self, key: Key, ok: bool, now: float) -> list[Transition]:
        """A token-free probe's answer: ``ok`` returns the key at once; else it waits longer."""
        current = self._keys.get(key.name)
        if current is not key or key.health not in _PROBED:
            return []
        if ok:
            self._set(key, KeyHealth.READY, None, now)
            return [self._transition(key, "Recovered")]
        if key.health is KeyHealth.EXHAUSTED:
            self._exhaust(key, None, now, again=True)
            return [self._transition(key, "Exhausted")]
        self._set(key, KeyHealth.REVOKED, now + self._policy.quota_max_backoff, now)
        return [self._transition(key, "Unauthorized")]

    # ------------------------------------------------------------------ what others saw

    def impose_cooldown(
        self, name: str, until: float, now: float, model: str | None = None
    ) -> bool:
        """Apply a cool-down learnt elsewhere (another replica). Only ever lengthens one."""
        key = self._keys.get(name)
        if key is None or until <= now:
            return False
        until = min(until, now + self._policy.max_cooldown)
        if model is None or self._policy.cooldown_scope is LimitScope.KEY:
            return self._cool(key, until, now)
        return self._cool_model(key, model, until, now)

    def exhaust(self, name: str, until: float, now: float) -> bool:
        """Mark a key exhausted until ``until`` (its next probe), as another replica saw it."""
        key = self._keys.get(name)
        if key is None or until <= now:
            return False
        return self._exhaust(key, min(until, now + self._policy.quota_max_backoff), now)

    def restore(self, name: str, now: float) -> bool:
        """Bring back an exhausted or revoked key (another replica's probe passed)."""
        key = self._keys.get(name)
        if key is None or key.health not in _PROBED:
            return False
        self._set(key, KeyHealth.READY, None, now)
        return True

    def revoke(self, name: str, now: float) -> bool:
        """Take a key out (the cluster says it is revoked); probed every quota_max_backoff."""
        key = self._keys.get(name)
        return key is not None and self._revoke(key, now)

    def _revoke(self, key: Key, now: float) -> bool:
        if key.health is KeyHealth.REVOKED:
            return False
        self._set(key, KeyHealth.REVOKED, now + self._policy.quota_max_backoff, now)
        return True

    def _exhaust(self, key: Key, until: float | None, now: float, again: bool = False) -> bool:
        policy = self._policy
        if key.health is KeyHealth.REVOKED:
            return False
        if (
            key.health is KeyHealth.EXHAUSTED
            and not again
            and (until is None or (key.until or 0) >= until)
        ):
            return False  # already out (another in-flight request saying it again)
        if until is None:
            backoff = policy.quota_backoff if key.quota_backoff <= 0 else key.quota_backoff * 2
            key.quota_backoff = min(backoff, policy.quota_max_backoff)
            until = now + key.quota_backoff
        else:
            key.quota_backoff = max(key.quota_backoff, min(until - now, policy.quota_max_backoff))
        self._set(key, KeyHealth.EXHAUSTED, until, now)
        return True

    def _cool(self, key: Key, until: float, now: float) -> bool:
        """Cool the whole key. A breaker that is open stays open (it must pass half-open)."""
        health = key.health
        if health in _PROBED:
            return False
        if health in (KeyHealth.OPEN, KeyHealth.HALF_OPEN):
            if health is KeyHealth.OPEN and (key.until or 0) >= until:
                return False
            self._set(key, KeyHealth.OPEN, max(until, key.until or 0), now)
            return True
        if health is KeyHealth.COOLING and (key.until or 0) >= until:
            return False  # a longer deadline never shortens
        self._set(key, KeyHealth.COOLING, until, now)
        return True

    def _cool_model(self, key: Key, model: str, until: float, now: float) -> bool:
        state = key.limits.get(model)
        if state is not None and state.cool_until is not None and state.cool_until >= until:
            return False
        self._set_model(key, model, until, state.low_until if state else None, now)
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
        """Every key's state as of ``now``. Reads only: a scrape never changes the pool."""
        return [self._status(k, now) for k in self._keys.values()]

    def _status(self, key: Key, now: float) -> KeyStatus:
        health, until = key.health, key.until
        if health is KeyHealth.REVOKED:
            until = None  # out until a probe passes; the probe's time is the pool's business
        elif until is not None and until <= now:
            if health in (KeyHealth.COOLING, KeyHealth.LOW_HEADROOM):
                health, until = KeyHealth.READY, None
            elif health is KeyHealth.OPEN:
                health, until = KeyHealth.HALF_OPEN, None
        cooling = sorted(
            (
                (m, s.cool_until)
                for m, s in key.limits.items()
                if s.cool_until and s.cool_until > now
            ),
            key=lambda item: (item[1], item[0]),
        )
        return KeyStatus(
            name=key.name,
            provider=key.provider,
            tier=key.tier,
            weight=key.weight,
            fingerprint=key.fingerprint,
            health=health,
            until=until,
            requests=key.requests,
            rate_limited=key.rate_limited,
            failures=key.failures,
            cooling=tuple(cooling),
            exhausted=key.exhausted,
            unauthorized=key.unauthorized,
            models=key.config.models,
        )

    # ------------------------------------------------------------------ mechanics

    def _transition(
        self, key: Key, reason: str, model: str | None = None, until: float | None = None
    ) -> Transition:
        if model is not None:
            return Transition(key.name, key.fingerprint, KeyHealth.COOLING, until, reason, model)
        until = None if key.health is KeyHealth.REVOKED else key.until
        return Transition(key.name, key.fingerprint, key.health, until, reason)

    def _set(self, key: Key, health: KeyHealth, until: float | None, now: float) -> None:
        """Change a key's key-wide state and re-place it in every lane of its provider."""
        key.token += 1  # every timer of the old state is now stale
        key.health = health
        key.until = until
        key.probing = False
        key.probe_deadline = None
        self._timers_of(key)
        group = self._groups[key.provider]
        for lane in group.lanes.values():
            lane.drop(key)
            if lane.model is None or key.serves(lane.model):
                self._place(lane, key, None, now)

    def _set_model(
        self,
        key: Key,
        model: str,
        cool_until: float | None,
        low_until: float | None,
        now: float,
    ) -> None:
        """Change one (key, model)'s state and re-place the key in that model's lane only."""
        state = key.limits.get(model)
        if state is None:
            state = key.limits[model] = _ModelState()
        state.token += 1
        state.cool_until, state.low_until = cool_until, low_until
        lane = self._groups[key.provider].lanes.get(model)
        if lane is not None and key.serves(model):
            lane.drop(key)
            self._place(lane, key, None, now)

    def _timers_of(self, key: Key) -> None:
        """The key-wide timers for a key's current state (recovery, probe, lost release)."""
        if key.health in _PROBED:
            when = key.probe_deadline if key.probing else key.until
            if when is not None:
                heapq.heappush(self._probes, (when, key.order, key.token, 0, key))
        elif key.health is KeyHealth.HALF_OPEN and key.probing and key.probe_deadline:
            self._timer(key, key.probe_deadline)
        elif key.until is not None:
            self._timer(key, key.until)

    def _place(self, lane: _Lane, key: Key, due: int | None, now: float) -> None:
        """Put a key where its state says in one lane: a rotation heap, a timer, or nowhere.

        ``due``: its place in the schedule (configure carrying it over); None: rejoin at the
        tier's present, half a stride out (no burst to "catch up"). The caller has dropped
        any earlier place of the key in this lane.
        """
        if key.stride == 0 or key.health not in _IN_ROTATION or key.probing:
            return
        model = lane.model
        state = key.limits.get(model) if model is not None and key.limits else None
        reserve = key.health is KeyHealth.LOW_HEADROOM
        if state is not None:
            if state.cool_until is not None and state.cool_until <= now:
                state.cool_until = None
            if state.low_until is not None and state.low_until <= now:
                state.low_until = None
            if state.cool_until is not None:
                heapq.heappush(
                    lane.timers, (state.cool_until, key.order, key.token, state.token, key)
                )
                return
            if state.low_until is not None:
                reserve = True
                heapq.heappush(
                    lane.timers, (state.low_until, key.order, key.token, state.token, key)
                )
        tier = lane.tier(key.tier)
        if due is None:
            due = tier.vtime + key.stride // 2
        entry = (due << SLOT_BITS) | key.slot
        heap, live = (tier.reserve, lane.reserve) if reserve else (tier.ready, lane.ready)
        live[key.slot] = entry
        heapq.heappush(heap, entry)
        if len(heap) > 64 and len(heap) > 3 * lane.size:
            # Many state flips left stale entries behind; compact instead of growing.
            heap[:] = [e for e in heap if live.get(e & SLOT_MASK) == e]
            heapq.heapify(heap)

    def _build_lane(self, group: _Group, model: str | None, now: float) -> _Lane:
        """A new model's schedule over the keys that serve it (on its first request)."""
        cap = max(MIN_LANES, min(MAX_LANES, MAX_LANE_ENTRIES // max(len(group.keys), 1)))
        while len(group.lanes) >= cap:
            oldest = min(
                (m for m in group.lanes if m is not None), key=lambda m: group.lanes[m].used
            )
            del group.lanes[oldest]
        lane = _Lane(model)
        lane.used = now
        group.lanes[model] = lane
        by_tier: dict[int, list[Key]] = {}
        for key in group.keys:
            if key.serves(model):
                by_tier.setdefault(key.tier, []).append(key)
                lane.size += 1
        for level, keys in by_tier.items():
            tier = lane.tier(level)
            # Stagger first due times across the tier, (rank + 1/2) / n of a stride, so equal
            # weights become round-robin in configuration order and light keys don't bunch up
            # behind a heavy one.
            n = len(keys)
            plain: list[int] = []
            live = lane.ready
            for rank, key in enumerate(keys):
                due = key.stride * (2 * rank + 1) // (2 * n)
                if (
                    key.health is KeyHealth.READY
                    and not key.probing
                    and key.stride > 0
                    and (model is None or model not in key.limits)
                ):
                    entry = (due << SLOT_BITS) | key.slot  # the common case
                    live[key.slot] = entry
                    plain.append(entry)
                else:
                    self._place(lane, key, due, now)
            tier.ready.extend(plain)
            heapq.heapify(tier.ready)
        return lane

    def _timer(self, key: Key, when: float) -> None:
        if math.isfinite(when):
            heapq.heappush(self._groups[key.provider].timers, (when, key.order, key.token, 0, key))

    def _expire(self, group: _Group, now: float) -> None:
        timers = group.timers
        while timers and timers[0][0] <= now:
            _, _, token, _, key = heapq.heappop(timers)
            if token != key.token:
                continue
            if key.health in (KeyHealth.OPEN, KeyHealth.HALF_OPEN):
                # Back-off over (or a probe whose release never came): let one probe through.
                self._set(key, KeyHealth.HALF_OPEN, None, now)
            elif key.health in (KeyHealth.COOLING, KeyHealth.LOW_HEADROOM):
                self._set(key, KeyHealth.READY, None, now)

    def _expire_lane(self, lane: _Lane, now: float) -> None:
        timers = lane.timers
        model = lane.model
        while timers and timers[0][0] <= now:
            _, _, token, mtoken, key = heapq.heappop(timers)
            if token != key.token or mtoken != key.mtoken(model):
                continue
            assert model is not None  # only model lanes have model timers
            state = key.limits[model]
            state.token += 1
            lane.drop(key)
            self._place(lane, key, None, now)
