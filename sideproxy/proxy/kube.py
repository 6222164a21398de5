"""Cluster mode: the pool's configuration from the API, and its health on the health channel.

:class:`KubeSource` is what ``sideproxy serve --pool NAME`` runs. It is two streams that never
mix (issue 15: health on the config channel rebuilt every replica's pool on every 429):

* **Configuration** — :class:`ClusterSource` watches exactly two objects, ``<pool>-routing``
  (ConfigMap) and ``<pool>-keys`` (Secret), by ``fieldSelector=metadata.name=...`` so that RBAC
  can grant get/list/watch on those two ``resourceNames`` and nothing else. It watches the API
  instead of a mounted volume because kubelet refreshes volumes only every minute or so. A table
  that does not parse, fails its hash or names another pool is yielded as a
  :class:`~sideproxy.proxy.sources.Rejected` (logged, counted, shown in ``/sideproxy/status``)
  and the proxy keeps serving the last good one.
* **Health and virtual-key usage** — one :class:`~sideproxy.proxy._channel.ReportChannel`:
  this replica's ``ReplicaReport`` out, the pool's other reports in, with one writer and one
  watch for its two parts, :class:`~sideproxy.proxy._replicas.HealthPart` (applied to the
  live pool as deltas) and, when the app admits virtual keys,
  :class:`~sideproxy.proxy._vkshare.UsagePart` (fed to its ``Admission``).

The watches survive anything (``_watch.follow``): the API server gone, a malformed event, a
surprise in a handler — logged, retried with back-off (0.2 s doubling to 5 s) while the proxy
serves on. Neither ever logs a key value: material is only ever handed to the pool.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from kubernetes_asyncio import client

from sideproxy.kubeclient import api_client
from sideproxy.models import (
    TABLE_DATA_KEY,
    RoutingTable,
    fingerprint,
    key_secret_name,
    routing_configmap_name,
)
from sideproxy.pool import ManagedCreditPool, Transition
from sideproxy.proxy._admit import Admission
from sideproxy.proxy._channel import ReportChannel
from sideproxy.proxy._replicas import HealthPart
from sideproxy.proxy._vkshare import UsagePart
from sideproxy.proxy._watch import Lister, follow
from sideproxy.proxy.sources import Rejected, Snapshot, SourceEvent
from sideproxy.wire import PodRef, default_namespace, replica_name

log = logging.getLogger("sideproxy.proxy.kube")

# How long a starting replica waits for the pool's reports before it serves its first table:
# long enough to learn the fleet's cool-downs on a healthy API server, short enough that a slow
# one does not keep a replica out of service (it then learns them a moment later).
_INITIAL_REPORTS_TIMEOUT = 2.0

TableAndKeys = tuple[RoutingTable, dict[str, str]]

__all__ = ["ClusterSource", "KubeSource", "pod_ref"]


def pod_ref(env: Mapping[str, str] | None = None) -> PodRef | None:
    """The replica's Pod from the downward API (``POD_NAME``, ``POD_UID``), if both are set."""
    env = os.environ if env is None else env
    name, uid = env.get("POD_NAME", "").strip(), env.get("POD_UID", "").strip()
    return PodRef(name, uid) if name and uid else None


