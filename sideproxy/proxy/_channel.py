"""One replica's ``ReplicaReport``: the object's I/O, one writer and one watch, for its parts.

A replica says two things in its report, each owned by a *part* that knows nothing of the API:
key health (``_replicas.HealthPart``: pool transitions, counters, heartbeat) and virtual-key
usage (``_vkshare.UsagePart``: claims and usage of the current window). This module is the
only one that touches the object.

Out — one write in flight, whatever is due. Each part says when it next wants to write
(:meth:`Part.due`, on the event loop's clock) and what (:meth:`Part.take`); the writer wakes at
the earliest deadline or when a part pokes it, and sends the fields of every part that is due
as one JSON merge patch of ``spec`` (so a part never erases the other's fields). Whatever
happens meanwhile rides on the next write. After the write succeeds each part hears which of
its fields went out (:meth:`Part.written`), after it fails :meth:`Part.failed` (the writer
backs off, 0.2 s doubling to 5 s, and tries again). The first write creates the object whole,
with every part's fields (owned by the Pod when ``POD_NAME``/``POD_UID`` are set); a create
that meets 409 (a previous process of ours left it) patches instead. Every write carries
``spec.incarnation``: this process, a uuid4 chosen when the channel is made.

In — one list-then-watch of every report labelled ``sideproxy.dev/pool=<pool>``
(``_watch.follow``, which outlives anything). Each object is parsed once
(``wire.parse_report``, a refusal logged once per report and reason) and handed to every part.

See ``sideproxy.wire`` for the object and docs/cluster-loop.md for the whole loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from sideproxy.models import API_GROUP, API_VERSION
from sideproxy.proxy._watch import BACKOFF_MAX, BACKOFF_START, describe, follow
from sideproxy.wire import (
    PLURAL,
    InvalidReport,
    PodRef,
    ReplicaReport,
    ReplicaReportSpec,
    parse_report,
    pool_selector,
    report_body,
    report_name,
)

__all__ = ["Part", "Read", "ReportChannel"]

log = logging.getLogger("sideproxy.proxy.kube")

_MERGE_PATCH = "application/merge-patch+json"
_WRITE_TIMEOUT = 10.0

Read = ReplicaReport | InvalidReport
Fields = dict[str, Any]


class Part(Protocol):
    """What one part of the report wants written, and what it makes of the reports read."""

    def due(self, at: float) -> float | None:
        """When (event-loop time; ``at`` is now) this part next wants a write; None: not until
        it pokes the channel."""

    def take(self, now: float, at: float) -> Fields | None:
        """Its ``spec`` fields (camelCase) for the write about to go out, at unix time ``now``;
        None: nothing to say after all (it is then no longer due)."""

    def written(self, fields: Fields, at: float) -> None:
        """The write carrying ``fields`` (what :meth:`take` gave) succeeded."""

    def failed(self) -> None:
        """The write carrying this part's fields failed: want them written again."""

    def listing(self, reports: Sequence[Read]) -> None:
        """A fresh listing of the pool's reports (every one, this replica's own included)."""

    def event(self, kind: str, report: Read) -> None:
        """One watch event: ADDED, MODIFIED or DELETED (the object's last state)."""


