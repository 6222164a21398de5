"""An in-memory API server behind the real ``KubeApi`` plumbing, and index builders.

Only what the reconciler calls: GET/POST/PUT of ConfigMaps, Secrets and Leases (with
resourceVersion conflicts), PATCH of ``/status`` (JSON merge patch), POST of Events.
"""

from __future__ import annotations

import base64
import copy
import itertools
import re
from collections import defaultdict
from collections.abc import Callable, Mapping
from typing import Any

from sideproxy.models import API_GROUP, API_VERSION
from sideproxy.operator._kube import Conflict, KubeApi, NotFound
from sideproxy.operator._reconcile import Indices
from sideproxy.operator._records import (
    KeyRecord,
    PoolRecord,
    ReportRecord,
    key_secret_use,
    pool_secret_use,
    report_pool,
)
from sideproxy.wire import ReplicaReportSpec, report_body

_PATH = re.compile(
    r"^/(?:api/v1|apis/(?P<group>[^/]+)/(?P<version>[^/]+))/namespaces/(?P<ns>[^/]+)/"
    r"(?P<plural>[^/]+)(?:/(?P<name>[^/]+))?(?:/(?P<sub>[^/]+))?$"
)


def merge_patch(target: Any, patch: Any) -> Any:
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


class FakeKube(KubeApi):
    def __init__(self) -> None:
        super().__init__(client=None)  # type: ignore[arg-type]
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.events: list[dict[str, Any]] = []
        self.calls: list[tuple[str, str]] = []
        self._rv = itertools.count(100)
        self.fail_next: dict[str, Exception] = {}
        # What the operator's Secret metadata watch would tell: (namespace, name, rv or None).
        self.secret_listeners: list[Callable[[str, str, str | None], object]] = []

    async def close(self) -> None:
        return None

    def put(self, plural: str, body: Mapping[str, Any]) -> dict[str, Any]:
        """Store an object as if created by someone else (a user, kubectl)."""
        obj = copy.deepcopy(dict(body))
        meta = obj.setdefault("metadata", {})
        meta.setdefault("uid", f"uid-{meta['name']}")
        meta.setdefault("generation", 1)
        meta["resourceVersion"] = str(next(self._rv))
        self.objects[(plural, meta["namespace"], meta["name"])] = obj
        if plural == "secrets":
            for listener in self.secret_listeners:
                listener(meta["namespace"], meta["name"], meta["resourceVersion"])
        return copy.deepcopy(obj)

    def get(self, plural: str, namespace: str, name: str) -> dict[str, Any] | None:
        obj = self.objects.get((plural, namespace, name))
        return copy.deepcopy(obj) if obj is not None else None

    def writes_to(self, what: str) -> int:
        return self.writes[what]

    async def request(
        self,
        method: str,
        path: str,
        body: Mapping[str, Any] | None = None,
        content_type: str = "application/json",
    ) -> dict[str, Any]:
        self.calls.append((method, path))
        if method in self.fail_next:
            raise self.fail_next.pop(method)
        if path.startswith("/apis/") and path.count("/") == 3:
            return {"resources": [{"name": "creditpools"}, {"name": "poolkeys"}]}
        match = _PATH.match(path)
        assert match, path
        plural, ns, name, sub = match["plural"], match["ns"], match["name"], match["sub"]
        if plural == "events":
            assert body is not None
            self.events.append(copy.deepcopy(dict(body)))
            return dict(body)
        if method == "GET":
            obj = self.get(plural, ns, name)
            if obj is None:
                raise NotFound(path)
            return obj
        assert body is not None
        if method == "POST":
            name = body["metadata"]["name"]
            if (plural, ns, name) in self.objects:
                raise Conflict(path)
            return self.put(plural, body)
        if method == "PUT":
            current = self.objects.get((plural, ns, name))
            if current is None:
                raise NotFound(path)
            if current["metadata"]["resourceVersion"] != body["metadata"].get("resourceVersion"):
                raise Conflict(path)
            new = copy.deepcopy(dict(body))
            new["metadata"]["uid"] = current["metadata"].get("uid")
            new["metadata"]["resourceVersion"] = str(next(self._rv))
            self.objects[(plural, ns, name)] = new
            return copy.deepcopy(new)
        if method == "DELETE":
            current = self.objects.get((plural, ns, name))
            if current is None:
                raise NotFound(path)
            uid = (body.get("preconditions") or {}).get("uid")
            if uid and current["metadata"].get("uid") != uid:
                raise Conflict(path)
            del self.objects[(plural, ns, name)]
            return {}
        if method == "PATCH":
            assert sub == "status"
            assert content_type == "application/merge-patch+json"
            current = self.objects.get((plural, ns, name))
            if current is None:
                raise NotFound(path)
            wanted = (body.get("metadata") or {}).get("resourceVersion")
            if wanted and wanted != current["metadata"]["resourceVersion"]:
                raise Conflict(path)
            current["status"] = merge_patch(current.get("status") or {}, body["status"])
            current["metadata"]["resourceVersion"] = str(next(self._rv))
            return copy.deepcopy(current)
        raise AssertionError(f"unexpected {method} {path}")

    # -- cluster state as the kopf indices would show it ----------------------------------

    def indices(self) -> Indices:
        keys: dict[Any, list[Any]] = defaultdict(list)
        key_refs: dict[Any, list[Any]] = defaultdict(list)
        pools: dict[Any, list[Any]] = defaultdict(list)
        pool_refs: dict[Any, list[Any]] = defaultdict(list)
        reports: dict[Any, list[Any]] = defaultdict(list)
        for (plural, ns, name), body in self.objects.items():
            if plural == "poolkeys":
                record = KeyRecord.of(body)
                keys[(ns, record.pool)].append(record)
                use = key_secret_use(body)
                if use:
                    key_refs[(ns, use[0])].append(use[1])
            elif plural == "replicareports":
                reports[(ns, report_pool(body))].append(ReportRecord.of(body))
            elif plural == "creditpools":
                pools[(ns, name)].append(PoolRecord.of(body))
                use = pool_secret_use(body)
                if use:
                    pool_refs[(ns, use[0])].append(use[1])
        return Indices(
            keys_by_pool=dict(keys),
            pools_by_name=dict(pools),
            key_refs_by_secret=dict(key_refs),
            pool_refs_by_secret=dict(pool_refs),
            reports_by_pool=dict(reports),
        )


