"""The health channel's I/O: this replica's ``ReplicaReport`` out, the pool's other reports in.

Out: the report is written as soon as the pool reports a transition — one write in flight at a
time; whatever happens meanwhile rides on the next write, which carries the state of that moment
(so a storm of 429s costs one write per API round trip, not one per answer) — and renewed every
``HEARTBEAT_SECONDS`` with the counters. A merge patch of ``spec`` (the first write of a replica
creates the object, owned by its Pod when ``POD_NAME``/``POD_UID`` are set).

In: a list-then-watch of every report with label ``sideproxy.dev/pool=<pool>``; each other
replica's entries that changed are applied to the live pool as deltas (see ``_ledger``). A
report that claims another pool than its label and name say, or is malformed, is refused and
logged; one whose heartbeat is older than ``STALE_AFTER_SECONDS`` belongs to a replica that is
gone and is ignored. The replica's own report is skipped, except the one a previous process of
the same name left behind: a restarted replica takes back what it knew.

See ``sideproxy.wire`` for the object and docs/cluster-loop.md for the whole loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from sideproxy.models import API_GROUP, API_VERSION
from sideproxy.pool import ManagedCreditPool, Transition
from sideproxy.proxy._ledger import Ledger, Peers, apply_entries
from sideproxy.proxy._watch import BACKOFF_MAX, BACKOFF_START, describe, follow
from sideproxy.wire import (
    HEARTBEAT_SECONDS,
    PLURAL,
    STALE_AFTER_SECONDS,
    InvalidReport,
    KeyReport,
    PodRef,
    ReplicaReport,
    parse_report,
    pool_selector,
    report_body,
    report_name,
)

__all__ = ["ReportChannel"]

log = logging.getLogger("sideproxy.proxy.kube")

_MERGE_PATCH = "application/merge-patch+json"
_WRITE_TIMEOUT = 10.0


class ReportChannel:
    """One replica's end of the health channel."""

    def __init__(
        self,
        api: client.ApiClient,
        namespace: str,
        pool: str,
        replica: str,
        owner: PodRef | None = None,
        *,
        clock: Callable[[], float] = time.time,
        heartbeat: float = HEARTBEAT_SECONDS,
    ) -> None:
        self._objects = client.CustomObjectsApi(api)
        self.namespace = namespace
        self.pool = pool
        self.replica = replica
        self.name = report_name(pool, replica)
        self._owner = owner
        self._clock = clock
        self._heartbeat = heartbeat
        self._started = clock()
        self.ledger = Ledger()
        self.peers = Peers()
        self._target: ManagedCreditPool | None = None
        self._fingerprints: dict[str, str] = {}
        self._dirty = asyncio.Event()
        self._exists: bool | None = None
        self._refusals: set[tuple[str, str]] = set()
        self.listed = asyncio.Event()
        self.writes = 0
        self.applied = 0

    # ------------------------------------------------------------------ wiring

    def attach(self, pool: ManagedCreditPool) -> None:
        """The live pool: reported on, and where the others' entries are applied."""
        self._target = pool
        self._dirty.set()

    def record(self, transitions: Iterable[Transition]) -> None:
        """The forwarder's ``on_transitions`` hook: non-blocking, on the request path."""
        if self.ledger.record(transitions):
            self._dirty.set()

    def configured(self, fingerprints: Mapping[str, str]) -> None:
        """The pool was (re)configured with these keys: apply everything known to them."""
        self._fingerprints = dict(fingerprints)
        self._apply(self.peers.entries())

    async def run(self) -> None:
        """Write and watch until cancelled."""
        await asyncio.gather(self._write_loop(), self._watch())

    # ------------------------------------------------------------------ out

    async def _write_loop(self) -> None:
        backoff = BACKOFF_START
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._dirty.wait(), self._heartbeat)
            self._dirty.clear()
            if self._target is None:
                continue
            try:
                await self._write(self._target)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # retried whatever it was: the report must get through
                log.warning(
                    "could not write ReplicaReport %s (%s); retrying in %.1fs",
                    self.name,
                    describe(exc),
                    backoff,
                )
                self._dirty.set()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)
            else:
                backoff = BACKOFF_START

    async def _write(self, pool: ManagedCreditPool) -> None:
        now = self._clock()
        spec = self.ledger.spec(self.pool, self.replica, now, pool.statuses(now))
        if self._exists is not False:
            try:
                await self._objects.patch_namespaced_custom_object(  # type: ignore[call-arg]
                    API_GROUP,
                    API_VERSION,
                    self.namespace,
                    PLURAL,
                    self.name,
                    {"spec": spec.dump()},
                    _content_type=_MERGE_PATCH,
                    _request_timeout=_WRITE_TIMEOUT,
                )
            except ApiException as exc:
                if exc.status != 404:
                    raise
                self._exists = False
            else:
                self._exists = True
                self.writes += 1
                return
        try:
            await self._objects.create_namespaced_custom_object(
                API_GROUP,
                API_VERSION,
                self.namespace,
                PLURAL,
                report_body(self.namespace, spec, self._owner),
                _request_timeout=_WRITE_TIMEOUT,
            )
        except ApiException as exc:
            if exc.status == 409:  # there after all (a previous process of ours): patch it
                self._exists = True
                self._dirty.set()
                return
            raise
        self._exists = True
        self.writes += 1

    # ------------------------------------------------------------------ in

    async def _watch(self) -> None:
        await follow(
            f"ReplicaReports of pool {self.pool}",
            self._objects.list_namespaced_custom_object,
            {
                "group": API_GROUP,
                "version": API_VERSION,
                "namespace": self.namespace,
                "plural": PLURAL,
                "label_selector": pool_selector(self.pool),
            },
            self._on_listing,
            self._on_event,
        )

    def _on_listing(self, items: list[Mapping[str, Any]]) -> None:
        reports = {}
        for item in items:
            report = self._read(item, listing=True)
            if report is not None:
                reports[report.name] = report.spec
        self.peers.replace(reports)
        self._apply(self.peers.entries())
        # What a previous process of ours left is applied once, never again after a reconfigure.
        self.peers.remove(self.name)
        self.listed.set()

    def _on_event(self, kind: str, obj: Mapping[str, Any]) -> None:
        if kind == "DELETED":
            meta = obj.get("metadata")
            if isinstance(meta, Mapping):
                self.peers.remove(str(meta.get("name") or ""))
            return
        report = self._read(obj, listing=False)
        if report is None:
            meta = obj.get("metadata")
            if isinstance(meta, Mapping):
                self.peers.remove(str(meta.get("name") or ""))
            return
        self._apply(self.peers.update(report.name, report.spec))

    def _read(self, obj: Mapping[str, Any], *, listing: bool) -> ReplicaReport | None:
        """A report to apply, or None (refused, stale, or our own)."""
        report = parse_report(obj)
        if isinstance(report, InvalidReport):
            if (report.name, report.reason) not in self._refusals:
                self._refusals.add((report.name, report.reason))
                log.error(
                    "ReplicaReport %s refused (%s): %s", report.name, report.reason, report.message
                )
            return None
        if report.spec.pool != self.pool:
            return None  # a selector is a filter, not a promise
        if report.spec.heartbeat < self._clock() - STALE_AFTER_SECONDS:
            return None
        if report.name == self.name and not (listing and report.spec.heartbeat < self._started):
            return None
        return report

    def _apply(self, entries: list[KeyReport]) -> None:
        pool = self._target
        if pool is None or not entries or not self._fingerprints:
            return
        self.applied += apply_entries(pool, entries, self._fingerprints, self._clock())
