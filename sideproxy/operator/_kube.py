"""The few Kubernetes API calls the operator makes itself (kopf does the watching).

Plain dicts in, plain dicts out, over ``kubernetes_asyncio``'s configured ``ApiClient`` (it owns
credentials, TLS and token refresh). Every write goes through :meth:`KubeApi._write`, which
counts it: the operator's probe reports the counts, and tests can check for write storms.

Errors never carry a request body: :func:`describe` renders an ``ApiException`` as status,
reason and the API server's message, which for our calls names objects and fields, not values.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections import Counter
from collections.abc import AsyncIterator, Mapping
from datetime import UTC, datetime
from typing import Any, cast
from urllib.parse import quote

from kubernetes_asyncio.client import ApiClient
from kubernetes_asyncio.client.exceptions import ApiException

log = logging.getLogger("sideproxy.operator")

Body = dict[str, Any]

_TIMEOUT = 30.0
_MERGE_PATCH = "application/merge-patch+json"
# Metadata only (the API server's PartialObjectMetadata): a Secret's data never crosses the wire.
_META_LIST = "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1"
_META = "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1"
_COORDINATION = "coordination.k8s.io"


class NotFound(Exception):
    """The object does not exist (HTTP 404)."""


class Conflict(Exception):
    """Someone else changed the object since we read it (HTTP 409)."""


def describe(exc: BaseException) -> str:
    """A log-safe one-liner for an API failure (no request or object bodies)."""
    if isinstance(exc, ApiException):
        message = ""
        try:
            payload = json.loads(exc.body) if exc.body else {}
            if isinstance(payload, dict):
                message = str(payload.get("message", ""))[:300]
        except (ValueError, TypeError):
            pass
        return f"HTTP {exc.status} {exc.reason}" + (f": {message}" if message else "")
    return f"{type(exc).__name__}: {str(exc)[:300]}"


def _path(
    plural: str,
    namespace: str,
    name: str | None = None,
    *,
    group: str = "",
    version: str = "v1",
    sub: str | None = None,
) -> str:
    base = "/api/v1" if not group else f"/apis/{group}/{version}"
    path = f"{base}/namespaces/{quote(namespace, safe='')}/{plural}"
    if name is not None:
        path += f"/{quote(name, safe='')}"
    if sub is not None:
        path += f"/{sub}"
    return path


def _collection(plural: str, namespace: str | None) -> str:
    """A core/v1 collection in one namespace, or in all (``namespace`` None)."""
    return f"/api/v1/{plural}" if namespace is None else _path(plural, namespace)


class KubeApi:
    """Typed-enough access to the handful of endpoints the reconciler uses."""

    def __init__(self, client: ApiClient, component: str = "sideproxy-operator") -> None:
        self._client = client
        self.component = component
        self.instance = component
        self.writes: Counter[str] = Counter()

    async def close(self) -> None:
        await self._client.close()

    # -- plumbing -------------------------------------------------------------------------

    async def request(
        self,
        method: str,
        path: str,
        body: Mapping[str, Any] | None = None,
        content_type: str = "application/json",
    ) -> Body:
        try:
            result = await self._client.call_api(
                path,
                method,
                header_params={"Accept": "application/json", "Content-Type": content_type},
                body=dict(body) if body is not None else None,
                response_types_map={200: "object", 201: "object"},
                auth_settings=["BearerToken"],
                _return_http_data_only=True,
                _request_timeout=_TIMEOUT,
            )
        except ApiException as exc:
            if exc.status == 404:
                raise NotFound(path) from None
            if exc.status == 409:
                raise Conflict(path) from None
            raise
        return cast(Body, result) if isinstance(result, dict) else {}

    async def list_meta(
        self, plural: str, namespace: str | None, params: Mapping[str, str]
    ) -> Body:
        """One page of a core/v1 list, metadata only."""
        result = await self._client.call_api(
            _collection(plural, namespace),
            "GET",
            query_params=list(params.items()),
            header_params={"Accept": _META_LIST},
            response_types_map={200: "object"},
            auth_settings=["BearerToken"],
            _return_http_data_only=True,
            _request_timeout=_TIMEOUT,
        )
        return cast(Body, result) if isinstance(result, dict) else {}

    async def watch_meta(
        self, plural: str, namespace: str | None, params: Mapping[str, str], seconds: float
    ) -> AsyncIterator[Body]:
        """The events of one watch request, metadata only, until the server ends it (it was
        asked to within ``timeoutSeconds``; ``seconds`` bounds the whole request anyway, so a
        silently dropped connection cannot stall the watch)."""
        response = await self._client.call_api(
            _collection(plural, namespace),
            "GET",
            query_params=[*params.items(), ("watch", "true"), ("allowWatchBookmarks", "true")],
            header_params={"Accept": _META},
            auth_settings=["BearerToken"],
            _preload_content=False,
            _request_timeout=seconds,
        )
        try:
            if not 200 <= response.status <= 299:
                raise ApiException(status=response.status, reason=response.reason)
            while line := await response.content.readline():
                event = json.loads(line)
                if isinstance(event, dict):
                    yield event
        finally:
            response.release()

    async def _write(
        self, what: str, method: str, path: str, body: Mapping[str, Any], **kw: str
    ) -> Body:
        self.writes[what] += 1
        return await self.request(method, path, body, **kw)

    async def _get(self, path: str) -> Body | None:
        try:
            return await self.request("GET", path)
        except NotFound:
            return None

    # -- objects ------------------------------------------------------------------------------

    async def get_configmap(self, namespace: str, name: str) -> Body | None:
        return await self._get(_path("configmaps", namespace, name))

    async def get_secret(self, namespace: str, name: str) -> Body | None:
        return await self._get(_path("secrets", namespace, name))

    async def save(self, kind: str, namespace: str, body: Mapping[str, Any]) -> Body:
        """Create ``body`` or, when it carries a resourceVersion, replace exactly that version."""
        plural = {"ConfigMap": "configmaps", "Secret": "secrets"}[kind]
        meta = body["metadata"]
        if meta.get("resourceVersion"):
            path = _path(plural, namespace, str(meta["name"]))
            return await self._write(f"{kind}/update", "PUT", path, body)
        path = _path(plural, namespace)
        return await self._write(f"{kind}/create", "POST", path, body)

    async def patch_status(
        self,
        plural: str,
        namespace: str,
        name: str,
        patch: Body,
        *,
        group: str,
        version: str,
        resource_version: str | None = None,
    ) -> Body:
        """JSON merge patch on the status subresource. With ``resource_version`` it applies only
        to exactly that version of the object (else ``Conflict``): a patch computed from what we
        read can never land on a state we did not see."""
        path = _path(plural, namespace, name, group=group, version=version, sub="status")
        body: Body = {"status": patch}
        if resource_version:
            body["metadata"] = {"resourceVersion": resource_version}
        return await self._write(f"{plural}/status", "PATCH", path, body, content_type=_MERGE_PATCH)

    async def get_custom(
        self, plural: str, namespace: str, name: str, *, group: str, version: str
    ) -> Body | None:
        return await self._get(_path(plural, namespace, name, group=group, version=version))

    async def delete_custom(
        self, plural: str, namespace: str, name: str, uid: str, *, group: str, version: str
    ) -> None:
        """Delete exactly the object with this uid (a newer one of the same name stays)."""
        path = _path(plural, namespace, name, group=group, version=version)
        body = {"kind": "DeleteOptions", "apiVersion": "v1", "preconditions": {"uid": uid}}
        with contextlib.suppress(NotFound):
            await self._write(f"{plural}/delete", "DELETE", path, body)

    async def post_event(
        self,
        involved: Mapping[str, str],
        *,
        type_: str,
        reason: str,
        message: str,
    ) -> None:
        """A core/v1 Event on ``involved`` (apiVersion, kind, name, namespace, uid)."""
        namespace = involved["namespace"]
        stamp = datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
        if len(message) > 1024:
            message = message[:1000] + " ..."
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{involved['name']}.", "namespace": namespace},
            "involvedObject": dict(involved),
            "reason": reason,
            "message": message,
            "type": type_,
            "count": 1,
            "firstTimestamp": stamp,
            "lastTimestamp": stamp,
            "source": {"component": self.component},
            "reportingComponent": f"sideproxy.dev/{self.component.removeprefix('sideproxy-')}",
            "reportingInstance": self.instance[:128],
        }
        try:
            await self._write("events", "POST", _path("events", namespace), body)
        except (ApiException, NotFound, Conflict, OSError, TimeoutError) as exc:
            # Events are auxiliary: status and conditions carry the same facts.
            log.warning(
                "could not post %s event %s on %s: %s",
                type_,
                reason,
                involved["name"],
                describe(exc),
            )

    # -- leases -----------------------------------------------------------------------------

    async def get_lease(self, namespace: str, name: str) -> Body | None:
        return await self._get(_path("leases", namespace, name, group=_COORDINATION))

    async def save_lease(self, namespace: str, body: Mapping[str, Any]) -> Body:
        meta = body["metadata"]
        if meta.get("resourceVersion"):
            path = _path("leases", namespace, str(meta["name"]), group=_COORDINATION)
            return await self._write("leases/update", "PUT", path, body)
        path = _path("leases", namespace, group=_COORDINATION)
        return await self._write("leases/create", "POST", path, body)

    async def api_resources(self, group: str, version: str) -> Body | None:
        """Discovery for one group version; None when the API server does not serve it."""
        return await self._get(f"/apis/{group}/{version}")
