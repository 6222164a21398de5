"""Per-request cost of virtual-key admission (issue 12, item 3).

    .venv/bin/python bench/vkey_admit.py

``Admission.admit`` + ``Ticket.usage`` (a whole body's ``usage``) + ``Ticket.close`` for a
VirtualKey with all three limits and a model list, on one replica with one peer known (the
shared-limit path), 1,000 VirtualKeys configured. Best of 5 runs, µs per request. The limits are
high enough that nothing is refused (a refusal costs less: it stops earlier). CPU time of
this process, so a machine shared with other work slows it less.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry

from sideproxy.models import VirtualKeyLimits
from sideproxy.proxy._admit import Admission
from sideproxy.proxy._auth import Identity

BODY = b'{"id":"x","choices":[],"usage":{"prompt_tokens":5,"completion_tokens":7}}'


def cost(requests: int = 100_000, runs: int = 5) -> tuple[float, float]:
    limits = VirtualKeyLimits(
        requests_per_minute=10**8, tokens_per_minute=10**10, max_concurrent=10**6
    )
    admission = Admission(CollectorRegistry())
    admission.configure({f"vk-{i}": limits for i in range(1_000)}, ["small"])
    admission.observe("peer", {}, active=True)
    who = Identity("vk-7", b"d" * 32, ("small", "llama-*"), limits)
    best_admit = best_usage = float("inf")
    for _ in range(runs):
        start = time.process_time_ns()
        for _ in range(requests):
            admission.admit(who, "small").close()
        best_admit = min(best_admit, (time.process_time_ns() - start) / requests / 1000)
        start = time.process_time_ns()
        for _ in range(requests):
            ticket = admission.admit(who, "small")
            ticket.usage(BODY)
            ticket.close()
        best_usage = min(best_usage, (time.process_time_ns() - start) / requests / 1000)
    return best_admit, best_usage


def main() -> None:
    admit, usage = cost()
    print("| path | µs per request |")
    print("| --- | ---: |")
    print(f"| admit + close (limits, model list) | {admit:.2f} |")
    print(f"| admit + usage of a body + close | {usage:.2f} |")


if __name__ == "__main__":
    main()