class ReportChannel:
    """One replica's end of the ReplicaReport channel: :meth:`run` writes and watches."""

    def __init__(
        self,
        api: client.ApiClient,
        namespace: str,
        pool: str,
        replica: str,
        owner: PodRef | None = None,
        *,
        clock: Callable[[], float] = time.time,
        incarnation: str | None = None,
    ) -> None:
        self._objects = client.CustomObjectsApi(api)
        self.namespace = namespace
        self.pool = pool
        self.replica = replica
        self.name = report_name(pool, replica)
        self.incarnation = incarnation or uuid.uuid4().hex
        self._owner = owner
        self._clock = clock
        self._parts: list[Part] = []
        self._wake = asyncio.Event()
        self._exists: bool | None = None
        self._refusals: set[tuple[str, str]] = set()
        self.listed = asyncio.Event()
        self.writes = 0

    def __repr__(self) -> str:
        return f"ReportChannel(pool={self.pool!r}, replica={self.replica!r})"

    def add(self, part: Part) -> None:
        """A part of the report (before :meth:`run`)."""
        self._parts.append(part)
        self._wake.set()

    def poke(self) -> None:
        """A part has news: look at what is due now (non-blocking, any time)."""
        self._wake.set()

    async def run(self) -> None:
        """Write and watch until cancelled."""
        await asyncio.gather(self._write_loop(), self._watch())

    # ------------------------------------------------------------------ out

    async def _write_loop(self) -> None:
        loop = asyncio.get_running_loop()
        backoff = BACKOFF_START
        while True:
            at = loop.time()
            deadlines = [(d, p) for p in self._parts if (d := p.due(at)) is not None]
            first = min((d for d, _ in deadlines), default=None)
            if first is None or first > at:
                # The state is in the parts; the event only says "look again".
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), None if first is None else first - at)
                self._wake.clear()
                continue
            batch = self._take([p for d, p in deadlines if d <= at], at)
            if not batch:
                continue
            try:
                done = await self._write(batch)
            except asyncio.CancelledError:
                for part, _ in batch:
                    part.failed()
                raise
            except Exception as exc:  # retried whatever it was: the report must get through
                for part, _ in batch:
                    part.failed()
                log.warning(
                    "could not write ReplicaReport %s (%s); retrying in %.1fs",
                    self.name,
                    describe(exc),
                    backoff,
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)
                continue
            backoff = BACKOFF_START
            after = loop.time()
            for part, fields in done:
                part.written(fields, after)
            for part, _ in batch[len(done) :]:
                part.failed()  # a create that met 409: patched on the next round, at once

    def _take(self, parts: Sequence[Part], at: float) -> list[tuple[Part, Fields]]:
        now = self._clock()
        return [(p, f) for p in parts if (f := p.take(now, at)) is not None]

    async def _write(self, batch: list[tuple[Part, Fields]]) -> list[tuple[Part, Fields]]:
        """One patch (or a create); the parts whose fields went out (none after a 409)."""
        spec: Fields = {"incarnation": self.incarnation}
        for _, fields in batch:
            spec.update(fields)
        if self._exists is not False:
            try:
                await self._objects.patch_namespaced_custom_object(  # type: ignore[call-arg]
                    API_GROUP,
                    API_VERSION,
                    self.namespace,
                    PLURAL,
                    self.name,
                    {"spec": spec},
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
                return batch
        # Created whole: the parts that were not due say their piece too.
        loop = asyncio.get_running_loop()
        taken = {id(p) for p, _ in batch}
        extra = self._take([p for p in self._parts if id(p) not in taken], loop.time())
        whole = [*batch, *extra]
        body: Fields = {"pool": self.pool, "replica": self.replica, "heartbeat": self._clock()}
        for _, fields in whole:
            body.update(fields)
        body["incarnation"] = self.incarnation
        try:
            await self._objects.create_namespaced_custom_object(
                API_GROUP,
                API_VERSION,
                self.namespace,
                PLURAL,
                report_body(self.namespace, ReplicaReportSpec.model_validate(body), self._owner),
                _request_timeout=_WRITE_TIMEOUT,
            )
        except ApiException as exc:
            if exc.status == 409:  # there after all (a previous process of ours): patch it
                self._exists = True
                for part, _ in extra:
                    part.failed()
                return []
            for part, _ in extra:
                part.failed()
            raise
        except BaseException:
            for part, _ in extra:
                part.failed()
            raise
        self._exists = True
        self.writes += 1
        for part, fields in extra:
            part.written(fields, loop.time())
        return batch

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
        reports = [self._parse(item) for item in items]
        for part in self._parts:
            part.listing(reports)
        self.listed.set()

    def _on_event(self, kind: str, obj: Mapping[str, Any]) -> None:
        report = self._parse(obj)
        for part in self._parts:
            part.event(kind, report)

    def _parse(self, obj: Mapping[str, Any]) -> Read:
        report = parse_report(obj)
        if isinstance(report, InvalidReport) and (report.name, report.reason) not in self._refusals:
            self._refusals.add((report.name, report.reason))
            log.error(
                "ReplicaReport %s refused (%s): %s", report.name, report.reason, report.message
            )
        return report
