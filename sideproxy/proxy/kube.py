"""Cluster mode: the pool's routing table and key material from the API, and reports back to it.

``ClusterSource`` watches exactly two objects, ``<pool>-routing`` (ConfigMap) and ``<pool>-keys``
(Secret), by ``fieldSelector=metadata.name=...`` so that RBAC can grant get/list/watch on those
two ``resourceNames`` and nothing else. It watches the API instead of a mounted volume because
kubelet refreshes volumes only every minute or so: far too slow to spread a cool-down.

A table that does not parse, fails its hash or names another pool is yielded as a
:class:`~sideproxy.proxy.sources.Rejected` (logged, counted, shown in ``/sideproxy/status``) and
the proxy keeps serving the last good one. When the API server is unreachable both watches
retry with capped exponential back-off (0.2 s doubling to 5 s) and the proxy serves on.

``EventReporter`` turns the pool's transitions (429, 401/403, breaker open) into Kubernetes
Events on the PoolKey, deduplicated per key per cool-down window; the operator consumes them
and writes ``PoolKey.status`` and the table that every other replica reads. An Event carries:

=============================  ================================================================
reason                         ``RateLimited`` (429), ``Unauthorized`` (401/403), ``CircuitOpen``
label ``sideproxy.dev/report`` ``true`` (the operator watches only these)
label ``sideproxy.dev/pool``   the CreditPool
``sideproxy.dev/until``        the cool-down deadline, unix seconds (absent for Unauthorized)
``sideproxy.dev/count``        how many such answers this report stands for
``sideproxy.dev/fingerprint``  the key value's fingerprint, so a report about a rotated-away
                               value is recognised as stale
=============================  ================================================================

Deduplication: one Event per (key, reason, fingerprint) per cool-down window. Answers that
arrive while a report is queued are folded into it (count, latest deadline); a deadline that
extends an already reported window by less than ``WINDOW_SLACK`` seconds (the jitter of
concurrent 429s of one window) is not a new window, and its count rides on the next report.
Unauthorized is reported once per revocation (the pool emits it once per revocation).

Neither ever logs a key value: material is only ever handed to the pool.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import itertools
import logging
import math
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, ClassVar

import aiohttp
from kubernetes_asyncio import client, config, watch
from kubernetes_asyncio.client.exceptions import ApiException

from sideproxy.models import (
    API_GROUP,
    API_VERSION,
    POOL_LABEL,
    TABLE_DATA_KEY,
    RoutingTable,
    fingerprint,
    key_secret_name,
    routing_configmap_name,
)
from sideproxy.pool import KeyHealth, Transition
from sideproxy.proxy.sources import Rejected

log = logging.getLogger("sideproxy.proxy.kube")

SERVICE_ACCOUNT_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
REPORT_LABEL = "sideproxy.dev/report"
UNTIL_ANNOTATION = "sideproxy.dev/until"
COUNT_ANNOTATION = "sideproxy.dev/count"
FINGERPRINT_ANNOTATION = "sideproxy.dev/fingerprint"
REPORTING_COMPONENT = "sideproxy.dev/proxy"

# Watches end server-side after this long and are re-established from the last resourceVersion;
# the client gives up a little later so that a half-open connection cannot hang us forever.
_WATCH_SECONDS = 60
_BACKOFF_START, _BACKOFF_MAX = 0.2, 5.0
# Concurrent 429s of one window compute deadlines a few milliseconds apart: not new windows.
WINDOW_SLACK = 1.0
# Reports sent at once (a 1,000-key storm is 1,000 Events; each one is a small POST).
_SEND_CONCURRENCY = 8

Snapshot = tuple[RoutingTable, dict[str, str]]

__all__ = [
    "COUNT_ANNOTATION",
    "FINGERPRINT_ANNOTATION",
    "POOL_LABEL",
    "REPORT_LABEL",
    "UNTIL_ANNOTATION",
    "ClusterSource",
    "EventReporter",
    "api_client",
    "cluster_clients",
    "default_namespace",
    "key_secret_name",
    "routing_configmap_name",
]


def default_namespace() -> str:
    """The pod's own namespace (service-account mount), else ``default``."""
    try:
        with open(SERVICE_ACCOUNT_NAMESPACE) as f:
            return f.read().strip() or "default"
    except OSError:
        return "default"


