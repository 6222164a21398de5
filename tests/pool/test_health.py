"""Cool-down, quota scopes, headroom, the breaker and revocation, with a fake clock."""

from sideproxy.pool import KeyConfig, KeyHealth, ManagedCreditPool, Outcome, PoolPolicy

NOW = 1_000.0


def pool_of(*names: str, **kwargs: object) -> ManagedCreditPool:
    return ManagedCreditPool(
        [KeyConfig(n, "groq", f"sk-{n}") for n in names],
        PoolPolicy(**kwargs),  # type: ignore[arg-type]
    )


def health(pool: ManagedCreditPool, name: str, now: float = NOW) -> KeyHealth:
    return next(s.health for s in pool.statuses(now) if s.name == name)


def use(pool: ManagedCreditPool, name: str, outcome: Outcome, headers=None, now=NOW):  # type: ignore[no-untyped-def]
    key = pool.acquire("groq", now, exclude={k for k in ("a", "b", "c") if k != name})
    assert key is not None
    assert key.name == name
    return pool.release(key, outcome, now, headers)


def test_429_cools_until_the_providers_deadline() -> None:
    pool = pool_of("a", "b")
    changes = use(pool, "a", Outcome.RATE_LIMITED, {"retry-after": "12"})
    assert [(c.name, c.reason, c.until) for c in changes] == [("a", "RateLimited", NOW + 12)]
    assert health(pool, "a", NOW + 11.9) is KeyHealth.COOLING
    assert health(pool, "a", NOW + 12) is KeyHealth.READY


def test_longer_deadline_never_shortens() -> None:
    pool = pool_of("a", "b")
    use(pool, "a", Outcome.RATE_LIMITED, {"retry-after": "60"})
    assert pool.impose_cooldown("a", NOW + 5, NOW) is False
    assert pool.mark_as_cooling("a", NOW, seconds=5) == []
    assert health(pool, "a", NOW + 30) is KeyHealth.COOLING
    assert pool.impose_cooldown("a", NOW + 90, NOW) is True
    assert health(pool, "a", NOW + 61) is KeyHealth.COOLING


def test_every_key_cooling_reports_the_earliest_recovery() -> None:
    pool = pool_of("a", "b")
    use(pool, "a", Outcome.RATE_LIMITED, {"retry-after": "20"})
    use(pool, "b", Outcome.RATE_LIMITED, {"retry-after": "8"})
    assert pool.acquire("groq", NOW) is None
    assert pool.next_recovery("groq", NOW) == NOW + 8
    assert pool.next_recovery("openai", NOW) is None


def test_quota_scope_cools_together() -> None:
    pool = ManagedCreditPool(
        [
            KeyConfig("a", "groq", "sk-a", quota_scope="org-1"),
            KeyConfig("b", "groq", "sk-b", quota_scope="org-1"),
            KeyConfig("c", "groq", "sk-c", quota_scope="org-2"),
        ]
    )
    changes = use(pool, "a", Outcome.RATE_LIMITED, {"retry-after": "30"})
    assert sorted(c.name for c in changes) == ["a", "b"]
    assert {pool.acquire("groq", NOW).name for _ in range(3)} == {"c"}  # type: ignore[union-attr]


def test_low_headroom_is_deprioritised_before_a_429() -> None:
    pool = pool_of("a", "b")
    use(
        pool,
        "a",
        Outcome.OK,
        {"x-ratelimit-remaining-requests": "1", "x-ratelimit-reset-requests": "5s"},
    )
    assert health(pool, "a") is KeyHealth.LOW_HEADROOM
    assert {pool.acquire("groq", NOW).name for _ in range(4)} == {"b"}  # type: ignore[union-attr]
    # Still usable when it is the tier's last resort.
    pool.mark_as_cooling("b", NOW, seconds=60)
    assert pool.acquire("groq", NOW).name == "a"  # type: ignore[union-attr]
    assert health(pool, "a", NOW + 5) is KeyHealth.READY


def test_a_spent_budget_rests_the_key_until_its_reset() -> None:
    """Remaining 0 with a reset: the next request would be a 429 for sure, even as the tier's
    last resort (at concurrency 8 every in-flight request went to it and earned one)."""
    pool = pool_of("a", "b")
    changes = use(
        pool,
        "a",
        Outcome.OK,
        {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "5s"},
    )
    assert [(c.name, c.health, c.until, c.reason) for c in changes] == [
        ("a", KeyHealth.COOLING, NOW + 5, "Spent")
    ]
    pool.mark_as_cooling("b", NOW, seconds=60)
    assert pool.acquire("groq", NOW) is None
    assert pool.acquire("groq", NOW + 5).name == "a"  # type: ignore[union-attr]
    # Spent without a reset header: only deprioritised (no deadline to rest until).
    pool = pool_of("a", "b")
    assert use(pool, "a", Outcome.OK, {"x-ratelimit-remaining-requests": "0"}) == []
    assert health(pool, "a") is KeyHealth.LOW_HEADROOM


def test_headroom_recovers_on_a_later_roomy_response() -> None:
    pool = pool_of("a")
    use(pool, "a", Outcome.OK, {"x-ratelimit-remaining-requests": "1"})
    assert health(pool, "a") is KeyHealth.LOW_HEADROOM
    use(pool, "a", Outcome.OK, {"x-ratelimit-remaining-requests": "500"})
    assert health(pool, "a") is KeyHealth.READY


