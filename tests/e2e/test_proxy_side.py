"""The proxy's half of the health channel without a cluster (fast, no ``kube``): what a replica
reports (``Ledger``), how it applies the others' reports (``Peers`` + ``apply_entries``), and
that configuration never touches health (a table change keeps every cool-down; a table that
still carries the old ``state``/``cooldown_until`` fields changes nothing)."""

from __future__ import annotations

from sideproxy.models import KeyState, Provider, RoutingTable, TableKey, TableSettings, fingerprint
from sideproxy.pool import Key, KeyConfig, KeyHealth, ManagedCreditPool, Outcome, Transition
from sideproxy.proxy import POOL, RUNTIME, ProxySettings, Snapshot, create_app
from sideproxy.proxy._ledger import Ledger, Peers, apply_entries
from sideproxy.wire import Cooling, KeyReport, ReplicaReportSpec

NOW = 1_750_000_000.0
V1, V2, V3 = "sk-CANARY-proxy-side-1", "sk-CANARY-proxy-side-2", "sk-CANARY-proxy-side-3"
FP1, FP2 = fingerprint(V1), fingerprint(V2)


class Clock:
    now = NOW

    def __call__(self) -> float:
        return self.now


def limited(until: float, fp: str = FP1, name: str = "key-1") -> Transition:
    return Transition(name, fp, KeyHealth.COOLING, until, "RateLimited")


def pool_of(*values: str) -> ManagedCreditPool:
    return ManagedCreditPool(
        [KeyConfig(f"key-{i}", "custom", v) for i, v in enumerate(values, start=1)]
    )


def health(pool: ManagedCreditPool, name: str, now: float) -> tuple[str, float | None]:
    (status,) = [s for s in pool.statuses(now) if s.name == name]
    return status.health.value, status.until


# --------------------------------------------------------------------------- what a replica says


def test_the_report_says_what_this_replica_saw_and_only_news_asks_for_a_write() -> None:
    ledger = Ledger()
    pool = pool_of(V1, V2)
    assert ledger.record([limited(NOW + 30)]) is True
    # Concurrent 429s of the same window: nothing new, no write asked for.
    assert ledger.record([limited(NOW + 29), limited(NOW + 30)]) is False
    assert ledger.record([limited(NOW + 45)]) is True  # a later deadline is news
    spec = ledger.spec("p", "proxy-a-1", NOW, pool.statuses(NOW))
    assert spec.pool == "p"
    assert spec.replica == "proxy-a-1"
    assert spec.heartbeat == NOW
    assert spec.keys_reported == 1  # key-2 has nothing to say yet
    (entry,) = spec.keys
    assert entry.name == "key-1"
    assert entry.fingerprint == FP1
    assert entry.cooling == [Cooling(model="", until=NOW + 45)]
    assert not entry.revoked
    assert V1 not in spec.model_dump_json()


def take(pool: ManagedCreditPool, name: str, model: str | None = None) -> Key:
    """Acquire until ``name`` comes up (others are released OK)."""
    while (key := pool.acquire("custom", NOW, model=model)) is not None and key.name != name:
        pool.release(key, Outcome.OK, NOW, model=model)
    assert key is not None
    return key


def test_a_per_model_429_is_reported_for_that_model_and_cools_only_it_elsewhere() -> None:
    ledger, here, there = Ledger(), pool_of(V1, V2), pool_of(V1, V2)
    key = take(here, "key-1", "big")
    changes = here.release(key, Outcome.RATE_LIMITED, NOW, {"retry-after": "30"}, model="big")
    assert ledger.record(changes)
    (entry,) = ledger.spec("p", "a", NOW, here.statuses(NOW)).keys
    assert entry.cooling == [Cooling(model="big", until=NOW + 30)]
    assert entry.counts.rate_limited == 1
    # The other replica: key-1 rests for "big" only; "small" still goes to it.
    assert apply_entries(there, [entry], {"key-1": FP1, "key-2": FP2}, NOW) == 1
    picks_big = {there.acquire("custom", NOW, model="big").name for _ in range(4)}  # type: ignore[union-attr]
    picks_small = {there.acquire("custom", NOW, model="small").name for _ in range(4)}  # type: ignore[union-attr]
    assert picks_big == {"key-2"}
    assert picks_small == {"key-1", "key-2"}


