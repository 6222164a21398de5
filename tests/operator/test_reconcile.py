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
from tests.operator.fakes import FakeKube, LiveIndices, key, pool, secret

NS = "team"
NOW = 1_750_000_000.0
CANARIES = ("gsk_CANARY_abc123", "gsk_CANARY_def456", "sk-CANARY_ghi789", "sp-CANARY_virtual")


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def kube() -> FakeKube:
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


def reconciler(kube: FakeKube, clock: Clock, **options: Any) -> Reconciler:
    return Reconciler(
        kube,
        LiveIndices(kube),
        options=Options(**options),
        clock=clock,  # type: ignore[arg-type]
    )


def table(kube: FakeKube, name: str = "p") -> RoutingTable:
    cm = kube.get("configmaps", NS, f"{name}-routing")
    assert cm is not None
    return RoutingTable.from_json(cm["data"][TABLE_DATA_KEY])


def material(kube: FakeKube, name: str = "p") -> dict[str, str]:
    sec = kube.get("secrets", NS, f"{name}-keys")
    assert sec is not None
    return {k: base64.b64decode(v).decode() for k, v in sec["data"].items()}


def status(kube: FakeKube, plural: str, name: str) -> dict[str, Any]:
    obj = kube.get(plural, NS, name)
    assert obj is not None
    return obj.get("status") or {}


def assert_no_canary(kube: FakeKube) -> None:
    for (plural, _, name), body in kube.objects.items():
        if plural == "secrets":
            continue  # the Secrets are where key values belong
        text = json.dumps(body)
        for canary in CANARIES:
            assert canary not in text, f"{plural}/{name} holds a key value"
            assert base64.b64encode(canary.encode()).decode() not in text
    for event in kube.events:
        for canary in CANARIES:
            assert canary not in json.dumps(event)


async def test_three_keys_make_a_table_a_secret_and_statuses(kube: FakeKube, clock: Clock) -> None:
    await reconciler(kube, clock).reconcile((NS, "p"))

    t = table(kube)
    assert t.version == 1
    assert [k.name for k in t.keys] == ["k-a", "k-b", "k-c"]
    assert [k.fingerprint for k in t.keys] == [fingerprint(c) for c in CANARIES[:3]]
    assert material(kube) == {"k-a": CANARIES[0], "k-b": CANARIES[1], "k-c": CANARIES[2]}
    cm = kube.get("configmaps", NS, "p-routing")
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

    st = status(kube, "poolkeys", "k-a")
    assert st["phase"] == "Ready"
    assert st["fingerprint"] == fingerprint(CANARIES[0])
    assert st["observedGeneration"] == 1
    assert {c["type"]: c["status"] for c in st["conditions"]} == {
        "Ready": "True",
        "SecretResolved": "True",
    }
    ps = status(kube, "creditpools", "p")
    assert ps["ready"] == "True"
    assert ps["keysSummary"] == "3/3"
    assert (ps["keysTotal"], ps["keysReady"], ps["keysCooling"], ps["keysInvalid"]) == (3, 3, 0, 0)
    assert ps["tableVersion"] == 1
    assert ps["tableHash"] == t.hash
    assert kube.events == []
    assert_no_canary(kube)


async def test_nothing_changed_means_nothing_written(kube: FakeKube, clock: Clock) -> None:
    rec = reconciler(kube, clock)
    await rec.reconcile((NS, "p"))
    writes = dict(kube.writes)
    clock.now += 60
    await rec.reconcile((NS, "p"))
    await reconciler(kube, clock).reconcile((NS, "p"))  # a restarted operator, too
    assert dict(kube.writes) == writes
    assert table(kube).version == 1


async def test_rotation_reaches_the_key_secret(kube: FakeKube, clock: Clock) -> None:
    rec = reconciler(kube, clock)
    await rec.reconcile((NS, "p"))
    kube.put("secrets", secret(NS, "groq", {"a": "gsk_CANARY_rotated", "b": CANARIES[1]}))
    await rec.reconcile((NS, "p"))
    assert material(kube)["k-a"] == "gsk_CANARY_rotated"
    assert table(kube).version == 2
    assert status(kube, "poolkeys", "k-a")["fingerprint"] == fingerprint("gsk_CANARY_rotated")


