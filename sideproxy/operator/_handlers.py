"""The kopf handlers: indices of the three watched kinds, and event handlers that only poke.

No change-detecting handlers (``on.create`` / ``on.update``): those make kopf annotate every
object with its last-handled state, a write per PoolKey per change. Indices plus ``on.event``
write nothing; the reconciler (``_reconcile.py``) decides what to write, once per pool.

kopf runs ``on.event`` handlers only after every index has its initial listing, so the first
reconcile of each pool already sees all its keys. Secrets and our ConfigMaps are not kopf's:
``_watch.MetaWatch`` follows their metadata only (kopf would list every Secret value in scope),
and a reconcile reads the few referenced Secrets by name.

Proxy health arrives as ReplicaReports (``sideproxy/wire.py``), indexed by pool; core/v1
Events are never watched (anyone who may create Events could forge them).
"""

from __future__ import annotations

from typing import Any, Protocol

import kopf

from sideproxy.models import API_GROUP, API_VERSION
from sideproxy.operator._reconcile import Indices, Reconciler
from sideproxy.operator._records import (
    KeyRecord,
    PoolId,
    PoolRecord,
    ReportRecord,
    SecretUse,
    key_secret_use,
    pool_secret_use,
    report_pool,
)
from sideproxy.operator._vkeys import VirtualKeyRecord, vkey_secret_use
from sideproxy.wire import PLURAL as REPORTS

SecretId = tuple[str, str]


class Runtime(Protocol):
    """What the handlers need from the running operator (see ``_runner.Runtime``)."""

    reconciler: Reconciler | None

    async def connection_info(self) -> kopf.ConnectionInfo: ...

    async def start(self, indices: Indices) -> None: ...

    async def stop(self) -> None: ...

    def probe(self) -> dict[str, Any]: ...


def _deleted(event: kopf.RawEvent) -> bool:
    return event.get("type") == "DELETED"


