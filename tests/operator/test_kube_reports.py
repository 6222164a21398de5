"""ReplicaReports folded into PoolKey status on the real API server: exact counts whatever
happens to the leader, refusals said in the report, forged Events ignored (issues 16.1, 16.5,
16.7, 15.11).

The reports are written here as a proxy replica writes them (``sideproxy.wire.report_body``,
then merge patches of ``spec``) with the admin identity; the proxies' own writing is tested in
tests/e2e/test_health_channel.py.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from sideproxy.models import fingerprint
from sideproxy.wire import (
    PLURAL,
    STALE_AFTER_SECONDS,
    ReplicaReportSpec,
    report_body,
    report_name,
)
from tests.kube.harness import KubeCluster
from tests.operator.conftest import (
    GROUP,
    VERSION,
    Cluster,
    Operator,
    key_manifest,
    pool_manifest,
    secret_manifest,
)

pytestmark = pytest.mark.kube

N_KEYS = 30
VALUES = {f"k{i:02d}": f"gsk_CANARY_fold_{i:02d}" for i in range(N_KEYS)}


def pool_of_keys(cluster: Cluster) -> None:
    cluster.apply(
        [
            secret_manifest("many", VALUES),
            pool_manifest("p"),
            *(key_manifest(f"key-{n}", "p", "many", n) for n in VALUES),
        ]
    )
    cluster.wait(
        lambda: (t := cluster.table("p")) is not None and len(t.keys) == N_KEYS,
        timeout=60,
        what="table with every key",
    )


class Replica:
    """One proxy replica's ReplicaReport, with cumulative 429 counts per key."""

    def __init__(self, cluster: Cluster, name: str, incarnation: str | None = None) -> None:
        self.cluster = cluster
        self.replica = name
        self.name = report_name("p", name)
        self.incarnation = incarnation
        self.counts: dict[str, int] = {}

    def spec(self, heartbeat: float | None = None) -> dict[str, Any]:
        keys = [
            {"name": f"key-{n}", "fingerprint": fingerprint(VALUES[n]),
             "counts": {"rateLimited": c, "requests": c}}
            for n, c in sorted(self.counts.items())
        ]  # fmt: skip
        raw = {
            "pool": "p",
            "replica": self.replica,
            "incarnation": self.incarnation,
            "heartbeat": time.time() if heartbeat is None else heartbeat,
            "keys": keys,
        }
        return ReplicaReportSpec.model_validate(raw).dump()

    def create(self, heartbeat: float | None = None) -> str:
        """Create the report; its uid."""
        spec = ReplicaReportSpec.model_validate(self.spec(heartbeat))
        body = self.cluster.custom.create_namespaced_custom_object(
            GROUP, VERSION, self.cluster.ns, PLURAL, report_body(self.cluster.ns, spec)
        )
        return str(body["metadata"]["uid"])

    def count(self, names: list[str]) -> None:
        for n in names:
            self.counts[n] = self.counts.get(n, 0) + 1
        self.cluster.custom.patch_namespaced_custom_object(
            GROUP, VERSION, self.cluster.ns, PLURAL, self.name, {"spec": self.spec()}
        )


def counted(cluster: Cluster) -> dict[str, int]:
    items = cluster.custom.list_namespaced_custom_object(GROUP, VERSION, cluster.ns, "poolkeys")
    return {
        i["metadata"]["name"].removeprefix("key-"): (i.get("status") or {}).get(
            "rateLimitedCount", 0
        )
        for i in items["items"]
    }


def expected(replicas: list[Replica]) -> dict[str, int]:
    out = dict.fromkeys(VALUES, 0)
    for r in replicas:
        for n, c in r.counts.items():
            out[n] += c
    return out


def leader_of(ops: list[Operator]) -> Operator | None:
    return next((op for op in ops if op.proc and op.proc.poll() is None and op.leader()), None)


