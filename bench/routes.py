"""Per-request cost of routes (issue 13): resolving a route and rewriting the body's model.

    .venv/bin/python bench/routes.py

Measured on the request path's own objects (a table compiled by ``compile_snapshot``, the real
pool), best of 7 runs, microseconds per request:

- ``plan()`` for a model that is not a route: what every request pays once a pool has routes
  (one dict lookup); for a route's model it hands back the precompiled plan.
- ``pick()``: the attempt's selection through a route (order walk, stride pick, ``acquire``
  with the target's model), next to a plain ``pool.acquire`` of the same key set.
- the body rewrite, per body size: the splice (``with_model``) and, for comparison, the
  parse+dump it avoids (also what it falls back to when a body holds a second ``"model"`` key).
"""

from __future__ import annotations

import json
import sys
import timeit
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sideproxy.pool import ManagedCreditPool
from sideproxy.proxy._compile import compile_snapshot
from sideproxy.proxy._rewrite import with_model
from sideproxy.proxy._settings import ProxySettings
from sideproxy.proxy.sources import Snapshot
from sideproxy.translate import from_manifests, translate

NOW = 1_750_000_000.0
API = "sideproxy.dev/v1alpha1"


def _docs(n_keys: int) -> list[dict[str, object]]:
    providers = ["groq", "openai"]
    keys = [(f"{p}-{i}", p) for p in providers for i in range(n_keys)]
    return [
        {
            "apiVersion": API,
            "kind": "CreditPool",
            "metadata": {"name": "bench"},
            "spec": {
                "providers": [{"name": p} for p in providers],
                "routes": [
                    {
                        "model": "fast",
                        "targets": [
                            {"provider": "groq", "model": "llama-3.1-8b-instant"},
                            {"provider": "openai", "model": "gpt-4o-mini"},
                        ],
                    }
                ],
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "k"},
            "stringData": {name: f"sk-bench-{name}" for name, _ in keys},
        },
        *(
            {
                "apiVersion": API,
                "kind": "PoolKey",
                "metadata": {"name": name},
                "spec": {"pool": "bench", "provider": p, "secretRef": {"name": "k", "key": name}},
            }
            for name, p in keys
        ),
    ]


def chat(size: int) -> bytes:
    turn = {"role": "user", "content": "lorem ipsum dolor sit amet " * 10}
    n = max(1, size // len(json.dumps(turn)))
    return json.dumps({"messages": [turn] * n, "model": "fast", "stream": False}).encode()


def best_us(fn: Callable[[], object], number: int) -> float:
    return min(timeit.repeat(fn, number=number, repeat=7)) / number * 1e6


def parse_dump(body: bytes) -> bytes:
    doc = json.loads(body)
    doc["model"] = "gpt-4o-mini"
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()


def main() -> None:
    for n_keys in (10, 1000):
        pool_in, keys, secrets = from_manifests(_docs(n_keys))
        result = translate(pool_in, keys, secrets, NOW)
        compiled = compile_snapshot(
            Snapshot(result.table.sealed(1), result.material, "bench"), ProxySettings(), NOW
        )
        pool = ManagedCreditPool(compiled.keys, compiled.policy)
        routes = compiled.routes
        plan = routes.plan("fast", False)
        assert plan is not None
        miss = best_us(lambda: routes.plan("llama-3.3-70b", False), 200_000)  # noqa: B023
        hit = best_us(lambda: routes.plan("fast", False), 200_000)  # noqa: B023
        pick = best_us(lambda: plan.pick(pool, NOW), 50_000)  # noqa: B023
        plain = best_us(
            lambda: pool.acquire("groq", NOW, (), model="llama-3.1-8b-instant"),  # noqa: B023
            50_000,
        )
        print(
            f"{2 * n_keys} keys: plan() not a route {miss:.2f} µs, a route {hit:.2f} µs; "
            f"pick() through the route {pick:.2f} µs vs pool.acquire {plain:.2f} µs"
        )
    print(f"\n{'body':>12} {'splice (µs)':>12} {'parse+dump (µs)':>16}")
    for size in (300, 2_000, 16_000, 64_000, 256_000, 1_000_000):
        body = chat(size)
        number = max(20, min(2_000, 200_000 // max(1, len(body) // 100)))
        splice = best_us(lambda: with_model(body, "fast", "gpt-4o-mini"), number)  # noqa: B023
        full = best_us(lambda: parse_dump(body), max(10, number // 10))  # noqa: B023
        assert json.loads(with_model(body, "fast", "gpt-4o-mini")) == json.loads(parse_dump(body))
        print(f"{len(body):>12,} {splice:>12.2f} {full:>16.2f}")


if __name__ == "__main__":
    main()
