"""The health part of this replica's ``ReplicaReport`` (see ``_channel`` for the object's I/O).

Out: the report's health fields (``pool``, ``replica``, ``heartbeat``, ``keysReported``,
``keys``) are due as soon as the pool reports a transition, and every ``HEARTBEAT_SECONDS``
anyway to renew the heartbeat and the counters. Whatever happens while a write is in flight
rides on the next one, which carries the state of that moment (so a storm of 429s costs one
write per API round trip, not one per answer).

In: each other replica's entries that changed are applied to the live pool as deltas (see
``_ledger``). A refused report (malformed, or claiming another pool than its label and name
say) changes nothing; one whose heartbeat is older than ``STALE_AFTER_SECONDS`` belongs to a
replica that is gone and is ignored. The replica's own report is skipped, except the one a
previous process of the same name left behind, on the first listing that sees it: a restarted
replica takes back what it knew.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from sideproxy.pool import ManagedCreditPool, Transition
from sideproxy.proxy._ledger import Ledger, Peers, apply_entries
from sideproxy.wire import (
    HEARTBEAT_SECONDS,
    STALE_AFTER_SECONDS,
    InvalidReport,
    KeyReport,
    ReplicaReport,
    report_name,
)

__all__ = ["HealthPart"]

Read = ReplicaReport | InvalidReport


class HealthPart:
    """Key health: this replica's transitions and counters out, the others' entries in."""

    def __init__(
        self,
        pool: str,
        replica: str,
        *,
        poke: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.time,
        heartbeat: float = HEARTBEAT_SECONDS,
    ) -> None:
        self.pool = pool
        self.replica = replica
        self.name = report_name(pool, replica)
        self.poke = poke  # the channel's: a write is due
        self._clock = clock
        self._heartbeat = heartbeat
        self._started = clock()
        self.ledger = Ledger()
        self.peers = Peers()
        self._target: ManagedCreditPool | None = None
        self._fingerprints: dict[str, str] = {}
        self._dirty = False
        self._last = -math.inf  # event-loop time of the last write (or of nothing to write)
        self.applied = 0

    # ------------------------------------------------------------------ wiring

    def attach(self, pool: ManagedCreditPool) -> None:
        """The live pool: reported on, and where the others' entries are applied."""
        self._target = pool
        self._want()

    def record(self, transitions: Iterable[Transition]) -> None:
        """The forwarder's ``on_transitions`` hook: non-blocking, on the request path."""
        if self.ledger.record(transitions):
            self._want()

    def configured(self, fingerprints: Mapping[str, str]) -> None:
        """The pool was (re)configured with these keys: apply everything known to them."""
        self._fingerprints = dict(fingerprints)
        self._apply(self.peers.entries())

    def _want(self) -> None:
        self._dirty = True
        self.poke()

    # ------------------------------------------------------------------ out (a _channel.Part)

    def due(self, at: float) -> float | None:
        return at if self._dirty else self._last + self._heartbeat

    def take(self, now: float, at: float) -> dict[str, Any] | None:
        self._dirty = False
        pool = self._target
        if pool is None:
            self._last = at  # nothing to say before the pool is there; look again later
            return None
        return self.ledger.spec(self.pool, self.replica, now, pool.statuses(now)).dump()

    def written(self, fields: dict[str, Any], at: float) -> None:
        self._last = at

    def failed(self) -> None:
        self._dirty = True

    # ------------------------------------------------------------------ in

    def listing(self, reports: Sequence[Read]) -> None:
        found = {}
        for report in reports:
            usable = self._usable(report, listing=True)
            if usable is not None:
                found[usable.name] = usable.spec
        self.peers.replace(found)
        self._apply(self.peers.entries())
        # What a previous process of ours left is applied once, never again after a reconfigure.
        self.peers.remove(self.name)

    def event(self, kind: str, report: Read) -> None:
        usable = None if kind == "DELETED" else self._usable(report, listing=False)
        if usable is None:
            self.peers.remove(report.name)
        else:
            self._apply(self.peers.update(usable.name, usable.spec))

    def _usable(self, report: Read, *, listing: bool) -> ReplicaReport | None:
        """A report to apply, or None: refused, stale, or our own (but a previous process's)."""
        if isinstance(report, InvalidReport):
            return None
        spec = report.spec
        if spec.pool != self.pool:
            return None  # a selector is a filter, not a promise
        if spec.heartbeat < self._clock() - STALE_AFTER_SECONDS:
            return None
        if report.name == self.name and not (listing and spec.heartbeat < self._started):
            return None
        return report

    def _apply(self, entries: list[KeyReport]) -> None:
        pool = self._target
        if pool is None or not entries or not self._fingerprints:
            return
        self.applied += apply_entries(pool, entries, self._fingerprints, self._clock())