@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
def test_counts_are_exact_when_the_leader_dies_mid_burst(
    cluster: Cluster, operators: Callable[[str], Operator], how: str
) -> None:
    rng = random.Random(f"fold-{how}")
    ops = [operators("op-a").start(), operators("op-b").start()]
    for op in ops:
        op.wait_healthy()
    pool_of_keys(cluster)
    replicas = [Replica(cluster, f"r{i}") for i in range(3)]
    for r in replicas:
        r.create()

    kills = sorted(rng.sample(range(5, 55), 3))
    killed: list[str] = []

    one_at_a_time = threading.Lock()

    def kill_leader() -> None:
        with one_at_a_time:
            leader = cluster.wait(lambda: leader_of(ops), timeout=30, what="a leader")
            killed.append(leader.name)
            if how == "sigterm":
                assert leader.stop() == 0, leader.text()
            else:
                leader.kill()
            leader.start()  # back as a stand-by (or the leader, if it wins the Lease again)

    threads: list[threading.Thread] = []
    for step in range(60):
        replica = rng.choice(replicas)
        replica.count(rng.sample(list(VALUES), rng.randint(1, 8)))
        if step in kills:
            threads.append(threading.Thread(target=kill_leader))
            threads[-1].start()
        time.sleep(rng.uniform(0, 0.05))
    for thread in threads:
        thread.join(60)
    assert len(killed) == 3

    want = expected(replicas)
    cluster.wait(lambda: counted(cluster) == want, timeout=60, what="exact counts")
    # And they stay exact when yet another leader re-folds everything from scratch.
    kill_leader()
    cluster.wait(lambda: leader_of(ops), timeout=30, what="a leader again")
    replicas[0].count([])  # a fresh report write: the new leader folds the pool again
    cluster.wait(
        lambda: all(
            (s := cluster.status("poolkeys", f"key-{n}")).get("appliedReports") is not None
            and {m["report"] for m in s["appliedReports"]} >= {replicas[0].name}
            for n in replicas[0].counts
        ),
        timeout=30,
        what="the new leader's fold",
    )
    assert counted(cluster) == want

    # A replica that goes away: its marks fold into the base, the totals do not move.
    gone = replicas[2]
    cluster.custom.delete_namespaced_custom_object(GROUP, VERSION, cluster.ns, PLURAL, gone.name)
    cluster.wait(
        lambda: not any(
            gone.name in {m["report"] for m in cluster.status("poolkeys", f"key-{n}").get(
                "appliedReports") or []}
            for n in VALUES
        ),
        timeout=30,
        what="the deleted report's marks folded into the base",
    )  # fmt: skip
    assert counted(cluster) == want
    print(f"{how}: killed {killed}; {sum(want.values())} 429s counted exactly")


def test_a_report_deleted_as_stale_and_re_created_by_its_process_counts_each_429_once(
    cluster: Cluster, operator: Operator
) -> None:
    """A replica cut off from the API server for longer than the stale limit: the operator
    folds its report and deletes it; the same process (same incarnation, same cumulative
    counters) creates it again with more 429s. Each 429 is counted once. Then a restarted
    process under the same name (a new incarnation, counters from 0) is counted whole."""
    pool_of_keys(cluster)
    replica = Replica(cluster, "r1", incarnation="aaaa1111")
    replica.counts = {"k00": 3}
    first = replica.create(heartbeat=time.time() - STALE_AFTER_SECONDS - 30)

    def status() -> dict[str, Any]:
        return cluster.status("poolkeys", "key-k00")

    def mark() -> dict[str, Any]:
        return next(
            (m for m in status().get("appliedReports") or () if m["report"] == replica.name), {}
        )

    cluster.wait(lambda: status().get("rateLimitedCount") == 3, timeout=30, what="3 counted")
    cluster.wait(
        lambda: mark().get("goneSince") and mark()["uid"] == first,
        timeout=30,
        what="the stale report deleted and its mark waiting for its process",
    )
    assert replica.name not in {
        i["metadata"]["name"]
        for i in cluster.custom.list_namespaced_custom_object(GROUP, VERSION, cluster.ns, PLURAL)[
            "items"
        ]
    }
    assert status()["rateLimitedCount"] == 3

    replica.counts = {"k00": 5}  # two more since, on the same counters
    second = replica.create()
    cluster.wait(lambda: mark().get("uid") == second, timeout=30, what="the re-created report")
    assert status()["rateLimitedCount"] == 5
    assert "goneSince" not in mark()

    restarted = Replica(cluster, "r1", incarnation="bbbb2222")  # same name, counters from 0
    restarted.counts = {"k00": 4}
    restarted.count([])
    cluster.wait(
        lambda: mark().get("incarnation") == "bbbb2222", timeout=30, what="the new incarnation"
    )
    assert status()["rateLimitedCount"] == 9
    assert status()["reportsBase"]["rateLimited"] == 5