async def api_client(kubeconfig: str | None = None) -> client.ApiClient:
    """In-cluster credentials when running in a pod, else the kubeconfig file."""
    if kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
        config.load_incluster_config()  # type: ignore[no-untyped-call]
    else:
        await config.load_kube_config(config_file=kubeconfig)
    return client.ApiClient()


class ClusterSource:
    """Consistent (table, material) snapshots of one pool, as fast as the API delivers them."""

    def __init__(self, api: client.ApiClient, namespace: str, pool: str) -> None:
        self._core = client.CoreV1Api(api)
        self._namespace = namespace
        self._pool = pool
        self._table: RoutingTable | None = None
        self._material: dict[str, str] | None = None
        self._rejected: str | None = None
        self._last_raw: str | None = None
        self._changed = asyncio.Event()
        self.connected = False

    async def snapshots(self) -> AsyncIterator[Snapshot | Rejected]:
        """Yield a snapshot whenever a valid table and its material are both known and changed,
        and a :class:`Rejected` for each table that the proxy refuses."""
        watchers = [
            asyncio.create_task(self._follow("configmap", self._on_configmap)),
            asyncio.create_task(self._follow("secret", self._on_secret)),
        ]
        origin = f"configmap {self._namespace}/{routing_configmap_name(self._pool)}"
        last: tuple[str, int] | None = None
        try:
            while True:
                await self._changed.wait()
                self._changed.clear()
                if self._rejected is not None:
                    reason, self._rejected = self._rejected, None
                    yield Rejected(reason, origin)
                if self._table is None or self._material is None:
                    continue
                snapshot = self._consistent(self._table, self._material)
                identity = (snapshot[0].hash, hash(frozenset(snapshot[1].items())))
                if identity != last:
                    last = identity
                    yield snapshot
        finally:
            for task in watchers:
                task.cancel()
            await asyncio.gather(*watchers, return_exceptions=True)

    def _reject(self, reason: str) -> None:
        log.error("%s; keeping the last good table", reason)
        self._rejected = reason
        self._changed.set()

    def _consistent(self, table: RoutingTable, material: dict[str, str]) -> Snapshot:
        """Serve only keys whose material matches the table's fingerprint.

        The operator writes the Secret before the ConfigMap, so a mismatch is a moment in a
        rotation (or a hand edit); the key sits out until both sides agree.
        """
        mismatched = [
            k.name
            for k in table.keys
            if k.name not in material or fingerprint(material[k.name]) != k.fingerprint
        ]
        if mismatched:
            log.warning(
                "keys held back until table and Secret agree",
                extra={"keys": mismatched, "pool": self._pool},
            )
            material = {n: v for n, v in material.items() if n not in mismatched}
        return table, material

    def _on_configmap(self, obj: dict[str, Any] | None) -> None:
        if obj is None:
            log.warning("routing ConfigMap deleted; serving the last good table")
            return
        raw = (obj.get("data") or {}).get(TABLE_DATA_KEY)
        if raw is None:
            self._reject(f"routing ConfigMap has no {TABLE_DATA_KEY}")
            return
        if self._table is not None and raw == self._last_raw:
            return  # a metadata-only change or a re-list: nothing new to parse
        try:
            table = RoutingTable.from_json(raw)
        except ValueError as exc:
            # pydantic's message may quote the input: the table holds no secrets, but keep the
            # log short and structural anyway.
            self._reject(f"rejected routing table: {str(exc).splitlines()[0][:300]}")
            return
        if table.pool != self._pool:
            self._reject(f"rejected routing table for pool {table.pool!r} (serving {self._pool!r})")
            return
        if self._table is None or table.version != self._table.version:
            log.info("routing table version %d (%s)", table.version, table.hash[:12])
        self._table = table
        self._last_raw = raw
        self._changed.set()

    def _on_secret(self, obj: dict[str, Any] | None) -> None:
        if obj is None:
            log.warning("key Secret deleted; serving the last good keys")
            return
        material: dict[str, str] = {}
        for name, value in (obj.get("data") or {}).items():
            try:
                material[name] = base64.b64decode(value, validate=True).decode()
            except (binascii.Error, UnicodeDecodeError):
                log.error("key Secret entry %r is not base64 UTF-8; skipped", name)
        self._material = material
        self._changed.set()

    async def _follow(self, kind: str, on_object: Callable[[dict[str, Any] | None], None]) -> None:
        """List then watch one named object forever, reconnecting with capped back-off."""
        if kind == "configmap":
            name = routing_configmap_name(self._pool)
            lister: Callable[..., Awaitable[Any]] = self._core.list_namespaced_config_map
        else:
            name = key_secret_name(self._pool)
            lister = self._core.list_namespaced_secret
        selector = f"metadata.name={name}"
        backoff = _BACKOFF_START
        while True:
            try:
                response = await lister(
                    self._namespace,
                    field_selector=selector,
                    _preload_content=False,
                    _request_timeout=_WATCH_SECONDS,
                )
                listing = await response.json()
                items = listing.get("items") or []
                if items:
                    on_object(items[0])
                version = listing["metadata"]["resourceVersion"]
                self.connected = True
                backoff = _BACKOFF_START
                async with watch.Watch() as stream:
                    async for event in stream.stream(
                        lister,
                        self._namespace,
                        field_selector=selector,
                        resource_version=version,
                        timeout_seconds=_WATCH_SECONDS,
                        allow_watch_bookmarks=True,
                        _request_timeout=_WATCH_SECONDS + 15,
                    ):
                        kind_of = event["type"]
                        if kind_of in ("ADDED", "MODIFIED"):
                            on_object(event["raw_object"])
                        elif kind_of == "DELETED":
                            on_object(None)
            except asyncio.CancelledError:
                raise
            except (ApiException, aiohttp.ClientError, TimeoutError, OSError, KeyError) as exc:
                self.connected = False
                log.warning(
                    "watch of %s %s interrupted (%s); retrying in %.1fs",
                    kind,
                    name,
                    _describe(exc),
                    backoff,
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _BACKOFF_MAX)


