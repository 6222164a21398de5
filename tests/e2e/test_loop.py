"""The closed loop with real processes: a 429 seen by one proxy replica reaches every replica
and kubectl; rotation under traffic; an API server outage under traffic; a bad table.

Proxies run with the chart's proxy rights only (a ServiceAccount token: get/list/watch of the
two named objects, create Events). Traffic is plain HTTP without client retries, so every
failed request counts; the fake provider's per-key counters (by fingerprint) say which key
served, and windows with traffic through one replica only tell the replicas apart.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from datetime import datetime

import pytest

from sideproxy.models import KeyState, fingerprint
from tests.e2e.cluster import POOL, Loop, values
from tests.e2e.procs import ProxyProc, Traffic, burst, failures, wait_until
from tests.kube.harness import KubeCluster

pytestmark = pytest.mark.kube


def assert_all_ok(outcomes: list, what: str) -> None:  # type: ignore[type-arg]
    bad = failures(outcomes)
    assert not bad, f"{len(bad)} of {len(outcomes)} {what} failed, e.g. {bad[:3]}"
    assert outcomes, f"no {what} at all"


def row(loop: Loop, name: str) -> dict[str, str]:
    """``kubectl get poolkey NAME``, as header -> cell."""
    out = loop.kube.kubectl("get", "poolkey", name, "-n", loop.ns).stdout.splitlines()
    header, line = out[0], out[1]
    starts = [i for i, ch in enumerate(header) if ch != " " and (i == 0 or header[i - 1] == " ")]
    ends = [*starts[1:], None]
    return {header[s:e].strip(): line[s:e].strip() for s, e in zip(starts, ends, strict=True)}


class CoolingWatch:
    """Polls replicas' /sideproxy/status in a thread: when each first shows ``key`` cooling."""

    def __init__(self, proxies: list[ProxyProc], key: str, interval: float = 0.01) -> None:
        self.proxies = proxies
        self.key = key
        self.interval = interval
        self.seen: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set() and len(self.seen) < len(self.proxies):
            for proxy in self.proxies:
                if proxy.name not in self.seen and proxy.key(self.key).get("health") == "cooling":
                    self.seen[proxy.name] = time.time()
            self._stop.wait(self.interval)

    def __enter__(self) -> CoolingWatch:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        deadline = time.monotonic() + 2
        while len(self.seen) < len(self.proxies) and time.monotonic() < deadline:
            time.sleep(self.interval)
        self._stop.set()
        self._thread.join(5)


def test_a_429_on_one_replica_reaches_every_replica_and_kubectl(loop: Loop) -> None:
    a, b = loop.proxies["a"], loop.proxies["b"]
    fp1 = loop.fp("key-1")
    outcomes = burst(b.port, 30, concurrency=3)
    assert_all_ok(outcomes, "warm-up requests through b")
    assert {o.served_by for o in outcomes} == {loop.fp(f"key-{i}") for i in (1, 2, 3)}

    # key-1 answers once per 10 s window; 30 concurrent requests through a alone (the fake
    # answers after 100 ms, so a dozen meet key-1 at once): a storm of 429s on key-1.
    loop.fake.configure(limits={fp1: "1/10s"}, latency_ms=100)
    before = loop.fake.statuses().get(fp1, Counter())
    with CoolingWatch([a, b], "key-1") as watch:
        outcomes = burst(a.port, 60, concurrency=30)
        assert_all_ok(outcomes, "requests through a during the 429 storm")
        limited = loop.fake.statuses()[fp1][429] - before.get(429, 0)
        assert limited >= 2, f"expected a storm of 429s on key-1, saw {limited}"
        # b learns the cool-down from the cluster, never from a 429 of its own.
        cooling = wait_until(
            lambda: (k := b.key("key-1")).get("health") == "cooling" and k, 5.0, "b cooling"
        )
    learnt = watch.seen["b"] - watch.seen["a"]
    assert 0 < learnt < 5.0, watch.seen
    assert cooling["rate_limited"] == 0
    assert cooling["until"] > time.time() + 3
    loop.fake.configure(latency_ms=0)
    seen = loop.fake.stats()
    outcomes = burst(b.port, 40, concurrency=4)
    assert_all_ok(outcomes, "requests through b while key-1 cools")
    assert loop.fake.stats()[fp1] == seen[fp1], "b sent traffic to the cooling key"
    assert fp1 not in {o.served_by for o in outcomes}
    print(f"a cools key-1 -> b cools key-1: {learnt * 1000:.0f} ms")

    # kubectl shows it (the operator folds the replicas' ReplicaReports into the status).
    status = wait_until(
        lambda: (s := loop.key_status("key-1")).get("phase") == "CoolingDown" and s,
        5.0,
        "key-1 CoolingDown in its status",
    )
    until = datetime.fromisoformat(status["cooldownUntil"]).timestamp()
    assert abs(until - cooling["until"]) < 1.5
    assert status["rateLimitedCount"] >= 1
    cells = row(loop, "key-1")
    assert (cells["STATE"], cells["COOLDOWN-UNTIL"]) == ("CoolingDown", status["cooldownUntil"])
    assert int(cells["429S"]) == status["rateLimitedCount"]
    # The count is a's ReplicaReport folded once: its high-water mark is in the status.
    marks = {m["report"]: m["rateLimited"] for m in status.get("appliedReports") or []}
    base = (status.get("reportsBase") or {}).get("rateLimited", 0)
    assert base + sum(marks.values()) == status["rateLimitedCount"], status
    assert any(count >= 1 for count in marks.values()), status

    # The deadline passes: Ready again in status and table, and both replicas use key-1.
    loop.fake.configure(limits={fp1: None})
    wait_until(
        lambda: loop.key_status("key-1").get("phase") == "Ready",
        until - time.time() + 5,
        "key-1 Ready again",
    )
    table = loop.table()
    assert table is not None
    assert next(k for k in table.keys if k.name == "key-1").state is KeyState.READY
    for proxy in (a, b):
        proxy.wait_for(lambda p: p.key("key-1").get("health") == "ready", 5.0, "key-1 ready")
        seen = loop.fake.stats()
        outcomes = burst(proxy.port, 30, concurrency=3)
        assert_all_ok(outcomes, f"requests through {proxy.name} after the cool-down")
        assert loop.fake.stats()[fp1] > seen[fp1], f"{proxy.name} does not use key-1 again"
    for proxy in (a, b):  # the chart's proxy rights were enough for everything it did
        assert "Forbidden" not in proxy.text()
        assert "could not report" not in proxy.text()
    assert not loop.leaks()


