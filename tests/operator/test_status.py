"""Pure status logic: conditions, merge patches, Events on transitions."""

from __future__ import annotations

from sideproxy.models import KeyPhase
from sideproxy.operator._status import (
    Cond,
    PoolFacts,
    key_event,
    merge_conditions,
    pool_events,
    pool_status,
    rfc3339,
    status_of,
    status_patch,
)
from sideproxy.translate import KeyVerdict

T0, T1 = "2025-06-15T15:06:40Z", "2025-06-15T15:10:00Z"
READY = KeyVerdict(KeyPhase.READY, "Ready", "in rotation", "abcd1234")
MISSING = KeyVerdict(KeyPhase.INVALID, "SecretNotResolved", "Secret 's' not found")
NO_KEY = KeyVerdict(KeyPhase.INVALID, "SecretNotResolved", "Secret 's' has no key 'k'")
COOLING = KeyVerdict(KeyPhase.COOLING_DOWN, "RateLimited", "cooling down after a 429", "abcd1234")


def test_rfc3339() -> None:
    assert rfc3339(1_750_000_000) == T0


def test_transition_time_moves_only_when_status_flips() -> None:
    first = merge_conditions([], [Cond("Ready", "False", "SecretNotResolved", "a")], 1, T0)
    assert first[0]["lastTransitionTime"] == T0
    same = merge_conditions(first, [Cond("Ready", "False", "Other", "b")], 2, T1)
    assert same[0]["lastTransitionTime"] == T0
    assert (same[0]["reason"], same[0]["message"], same[0]["observedGeneration"]) == (
        "Other",
        "b",
        2,
    )
    flipped = merge_conditions(same, [Cond("Ready", "True", "Ready", "ok")], 2, T1)
    assert flipped[0]["lastTransitionTime"] == T1


def test_foreign_conditions_are_kept() -> None:
    current = [{"type": "Audited", "status": "True", "reason": "X", "lastTransitionTime": T0}]
    merged = merge_conditions(current, [Cond("Ready", "True", "Ready", "")], 1, T1)
    assert [c["type"] for c in merged] == ["Ready", "Audited"]
    assert merged[1] == current[0]


def test_status_of_a_ready_key() -> None:
    status = status_of(READY, {}, 3, T0, "Secret 'g' key 'a'")
    assert status["phase"] == "Ready"
    assert status["fingerprint"] == "abcd1234"
    assert status["observedGeneration"] == 3
    assert "cooldownUntil" not in status  # health fields are the fold's (_fold.py)
    conds = {c["type"]: c for c in status["conditions"]}
    assert conds["Ready"]["status"] == "True"
    assert (
        conds["SecretResolved"]["message"] == "Secret 'g' key 'a' resolved (fingerprint abcd1234)"
    )
    assert {c["observedGeneration"] for c in status["conditions"]} == {3}


def test_status_of_a_missing_secret() -> None:
    status = status_of(MISSING, {"fingerprint": "old00000"}, 1, T0)
    assert status["fingerprint"] is None  # removed by the merge patch
    conds = {c["type"]: c for c in status["conditions"]}
    assert (conds["SecretResolved"]["status"], conds["SecretResolved"]["reason"]) == (
        "False",
        "SecretNotResolved",
    )
    disabled = status_of(KeyVerdict(KeyPhase.DISABLED, "Disabled", "off"), {}, 1, T0)
    assert {c["type"]: c["status"] for c in disabled["conditions"]}["SecretResolved"] == "Unknown"


def test_status_of_leaves_health_and_counts_to_the_fold() -> None:
    current = {"cooldownUntil": "2025-06-15T15:16:40.500000+00:00", "rateLimitedCount": 4}
    status = status_of(COOLING, current, 1, T0)
    assert "cooldownUntil" not in status
    assert "rateLimitedCount" not in status


def test_status_patch_is_minimal() -> None:
    current = {"phase": "Ready", "fingerprint": "abcd1234", "rateLimitedCount": 2}
    desired = {"phase": "Invalid", "fingerprint": None, "message": "m", "cooldownUntil": None}
    assert status_patch(current, desired) == {
        "phase": "Invalid",
        "fingerprint": None,
        "message": "m",
    }
    assert status_patch({"phase": "Ready"}, {"phase": "Ready", "x": None}) == {}


def test_key_events_only_on_trouble_transitions() -> None:
    assert key_event(READY, {}) is None
    assert key_event(COOLING, {"phase": "Ready"}) is None
    event = key_event(MISSING, {"phase": "Ready"})
    assert event is not None
    assert (event.type, event.reason, event.message) == (
        "Warning",
        "SecretNotResolved",
        "Secret 's' not found",
    )
    assert key_event(MISSING, {"phase": "Invalid", "message": "Secret 's' not found"}) is None
    changed = key_event(NO_KEY, {"phase": "Invalid", "message": "Secret 's' not found"})
    assert changed is not None
    assert changed.message == "Secret 's' has no key 'k'"
    healed = key_event(READY, {"phase": "Invalid"})
    assert healed is not None
    assert healed.type == "Normal"


def _facts(ready: Cond, table: Cond) -> PoolFacts:
    return PoolFacts(3, 2, 1, 0, ready, table, 7, "f" * 64)


def test_pool_status_and_events() -> None:
    ok = Cond("TableWritten", "True", "TableCurrent", "version 7")
    facts = _facts(Cond("Ready", "True", "Ready", "2 of 3 keys in rotation"), ok)
    status = pool_status(facts, {}, 4, T0)
    assert status["keysSummary"] == "2/3"
    assert (status["ready"], status["tableVersion"], status["observedGeneration"]) == ("True", 7, 4)
    assert pool_events(facts, status) == []
    broken = _facts(Cond("Ready", "False", "NoUsableKey", "none"), ok)
    (event,) = pool_events(broken, status)
    assert (event.type, event.reason) == ("Warning", "NoUsableKey")
    later = pool_status(broken, status, 4, T1)
    assert pool_events(broken, later) == []  # same reason: no repeat
    (back,) = pool_events(facts, later)
    assert back.type == "Normal"