def test_only_an_answer_with_headers_clears_a_low_mark() -> None:
    """Headers that name no budget clear a low mark (as a roomy budget does); none at all, or
    an empty mapping, say nothing and leave it. Key-wide and per model alike."""
    low = {"x-ratelimit-remaining-requests": "1", "x-ratelimit-reset-requests": "50s"}
    pool = pool_of("a")
    for headers in (None, {}):
        use(pool, "a", Outcome.OK, low)
        use(pool, "a", Outcome.OK, headers)
        assert health(pool, "a") is KeyHealth.LOW_HEADROOM
        use(pool, "a", Outcome.OK, {"content-type": "application/json"})
        assert health(pool, "a") is KeyHealth.READY

    def reserve(pool: ManagedCreditPool) -> bool:
        lane = pool._groups["groq"].lanes["big"]
        return bool(lane.reserve) and not lane.ready

    pool = pool_of("a")
    for headers in (None, {}):
        key = pool.acquire("groq", NOW, model="big")
        assert key is not None
        pool.release(key, Outcome.OK, NOW, low, model="big")
        assert reserve(pool)
        pool.release(key, Outcome.OK, NOW, headers, model="big")
        assert reserve(pool)
        pool.release(key, Outcome.OK, NOW, {"content-type": "text/plain"}, model="big")
        assert not reserve(pool)
        assert health(pool, "a") is KeyHealth.READY


def test_breaker_opens_probes_and_closes() -> None:
    pool = pool_of("a", "b", failure_threshold=3, breaker_backoff=10.0)
    for _ in range(2):
        assert use(pool, "a", Outcome.SERVER_ERROR) == []
    assert [c.reason for c in use(pool, "a", Outcome.TIMEOUT)] == ["CircuitOpen"]
    assert health(pool, "a", NOW + 9) is KeyHealth.OPEN
    assert health(pool, "a", NOW + 10) is KeyHealth.HALF_OPEN
    # Half-open: exactly one probe goes through.
    probe = pool.acquire("groq", NOW + 10, exclude={"b"})
    assert probe is not None
    assert probe.name == "a"
    assert pool.acquire("groq", NOW + 10, exclude={"b"}) is None
    assert [c.reason for c in pool.release(probe, Outcome.OK, NOW + 10)] == ["Recovered"]
    assert health(pool, "a", NOW + 10) is KeyHealth.READY


def test_failed_probe_doubles_the_backoff() -> None:
    pool = pool_of("a", failure_threshold=1, breaker_backoff=10.0, breaker_max_backoff=15.0)
    use(pool, "a", Outcome.CONNECT_ERROR)
    probe = pool.acquire("groq", NOW + 10)
    assert probe is not None
    (change,) = pool.release(probe, Outcome.SERVER_ERROR, NOW + 10)
    assert change.until == NOW + 10 + 15  # doubled to 20, capped at 15


def test_a_probe_that_never_reports_back_frees_the_slot() -> None:
    pool = pool_of("a", failure_threshold=1, breaker_backoff=1.0, probe_timeout=5.0)
    use(pool, "a", Outcome.CONNECT_ERROR)
    assert pool.acquire("groq", NOW + 1) is not None  # the probe, lost
    assert pool.acquire("groq", NOW + 2) is None
    assert pool.acquire("groq", NOW + 6) is not None


def test_success_resets_the_failure_count() -> None:
    pool = pool_of("a", failure_threshold=2)
    use(pool, "a", Outcome.SERVER_ERROR)
    use(pool, "a", Outcome.OK)
    assert use(pool, "a", Outcome.SERVER_ERROR) == []
    assert health(pool, "a") is KeyHealth.READY


def test_revoked_stays_out_until_its_configuration_changes() -> None:
    pool = pool_of("a", "b")
    assert [c.reason for c in use(pool, "a", Outcome.UNAUTHORIZED)] == ["Unauthorized"]
    assert health(pool, "a", NOW + 1e6) is KeyHealth.REVOKED
    assert pool.next_recovery("groq", NOW) == NOW  # b still serves
    pool.configure([KeyConfig("a", "groq", "sk-a"), KeyConfig("b", "groq", "sk-b")])
    assert health(pool, "a") is KeyHealth.REVOKED  # same configuration: still revoked
    pool.configure([KeyConfig("a", "groq", "sk-a", weight=2), KeyConfig("b", "groq", "sk-b")])
    assert health(pool, "a") is KeyHealth.READY


def test_cancelled_teaches_nothing() -> None:
    pool = pool_of("a")
    assert use(pool, "a", Outcome.CANCELLED) == []
    assert health(pool, "a") is KeyHealth.READY


def test_statuses_hold_no_secret() -> None:
    pool = ManagedCreditPool([KeyConfig("a", "groq", "sk-SECRET-canary")])
    text = repr(pool.statuses(NOW)) + repr(pool.acquire("groq", NOW)) + repr(pool._keys)
    assert "SECRET" not in text
    assert "SECRET" not in repr(KeyConfig("a", "groq", "sk-SECRET-canary"))
