"""Proxy reports: Events that say a key answered 429, 401/403 or tripped its breaker.

A proxy replica posts one core/v1 Event per key per cool-down window (``sideproxy.proxy.kube``)
on the PoolKey, labelled ``sideproxy.dev/report=true`` and ``sideproxy.dev/pool=<pool>``, with
the deadline in annotation ``sideproxy.dev/until`` (unix seconds), the number of answers it
stands for in ``sideproxy.dev/count`` and the key value's fingerprint in
``sideproxy.dev/fingerprint``. The operator watches only unconsumed reports (server-side label
selector ``sideproxy.dev/report=true,!sideproxy.dev/consumed``) and, per report::

    RateLimited   cooldownUntil = the later of the current and the reported deadline,
                  rateLimitedCount += count, lastRateLimited = the report's time
    CircuitOpen   cooldownUntil as above (Ready reason CircuitOpen); no counter
    Unauthorized  phase Revoked with the current fingerprint and observedGeneration, which
                  translate() keeps until the Secret value or the spec changes

A report about a value that is no longer the key's (rotated since) changes nothing. Once the
status holding a report is written, the Event gets label ``sideproxy.dev/consumed=true`` (and
the PoolKey's uid in ``involvedObject.uid``, so ``kubectl describe poolkey`` lists it): a
restarted operator never counts it again, and one that died before writing the status finds the
report still unconsumed and applies it (at least once; exactly once unless it dies between the
status write and the label).

This module is pure: Events in, status fields out, ``now`` passed in. :class:`ReportBook` is
the in-memory queue between the watch handler and a pool's reconcile.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sideproxy.models import API_GROUP, POOL_LABEL, CreditPoolSpec, KeyPhase
from sideproxy.operator._status import rfc3339
from sideproxy.translate import parse_time

REPORT_LABEL = "sideproxy.dev/report"
CONSUMED_LABEL = "sideproxy.dev/consumed"
UNTIL_ANNOTATION = "sideproxy.dev/until"
COUNT_ANNOTATION = "sideproxy.dev/count"
FINGERPRINT_ANNOTATION = "sideproxy.dev/fingerprint"
# The server-side selector of the operator's watch on Events.
REPORT_SELECTOR = f"{REPORT_LABEL}=true,!{CONSUMED_LABEL}"

RATE_LIMITED = "RateLimited"
UNAUTHORIZED = "Unauthorized"
CIRCUIT_OPEN = "CircuitOpen"
REASONS = frozenset({RATE_LIMITED, UNAUTHORIZED, CIRCUIT_OPEN})

# Ready-condition messages of a cooling key, by the reason of its deadline. RateLimited's is
# translate()'s own, so a reconcile without reports writes the same text.
COOLING_MESSAGES = {
    RATE_LIMITED: "cooling down after a 429",
    CIRCUIT_OPEN: "circuit breaker open after repeated upstream failures",
}
# A report that moves the deadline by less than this is not worth an urgent reconcile.
URGENT_MARGIN = 1.0


def rfc3339_ms(timestamp: float) -> str:
    """RFC 3339 in UTC with milliseconds, rounded up (a deadline never comes early)."""
    ms = math.ceil(round(timestamp * 1000, 3))
    return (
        datetime.fromtimestamp(ms / 1000, UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )


def _float(value: object) -> float | None:
    try:
        number = float(str(value))
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _count(value: object, fallback: object) -> int:
    for candidate in (value, fallback):
        try:
            number = int(str(candidate))
        except (TypeError, ValueError):
            continue
        if number >= 1:
            return min(number, 1_000_000)
    return 1


@dataclass(frozen=True, slots=True)
class Report:
    """One report Event, as much of it as the operator uses. Never holds a key value."""

    namespace: str
    name: str  # the Event's name
    uid: str  # the Event's uid
    key: str  # involvedObject.name: the PoolKey
    pool: str  # label sideproxy.dev/pool
    reason: str
    until: float | None  # unix seconds; None for Unauthorized
    count: int
    fingerprint: str | None
    at: float | None  # the Event's lastTimestamp (unix seconds)
    involved_uid: str  # involvedObject.uid as posted ("" from proxies: they cannot read keys)
    consumed: bool

    @classmethod
    def of(cls, body: Mapping[str, Any]) -> Report | None:
        """The report in an Event body; None for an Event that is not a report about a PoolKey."""
        meta = body.get("metadata") or {}
        involved = body.get("involvedObject") or {}
        if not isinstance(meta, Mapping) or not isinstance(involved, Mapping):
            return None
        labels = meta.get("labels") or {}
        annotations = meta.get("annotations") or {}
        if not isinstance(labels, Mapping) or not isinstance(annotations, Mapping):
            return None
        if labels.get(REPORT_LABEL) != "true":
            return None
        if involved.get("kind") != "PoolKey" or not str(involved.get("apiVersion", "")).startswith(
            f"{API_GROUP}/"
        ):
            return None
        namespace = str(meta.get("namespace") or involved.get("namespace") or "")
        name, uid, key = str(meta.get("name", "")), str(meta.get("uid", "")), involved.get("name")
        if not (namespace and name and uid and isinstance(key, str) and key):
            return None
        stamp = body.get("lastTimestamp") or body.get("eventTime") or body.get("firstTimestamp")
        return cls(
            namespace=namespace,
            name=name,
            uid=uid,
            key=key,
            pool=str(labels.get(POOL_LABEL, "")),
            reason=str(body.get("reason", "")),
            until=_float(annotations.get(UNTIL_ANNOTATION)),
            count=_count(annotations.get(COUNT_ANNOTATION), body.get("count")),
            fingerprint=str(annotations[FINGERPRINT_ANNOTATION])
            if annotations.get(FINGERPRINT_ANNOTATION)
            else None,
            at=parse_time(str(stamp)) if stamp else None,
            involved_uid=str(involved.get("uid") or ""),
            consumed=labels.get(CONSUMED_LABEL) == "true",
        )

    def consumed_patch(self, key_uid: str) -> dict[str, Any]:
        """The merge patch that marks this Event consumed (and names the PoolKey's uid)."""
        patch: dict[str, Any] = {"metadata": {"labels": {CONSUMED_LABEL: "true"}}}
        if key_uid and not self.involved_uid:
            patch["involvedObject"] = {"uid": key_uid}
        return patch


@dataclass(frozen=True, slots=True)
class Applied:
    """What the reports of one key did to its status, for the write and the Event marks."""

    status: dict[str, Any]  # the key's status with the reports merged in
    used: tuple[Report, ...]  # reports that count
    stale: tuple[Report, ...]  # reports about another value of the key: marked, not applied
    deadline_reason: str | None  # reason of the report that set cooldownUntil, if one did
    revoked: bool  # an Unauthorized report revoked the key

    @property
    def reports(self) -> tuple[Report, ...]:
        return self.used + self.stale

    @property
    def counters(self) -> dict[str, Any]:
        """The report-owned status fields, for the patch (only those that are set)."""
        return {
            name: self.status[name]
            for name in ("rateLimitedCount", "lastRateLimited")
            if self.status.get(name) is not None
        }


def _cap(report: Report, spec: CreditPoolSpec | None, now: float) -> float | None:
    """The report's deadline, bounded by the pool's own limits (a report is not a command)."""
    until = report.until
    if report.reason == RATE_LIMITED and until is None:
        until = now + (spec.cooldown.default_seconds if spec else 60.0)
    if until is None:
        return None
    if spec is not None:
        longest = (
            spec.breaker.max_backoff_seconds
            if report.reason == CIRCUIT_OPEN
            else spec.cooldown.max_seconds
        )
        until = min(until, now + longest)
    return until


def apply_reports(
    status: Mapping[str, Any],
    reports: Iterable[Report],
    *,
    fingerprint: str | None,
    generation: int | None,
    spec: CreditPoolSpec | None,
    now: float,
) -> Applied:
    """``status`` with ``reports`` merged in; pure.

    A deadline only ever moves later; a report whose fingerprint is not ``fingerprint`` (the
    key's current value) is stale; with ``fingerprint`` None (the value cannot be read) every
    report is stale.
    """
    merged = dict(status)
    used: list[Report] = []
    stale: list[Report] = []
    for report in sorted(reports, key=lambda r: (r.at or 0.0, r.name)):
        mismatch = report.fingerprint is not None and report.fingerprint != fingerprint
        if report.reason not in REASONS or fingerprint is None or mismatch:
            stale.append(report)
        else:
            used.append(report)

    deadline_reason: str | None = None
    current = parse_time(merged.get("cooldownUntil"))
    if current is not None and current <= now:
        current = None  # an old deadline that is over does not hold a new one back
    latest: tuple[float, str] | None = None
    for report in used:
        if report.reason not in (RATE_LIMITED, CIRCUIT_OPEN):
            continue
        until = _cap(report, spec, now)
        if until is not None and until > now and (latest is None or until > latest[0]):
            latest = (until, report.reason)
    if latest is not None and (current is None or latest[0] > current):
        merged["cooldownUntil"] = rfc3339_ms(latest[0])
        deadline_reason = latest[1]

    limited = [r for r in used if r.reason == RATE_LIMITED]
    if limited:
        before = merged.get("rateLimitedCount")
        merged["rateLimitedCount"] = (before if isinstance(before, int) else 0) + sum(
            r.count for r in limited
        )
        seen = max((r.at if r.at is not None else now) for r in limited)
        last = parse_time(merged.get("lastRateLimited"))
        if last is None or seen > last:
            merged["lastRateLimited"] = rfc3339(seen)

    revoked = any(r.reason == UNAUTHORIZED for r in used)
    if revoked:
        merged["phase"] = KeyPhase.REVOKED.value
        merged["fingerprint"] = fingerprint
        merged["observedGeneration"] = generation
    return Applied(merged, tuple(used), tuple(stale), deadline_reason, revoked)


def cooling_reason(status: Mapping[str, Any], applied: Applied | None) -> str:
    """Why a CoolingDown key rests: the reason of the report that set its deadline, else the
    reason its Ready condition already names (a breaker stays a breaker), else RateLimited."""
    if applied is not None and applied.deadline_reason is not None:
        return applied.deadline_reason
    for cond in status.get("conditions") or ():
        if isinstance(cond, Mapping) and cond.get("type") == "Ready":
            return CIRCUIT_OPEN if cond.get("reason") == CIRCUIT_OPEN else RATE_LIMITED
    return RATE_LIMITED


def urgent(report: Report, known: tuple[bool, float | None] | None, now: float) -> bool:
    """Whether ``report`` is likely to change the table, so it should skip the debounce.

    ``known`` is what the last written table said about the key: (revoked, cooldown_until).
    """
    if report.reason == UNAUTHORIZED:
        return known is None or not known[0]
    if report.reason not in (RATE_LIMITED, CIRCUIT_OPEN):
        return False
    until = report.until
    if until is None or until <= now:
        return report.reason == RATE_LIMITED and until is None
    if known is None:
        return True
    revoked, cooling = known
    return not revoked and (cooling is None or cooling <= now or until > cooling + URGENT_MARGIN)


@dataclass(slots=True)
class _PoolReports:
    by_key: dict[str, dict[str, Report]] = field(default_factory=dict)  # key -> uid -> report
    marks: dict[str, tuple[Report, str]] = field(default_factory=dict)  # uid -> (report, key uid)


@dataclass(slots=True)
class Taken:
    """A pool's reports, taken out of the book by one reconcile."""

    by_key: dict[str, list[Report]]
    marks: list[tuple[Report, str]]

    def __bool__(self) -> bool:
        return bool(self.by_key or self.marks)


class ReportBook:
    """Reports seen and not yet applied, per pool; and applied ones still to be marked.

    Fed by the Event watch (every replica: a stand-by keeps its book warm and drops what the
    leader consumed, since a consumed Event leaves the watch's selector as a DELETED event);
    emptied by the pool's reconcile, which hands back what it could not finish.
    """

    def __init__(self) -> None:
        self._pools: dict[tuple[str, str], _PoolReports] = {}
        self._where: dict[str, tuple[str, str]] = {}  # report uid -> pool it is filed under
        self._applied: set[str] = set()  # uids applied whose Event is not marked yet

    def __len__(self) -> int:
        return len(self._where)

    def add(self, pool_id: tuple[str, str], report: Report) -> bool:
        """File a report; False if it is known already (a re-listed or repeated Event)."""
        if report.uid in self._where or report.uid in self._applied:
            return False
        entry = self._pools.setdefault(pool_id, _PoolReports())
        entry.by_key.setdefault(report.key, {})[report.uid] = report
        self._where[report.uid] = pool_id
        return True

    def forget(self, uid: str) -> None:
        """The Event is consumed (by us or another replica) or gone."""
        self._applied.discard(uid)
        pool_id = self._where.pop(uid, None)
        if pool_id is None:
            return
        entry = self._pools.get(pool_id)
        if entry is None:
            return
        entry.marks.pop(uid, None)
        for key, reports in list(entry.by_key.items()):
            if reports.pop(uid, None) is not None and not reports:
                del entry.by_key[key]
        if not entry.by_key and not entry.marks:
            del self._pools[pool_id]

    def take(self, pool_id: tuple[str, str]) -> Taken:
        entry = self._pools.pop(pool_id, None)
        if entry is None:
            return Taken({}, [])
        for uid in entry.marks:
            self._where.pop(uid, None)
        taken = Taken(
            {key: list(reports.values()) for key, reports in entry.by_key.items()},
            list(entry.marks.values()),
        )
        for reports in taken.by_key.values():
            for report in reports:
                self._where.pop(report.uid, None)
                self._applied.add(report.uid)  # in flight: a re-delivery must not re-apply it
        return taken

    def give_back(self, pool_id: tuple[str, str], reports: Sequence[Report]) -> None:
        """Reports a reconcile took but did not apply (it failed first)."""
        for report in reports:
            self._applied.discard(report.uid)
            self.add(pool_id, report)

    def to_mark(self, pool_id: tuple[str, str], reports: Sequence[Report], key_uid: str) -> None:
        """Applied reports whose Events could not be marked yet."""
        entry = self._pools.setdefault(pool_id, _PoolReports())
        for report in reports:
            entry.marks[report.uid] = (report, key_uid)
            self._where[report.uid] = pool_id
            self._applied.add(report.uid)

    def marked(self, report: Report) -> None:
        self._applied.discard(report.uid)
