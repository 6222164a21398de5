"""The kopf handlers: indices of the three watched kinds, and event handlers that only poke.

No change-detecting handlers (``on.create`` / ``on.update``): those make kopf annotate every
object with its last-handled state, a write per PoolKey per change. Indices plus ``on.event``
write nothing; the reconciler (``_reconcile.py``) decides what to write, once per pool.

kopf runs ``on.event`` handlers only after every index has its initial listing, so the first
reconcile of each pool already sees all its keys and Secrets.

Proxy reports are core/v1 Events; kopf lists and watches only the unconsumed ones (the label
selector ``_reports.REPORT_SELECTOR``, set server-side in ``_runner.kopf_settings``). A report
that gets consumed leaves that selection, which the watch delivers as a DELETED event: every
replica drops it from its book.
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
    SecretMeta,
    SecretUse,
    key_secret_use,
    pool_secret_use,
)
from sideproxy.operator._reports import REPORT_LABEL
from sideproxy.operator._vkeys import VirtualKeyRecord, vkey_secret_use

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
                secret_meta=kwargs["secret_meta"],
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

    @kopf.index("v1", "secrets", id="secret_meta", registry=registry)
    async def secret_meta(
        body: kopf.Body, name: str, namespace: str | None, **_: Any
    ) -> dict[SecretId, SecretMeta]:
        return {(namespace or "", name): SecretMeta.of(body)}

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

    @kopf.on.event("v1", "secrets", id="secret_changed", registry=registry)
    async def secret_changed(event: kopf.RawEvent, body: kopf.Body, **_: Any) -> None:
        if runtime.reconciler is not None:
            runtime.reconciler.secret_event(body, _deleted(event))

    @kopf.on.event("v1", "events", id="report", labels={REPORT_LABEL: "true"}, registry=registry)
    async def report(event: kopf.RawEvent, body: kopf.Body, **_: Any) -> None:
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
