"""The ReplicaReport fold (``sideproxy/operator/_fold.py``): exact counts, health. Pure."""

from __future__ import annotations

from typing import Any

from sideproxy.models import CreditPoolSpec, KeyPhase
from sideproxy.operator._fold import GONE_MARK_SECONDS, Source, fold_counts, health
from sideproxy.wire import KeyReport

NOW = 1_750_000_000.0
SPEC = CreditPoolSpec.model_validate({"providers": [{"name": "groq"}]})


def src(
    report: str, limited: int, uid: str = "", incarnation: str | None = None, **entry: Any
) -> Source:
    key = KeyReport.model_validate(
        {"name": "k", "fingerprint": "f1", "counts": {"rateLimited": limited}, **entry}
    )
    return Source(report, uid or f"uid-{report}", NOW, key, incarnation=incarnation)


def apply(
    status: dict[str, Any], *sources: Source, gone: tuple[str, ...] = (), now: float = NOW
) -> dict[str, Any]:
    return {**status, **fold_counts(status, sources, gone, now=now)}


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


def test_the_same_incarnation_re_creating_its_report_continues_its_mark() -> None:
    """A replica cut off for longer than the stale limit: the operator deleted its report, and
    the same process (same incarnation, same counters) creates it again, with a new uid."""
    status = apply({}, src("a", 5, uid="u1", incarnation="i1"), src("b", 1))
    status = apply(status, src("b", 1), gone=("a",))  # deleted as stale
    assert status["rateLimitedCount"] == 6  # nothing lost while it is away
    (mark,) = [m for m in status["appliedReports"] if m["report"] == "a"]
    assert mark["goneSince"]  # kept, waiting for its process
    assert apply(status, src("b", 1), gone=("a",)) == status  # idempotent
    back = apply(status, src("a", 7, uid="u2", incarnation="i1"), src("b", 1))
    assert back["rateLimitedCount"] == 8  # 5 counted once, then 2 more
    (mark,) = [m for m in back["appliedReports"] if m["report"] == "a"]
    assert (mark["uid"], mark.get("goneSince")) == ("u2", None)
    assert apply(back, src("a", 7, uid="u2", incarnation="i1"), src("b", 1)) == back


def test_the_same_incarnation_back_before_the_gone_check_continues_too() -> None:
    status = apply({}, src("a", 5, uid="u1", incarnation="i1"))
    # The new object is there, and the gone check (404 or another uid) names the old one.
    back = apply(status, src("a", 6, uid="u2", incarnation="i1"), gone=("a",))
    assert back["rateLimitedCount"] == 6
    assert [m["uid"] for m in back["appliedReports"]] == ["u2"]


def test_a_new_incarnation_counts_from_zero_whatever_its_counts() -> None:
    status = apply({}, src("a", 5, uid="u1", incarnation="i1"))
    status = apply(status, gone=("a",))
    # A restarted process under the same name: its counters began at 0.
    fresh = apply(status, src("a", 3, uid="u2", incarnation="i2"))
    assert fresh["rateLimitedCount"] == 8
    assert fresh["reportsBase"]["rateLimited"] == 5
    # Even on the same object, and even when it has already counted past the old mark.
    status = apply({}, src("a", 5, uid="u1", incarnation="i1"))
    assert apply(status, src("a", 6, uid="u1", incarnation="i2"))["rateLimitedCount"] == 11


def test_a_gone_mark_waits_only_so_long() -> None:
    status = apply({}, src("a", 5, uid="u1", incarnation="i1"))
    status = apply(status, gone=("a",))
    later = apply(status, now=NOW + GONE_MARK_SECONDS)
    assert later["appliedReports"] is None
    assert (later["reportsBase"]["rateLimited"], later["rateLimitedCount"]) == (5, 5)
    # Without an incarnation (a proxy from before the field) a gone mark retires at once.
    old = apply(apply({}, src("a", 5)), gone=("a",))
    assert (old["appliedReports"], old["rateLimitedCount"]) == (None, 5)


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
