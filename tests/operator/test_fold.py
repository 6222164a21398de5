"""The ReplicaReport fold (``sideproxy/operator/_fold.py``): exact counts, health. Pure."""

from __future__ import annotations

from typing import Any

from sideproxy.models import CreditPoolSpec, KeyPhase
from sideproxy.operator._fold import Source, fold_counts, health
from sideproxy.wire import KeyReport

NOW = 1_750_000_000.0
SPEC = CreditPoolSpec.model_validate({"providers": [{"name": "groq"}]})


def src(report: str, limited: int, uid: str = "", **entry: Any) -> Source:
    key = KeyReport.model_validate(
        {"name": "k", "fingerprint": "f1", "counts": {"rateLimited": limited}, **entry}
    )
    return Source(report, uid or f"uid-{report}", NOW, key)


def apply(status: dict[str, Any], *sources: Source, gone: tuple[str, ...] = ()) -> dict[str, Any]:
    return {**status, **fold_counts(status, sources, gone)}


def test_the_same_report_twice_counts_once() -> None:
    once = apply({}, src("a", 3), src("b", 2))
    assert once["rateLimitedCount"] == 5
    assert apply(once, src("a", 3), src("b", 2)) == once
    later = apply(once, src("a", 4), src("b", 2))
    assert later["rateLimitedCount"] == 6
    assert [m["rateLimited"] for m in later["appliedReports"]] == [4, 2]


def test_a_restarted_replica_counts_from_zero_again() -> None:
    status = apply({}, src("a", 5))
    status = apply(status, src("a", 2))  # counters reset: 5 before, 2 since
    assert status["rateLimitedCount"] == 7
    assert status["reportsBase"]["rateLimited"] == 5
    assert apply(status, src("a", 2)) == status


def test_a_gone_report_moves_into_the_base_and_nothing_is_lost() -> None:
    status = apply({}, src("a", 5), src("b", 1))
    status = apply(status, src("b", 1), gone=("a",))
    assert status["rateLimitedCount"] == 6
    assert [m["report"] for m in status["appliedReports"]] == ["b"]
    assert status["reportsBase"]["rateLimited"] == 5
    assert apply(status, src("b", 1), gone=("a",)) == status  # idempotent too


def test_a_new_object_under_an_old_name_is_another_report() -> None:
    status = apply({}, src("a", 5, uid="u1"))
    status = apply(status, src("a", 1, uid="u2"))
    assert status["rateLimitedCount"] == 6


def test_counts_from_before_the_marks_are_kept() -> None:
    status = apply({"rateLimitedCount": 10, "exhaustedCount": 1}, src("a", 2))
    assert (status["rateLimitedCount"], status["exhaustedCount"]) == (12, 1)


def test_health_phases_and_caps() -> None:
    cool = [{"model": "", "until": NOW + 10**6}, {"model": "big", "until": NOW + 5}]
    found = health([src("a", 0, cooling=cool)], "f1", SPEC, NOW)
    assert found.phase is KeyPhase.COOLING_DOWN
    assert found.cooldown_until == NOW + SPEC.cooldown.max_seconds  # a report is not a command
    assert found.cooling_models == [("big", NOW + 5)]
    assert found.deadline == NOW + 5
    assert health([src("a", 0, cooling=cool)], "other", SPEC, NOW).phase is None  # old value
    exhausted = health([src("a", 0, exhaustedUntil=NOW + 60)], "f1", SPEC, NOW)
    assert exhausted.phase is KeyPhase.EXHAUSTED
    assert exhausted.fields()["exhaustedUntil"] is not None
    revoked = health([src("a", 0, revoked=True), src("b", 0, cooling=cool)], "f1", SPEC, NOW)
    assert revoked.phase is KeyPhase.REVOKED


def test_cooling_models_are_listed_compactly() -> None:
    cool = [{"model": f"m{i}", "until": NOW + 10 + i} for i in range(8)]
    found = health([src("a", 0, cooling=cool)], "f1", SPEC, NOW)
    fields = found.fields()
    assert found.phase is None  # cooling for some models only: still in rotation
    assert [m["model"] for m in fields["coolingModels"]] == ["m0", "m1", "m2", "m3", "m4"]
    assert fields["coolingMoreModels"] == 3
    assert fields["cooling"] == "m0, m1, m2, m3, m4 and 3 more"


def test_a_stale_report_still_counts_but_says_nothing_about_health() -> None:
    cool = [{"model": "", "until": NOW + 30}]
    old = src("a", 3, cooling=cool)
    stale = Source(old.report, old.uid, old.heartbeat, old.entry, stale=True)
    assert health([stale], "f1", SPEC, NOW).phase is None
    assert apply({}, stale)["rateLimitedCount"] == 3
