"""Cluster mode wiring: ``sideproxy.proxy.kube`` (ClusterSource + EventReporter) as a source.

``kube`` (and with it ``kubernetes_asyncio``) is imported only when cluster mode starts, so the
standalone proxy never pays for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import os
import socket
from collections.abc import AsyncIterator
from typing import Any

from sideproxy.pool import Transition
from sideproxy.proxy.sources import Rejected, Snapshot, SourceEvent

__all__ = ["KubeSource"]

log = logging.getLogger("sideproxy.proxy")


class KubeSource:
    """Snapshots from the pool's ConfigMap + Secret; transitions reported as PoolKey Events.

    Pass :meth:`report` as ``create_app(on_transitions=...)``: reports made before the API
    client is up are dropped (the pool will learn them again on the next 429).
    """

    def __init__(self, pool: str, namespace: str | None, kubeconfig: str | None) -> None:
        self.pool = pool
        self.namespace = namespace
        self.kubeconfig = kubeconfig
        self._reporter: Any = None
        self._admission: Any = None  # set by create_app: virtual-key limits to share

    def attach_admission(self, admission: Any) -> None:
        """``create_app`` hands over the forwarder's admission (``_admit.Admission``)."""
        self._admission = admission

    def __repr__(self) -> str:
        return f"KubeSource(pool={self.pool!r}, namespace={self.namespace!r})"

    def report(self, transitions: list[Transition]) -> None:
        reporter = self._reporter
        if reporter is not None:
            reporter.report(transitions)

    async def snapshots(self) -> AsyncIterator[SourceEvent]:
        kube = importlib.import_module("sideproxy.proxy.kube")
        async with kube.cluster_clients(self.kubeconfig) as api:
            namespace = self.namespace or kube.default_namespace()
            origin = f"configmap {namespace}/{kube.routing_configmap_name(self.pool)}"
            source = kube.ClusterSource(api, namespace, self.pool)
            self._reporter = kube.EventReporter(api, namespace, self.pool)
            task = asyncio.create_task(self._reporter.run(), name="sideproxy-event-reporter")
            usage = self._usage_channel(api, namespace)
            try:
                async for event in source.snapshots():
                    if isinstance(event, Rejected):
                        yield event
                    else:
                        yield Snapshot(event[0], event[1], origin)
            finally:
                self._reporter = None
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                if usage is not None:
                    usage.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await usage

    def _usage_channel(self, api: Any, namespace: str) -> asyncio.Task[None] | None:
        """Virtual-key usage and claims through this replica's ReplicaReport (``_vkshare``)."""
        if self._admission is None:
            return None
        vkshare = importlib.import_module("sideproxy.proxy._vkshare")
        wire = importlib.import_module("sideproxy.wire")
        base = os.environ.get("POD_NAME") or socket.gethostname()
        uid = os.environ.get("POD_UID")
        owner = wire.PodRef(base, uid) if uid and os.environ.get("POD_NAME") else None
        replica = wire.replica_name(base, os.getpid())
        channel = vkshare.UsageChannel(
            api, namespace, self.pool, replica, self._admission, owner=owner
        )
        return asyncio.create_task(channel.run(), name="sideproxy-vkey-usage")
