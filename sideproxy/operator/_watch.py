"""A list-then-watch of one core/v1 kind's *metadata*, in pages, outside kopf.

Why not a kopf index: kopf lists and watches whole objects. For Secrets that means every value
in the namespace (or the cluster: Helm keeps each release in a Secret) crosses the wire and sits
in the process at start-up, though the operator needs only the few Secrets that PoolKeys and
``clientAuth`` name. Here the API server sends ``PartialObjectMetadata`` (name, labels,
annotations, resourceVersion; never ``data``), a list page holds at most ``page`` objects, and
the consumer keeps what it needs of each event and drops the rest. So an unrelated Secret costs
one small metadata event, whatever its size, and memory does not grow with their number.

The consumer gets ``on_event(metadata, deleted)`` for every object (listed objects count as
added) and ``on_listed(namespace, {(namespace, name), ...})`` after each complete list, so it
can drop what it tracked and is gone (a relist after ``410 Gone`` may skip a deletion).
``namespace`` ``None`` watches all namespaces.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from kubernetes_asyncio.client.exceptions import ApiException

from sideproxy.operator._kube import KubeApi, describe

log = logging.getLogger("sideproxy.operator")

Meta = Mapping[str, Any]


class Gone(Exception):
    """The watch's resourceVersion is too old (HTTP 410): list again."""


class MetaWatch:
    def __init__(
        self,
        api: KubeApi,
        plural: str,
        namespaces: Sequence[str],
        on_event: Callable[[Meta, bool], None],
        *,
        on_listed: Callable[[str | None, set[tuple[str, str]]], None] = lambda ns, names: None,
        label_selector: str = "",
        page: int = 100,
        server_timeout: int = 120,
        retry_max: float = 10.0,
    ) -> None:
        self._api = api
        self.plural = plural
        self._namespaces: list[str | None] = list(namespaces) or [None]
        self._on_event = on_event
        self._on_listed = on_listed
        self._selector = label_selector
        self._page = page
        self._server_timeout = server_timeout
        self._retry_max = retry_max
        self.listed = asyncio.Event()  # set once every namespace had its first complete list
        self._pending = len(self._namespaces)

    async def run(self) -> None:
        await asyncio.gather(*(self._follow(ns) for ns in self._namespaces))

    def _params(self) -> dict[str, str]:
        return {"labelSelector": self._selector} if self._selector else {}

    async def _follow(self, namespace: str | None) -> None:
        version: str | None = None
        failures = 0
        first = True
        while True:
            try:
                if version is None:
                    version = await self._list(namespace)
                    if first:
                        first = False
                        self._pending -= 1
                        if self._pending == 0:
                            self.listed.set()
                version = await self._watch(namespace, version)
                failures = 0
            except Gone:
                version = None
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a watch must outlive anything: log, back off, retry
                failures += 1
                delay = min(self._retry_max, 0.2 * 2 ** min(failures, 8))
                if failures == 1 or failures % 10 == 0:
                    log.warning(
                        "watch of %s in %s: %s; again in %.1fs",
                        self.plural,
                        namespace or "all namespaces",
                        describe(exc),
                        delay,
                    )
                await asyncio.sleep(delay)
                if isinstance(exc, ApiException) and exc.status == 410:
                    version = None

    async def _list(self, namespace: str | None) -> str:
        names: set[tuple[str, str]] = set()
        params = {**self._params(), "limit": str(self._page)}
        while True:
            page = await self._api.list_meta(self.plural, namespace, params)
            for item in page.get("items") or ():
                meta = item.get("metadata") or {}
                names.add((str(meta.get("namespace", "")), str(meta.get("name", ""))))
                self._on_event(meta, False)
            listing = page.get("metadata") or {}
            token = listing.get("continue")
            if not token:
                self._on_listed(namespace, names)
                return str(listing.get("resourceVersion", ""))
            params["continue"] = str(token)

    async def _watch(self, namespace: str | None, version: str) -> str:
        params = {
            **self._params(),
            "resourceVersion": version,
            "timeoutSeconds": str(self._server_timeout),
        }
        async for event in self._api.watch_meta(
            self.plural, namespace, params, self._server_timeout + 30
        ):
            kind = event.get("type")
            obj = event.get("object") or {}
            meta = obj.get("metadata") or {}
            if kind == "ERROR":
                if obj.get("code") == 410:
                    raise Gone
                raise ValueError(f"watch error: {str(obj.get('message', ''))[:200]}")
            version = str(meta.get("resourceVersion") or version)
            if kind in ("ADDED", "MODIFIED", "DELETED"):
                self._on_event(meta, kind == "DELETED")
        return version
