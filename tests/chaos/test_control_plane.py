"""Control-plane faults with real processes: the operator SIGKILLed during a burst of 429
reports, the API server crashed (SIGKILL) under traffic, and canary key values searched for
everywhere after reports, revocation, rotation and restarts.
"""

from __future__ import annotations

import time
from collections import Counter
from datetime import datetime
from typing import Any

import pytest

from sideproxy.models import fingerprint
from tests.chaos.common import assert_all_ok, canaries, error_body, leaks, start
from tests.e2e.cluster import Loop
from tests.e2e.procs import Traffic, burst, wait_until
from tests.kube.harness import KubeCluster

pytestmark = pytest.mark.kube

RATE_LIMITED = {"status": 429, "retry_after": 20}


def limited_429s(loop: Loop, names: list[str]) -> dict[str, int]:
    statuses = loop.fake.statuses()
    return {n: statuses.get(loop.fp(n), Counter())[429] for n in names}


def until_of(status: dict[str, Any]) -> float:
    return datetime.fromisoformat(status["cooldownUntil"]).timestamp()


def test_operator_sigkilled_during_a_burst_of_429_reports(bare_loop: Loop) -> None:
    """Real proxies report 429s on their ReplicaReports while the operator is SIGKILLed and
    restarted: every 429 they counted is in PoolKey status exactly once."""
    loop = bare_loop
    keys = canaries(8, "kill")
    start(loop, keys, ["a"])
    a = loop.proxies["a"]
    assert loop.operator is not None
    names = list(keys)
    first, second, healthy = names[:3], names[3:6], names[6:]
    with Traffic([a.port], per_proxy=6, pause=0.005) as traffic:
        wait_until(lambda: traffic.count() > 30, 10, "some traffic")
        # Wave 1 while the operator runs: keys 1-3 answer 429 (retry-after: 20) once.
        loop.fake.configure(faults={loop.fp(n): [RATE_LIMITED] for n in first})
        wait_until(lambda: all(loop.reported(n) for n in first), 10, "wave 1 reported")
        loop.operator.kill()  # SIGKILL, mid-way through folding wave 1
        # Wave 2 while it is dead: keys 4-6, reported on the replica's ReplicaReport.
        loop.fake.configure(faults={loop.fp(n): [RATE_LIMITED] for n in second})
        wait_until(lambda: all(loop.reported(n) for n in second), 10, "wave 2 reported")
        dead = time.monotonic()
        loop.operator.start()
        wait_until(
            lambda: all(
                loop.key_status(n).get("rateLimitedCount") == loop.reported(n)
                for n in first + second
            ),
            30,
            "every reported 429 counted after the restart",
        )
        caught_up = time.monotonic() - dead
        served = traffic.count()
        wait_until(lambda: traffic.count() > served + 30, 10, "traffic after the restart")
    assert_all_ok(traffic.outcomes, "requests through the 429 burst and the operator's death")
    assert {o.served_by for o in traffic.outcomes[-30:]} <= {loop.fp(n) for n in healthy}

    hit = limited_429s(loop, names)
    assert all(hit[n] > 0 for n in first + second), hit
    assert not any(hit[n] for n in healthy), hit
    for name in first + second:
        status = loop.key_status(name)
        assert status["rateLimitedCount"] == loop.reported(name) >= 1, (name, status)
        assert status.get("lastRateLimited"), name
        assert status["phase"] in {"CoolingDown", "Ready"}, (name, status)
    for name in healthy:
        assert loop.key_status(name)["phase"] == "Ready"
        assert loop.key_status(name).get("rateLimitedCount", 0) == 0
    table = loop.table()
    assert table is not None
    assert {k.state.value for k in table.keys} == {"ready"}  # health is not in the table
    print(
        f"{traffic.count()} requests, {sum(hit.values())} 429s, "
        f"operator down -> every 429 counted: {caught_up:.2f}s"
    )
    assert not leaks(loop)


