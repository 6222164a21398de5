"""The schedule survives configure(); one probe at a time; reading never changes state.

Issue 15 items 1, 7 and 9 (pool part), each reproduced first.
"""

from collections import Counter, deque

from hypothesis import given, settings
from hypothesis import strategies as st

from sideproxy.pool import KeyConfig, KeyHealth, ManagedCreditPool, Outcome, PoolPolicy

NOW = 1_000.0


def configs(weights: list[int], prefix: str = "k") -> list[KeyConfig]:
    return [KeyConfig(f"{prefix}{i}", "groq", f"sk-{i}", weight=w) for i, w in enumerate(weights)]


def pick(pool: ManagedCreditPool, model: str | None = None) -> str:
    key = pool.acquire("groq", NOW, model=model)
    assert key is not None
    pool.release(key, Outcome.OK, NOW, model=model)
    return key.name


def policies() -> list[PoolPolicy]:
    # Two policies that differ in nothing that touches selection: re-applying either one forces
    # configure() to rebuild the schedule (an identical table is skipped outright).
    return [PoolPolicy(max_cooldown=3600.0), PoolPolicy(max_cooldown=1800.0)]


def test_eight_equal_keys_reconfigured_every_two_picks_share_equally() -> None:
    """Issue 15: k0 and k1 got all 800 picks."""
    pool = ManagedCreditPool(configs([1] * 8))
    seen: list[str] = []
    for round_ in range(400):
        pool.configure(configs([1] * 8), policies()[round_ % 2])
        seen += [pick(pool), pick(pool)]
    assert Counter(seen) == {f"k{i}": 100 for i in range(8)}


def test_weights_3_1_1_reconfigured_every_three_picks_keep_their_shares() -> None:
    """Issue 15: 334/166/0."""
    pool = ManagedCreditPool(configs([3, 1, 1]))
    seen: list[str] = []
    for round_ in range(100):
        pool.configure(configs([3, 1, 1]), policies()[round_ % 2])
        seen += [pick(pool), pick(pool), pick(pool)]
    assert Counter(seen) == {"k0": 180, "k1": 60, "k2": 60}


def test_the_same_table_again_changes_nothing() -> None:
    pool = ManagedCreditPool(configs([1, 1, 1]))
    seen = []
    for _ in range(30):
        assert pool.configure(configs([1, 1, 1])) == frozenset()
        seen.append(pick(pool))
    assert seen == ["k0", "k1", "k2"] * 10


def test_a_new_key_joins_at_the_present_without_a_burst() -> None:
    pool = ManagedCreditPool(configs([1, 1]))
    for _ in range(101):
        pick(pool)
    pool.configure([*configs([1, 1]), KeyConfig("new", "groq", "sk-new")])
    window = [pick(pool) for _ in range(30)]
    assert Counter(window) == {"k0": 10, "k1": 10, "new": 10}
    assert "new,new" not in ",".join(window)


def test_a_changed_weight_takes_effect_from_the_present() -> None:
    pool = ManagedCreditPool(configs([1, 1]))
    for _ in range(11):
        pick(pool)
    pool.configure(configs([3, 1]))
    window = [pick(pool) for _ in range(40)]
    assert abs(Counter(window)["k0"] - 30) <= 1


def test_configure_returns_the_keys_that_left() -> None:
    pool = ManagedCreditPool(configs([1, 1, 1]))
    assert pool.configure(configs([1, 1])) == {"k2"}
    # A new value under the same name is a new key: the old one's series go too.
    assert pool.configure([KeyConfig("k0", "groq", "sk-rotated"), *configs([1, 1])[1:]]) == {"k0"}


def test_the_schedule_survives_per_model() -> None:
    pool = ManagedCreditPool(configs([1] * 4))
    seen: list[str] = []
    for round_ in range(100):
        pool.configure(configs([1] * 4), policies()[round_ % 2])
        seen.append(pick(pool, "big"))
    assert Counter(seen) == {f"k{i}": 25 for i in range(4)}


ops = st.lists(
    st.one_of(
        st.just(("pick", 0)),
        st.tuples(st.just("configure"), st.integers(0, 1)),
        # A key of another tier joins, changes weight, leaves: the schedule of tier 0 holds.
        st.tuples(st.just("other"), st.integers(0, 3)),
        st.tuples(st.just("overlap"), st.integers(1, 3)),  # picks held, released later
    ),
    min_size=1,
    max_size=120,
)