def test_refused_entries_are_said_in_the_report(cluster: Cluster, operator: Operator) -> None:
    pool_of_keys(cluster)
    replica = Replica(cluster, "r1")
    replica.counts = {"k00": 1}
    spec = replica.spec()
    spec["keys"].append({"name": "no-such-key", "fingerprint": "00000000"})
    cluster.custom.create_namespaced_custom_object(
        GROUP, VERSION, cluster.ns, PLURAL,
        report_body(cluster.ns, ReplicaReportSpec.model_validate(spec)),
    )  # fmt: skip

    def accepted() -> dict[str, Any] | None:
        body = cluster.custom.get_namespaced_custom_object(
            GROUP, VERSION, cluster.ns, PLURAL, replica.name
        )
        for cond in (body.get("status") or {}).get("conditions") or []:
            if cond["type"] == "Accepted":
                return dict(cond)
        return None

    cond = cluster.wait(accepted, timeout=30, what="Accepted condition on the report")
    assert (cond["status"], cond["reason"]) == ("False", "UnknownKey")
    assert "no-such-key" in cond["message"]


def test_forged_report_events_change_nothing(
    kube: KubeCluster, cluster: Cluster, operator: Operator
) -> None:
    """An identity that may create Events (and nothing of sideproxy.dev) posts Events shaped
    like the old proxy reports: no status moves, and it cannot write a ReplicaReport."""
    pool_of_keys(cluster)
    ns = cluster.ns
    cluster.kubectl("create", "serviceaccount", "forger")
    cluster.kubectl("create", "role", "forger", "--verb=create", "--resource=events")
    cluster.kubectl("create", "rolebinding", "forger", "--role=forger",
                    f"--serviceaccount={ns}:forger")  # fmt: skip
    forger = kube.service_account_kubeconfig(ns, "forger")
    before = {n: cluster.status("poolkeys", f"key-{n}") for n in ("k00", "k01")}
    for n in ("k00", "k01"):
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {
                "generateName": f"key-{n}.",
                "labels": {"sideproxy.dev/report": "true", "sideproxy.dev/pool": "p"},
                "annotations": {"sideproxy.dev/until": str(time.time() + 3600),
                                "sideproxy.dev/count": "1000",
                                "sideproxy.dev/fingerprint": fingerprint(VALUES[n])},
            },
            "involvedObject": {"apiVersion": f"{GROUP}/{VERSION}", "kind": "PoolKey",
                               "name": f"key-{n}", "namespace": ns},
            "reason": "Unauthorized" if n == "k00" else "RateLimited",
            "message": "forged",
            "type": "Warning",
        }  # fmt: skip
        kube.kubectl("create", "-n", ns, "-f", "-", kubeconfig=forger, input=json.dumps(event))
    forged = report_body(ns, ReplicaReportSpec.model_validate(
        {"pool": "p", "replica": "forger", "heartbeat": time.time(),
         "keys": [{"name": "key-00", "fingerprint": fingerprint(VALUES["k00"]), "revoked": True}]}
    ))  # fmt: skip
    refused = kube.kubectl(
        "create", "-n", ns, "-f", "-", kubeconfig=forger, check=False, input=json.dumps(forged)
    )
    assert refused.returncode != 0
    assert "forbidden" in refused.stderr.lower()
    # A real report after the forgeries: once it is folded, the forgeries had their chance.
    replica = Replica(cluster, "r1")
    replica.create()
    replica.count(["k02"])
    cluster.wait(
        lambda: cluster.status("poolkeys", "key-k02").get("rateLimitedCount") == 1,
        timeout=30,
        what="the real report folded",
    )
    for n, old in before.items():
        now = cluster.status("poolkeys", f"key-{n}")
        assert now.get("phase") == old.get("phase") == "Ready", (n, now)
        assert now.get("rateLimitedCount", 0) == old.get("rateLimitedCount", 0)
