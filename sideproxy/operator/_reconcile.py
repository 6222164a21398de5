"""The reconcile of one CreditPool: indices in, ConfigMap + Secret + statuses + Events out.

Level-triggered: every run reads the whole pool from the kopf indices, calls the pure
``translate()``, and writes only what differs from the cluster. So a restart, a missed event,
a second replica taking over or a timer firing all converge on the same result.

Our own status patches come back as watch events; :class:`Reconciler` remembers the
resourceVersions each patch replaced and produced, ignores the echoes, and while a PoolKey's
index entry is still older than its last patch it reconciles from the object the patch
returned (so a report applied a moment ago is the base of the next one, never lost).

Proxy reports (``_reports.py``) arrive through :meth:`Reconciler.report_event`, wait in a
:class:`ReportBook`, and are applied by the next reconcile of the key's pool: merged into the
key's status before ``translate()`` (so the table carries the cool-down in the same run), the
status is written, then the Events are marked consumed. A report that moves the table hurries
that reconcile past the debounce (:meth:`Debouncer.hurry`); the table goes out first, before
any status, so the other replicas learn the cool-down as early as possible.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from sideproxy.models import (
    API_GROUP,
    API_VERSION,
    POOL_LABEL,
    TABLE_SIZE_LIMIT,
    VIRTUAL_KEYS_DATA_KEY,
    KeyPhase,
    KeyState,
    PoolKeyStatus,
    fingerprint,
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
from sideproxy.operator._reports import (
    COOLING_MESSAGES,
    Applied,
    Report,
    ReportBook,
    Taken,
    apply_reports,
    cooling_reason,
    urgent,
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
from sideproxy.operator._vkeys import UsageBook, VirtualKeyRecord, want_secrets
from sideproxy.operator._vkeys import inputs as vkey_inputs
from sideproxy.operator._vkeys import write_statuses as write_vkey_statuses
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
    report_quiet_seconds: float = 0.02


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


def _parse_status(status: Mapping[str, Any]) -> PoolKeyStatus | None:
    try:
        return PoolKeyStatus.model_validate(dict(status))
    except ValueError:
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
            urgent_quiet=self._opt.report_quiet_seconds,
            gate=self._leadership.wait_leading,
            clock=clock,
        )
        self.reports = ReportBook()
        self.vkey_usage = UsageBook()
        self._patched: dict[tuple[str, str, str], _Patched] = {}
        self._key_pool: dict[tuple[str, str], str] = {}
        # What the last table written said of each key: (revoked, cooldown_until).
        self._in_table: dict[tuple[str, str], tuple[bool, float | None]] = {}
        self._reported: set[PoolId] = set()
        # Report Events marked consumed per pool since its last log line.
        self._consumed: Counter[PoolId] = Counter()

    async def close(self) -> None:
        await self.workers.close()

    # -- triggers (from the kopf event handlers) ------------------------------------------

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
        if deleted:
            self._in_table.pop(slot, None)
        if record.pool:
            self.workers.poke((ref.namespace, record.pool))
        if previous and previous != record.pool:
            self.workers.poke((ref.namespace, previous))

    def report_event(self, body: Mapping[str, Any], deleted: bool) -> None:
        """A proxy report Event (label sideproxy.dev/report=true) was listed, added or left the
        watch (consumed, by us or another replica, or expired)."""
        report = Report.of(body)
        if report is None:
            return
        if deleted or report.consumed:
            self.reports.forget(report.uid)
            return
        slot = (report.namespace, report.key)
        pool = self._key_pool.get(slot) or report.pool
        if not pool:
            return  # a report about no known key of no pool: nothing it could change
        pool_id = (report.namespace, pool)
        if not self.reports.add(pool_id, report):
            return
        if urgent(report, self._in_table.get(slot), self._clock()):
            self.workers.hurry(pool_id)
        else:
            self.workers.poke(pool_id)

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
            *self._ix.vkey_refs_by_secret.get((namespace, name), ()),
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

    def vkey_event(self, body: Mapping[str, Any], deleted: bool) -> None:
        """A VirtualKey changed: its pool (and the one it left, via the index) reconciles."""
        record = VirtualKeyRecord.of(body)
        if record.pool:
            self.workers.poke((record.ref.namespace, record.pool))

    async def report_usage(self, body: Mapping[str, Any], deleted: bool) -> None:
        """A ReplicaReport changed: its pool's VirtualKey usage, at a bounded rate."""
        pool = self.vkey_usage.report_event(body, deleted)
        now = self._clock()
        if pool is None or not self.vkey_usage.due(pool, now):
            return
        if not self._leadership.leading:
            return
        await self.vkey_usage.write(self._api, pool, self._ix.vkeys_by_pool.get(pool, ()), now)

    def resync(self) -> None:
        """Reconcile everything the indices know (start of leadership)."""
        self._reported.clear()
        pools = {*self._ix.pools_by_name.keys(), *self._ix.keys_by_pool.keys()}
        for pool_id in pools | set(self._ix.vkeys_by_pool.keys()):
            self.workers.poke(pool_id)

    # -- the reconcile --------------------------------------------------------------------

    def _meta(self, namespace: str, name: str) -> SecretMeta | None:
        meta: SecretMeta | None = _first(self._ix.secret_meta.get((namespace, name)))
        return meta

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
        taken = self.reports.take(pool_id)
        try:
            return await self._reconcile(pool_id, taken)
        except BaseException:
            # Whatever was not applied yet goes back for the retry (``_write_keys`` took out
            # what it applied or handed back itself).
            self.reports.give_back(pool_id, [r for rs in taken.by_key.values() for r in rs])
            for report, key_uid in taken.marks:
                self.reports.to_mark(pool_id, [report], key_uid)
            raise

    async def _reconcile(self, pool_id: PoolId, taken: Taken) -> Outcome:
        namespace, name = pool_id
        now = self._clock()
        stamp = rfc3339(now)
        keys = sorted(
            (
                self._current(k)
                for k in self._ix.keys_by_pool.get(pool_id, ())
                if k.ref.namespace == namespace
            ),
            key=lambda k: k.name,
        )
        pool: PoolRecord | None = _first(self._ix.pools_by_name.get(pool_id))
        vkeys = [v for v in self._ix.vkeys_by_pool.get(pool_id, ()) if v.ref.namespace == namespace]

        if pool is None:
            await write_vkey_statuses(self._api, vkeys, {}, now)
            orphan = KeyVerdict(
                KeyPhase.INVALID,
                "PoolNotFound",
                f"CreditPool {name!r} not found in namespace {namespace!r}",
            )
            await self._write_keys(keys, {k.name: orphan for k in keys}, stamp)
            await self._drop_reports(pool_id, taken, keys)
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
            await self._drop_reports(pool_id, taken, keys)
            return Outcome()

        translation, verdicts, applied = await self._translate(pool, keys, taken, now, vkeys)
        floor = pool.status.get("tableVersion")
        written = await write_table(
            self._api,
            Owner(namespace, name, pool.ref.uid),
            translation,
            floor_version=floor if isinstance(floor, int) else 0,
            size_limit=self._opt.table_size_limit,
        )
        if written.table_written or written.condition.status == "True":
            for entry in translation.table.keys:
                self._in_table[(namespace, entry.name)] = (
                    entry.state is KeyState.REVOKED,
                    entry.cooldown_until,
                )
        # From here on the reports are applied key by key: _write_keys hands back its failures.
        known = {k.name for k in keys}
        stray = [r for key, rs in taken.by_key.items() if key not in known for r in rs]
        taken.by_key = {}
        statuses = await self._write_keys(keys, verdicts, stamp, applied, pool_id)
        statuses += await write_vkey_statuses(self._api, vkeys, translation.virtual_verdicts, now)
        statuses += await self._write_pool(pool, _facts(translation, verdicts, written), stamp)
        marks, taken.marks = taken.marks, []
        await self._mark(pool_id, [(r, "") for r in stray] + marks)
        consumed = self._consumed.pop(pool_id, 0)
        wrote = [
            *(["table"] if written.table_written else []),
            *(["key material"] if written.secret_written else []),
            *([f"{statuses} status(es)"] if statuses else []),
            *([f"{consumed} report(s) consumed"] if consumed else []),
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

    async def _translate(
        self,
        pool: PoolRecord,
        keys: list[KeyRecord],
        taken: Taken,
        now: float,
        vkeys: Collection[VirtualKeyRecord] = (),
    ) -> tuple[Translation, dict[str, KeyVerdict], dict[str, Applied]]:
        """translate() of the pool, with the taken reports merged into their keys' status."""
        assert pool.spec is not None
        namespace, name = pool.ref.namespace, pool.ref.name
        verdicts: dict[str, KeyVerdict] = {}
        wanted: dict[str, set[str]] = {}
        for key in keys:
            if key.spec is None:
                verdicts[key.name] = KeyVerdict(KeyPhase.INVALID, "InvalidSpec", key.spec_error)
                continue
            if not key.spec.disabled:
                ref = key.spec.secret_ref
                wanted.setdefault(ref.name, set()).add(ref.key)
        auth = pool.spec.client_auth
        if not auth.disabled and auth.secret_ref is not None:
            wanted.setdefault(auth.secret_ref.name, set()).add(auth.secret_ref.key)
        want_secrets(vkeys, wanted)

        secrets = await self.secrets.resolve(namespace, wanted, self._meta)
        applied: dict[str, Applied] = {}
        inputs: list[KeyInput] = []
        for key in keys:
            if key.spec is None:
                continue
            status = key.parsed_status()
            reports = taken.by_key.get(key.name)
            if reports:
                ref = key.spec.secret_ref
                value = (secrets.get(ref.name) or {}).get(ref.key, "").strip()
                result = apply_reports(
                    key.status,
                    reports,
                    fingerprint=fingerprint(value) if value and not key.spec.disabled else None,
                    generation=key.ref.generation,
                    spec=pool.spec,
                    now=now,
                )
                applied[key.name] = result
                status = _parse_status(result.status)
            inputs.append(KeyInput(key.name, key.spec, status, key.ref.generation))
        pool_input = PoolInput(name, namespace, pool.spec, vkey_inputs(vkeys))
        translation = translate(pool_input, inputs, secrets, now)
        del secrets
        verdicts.update(_cooling_reasons(translation.verdicts, keys, applied))
        return translation, verdicts, applied

    async def _drop_reports(self, pool_id: PoolId, taken: Taken, keys: list[KeyRecord]) -> None:
        """Reports for a pool that cannot serve (gone, invalid spec): consumed, not applied."""
        uids = {k.name: k.ref.uid for k in keys}
        marks = [(r, uids.get(r.key, "")) for rs in taken.by_key.values() for r in rs]
        taken.by_key = {}
        marks += taken.marks
        taken.marks = []
        await self._mark(pool_id, marks)
        self._consumed.pop(pool_id, None)

    async def _mark(self, pool_id: PoolId, marks: list[tuple[Report, str]]) -> int:
        """Label report Events consumed; the number marked. Failures are kept for the retry."""
        if not marks:
            return 0
        gate = asyncio.Semaphore(self._opt.write_concurrency)

        async def one(report: Report, key_uid: str) -> bool:
            async with gate:
                try:
                    await self._api.patch_event(
                        report.namespace, report.name, report.consumed_patch(key_uid)
                    )
                except NotFound:
                    pass  # expired (Events live an hour) or deleted: nothing left to mark
                except BaseException:
                    self.reports.to_mark(pool_id, [report], key_uid)
                    raise
            self.reports.marked(report)
            self._consumed[pool_id] += 1
            return True

        outcomes = await asyncio.gather(*(one(r, u) for r, u in marks), return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        return sum(1 for outcome in outcomes if outcome is True)

    async def _write_keys(
        self,
        keys: list[KeyRecord],
        verdicts: Mapping[str, KeyVerdict],
        stamp: str,
        applied: Mapping[str, Applied] | None = None,
        pool_id: PoolId | None = None,
    ) -> int:
        """Patch the statuses that differ; the number patched. Applied reports are marked
        consumed once their key's status is written (or handed back if it could not be)."""
        gate = asyncio.Semaphore(self._opt.write_concurrency)
        applied = applied or {}

        async def one(key: KeyRecord) -> bool:
            verdict = verdicts.get(key.name)
            reports = applied.get(key.name)
            if verdict is None or self._stale("PoolKey", key.ref):
                if reports is not None and pool_id is not None:
                    self.reports.give_back(pool_id, reports.reports)
                return False
            where = "the Secret"
            if key.spec is not None:
                ref = key.spec.secret_ref
                where = f"Secret {ref.name!r} key {ref.key!r}"
            basis = reports.status if reports is not None else key.status
            desired = status_of(verdict, basis, key.ref.generation, stamp, where)
            if reports is not None:
                desired.update(reports.counters)
            patch = status_patch(key.status, desired)
            wrote = False
            if patch:
                # The proxy that saw the 401/403 already posted the Event for this revocation.
                event = (
                    None
                    if reports is not None and reports.revoked
                    else (key_event(verdict, key.status))
                )
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
                        result = None  # deleted meanwhile; its deletion event triggers a run
                    except BaseException:
                        if reports is not None and pool_id is not None:
                            self.reports.give_back(pool_id, reports.reports)
                        raise
                if result is not None:
                    self._remember("PoolKey", key.ref, result)
                    wrote = True
            if reports is not None and pool_id is not None:
                await self._mark(pool_id, [(r, key.ref.uid) for r in reports.reports])
            return wrote

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
        slot = (kind, ref.namespace, ref.name)
        after = str((result.get("metadata") or {}).get("resourceVersion", ""))
        before = {ref.resource_version}
        previous = self._patched.get(slot)
        if previous is not None and ref.resource_version in {*previous.before, previous.after}:
            before |= previous.before | {previous.after}  # a chain of our patches
        fresh = KeyRecord.of(result) if kind == "PoolKey" else None
        self._patched[slot] = _Patched(before - {after}, after, fresh)


def _cooling_reasons(
    verdicts: Mapping[str, KeyVerdict],
    keys: Collection[KeyRecord],
    applied: Mapping[str, Applied],
) -> dict[str, KeyVerdict]:
    """translate() knows a deadline, not its cause: a breaker's cool-down says CircuitOpen."""
    statuses = {k.name: k.status for k in keys}
    out = dict(verdicts)
    for name, verdict in verdicts.items():
        if verdict.phase is not KeyPhase.COOLING_DOWN:
            continue
        reason = cooling_reason(statuses.get(name) or {}, applied.get(name))
        if reason != verdict.reason:
            out[name] = replace(verdict, reason=reason, message=COOLING_MESSAGES[reason])
    return out


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