class LiveIndices:
    """Indices that always reflect the FakeKube's current objects (like kopf's do)."""

    def __init__(self, kube: FakeKube) -> None:
        self._kube = kube

    def __getattr__(self, name: str) -> Any:
        return getattr(self._kube.indices(), name)


def secret(namespace: str, name: str, data: Mapping[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": namespace},
        "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()},
    }


def pool(namespace: str, name: str, spec: Mapping[str, Any] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": "CreditPool",
        "metadata": {"name": name, "namespace": namespace},
        "spec": dict(spec or {"providers": [{"name": "groq"}, {"name": "openai"}]}),
    }


def key(
    namespace: str,
    name: str,
    pool_name: str,
    secret_name: str,
    secret_key: str,
    **spec: Any,
) -> dict[str, Any]:
    return {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": "PoolKey",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"pool": pool_name, "secretRef": {"name": secret_name, "key": secret_key}, **spec},
    }


def report(
    namespace: str,
    pool_name: str,
    replica: str,
    keys: list[dict[str, Any]],
    heartbeat: float,
) -> dict[str, Any]:
    """A ReplicaReport as a proxy replica writes it (``sideproxy.wire.report_body``)."""
    spec = ReplicaReportSpec.model_validate(
        {"pool": pool_name, "replica": replica, "heartbeat": heartbeat, "keys": keys}
    )
    return report_body(namespace, spec)
