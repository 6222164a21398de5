"""The reconcile of one CreditPool: indices in, ConfigMap + Secret + statuses + Events out.

Level-triggered: every run reads the whole pool from the kopf indices (pool, PoolKeys, the
pool's ReplicaReports), calls the pure ``translate()``, folds the reports into each key's
status (``_fold.py``) and writes only what differs from the cluster. So a restart, a missed
event, a second replica taking over or a timer firing all converge on the same result.

The routing table carries configuration only: health reaches the proxies on their own channel
(ReplicaReports, which they watch themselves), so no report ever rewrites the table.

Counts are exact under any leader change: a key's status patch that moves report counts names
the resourceVersion it was computed from (a ``Conflict`` means re-read and fold again), and the
fold is idempotent (high-water marks in the status itself).

Our own status patches come back as watch events; :class:`Reconciler` remembers the
resourceVersions each patch replaced and produced, ignores the echoes, and while a PoolKey's
index entry is still older than its last patch it reconciles from the object the patch
returned.

Failures are per key: a key whose status cannot be written (say an admission policy refuses
it) is named in the pool's ``KeysWritten`` condition and retried with back-off, while the pool
status and every other key are written as usual.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
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
from sideproxy.operator._fold import COUNTERS, Health, Source, fold_counts, health
from sideproxy.operator._kube import Conflict, KubeApi, NotFound, describe
from sideproxy.operator._leader import AlwaysLeader, Leadership
from sideproxy.operator._records import (
    KeyRecord,
    ObjectRef,
    PoolId,
    PoolRecord,
    ReportRecord,
    SecretUse,
    report_pool,
)
from sideproxy.operator._replicas import ReportDesk, Sorted, sort_reports
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
from sideproxy.operator._vkeys import UsageBook, VirtualKeyRecord, want_secrets
from sideproxy.operator._vkeys import inputs as vkey_inputs
from sideproxy.operator._vkeys import write_statuses as write_vkey_statuses
from sideproxy.translate import (
    KeyInput,
    KeyVerdict,
    PoolInput,
    Translation,
    routes_refused,
    translate,
)
from sideproxy.wire import ACCEPTED, InvalidReport

log = logging.getLogger("sideproxy.operator")

GROUP_VERSION = f"{API_GROUP}/{API_VERSION}"
KEYS_WRITTEN = "KeysWritten"

SecretId = tuple[str, str]
NOT_OWNED_RECHECK_SECONDS = 1.0
COUNT_FIELDS = frozenset({"appliedReports", "reportsBase", *(total for _, total in COUNTERS)})
_GV = {"group": API_GROUP, "version": API_VERSION}


@dataclass(frozen=True, slots=True)
class Indices:
    """Read-only views of the kopf indices (any Mapping works, e.g. plain dicts in tests)."""

    keys_by_pool: Mapping[PoolId, Collection[KeyRecord]]
    pools_by_name: Mapping[PoolId, Collection[PoolRecord]]
    key_refs_by_secret: Mapping[SecretId, Collection[SecretUse]]
    pool_refs_by_secret: Mapping[SecretId, Collection[SecretUse]]
    reports_by_pool: Mapping[PoolId, Collection[ReportRecord]]
    # VirtualKeys (issue 12, see _vkeys.py): by pool, and their Secret references.
    vkeys_by_pool: Mapping[PoolId, Collection[VirtualKeyRecord]] = field(default_factory=dict)
    vkey_refs_by_secret: Mapping[SecretId, Collection[SecretUse]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Options:
    quiet_seconds: float = 0.15
    max_delay_seconds: float = 2.0
    resync_seconds: float = 300.0
    write_concurrency: int = 16
    table_size_limit: int = TABLE_SIZE_LIMIT
    # A pool that disappears: wait this long before marking its keys orphaned (a namespace
    # deletion removes them meanwhile; a pool deleted and re-created needs no writes at all),
    # then write at most orphan_rate key statuses per second.
    orphan_grace_seconds: float = 5.0
    orphan_rate: int = 50
    retry_base_seconds: float = 0.5
    retry_max_seconds: float = 30.0


def _first(values: Collection[Any] | None) -> Any:
    for value in values or ():
        return value
    return None


@dataclass(slots=True)
class _Patched:
    """Our status patches of one object whose echo has not come back yet."""

    before: set[str]  # resourceVersions the object had before our patches (the index may show)
    after: str  # the resourceVersion our last patch produced
    fresh: KeyRecord | None  # the PoolKey as that patch returned it


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
        self.desk = ReportDesk(api, self._opt.write_concurrency)
        self.vkey_usage = UsageBook()
        self.workers: Debouncer[PoolId] = Debouncer(
            self.reconcile,
            quiet=self._opt.quiet_seconds,
            max_delay=self._opt.max_delay_seconds,
            resync=self._opt.resync_seconds,
            gate=self._leadership.wait_leading,
            clock=clock,
        )
        self._patched: dict[tuple[str, str, str], _Patched] = {}
        self._key_pool: dict[tuple[str, str], str] = {}
        self._reported: set[PoolId] = set()
        # resourceVersion of our last write of each ConfigMap / Secret we own, so the watch's
        # echo of it is not taken for a hand edit.
        self._written: dict[tuple[str, str, str], str] = {}
        # The highest table version written per pool: the floor of the next one, so a version
        # never goes backwards even when the ConfigMap is gone and the pool status is stale.
        self._versions: dict[PoolId, int] = {}
        self._pool_refs: dict[PoolId, ObjectRef] = {}  # for the Event when a pool is gone
        self._orphaned: dict[PoolId, float] = {}  # pool gone since (clock)
        self._announced: set[PoolId] = set()  # orphaned pools whose Event is posted
        self._failures: Counter[PoolId] = Counter()  # consecutive runs with failed key writes
        self._report_health: dict[tuple[str, str], str] = {}  # what each report last said

    async def close(self, grace: float = 0.0) -> None:
        """Stop; reconciles already running get ``grace`` seconds to finish first."""
        await self.workers.close(grace)

    # -- triggers (from the kopf event handlers and our own watches) ----------------------

    def _echo(self, kind: str, ref: ObjectRef) -> bool:
        """Whether this event only reports our own status patches."""
        slot = (kind, ref.namespace, ref.name)
        patched = self._patched.get(slot)
        if patched is None:
            return False
        if patched.after == ref.resource_version:
            del self._patched[slot]
            return True
        if ref.resource_version in patched.before:
            return True  # the echo of an earlier patch of ours; the last one is still on its way
        del self._patched[slot]  # someone else changed it: the index is the truth again
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

    def report_event(self, body: Mapping[str, Any], deleted: bool) -> None:
        """A ReplicaReport was listed, changed or deleted: its pool folds it (not urgently:
        the replicas learn health from the reports themselves; this is for ``kubectl``).

        Only a change of what the fold reads pokes the pool: a busy replica rewrites its report
        for heartbeats and virtual-key usage up to 10 times a second, and each of those would
        otherwise cost a whole-pool reconcile."""
        meta = body.get("metadata") or {}
        namespace = str(meta.get("namespace", "")) if isinstance(meta, Mapping) else ""
        slot = (namespace, str(meta.get("name", "")) if isinstance(meta, Mapping) else "")
        if deleted:
            self._report_health.pop(slot, None)
        else:
            health = _report_health(body)
            if self._report_health.get(slot) == health:
                return
            self._report_health[slot] = health
        self.workers.poke((namespace, report_pool(body)))

    def pool_event(self, body: Mapping[str, Any], deleted: bool) -> None:
        ref = ObjectRef.of("CreditPool", body)
        self._pool_refs[(ref.namespace, ref.name)] = ref
        if deleted:
            self._patched.pop(("CreditPool", ref.namespace, ref.name), None)
        elif self._echo("CreditPool", ref):
            return
        self.workers.poke((ref.namespace, ref.name))

    def secret_event(self, meta: Mapping[str, Any], deleted: bool) -> None:
        """A Secret's metadata from the watch (``_watch.py``; never its data)."""
        namespace, name = str(meta.get("namespace", "")), str(meta.get("name", ""))
        labels = meta.get("labels") or {}
        if labels.get("app.kubernetes.io/managed-by") == MANAGED_BY and labels.get(POOL_LABEL):
            # One of our key-material Secrets: a hand edit or deletion gets repaired.
            slot = ("Secret", namespace, name)
            self._owned_changed(slot, meta, str(labels[POOL_LABEL]), deleted)
        uses = [
            *self._ix.key_refs_by_secret.get((namespace, name), ()),
            *self._ix.pool_refs_by_secret.get((namespace, name), ()),
            *self._ix.vkey_refs_by_secret.get((namespace, name), ()),
        ]
        if not uses:
            self.secrets.forget(namespace, name)  # unrelated: nothing of it is kept
            return
        version = None if deleted else str(meta.get("resourceVersion", ""))
        if self.secrets.changed(namespace, name, version):
            for pool in sorted({use.pool for use in uses}):
                self.workers.poke((namespace, pool))

    def secrets_listed(self, namespace: str | None, listed: set[tuple[str, str]]) -> None:
        """A complete list of Secrets: the ones we tracked and that are not in it are gone."""
        for ns, name in self.secrets.tracked(namespace):
            if (ns, name) not in listed:
                self.secret_event({"namespace": ns, "name": name}, True)

    def configmap_event(self, meta: Mapping[str, Any], deleted: bool) -> None:
        """One of our routing ConfigMaps changed or went away (a watch by our label)."""
        labels = meta.get("labels") or {}
        pool = labels.get(POOL_LABEL)
        if pool:
            namespace, name = str(meta.get("namespace", "")), str(meta.get("name", ""))
            self._owned_changed(("ConfigMap", namespace, name), meta, str(pool), deleted)

    def _owned_changed(
        self, slot: tuple[str, str, str], meta: Mapping[str, Any], pool: str, deleted: bool
    ) -> None:
        """Repair what we own (slot: kind, namespace, name) unless the event is the echo of our
        own last write."""
        namespace = slot[1]
        version = str(meta.get("resourceVersion", ""))
        if not deleted and self._written.get(slot) == version:
            return
        # A plain poke: the echo of our own write can arrive before our write's answer (two
        # connections), and must not cost more than the usual batching.
        self.workers.poke((namespace, pool))

    def vkey_event(self, body: Mapping[str, Any], deleted: bool) -> None:
        """A VirtualKey changed: its pool reconciles (table entry, Ready condition)."""
        record = VirtualKeyRecord.of(body)
        if record.pool:
            self.workers.poke((record.ref.namespace, record.pool))

    async def report_usage(self, body: Mapping[str, Any], deleted: bool) -> None:
        """A ReplicaReport changed: its pool's VirtualKey usage, at a bounded rate."""
        pool = self.vkey_usage.report_event(body, deleted)
        now = self._clock()
        if pool is None or not self.vkey_usage.due(pool, now) or not self._leadership.leading:
            return
        await self.vkey_usage.write(self._api, pool, self._ix.vkeys_by_pool.get(pool, ()), now)

    def resync(self) -> None:
        """Reconcile everything the indices know (start of leadership)."""
        self._reported.clear()
        pools = {*self._ix.pools_by_name.keys(), *self._ix.keys_by_pool.keys()}
        pools |= set(self._ix.vkeys_by_pool.keys())
        for pool_id in {*pools, *self._ix.reports_by_pool.keys()}:
            self.workers.poke(pool_id)

    # -- the reconcile --------------------------------------------------------------------

    def _stale(self, kind: str, ref: ObjectRef) -> bool:
        patched = self._patched.get((kind, ref.namespace, ref.name))
        return patched is not None and ref.resource_version in patched.before

    def _current(self, key: KeyRecord) -> KeyRecord:
        """The newest state of a key we know: the index's, or what our last patch returned."""
        patched = self._patched.get(("PoolKey", key.ref.namespace, key.name))
        if patched is not None and patched.fresh is not None and self._stale("PoolKey", key.ref):
            return patched.fresh
        return key

    async def reconcile(self, pool_id: PoolId) -> Outcome:
        namespace, _name = pool_id
        now = self._clock()
        keys = sorted(
            (
                self._current(k)
                for k in self._ix.keys_by_pool.get(pool_id, ())
                if k.ref.namespace == namespace
            ),
            key=lambda k: k.name,
        )
        pool: PoolRecord | None = _first(self._ix.pools_by_name.get(pool_id))
        reports = list(self._ix.reports_by_pool.get(pool_id, ()))
        if pool is None:
            await write_vkey_statuses(self._api, self._vkeys(pool_id), {}, now)
            return await self._orphans(pool_id, keys, reports, now)
        self._orphaned.pop(pool_id, None)
        self._announced.discard(pool_id)
        # Routes that no key could serve refuse the spec like a CEL rule would (issue 13).
        spec_error = pool.spec_error
        if pool.spec is not None:
            spec_error = routes_refused(pool.spec, [k.spec for k in keys])
        if pool.spec is None or spec_error:
            facts = PoolFacts(
                len(keys),
                0,
                0,
                0,
                Cond(READY, "False", "InvalidSpec", spec_error),
                Cond(TABLE_WRITTEN, "False", "InvalidSpec", "not rewritten while spec is invalid"),
                pool.status.get("tableVersion"),
                pool.status.get("tableHash"),
            )
            await self._write_pool(pool, facts, rfc3339(now))
            return Outcome()
        return await self._serve(pool, keys, reports, now)

    async def _serve(
        self, pool: PoolRecord, keys: list[KeyRecord], reports: list[ReportRecord], now: float
    ) -> Outcome:
        assert pool.spec is not None
        namespace, name = pool_id = (pool.ref.namespace, pool.ref.name)
        stamp = rfc3339(now)
        judged = sort_reports(reports, keys, name, now)
        vkeys = self._vkeys(pool_id)
        translation = await self._translate(pool, keys, vkeys)
        written = await self._write_table(pool_id, pool, translation)
        await write_vkey_statuses(self._api, vkeys, translation.virtual_verdicts, now)
        verdicts, healths = self._health(pool, keys, translation, judged, now)
        marks = {  # a mark already known gone waits for its process (_fold.py): no look
            (str(m.get("report")), str(m.get("uid")))
            for k in keys
            for m in k.status.get("appliedReports") or ()
            if isinstance(m, Mapping) and not m.get("goneSince")
        }
        gone = await self.desk.gone(namespace, marks, judged.live)
        failed = await self._write_keys(
            keys, verdicts, healths, judged, gone=gone, stamp=stamp, now=now
        )
        facts = _facts(translation, verdicts, written, failed)
        statuses = await self._write_pool(pool, facts, stamp)
        await self.desk.judge(reports, judged.verdicts, now)
        deleted = 0 if failed else await self.desk.delete_stale(judged.stale)
        self._log(pool_id, translation, written, keys=len(keys), statuses=statuses, deleted=deleted)
        deadlines = [h.deadline for h in healths.values() if h.deadline is not None]
        deadlines += [judged.deadline] if judged.deadline is not None else []
        if written.condition.reason == "NotOwned":
            # Someone else's object is in the way; its deletion is no event of ours (it does
            # not carry our label), so look again each second until it is gone.
            deadlines.append(now + NOT_OWNED_RECHECK_SECONDS)
        if failed:
            self._failures[pool_id] += 1
            tries = self._failures[pool_id]
            delay = self._opt.retry_base_seconds * 2 ** min(tries - 1, 10)
            deadlines.append(now + min(self._opt.retry_max_seconds, delay))
        else:
            self._failures.pop(pool_id, None)
        return Outcome(deadline=min(deadlines) if deadlines else None)

    def _log(
        self,
        pool_id: PoolId,
        translation: Translation,
        written: TableWrite,
        *,
        keys: int,
        statuses: int,
        deleted: int,
    ) -> None:
        wrote = [
            *(["table"] if written.table_written else []),
            *(["key material"] if written.secret_written else []),
            *([f"{statuses} status(es)"] if statuses else []),
            *([f"deleted {deleted} stale report(s)"] if deleted else []),
        ]
        if wrote or pool_id not in self._reported:
            # Once per pool per start (or leadership), then only when something was written.
            self._reported.add(pool_id)
            log.info(
                "pool %s/%s: table version %s (%s), %d of %d keys usable; %s",
                *pool_id,
                written.version,
                (written.hash or "")[:12],
                translation.usable_keys,
                keys,
                "wrote " + ", ".join(wrote) if wrote else "in sync",
            )

    async def _write_table(
        self, pool_id: PoolId, pool: PoolRecord, translation: Translation
    ) -> TableWrite:
        namespace, name = pool_id
        floor = pool.status.get("tableVersion")
        floor = max(floor if isinstance(floor, int) else 0, self._versions.get(pool_id, 0))
        written = await write_table(
            self._api,
            Owner(namespace, name, pool.ref.uid),
            translation,
            floor_version=floor,
            size_limit=self._opt.table_size_limit,
        )
        for kind, obj, version in written.saved:
            self._written[(kind, namespace, obj)] = version
        if written.version is not None:
            self._versions[pool_id] = max(written.version, self._versions.get(pool_id, 0))
        return written

    def _vkeys(self, pool_id: PoolId) -> list[VirtualKeyRecord]:
        found = self._ix.vkeys_by_pool.get(pool_id, ())
        return [v for v in found if v.ref.namespace == pool_id[0]]

    async def _translate(
        self, pool: PoolRecord, keys: list[KeyRecord], vkeys: Collection[VirtualKeyRecord] = ()
    ) -> Translation:
        """translate() of the pool's configuration: no health (status) goes into the table."""
        assert pool.spec is not None
        namespace, name = pool.ref.namespace, pool.ref.name
        wanted: dict[str, set[str]] = {}
        for key in keys:
            if key.spec is not None and not key.spec.disabled:
                ref = key.spec.secret_ref
                wanted.setdefault(ref.name, set()).add(ref.key)
        auth = pool.spec.client_auth
        if not auth.disabled and auth.secret_ref is not None:
            wanted.setdefault(auth.secret_ref.name, set()).add(auth.secret_ref.key)
        want_secrets(vkeys, wanted)
        secrets = await self.secrets.resolve(namespace, wanted)
        inputs = [
            KeyInput(key.name, key.spec, None, key.ref.generation)
            for key in keys
            if key.spec is not None
        ]
        translation = translate(
            PoolInput(name, namespace, pool.spec, vkey_inputs(vkeys)),
            inputs,
            secrets,
            self._clock(),
        )
        del secrets
        for key in keys:
            if key.spec is None:
                translation.verdicts[key.name] = KeyVerdict(
                    KeyPhase.INVALID, "InvalidSpec", key.spec_error
                )
        return translation

    @staticmethod
    def _health(
        pool: PoolRecord,
        keys: Sequence[KeyRecord],
        translation: Translation,
        judged: Sorted,
        now: float,
    ) -> tuple[dict[str, KeyVerdict], dict[str, Health]]:
        """Each key's verdict with the reports' health over it (only for a key that would
        otherwise be Ready: a configuration problem comes first)."""
        assert pool.spec is not None
        verdicts = dict(translation.verdicts)
        healths: dict[str, Health] = {}
        for key in keys:
            verdict = verdicts.get(key.name)
            if verdict is None or verdict.phase is not KeyPhase.READY:
                continue
            found = health(judged.sources.get(key.name, []), verdict.fingerprint, pool.spec, now)
            healths[key.name] = found
            if found.phase is not None:
                verdicts[key.name] = KeyVerdict(
                    found.phase,
                    found.reason,
                    found.message,
                    verdict.fingerprint,
                    found.cooldown_until,
                )
        return verdicts, healths

    async def _orphans(
        self, pool_id: PoolId, keys: list[KeyRecord], reports: list[ReportRecord], now: float
    ) -> Outcome:
        """The pool is gone: one pool-level Event, then the keys marked at a bounded rate."""
        namespace, name = pool_id
        gone = Cond(ACCEPTED, "False", "PoolNotFound", f"no CreditPool {name!r} here")
        refusals = {
            r.name: Cond(ACCEPTED, "False", r.parsed.reason, r.parsed.message)
            if isinstance(r.parsed, InvalidReport)
            else gone
            for r in reports
        }
        await self.desk.judge(reports, refusals, now)
        live = [k for k in keys if not k.deleting]
        if not live:
            self._orphaned.pop(pool_id, None)
            return Outcome(alive=bool(keys or reports))
        since = self._orphaned.setdefault(pool_id, now)
        if now < since + self._opt.orphan_grace_seconds:
            return Outcome(deadline=since + self._opt.orphan_grace_seconds)
        message = f"CreditPool {name!r} not found in namespace {namespace!r}"
        if pool_id not in self._announced:
            self._announced.add(pool_id)
            ref = self._pool_refs.get(pool_id) or ObjectRef(
                "CreditPool", namespace, name, "", "", None
            )
            await self._api.post_event(
                ref.involved(GROUP_VERSION),
                type_="Warning",
                reason="PoolNotFound",
                message=f"{message}; its {len(live)} PoolKey(s) are Invalid until it returns",
            )
        orphan = KeyVerdict(KeyPhase.INVALID, "PoolNotFound", message)
        todo = [k for k in live if (k.status.get("phase"), k.status.get("message")) != (
            orphan.phase.value, orphan.message)]  # fmt: skip
        batch = todo[: self._opt.orphan_rate]
        verdicts = {k.name: orphan for k in batch}
        await self._write_keys(
            batch, verdicts, {}, None, gone=(), stamp=rfc3339(now), now=now, events=False
        )
        return Outcome(deadline=now + 1.0 if len(todo) > len(batch) else None)

    async def _write_keys(
        self,
        keys: Sequence[KeyRecord],
        verdicts: Mapping[str, KeyVerdict],
        healths: Mapping[str, Health],
        judged: Sorted | None,
        *,
        gone: Collection[str],
        stamp: str,
        now: float,
        events: bool = True,
    ) -> dict[str, str]:
        """Patch the statuses that differ. Each key on its own: the failures come back as
        {key name: why}, the others are written regardless."""

        async def one(key: KeyRecord | None) -> None:
            for _ in range(3):
                if key is None:
                    return  # deleted meanwhile
                sources = judged.sources.get(key.name, []) if judged is not None else []
                if await self._write_key(
                    key,
                    verdicts[key.name],
                    found=healths.get(key.name),
                    sources=sources,
                    gone=gone,
                    stamp=stamp,
                    now=now,
                    events=events,
                ):
                    return
                key = await self._reread(key)  # someone wrote it since we read it: fold again
            raise Conflict(f"PoolKey {key.name if key else ''} kept changing")

        todo = [k for k in keys if k.name in verdicts and not k.deleting]
        results = await asyncio.gather(*(one(k) for k in todo), return_exceptions=True)
        failed: dict[str, str] = {}
        for key, result in zip(todo, results, strict=True):
            if isinstance(result, asyncio.CancelledError):
                raise result
            if isinstance(result, BaseException):
                failed[key.name] = describe(result)
        if failed:
            log.warning("could not write the status of %d PoolKey(s): %s", len(failed),
                        "; ".join(f"{k}: {v}" for k, v in sorted(failed.items())[:5]))  # fmt: skip
        return failed

    async def _write_key(
        self,
        key: KeyRecord,
        verdict: KeyVerdict,
        *,
        found: Health | None,
        sources: Sequence[Source],
        gone: Collection[str],
        stamp: str,
        now: float,
        events: bool,
    ) -> bool:
        """One key's status patch; False on a conflict (re-read and try again)."""
        where = "the Secret"
        if key.spec is not None:
            ref = key.spec.secret_ref
            where = f"Secret {ref.name!r} key {ref.key!r}"
        desired = status_of(verdict, key.status, key.ref.generation, stamp, where)
        desired.update((found or Health()).fields())
        if key.spec is not None:
            desired.update(fold_counts(key.status, sources, gone, now=now))
        patch = status_patch(key.status, desired)
        if not patch:
            return True
        # A patch that moves counts applies only to the version it was computed from.
        counted = not COUNT_FIELDS.isdisjoint(patch)
        try:
            result = await self._api.patch_status(
                "poolkeys",
                key.ref.namespace,
                key.name,
                patch,
                **_GV,
                resource_version=key.ref.resource_version if counted else None,
            )
        except NotFound:
            return True  # deleted meanwhile; its deletion event triggers a run
        except Conflict:
            return False
        self._remember("PoolKey", key.ref, result)
        event = key_event(verdict, key.status) if events else None
        if event is not None:
            await self._api.post_event(
                key.ref.involved(GROUP_VERSION),
                type_=event.type,
                reason=event.reason,
                message=event.message,
            )
        return True

    async def _reread(self, key: KeyRecord) -> KeyRecord | None:
        body = await self._api.get_custom("poolkeys", key.ref.namespace, key.name, **_GV)
        return None if body is None else KeyRecord.of(body)

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
        slot = (kind, ref.namespace, ref.name)
        after = str((result.get("metadata") or {}).get("resourceVersion", ""))
        before = {ref.resource_version}
        previous = self._patched.get(slot)
        if previous is not None and ref.resource_version in {*previous.before, previous.after}:
            before |= previous.before | {previous.after}  # a chain of our patches
        fresh = KeyRecord.of(result) if kind == "PoolKey" else None
        self._patched[slot] = _Patched(before - {after}, after, fresh)


