"""ReplicaReports folded into one PoolKey's status: exact counts and current health. Pure.

**Counts, exactly once.** A report's ``counts`` are cumulative since its writing process
started (its ``incarnation``). The key's status keeps, per report name, the counts already added
to its totals (``appliedReports``, a high-water mark, with the report's uid and incarnation) and
``reportsBase``, the counts of marks retired. The totals are always ``base + sum(marks)``, and
one status patch moves marks and totals together, so applying the same report twice changes
nothing, and an operator killed between any two steps leaves a status that the next leader
continues from without counting twice or losing a count.

Which counter a report continues (:func:`_continues`): when both the mark and the report name
an incarnation, the same incarnation continues its mark whatever the object's uid (the process
re-created its report after it was deleted), and another one is a new process that counts from
0 (the old mark is retired into the base, the new counts are added whole). Without an
incarnation on either side (a proxy or a status from before the field), the same uid continues
and another uid is another report. Either way a count lower than its mark means the counters
began again at 0: the mark goes into the base and the new count is the new mark.

**Gone reports.** A mark whose report is confirmed gone (``gone``: the API server says 404 or
another uid) and that has no incarnation moves into the base at once. One with an incarnation
stays, marked ``goneSince``, for ``GONE_MARK_SECONDS``: its process may still be alive (cut off
from the API server for longer than ``STALE_AFTER_SECONDS``, its report deleted as stale) and
re-create the report with the same counters, which then continue the mark instead of counting
twice. Past that time, or when another incarnation reports under the name, it is retired.

**Health, from the reports alive now.** Only entries about the key's current value
(``fingerprint``) count; every deadline is capped by the pool's own limits (a report is not a
command): revoked > exhausted > cooling for every model (or breaker open) > Ready, with the
models the key is cooling for listed compactly (the earliest ``COOLING_MODELS_SHOWN``, then
"and N more").
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sideproxy.models import COOLING_MODELS_SHOWN, CreditPoolSpec, KeyPhase
from sideproxy.operator._status import rfc3339, rfc3339_ms
from sideproxy.wire import KeyReport

COUNTERS = (
    ("rateLimited", "rateLimitedCount"),
    ("exhausted", "exhaustedCount"),
    # Tokens served (issue 12): folded exactly like the answers, per report high-water marks.
    ("promptTokens", "promptTokens"),
    ("completionTokens", "completionTokens"),
)
# How long the mark of a gone report that named its incarnation waits for that process to
# re-create it (a replica cut off from the API server); then it moves into the base.
GONE_MARK_SECONDS = 3600.0


@dataclass(frozen=True, slots=True)
class Source:
    """One live report's entry about this key."""

    report: str  # the ReplicaReport's name
    uid: str
    heartbeat: float
    entry: KeyReport
    stale: bool = False  # its replica stopped renewing it: counts still fold, health does not
    incarnation: str | None = None  # the writing process (None: a proxy before the field)


def _int(value: object) -> int:
    return value if isinstance(value, int) and value >= 0 else 0


def _counts(source: Source) -> dict[str, int]:
    return {
        "rateLimited": source.entry.counts.rate_limited,
        "exhausted": source.entry.counts.exhausted,
        "promptTokens": source.entry.counts.prompt_tokens,
        "completionTokens": source.entry.counts.completion_tokens,
    }


def _continues(mark: Mapping[str, Any], source: Source) -> bool:
    """Do the report's counts continue this mark's (the same counters), or start anew?"""
    before = mark.get("incarnation")
    if before and source.incarnation:
        return bool(before == source.incarnation)
    return bool(mark.get("uid") == source.uid)


def _seconds(stamp: object) -> float | None:
    try:
        return datetime.fromisoformat(str(stamp)).timestamp()
    except ValueError:
        return None