_RETRIED = (ApiException, aiohttp.ClientError, TimeoutError, OSError)


def _refused(exc: ApiException) -> bool:
    """Refused for good (RBAC, validation): retrying the same request cannot help."""
    status = exc.status
    return isinstance(status, int) and 400 <= status < 500 and status not in (408, 429)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ApiException):
        return f"HTTP {exc.status} {exc.reason}"
    return type(exc).__name__


@dataclass(slots=True)
class _Pending:
    transition: Transition
    count: int


Slot = tuple[str, str, str]  # (key name, reason, fingerprint)


class EventReporter:
    """Tell the cluster what this replica learnt, one Event per key per cool-down window."""

    _REASONS: ClassVar[frozenset[str]] = frozenset({"RateLimited", "Unauthorized", "CircuitOpen"})

    def __init__(
        self,
        api: client.ApiClient,
        namespace: str,
        pool: str,
        instance: str | None = None,
        max_pending: int = 10_000,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._core = client.CoreV1Api(api)
        self._namespace = namespace
        self._pool = pool
        self._instance = instance or os.environ.get("POD_NAME") or socket.gethostname()
        self._pending: dict[Slot, _Pending] = {}
        self._reported: dict[Slot, float] = {}  # deadline last reported (inf: Unauthorized)
        self._folded: dict[Slot, int] = {}  # answers deduplicated away, carried to the next report
        self._wakeup = asyncio.Event()
        self._max_pending = max_pending
        self._clock = clock
        self.sent = 0
        self.dropped = 0

    @staticmethod
    def _slot(change: Transition) -> Slot:
        return (change.name, change.reason, change.fingerprint)

    def _same_window(self, slot: Slot, until: float, now: float) -> bool:
        """Whether a deadline of ``until`` is already covered by the last report of ``slot``."""
        sent = self._reported.get(slot)
        if sent is None or slot[1] == "Unauthorized":
            return False
        return now < sent and until <= sent + WINDOW_SLACK

    def report(self, transitions: list[Transition]) -> None:
        """Non-blocking; called on the request path."""
        now = self._clock()
        for change in transitions:
            if change.reason not in self._REASONS:
                continue
            slot = self._slot(change)
            until = change.until if change.until is not None else math.inf
            pending = self._pending.get(slot)
            if pending is not None:
                pending.count += 1
                if (pending.transition.until or 0.0) < until:
                    pending.transition = change
            elif self._same_window(slot, until, now):
                self._folded[slot] = self._folded.get(slot, 0) + 1
            elif len(self._pending) < self._max_pending:
                self._pending[slot] = _Pending(change, 1 + self._folded.pop(slot, 0))
            else:
                self.dropped += 1
        if self._pending:
            self._wakeup.set()

    async def run(self) -> None:
        """Drain reports to the API until cancelled; failures are retried with back-off."""
        backoff = _BACKOFF_START
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._pending:
                batch = list(itertools.islice(self._pending.items(), _SEND_CONCURRENCY))
                previous: dict[Slot, float | None] = {}
                for slot, pending in batch:
                    del self._pending[slot]
                    # Counted as reported from now on, so that the answers still arriving for
                    # this window while the POST is in flight fold into it.
                    previous[slot] = self._reported.get(slot)
                    until = pending.transition.until
                    self._reported[slot] = until if until is not None else math.inf
                results = await asyncio.gather(
                    *(self._send(pending) for _, pending in batch), return_exceptions=True
                )
                failed: BaseException | None = None
                for (slot, pending), result in zip(batch, results, strict=True):
                    if isinstance(result, asyncio.CancelledError):
                        raise result
                    if isinstance(result, ApiException) and _refused(result):
                        log.error(
                            "report %s for %s refused (%s); dropped",
                            slot[1],
                            slot[0],
                            _describe(result),
                        )
                        self.dropped += 1
                    elif isinstance(result, _RETRIED):
                        failed = result
                        self._unsent(slot, previous[slot])
                        self._requeue(slot, pending)
                    elif isinstance(result, BaseException):
                        log.error(
                            "report %s for %s failed (%s); dropped",
                            slot[1],
                            slot[0],
                            type(result).__name__,
                        )
                        self.dropped += 1
                    else:
                        self.sent += 1
                if failed is not None:
                    log.warning("could not report to the API (%s); retrying", _describe(failed))
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, _BACKOFF_MAX)
                else:
                    backoff = _BACKOFF_START
            self._prune()

    def _prune(self) -> None:
        """Forget windows long over (keys come and go, values rotate)."""
        if len(self._reported) < 4096:
            return
        now = self._clock()
        self._reported = {s: until for s, until in self._reported.items() if now < until < math.inf}
        self._folded = {s: n for s, n in self._folded.items() if s in self._reported}

    def _unsent(self, slot: Slot, previous: float | None) -> None:
        if previous is None:
            self._reported.pop(slot, None)
        else:
            self._reported[slot] = previous

    def _requeue(self, slot: Slot, pending: _Pending) -> None:
        """Put a report that could not be sent back, merged with any newer one for its slot."""
        pending.count += self._folded.pop(slot, 0)
        newer = self._pending.get(slot)
        if newer is None:
            self._pending[slot] = pending
            return
        newer.count += pending.count
        if (newer.transition.until or 0.0) < (pending.transition.until or 0.0):
            newer.transition = pending.transition

    async def _send(self, pending: _Pending) -> None:
        change = pending.transition
        stamp = datetime.now(UTC)
        if change.until is not None:
            until_text = datetime.fromtimestamp(change.until, UTC).isoformat(timespec="seconds")
            message = f"{change.reason}: out of rotation until {until_text}"
        else:
            message = f"{change.reason}: out of rotation until its Secret or spec changes"
        if change.health is KeyHealth.OPEN:
            message += " (breaker open after repeated upstream failures)"
        annotations = {
            FINGERPRINT_ANNOTATION: change.fingerprint,
            COUNT_ANNOTATION: str(pending.count),
        }
        if change.until is not None:
            annotations[UNTIL_ANNOTATION] = f"{change.until:.3f}"
        body: Any = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {
                "generateName": f"{change.name}.",
                "namespace": self._namespace,
                "labels": {REPORT_LABEL: "true", POOL_LABEL: self._pool},
                "annotations": annotations,
            },
            "involvedObject": {
                "apiVersion": f"{API_GROUP}/{API_VERSION}",
                "kind": "PoolKey",
                "name": change.name,
                "namespace": self._namespace,
            },
            "reason": change.reason,
            "message": f"{message}; reported by {self._instance} ({pending.count}x)",
            "type": "Warning",
            "count": pending.count,
            "firstTimestamp": stamp.isoformat(),
            "lastTimestamp": stamp.isoformat(),
            "source": {"component": "sideproxy-proxy", "host": self._instance},
            "reportingComponent": REPORTING_COMPONENT,
            "reportingInstance": self._instance[:128],
        }
        await self._core.create_namespaced_event(self._namespace, body, _request_timeout=10)


@contextlib.asynccontextmanager
async def cluster_clients(kubeconfig: str | None) -> AsyncIterator[client.ApiClient]:
    api = await api_client(kubeconfig)
    try:
        yield api
    finally:
        await api.close()
