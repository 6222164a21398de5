"""Invariants of selection under arbitrary pools and event sequences (hypothesis)."""

from collections import Counter, deque

from hypothesis import given, settings
from hypothesis import strategies as st

from sideproxy.pool import KeyConfig, KeyHealth, ManagedCreditPool, Outcome

NOW = 1_000.0

key_specs = st.lists(
    st.tuples(st.integers(0, 3), st.integers(1, 6)),  # (tier, weight)
    min_size=1,
    max_size=12,
)


def build(specs: list[tuple[int, int]]) -> ManagedCreditPool:
    return ManagedCreditPool(
        [KeyConfig(f"k{i}", "groq", f"sk-{i}", tier=t, weight=w) for i, (t, w) in enumerate(specs)]
    )


@given(st.lists(st.integers(1, 9), min_size=1, max_size=10), st.integers(0, 40))
@settings(max_examples=200, deadline=None)
def test_any_window_of_sum_weights_picks_honours_weights(weights: list[int], offset: int) -> None:
    pool = ManagedCreditPool(
        [KeyConfig(f"k{i}", "groq", f"sk-{i}", weight=w) for i, w in enumerate(weights)]
    )
    total = sum(weights)
    sequence = [pool.acquire("groq", NOW).name for _ in range(offset + 3 * total)]  # type: ignore[union-attr]
    window: deque[str] = deque(sequence[offset : offset + total])
    for start in range(offset, offset + 2 * total):
        counts = Counter(window)
        for i, weight in enumerate(weights):
            assert abs(counts[f"k{i}"] - weight) <= 1
        window.popleft()
        window.append(sequence[start + total])


events = st.lists(
    st.tuples(
        st.integers(0, 11),  # which key
        st.sampled_from(list(Outcome)),
        st.integers(0, 120),  # seconds later
    ),
    max_size=40,
)


@given(key_specs, events)
@settings(max_examples=300, deadline=None)
def test_never_an_unavailable_key_while_a_healthy_one_exists(
    specs: list[tuple[int, int]], history: list[tuple[int, Outcome, int]]
) -> None:
    pool = build(specs)
    now = NOW
    for index, outcome, later in history:
        now += later
        key = pool.acquire("groq", now)
        if key is None:
            continue
        target = pool._keys.get(f"k{index % len(specs)}")
        chosen = target if target is not None and target.health is not KeyHealth.REVOKED else key
        pool.release(chosen, outcome, now, {"retry-after": "30"})

        statuses = {s.name: s for s in pool.statuses(now)}
        healthy = [s for s in statuses.values() if s.health is KeyHealth.READY]
        picked = pool.acquire("groq", now)
        if healthy:
            assert picked is not None
            state = statuses[picked.name]
            # Never cooling, revoked or open while a ready key exists anywhere...
            assert state.health in (KeyHealth.READY, KeyHealth.HALF_OPEN)
            # ...and tiers honoured: nothing from a higher tier than the best ready key's.
            assert picked.tier <= min(s.tier for s in healthy)
        if picked is not None:
            pool.release(picked, Outcome.CANCELLED, now)


@given(key_specs)
@settings(deadline=None)
def test_tiers_honoured_when_all_healthy(specs: list[tuple[int, int]]) -> None:
    pool = build(specs)
    best = min(t for t, _ in specs)
    for _ in range(3 * len(specs)):
        key = pool.acquire("groq", NOW)
        assert key is not None
        assert key.tier == best


model_events = st.lists(
    st.tuples(
        st.integers(0, 11),  # which key
        st.sampled_from(list(Outcome)),
        st.sampled_from([None, "big", "small"]),  # the model the answer was about
        st.integers(0, 40),  # seconds later
        st.booleans(),  # with low-headroom headers
    ),
    max_size=40,
)
LOW = {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "20s"}


@given(key_specs, model_events, st.sampled_from(["big", "small"]))
@settings(max_examples=300, deadline=None)
def test_per_model_state_never_hands_out_a_key_resting_for_that_model(
    specs: list[tuple[int, int]],
    history: list[tuple[int, Outcome, str | None, int, bool]],
    model: str,
) -> None:
    """Whatever happened to which key for which model: a pick for ``model`` is never a key that
    is cooling for it or out key-wide, and if any key can serve it, one is picked."""
    pool = build(specs)
    now = NOW
    for index, outcome, about, later, low in history:
        now += later
        key = pool.acquire("groq", now, model=about)
        if key is None:
            continue
        target = pool._keys.get(f"k{index % len(specs)}")
        chosen = target if target is not None else key
        headers = LOW if low else {"retry-after": "30"}
        pool.release(chosen, outcome, now, headers, about)
        if chosen is not key:
            pool.release(key, Outcome.CANCELLED, now, None, about)

        usable = [
            s
            for s in pool.statuses(now)
            if s.health in (KeyHealth.READY, KeyHealth.LOW_HEADROOM, KeyHealth.HALF_OPEN)
            and s.weight > 0
            and model not in dict(s.cooling)
            and not (s.health is KeyHealth.HALF_OPEN and pool._keys[s.name].probing)
        ]
        picked = pool.acquire("groq", now, model=model)
        if usable:
            assert picked is not None, (usable, pool.statuses(now))
        if picked is not None:
            state = next(s for s in pool.statuses(now) if s.name == picked.name)
            assert model not in dict(state.cooling)
            assert state.health in (KeyHealth.READY, KeyHealth.LOW_HEADROOM, KeyHealth.HALF_OPEN)
            pool.release(picked, Outcome.CANCELLED, now, None, model)
