"""Target selection (``_targets``) on the real pool, with plain numbers for time."""

from __future__ import annotations

from collections import Counter

import pytest

from sideproxy.models import TableRoute, TableTarget
from sideproxy.pool import Key, KeyConfig, ManagedCreditPool, Outcome
from sideproxy.proxy._compile import Upstream
from sideproxy.proxy._errors import NotFound
from sideproxy.proxy._targets import Plan, Routes, Target, compile_routes

NOW = 1000.0


def _upstream(name: str, anthropic: bool = False) -> Upstream:
    return Upstream(name, f"http://{name}.test/v1", b"authorization", b"Bearer ", anthropic)


UPSTREAMS = {
    name: _upstream(name, name == "anthropic")
    for name in ("groq", "openai", "vllm-a", "vllm-b", "anthropic")
}


def _routes(*targets: tuple[str, str, int, int]) -> Routes:
    route = TableRoute(
        model="fast",
        targets=[TableTarget(provider=p, model=m, order=o, weight=w) for p, m, o, w in targets],
    )
    return compile_routes([route], UPSTREAMS)


def _pool(*keys: tuple[str, str, tuple[str, ...]]) -> ManagedCreditPool:
    return ManagedCreditPool(
        KeyConfig(name=n, provider=p, secret=f"s-{n}", models=m) for n, p, m in keys
    )


def _plan(routes: Routes, anthropic: bool = False) -> Plan:
    plan = routes.plan("fast", anthropic)
    assert plan is not None
    return plan


def _labels(picks: list[tuple[Target, Key] | None]) -> list[tuple[str, str]]:
    out = []
    for picked in picks:
        assert picked is not None
        out.append((picked[0].label, picked[1].name))
    return out


def test_targets_in_order_and_cooling_skips_to_the_next() -> None:
    pool = _pool(("g1", "groq", ()), ("g2", "groq", ()), ("o1", "openai", ()))
    plan = _plan(_routes(("groq", "llama", 0, 1), ("openai", "gpt-4o-mini", 1, 1)))
    picks = [plan.pick(pool, NOW) for _ in range(4)]
    assert _labels(picks) == [
        ("groq/llama", "g1"),
        ("groq/llama", "g2"),
        ("groq/llama", "g1"),
        ("groq/llama", "g2"),
    ]
    for _ in range(2):  # both Groq keys cool for llama (per (key, model))
        key = pool.acquire("groq", NOW, model="llama")
        assert key is not None
        pool.release(key, Outcome.RATE_LIMITED, NOW, {"retry-after": "30"}, model="llama")
    picked = [plan.pick(pool, NOW + 1) for _ in range(10)]
    assert set(_labels(picked)) == {("openai/gpt-4o-mini", "o1")}
    back = plan.pick(pool, NOW + 31)  # the cool-down is over: Groq again
    assert back is not None
    assert back[0].label == "groq/llama"


def test_a_key_cooling_for_another_model_still_serves_the_target() -> None:
    pool = _pool(("g1", "groq", ()), ("o1", "openai", ()))
    key = pool.acquire("groq", NOW, model="big")
    assert key is not None
    pool.release(key, Outcome.RATE_LIMITED, NOW, {"retry-after": "30"}, model="big")
    picked = _plan(_routes(("groq", "llama", 0, 1), ("openai", "x", 1, 1))).pick(pool, NOW)
    assert picked is not None
    assert picked[0].label == "groq/llama"


def test_a_target_whose_keys_may_not_serve_its_model_is_skipped() -> None:
    pool = _pool(("g1", "groq", ("other-*",)), ("o1", "openai", ()))
    picked = _plan(_routes(("groq", "llama", 0, 1), ("openai", "x", 1, 1))).pick(pool, NOW)
    assert picked is not None
    assert picked[0].label == "openai/x"


def test_tried_keys_are_excluded_across_targets() -> None:
    pool = _pool(("g1", "groq", ()), ("o1", "openai", ()))
    plan = _plan(_routes(("groq", "llama", 0, 1), ("openai", "x", 1, 1)))
    assert plan.pick(pool, NOW, ["g1", "o1"]) is None
    picked = plan.pick(pool, NOW, ["g1"])
    assert picked is not None
    assert picked[1].name == "o1"


@pytest.mark.parametrize("weights", [(3, 1), (1, 1), (5, 2, 1), (7, 3)])
def test_weights_within_an_order_share_load_exactly(weights: tuple[int, ...]) -> None:
    names = ["vllm-a", "vllm-b", "openai"][: len(weights)]
    pool = _pool(*((f"k-{n}", n, ()) for n in names))
    plan = _plan(_routes(*((n, "m", 0, w) for n, w in zip(names, weights, strict=True))))
    total = sum(weights)
    seen: list[str] = []
    for _ in range(total * 20):
        picked = plan.pick(pool, NOW)
        assert picked is not None
        seen.append(picked[0].provider)
        key = picked[1]
        pool.release(key, Outcome.OK, NOW, model="m")
    # As the pool promises for keys: over any window of k * sum(weights) picks, each target
    # gets k * its weight, +-1.
    for k in (1, 2, 3):
        size = k * total
        for start in range(len(seen) - size + 1):
            counts = Counter(seen[start : start + size])
            for name, weight in zip(names, weights, strict=True):
                assert abs(counts[name] - k * weight) <= 1, (size, start, name)


def test_a_target_back_from_cooling_does_not_burst() -> None:
    pool = _pool(("a", "vllm-a", ()), ("b", "vllm-b", ()))
    plan = _plan(_routes(("vllm-a", "m", 0, 1), ("vllm-b", "m", 0, 1)))
    key = pool.acquire("vllm-a", NOW, model="m")
    assert key is not None
    pool.release(key, Outcome.RATE_LIMITED, NOW, {"retry-after": "10"}, model="m")
    for _ in range(20):
        picked = plan.pick(pool, NOW + 1)
        assert picked is not None
        assert picked[0].provider == "vllm-b"
    after = []
    for _ in range(6):
        picked = plan.pick(pool, NOW + 11)
        assert picked is not None
        after.append(picked[0].provider)
    # Back to sharing at once (+-1), not 20 picks of vllm-a to catch up.
    counts = Counter(after)
    assert abs(counts["vllm-a"] - 3) <= 1
    assert abs(counts["vllm-b"] - 3) <= 1


def test_shapes_are_kept_apart() -> None:
    routes = _routes(("groq", "llama", 0, 1), ("anthropic", "claude-x", 1, 1))
    assert [t.label for t in _plan(routes).targets()] == ["groq/llama"]
    assert [t.label for t in _plan(routes, anthropic=True).targets()] == ["anthropic/claude-x"]
    only_openai = _routes(("openai", "x", 0, 1))
    with pytest.raises(NotFound, match="no target for Anthropic Messages requests"):
        only_openai.plan("fast", anthropic=True)


def test_a_model_that_is_not_a_route_routes_as_today() -> None:
    routes = _routes(("groq", "llama", 0, 1))
    assert routes.plan("llama", anthropic=False) is None
    assert routes.plan(None, anthropic=False) is None
