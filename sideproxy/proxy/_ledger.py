"""The health channel's pure half: what this replica says, and what it takes from the others.

:class:`Ledger` keeps what this replica learnt *itself* (the pool's transitions, handed over by
the forwarder's ``on_transitions`` hook) and builds its ``ReplicaReport`` spec from that and the
pool's request counters. What a replica imposed because another one said so never enters its
ledger: a report is never echoed back and forth.

:class:`Peers` holds the other replicas' reports and hands back only the entries that changed
since they were last applied; :func:`apply_entries` applies entries to the live pool as deltas
(a cool-down only ever lengthens, never a rebuild), skipping an entry about a value the pool does
not hold now (rotated since). Pure: time is an argument.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from sideproxy.pool import KeyHealth, KeyStatus, ManagedCreditPool, Transition
from sideproxy.wire import Cooling, KeyCounts, KeyReport, ReplicaReportSpec

__all__ = ["Ledger", "Peers", "apply_entries"]

# The transition reason that ends a key's trouble (a successful probe or half-open request).
_RECOVERED = "Recovered"


@dataclass(slots=True)
class _Seen:
    """One key value as this replica saw it."""

    fingerprint: str
    cooling: dict[str, float] = field(default_factory=dict)  # model ("" = every model) -> until
    exhausted_until: float | None = None
    revoked: bool = False
    breaker_until: float | None = None

    def prune(self, now: float) -> None:
        self.cooling = {m: until for m, until in self.cooling.items() if until > now}
        if self.exhausted_until is not None and self.exhausted_until <= now:
            self.exhausted_until = None
        if self.breaker_until is not None and self.breaker_until <= now:
            self.breaker_until = None

    def live(self) -> bool:
        return bool(self.cooling or self.exhausted_until or self.revoked or self.breaker_until)


@dataclass(slots=True)
class _Counter:
    """A pool counter made cumulative across the key's re-creation (a rotation resets it)."""

    base: int = 0
    last: int = 0

    def total(self, current: int) -> int:
        if current < self.last:
            self.base += self.last
        self.last = current
        return self.base + current


class Ledger:
    """This replica's own knowledge, per key name."""

    def __init__(self) -> None:
        self._seen: dict[str, _Seen] = {}
        # name -> (requests, rateLimited, exhausted, unauthorized), each cumulative
        self._counters: dict[str, tuple[_Counter, _Counter, _Counter, _Counter]] = {}

    def record(self, transitions: Iterable[Transition]) -> bool:
        """Take in the pool's transitions; True when the report should be written now."""
        changed = False
        for change in transitions:
            seen = self._seen.get(change.name)
            if seen is None or seen.fingerprint != change.fingerprint:
                seen = self._seen[change.name] = _Seen(change.fingerprint)
            changed = self._take(seen, change) or changed
        return changed

    def _take(self, seen: _Seen, change: Transition) -> bool:
        until = change.until
        health = change.health
        if health is KeyHealth.COOLING and until is not None:
            model = change.model or ""
            if seen.cooling.get(model, 0.0) >= until:
                return False
            seen.cooling[model] = until
        elif health is KeyHealth.OPEN and until is not None:
            seen.breaker_until = until
        elif health is KeyHealth.REVOKED:
            if seen.revoked:
                return False  # a failed probe of a revoked key: nothing new
            seen.revoked = True
        elif health is KeyHealth.EXHAUSTED:
            if until is None or (seen.exhausted_until or 0.0) >= until:
                return False
            seen.exhausted_until = until
        elif change.reason == _RECOVERED:
            seen.breaker_until = seen.exhausted_until = None
            seen.revoked = False
        else:
            return False
        return True

    def spec(
        self, pool: str, replica: str, heartbeat: float, statuses: Iterable[KeyStatus]
    ) -> ReplicaReportSpec:
        """The report: every key of the pool that is in trouble or has served a request."""
        entries: list[KeyReport] = []
        for status in statuses:
            seen = self._seen.get(status.name)
            if seen is not None and seen.fingerprint != status.fingerprint:
                seen = None  # about a value the pool no longer holds
            if seen is not None:
                seen.prune(heartbeat)
            counts = self._counts(status)
            if (seen is None or not seen.live()) and counts == KeyCounts():
                continue
            entries.append(_entry(status.name, status.fingerprint, seen, counts))
        return ReplicaReportSpec(
            pool=pool,
            replica=replica,
            heartbeat=heartbeat,
            keys_reported=len(entries),
            keys=entries,
        )

    def _counts(self, status: KeyStatus) -> KeyCounts:
        counters = self._counters.get(status.name)
        if counters is None:
            counters = self._counters[status.name] = (
                _Counter(),
                _Counter(),
                _Counter(),
                _Counter(),
            )
        requests, limited, exhausted, unauthorized = counters
        return KeyCounts(
            requests=requests.total(status.requests),
            rate_limited=limited.total(status.rate_limited),
            exhausted=exhausted.total(status.exhausted),
            unauthorized=unauthorized.total(status.unauthorized),
        )