class KubeSource:
    """Snapshots from the pool's ConfigMap + Secret; health through the pool's ReplicaReports.

    The app calls :meth:`attach` with its live pool; pass :meth:`report` as
    ``create_app(on_transitions=...)``. Transitions before the API client is up are not
    reported (the pool keeps them; the next heartbeat carries its counters).
    """

    def __init__(
        self,
        pool: str,
        namespace: str | None = None,
        kubeconfig: str | None = None,
        *,
        replica: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.pool = pool
        self.namespace = namespace
        self.kubeconfig = kubeconfig
        self.replica = replica  # default: the pod (or host) name and the process id
        self._clock = clock
        self._target: ManagedCreditPool | None = None
        self.channel: ReportChannel | None = None
        self.health: HealthPart | None = None
        self._admission: Admission | None = None  # virtual-key limits (issue 12, _vkshare)

    def __repr__(self) -> str:
        return f"KubeSource(pool={self.pool!r}, namespace={self.namespace!r})"

    def attach(self, pool: ManagedCreditPool) -> None:
        self._target = pool
        if self.health is not None:
            self.health.attach(pool)

    def attach_admission(self, admission: Admission) -> None:
        """The app hands over its virtual-key admission: its usage and claims travel in this
        replica's ReplicaReport too (``_vkshare.UsagePart``, on the same channel)."""
        self._admission = admission

    def report(self, transitions: list[Transition]) -> None:
        health = self.health
        if health is not None:
            health.record(transitions)

    async def snapshots(self) -> AsyncIterator[SourceEvent]:
        async with api_client(self.kubeconfig) as api:
            namespace = self.namespace or default_namespace()
            origin = f"configmap {namespace}/{routing_configmap_name(self.pool)}"
            replica = self.replica or replica_name(
                os.environ.get("POD_NAME") or socket.gethostname(), os.getpid()
            )
            channel = ReportChannel(
                api, namespace, self.pool, replica, pod_ref(), clock=self._clock
            )
            health = HealthPart(self.pool, replica, poke=channel.poke, clock=self._clock)
            channel.add(health)
            if self._target is not None:
                health.attach(self._target)
            if self._admission is not None:
                health.ledger.tokens = self._admission.pool_key_tokens  # PoolKeys' tokens
                channel.add(
                    UsagePart(
                        self.pool, replica, self._admission, poke=channel.poke, clock=self._clock
                    )
                )
            self.channel, self.health = channel, health
            task = asyncio.create_task(channel.run(), name="sideproxy-report-channel")
            try:
                async for event in ClusterSource(api, namespace, self.pool).snapshots():
                    if isinstance(event, Rejected):
                        yield event
                        continue
                    if not channel.listed.is_set():
                        # A starting replica learns the fleet's health before its first request;
                        # a slow or refusing API server only delays that, never the table.
                        with contextlib.suppress(TimeoutError):
                            async with asyncio.timeout(_INITIAL_REPORTS_TIMEOUT):
                                await channel.listed.wait()
                    table, material = event
                    yield Snapshot(table, material, origin)
                    # The app has configured its pool with this table (the consumer applies an
                    # event before it asks for the next): apply what the fleet knows to it.
                    health.configured({k.name: k.fingerprint for k in table.keys})
            finally:
                self.channel = self.health = None
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)


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

    async def snapshots(self) -> AsyncIterator[TableAndKeys | Rejected]:
        """Yield (table, material) whenever a valid table and its material are both known and
        changed, and a :class:`Rejected` for each table that the proxy refuses."""
        watchers = [
            asyncio.create_task(self._watch("configmap", self._on_configmap)),
            asyncio.create_task(self._watch("secret", self._on_secret)),
        ]
        for task in watchers:
            task.add_done_callback(lambda _: self._changed.set())
        origin = f"configmap {self._namespace}/{routing_configmap_name(self._pool)}"
        last: tuple[str, int] | None = None
        try:
            while True:
                await self._changed.wait()
                self._changed.clear()
                for task in watchers:
                    if task.done():  # never, by design; if it happens, say so and let the app retry
                        raise RuntimeError("a watch of the pool's configuration ended")
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

    def _consistent(self, table: RoutingTable, material: dict[str, str]) -> TableAndKeys:
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

    def _on_configmap(self, obj: Mapping[str, Any] | None) -> None:
        if obj is None:
            log.warning("routing ConfigMap deleted; serving the last good table")
            return
        data = obj.get("data") or {}
        raw = data.get(TABLE_DATA_KEY) if isinstance(data, Mapping) else None
        if not isinstance(raw, str):
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

    def _on_secret(self, obj: Mapping[str, Any] | None) -> None:
        if obj is None:
            log.warning("key Secret deleted; serving the last good keys")
            return
        data = obj.get("data") or {}
        if not isinstance(data, Mapping):
            log.error("key Secret has no data map; serving the last good keys")
            return
        material: dict[str, str] = {}
        for name, value in data.items():
            try:
                material[str(name)] = base64.b64decode(str(value), validate=True).decode()
            except (binascii.Error, UnicodeDecodeError):
                log.error("key Secret entry %r is not base64 UTF-8; skipped", name)
        self._material = material
        self._changed.set()

    def _watch(self, kind: str, on_object: Callable[[Mapping[str, Any] | None], None]) -> Any:
        """List then watch one named object forever (see ``_watch.follow``)."""
        lister: Lister
        if kind == "configmap":
            name = routing_configmap_name(self._pool)
            lister = self._core.list_namespaced_config_map
        else:
            name = key_secret_name(self._pool)
            lister = self._core.list_namespaced_secret

        def on_listing(items: list[Mapping[str, Any]]) -> None:
            if items:
                on_object(items[0])

        def on_event(event: str, obj: Mapping[str, Any]) -> None:
            on_object(None if event == "DELETED" else obj)

        def on_connected(up: bool) -> None:
            self.connected = up

        return follow(
            f"{kind} {self._namespace}/{name}",
            lister,
            {"namespace": self._namespace, "field_selector": f"metadata.name={name}"},
            on_listing,
            on_event,
            on_connected=on_connected,
        )
