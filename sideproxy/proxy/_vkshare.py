"""Cluster mode: the virtual-key part of this replica's ``ReplicaReport``, out and in.

Out: whenever admission changed (an admitted or refused request, a new claim), at most every
``PUBLISH_INTERVAL`` and at least every ``ACTIVE_HEARTBEAT`` while the replica serves virtual
keys, one JSON merge patch of ``spec.virtualKeys``, ``spec.usageHeartbeat`` and
``spec.windowSeconds`` (one write in flight; changes meanwhile coalesce into the next). A
missing report is created whole. After a write succeeds the claims it announced are in force
(``Admission.published``): a claim grows only once every other replica can see it.

In: a watch of the pool's reports (label ``sideproxy.dev/pool``). Each other replica's
``virtualKeys`` go to ``Admission.observe`` (active while its ``usageHeartbeat`` is fresh); a
deleted report to ``Admission.depart``. A report that does not parse is skipped (the operator
marks it). The watch restarts with capped back-off when the API server is away; admission
keeps its last view meanwhile (the dead-replica rule frees shares whose owners went silent).

Nothing here carries key material: VirtualKey names and counts only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from kubernetes_asyncio import client, watch
from kubernetes_asyncio.client.exceptions import ApiException

from sideproxy.models import API_GROUP, API_VERSION
from sideproxy.proxy._admit import ACTIVE_GRACE, ACTIVE_HEARTBEAT, Admission, PeerUsage
from sideproxy.wire import (
    PLURAL,
    InvalidReport,
    PodRef,
    ReplicaReportSpec,
    parse_report,
    pool_selector,
    report_body,
    report_name,
)

__all__ = ["PUBLISH_INTERVAL", "UsageChannel"]

log = logging.getLogger("sideproxy.proxy.vkeys")

# At most this many writes per second per replica, whatever the traffic.
PUBLISH_INTERVAL = 0.1
_BACKOFF = (0.2, 5.0)


class UsageChannel:
    def __init__(
        self,
        api: client.ApiClient,
        namespace: str,
        pool: str,
        replica: str,
        admission: Admission,
        *,
        owner: PodRef | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._custom = client.CustomObjectsApi(api)
        self.namespace = namespace
        self.pool = pool
        self.replica = replica
        self.name = report_name(pool, replica)
        self.admission = admission
        self.owner = owner
        self.clock = clock
        self._wake = asyncio.Event()
        # Nothing to say until a virtual key is used: an idle replica stays invisible.
        self._published_empty = True
        admission.on_change = self._wake.set

    def __repr__(self) -> str:
        return f"UsageChannel(pool={self.pool!r}, replica={self.replica!r})"

    async def run(self) -> None:
        """Publish and watch until cancelled, from the moment the table has VirtualKeys (a pool
        without any costs the API server nothing, and needs no RBAC on reports for this)."""
        while not self.admission.configured():
            await self._wake.wait()
            self._wake.clear()
        tasks = [
            asyncio.create_task(self._publish_loop(), name="sideproxy-vkey-publish"),
            asyncio.create_task(self._watch_loop(), name="sideproxy-vkey-watch"),
        ]
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    # ------------------------------------------------------------------ out

    async def _publish_loop(self) -> None:
        delay = _BACKOFF[0]
        while True:
            active = self.admission.active(self.clock())
            timeout = ACTIVE_HEARTBEAT if active else None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)
            self._wake.clear()
            try:
                await self._publish()
                delay = _BACKOFF[0]
            except (ApiException, OSError, TimeoutError) as exc:
                log.warning("could not write virtual-key usage to %s: %s", self.name, _why(exc))
                await asyncio.sleep(delay)
                delay = min(_BACKOFF[1], delay * 2)
                self._wake.set()
                continue
            await asyncio.sleep(PUBLISH_INTERVAL)

    async def _publish(self) -> None:
        now = self.clock()
        entries = self.admission.report(now)
        if not entries and self._published_empty:
            return  # idle, and the others already know
        fields = {
            "usageHeartbeat": now,
            "windowSeconds": self.admission.window,
            "virtualKeys": entries,
        }
        try:
            await self._custom.patch_namespaced_custom_object(  # type: ignore[call-arg]
                API_GROUP,
                API_VERSION,
                self.namespace,
                PLURAL,
                self.name,
                {"spec": fields},
                _content_type="application/merge-patch+json",
            )
        except ApiException as exc:
            if exc.status != 404:
                raise
            spec = ReplicaReportSpec.model_validate(
                {"pool": self.pool, "replica": self.replica, "heartbeat": now, **fields}
            )
            body = report_body(self.namespace, spec, self.owner)
            await self._custom.create_namespaced_custom_object(
                API_GROUP, API_VERSION, self.namespace, PLURAL, body
            )
        self.admission.published(entries)
        self._published_empty = not entries

    # ------------------------------------------------------------------ in

    async def _watch_loop(self) -> None:
        delay = _BACKOFF[0]
        while True:
            try:
                await self._watch()
                delay = _BACKOFF[0]
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("virtual-key usage watch of pool %s: %s", self.pool, _why(exc))
                await asyncio.sleep(delay)
                delay = min(_BACKOFF[1], delay * 2)

    async def _watch(self) -> None:
        listing = await self._custom.list_namespaced_custom_object(
            API_GROUP,
            API_VERSION,
            self.namespace,
            PLURAL,
            label_selector=pool_selector(self.pool),
        )
        for item in listing.get("items", []):
            self._apply("ADDED", item)
        version = listing.get("metadata", {}).get("resourceVersion")
        stream = watch.Watch()
        try:
            async for event in stream.stream(
                self._custom.list_namespaced_custom_object,
                API_GROUP,
                API_VERSION,
                self.namespace,
                PLURAL,
                label_selector=pool_selector(self.pool),
                resource_version=version,
                timeout_seconds=300,
            ):
                kind, obj = event.get("type"), event.get("object")
                if isinstance(obj, Mapping):
                    self._apply(str(kind), obj)
        finally:
            stream.stop()

    def _apply(self, kind: str, obj: Mapping[str, Any]) -> None:
        report = parse_report(obj)
        if isinstance(report, InvalidReport):
            return
        spec = report.spec
        if spec.replica == self.replica or spec.pool != self.pool:
            return
        if kind == "DELETED":
            self.admission.depart(spec.replica)
            return
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


def _why(exc: BaseException) -> str:
    if isinstance(exc, ApiException):
        return f"HTTP {exc.status} {exc.reason}"
    return type(exc).__name__
