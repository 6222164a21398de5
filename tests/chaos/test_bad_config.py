"""Bad configuration on the real API server: every CEL rule refused with its message; bad keys,
a pool without a usable key and a hand-edited routing ConfigMap each end in a clear condition and
Event on the right object while the rest of the pool keeps serving and no proxy loads a bad table.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from sideproxy.models import TABLE_DATA_KEY, routing_configmap_name
from tests.chaos.common import (
    assert_all_ok,
    canaries,
    condition,
    events_on,
    leaks,
    pool_status,
    start,
)
from tests.e2e.cluster import GROUP, POOL, SECRET, VERSION, Loop
from tests.e2e.procs import ProxyProc, Traffic, wait_until
from tests.kube.harness import KubeCluster

pytestmark = pytest.mark.kube

ROOT = Path(__file__).resolve().parents[2]


def cel_messages() -> list[str]:
    """Every ``x-kubernetes-validations`` message in crds/*.yaml."""
    found: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for rule in node.get("x-kubernetes-validations") or []:
                found.append(" ".join(rule["message"].split()))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    for path in sorted((ROOT / "crds").glob("*.yaml")):
        walk(yaml.safe_load(path.read_text()))
    return found


def pool_doc(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "CreditPool",
        "metadata": {"name": name},
        "spec": {"clientAuth": {"disabled": True}, **spec},
    }


# Cases for the rules examples/invalid/ does not exercise (tests/operator runs those files).
EXTRA_INVALID = {
    "pool-name-over-63": (
        pool_doc("p" * 64),
        "a CreditPool name has at most 63 characters",
    ),
    "report-misnamed": (
        {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "ReplicaReport",
            "metadata": {"name": "p-someone-else", "labels": {"sideproxy.dev/pool": "p"}},
            "spec": {"pool": "p", "replica": "r1", "heartbeat": 1.0},
        },
        "a ReplicaReport is named <spec.pool>-<spec.replica>",
    ),
}


def test_every_cel_rule_is_refused_with_its_message(
    kube: KubeCluster, crds: None, namespace: str, tmp_path: Path
) -> None:
    expected = [
        p.read_text().splitlines()[0].removeprefix("# expect: ")
        for p in sorted((ROOT / "examples" / "invalid").glob("*.yaml"))
    ]
    expected += [message for _, message in EXTRA_INVALID.values()]
    messages = cel_messages()
    assert len(messages) == 8, messages
    uncovered = [m for m in messages if not any(e in m for e in expected)]
    assert not uncovered, f"CEL rules no invalid case exercises: {uncovered}"
    for name, (doc, message) in EXTRA_INVALID.items():
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(doc))
        result = kube.kubectl("apply", "-n", namespace, "-f", str(path), check=False)
        assert result.returncode != 0, f"{name} was accepted"
        assert message in " ".join(result.stderr.split()), result.stderr
    # A name of exactly 63 characters is fine.
    ok = tmp_path / "pool-name-63.yaml"
    ok.write_text(yaml.safe_dump(pool_doc("p" * 63)))
    kube.kubectl("apply", "-n", namespace, "-f", str(ok))


def wait_key(loop: Loop, name: str, phase: str, timeout: float = 20) -> dict[str, Any]:
    status: dict[str, Any] = wait_until(
        lambda: (s := loop.key_status(name)).get("phase") == phase and s,
        timeout,
        f"PoolKey {name} {phase}",
    )
    return status


def wait_event(loop: Loop, kind: str, name: str, reason: str, timeout: float = 20) -> Any:
    return wait_until(
        lambda: [e for e in events_on(loop, kind, name) if e.reason == reason],
        timeout,
        f"a {reason} Event on {kind} {name}",
    )[0]


def test_bad_keys_are_conditions_and_events_while_the_rest_serves(bare_loop: Loop) -> None:
    loop = bare_loop
    keys = canaries(3, "bad")
    start(loop, keys, ["a"])
    a = loop.proxies["a"]
    good = a.status()
    assert len(good["keys"]) == 3
    with Traffic([a.port]) as traffic:
        wait_until(lambda: traffic.count() > 10, 10, "some traffic")
        secret = loop.secret_doc(keys)
        secret["stringData"]["empty"] = ""
        secret["stringData"]["blank"] = "   \n"
        loop.apply(
            [
                secret,
                loop.key_doc("key-empty", secretRef={"name": SECRET, "key": "empty"}),
                loop.key_doc("key-blank", secretRef={"name": SECRET, "key": "blank"}),
                loop.key_doc("key-same-ref", secretRef={"name": SECRET, "key": "key-1"}),
                {**loop.key_doc("key-orphan"), "spec": {**loop.key_doc("key-orphan")["spec"],
                                                         "pool": "nope"}},
                # A second pool whose only key is empty: zero usable keys.
                pool_doc("q", defaultProvider="custom",
                         providers=[{"name": "custom", "baseURL": loop.fake.base_url}]),
                {**loop.key_doc("q-empty", secretRef={"name": SECRET, "key": "empty"}),
                 "spec": {**loop.key_doc("q-empty", secretRef={"name": SECRET, "key": "empty"})[
                     "spec"], "pool": "q"}},
            ]
        )  # fmt: skip
        expect = {
            "key-empty": ("SecretNotResolved", f"Secret {SECRET!r} key 'empty' is empty"),
            "key-blank": ("SecretNotResolved", f"Secret {SECRET!r} key 'blank' is empty"),
            "key-same-ref": ("DuplicateKey", "holds the same key value as PoolKey 'key-1'"),
            "key-orphan": ("PoolNotFound", f"CreditPool 'nope' not found in namespace {loop.ns!r}"),
            "q-empty": ("SecretNotResolved", f"Secret {SECRET!r} key 'empty' is empty"),
        }
        for name, (reason, message) in expect.items():
            status = wait_key(loop, name, "Invalid")
            assert status["message"] == message, (name, status)
            ready = condition(status, "Ready")
            assert (ready["status"], ready["reason"]) == ("False", reason), (name, ready)
            if reason == "PoolNotFound":
                # One Event for the missing pool, on the CreditPool, not one per key.
                event = wait_event(loop, "CreditPool", "nope", reason)
                assert event.type == "Warning"
                assert event.message.startswith(message), event.message
                assert not [e for e in events_on(loop, "PoolKey", name) if e.reason == reason]
                continue
            event = wait_event(loop, "PoolKey", name, reason)
            assert (event.type, event.message) == ("Warning", message), name
        # The pool without a usable key says so, on the CreditPool.
        q = wait_until(
            lambda: (s := pool_status(loop, "q")) and condition(s, "Ready").get("reason") and s,
            20,
            "pool q's Ready condition",
        )
        ready = condition(q, "Ready")
        assert (ready["status"], ready["reason"]) == ("False", "NoUsableKey"), ready
        assert "no usable key" in ready["message"]
        event = wait_event(loop, "CreditPool", "q", "NoUsableKey")
        assert event.type == "Warning"
        assert "no usable key" in event.message
        # Pool p: the good keys only, still Ready; its table did not change at all.
        p = pool_status(loop, POOL)
        assert condition(p, "Ready")["status"] == "True", p
        assert (p["keysReady"], p["keysInvalid"]) == (3, 3), p
        table = loop.table()
        assert table is not None
        assert [k.name for k in table.keys] == list(keys)
        served = traffic.count()
        wait_until(lambda: traffic.count() > served + 20, 10, "traffic after the bad keys")
    assert_all_ok(traffic.outcomes, "requests while bad keys were added")
    assert a.status()["hash"] == good["hash"], "the proxy's table changed"
    assert {o.served_by for o in traffic.outcomes[-20:]} <= {loop.fp(k) for k in keys}
    assert not leaks(loop)


def new_rejection(proxy: ProxyProc, before: Any, what: str) -> dict[str, Any]:
    """Wait until ``proxy`` shows a ``last_rejected`` other than ``before``; it."""
    found: dict[str, Any] = proxy.wait_for(
        lambda p: (r := p.status().get("last_rejected")) != before and r,
        5,
        f"rejecting the {what} edit",
    )
    return found


def edit_table(loop: Loop, text: str) -> None:
    loop.core.patch_namespaced_config_map(
        routing_configmap_name(POOL), loop.ns, {"data": {TABLE_DATA_KEY: text}}
    )


def test_hand_edited_configmap_is_never_loaded_and_is_repaired(bare_loop: Loop) -> None:
    loop = bare_loop
    keys = canaries(3, "cm")
    # The default resync (300 s): the repair comes from the operator's watch of its ConfigMap.
    start(loop, keys, ["a", "b"])
    a, b = loop.proxies["a"], loop.proxies["b"]
    loop.settled([a, b])
    good_text = loop.table_text()
    assert good_text is not None
    good = json.loads(good_text)
    version, good_hash = a.status()["version"], a.status()["hash"]
    assert good_hash == good["hash"] == b.status()["hash"]

    wrong_hash = {**good, "hash": "0" * len(good["hash"])}
    bogus_fp = json.loads(good_text)
    bogus_fp["keys"][0]["fingerprint"] = "deadbeef"
    edits = {
        "invalid JSON": "{not json",
        "wrong hash": json.dumps(wrong_hash),
        "bogus fingerprint": json.dumps(bogus_fp),  # the hash no longer matches either
        "empty": "",
    }
    repairs = {}
    reasons: dict[str, str] = {}
    with Traffic([a.port, b.port]) as traffic:
        for what, text in edits.items():
            last = {p.name: p.status().get("last_rejected") for p in (a, b)}
            edit_table(loop, text)
            edited = time.monotonic()
            for proxy in (a, b):
                # Every replica sees the edit and rejects it; none loads it.
                rejected = new_rejection(proxy, last[proxy.name], what)
                reasons[what] = rejected["reason"]
                st = proxy.status()
                assert st["hash"] == good_hash, (what, proxy.name, st["hash"])
            repaired = loop.wait_table(lambda t: t.hash == good_hash, 10, f"{what} repaired")
            repairs[what] = time.monotonic() - edited
            assert repaired.version > version, what
            version = repaired.version
            for proxy in (a, b):
                # Same content under a higher version: nothing for a replica to reload.
                assert proxy.status()["hash"] == good_hash
        wait_until(lambda: traffic.count() > 50, 10, "traffic")
    assert_all_ok(traffic.outcomes, "requests while the ConfigMap was hand-edited")
    for proxy in (a, b):
        last_rejected = proxy.status().get("last_rejected")
        assert last_rejected, proxy.name
        assert "rejected routing table" in last_rejected["reason"], last_rejected
        assert proxy.status()["hash"] == good_hash
    assert "rejected routing table" in a.text()
    print("rejected:", reasons)
    print("repaired after (s):", {k: round(v, 2) for k, v in repairs.items()})
    assert not leaks(loop)
