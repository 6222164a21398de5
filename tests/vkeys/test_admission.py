"""The admission core with a fake clock: limits, windows, and sharing a limit between replicas.

Replicas here are ``Admission`` objects that exchange exactly what their ReplicaReports would
carry (``report()`` -> ``observe()``); the real API server version is tests/vkeys/test_cluster.py.
"""

from __future__ import annotations

import random

import pytest
from prometheus_client import CollectorRegistry

from sideproxy.models import VirtualKeyLimits
from sideproxy.proxy._admit import (
    Admission,
    ModelNotAllowed,
    PeerUsage,
    VirtualKeyLimit,
    usage_of,
)
from sideproxy.proxy._auth import Identity


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def ident(**limits: int) -> Identity:
    return Identity("batch", b"d" * 32, ("small",), VirtualKeyLimits(**limits))


def replica(clock: Clock) -> Admission:
    return Admission(CollectorRegistry(), clock=clock)


def peers_of(a: Admission) -> dict[str, PeerUsage]:
    return {
        str(e["name"]): PeerUsage(
            float(e["windowStart"]),  # type: ignore[arg-type]
            float(e["claimedRequests"]),  # type: ignore[arg-type]
            float(e["claimedTokens"]),  # type: ignore[arg-type]
            int(e["requests"]),  # type: ignore[call-overload]
            int(e["promptTokens"]) + int(e["completionTokens"]),  # type: ignore[call-overload]
        )
        for e in a.report(a.clock())
    }


def try_admit(a: Admission, who: Identity) -> bool:
    try:
        a.admit(who, "small").close()
    except VirtualKeyLimit:
        return False
    return True


def test_usage_of_openai_anthropic_and_stream_tails() -> None:
    assert usage_of(b'{"usage": {"prompt_tokens": 3, "completion_tokens": 4}}') == (3, 4)
    assert usage_of(b'{"usage":{"input_tokens":7,"output_tokens":2}}') == (7, 2)
    tail = b'data: {"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":9}}\n\ndata: [DONE]'
    assert usage_of(tail) == (5, 9)
    assert usage_of(b'data: {"choices":[{"delta":{}}]}\n\ndata: [DONE]') is None
    assert usage_of(b'{"usage": "lots"}') is None


def test_model_not_allowed_before_any_limit() -> None:
    a = replica(Clock())
    with pytest.raises(ModelNotAllowed):
        a.admit(ident(requests_per_minute=1), "big")
    a.admit(ident(requests_per_minute=1), None).close()  # a request without a model


def test_window_rolls_over() -> None:
    clock = Clock()
    a = replica(clock)
    who = ident(requests_per_minute=2)
    assert [try_admit(a, who) for _ in range(3)] == [True, True, False]
    clock.now += 60
    assert try_admit(a, who)


def test_retry_after_is_the_window_end_when_the_pool_wide_budget_is_spent() -> None:
    clock = Clock()
    clock.now -= clock.now % 60 - 15  # 15 s into a minute
    a = replica(clock)
    who = ident(requests_per_minute=1)
    a.admit(who, "small").close()
    with pytest.raises(VirtualKeyLimit) as refused:
        a.admit(who, "small")
    assert refused.value.headers is not None
    assert refused.value.headers["Retry-After"] == "45"


def test_tokens_count_after_the_answer() -> None:
    a = replica(Clock())
    who = ident(tokens_per_minute=25)
    for _ in range(3):
        ticket = a.admit(who, "small")
        ticket.usage(b'{"usage": {"prompt_tokens": 5, "completion_tokens": 5}}')
        ticket.close()
    with pytest.raises(VirtualKeyLimit):
        a.admit(who, "small")


def _cluster(clock: Clock, n: int, limits: VirtualKeyLimits) -> dict[str, Admission]:
    replicas = {f"r{i}": replica(clock) for i in range(n)}
    for name, a in replicas.items():
        a.configure({"batch": limits}, [])
        for other in replicas:
            if other != name:
                a.observe(other, {}, active=True)  # the first listing: everyone's reports
    return replicas


