"""Exhausted and revoked keys: out for every model, back only through a token-free probe."""

from sideproxy.pool import KeyConfig, KeyHealth, ManagedCreditPool, Outcome, PoolPolicy

NOW = 1_000.0


def pool_of(*keys: KeyConfig, **kw: object) -> ManagedCreditPool:
    return ManagedCreditPool(keys, PoolPolicy(**kw))  # type: ignore[arg-type]


def key(name: str, scope: str | None = None) -> KeyConfig:
    return KeyConfig(name, "groq", f"sk-{name}", quota_scope=scope)


def health(pool: ManagedCreditPool, name: str, now: float = NOW) -> KeyHealth:
    return next(s.health for s in pool.statuses(now) if s.name == name)


def exhaust(pool: ManagedCreditPool, name: str, now: float = NOW):  # type: ignore[no-untyped-def]
    live = pool.acquire("groq", now, exclude={k for k in ("a", "b", "c") if k != name})
    assert live is not None
    assert live.name == name
    return live, pool.release(live, Outcome.EXHAUSTED, now, None, "big")


def test_exhausted_is_out_for_every_model_and_never_returns_by_itself() -> None:
    pool = pool_of(key("a"), key("b"))
    a, changes = exhaust(pool, "a")
    assert [(c.name, c.health, c.until, c.model) for c in changes] == [
        ("a", KeyHealth.EXHAUSTED, NOW + 300, None)
    ]
    for model in ("big", "small", None):
        assert pool.acquire("groq", NOW + 1, exclude={"b"}, model=model) is None
    # Far past its back-off it is still out: only a probe brings it back.
    assert health(pool, "a", NOW + 10_000) is KeyHealth.EXHAUSTED
    assert pool.acquire("groq", NOW + 10_000, exclude={"b"}) is None
    assert pool.next_recovery("groq", NOW + 10_000) == NOW + 10_000  # b is fine
    assert pool.probes_due(NOW + 299) == []
    assert pool.probes_due(NOW + 300) == [a]
    assert pool.probes_due(NOW + 301) == []  # handed out once
    assert [c.reason for c in pool.probe_result(a, True, NOW + 302)] == ["Recovered"]
    assert health(pool, "a", NOW + 302) is KeyHealth.READY
    got = pool.acquire("groq", NOW + 302, exclude={"b"})
    assert got is a


def test_failed_probes_double_the_back_off_up_to_the_cap() -> None:
    pool = pool_of(key("a"), key("b"), quota_backoff=100, quota_max_backoff=350)
    a, _ = exhaust(pool, "a")
    now, deadlines = NOW, []
    for _ in range(4):
        now = next(s.until for s in pool.statuses(now) if s.name == "a")  # type: ignore[assignment]
        assert pool.probes_due(now) == [a]
        (change,) = pool.probe_result(a, False, now)
        deadlines.append(change.until - now)  # type: ignore[operator]
    assert deadlines == [200, 350, 350, 350]


def test_exhausted_again_after_a_probe_doubles_instead_of_restarting() -> None:
    pool = pool_of(key("a"), key("b"), quota_backoff=100)
    a, _ = exhaust(pool, "a")
    assert pool.probes_due(NOW + 100) == [a]
    pool.probe_result(a, True, NOW + 100)  # /models works, but the wallet is still empty
    _, (change,) = exhaust(pool, "a", NOW + 101)
    assert change.until == NOW + 101 + 200
    # A real success resets it.
    pool.probes_due(NOW + 301)
    pool.probe_result(a, True, NOW + 301)
    live = pool.acquire("groq", NOW + 302, exclude={"b"})
    assert live is a
    pool.release(live, Outcome.OK, NOW + 302)
    _, (change,) = exhaust(pool, "a", NOW + 303)
    assert change.until == NOW + 303 + 100


def test_a_second_exhausted_answer_in_flight_changes_nothing() -> None:
    pool = pool_of(key("a"), key("b"))
    first = pool.acquire("groq", NOW, exclude={"b"})
    second = pool.acquire("groq", NOW, exclude={"b"})
    assert first is second is not None
    assert pool.release(first, Outcome.EXHAUSTED, NOW)  # type: ignore[arg-type]
    assert pool.release(second, Outcome.EXHAUSTED, NOW + 1) == []  # type: ignore[arg-type]
    assert pool.probes_due(NOW + 300) == [first]


def test_quota_scope_is_exhausted_together() -> None:
    pool = pool_of(key("a", "org"), key("b", "org"), key("c"))
    _, changes = exhaust(pool, "a")
    assert sorted(c.name for c in changes) == ["a", "b"]
    assert {k.name for k in pool.probes_due(NOW + 300)} == {"a", "b"}


def test_revoked_keys_are_probed_at_the_max_back_off() -> None:
    pool = pool_of(key("a"), key("b"), quota_max_backoff=3600)
    a = pool.acquire("groq", NOW, exclude={"b"})
    assert a is not None
    (change,) = pool.release(a, Outcome.UNAUTHORIZED, NOW)
    assert (change.health, change.until) == (KeyHealth.REVOKED, None)
    assert pool.probes_due(NOW + 3599) == []
    assert pool.probes_due(NOW + 3600) == [a]
    pool.probe_result(a, False, NOW + 3600)
    assert health(pool, "a", NOW + 3601) is KeyHealth.REVOKED
    assert pool.probes_due(NOW + 7200) == [a]
    pool.probe_result(a, True, NOW + 7200)
    assert health(pool, "a", NOW + 7200) is KeyHealth.READY


def test_a_lost_probe_is_offered_again() -> None:
    pool = pool_of(key("a"), quota_probe_timeout=30)
    exhaust(pool, "a")
    assert len(pool.probes_due(NOW + 300)) == 1
    assert pool.probes_due(NOW + 329) == []
    assert len(pool.probes_due(NOW + 330)) == 1


def test_remote_exhaustion_is_applied_as_a_delta() -> None:
    pool = pool_of(key("a"), key("b"))
    assert pool.exhaust("a", NOW + 600, NOW) is True
    assert pool.exhaust("a", NOW + 60, NOW) is False
    assert health(pool, "a") is KeyHealth.EXHAUSTED
    assert [k.name for k in pool.probes_due(NOW + 600)] == ["a"]


def test_a_probe_passed_elsewhere_brings_the_key_back() -> None:
    pool = pool_of(key("a"), key("b"))
    exhaust(pool, "a")
    assert pool.restore("a", NOW + 5) is True
    assert pool.restore("a", NOW + 5) is False
    assert health(pool, "a", NOW + 5) is KeyHealth.READY
    assert pool.probes_due(NOW + 300) == []
