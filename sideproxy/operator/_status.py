"""Status and conditions, as pure functions: verdicts in, the status the operator writes out.

Conventions (kubebuilder / cert-manager): positive condition types, CamelCase reasons,
``lastTransitionTime`` moves only when ``status`` flips, ``observedGeneration`` on every
condition. Conditions of types we do not own are kept as they are.

The operator owns these PoolKey status fields: phase, fingerprint, message, observedGeneration,
conditions. The health fields (cooldownUntil, coolingModels, exhaustedUntil, ...) and the counts
(rateLimitedCount, appliedReports, ...) come from the ReplicaReport fold (``_fold.py``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from sideproxy.models import KeyPhase
from sideproxy.translate import KeyVerdict

READY = "Ready"
SECRET_RESOLVED = "SecretResolved"  # noqa: S105 (a condition type, not a password)
TABLE_WRITTEN = "TableWritten"

Status = Literal["True", "False", "Unknown"]

# Phases in which a key is out of rotation for something a human must fix or a report said.
TROUBLED = frozenset({KeyPhase.INVALID, KeyPhase.REVOKED})


def rfc3339_ms(timestamp: float) -> str:
    """RFC 3339 in UTC with milliseconds, rounded up (a deadline never comes early)."""
    ms = math.ceil(round(timestamp * 1000, 3))
    return (
        datetime.fromtimestamp(ms / 1000, UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )


def rfc3339(timestamp: float) -> str:
    return (
        datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    )


@dataclass(frozen=True, slots=True)
class Cond:
    type: str
    status: Status
    reason: str
    message: str


def merge_conditions(
    current: Sequence[Mapping[str, Any]] | None,
    wanted: Sequence[Cond],
    generation: int | None,
    now: str,
) -> list[dict[str, Any]]:
    """The conditions list after setting ``wanted``; other types are kept in place after ours."""
    old = {str(c.get("type")): c for c in current or () if isinstance(c, Mapping)}
    out: list[dict[str, Any]] = []
    for cond in wanted:
        previous = old.get(cond.type)
        since = now
        if previous is not None and previous.get("status") == cond.status:
            since = str(previous.get("lastTransitionTime") or now)
        entry: dict[str, Any] = {
            "type": cond.type,
            "status": cond.status,
            "reason": cond.reason,
            "message": cond.message,
            "lastTransitionTime": since,
        }
        if generation is not None:
            entry["observedGeneration"] = generation
        out.append(entry)
    ours = {cond.type for cond in wanted}
    out.extend(dict(c) for t, c in old.items() if t not in ours)
    return out


def condition(status: Mapping[str, Any], type_: str) -> Mapping[str, Any] | None:
    for cond in status.get("conditions") or ():
        if isinstance(cond, Mapping) and cond.get("type") == type_:
            return cond
    return None


# --------------------------------------------------------------------------- PoolKey


def key_conditions(verdict: KeyVerdict, where: str) -> list[Cond]:
    ready: Status = "True" if verdict.phase is KeyPhase.READY else "False"
    conds = [Cond(READY, ready, verdict.reason, verdict.message)]
    if verdict.reason == "SecretNotResolved":
        conds.append(Cond(SECRET_RESOLVED, "False", "SecretNotResolved", verdict.message))
    elif verdict.fingerprint is not None:
        conds.append(
            Cond(
                SECRET_RESOLVED,
                "True",
                "Resolved",
                f"{where} resolved (fingerprint {verdict.fingerprint})",
            )
        )
    else:
        conds.append(
            Cond(
                SECRET_RESOLVED,
                "Unknown",
                "NotChecked",
                f"not read while the key is {verdict.phase.value} ({verdict.reason})",
            )
        )
    return conds


def status_of(
    verdict: KeyVerdict,
    current: Mapping[str, Any],
    generation: int | None,
    now: str,
    where: str = "the Secret",
) -> dict[str, Any]:
    """The operator-owned PoolKey status fields for ``verdict``; ``None`` means remove.

    ``where`` names the reference for the SecretResolved message (e.g. "Secret 'groq' key
    'a'"); it never holds a value.
    """
    return {
        "phase": verdict.phase.value,
        "fingerprint": verdict.fingerprint,
        "message": verdict.message,
        "observedGeneration": generation,
        "conditions": merge_conditions(
            current.get("conditions"), key_conditions(verdict, where), generation, now
        ),
    }


def status_patch(current: Mapping[str, Any], desired: Mapping[str, Any]) -> dict[str, Any]:
    """A JSON merge patch turning ``current`` into ``desired`` (empty when nothing changes)."""
    patch: dict[str, Any] = {}
    for key, value in desired.items():
        if value is None:
            # The CRD's defaults (0, []) come back for an unset field: those count as unset.
            if current.get(key) not in (None, 0, [], {}, ""):
                patch[key] = None
        elif current.get(key) != value:
            patch[key] = value
    return patch


@dataclass(frozen=True, slots=True)
class KeyEvent:
    type: Literal["Normal", "Warning"]
    reason: str
    message: str


def key_event(verdict: KeyVerdict, current: Mapping[str, Any]) -> KeyEvent | None:
    """An Event when a key enters, changes within, or leaves a troubled phase (Invalid/Revoked).

    Cool-downs get none from us: the proxy that saw the 429 already reported it as an Event.
    """
    old_phase = current.get("phase")
    old_message = current.get("message")
    troubled = verdict.phase in TROUBLED
    was_troubled = old_phase in {p.value for p in TROUBLED}
    if troubled and (old_phase != verdict.phase.value or old_message != verdict.message):
        return KeyEvent("Warning", verdict.reason, verdict.message)
    if was_troubled and not troubled:
        return KeyEvent("Normal", verdict.reason, f"{verdict.phase.value}: {verdict.message}")
    return None


# --------------------------------------------------------------------------- CreditPool


@dataclass(frozen=True, slots=True)
class PoolFacts:
    """What one reconcile learnt about a pool, for its status."""

    keys_total: int
    keys_ready: int
    keys_cooling: int
    keys_invalid: int
    ready: Cond
    table: Cond
    table_version: int | None
    table_hash: str | None
    extra: tuple[Cond, ...] = ()  # e.g. KeysWritten

    @property
    def conditions(self) -> tuple[Cond, ...]:
        return (self.ready, self.table, *self.extra)


def count_phases(verdicts: Mapping[str, KeyVerdict]) -> tuple[int, int, int, int]:
    """(total, ready, cooling, invalid-or-revoked)."""
    phases = [v.phase for v in verdicts.values()]
    return (
        len(phases),
        sum(p is KeyPhase.READY for p in phases),
        sum(p is KeyPhase.COOLING_DOWN for p in phases),
        sum(p in TROUBLED for p in phases),
    )


def pool_status(
    facts: PoolFacts, current: Mapping[str, Any], generation: int | None, now: str
) -> dict[str, Any]:
    desired: dict[str, Any] = {
        "ready": facts.ready.status if facts.ready.status != "Unknown" else "False",
        "keysReady": facts.keys_ready,
        "keysTotal": facts.keys_total,
        "keysCooling": facts.keys_cooling,
        "keysInvalid": facts.keys_invalid,
        "keysSummary": f"{facts.keys_ready}/{facts.keys_total}",
        "tableVersion": facts.table_version,
        "tableHash": facts.table_hash,
        "observedGeneration": generation,
        "conditions": merge_conditions(
            current.get("conditions"), list(facts.conditions), generation, now
        ),
    }
    return desired


def pool_events(facts: PoolFacts, current: Mapping[str, Any]) -> list[KeyEvent]:
    """Events for the pool's Ready and TableWritten conditions: a Warning when one turns (or
    stays) not-True with a new reason, a Normal one when it recovers."""
    events = []
    for cond in facts.conditions:
        old = condition(current, cond.type)
        same = (
            old is not None
            and old.get("status") == cond.status
            and old.get("reason") == cond.reason
        )
        if cond.status != "True" and not same:
            events.append(KeyEvent("Warning", cond.reason, cond.message))
        elif cond.status == "True" and old is not None and old.get("status") != "True":
            events.append(KeyEvent("Normal", cond.reason, cond.message))
    return events