async def test_missing_secret_invalidates_only_that_key(kube: FakeKube, clock: Clock) -> None:
    kube.put("poolkeys", key(NS, "k-d", "p", "nope", "x"))
    kube.put("poolkeys", key(NS, "k-e", "p", "groq", "zzz"))
    await reconciler(kube, clock).reconcile((NS, "p"))

    assert [k.name for k in table(kube).keys] == ["k-a", "k-b", "k-c"]
    d = status(kube, "poolkeys", "k-d")
    assert d["phase"] == "Invalid"
    assert d["message"] == "Secret 'nope' not found"
    assert "fingerprint" not in d
    resolved = {c["type"]: c for c in d["conditions"]}["SecretResolved"]
    assert (resolved["status"], resolved["reason"]) == ("False", "SecretNotResolved")
    assert status(kube, "poolkeys", "k-e")["message"] == "Secret 'groq' has no key 'zzz'"
    warnings = {(e["involvedObject"]["name"], e["reason"], e["message"]) for e in kube.events}
    assert warnings == {
        ("k-d", "SecretNotResolved", "Secret 'nope' not found"),
        ("k-e", "SecretNotResolved", "Secret 'groq' has no key 'zzz'"),
    }
    assert all(e["type"] == "Warning" for e in kube.events)
    ps = status(kube, "creditpools", "p")
    assert (ps["ready"], ps["keysSummary"], ps["keysInvalid"]) == ("True", "3/5", 2)


async def test_secret_arriving_later_heals_the_key(kube: FakeKube, clock: Clock) -> None:
    kube.put("poolkeys", key(NS, "k-d", "p", "late", "x"))
    rec = reconciler(kube, clock)
    await rec.reconcile((NS, "p"))
    before = status(kube, "poolkeys", "k-d")["conditions"]
    clock.now += 10
    kube.put("secrets", secret(NS, "late", {"x": "gsk_CANARY_late"}))
    await rec.reconcile((NS, "p"))
    st = status(kube, "poolkeys", "k-d")
    assert st["phase"] == "Ready"
    ready = {c["type"]: c for c in st["conditions"]}["Ready"]
    assert ready["lastTransitionTime"] == rfc3339(clock.now)
    assert ready["lastTransitionTime"] != before[0]["lastTransitionTime"]
    assert kube.events[-1]["type"] == "Normal"
    assert "k-d" in material(kube)


async def test_deleted_key_leaves_the_table_at_once(kube: FakeKube, clock: Clock) -> None:
    rec = reconciler(kube, clock)
    await rec.reconcile((NS, "p"))
    del kube.objects[("poolkeys", NS, "k-b")]
    await rec.reconcile((NS, "p"))
    assert [k.name for k in table(kube).keys] == ["k-a", "k-c"]
    assert "k-b" not in material(kube)
    assert status(kube, "creditpools", "p")["keysSummary"] == "2/2"


async def test_cool_down_from_status_expires_by_itself(kube: FakeKube, clock: Clock) -> None:
    rec = reconciler(kube, clock)
    await rec.reconcile((NS, "p"))
    until = NOW + 30
    kube.objects[("poolkeys", NS, "k-a")]["status"]["cooldownUntil"] = rfc3339(until)
    outcome = await rec.reconcile((NS, "p"))

    assert outcome.deadline == until
    a = next(k for k in table(kube).keys if k.name == "k-a")
    assert (a.state, a.cooldown_until) == (KeyState.COOLING, until)
    st = status(kube, "poolkeys", "k-a")
    assert (st["phase"], st["cooldownUntil"]) == ("CoolingDown", rfc3339(until))
    assert status(kube, "creditpools", "p")["keysCooling"] == 1

    clock.now = until + 1
    outcome = await rec.reconcile((NS, "p"))
    assert outcome.deadline is None
    a = next(k for k in table(kube).keys if k.name == "k-a")
    assert (a.state, a.cooldown_until) == (KeyState.READY, None)
    st = status(kube, "poolkeys", "k-a")
    assert st["phase"] == "Ready"
    assert "cooldownUntil" not in st
    assert table(kube).version == 3


