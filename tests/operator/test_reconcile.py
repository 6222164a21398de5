"""The reconcile of one pool against an in-memory API server (tests/operator/fakes.py)."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from sideproxy.models import (
    TABLE_DATA_KEY,
    VIRTUAL_KEYS_DATA_KEY,
    KeyState,
    RoutingTable,
    fingerprint,
)
from sideproxy.operator._kube import Conflict
from sideproxy.operator._reconcile import Options, Reconciler
from sideproxy.operator._status import rfc3339
from tests.operator.fakes import FakeKube, LiveIndices, key, pool, report, secret

NS = "team"
NOW = 1_750_000_000.0
CANARIES = ("gsk_CANARY_abc123", "gsk_CANARY_def456", "sk-CANARY_ghi789", "sp-CANARY_virtual")


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def fake() -> FakeKube:
    k = FakeKube()
    k.put("secrets", secret(NS, "groq", {"a": CANARIES[0], "b": CANARIES[1]}))
    k.put("secrets", secret(NS, "openai", {"key": CANARIES[2]}))
    k.put("creditpools", pool(NS, "p"))
    k.put("poolkeys", key(NS, "k-a", "p", "groq", "a", weight=3))
    k.put("poolkeys", key(NS, "k-b", "p", "groq", "b"))
    k.put("poolkeys", key(NS, "k-c", "p", "openai", "key", provider="openai", tier=1))
    return k


@pytest.fixture
def clock() -> Clock:
    return Clock()


def reconciler(fake: FakeKube, clock: Clock, **options: Any) -> Reconciler:
    rec = Reconciler(
        fake,
        LiveIndices(fake),
        options=Options(**options),
        clock=clock,  # type: ignore[arg-type]
    )
    fake.secret_listeners.append(rec.secrets.changed)  # as the Secret metadata watch would
    return rec


def table(fake: FakeKube, name: str = "p") -> RoutingTable:
    cm = fake.get("configmaps", NS, f"{name}-routing")
    assert cm is not None
    return RoutingTable.from_json(cm["data"][TABLE_DATA_KEY])


def material(fake: FakeKube, name: str = "p") -> dict[str, str]:
    sec = fake.get("secrets", NS, f"{name}-keys")
    assert sec is not None
    return {k: base64.b64decode(v).decode() for k, v in sec["data"].items()}


def status(fake: FakeKube, plural: str, name: str) -> dict[str, Any]:
    obj = fake.get(plural, NS, name)
    assert obj is not None
    return obj.get("status") or {}


def assert_no_canary(fake: FakeKube) -> None:
    for (plural, _, name), body in fake.objects.items():
        if plural == "secrets":
            continue  # the Secrets are where key values belong
        text = json.dumps(body)
        for canary in CANARIES:
            assert canary not in text, f"{plural}/{name} holds a key value"
            assert base64.b64encode(canary.encode()).decode() not in text
    for event in fake.events:
        for canary in CANARIES:
            assert canary not in json.dumps(event)


async def test_three_keys_make_a_table_a_secret_and_statuses(fake: FakeKube, clock: Clock) -> None:
    await reconciler(fake, clock).reconcile((NS, "p"))

    t = table(fake)
    assert t.version == 1
    assert [k.name for k in t.keys] == ["k-a", "k-b", "k-c"]
    assert [k.fingerprint for k in t.keys] == [fingerprint(c) for c in CANARIES[:3]]
    assert material(fake) == {"k-a": CANARIES[0], "k-b": CANARIES[1], "k-c": CANARIES[2]}
    cm = fake.get("configmaps", NS, "p-routing")
    assert cm is not None
    owner = cm["metadata"]["ownerReferences"]
    assert owner == [
        {
            "apiVersion": "sideproxy.dev/v1alpha1",
            "kind": "CreditPool",
            "name": "p",
            "uid": "uid-p",
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]
    assert cm["metadata"]["labels"]["sideproxy.dev/pool"] == "p"
    assert cm["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "sideproxy-operator"

    st = status(fake, "poolkeys", "k-a")
    assert st["phase"] == "Ready"
    assert st["fingerprint"] == fingerprint(CANARIES[0])
    assert st["observedGeneration"] == 1
    assert {c["type"]: c["status"] for c in st["conditions"]} == {
        "Ready": "True",
        "SecretResolved": "True",
    }
    ps = status(fake, "creditpools", "p")
    assert ps["ready"] == "True"
    assert ps["keysSummary"] == "3/3"
    assert (ps["keysTotal"], ps["keysReady"], ps["keysCooling"], ps["keysInvalid"]) == (3, 3, 0, 0)
    assert ps["tableVersion"] == 1
    assert ps["tableHash"] == t.hash
    assert fake.events == []
    assert_no_canary(fake)


async def test_nothing_changed_means_nothing_written(fake: FakeKube, clock: Clock) -> None:
    rec = reconciler(fake, clock)
    await rec.reconcile((NS, "p"))
    writes = dict(fake.writes)
    clock.now += 60
    await rec.reconcile((NS, "p"))
    await reconciler(fake, clock).reconcile((NS, "p"))  # a restarted operator, too
    assert dict(fake.writes) == writes
    assert table(fake).version == 1


async def test_rotation_reaches_the_key_secret(fake: FakeKube, clock: Clock) -> None:
    rec = reconciler(fake, clock)
    await rec.reconcile((NS, "p"))
    fake.put("secrets", secret(NS, "groq", {"a": "gsk_CANARY_rotated", "b": CANARIES[1]}))
    await rec.reconcile((NS, "p"))
    assert material(fake)["k-a"] == "gsk_CANARY_rotated"
    assert table(fake).version == 2
    assert status(fake, "poolkeys", "k-a")["fingerprint"] == fingerprint("gsk_CANARY_rotated")


async def test_missing_secret_invalidates_only_that_key(fake: FakeKube, clock: Clock) -> None:
    fake.put("poolkeys", key(NS, "k-d", "p", "nope", "x"))
    fake.put("poolkeys", key(NS, "k-e", "p", "groq", "zzz"))
    await reconciler(fake, clock).reconcile((NS, "p"))

    assert [k.name for k in table(fake).keys] == ["k-a", "k-b", "k-c"]
    d = status(fake, "poolkeys", "k-d")
    assert d["phase"] == "Invalid"
    assert d["message"] == "Secret 'nope' not found"
    assert "fingerprint" not in d
    resolved = {c["type"]: c for c in d["conditions"]}["SecretResolved"]
    assert (resolved["status"], resolved["reason"]) == ("False", "SecretNotResolved")
    assert status(fake, "poolkeys", "k-e")["message"] == "Secret 'groq' has no key 'zzz'"
    warnings = {(e["involvedObject"]["name"], e["reason"], e["message"]) for e in fake.events}
    assert warnings == {
        ("k-d", "SecretNotResolved", "Secret 'nope' not found"),
        ("k-e", "SecretNotResolved", "Secret 'groq' has no key 'zzz'"),
    }
    assert all(e["type"] == "Warning" for e in fake.events)
    ps = status(fake, "creditpools", "p")
    assert (ps["ready"], ps["keysSummary"], ps["keysInvalid"]) == ("True", "3/5", 2)


async def test_secret_arriving_later_heals_the_key(fake: FakeKube, clock: Clock) -> None:
    fake.put("poolkeys", key(NS, "k-d", "p", "late", "x"))
    rec = reconciler(fake, clock)
    await rec.reconcile((NS, "p"))
    before = status(fake, "poolkeys", "k-d")["conditions"]
    clock.now += 10
    fake.put("secrets", secret(NS, "late", {"x": "gsk_CANARY_late"}))
    await rec.reconcile((NS, "p"))
    st = status(fake, "poolkeys", "k-d")
    assert st["phase"] == "Ready"
    ready = {c["type"]: c for c in st["conditions"]}["Ready"]
    assert ready["lastTransitionTime"] == rfc3339(clock.now)
    assert ready["lastTransitionTime"] != before[0]["lastTransitionTime"]
    assert fake.events[-1]["type"] == "Normal"
    assert "k-d" in material(fake)


async def test_deleted_key_leaves_the_table_at_once(fake: FakeKube, clock: Clock) -> None:
    rec = reconciler(fake, clock)
    await rec.reconcile((NS, "p"))
    del fake.objects[("poolkeys", NS, "k-b")]
    await rec.reconcile((NS, "p"))
    assert [k.name for k in table(fake).keys] == ["k-a", "k-c"]
    assert "k-b" not in material(fake)
    assert status(fake, "creditpools", "p")["keysSummary"] == "2/2"


def entry(name: str, value: str, **fields: Any) -> dict[str, Any]:
    """One key entry of a ReplicaReport about ``value``."""
    return {"name": name, "fingerprint": fingerprint(value), **fields}


async def test_a_reported_cool_down_is_status_not_table_and_expires(
    fake: FakeKube, clock: Clock
) -> None:
    rec = reconciler(fake, clock)
    await rec.reconcile((NS, "p"))
    until = NOW + 30
    cooling = [{"model": "", "until": until}, {"model": "big", "until": NOW + 10}]
    fake.put("replicareports", report(NS, "p", "r1", [entry("k-a", CANARIES[0], cooling=cooling,
             counts={"rateLimited": 2})], heartbeat=NOW))  # fmt: skip
    outcome = await rec.reconcile((NS, "p"))

    assert outcome.deadline == NOW + 10  # the earliest deadline: "big" ends first
    assert table(fake).version == 1  # health never rewrites the table
    a = next(k for k in table(fake).keys if k.name == "k-a")
    assert (a.state, a.cooldown_until) == (KeyState.READY, None)
    st = status(fake, "poolkeys", "k-a")
    assert (st["phase"], st["cooldownUntil"], st["cooling"]) == (
        "CoolingDown",
        rfc3339(until).replace("Z", ".000Z"),
        "all models",
    )
    assert st["coolingModels"] == [
        {"model": "big", "until": rfc3339(NOW + 10).replace("Z", ".000Z")}
    ]
    assert st["rateLimitedCount"] == 2
    assert status(fake, "creditpools", "p")["keysCooling"] == 1

    clock.now = until + 1
    outcome = await rec.reconcile((NS, "p"))
    st = status(fake, "poolkeys", "k-a")
    assert st["phase"] == "Ready"
    assert "cooldownUntil" not in st
    assert "coolingModels" not in st
    assert st["rateLimitedCount"] == 2  # counted once, though applied twice
    assert table(fake).version == 1


async def test_a_revoked_report_about_an_old_value_changes_nothing(
    fake: FakeKube, clock: Clock
) -> None:
    rec = reconciler(fake, clock)
    await rec.reconcile((NS, "p"))
    fake.put("replicareports", report(NS, "p", "r1", [entry("k-b", CANARIES[1], revoked=True)],
                                      heartbeat=NOW))  # fmt: skip
    await rec.reconcile((NS, "p"))
    assert status(fake, "poolkeys", "k-b")["phase"] == "Revoked"
    assert fake.events[-1]["reason"] == "Unauthorized"
    assert next(k for k in table(fake).keys if k.name == "k-b").state is KeyState.READY
    fake.put("secrets", secret(NS, "groq", {"a": CANARIES[0], "b": "gsk_CANARY_new"}))
    await rec.reconcile((NS, "p"))
    assert status(fake, "poolkeys", "k-b")["phase"] == "Ready"


async def test_table_over_the_limit_is_a_condition_not_a_write(
    fake: FakeKube, clock: Clock
) -> None:
    await reconciler(fake, clock).reconcile((NS, "p"))
    fake.put("poolkeys", key(NS, "k-z" * 20, "p", "groq", "z", tier=5))
    fake.put("secrets", secret(NS, "groq", {"a": CANARIES[0], "b": CANARIES[1], "z": "gsk_z"}))
    size = len(table(fake).to_json())
    await reconciler(fake, clock, table_size_limit=size + 50).reconcile((NS, "p"))

    assert table(fake).version == 1  # the last good table stays
    ps = status(fake, "creditpools", "p")
    conds = {c["type"]: c for c in ps["conditions"]}
    assert (conds["TableWritten"]["status"], conds["TableWritten"]["reason"]) == (
        "False",
        "TableTooLarge",
    )
    assert "over the" in conds["TableWritten"]["message"]
    assert "proxies keep version 1" in conds["TableWritten"]["message"]
    assert (ps["ready"], conds["Ready"]["reason"]) == ("False", "TableTooLarge")
    assert ps["tableVersion"] == 1
    assert any(e["reason"] == "TableTooLarge" and e["type"] == "Warning" for e in fake.events)
    assert "k-z" * 20 not in material(fake)  # nor was the Secret touched


async def test_zero_usable_keys_is_reported(clock: Clock) -> None:
    fake = FakeKube()
    fake.put("creditpools", pool(NS, "empty"))
    fake.put("poolkeys", key(NS, "off", "empty", "none", "x", disabled=True))
    await reconciler(fake, clock).reconcile((NS, "empty"))
    ps = status(fake, "creditpools", "empty")
    ready = {c["type"]: c for c in ps["conditions"]}["Ready"]
    assert (ready["status"], ready["reason"]) == ("False", "NoUsableKey")
    assert status(fake, "poolkeys", "off")["phase"] == "Disabled"
    assert table(fake, "empty").keys == []
    assert [e["reason"] for e in fake.events] == ["NoUsableKey"]


async def test_client_auth_virtual_keys(fake: FakeKube, clock: Clock) -> None:
    spec = {"clientAuth": {"secretRef": {"name": "clients", "key": "list"}}}
    fake.put("creditpools", pool(NS, "p", spec))
    await reconciler(fake, clock).reconcile((NS, "p"))
    ready = {c["type"]: c for c in status(fake, "creditpools", "p")["conditions"]}["Ready"]
    assert ready["reason"] == "ClientAuthNotResolved"
    assert table(fake).settings.client_auth_required
    fake.put("secrets", secret(NS, "clients", {"list": CANARIES[3]}))
    await reconciler(fake, clock).reconcile((NS, "p"))
    assert material(fake)[VIRTUAL_KEYS_DATA_KEY] == CANARIES[3]
    assert status(fake, "creditpools", "p")["ready"] == "True"
    assert_no_canary(fake)


async def test_deleted_pool_leaves_its_keys_invalid(fake: FakeKube, clock: Clock) -> None:
    rec = reconciler(fake, clock, orphan_rate=2)
    await rec.reconcile((NS, "p"))
    events = len(fake.events)
    del fake.objects[("creditpools", NS, "p")]
    outcome = await rec.reconcile((NS, "p"))
    assert outcome.deadline == NOW + 5  # a grace period first: nothing written yet
    assert status(fake, "poolkeys", "k-a")["phase"] == "Ready"
    clock.now = NOW + 5
    outcome = await rec.reconcile((NS, "p"))
    assert outcome.deadline == clock.now + 1  # two keys per second: one more to go
    clock.now += 1
    await rec.reconcile((NS, "p"))
    for name in ("k-a", "k-b", "k-c"):
        st = status(fake, "poolkeys", name)
        assert (st["phase"], st["message"]) == (
            "Invalid",
            "CreditPool 'p' not found in namespace 'team'",
        )
    # One Event for the pool, none per key.
    assert [(e["involvedObject"]["kind"], e["reason"]) for e in fake.events[events:]] == [
        ("CreditPool", "PoolNotFound")
    ]
    for name in ("k-a", "k-b", "k-c"):
        del fake.objects[("poolkeys", NS, name)]
    assert not (await rec.reconcile((NS, "p"))).alive


async def test_foreign_configmap_is_not_overwritten(fake: FakeKube, clock: Clock) -> None:
    fake.put(
        "configmaps",
        {"metadata": {"name": "p-routing", "namespace": NS}, "data": {"mine": "yes"}},
    )
    await reconciler(fake, clock).reconcile((NS, "p"))
    cm = fake.get("configmaps", NS, "p-routing")
    assert cm is not None
    assert cm["data"] == {"mine": "yes"}
    conds = {c["type"]: c for c in status(fake, "creditpools", "p")["conditions"]}
    assert conds["TableWritten"]["reason"] == "NotOwned"
    assert fake.get("secrets", NS, "p-keys") is None


async def test_versions_keep_rising_when_the_configmap_is_deleted(
    fake: FakeKube, clock: Clock
) -> None:
    rec = reconciler(fake, clock)
    await rec.reconcile((NS, "p"))
    fake.put("poolkeys", key(NS, "k-b", "p", "groq", "b", weight=7))
    await rec.reconcile((NS, "p"))
    assert table(fake).version == 2
    del fake.objects[("configmaps", NS, "p-routing")]
    await rec.reconcile((NS, "p"))
    assert table(fake).version == 3


async def test_conflict_propagates_for_a_retry(fake: FakeKube, clock: Clock) -> None:
    rec = reconciler(fake, clock)
    await rec.reconcile((NS, "p"))
    fake.put("poolkeys", key(NS, "k-b", "p", "groq", "b", weight=7))
    fake.fail_next["PUT"] = Conflict("someone else")
    with pytest.raises(Conflict):
        await rec.reconcile((NS, "p"))
    await rec.reconcile((NS, "p"))
    assert table(fake).version == 2


async def test_own_status_echo_does_not_trigger(fake: FakeKube, clock: Clock) -> None:
    rec = reconciler(fake, clock)
    await rec.reconcile((NS, "p"))
    poked: list[Any] = []
    rec.workers.poke = poked.append  # type: ignore[method-assign]
    echo = fake.get("poolkeys", NS, "k-a")
    assert echo is not None
    rec.key_event(echo, deleted=False)
    assert poked == []
    fake.put("poolkeys", key(NS, "k-a", "p", "groq", "a", weight=9))
    changed = fake.get("poolkeys", NS, "k-a")
    assert changed is not None
    rec.key_event(changed, deleted=False)
    assert poked == [(NS, "p")]


async def test_moving_a_key_pokes_both_pools(fake: FakeKube, clock: Clock) -> None:
    rec = reconciler(fake, clock)
    poked: list[Any] = []
    rec.workers.poke = poked.append  # type: ignore[method-assign]
    rec.key_event(key(NS, "k-a", "p", "groq", "a"), deleted=False)
    rec.key_event(key(NS, "k-a", "q", "groq", "a"), deleted=False)
    assert poked == [(NS, "p"), (NS, "q"), (NS, "p")]


async def test_secret_event_keeps_only_referenced_values(fake: FakeKube, clock: Clock) -> None:
    rec = reconciler(fake, clock)
    poked: list[Any] = []
    rec.workers.poke = poked.append  # type: ignore[method-assign]
    await rec.reconcile((NS, "p"))
    fake.put("secrets", secret(NS, "groq", {**{k: CANARIES[i] for i, k in enumerate("ab")},
                                            "unused": "gsk_CANARY_x"}))  # fmt: skip
    meta = fake.objects[("secrets", NS, "groq")]["metadata"]
    rec.secret_event(meta, deleted=False)  # the watch: metadata only
    assert poked == [(NS, "p")]
    await rec.reconcile((NS, "p"))
    assert set(rec.secrets._entries[(NS, "groq")].values) == {"a", "b"}  # not "unused"
    fetches = rec.secrets.fetches
    fake.put("secrets", secret(NS, "other", {"x": "gsk_CANARY_y"}))
    rec.secret_event(fake.objects[("secrets", NS, "other")]["metadata"], deleted=False)
    assert poked == [(NS, "p")]
    assert rec.secrets.fetches == fetches  # an unrelated Secret is never read
    assert len(rec.secrets) == 2  # groq and openai, the referenced ones
    assert "CANARY" not in repr(rec.secrets)
    rec.secret_event(meta, deleted=False)  # the same version again: no news
    assert poked == [(NS, "p")]


async def test_key_material_over_the_limit_is_a_condition(fake: FakeKube, clock: Clock) -> None:
    await reconciler(fake, clock).reconcile((NS, "p"))
    size = len(table(fake).to_json())
    fake.put("secrets", secret(NS, "groq", {"a": "gsk_" + "x" * (size + 100), "b": CANARIES[1]}))
    await reconciler(fake, clock, table_size_limit=size + 50).reconcile((NS, "p"))
    conds = {c["type"]: c for c in status(fake, "creditpools", "p")["conditions"]}
    assert conds["TableWritten"]["reason"] == "KeyMaterialTooLarge"
    assert material(fake)["k-a"] == CANARIES[0]
    assert table(fake).version == 1


def _report(heartbeat: float, until: float | None, usage: int = 0) -> dict[str, Any]:
    cooling = [{"model": "m", "until": until}] if until is not None else []
    return {
        "apiVersion": "sideproxy.dev/v1alpha1",
        "kind": "ReplicaReport",
        "metadata": {"name": "p-r1", "namespace": NS, "labels": {"sideproxy.dev/pool": "p"}},
        "spec": {
            "pool": "p",
            "replica": "r1",
            "heartbeat": heartbeat,
            "usageHeartbeat": heartbeat,
            "virtualKeys": [{"name": "vk", "requests": usage}],
            "keys": [{"name": "k-a", "fingerprint": "0" * 8, "cooling": cooling}],
        },
    }


async def test_report_chatter_does_not_trigger(fake: FakeKube, clock: Clock) -> None:
    """Heartbeats and virtual-key usage rewrite a report many times a second: only a change of
    what the fold reads (its keys), a new report or a deletion pokes the pool."""
    rec = reconciler(fake, clock)
    poked: list[Any] = []
    rec.workers.poke = poked.append  # type: ignore[method-assign]
    rec.report_event(_report(100.0, None), deleted=False)
    assert poked == [(NS, "p")]  # a report seen for the first time
    rec.report_event(_report(130.0, None, usage=7), deleted=False)
    assert poked == [(NS, "p")]  # a heartbeat and usage only
    rec.report_event(_report(131.0, 200.0, usage=9), deleted=False)
    assert poked == [(NS, "p")] * 2  # a cool-down: the fold has something to do
    rec.report_event(_report(131.0, 200.0), deleted=True)
    assert poked == [(NS, "p")] * 3
