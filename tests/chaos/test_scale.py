"""1,000 PoolKeys cooling at once while a proxy serves the pool: another replica's
ReplicaReport says so, the proxy honours it without a table write, the operator's status writes
stay bounded, and the proxy keeps answering.

The storm is one ReplicaReport written here as a replica writes it (``sideproxy.wire``).
"""

from __future__ import annotations

import http.client
import json
import statistics
import time

import pytest
import yaml

from sideproxy.models import TABLE_SIZE_LIMIT
from sideproxy.wire import PLURAL, ReplicaReportSpec, report_body
from tests.chaos.common import assert_all_ok, canaries, leaks
from tests.e2e.cluster import GROUP, POOL, VERSION, Loop
from tests.e2e.procs import Traffic, chat, wait_until

pytestmark = pytest.mark.kube


def latencies(port: int, n: int) -> list[float]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    took = []
    try:
        for _ in range(n):
            started = time.perf_counter()
            outcome = chat(conn)
            took.append(time.perf_counter() - started)
            assert outcome.status == 200, outcome
    finally:
        conn.close()
    return took


def writes(loop: Loop) -> dict[str, int]:
    """Stop the operator; the API writes it counted in this life (its last log line)."""
    assert loop.operator is not None
    assert loop.operator.stop() == 0, loop.operator.text()[-3000:]
    lines = [ln for ln in loop.operator.text().splitlines() if "API writes: " in ln]
    return dict(json.loads(lines[-1].split("API writes: ", 1)[1]))


def storm(loop: Loop, names: list[str], seconds: float) -> None:
    """Replica "storm" reports every one of ``names`` cooling for ``seconds``."""
    until = time.time() + seconds
    keys = [
        {"name": n, "fingerprint": loop.fp(n), "cooling": [{"model": "", "until": until}],
         "counts": {"rateLimited": 1, "requests": 1}}
        for n in names
    ]  # fmt: skip
    spec = ReplicaReportSpec.model_validate(
        {"pool": POOL, "replica": "storm", "heartbeat": time.time(), "keys": keys}
    )
    loop.custom.create_namespaced_custom_object(
        GROUP, VERSION, loop.ns, PLURAL, report_body(loop.ns, spec)
    )


def test_a_thousand_keys_cooling_while_a_proxy_serves(bare_loop: Loop) -> None:
    loop = bare_loop
    cooling, healthy = 1000, 8
    keys = canaries(cooling + healthy, "big")
    loop.secret_values = keys
    loop.canaries.update(keys.values())
    names = list(keys)
    pool = {
        "apiVersion": "sideproxy.dev/v1alpha1", "kind": "CreditPool", "metadata": {"name": POOL},
        "spec": {"defaultProvider": "custom", "clientAuth": {"disabled": True},
                 "providers": [{"name": "custom", "baseURL": loop.fake.base_url}]},
    }  # fmt: skip
    manifest = loop.workdir / "big.yaml"
    docs = [pool, loop.secret_doc(keys), *(loop.key_doc(name) for name in names)]
    manifest.write_text(yaml.safe_dump_all(docs))
    loop.kube.kubectl("create", "-n", loop.ns, "-f", str(manifest), "--request-timeout=120s")
    loop.start_operator()
    loop.wait_table(lambda t: len(t.keys) == len(names), 120, "a table of 1,008 keys")
    (a,) = loop.start_proxies(["a"], loop.proxy_kubeconfig())
    a.wait_ready(60)
    wait_until(
        lambda: all((i.get("status") or {}).get("phase") == "Ready" for i in loop.poolkeys()),
        120,
        "1,008 Ready keys",
        interval=1,
    )
    before = loop.table()
    assert before is not None
    assert len(a.status()["keys"]) == len(names)
    idle = latencies(a.port, 50)

    started = time.time()
    with Traffic([a.port], per_proxy=4) as traffic:
        storm(loop, names[:cooling], 300)
        a.wait_for(
            lambda p: sum(k["health"] == "cooling" for k in p.status()["keys"]) == cooling,
            30,
            "the proxy honouring 1,000 cool-downs",
        )
        took = time.time() - started
        wait_until(
            lambda: all(
                (i.get("status") or {}).get("phase") == "CoolingDown"
                for i in loop.poolkeys()
                if i["metadata"]["name"] in set(names[:cooling])
            ),
            120,
            "1,000 CoolingDown statuses",
            interval=1,
        )
        served = traffic.count()
        wait_until(lambda: traffic.count() > served + 20, 10, "traffic after the storm")
    assert_all_ok(traffic.outcomes, "requests through the 1,000-key storm")
    tail = {o.served_by for o in traffic.outcomes[-20:]}
    assert tail <= {loop.fp(n) for n in names[cooling:]}, "a cooling key served"
    busy = latencies(a.port, 50)
    size = len((loop.table_text() or "").encode())
    assert size < TABLE_SIZE_LIMIT, size
    table = loop.table()
    assert table is not None
    assert a.status()["hash"] == table.hash == before.hash  # health never rewrites the table
    assert statistics.median(busy) < 1.0, busy  # generous: a figure, not a benchmark
    counted = writes(loop)
    table_writes = table.version - before.version
    print(
        f"1,000 cool-downs: proxy cooling after {took:.1f}s, {table_writes} table writes; "
        f"table {size} bytes of {TABLE_SIZE_LIMIT}; writes {counted}; {len(traffic.outcomes)} "
        f"requests, p50 {statistics.median(idle) * 1000:.1f} ms idle -> "
        f"{statistics.median(busy) * 1000:.1f} ms with 1,000 keys cooling"
    )
    assert table_writes == 0, table_writes
    assert counted.get("ConfigMap/update", 0) == 0, counted
    assert counted["poolkeys/status"] <= 2 * len(names) + 50, counted
    assert not leaks(loop)
