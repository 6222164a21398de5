"""The virtual-key part of this replica's ``ReplicaReport`` (see ``_channel`` for its I/O).

Out: whenever admission changed (an admitted or refused request, a new claim), at most every
``PUBLISH_INTERVAL`` and at least every ``ACTIVE_HEARTBEAT`` while the replica serves virtual
keys, the fields ``spec.virtualKeys``, ``spec.usageHeartbeat`` and ``spec.windowSeconds``.
Nothing while the table has no VirtualKeys (such a pool costs the API server no write for
them), and nothing while the replica is idle and the others already know it. After a write
carrying them succeeds the claims it announced are in force (``Admission.published``): a claim
grows only once every other replica can see it.

In: each other replica's ``virtualKeys`` go to ``Admission.observe`` (active while its
``usageHeartbeat`` is fresh); a deleted report, or one a fresh listing no longer has, to
``Admission.depart``. A refused report is skipped (the operator marks it). While the watch is
down admission keeps its last view (the dead-replica rule frees shares whose owners went
silent).

Nothing here carries key material: VirtualKey names and counts only.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

from sideproxy.proxy._admit import ACTIVE_GRACE, ACTIVE_HEARTBEAT, Admission, PeerUsage
from sideproxy.wire import InvalidReport, ReplicaReport

__all__ = ["PUBLISH_INTERVAL", "UsagePart"]

# At most this many writes of virtual-key usage per second per replica, whatever the traffic.
PUBLISH_INTERVAL = 0.1

Read = ReplicaReport | InvalidReport


class UsagePart:
    """Virtual-key claims and usage: this replica's out, the others' into ``admission``."""

    def __init__(
        self,
        pool: str,
        replica: str,
        admission: Admission,
        *,
        poke: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.pool = pool
        self.replica = replica
        self.admission = admission
        self._poke = poke
        self.clock = clock
        self._pending = True  # admission changed since the last write
        self._last = -math.inf  # event-loop time of the last write
        # Nothing to say until a virtual key is used: an idle replica stays invisible.
        self._published_empty = True
        self._peers: dict[str, str] = {}  # report name -> replica, of the reports observed
        admission.on_change = self._changed

    def __repr__(self) -> str:
        return f"UsagePart(pool={self.pool!r}, replica={self.replica!r})"

    def _changed(self) -> None:
        self._pending = True
        self._poke()

    # ------------------------------------------------------------------ out (a _channel.Part)

    def due(self, at: float) -> float | None:
        admission = self.admission
        if not admission.configured():
            return None
        if self._pending:
            return self._last + PUBLISH_INTERVAL
        if admission.active(self.clock()):
            return self._last + ACTIVE_HEARTBEAT
        return None

    def take(self, now: float, at: float) -> dict[str, Any] | None:
        self._pending = False
        if not self.admission.configured():
            return None
        entries = self.admission.report(now)
        if not entries and self._published_empty:
            self._last = at  # idle, and the others already know: look again later
            return None
        return {
            "usageHeartbeat": now,
            "windowSeconds": self.admission.window,
            "virtualKeys": entries,
        }

    def written(self, fields: dict[str, Any], at: float) -> None:
        entries = fields["virtualKeys"]
        self.admission.published(entries)
        self._published_empty = not entries
        self._last = at

    def failed(self) -> None:
        self._pending = True

    # ------------------------------------------------------------------ in

    def listing(self, reports: Sequence[Read]) -> None:
        seen = {}
        for report in reports:
            theirs = self._theirs(report)
            if theirs is not None:
                self._observe(theirs)
                seen[theirs.name] = theirs.spec.replica
        for name, replica in self._peers.items():
            if name not in seen:  # gone while the watch was down
                self.admission.depart(replica)
        self._peers = seen

    def event(self, kind: str, report: Read) -> None:
        theirs = self._theirs(report)
        if theirs is None:
            return
        if kind == "DELETED":
            self._peers.pop(theirs.name, None)
            self.admission.depart(theirs.spec.replica)
        else:
            self._peers[theirs.name] = theirs.spec.replica
            self._observe(theirs)

    def _theirs(self, report: Read) -> ReplicaReport | None:
        """Another replica's report of this pool, or None (refused, or our own)."""
        if isinstance(report, InvalidReport):
            return None
        spec = report.spec
        return report if spec.replica != self.replica and spec.pool == self.pool else None

    def _observe(self, report: ReplicaReport) -> None:
        spec = report.spec
        seen = {
            u.name: PeerUsage(
                u.window_start,
                u.claimed_requests,
                u.claimed_tokens,
                u.requests,
                u.prompt_tokens + u.completion_tokens,
            )
            for u in spec.virtual_keys or ()
        }
        heartbeat = spec.usage_heartbeat or 0.0
        self.admission.observe(spec.replica, seen, self.clock() - heartbeat < ACTIVE_GRACE)