def build_registry(runtime: Runtime) -> kopf.OperatorRegistry:
    registry = kopf.OperatorRegistry()

    @kopf.on.login(id="login", registry=registry)
    async def login(**_: Any) -> kopf.ConnectionInfo:
        return await runtime.connection_info()

    @kopf.on.startup(id="startup", registry=registry)
    async def startup(**kwargs: Any) -> None:
        # kopf passes every index to every handler as a kwarg named by the index's id.
        await runtime.start(
            Indices(
                keys_by_pool=kwargs["keys_by_pool"],
                pools_by_name=kwargs["pools_by_name"],
                key_refs_by_secret=kwargs["key_refs_by_secret"],
                pool_refs_by_secret=kwargs["pool_refs_by_secret"],
                reports_by_pool=kwargs["reports_by_pool"],
                vkeys_by_pool=kwargs["vkeys_by_pool"],
                vkey_refs_by_secret=kwargs["vkey_refs_by_secret"],
            )
        )

    @kopf.on.cleanup(id="cleanup", registry=registry)
    async def cleanup(**_: Any) -> None:
        await runtime.stop()

    @kopf.on.probe(id="sideproxy", registry=registry)
    async def probe(**_: Any) -> dict[str, Any]:
        return runtime.probe()

    # -- indices ------------------------------------------------------------------------------

    @kopf.index(API_GROUP, API_VERSION, "poolkeys", id="keys_by_pool", registry=registry)
    async def keys_by_pool(
        body: kopf.Body, namespace: str | None, **_: Any
    ) -> dict[PoolId, KeyRecord]:
        record = KeyRecord.of(body)
        return {(namespace or "", record.pool): record}

    @kopf.index(API_GROUP, API_VERSION, "poolkeys", id="key_refs_by_secret", registry=registry)
    async def key_refs_by_secret(
        body: kopf.Body, namespace: str | None, **_: Any
    ) -> dict[SecretId, SecretUse]:
        use = key_secret_use(body)
        return {} if use is None else {(namespace or "", use[0]): use[1]}

    @kopf.index(API_GROUP, API_VERSION, "creditpools", id="pools_by_name", registry=registry)
    async def pools_by_name(
        body: kopf.Body, name: str, namespace: str | None, **_: Any
    ) -> dict[PoolId, PoolRecord]:
        return {(namespace or "", name): PoolRecord.of(body)}

    @kopf.index(API_GROUP, API_VERSION, "creditpools", id="pool_refs_by_secret", registry=registry)
    async def pool_refs_by_secret(
        body: kopf.Body, namespace: str | None, **_: Any
    ) -> dict[SecretId, SecretUse]:
        use = pool_secret_use(body)
        return {} if use is None else {(namespace or "", use[0]): use[1]}

    @kopf.index(API_GROUP, API_VERSION, REPORTS, id="reports_by_pool", registry=registry)
    async def reports_by_pool(
        body: kopf.Body, namespace: str | None, **_: Any
    ) -> dict[PoolId, ReportRecord]:
        return {(namespace or "", report_pool(body)): ReportRecord.of(body)}

    register_vkeys(registry, runtime)  # issue 12: VirtualKeys and their usage (_vkeys.py)

    # -- triggers -----------------------------------------------------------------------------

    @kopf.on.event(API_GROUP, API_VERSION, "poolkeys", id="poolkey_changed", registry=registry)
    async def poolkey_changed(event: kopf.RawEvent, body: kopf.Body, **_: Any) -> None:
        if runtime.reconciler is not None:
            runtime.reconciler.key_event(body, _deleted(event))

    @kopf.on.event(API_GROUP, API_VERSION, "creditpools", id="pool_changed", registry=registry)
    async def pool_changed(event: kopf.RawEvent, body: kopf.Body, **_: Any) -> None:
        if runtime.reconciler is not None:
            runtime.reconciler.pool_event(body, _deleted(event))

    @kopf.on.event(API_GROUP, API_VERSION, REPORTS, id="report_changed", registry=registry)
    async def report_changed(event: kopf.RawEvent, body: kopf.Body, **_: Any) -> None:
        if runtime.reconciler is not None:
            runtime.reconciler.report_event(body, _deleted(event))

    return registry


def register_vkeys(registry: kopf.OperatorRegistry, runtime: Runtime) -> None:
    """VirtualKeys: two indices (by pool, by Secret), their events, and the pool's
    ReplicaReports for their usage (see ``_vkeys.py``)."""

    @kopf.index(API_GROUP, API_VERSION, "virtualkeys", id="vkeys_by_pool", registry=registry)
    async def vkeys_by_pool(
        body: kopf.Body, namespace: str | None, **_: Any
    ) -> dict[PoolId, VirtualKeyRecord]:
        record = VirtualKeyRecord.of(body)
        return {(namespace or "", record.pool): record}

    @kopf.index(API_GROUP, API_VERSION, "virtualkeys", id="vkey_refs_by_secret", registry=registry)
    async def vkey_refs_by_secret(
        body: kopf.Body, namespace: str | None, **_: Any
    ) -> dict[SecretId, SecretUse]:
        use = vkey_secret_use(body)
        return {} if use is None else {(namespace or "", use[0]): use[1]}

    @kopf.on.event(API_GROUP, API_VERSION, "virtualkeys", id="vkey_changed", registry=registry)
    async def vkey_changed(event: kopf.RawEvent, body: kopf.Body, **_: Any) -> None:
        if runtime.reconciler is not None:
            runtime.reconciler.vkey_event(body, _deleted(event))

    @kopf.on.event(API_GROUP, API_VERSION, "replicareports", id="vkey_usage", registry=registry)
    async def vkey_usage(event: kopf.RawEvent, body: kopf.Body, **_: Any) -> None:
        if runtime.reconciler is not None:
            await runtime.reconciler.report_usage(body, _deleted(event))