@pytest.mark.parametrize("crash", [True], ids=["sigkill"])
def test_api_server_crash_under_traffic_then_changes_reach_the_proxies(
    kube: KubeCluster, bare_loop: Loop, crash: bool
) -> None:
    loop = bare_loop
    keys = canaries(3, "api")
    start(loop, keys, ["a", "b"])
    a, b = loop.proxies["a"], loop.proxies["b"]
    assert loop.operator is not None
    with Traffic([a.port, b.port]) as traffic:
        wait_until(lambda: traffic.count() > 20, 10, "some traffic")
        kube.stop_apiserver(crash=crash)
        try:
            served = traffic.count()
            time.sleep(6)
            during = traffic.count() - served
            assert during > 60, "traffic stalled while the API server was down"
            assert a.readyz() == b.readyz() == 200
        finally:
            kube.start_apiserver()
        back = time.monotonic()
        # A new key and a rotation, made after the restart, reach both replicas.
        new_value = f"gsk_CANARY_{keys['key-1'][11:23]}_new_key_4"
        rotated = f"gsk_CANARY_{keys['key-1'][11:23]}_rotated_2"
        loop.canaries.update({new_value, rotated})
        loop.secret_values = {**loop.secret_values, "key-4": new_value, "key-2": rotated}
        loop.apply([loop.secret_doc(loop.secret_values), loop.key_doc("key-4")])
        for proxy in (a, b):
            proxy.wait_for(
                lambda p: (
                    p.key("key-4").get("fingerprint") == fingerprint(new_value)
                    and p.key("key-2").get("fingerprint") == fingerprint(rotated)
                ),
                30,
                "key-4 and the rotated key-2",
            )
        reached = time.monotonic() - back
        served = traffic.count()
        wait_until(lambda: traffic.count() > served + 20, 10, "traffic after the change")
    assert_all_ok(traffic.outcomes, "requests around the API server crash")
    seen = loop.fake.stats()
    for proxy in (a, b):
        assert_all_ok(burst(proxy.port, 30, concurrency=3), f"requests through {proxy.name}")
    after = loop.fake.stats()
    assert after[fingerprint(new_value)] > seen[fingerprint(new_value)], "key-4 unused"
    assert after[loop.fp("key-1")] > seen[loop.fp("key-1")]
    for proc in (a, b, loop.operator):
        proc.check_alive()
    print(
        f"{len(traffic.outcomes)} requests, {during} while the API server was down (6 s); "
        f"change made after the restart reached both replicas in {reached:.2f}s"
    )
    assert not leaks(loop)


def test_canary_values_never_leave_secrets(bare_loop: Loop) -> None:
    """Reports, revocation, rotation, proxy and operator restarts, an all-keys-down error; then
    every log line, metrics page, status, Event, ConfigMap and error body is searched."""
    loop = bare_loop
    keys = canaries(3, "leak")
    start(loop, keys, ["a", "b"])
    a, b = loop.proxies["a"], loop.proxies["b"]
    assert loop.operator is not None
    bodies: list[str] = []
    assert_all_ok(burst(a.port, 12, concurrency=3), "warm-up requests")  # the fake knows them
    # The fake quotes the presented key in its 401s, as some providers do.
    loop.fake.configure(echo_keys="full")
    # A 429 storm on key-1 (reports), key-2 revoked (Unauthorized), then rotated.
    loop.fake.configure(
        faults={loop.fp("key-1"): [{**RATE_LIMITED, "echo": True}]}, revoke=[loop.fp("key-2")]
    )
    assert_all_ok(burst(a.port, 30, concurrency=3), "requests through the 429s and the 401s")
    wait_until(lambda: loop.key_status("key-2").get("phase") == "Revoked", 15, "key-2 Revoked")
    wait_until(lambda: loop.key_status("key-1").get("phase") == "CoolingDown", 15, "key-1 cooling")
    loop.rotate("key-2", f"gsk_CANARY_{keys['key-1'][11:23]}_leak_rotated")
    wait_until(lambda: loop.key_status("key-2").get("phase") == "Ready", 15, "key-2 Ready")
    # Restarts: the operator SIGKILLed, proxy b stopped and started.
    loop.operator.kill()
    loop.operator.start()
    b.stop()
    b.start()
    b.wait_ready(60)
    assert_all_ok(burst(b.port, 20, concurrency=2), "requests through the restarted b")
    # Every key refused: the client sees the provider's error, never the key it quoted.
    loop.fake.configure(revoke=[loop.fp(n) for n in keys])
    for proxy in (a, b):
        for _ in range(3):
            bodies.append(error_body(proxy.port))
    assert any('"error"' in body for body in bodies), bodies
    assert not any(body.startswith("[200") for body in bodies), bodies
    time.sleep(1)  # the Unauthorized reports land
    found = leaks(loop, {"error bodies": "\n".join(bodies)})
    assert not found, f"a key value appears in: {found}"
