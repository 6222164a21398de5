"""1,000 PoolKeys cooling at once while a proxy serves the pool: the operator's writes stay
bounded, the table stays under the ConfigMap limit, and the proxy keeps answering.

Extends the operator-only
``tests/e2e/test_reports.py::test_a_thousand_keys_cooling_at_once_is_a_bounded_number_of_writes``
with a proxy replica serving the pool through the storm.
"""

from __future__ import annotations

import http.client
import statistics
import time

import pytest
import yaml

from sideproxy.models import TABLE_SIZE_LIMIT, KeyState
from tests.chaos.common import assert_all_ok, canaries, leaks
from tests.e2e.cluster import POOL, Loop
from tests.e2e.procs import Traffic, chat, wait_until
from tests.e2e.test_reports import limited, send, writes

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
        send(loop, *(limited(loop, name, 300) for name in names[:cooling]))
        table = loop.wait_table(
            lambda t: sum(k.state is KeyState.COOLING for k in t.keys) == cooling,
            60,
            "1,000 keys cooling in the table",
        )
        took = time.time() - started
        a.wait_for(
            lambda p: sum(k["health"] == "cooling" for k in p.status()["keys"]) == cooling,
            30,
            "the proxy honouring 1,000 cool-downs",
        )
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
    assert a.status()["hash"] == table.hash
    assert statistics.median(busy) < 1.0, busy  # generous: a figure, not a benchmark
    counted = writes(loop)
    table_writes = table.version - before.version
    print(
        f"1,000 reports: table cooling after {took:.1f}s in {table_writes} table writes; "
        f"table {size} bytes of {TABLE_SIZE_LIMIT}; writes {counted}; {len(traffic.outcomes)} "
        f"requests, p50 {statistics.median(idle) * 1000:.1f} ms idle -> "
        f"{statistics.median(busy) * 1000:.1f} ms with 1,000 keys cooling"
    )
    assert table_writes <= 10, table_writes
    assert counted["ConfigMap/update"] <= 12, counted
    assert counted["events/patch"] == cooling, counted
    assert counted["poolkeys/status"] <= 2 * len(names) + 50, counted
    assert not leaks(loop)
