"""The reconcile of one CreditPool: indices in, ConfigMap + Secret + statuses + Events out.

Level-triggered: every run reads the whole pool from the kopf indices, calls the pure
``translate()``, and writes only what differs from the cluster. So a restart, a missed event,
a second replica taking over or a timer firing all converge on the same result.

Our own status patches come back as watch events; :class:`Reconciler` remembers the
resourceVersion each patch produced, ignores the echo, and skips an object whose index entry
is still older than its last patch (the echo is on its way and will trigger a run).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

from sideproxy.models import (
    API_GROUP,
    API_VERSION,
    POOL_LABEL,
    TABLE_SIZE_LIMIT,
    VIRTUAL_KEYS_DATA_KEY,
    KeyPhase,
)
from sideproxy.operator._debounce import Debouncer, Outcome
from sideproxy.operator._kube import KubeApi, NotFound
from sideproxy.operator._leader import AlwaysLeader, Leadership
from sideproxy.operator._records import (
    KeyRecord,
    ObjectRef,
    PoolId,
    PoolRecord,
    SecretMeta,
    SecretUse,
)
from sideproxy.operator._secrets import SecretCache
from sideproxy.operator._status import (
    READY,
    TABLE_WRITTEN,
    Cond,
    PoolFacts,
    count_phases,
    key_event,
    pool_events,
    pool_status,
    rfc3339,
    status_of,
    status_patch,
)
from sideproxy.operator._tables import MANAGED_BY, Owner, TableWrite, write_table
from sideproxy.translate import KeyInput, KeyVerdict, PoolInput, Translation, translate

log = logging.getLogger("sideproxy.operator")

GROUP_VERSION = f"{API_GROUP}/{API_VERSION}"

SecretId = tuple[str, str]
_GV = {"group": API_GROUP, "version": API_VERSION}


@dataclass(frozen=True, slots=True)
class Indices:
    """Read-only views of the kopf indices (any Mapping works, e.g. plain dicts in tests)."""

    keys_by_pool: Mapping[PoolId, Collection[KeyRecord]]
    pools_by_name: Mapping[PoolId, Collection[PoolRecord]]
    key_refs_by_secret: Mapping[SecretId, Collection[SecretUse]]
    pool_refs_by_secret: Mapping[SecretId, Collection[SecretUse]]
    secret_meta: Mapping[SecretId, Collection[SecretMeta]]


@dataclass(frozen=True, slots=True)
class Options:
    quiet_seconds: float = 0.15
    max_delay_seconds: float = 2.0
    resync_seconds: float = 300.0
    write_concurrency: int = 16
    table_size_limit: int = TABLE_SIZE_LIMIT


def _first(values: Collection[Any] | None) -> Any:
    for value in values or ():
        return value
    return None


class Reconciler:
    def __init__(
        self,
        api: KubeApi,
        indices: Indices,
        *,
        leadership: Leadership | None = None,
        options: Options | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._api = api
        self._ix = indices
        self._leadership = leadership or AlwaysLeader()
        self._opt = options or Options()
        self._clock = clock
        self.secrets = SecretCache(api)
        self.workers: Debouncer[PoolId] = Debouncer(
            self.reconcile,
            quiet=self._opt.quiet_seconds,
            max_delay=self._opt.max_delay_seconds,
            resync=self._opt.resync_seconds,
            gate=self._leadership.wait_leading,
            clock=clock,
        )
        self._patched: dict[tuple[str, str, str], tuple[str, str]] = {}
        self._key_pool: dict[tuple[str, str], str] = {}
        self._reported: set[PoolId] = set()

    async def close(self) -> None:
        await self.workers.close()

    # -- triggers (from the kopf event handlers) ------------------------------------------

    def _echo(self, kind: str, ref: ObjectRef) -> bool:
        """Whether this event only reports our own last status patch."""
        slot = (kind, ref.namespace, ref.name)
        patched = self._patched.get(slot)
        if patched is not None and patched[1] == ref.resource_version:
            del self._patched[slot]
            return True
        return False

    def key_event(self, body: Mapping[str, Any], deleted: bool) -> None:
        record = KeyRecord.of(body)
        ref = record.ref
        slot = (ref.namespace, ref.name)
        previous = self._key_pool.pop(slot, None) if deleted else self._key_pool.get(slot)
        if deleted:
            self._patched.pop(("PoolKey", ref.namespace, ref.name), None)
        else:
            self._key_pool[slot] = record.pool
            if self._echo("PoolKey", ref):
                return
        if record.pool:
            self.workers.poke((ref.namespace, record.pool))
        if previous and previous != record.pool:
            self.workers.poke((ref.namespace, previous))

    def pool_event(self, body: Mapping[str, Any], deleted: bool) -> None:
        ref = ObjectRef.of("CreditPool", body)
        if deleted:
            self._patched.pop(("CreditPool", ref.namespace, ref.name), None)
        elif self._echo("CreditPool", ref):
            return
        self.workers.poke((ref.namespace, ref.name))

    def secret_event(self, body: Mapping[str, Any], deleted: bool) -> None:
        meta = body.get("metadata") or {}
        namespace, name = str(meta.get("namespace", "")), str(meta.get("name", ""))
        uses = [
            *self._ix.key_refs_by_secret.get((namespace, name), ()),
            *self._ix.pool_refs_by_secret.get((namespace, name), ()),
        ]
        labels = meta.get("labels") or {}
        if labels.get("app.kubernetes.io/managed-by") == MANAGED_BY and labels.get(POOL_LABEL):
            # One of our key-material Secrets: a hand edit or deletion gets repaired. (Our own
            # writes come back here too and cost one reconcile that finds nothing to do.)
            self.workers.poke((namespace, str(labels[POOL_LABEL])))
        if not uses:
            self.secrets.forget(namespace, name)
            return
        if deleted:
            self.secrets.forget(namespace, name)
        else:
            self.secrets.observe(namespace, name, body, {use.key for use in uses})
        for pool in sorted({use.pool for use in uses}):
            self.workers.poke((namespace, pool))

    def resync(self) -> None:
        """Reconcile everything the indices know (start of leadership)."""
        self._reported.clear()
        for pool_id in {*self._ix.pools_by_name.keys(), *self._ix.keys_by_pool.keys()}:
            self.workers.poke(pool_id)

    # -- the reconcile --------------------------------------------------------------------

    def _meta(self, namespace: str, name: str) -> SecretMeta | None:
        meta: SecretMeta | None = _first(self._ix.secret_meta.get((namespace, name)))
        return meta

    def _stale(self, kind: str, ref: ObjectRef) -> bool:
        patched = self._patched.get((kind, ref.namespace, ref.name))
        return patched is not None and patched[0] == ref.resource_version

    async def reconcile(self, pool_id: PoolId) -> Outcome:
        namespace, name = pool_id
        now = self._clock()
        stamp = rfc3339(now)
        keys = sorted(
            (k for k in self._ix.keys_by_pool.get(pool_id, ()) if k.ref.namespace == namespace),
            key=lambda k: k.name,
        )
        pool: PoolRecord | None = _first(self._ix.pools_by_name.get(pool_id))

        if pool is None:
            orphan = KeyVerdict(
                KeyPhase.INVALID,
                "PoolNotFound",
                f"CreditPool {name!r} not found in namespace {namespace!r}",
            )
            await self._write_keys(keys, {k.name: orphan for k in keys}, stamp)
            return Outcome(alive=bool(keys))

        if pool.spec is None:
            facts = PoolFacts(
                len(keys),
                0,
                0,
                0,
                Cond(READY, "False", "InvalidSpec", pool.spec_error),
                Cond(TABLE_WRITTEN, "False", "InvalidSpec", "not rewritten while spec is invalid"),
                pool.status.get("tableVersion"),
                pool.status.get("tableHash"),
            )
            await self._write_pool(pool, facts, stamp)
            return Outcome()

        verdicts: dict[str, KeyVerdict] = {}
        inputs: list[KeyInput] = []
        wanted: dict[str, set[str]] = {}
        for key in keys:
            if key.spec is None:
                verdicts[key.name] = KeyVerdict(KeyPhase.INVALID, "InvalidSpec", key.spec_error)
                continue
            inputs.append(KeyInput(key.name, key.spec, key.parsed_status(), key.ref.generation))
            if not key.spec.disabled:
                ref = key.spec.secret_ref
                wanted.setdefault(ref.name, set()).add(ref.key)
        auth = pool.spec.client_auth
        if not auth.disabled and auth.secret_ref is not None:
            wanted.setdefault(auth.secret_ref.name, set()).add(auth.secret_ref.key)

        secrets = await self.secrets.resolve(namespace, wanted, self._meta)
        translation = translate(PoolInput(name, namespace, pool.spec), inputs, secrets, now)
        del secrets
        verdicts.update(translation.verdicts)

        floor = pool.status.get("tableVersion")
        written = await write_table(
            self._api,
            Owner(namespace, name, pool.ref.uid),
            translation,
            floor_version=floor if isinstance(floor, int) else 0,
            size_limit=self._opt.table_size_limit,
        )
        statuses = await self._write_keys(keys, verdicts, stamp)
        statuses += await self._write_pool(pool, _facts(translation, verdicts, written), stamp)
        wrote = [
            *(["table"] if written.table_written else []),
            *(["key material"] if written.secret_written else []),
            *([f"{statuses} status(es)"] if statuses else []),
        ]
        if wrote or pool_id not in self._reported:
            # Once per pool per start (or leadership), then only when something was written.
            self._reported.add(pool_id)
            log.info(
                "pool %s/%s: table version %s (%s), %d of %d keys usable; %s",
                namespace,
                name,
                written.version,
                (written.hash or "")[:12],
                translation.usable_keys,
                len(keys),
                "wrote " + ", ".join(wrote) if wrote else "in sync",
            )
        deadlines = [k.cooldown_until for k in translation.table.keys if k.cooldown_until]
        return Outcome(deadline=min(deadlines) if deadlines else None)

    async def _write_keys(
        self, keys: list[KeyRecord], verdicts: Mapping[str, KeyVerdict], stamp: str
    ) -> int:
        """Patch the statuses that differ; the number patched."""
        gate = asyncio.Semaphore(self._opt.write_concurrency)

        async def one(key: KeyRecord) -> bool:
            verdict = verdicts.get(key.name)
            if verdict is None or self._stale("PoolKey", key.ref):
                return False
            where = "the Secret"
            if key.spec is not None:
                ref = key.spec.secret_ref
                where = f"Secret {ref.name!r} key {ref.key!r}"
            desired = status_of(verdict, key.status, key.ref.generation, stamp, where)
            patch = status_patch(key.status, desired)
            if not patch:
                return False
            event = key_event(verdict, key.status)
            async with gate:
                if event is not None:
                    await self._api.post_event(
                        key.ref.involved(GROUP_VERSION),
                        type_=event.type,
                        reason=event.reason,
                        message=event.message,
                    )
                try:
                    result = await self._api.patch_status(
                        "poolkeys", key.ref.namespace, key.name, patch, **_GV
                    )
                except NotFound:
                    return False  # deleted meanwhile; its deletion event triggers the next run
            self._remember("PoolKey", key.ref, result)
            return True

        outcomes = await asyncio.gather(*(one(k) for k in keys), return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        return sum(1 for outcome in outcomes if outcome is True)

    async def _write_pool(self, pool: PoolRecord, facts: PoolFacts, stamp: str) -> int:
        if self._stale("CreditPool", pool.ref):
            return 0
        desired = pool_status(facts, pool.status, pool.ref.generation, stamp)
        patch = status_patch(pool.status, desired)
        if not patch:
            return 0
        for event in pool_events(facts, pool.status):
            await self._api.post_event(
                pool.ref.involved(GROUP_VERSION),
                type_=event.type,
                reason=event.reason,
                message=event.message,
            )
        try:
            result = await self._api.patch_status(
                "creditpools", pool.ref.namespace, pool.ref.name, patch, **_GV
            )
        except NotFound:
            return 0
        self._remember("CreditPool", pool.ref, result)
        return 1

    def _remember(self, kind: str, ref: ObjectRef, result: Mapping[str, Any]) -> None:
        after = str((result.get("metadata") or {}).get("resourceVersion", ""))
        self._patched[(kind, ref.namespace, ref.name)] = (ref.resource_version, after)


def _facts(
    translation: Translation, verdicts: Mapping[str, KeyVerdict], written: TableWrite
) -> PoolFacts:
    total, ready, cooling, invalid = count_phases(verdicts)
    usable = translation.usable_keys
    # The size check of write_table() is the authoritative one (it measures the real version).
    problems = [p for p in translation.problems if not p.startswith("routing table is ")]
    table = written.condition
    auth_missing = (
        translation.table.settings.client_auth_required
        and VIRTUAL_KEYS_DATA_KEY not in translation.material
    )
    if table.status != "True":
        ready_cond = Cond(READY, "False", table.reason, "; ".join([table.message, *problems]))
    elif usable == 0:
        ready_cond = Cond(READY, "False", "NoUsableKey", "; ".join(problems))
    elif auth_missing:
        ready_cond = Cond(READY, "False", "ClientAuthNotResolved", "; ".join(problems))
    else:
        ready_cond = Cond(READY, "True", "Ready", f"{usable} of {total} keys in rotation")
    return PoolFacts(
        keys_total=total,
        keys_ready=ready,
        keys_cooling=cooling,
        keys_invalid=invalid,
        ready=ready_cond,
        table=table,
        table_version=written.version,
        table_hash=written.hash,
    )