def test_revocation_exhaustion_breaker_and_recovery_travel_and_deadlines_expire() -> None:
    ledger, pool = Ledger(), pool_of(V1, V2)
    assert ledger.record(here := pool.release(take(pool, "key-2"), Outcome.UNAUTHORIZED, NOW))
    assert here[0].health is KeyHealth.REVOKED
    exhausted = pool.release(take(pool, "key-1"), Outcome.EXHAUSTED, NOW)
    assert ledger.record(exhausted)
    spec = ledger.spec("p", "a", NOW, pool.statuses(NOW))
    entries = {e.name: e for e in spec.keys}
    assert entries["key-2"].revoked
    assert entries["key-2"].counts.unauthorized == 1
    assert entries["key-1"].exhausted_until == exhausted[0].until
    assert entries["key-1"].counts.exhausted == 1
    # Applied elsewhere: the same key-wide states.
    there = pool_of(V1, V2)
    assert apply_entries(there, spec.keys, {"key-1": FP1, "key-2": FP2}, NOW) == 2
    assert health(there, "key-2", NOW)[0] == "revoked"
    assert health(there, "key-1", NOW)[0] == "exhausted"
    # A breaker deadline travels as a key-wide rest and says nothing once it is over.
    assert ledger.record([Transition("key-1", FP1, KeyHealth.OPEN, NOW + 10, "CircuitOpen")])
    assert next(e for e in ledger.spec("p", "a", NOW, pool.statuses(NOW)).keys
                if e.name == "key-1").breaker_open_until == NOW + 10  # fmt: skip
    later = NOW + 11
    assert next(e for e in ledger.spec("p", "a", later, pool.statuses(later)).keys
                if e.name == "key-1").breaker_open_until is None  # fmt: skip
    # A successful probe of the revoked key: the report stops saying so.
    assert ledger.record([Transition("key-2", FP2, KeyHealth.READY, None, "Recovered")])
    spec = ledger.spec("p", "a", later, pool.statuses(later))
    assert not next(e for e in spec.keys if e.name == "key-2").revoked


def test_counters_are_cumulative_and_survive_a_rotation() -> None:
    ledger = Ledger()
    pool = pool_of(V1, V2)
    for _ in range(3):
        key = pool.acquire("custom", NOW)
        assert key is not None
        pool.release(key, Outcome.OK, NOW)
    key = pool.acquire("custom", NOW)
    assert key is not None
    ledger.record(pool.release(key, Outcome.RATE_LIMITED, NOW, {"retry-after": "5"}))
    before = {e.name: e.counts for e in ledger.spec("p", "a", NOW, pool.statuses(NOW)).keys}
    assert sum(c.requests for c in before.values()) == 4
    assert sum(c.rate_limited for c in before.values()) == 1
    # key-1 gets a new value: the pool's own counters for it start again; the report's do not.
    pool.configure([KeyConfig("key-1", "custom", V3), KeyConfig("key-2", "custom", V2)])
    after = {e.name: e.counts for e in ledger.spec("p", "a", NOW, pool.statuses(NOW)).keys}
    assert after == before


# --------------------------------------------------------------------------- what a replica takes


def entry(name: str = "key-1", fp: str = FP1, **fields: object) -> KeyReport:
    return KeyReport.model_validate({"name": name, "fingerprint": fp, **fields})


def report(*entries: KeyReport, replica: str = "b") -> ReplicaReportSpec:
    return ReplicaReportSpec(pool="p", replica=replica, heartbeat=NOW, keys=list(entries))


