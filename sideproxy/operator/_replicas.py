"""The operator's side of the health channel: which ReplicaReport entries a pool's fold may use,
which it refuses (and says why in the report's status), and which reports are gone.

Only the proxy ServiceAccount may write ``replicareports`` (``sideproxy/wire.py``), and this is
the only input of health into ``PoolKey.status``: core/v1 Events are never read, so whoever may
create Events cannot change a key's status.

A report is *refused*, with ``status.conditions`` ``Accepted=False`` and a reason, when it does
not parse or claims another pool (``wire.parse_report``), and *partly refused* for entries about
a key that is not a PoolKey of the pool (``UnknownKey``) or whose spec does not parse
(``InvalidKey``); nothing is dropped silently. A report whose heartbeat is older than
``wire.STALE_AFTER_SECONDS`` belongs to a replica that stopped renewing it: it is deleted (its
counts were folded first, and its marks move into each key's base once it is gone).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass

from sideproxy.models import API_GROUP, API_VERSION
from sideproxy.operator._fold import Source
from sideproxy.operator._kube import Conflict, KubeApi, NotFound
from sideproxy.operator._records import KeyRecord, ReportRecord
from sideproxy.operator._status import Cond, merge_conditions, rfc3339
from sideproxy.wire import ACCEPTED, PLURAL, STALE_AFTER_SECONDS, ReplicaReport

log = logging.getLogger("sideproxy.operator")

_GV = {"group": API_GROUP, "version": API_VERSION}


@dataclass(frozen=True, slots=True)
class Sorted:
    """A pool's reports, sorted for one reconcile."""

    sources: dict[str, list[Source]]  # key name -> live entries about it
    verdicts: dict[str, Cond]  # report name -> its Accepted condition
    stale: list[ReportRecord]  # to delete once their counts are folded
    live: frozenset[tuple[str, str]]  # (name, uid) of the reports the fold may use
    deadline: float | None  # when the next live report turns stale


def sort_reports(
    reports: Iterable[ReportRecord], keys: Sequence[KeyRecord], pool: str, now: float
) -> Sorted:
    """Which entries count, which are refused and why; pure."""
    valid = {k.name for k in keys if k.spec is not None}
    invalid = {k.name for k in keys if k.spec is None}
    sources: dict[str, list[Source]] = {}
    verdicts: dict[str, Cond] = {}
    stale: list[ReportRecord] = []
    live: set[tuple[str, str]] = set()
    deadlines: list[float] = []
    for record in sorted(reports, key=lambda r: r.name):
        parsed = record.parsed
        if not isinstance(parsed, ReplicaReport):
            verdicts[record.name] = Cond(ACCEPTED, "False", parsed.reason, parsed.message)
            continue
        if parsed.spec.pool != pool:  # filed under another pool's label: not ours to judge
            continue
        live.add((record.name, record.ref.uid))
        expires = parsed.spec.heartbeat + STALE_AFTER_SECONDS
        old = expires <= now or record.deleting
        if old:
            stale.append(record)
        else:
            deadlines.append(expires)
        unknown, broken = [], []
        for entry in parsed.spec.keys:
            if entry.name in valid:
                sources.setdefault(entry.name, []).append(
                    Source(
                        record.name,
                        record.ref.uid,
                        parsed.spec.heartbeat,
                        entry,
                        old,
                        parsed.spec.incarnation,
                    )
                )
            elif entry.name in invalid:
                broken.append(entry.name)
            else:
                unknown.append(entry.name)
        verdicts[record.name] = _verdict(pool, unknown, broken)
    return Sorted(sources, verdicts, stale, frozenset(live), min(deadlines, default=None))


def _names(names: Sequence[str]) -> str:
    shown = ", ".join(sorted(names)[:10])
    return shown + (f" and {len(names) - 10} more" if len(names) > 10 else "")


def _verdict(pool: str, unknown: Sequence[str], broken: Sequence[str]) -> Cond:
    problems = []
    if unknown:
        problems.append(f"not applied: no PoolKey of pool {pool!r} named {_names(unknown)}")
    if broken:
        problems.append(f"not applied: the spec of PoolKey {_names(broken)} does not parse")
    if not problems:
        return Cond(ACCEPTED, "True", "Applied", "every entry is folded into PoolKey status")
    reason = "UnknownKey" if unknown else "InvalidKey"
    return Cond(ACCEPTED, "False", reason, "; ".join(problems))


class ReportDesk:
    """The writes to ReplicaReport objects: Accepted conditions, stale deletions, gone checks."""

    def __init__(self, api: KubeApi, concurrency: int = 16) -> None:
        self._api = api
        self._gate = asyncio.Semaphore(concurrency)

    async def judge(
        self, reports: Iterable[ReportRecord], verdicts: Mapping[str, Cond], now: float
    ) -> None:
        """Write each report's Accepted condition where it changed."""
        stamp = rfc3339(now)
        jobs = []
        for record in reports:
            cond = verdicts.get(record.name)
            if cond is None:
                continue
            old = record.accepted or {}
            if (old.get("status"), old.get("reason"), old.get("message")) == (
                cond.status,
                cond.reason,
                cond.message,
            ):
                continue
            conditions = merge_conditions(record.conditions, [cond], None, stamp)
            jobs.append(self._patch(record, {"conditions": conditions}))
            if cond.status != "True":
                log.warning(
                    "ReplicaReport %s/%s refused: %s: %s",
                    record.ref.namespace,
                    record.name,
                    cond.reason,
                    cond.message,
                )
        await asyncio.gather(*jobs)

    async def _patch(self, record: ReportRecord, status: dict[str, object]) -> None:
        async with self._gate:
            with contextlib.suppress(NotFound):
                await self._api.patch_status(
                    PLURAL, record.ref.namespace, record.name, dict(status), **_GV
                )

    async def delete_stale(self, stale: Sequence[ReportRecord]) -> int:
        async def one(record: ReportRecord) -> None:
            async with self._gate:
                # Conflict: a newer report of that name, not the stale one.
                with contextlib.suppress(Conflict):
                    await self._api.delete_custom(
                        PLURAL, record.ref.namespace, record.name, record.ref.uid, **_GV
                    )

        await asyncio.gather(*(one(r) for r in stale if not r.deleting))
        return len(stale)

    async def gone(
        self, namespace: str, marks: Collection[tuple[str, str]], live: Collection[tuple[str, str]]
    ) -> set[str]:
        """Of the reports some key holds marks of (name, uid), those confirmed gone: the API
        server has no object of that name and uid. One the index does not show (yet) is asked
        for, never assumed gone."""
        unseen = {(n, u) for n, u in marks if (n, u) not in live}

        async def check(name: str, uid: str) -> str | None:
            async with self._gate:
                body = await self._api.get_custom(PLURAL, namespace, name, **_GV)
            current = str(((body or {}).get("metadata") or {}).get("uid", ""))
            return name if current != uid else None

        found = await asyncio.gather(*(check(n, u) for n, u in sorted(unseen)))
        return {name for name in found if name is not None}
