"""Per-(key, model) state: a 429 about one model cools that model only; globs; headroom."""

from collections import Counter

import pytest

from sideproxy.pool import KeyConfig, KeyHealth, LimitScope, ManagedCreditPool, Outcome, PoolPolicy

NOW = 1_000.0


def pool_of(*names: str, models: dict[str, tuple[str, ...]] | None = None, **kw: object):  # type: ignore[no-untyped-def]
    models = models or {}
    return ManagedCreditPool(
        [KeyConfig(n, "groq", f"sk-{n}", models=models.get(n, ())) for n in names],
        PoolPolicy(**kw),  # type: ignore[arg-type]
    )


def picks(pool: ManagedCreditPool, model: str | None, n: int, now: float = NOW) -> list[str]:
    out = []
    for _ in range(n):
        key = pool.acquire("groq", now, model=model)
        assert key is not None, f"no key for {model} after {out}"
        out.append(key.name)
        pool.release(key, Outcome.OK, now, model=model)
    return out


def rate_limit(pool: ManagedCreditPool, model: str | None, seconds: int, now: float = NOW):  # type: ignore[no-untyped-def]
    key = pool.acquire("groq", now, model=model)
    assert key is not None
    return key, pool.release(key, Outcome.RATE_LIMITED, now, {"retry-after": str(seconds)}, model)


def test_a_429_for_one_model_leaves_the_key_serving_the_others() -> None:
    pool = pool_of("a", "b")
    key, changes = rate_limit(pool, "big", 30)
    assert [(c.name, c.model, c.until, c.health) for c in changes] == [
        (key.name, "big", NOW + 30, KeyHealth.COOLING)
    ]
    # "big" now only goes to the other key; "small" and model-less requests use both.
    other = "b" if key.name == "a" else "a"
    assert set(picks(pool, "big", 6)) == {other}
    assert Counter(picks(pool, "small", 6)) == {"a": 3, "b": 3}
    assert Counter(picks(pool, None, 6)) == {"a": 3, "b": 3}
    (status,) = [s for s in pool.statuses(NOW) if s.name == key.name]
    assert status.health is KeyHealth.READY
    assert status.cooling == (("big", NOW + 30),)
    # At the provider's deadline it serves "big" again.
    assert set(picks(pool, "big", 4, NOW + 30)) == {"a", "b"}
    assert [s.cooling for s in pool.statuses(NOW + 30)] == [(), ()]


def test_every_key_cooling_for_a_model_blocks_only_that_model() -> None:
    pool = pool_of("a", "b")
    rate_limit(pool, "big", 20)
    rate_limit(pool, "big", 8)
    assert pool.acquire("groq", NOW, model="big") is None
    assert pool.next_recovery("groq", NOW, model="big") == NOW + 8
    assert pool.next_recovery("groq", NOW, model="small") == NOW
    assert len(picks(pool, "small", 4)) == 4


def test_scope_key_cools_the_key_for_every_model() -> None:
    pool = pool_of("a", "b", cooldown_scope=LimitScope.KEY)
    key, changes = rate_limit(pool, "big", 30)
    assert [(c.model, c.health) for c in changes] == [(None, KeyHealth.COOLING)]
    assert key.name not in picks(pool, "small", 4)


def test_a_429_without_a_model_cools_the_whole_key() -> None:
    pool = pool_of("a", "b")
    key, _ = rate_limit(pool, None, 30)
    assert key.name not in picks(pool, "big", 4)


def test_quota_scope_peers_cool_together_per_model() -> None:
    pool = ManagedCreditPool(
        [
            KeyConfig("a", "groq", "sk-a", quota_scope="org-1"),
            KeyConfig("b", "groq", "sk-b", quota_scope="org-1"),
            KeyConfig("c", "groq", "sk-c"),
        ]
    )
    key = pool.acquire("groq", NOW, exclude={"b", "c"}, model="big")
    assert key is not None
    changes = pool.release(key, Outcome.RATE_LIMITED, NOW, {"retry-after": "9"}, "big")
    assert sorted((c.name, c.model) for c in changes) == [("a", "big"), ("b", "big")]
    assert set(picks(pool, "big", 3)) == {"c"}
    assert set(picks(pool, "small", 3)) == {"a", "b", "c"}


def test_remote_cooldown_for_a_model() -> None:
    pool = pool_of("a", "b")
    assert pool.impose_cooldown("a", NOW + 10, NOW, model="big") is True
    assert pool.impose_cooldown("a", NOW + 5, NOW, model="big") is False  # never shortens
    assert set(picks(pool, "big", 3)) == {"b"}
    assert set(picks(pool, "small", 4)) == {"a", "b"}