def _entry(name: str, fingerprint: str, seen: _Seen | None, counts: KeyCounts) -> KeyReport:
    if seen is None:
        return KeyReport(name=name, fingerprint=fingerprint, counts=counts)
    return KeyReport(
        name=name,
        fingerprint=fingerprint,
        cooling=[Cooling(model=m, until=u) for m, u in sorted(seen.cooling.items())],
        exhausted_until=seen.exhausted_until,
        revoked=seen.revoked,
        breaker_open_until=seen.breaker_until,
        counts=counts,
    )


_Health = tuple[str, tuple[tuple[str, float], ...], float | None, bool, float | None]


def _health(entry: KeyReport) -> _Health:
    """The part of an entry that changes a pool (counters do not), cheap to compare."""
    return (
        entry.fingerprint,
        tuple((c.model, c.until) for c in entry.cooling),
        entry.exhausted_until,
        entry.revoked,
        entry.breaker_open_until,
    )


class Peers:
    """The other replicas' reports of this pool, by report name."""

    def __init__(self) -> None:
        self._reports: dict[str, dict[str, tuple[_Health, KeyReport]]] = {}

    def __len__(self) -> int:
        return len(self._reports)

    def update(self, name: str, spec: ReplicaReportSpec) -> list[KeyReport]:
        """Store a report; the entries whose health changed since the last one of ``name``."""
        before = self._reports.get(name, {})
        now = {entry.name: (_health(entry), entry) for entry in spec.keys}
        self._reports[name] = now
        return [
            entry
            for key, (health, entry) in now.items()
            if key not in before or before[key][0] != health
        ]

    def remove(self, name: str) -> None:
        self._reports.pop(name, None)

    def replace(self, reports: Mapping[str, ReplicaReportSpec]) -> None:
        """A fresh listing: exactly these reports."""
        self._reports = {}
        for name, spec in reports.items():
            self.update(name, spec)

    def entries(self) -> list[KeyReport]:
        """Every entry of every report (to apply after the pool was reconfigured)."""
        return [entry for report in self._reports.values() for _, entry in report.values()]


def apply_entries(
    pool: ManagedCreditPool,
    entries: Iterable[KeyReport],
    fingerprints: Mapping[str, str],
    now: float,
) -> int:
    """Apply other replicas' entries to ``pool``; how many changed something.

    ``fingerprints`` maps each key the pool serves to its value's fingerprint; an entry about any
    other value (a rotation since, a key gone) changes nothing.
    """
    changed = 0
    for entry in entries:
        name = entry.name
        if fingerprints.get(name) != entry.fingerprint:
            continue
        if entry.revoked:
            changed += pool.revoke(name, now)
            continue
        if entry.exhausted_until is not None and entry.exhausted_until > now:
            changed += pool.exhaust(name, entry.exhausted_until, now)
        for cooling in entry.cooling:
            if cooling.until > now:
                changed += pool.impose_cooldown(
                    name, cooling.until, now, model=cooling.model or None
                )
        # Another replica's breaker: this one rests the key as long (a key-wide cool-down).
        if entry.breaker_open_until is not None and entry.breaker_open_until > now:
            changed += pool.impose_cooldown(name, entry.breaker_open_until, now)
    return changed