@given(st.lists(st.integers(1, 5), min_size=1, max_size=6), ops, st.sampled_from([None, "big"]))
@settings(max_examples=200, deadline=None)
def test_any_interleaving_keeps_every_key_within_one_of_its_share(
    weights: list[int], history: list[tuple[str, int]], model: str | None
) -> None:
    pool = ManagedCreditPool(configs(weights))
    held = []
    seen: list[str] = []
    for op, arg in history:
        if op == "configure":
            pool.configure(configs(weights), policies()[arg])
            continue
        if op == "other":
            extra = [KeyConfig("x", "groq", "sk-x", tier=5, weight=arg)] if arg else []
            pool.configure([*configs(weights), *extra])
            continue
        for _ in range(1 if op == "pick" else arg):
            key = pool.acquire("groq", NOW, model=model)
            assert key is not None
            seen.append(key.name)
            held.append(key)
        while len(held) > (0 if op == "pick" else 3):
            pool.release(held.pop(0), Outcome.OK, NOW, model=model)
    total = sum(weights)
    if len(seen) < total:
        return
    window: deque[str] = deque(seen[:total])
    for nxt in [*seen[total:], None]:
        counts = Counter(window)
        for i, weight in enumerate(weights):
            assert abs(counts[f"k{i}"] - weight) <= 1, (seen, weights)
        if nxt is None:
            break
        window.popleft()
        window.append(nxt)


# ------------------------------------------------------------------ one probe at a time


def open_breaker(pool: ManagedCreditPool, name: str = "a") -> None:
    for _ in range(pool.policy.failure_threshold):
        key = pool.acquire("groq", NOW, exclude={"b"})
        assert key is not None
        assert key.name == name
        pool.release(key, Outcome.SERVER_ERROR, NOW)


def two_keys(**kw: object) -> ManagedCreditPool:
    return ManagedCreditPool(
        [KeyConfig("a", "groq", "sk-a"), KeyConfig("b", "groq", "sk-b")],
        PoolPolicy(**kw),  # type: ignore[arg-type]
    )


def health(pool: ManagedCreditPool, name: str, now: float) -> KeyHealth:
    return next(s.health for s in pool.statuses(now) if s.name == name)


def test_a_long_probe_holds_the_slot_until_it_is_released() -> None:
    """A stream may last minutes: a 30 s timer let a second probe through."""
    pool = two_keys(breaker_backoff=10)
    open_breaker(pool)
    probe = pool.acquire("groq", NOW + 10, exclude={"b"})
    assert probe is not None
    assert probe.name == "a"
    for later in (31, 120, 600):
        assert pool.acquire("groq", NOW + 10 + later, exclude={"b"}) is None
    pool.release(probe, Outcome.OK, NOW + 700)
    assert health(pool, "a", NOW + 700) is KeyHealth.READY


def test_the_probe_bound_is_the_whole_request_timeout() -> None:
    """Only a release that never comes frees the slot, after the longest a request may live."""
    pool = two_keys(breaker_backoff=10, probe_timeout=930)
    open_breaker(pool)
    assert pool.acquire("groq", NOW + 10, exclude={"b"}) is not None
    assert pool.acquire("groq", NOW + 939, exclude={"b"}) is None
    assert pool.acquire("groq", NOW + 940, exclude={"b"}) is not None


def test_configure_keeps_a_probe_in_flight() -> None:
    pool = two_keys(breaker_backoff=10)
    open_breaker(pool)
    probe = pool.acquire("groq", NOW + 10, exclude={"b"})
    assert probe is not None
    pool.configure(
        [KeyConfig("a", "groq", "sk-a"), KeyConfig("b", "groq", "sk-b", weight=2)],
        PoolPolicy(breaker_backoff=10, max_cooldown=100),
    )
    assert pool.acquire("groq", NOW + 11, exclude={"b"}) is None
    assert pool.release(probe, Outcome.OK, NOW + 12)[0].reason == "Recovered"
    assert health(pool, "a", NOW + 12) is KeyHealth.READY


def test_an_open_breaker_that_gets_cooled_still_goes_through_half_open() -> None:
    pool = two_keys(breaker_backoff=10)
    open_breaker(pool)
    assert pool.impose_cooldown("a", NOW + 60, NOW) is True
    assert health(pool, "a", NOW + 59) is KeyHealth.OPEN
    assert health(pool, "a", NOW + 60) is KeyHealth.HALF_OPEN
    probe = pool.acquire("groq", NOW + 60, exclude={"b"})
    assert probe is not None
    assert pool.acquire("groq", NOW + 60, exclude={"b"}) is None  # one probe, not READY


# ------------------------------------------------------------------ reading is pure


def test_statuses_never_change_the_pool() -> None:
    """A /metrics scrape expired timers: reading at a later time let the key back early."""
    pool = two_keys()
    pool.mark_as_cooling("a", NOW, seconds=10)
    assert health(pool, "a", NOW + 20) is KeyHealth.READY  # as of then
    assert pool.acquire("groq", NOW + 5, exclude={"b"}) is None  # still cooling now
    assert health(pool, "a", NOW + 5) is KeyHealth.COOLING
