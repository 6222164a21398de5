"""Pick cost of the pool core with 10, 1,000 and 10,000 keys (issue scenario 5).

    .venv/bin/python bench/pool_pick.py [--json out.json]

Each pick is acquire + release(OK) with real headers on a weighted, two-tier pool, 5% of the
keys cooling. Reports nanoseconds per pick (best of 5 runs) and the ratio to the 10-key pool.
"""

from __future__ import annotations

import argparse
import json
import time

from sideproxy.pool import KeyConfig, ManagedCreditPool, Outcome

HEADERS = {"x-ratelimit-remaining-requests": "999", "x-ratelimit-limit-requests": "1000"}


def pick_cost(n_keys: int, picks: int = 200_000, runs: int = 5) -> float:
    pool = ManagedCreditPool(
        KeyConfig(f"k{i}", "groq", f"sk-{i}", tier=i % 2, weight=1 + i % 4) for i in range(n_keys)
    )
    now = 1_000.0
    for i in range(0, n_keys, 20):
        pool.mark_as_cooling(f"k{i}", now, seconds=3600)
    acquire, release, ok = pool.acquire, pool.release, Outcome.OK
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter_ns()
        for _ in range(picks):
            key = acquire("groq", now)
            release(key, ok, now, HEADERS)  # type: ignore[arg-type]
        best = min(best, (time.perf_counter_ns() - start) / picks)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", help="write raw results here")
    parser.add_argument("--picks", type=int, default=200_000)
    args = parser.parse_args()
    results = {n: pick_cost(n, args.picks) for n in (10, 1_000, 10_000)}
    print("| keys | ns per pick (acquire+release) | vs 10 keys |")
    print("| ---: | ---: | ---: |")
    for n, ns in results.items():
        print(f"| {n:,} | {ns:,.0f} | {ns / results[10]:.2f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"pick_ns": results}, f, indent=2)


if __name__ == "__main__":
    main()