@pytest.mark.parametrize("n", [2, 3, 5])
@pytest.mark.parametrize("seed", range(8))
def test_replicas_never_admit_more_than_the_limit_together(seed: int, n: int) -> None:
    """Random interleavings of admissions, publications and watch deliveries. Like a
    Kubernetes watch, each replica receives every report, in the order they were written,
    each watcher lagging by its own random amount."""
    rng = random.Random(seed)
    clock = Clock()
    clock.now -= clock.now % 60
    limits = VirtualKeyLimits(requests_per_minute=300)
    replicas = _cluster(clock, n, limits)
    who = ident(requests_per_minute=300)
    inbox: dict[str, list[tuple[str, dict[str, PeerUsage]]]] = {r: [] for r in replicas}
    admitted = 0
    for _ in range(4000):
        clock.now += 0.0005
        name = rng.choice(list(replicas))
        roll = rng.random()
        if roll < 0.03:  # a write: the API server orders it before any later one
            source = replicas[name]
            written = source.report(clock())
            source.published(written)
            for other in replicas:
                if other != name:
                    inbox[other].append((name, peers_of(source)))
        elif roll < 0.2 and inbox[name]:  # this replica's watch delivers its next event
            sender, seen = inbox[name].pop(0)
            replicas[name].observe(sender, seen, active=True)
        else:
            admitted += try_admit(replicas[name], who)
    assert admitted <= 300
    assert admitted >= 200  # and most of the limit is used


def _publish(replicas: dict[str, Admission], name: str) -> None:
    """``name`` writes its report; every other replica's watch delivers it."""
    source = replicas[name]
    source.published(source.report(source.clock()))
    for other, b in replicas.items():
        if other != name:
            b.observe(name, peers_of(source), active=True)


def test_an_idle_replica_gives_its_share_back_in_a_few_rounds() -> None:
    clock = Clock()
    clock.now -= clock.now % 60
    replicas = _cluster(clock, 2, VirtualKeyLimits(requests_per_minute=100))
    busy, idle = replicas["r0"], replicas["r1"]
    who = ident(requests_per_minute=100)
    assert try_admit(idle, who)  # idle used one request: it holds half the minute
    _publish(replicas, "r1")
    admitted = 1
    for _ in range(30):  # rounds: busy saturates, asks (its refusals), idle answers
        while try_admit(busy, who):
            admitted += 1
        _publish(replicas, "r0")
        _publish(replicas, "r1")
    assert 95 <= admitted <= 100


def test_a_dead_replica_frees_its_share_but_its_usage_still_counts() -> None:
    clock = Clock()
    clock.now -= clock.now % 60
    replicas = _cluster(clock, 2, VirtualKeyLimits(requests_per_minute=100))
    a, b = replicas["r0"], replicas["r1"]
    who = ident(requests_per_minute=100)
    used_b = sum(try_admit(b, who) for _ in range(30))
    _publish(replicas, "r1")
    clock.now += 5  # b dies: no report for longer than ACTIVE_GRACE
    used_a = sum(try_admit(a, who) for _ in range(200))
    assert used_b + used_a == 100
    a.depart("r1")  # its report deleted: its usage of this window still counts
    assert not try_admit(a, who)


def test_max_concurrent_is_split_between_active_replicas() -> None:
    clock = Clock()
    a = replica(clock)
    who = ident(max_concurrent=4)
    a.observe("b", {}, active=True)
    tickets = [a.admit(who, "small") for _ in range(2)]
    with pytest.raises(VirtualKeyLimit):
        a.admit(who, "small")
    clock.now += 5  # b is no longer active: a may use the whole limit
    tickets += [a.admit(who, "small") for _ in range(2)]
    for ticket in tickets:
        ticket.close()