def test_another_replicas_cool_down_is_applied_and_only_ever_lengthens() -> None:
    pool = pool_of(V1, V2)
    fps = {"key-1": FP1, "key-2": FP2}
    cooling = [{"model": "", "until": NOW + 30}]
    assert apply_entries(pool, [entry(cooling=cooling)], fps, NOW) == 1
    assert health(pool, "key-1", NOW) == ("cooling", NOW + 30)
    shorter = [{"model": "", "until": NOW + 10}]
    assert apply_entries(pool, [entry(cooling=shorter)], fps, NOW) == 0
    assert health(pool, "key-1", NOW) == ("cooling", NOW + 30)
    assert apply_entries(pool, [entry("key-2", FP2, revoked=True)], fps, NOW) == 1
    assert health(pool, "key-2", NOW) == ("revoked", None)


def test_an_entry_about_another_value_or_an_unknown_key_changes_nothing() -> None:
    pool = pool_of(V1, V2)
    fps = {"key-1": FP1, "key-2": FP2}
    stale = entry(fp=fingerprint("sk-rotated-away"), revoked=True)
    gone = entry("key-9", fingerprint("sk-nine"), revoked=True)
    assert apply_entries(pool, [stale, gone], fps, NOW) == 0
    assert health(pool, "key-1", NOW) == ("ready", None)


def test_peers_hand_back_only_entries_whose_health_changed() -> None:
    peers = Peers()
    cooling = [{"model": "", "until": NOW + 30}]
    first = peers.update("p-b", report(entry(cooling=cooling), entry("key-2", FP2)))
    assert [e.name for e in first] == ["key-1", "key-2"]
    # A heartbeat that only moved the counters: nothing to apply.
    again = report(entry(cooling=cooling, counts={"requests": 9}), entry("key-2", FP2))
    assert peers.update("p-b", again) == []
    later = [{"model": "", "until": NOW + 60}]
    changed = peers.update("p-b", report(entry(cooling=later), entry("key-2", FP2)))
    assert [(e.name, e.cooling[0].until) for e in changed] == [("key-1", NOW + 60)]
    peers.remove("p-b")
    assert peers.entries() == []


# --------------------------------------------------------------------------- config is not health


def table(version: int, *keys: TableKey) -> RoutingTable:
    return RoutingTable(
        pool="p",
        version=version,
        settings=TableSettings(
            default_provider=Provider.CUSTOM,
            base_urls={Provider.CUSTOM: "http://127.0.0.1:9/v1"},
        ),
        keys=list(keys),
    ).sealed(version)


def key(name: str, value: str, weight: int = 1, **health: object) -> TableKey:
    return TableKey.model_validate(
        {
            "name": name,
            "provider": Provider.CUSTOM,
            "tier": 0,
            "weight": weight,
            "fingerprint": fingerprint(value),
            **health,
        }
    )


def test_a_table_never_changes_health_in_either_direction() -> None:
    clock = Clock()
    app = create_app(ProxySettings(), clock=clock)
    runtime, pool = app[RUNTIME], app[POOL]
    material = {"key-1": V1, "key-2": V2}
    assert runtime.apply(Snapshot(table(1, key("key-1", V1), key("key-2", V2)), material))

    # This replica sees a 429 on key-1: cooling for 30 s by its own knowledge.
    while (k := pool.acquire("custom", clock.now)) is not None and k.name != "key-1":
        pool.release(k, Outcome.OK, clock.now)
    assert k is not None
    pool.release(k, Outcome.RATE_LIMITED, clock.now, {"retry-after": "30"})
    assert health(pool, "key-1", clock.now) == ("cooling", NOW + 30)

    # A config change (another key's weight) keeps it cooling...
    assert runtime.apply(Snapshot(table(2, key("key-1", V1), key("key-2", V2, 5)), material))
    assert health(pool, "key-1", clock.now) == ("cooling", NOW + 30)
    # ...and a table from an older operator that still carries health is not health: it
    # neither lengthens nor revokes anything.
    old = table(
        3,
        key("key-1", V1, state=KeyState.COOLING, cooldown_until=NOW + 90),
        key("key-2", V2, state=KeyState.REVOKED),
    )
    assert runtime.apply(Snapshot(old, material))
    assert health(pool, "key-1", clock.now) == ("cooling", NOW + 30)
    assert health(pool, "key-2", clock.now) == ("ready", None)
    clock.now = NOW + 31
    assert health(pool, "key-1", clock.now) == ("ready", None)