def test_rotating_a_key_under_traffic(loop: Loop) -> None:
    a, b = loop.proxies["a"], loop.proxies["b"]
    old, new = loop.fp("key-2"), fingerprint("sk-CANARY-e2e-rotated-key-2")
    with Traffic([a.port, b.port]) as traffic:
        wait_until(lambda: traffic.count() > 20, 10, "some traffic")
        loop.rotate("key-2", "sk-CANARY-e2e-rotated-key-2")
        started = time.time()
        for proxy in (a, b):
            proxy.wait_for(
                lambda p: p.key("key-2").get("fingerprint") == new,
                10,
                "serving the new value of key-2",
            )
        took = time.time() - started
        wait_until(lambda: traffic.count() > 40, 10, "more traffic")
    assert_all_ok(traffic.outcomes, "requests during the rotation")
    print(f"rotation reached both replicas in {took * 1000:.0f} ms")
    for proxy in (a, b):
        seen = loop.fake.stats()
        outcomes = burst(proxy.port, 30, concurrency=3)
        assert_all_ok(outcomes, f"requests through {proxy.name} after the rotation")
        after = loop.fake.stats()
        assert after[new] > seen[new], f"{proxy.name} does not use the new value"
        assert after[old] == seen[old], f"{proxy.name} still uses the old value"
    assert loop.key_status("key-2")["fingerprint"] == new
    assert not loop.leaks()


def test_api_server_outage_under_traffic(kube: KubeCluster, loop: Loop) -> None:
    a, b = loop.proxies["a"], loop.proxies["b"]
    version = a.status()["version"]
    with Traffic([a.port, b.port]) as traffic:
        wait_until(lambda: traffic.count() > 20, 10, "some traffic")
        kube.stop_apiserver()
        try:
            served = traffic.count()
            time.sleep(10)
            assert traffic.count() > served + 100, "traffic stalled while the API server was down"
            assert a.readyz() == b.readyz() == 200
        finally:
            kube.start_apiserver()
        # A change made after the restart reaches both replicas: their watches resumed.
        loop.apply(loop.key_doc("key-3", weight=5))
        for proxy in (a, b):
            proxy.wait_for(
                lambda p: p.status()["version"] > version,
                30,
                "watching again",
            )
    assert_all_ok(traffic.outcomes, "requests around the outage")
    assert {k["name"]: k["weight"] for k in b.status()["keys"]}["key-3"] == 5
    for proxy in (a, b):
        proxy.check_alive()
    assert loop.operator is not None
    loop.operator.check_alive()


def test_a_bad_table_is_rejected_and_the_last_good_one_served(loop: Loop) -> None:
    a, b = loop.proxies["a"], loop.proxies["b"]
    version = loop.settled([a, b])
    patch = {"data": {"table.json": '{"format": 1, "pool": "p", "keys": "not a list"}'}}
    loop.core.patch_namespaced_config_map(f"{POOL}-routing", loop.ns, patch)
    for proxy in (a, b):
        rejected = proxy.wait_for(
            lambda p: p.status().get("last_rejected"),
            10,
            "rejecting",
        )
        assert "rejected routing table" in rejected["reason"]
        assert proxy.status()["version"] == version
        assert_all_ok(burst(proxy.port, 20), f"requests through {proxy.name}")
    assert "rejected routing table" in a.text()
    # The operator watches its ConfigMap and repairs it at once, with a higher version and the
    # same content: the replicas have nothing to reload.
    good = a.status()["hash"]
    repaired = loop.wait_table(lambda t: t.version > version, 15, "the repaired table")
    assert repaired.hash == good
    for proxy in (a, b):
        assert proxy.status()["hash"] == good
        assert_all_ok(burst(proxy.port, 20), f"requests through {proxy.name} after the repair")


def test_not_ready_until_a_table_arrives(bare_loop: Loop) -> None:
    loop = bare_loop
    (proxy,) = loop.start_proxies(["a"], loop.proxy_kubeconfig())
    # No pool yet: the proxy waits for a table (10 s), then listens, not ready.
    proxy.wait_listening(timeout=30)
    code, body = (proxy.readyz(), proxy.status())
    assert code == 503
    assert body["ready"] is False
    assert "Forbidden" not in proxy.text()
    loop.apply_pool(values(2))
    loop.start_operator()
    proxy.wait_ready(timeout=30)
    assert_all_ok(burst(proxy.port, 10), "requests once the table arrived")