async def test_revoked_key_stays_out_until_its_value_changes(kube: FakeKube, clock: Clock) -> None:
    rec = reconciler(kube, clock)
    await rec.reconcile((NS, "p"))
    kube.objects[("poolkeys", NS, "k-b")]["status"]["phase"] = "Revoked"
    await rec.reconcile((NS, "p"))
    assert next(k for k in table(kube).keys if k.name == "k-b").state is KeyState.REVOKED
    assert kube.events[-1]["reason"] == "Unauthorized"
    kube.put("secrets", secret(NS, "groq", {"a": CANARIES[0], "b": "gsk_CANARY_new"}))
    await rec.reconcile((NS, "p"))
    assert next(k for k in table(kube).keys if k.name == "k-b").state is KeyState.READY
    assert status(kube, "poolkeys", "k-b")["phase"] == "Ready"


async def test_table_over_the_limit_is_a_condition_not_a_write(
    kube: FakeKube, clock: Clock
) -> None:
    await reconciler(kube, clock).reconcile((NS, "p"))
    kube.put("poolkeys", key(NS, "k-z" * 20, "p", "groq", "z", tier=5))
    kube.put("secrets", secret(NS, "groq", {"a": CANARIES[0], "b": CANARIES[1], "z": "gsk_z"}))
    size = len(table(kube).to_json())
    await reconciler(kube, clock, table_size_limit=size + 50).reconcile((NS, "p"))

    assert table(kube).version == 1  # the last good table stays
    ps = status(kube, "creditpools", "p")
    conds = {c["type"]: c for c in ps["conditions"]}
    assert (conds["TableWritten"]["status"], conds["TableWritten"]["reason"]) == (
        "False",
        "TableTooLarge",
    )
    assert "over the" in conds["TableWritten"]["message"]
    assert "proxies keep version 1" in conds["TableWritten"]["message"]
    assert (ps["ready"], conds["Ready"]["reason"]) == ("False", "TableTooLarge")
    assert ps["tableVersion"] == 1
    assert any(e["reason"] == "TableTooLarge" and e["type"] == "Warning" for e in kube.events)
    assert "k-z" * 20 not in material(kube)  # nor was the Secret touched


async def test_zero_usable_keys_is_reported(clock: Clock) -> None:
    kube = FakeKube()
    kube.put("creditpools", pool(NS, "empty"))
    kube.put("poolkeys", key(NS, "off", "empty", "none", "x", disabled=True))
    await reconciler(kube, clock).reconcile((NS, "empty"))
    ps = status(kube, "creditpools", "empty")
    ready = {c["type"]: c for c in ps["conditions"]}["Ready"]
    assert (ready["status"], ready["reason"]) == ("False", "NoUsableKey")
    assert status(kube, "poolkeys", "off")["phase"] == "Disabled"
    assert table(kube, "empty").keys == []
    assert [e["reason"] for e in kube.events] == ["NoUsableKey"]


async def test_client_auth_virtual_keys(kube: FakeKube, clock: Clock) -> None:
    spec = {"clientAuth": {"secretRef": {"name": "clients", "key": "list"}}}
    kube.put("creditpools", pool(NS, "p", spec))
    await reconciler(kube, clock).reconcile((NS, "p"))
    ready = {c["type"]: c for c in status(kube, "creditpools", "p")["conditions"]}["Ready"]
    assert ready["reason"] == "ClientAuthNotResolved"
    assert table(kube).settings.client_auth_required
    kube.put("secrets", secret(NS, "clients", {"list": CANARIES[3]}))
    await reconciler(kube, clock).reconcile((NS, "p"))
    assert material(kube)[VIRTUAL_KEYS_DATA_KEY] == CANARIES[3]
    assert status(kube, "creditpools", "p")["ready"] == "True"
    assert_no_canary(kube)


async def test_deleted_pool_leaves_its_keys_invalid(kube: FakeKube, clock: Clock) -> None:
    rec = reconciler(kube, clock)
    await rec.reconcile((NS, "p"))
    del kube.objects[("creditpools", NS, "p")]
    outcome = await rec.reconcile((NS, "p"))
    assert outcome.alive
    st = status(kube, "poolkeys", "k-a")
    assert (st["phase"], st["message"]) == (
        "Invalid",
        "CreditPool 'p' not found in namespace 'team'",
    )
    for name in ("k-a", "k-b", "k-c"):
        del kube.objects[("poolkeys", NS, name)]
    assert not (await rec.reconcile((NS, "p"))).alive