def fold_counts(
    status: Mapping[str, Any], sources: Sequence[Source], gone: Collection[str], *, now: float
) -> dict[str, Any]:
    """The count fields of the status after applying ``sources`` and the ``gone`` reports (see
    the module docstring): appliedReports, reportsBase, the totals, lastRateLimited."""
    marks: dict[str, dict[str, Any]] = {
        str(m.get("report")): dict(m)
        for m in status.get("appliedReports") or ()
        if isinstance(m, Mapping) and m.get("report")
    }
    raw_base = status.get("reportsBase")
    if isinstance(raw_base, Mapping):
        base = {name: _int(raw_base.get(name)) for name, _ in COUNTERS}
    else:  # first fold: totals counted before marks existed stay in the base
        base = {
            name: max(0, _int(status.get(total)) - sum(_int(m.get(name)) for m in marks.values()))
            for name, total in COUNTERS
        }

    def retire(report: str) -> None:
        mark = marks.pop(report)
        for name, _ in COUNTERS:
            base[name] += _int(mark.get(name))

    last_limited: float | None = None
    for source in sources:
        mark = marks.get(source.report)
        if mark is not None and not _continues(mark, source):
            retire(source.report)  # another process, or another object under that name
            mark = None
        new = _counts(source)
        for name, _ in COUNTERS:
            old = _int(mark.get(name)) if mark is not None else 0
            if new[name] < old:  # the counters began again at 0
                base[name] += old
            elif name == "rateLimited" and new[name] > old:
                last_limited = max(last_limited or 0.0, source.heartbeat)
        marks[source.report] = {
            "report": source.report,
            "uid": source.uid,
            **({"incarnation": source.incarnation} if source.incarnation else {}),
            **new,
        }
    reporting = {source.report for source in sources}
    for report in gone:
        mark = marks.get(report)
        if mark is None or report in reporting:
            continue  # a report of that name is here now: what is gone is an older object
        if not mark.get("incarnation"):
            retire(report)
        elif not mark.get("goneSince"):
            mark["goneSince"] = rfc3339(now)
    for report, mark in list(marks.items()):
        if mark.get("goneSince"):
            since = _seconds(mark["goneSince"])
            if since is None or since + GONE_MARK_SECONDS <= now:
                retire(report)
    # A mark of nothing says nothing: only reports that counted something are kept (a replica
    # that reports only requests costs no status write).
    marks = {name: m for name, m in marks.items() if any(_int(m.get(n)) for n, _ in COUNTERS)}

    out: dict[str, Any] = {
        "appliedReports": [marks[name] for name in sorted(marks)] or None,
        "reportsBase": base if any(base.values()) or marks else None,
    }
    for name, total in COUNTERS:
        out[total] = base[name] + sum(_int(m.get(name)) for m in marks.values())
    if last_limited is not None:
        out["lastRateLimited"] = rfc3339(last_limited)
    return out


@dataclass(frozen=True, slots=True)
class Health:
    """What the live reports say about the key now (phase None: nothing against it)."""

    phase: KeyPhase | None = None
    reason: str = ""
    message: str = ""
    cooldown_until: float | None = None  # key-wide
    exhausted_until: float | None = None
    cooling_models: list[tuple[str, float]] = field(default_factory=list)  # earliest first
    deadline: float | None = None  # when this changes by itself (the earliest future deadline)

    def fields(self) -> dict[str, Any]:
        """The PoolKey status fields this owns (None: remove)."""
        shown = self.cooling_models[:COOLING_MODELS_SHOWN]
        more = len(self.cooling_models) - len(shown)
        if self.cooldown_until is not None:
            cooling: str | None = "all models"
        elif shown:
            cooling = ", ".join(m for m, _ in shown) + (f" and {more} more" if more else "")
        else:
            cooling = None
        return {
            "cooldownUntil": _ms(self.cooldown_until),
            "exhaustedUntil": _ms(self.exhausted_until),
            "coolingModels": [{"model": m, "until": _ms(u)} for m, u in shown] or None,
            "coolingMoreModels": more or None,
            "cooling": cooling,
        }


def _ms(timestamp: float | None) -> str | None:
    return None if timestamp is None else rfc3339_ms(timestamp)


def health(
    sources: Sequence[Source], fingerprint: str | None, spec: CreditPoolSpec, now: float
) -> Health:
    """The key's health from the live reports' entries about its current value."""
    mine = [
        s.entry
        for s in sources
        if not s.stale and fingerprint is not None and s.entry.fingerprint == fingerprint
    ]
    cool_cap = now + spec.cooldown.max_seconds
    models: dict[str, float] = {}
    for entry in mine:
        for cooling in entry.cooling:
            until = min(cooling.until, cool_cap)
            if until > now:
                models[cooling.model] = max(models.get(cooling.model, 0.0), until)
    breaker = max(
        (min(e.breaker_open_until, now + spec.breaker.max_backoff_seconds) for e in mine
         if e.breaker_open_until is not None),
        default=None,
    )  # fmt: skip
    breaker = breaker if breaker is not None and breaker > now else None
    exhausted = max(
        (min(e.exhausted_until, now + spec.quota.max_backoff_seconds) for e in mine
         if e.exhausted_until is not None),
        default=None,
    )  # fmt: skip
    key_wide = max((u for u in (models.pop("", None), breaker) if u is not None), default=None)
    per_model = sorted(models.items(), key=lambda item: (item[1], item[0]))
    future = [u for u in (key_wide, exhausted, *models.values()) if u is not None and u > now]
    deadline = min(future) if future else None
    if any(e.revoked for e in mine):
        return Health(
            KeyPhase.REVOKED,
            "Unauthorized",
            "a proxy got 401/403 with this key; change the Secret or spec to retry",
            deadline=deadline,
        )
    if exhausted is not None:
        return Health(
            KeyPhase.EXHAUSTED,
            "Exhausted",
            "out of quota; back after a token-free probe succeeds",
            exhausted_until=exhausted,
            cooling_models=per_model,
            deadline=deadline,
        )
    if key_wide is not None:
        circuit = breaker is not None and breaker >= key_wide
        return Health(
            KeyPhase.COOLING_DOWN,
            "CircuitOpen" if circuit else "RateLimited",
            "circuit breaker open after repeated upstream failures"
            if circuit
            else "cooling down after a 429",
            cooldown_until=key_wide,
            cooling_models=per_model,
            deadline=deadline,
        )
    return Health(cooling_models=per_model, deadline=deadline)
