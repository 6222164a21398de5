"""Lease-based leader election (coordination.k8s.io/v1), client-go style.

Why a Lease and not kopf peering: kopf peering pauses only kopf's own handlers, and two
replicas of one Deployment share a priority, in which case kopf merely warns and both keep
going. A Lease gives real mutual exclusion for everything that writes, including the per-pool
timers that run outside kopf's handlers. Every replica runs kopf with ``standalone=True`` and
keeps its indices warm; only the holder of the Lease writes, so a fail-over needs no re-listing.

Expiry is judged by the local monotonic clock since the Lease record last *changed* (as
client-go does), never by comparing our clock with the timestamps another node wrote.

Why not ``kubernetes_asyncio.leaderelection`` (checked against 36.1): it never releases the
Lease, so after every rolling update the stand-by would wait a whole Lease duration (here the
leader releases on SIGTERM, after in-flight reconciles finish, and the stand-by takes over at
once; ``tests/operator/test_leader.py`` and the fail-over tests pin that); its ``run()`` returns
for good after the first loss (no re-acquire); it refuses a retry period under 1 s; and it runs
the leader's work as a task it cancels on loss, where here every replica keeps running warm and
only the writes wait for leadership (``Leadership.wait_leading``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Protocol

from kubernetes_asyncio.client.exceptions import ApiException

from sideproxy.operator._kube import Conflict, KubeApi, NotFound, describe

log = logging.getLogger("sideproxy.operator.leader")


class Leadership(Protocol):
    @property
    def leading(self) -> bool: ...

    async def wait_leading(self) -> None: ...


class AlwaysLeader:
    """Leader election switched off: a single replica by contract."""

    leading = True

    async def wait_leading(self) -> None:
        return None


def _micro_time() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


class LeaseElector:
    def __init__(
        self,
        api: KubeApi,
        namespace: str,
        name: str,
        identity: str,
        *,
        lease_seconds: float = 15.0,
        renew_seconds: float | None = None,
        retry_seconds: float | None = None,
        on_change: Callable[[bool], None] = lambda leading: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._api = api
        self.namespace = namespace
        self.name = name
        self.identity = identity
        self._duration = max(1.0, lease_seconds)
        self._renew = renew_seconds if renew_seconds is not None else self._duration * 2 / 3
        self._retry = retry_seconds if retry_seconds is not None else self._duration / 5
        self._on_change = on_change
        self._clock = clock
        self._leading = asyncio.Event()
        self._observed: tuple[str, float] | None = None  # (resourceVersion, when first seen)
        self._last_renew = 0.0

    @property
    def leading(self) -> bool:
        return self._leading.is_set()

    async def wait_leading(self) -> None:
        await self._leading.wait()

    def _set(self, leading: bool) -> None:
        if leading == self.leading:
            return
        if leading:
            self._leading.set()
            log.info("acquired Lease %s/%s as %s", self.namespace, self.name, self.identity)
        else:
            self._leading.clear()
            log.warning("lost Lease %s/%s; standing by", self.namespace, self.name)
        self._on_change(leading)

    async def run(self) -> None:
        """Acquire, renew and re-acquire until cancelled; then release if held."""
        try:
            while True:
                try:
                    held = await self.try_acquire_or_renew()
                except (ApiException, OSError, TimeoutError) as exc:
                    log.warning("Lease %s/%s: %s", self.namespace, self.name, describe(exc))
                    held = False
                now = self._clock()
                if held:
                    self._last_renew = now
                    self._set(True)
                elif self.leading and now - self._last_renew >= self._renew:
                    self._set(False)
                await asyncio.sleep(self._retry)
        finally:
            if self.leading:
                self._leading.clear()
                with contextlib.suppress(Exception):
                    await asyncio.shield(self.release())

    async def try_acquire_or_renew(self) -> bool:
        lease = await self._api.get_lease(self.namespace, self.name)
        now = self._clock()
        if lease is None:
            body = self._body(None, transitions=0, acquired=_micro_time())
            try:
                created = await self._api.save_lease(self.namespace, body)
            except Conflict:
                return False
            self._observe(created, now)
            return True
        spec: dict[str, Any] = lease.get("spec") or {}
        rv = str((lease.get("metadata") or {}).get("resourceVersion", ""))
        self._observe(lease, now)
        holder = spec.get("holderIdentity") or ""
        duration = float(spec.get("leaseDurationSeconds") or self._duration)
        assert self._observed is not None
        expired = now - self._observed[1] >= duration
        if holder and holder != self.identity and not expired:
            return False
        ours = holder == self.identity
        body = self._body(
            rv,
            transitions=int(spec.get("leaseTransitions") or 0) + (0 if ours else 1),
            acquired=str(spec.get("acquireTime"))
            if ours and spec.get("acquireTime")
            else _micro_time(),
        )
        try:
            saved = await self._api.save_lease(self.namespace, body)
        except (Conflict, NotFound):
            return False
        self._observe(saved, self._clock())
        return True

    async def release(self) -> None:
        lease = await self._api.get_lease(self.namespace, self.name)
        if lease is None or (lease.get("spec") or {}).get("holderIdentity") != self.identity:
            return
        rv = str((lease.get("metadata") or {}).get("resourceVersion", ""))
        body = self._body(
            rv, transitions=int(lease["spec"].get("leaseTransitions") or 0), acquired=None
        )
        body["spec"]["holderIdentity"] = ""
        body["spec"]["leaseDurationSeconds"] = 1
        with contextlib.suppress(Conflict, NotFound):
            await self._api.save_lease(self.namespace, body)
            log.info("released Lease %s/%s", self.namespace, self.name)

    def _observe(self, lease: dict[str, Any], now: float) -> None:
        rv = str((lease.get("metadata") or {}).get("resourceVersion", ""))
        if self._observed is None or self._observed[0] != rv:
            self._observed = (rv, now)

    def _body(self, rv: str | None, *, transitions: int, acquired: str | None) -> dict[str, Any]:
        meta: dict[str, Any] = {"name": self.name, "namespace": self.namespace}
        if rv:
            meta["resourceVersion"] = rv
        spec: dict[str, Any] = {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": round(self._duration),
            "renewTime": _micro_time(),
            "leaseTransitions": transitions,
        }
        if acquired:
            spec["acquireTime"] = acquired
        return {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": meta,
            "spec": spec,
        }