def _facts(
    translation: Translation,
    verdicts: Mapping[str, KeyVerdict],
    written: TableWrite,
    failed: Mapping[str, str],
) -> PoolFacts:
    total, ready, cooling, invalid = count_phases(verdicts)
    usable = sum(
        1
        for k in translation.table.keys
        if k.weight > 0 and (v := verdicts.get(k.name)) is not None and v.phase is KeyPhase.READY
    )
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
        extra=(_keys_written(failed),),
    )


def _keys_written(failed: Mapping[str, str]) -> Cond:
    if not failed:
        return Cond(KEYS_WRITTEN, "True", "Written", "every PoolKey status is current")
    names = sorted(failed)
    shown = ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
    first = failed[names[0]]
    return Cond(
        KEYS_WRITTEN,
        "False",
        "StatusWriteFailed",
        f"could not write the status of {len(names)} PoolKey(s): {shown} ({first}); retrying",
    )


# Report fields that change without changing what the fold reads (liveness and usage).
_REPORT_CHATTER = frozenset({"heartbeat", "usageHeartbeat", "virtualKeys", "windowSeconds"})


def _report_health(body: Mapping[str, Any]) -> str:
    """What the fold reads of a report, as one comparable string (its spec without chatter,
    its labels and whether it is being deleted)."""
    spec = body.get("spec")
    meta = body.get("metadata")
    meta = meta if isinstance(meta, Mapping) else {}
    return json.dumps(
        [
            {k: v for k, v in spec.items() if k not in _REPORT_CHATTER}
            if isinstance(spec, Mapping)
            else spec,
            meta.get("labels"),
            bool(meta.get("deletionTimestamp")),
        ],
        sort_keys=True,
        default=str,
    )