def test_low_headroom_for_a_model_spares_that_model_only() -> None:
    pool = pool_of("a", "b")
    low = {"x-ratelimit-remaining-requests": "1", "x-ratelimit-reset-requests": "20s"}
    key = pool.acquire("groq", NOW, model="big")
    assert key is not None
    pool.release(key, Outcome.OK, NOW, low, "big")
    other = "b" if key.name == "a" else "a"
    assert set(picks(pool, "big", 3)) == {other}  # the reserve is used only when needed
    assert set(picks(pool, "small", 4)) == {"a", "b"}
    # Usable when nothing else is: the other key cools for "big", the low one serves it.
    pool.impose_cooldown(other, NOW + 60, NOW, model="big")
    assert picks(pool, "big", 2) == [key.name, key.name]
    assert set(picks(pool, "big", 4, NOW + 61)) == {"a", "b"}


def test_globs_restrict_what_a_key_serves() -> None:
    pool = pool_of("a", "b", "c", models={"a": ("gpt-4o*",), "b": ("llama-3.1-8b-instant",)})
    assert set(picks(pool, "gpt-4o-mini", 4)) == {"a", "c"}
    assert set(picks(pool, "llama-3.1-8b-instant", 4)) == {"b", "c"}
    assert set(picks(pool, "other", 3)) == {"c"}
    assert set(picks(pool, None, 6)) == {"a", "b", "c"}  # no model: files, batches, /models
    assert pool.serves("groq", "gpt-4o")
    assert pool.serves("groq", "anything")

    only = pool_of("a", models={"a": ("gpt-4o*",)})
    assert not only.serves("groq", "llama")
    assert only.acquire("groq", NOW, model="llama") is None
    assert only.next_recovery("groq", NOW, model="llama") is None
    assert only.serves("groq", "gpt-4o-2024-08-06")


@pytest.mark.parametrize("bad", ["", "gpt 4o", "a[b]", "x?", "ü"])
def test_invalid_globs_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="models"):
        KeyConfig("a", "groq", "sk-a", models=(bad,))


def test_equal_share_per_model_whatever_the_interleaving() -> None:
    """Two models alternating over two keys: each model still alternates its keys."""
    pool = pool_of("a", "b")
    big, small = [], []
    for _ in range(10):
        big += picks(pool, "big", 1)
        small += picks(pool, "small", 1)
    assert Counter(big) == {"a": 5, "b": 5}
    assert Counter(small) == {"a": 5, "b": 5}
    assert "a,a" not in ",".join(big)
    assert "b,b" not in ",".join(big)


def test_model_names_from_clients_cannot_grow_the_pool_without_bound() -> None:
    pool = pool_of("a", "b")
    for i in range(2_000):
        assert pool.acquire("groq", NOW + i, model=f"made-up-{i}") is not None
    group = pool._groups["groq"]
    assert len(group.lanes) <= 512
    # The recently used models keep their schedules.
    assert "made-up-1999" in group.lanes
    assert Counter(picks(pool, "made-up-1999", 4, NOW + 2_000)) == {"a": 2, "b": 2}


def test_a_late_success_with_low_headroom_does_not_end_a_models_cool_down() -> None:
    pool = pool_of("a", "b")
    first = pool.acquire("groq", NOW, exclude={"b"}, model="big")
    late = pool.acquire("groq", NOW, exclude={"b"}, model="big")
    assert first is late is not None
    pool.release(first, Outcome.RATE_LIMITED, NOW, {"retry-after": "30"}, "big")  # type: ignore[arg-type]
    low = {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "5s"}
    pool.release(late, Outcome.OK, NOW + 1, low, "big")  # type: ignore[arg-type]
    assert set(picks(pool, "big", 3, NOW + 10)) == {"b"}
    assert pool.statuses(NOW + 10)[0].cooling == (("big", NOW + 30),)


def test_a_spent_budget_for_a_model_rests_that_model_only() -> None:
    pool = pool_of("a", "b")
    spent = {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "20s"}
    key = pool.acquire("groq", NOW, exclude={"b"}, model="big")
    assert key is not None
    (change,) = pool.release(key, Outcome.OK, NOW, spent, "big")
    assert (change.model, change.until, change.reason) == ("big", NOW + 20, "Spent")
    assert key.rate_limited == 0  # not a 429
    pool.impose_cooldown("b", NOW + 60, NOW, model="big")
    assert pool.acquire("groq", NOW, model="big") is None  # not even as the last resort
    assert set(picks(pool, "small", 4)) == {"a", "b"}
    assert set(picks(pool, "big", 2, NOW + 20)) == {"a"}