async def test_foreign_configmap_is_not_overwritten(kube: FakeKube, clock: Clock) -> None:
    kube.put(
        "configmaps",
        {"metadata": {"name": "p-routing", "namespace": NS}, "data": {"mine": "yes"}},
    )
    await reconciler(kube, clock).reconcile((NS, "p"))
    cm = kube.get("configmaps", NS, "p-routing")
    assert cm is not None
    assert cm["data"] == {"mine": "yes"}
    conds = {c["type"]: c for c in status(kube, "creditpools", "p")["conditions"]}
    assert conds["TableWritten"]["reason"] == "NotOwned"
    assert kube.get("secrets", NS, "p-keys") is None


async def test_versions_keep_rising_when_the_configmap_is_deleted(
    kube: FakeKube, clock: Clock
) -> None:
    rec = reconciler(kube, clock)
    await rec.reconcile((NS, "p"))
    kube.put("poolkeys", key(NS, "k-b", "p", "groq", "b", weight=7))
    await rec.reconcile((NS, "p"))
    assert table(kube).version == 2
    del kube.objects[("configmaps", NS, "p-routing")]
    await rec.reconcile((NS, "p"))
    assert table(kube).version == 3


async def test_conflict_propagates_for_a_retry(kube: FakeKube, clock: Clock) -> None:
    rec = reconciler(kube, clock)
    await rec.reconcile((NS, "p"))
    kube.put("poolkeys", key(NS, "k-b", "p", "groq", "b", weight=7))
    kube.fail_next["PUT"] = Conflict("someone else")
    with pytest.raises(Conflict):
        await rec.reconcile((NS, "p"))
    await rec.reconcile((NS, "p"))
    assert table(kube).version == 2


async def test_own_status_echo_does_not_trigger(kube: FakeKube, clock: Clock) -> None:
    rec = reconciler(kube, clock)
    await rec.reconcile((NS, "p"))
    poked: list[Any] = []
    rec.workers.poke = poked.append  # type: ignore[method-assign]
    echo = kube.get("poolkeys", NS, "k-a")
    assert echo is not None
    rec.key_event(echo, deleted=False)
    assert poked == []
    kube.put("poolkeys", key(NS, "k-a", "p", "groq", "a", weight=9))
    changed = kube.get("poolkeys", NS, "k-a")
    assert changed is not None
    rec.key_event(changed, deleted=False)
    assert poked == [(NS, "p")]


async def test_moving_a_key_pokes_both_pools(kube: FakeKube, clock: Clock) -> None:
    rec = reconciler(kube, clock)
    poked: list[Any] = []
    rec.workers.poke = poked.append  # type: ignore[method-assign]
    rec.key_event(key(NS, "k-a", "p", "groq", "a"), deleted=False)
    rec.key_event(key(NS, "k-a", "q", "groq", "a"), deleted=False)
    assert poked == [(NS, "p"), (NS, "q"), (NS, "p")]


async def test_secret_event_keeps_only_referenced_values(kube: FakeKube, clock: Clock) -> None:
    rec = reconciler(kube, clock)
    poked: list[Any] = []
    rec.workers.poke = poked.append  # type: ignore[method-assign]
    body = secret(NS, "groq", {"a": CANARIES[0], "b": CANARIES[1], "unused": "gsk_CANARY_x"})
    body["metadata"]["resourceVersion"] = "7"
    rec.secret_event(body, deleted=False)
    assert poked == [(NS, "p")]
    assert set(rec.secrets._entries[(NS, "groq")].values) == {"a", "b"}  # not "unused"
    unrelated = secret(NS, "other", {"x": "gsk_CANARY_y"})
    rec.secret_event(unrelated, deleted=False)
    assert poked == [(NS, "p")]
    assert len(rec.secrets) == 1
    assert "CANARY" not in repr(rec.secrets)
