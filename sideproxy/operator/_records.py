"""What the kopf indices hold: small, comparable, value-free records of the watched objects.

No record ever holds a Secret value: values live only in
:class:`sideproxy.operator._secrets.SecretCache`, and only for keys that a PoolKey or a pool's
clientAuth references.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from sideproxy.models import POOL_LABEL, CreditPoolSpec, PoolKeySpec, PoolKeyStatus
from sideproxy.translate import explain_spec_error
from sideproxy.wire import ACCEPTED, InvalidReport, ReplicaReport, parse_report

PoolId = tuple[str, str]  # (namespace, CreditPool name)


def _meta(body: Mapping[str, Any]) -> Mapping[str, Any]:
    meta = body.get("metadata") or {}
    return meta if isinstance(meta, Mapping) else {}


@dataclass(frozen=True, slots=True)
class ObjectRef:
    """Enough to patch an object's status and hang an Event on it."""

    kind: str
    namespace: str
    name: str
    uid: str
    resource_version: str
    generation: int | None

    def involved(self, api_version: str) -> dict[str, str]:
        return {
            "apiVersion": api_version,
            "kind": self.kind,
            "namespace": self.namespace,
            "name": self.name,
            "uid": self.uid,
        }

    @classmethod
    def of(cls, kind: str, body: Mapping[str, Any]) -> ObjectRef:
        meta = _meta(body)
        generation = meta.get("generation")
        return cls(
            kind=kind,
            namespace=str(meta.get("namespace", "")),
            name=str(meta.get("name", "")),
            uid=str(meta.get("uid", "")),
            resource_version=str(meta.get("resourceVersion", "")),
            generation=generation if isinstance(generation, int) else None,
        )


@dataclass(frozen=True, slots=True)
class KeyRecord:
    ref: ObjectRef
    pool: str
    spec: PoolKeySpec | None
    spec_error: str
    status: Mapping[str, Any] = field(hash=False)
    deleting: bool = False  # deletionTimestamp set (e.g. its namespace is being deleted)

    @property
    def name(self) -> str:
        return self.ref.name

    def parsed_status(self) -> PoolKeyStatus | None:
        try:
            return PoolKeyStatus.model_validate(dict(self.status))
        except ValidationError:
            return None

    @classmethod
    def of(cls, body: Mapping[str, Any]) -> KeyRecord:
        raw_spec = body.get("spec") or {}
        pool = str(raw_spec.get("pool", "")) if isinstance(raw_spec, Mapping) else ""
        spec, error = _parse_spec(PoolKeySpec, raw_spec)
        return cls(
            ref=ObjectRef.of("PoolKey", body),
            pool=pool,
            spec=spec,
            spec_error=error,
            status=_status_copy(body),
            deleting=bool(_meta(body).get("deletionTimestamp")),
        )


@dataclass(frozen=True, slots=True)
class PoolRecord:
    ref: ObjectRef
    spec: CreditPoolSpec | None
    spec_error: str
    status: Mapping[str, Any] = field(hash=False)

    @classmethod
    def of(cls, body: Mapping[str, Any]) -> PoolRecord:
        spec, error = _parse_spec(CreditPoolSpec, body.get("spec") or {})
        return cls(
            ref=ObjectRef.of("CreditPool", body),
            spec=spec,
            spec_error=error,
            status=_status_copy(body),
        )


_Spec = TypeVar("_Spec", bound=BaseModel)


def _parse_spec(model: type[_Spec], raw: Any) -> tuple[_Spec | None, str]:
    """The validated spec, or None and a one-line reason (never the input values)."""
    try:
        return model.model_validate(dict(raw)), ""
    except ValidationError as exc:
        return None, explain_spec_error(exc)
    except (TypeError, ValueError) as exc:
        return None, str(exc)


def _status_copy(body: Mapping[str, Any]) -> dict[str, Any]:
    status = body.get("status") or {}
    return copy.deepcopy(dict(status)) if isinstance(status, Mapping) else {}


@dataclass(frozen=True, slots=True)
class SecretUse:
    """A reference to one data key of a Secret, by a PoolKey or a pool's clientAuth."""

    pool: str
    key: str


def key_secret_use(body: Mapping[str, Any]) -> tuple[str, SecretUse] | None:
    """(Secret name, use) for a PoolKey body, if it names a Secret."""
    spec = body.get("spec") or {}
    ref = spec.get("secretRef") if isinstance(spec, Mapping) else None
    if not isinstance(ref, Mapping) or not ref.get("name") or not ref.get("key"):
        return None
    return str(ref["name"]), SecretUse(pool=str(spec.get("pool", "")), key=str(ref["key"]))


def pool_secret_use(body: Mapping[str, Any]) -> tuple[str, SecretUse] | None:
    """(Secret name, use) for a CreditPool's clientAuth, if it needs one."""
    spec = body.get("spec") or {}
    auth = spec.get("clientAuth") if isinstance(spec, Mapping) else None
    if not isinstance(auth, Mapping) or auth.get("disabled", False):
        return None
    ref = auth.get("secretRef")
    if not isinstance(ref, Mapping) or not ref.get("name") or not ref.get("key"):
        return None
    return str(ref["name"]), SecretUse(pool=str(_meta(body).get("name", "")), key=str(ref["key"]))


@dataclass(frozen=True, slots=True)
class ReportRecord:
    """A ReplicaReport as the index holds it: who sent it and what it says (parsed once)."""

    ref: ObjectRef
    parsed: ReplicaReport | InvalidReport
    accepted: Mapping[str, Any] | None = field(hash=False)  # its status' Accepted condition
    conditions: tuple[Mapping[str, Any], ...] = field(hash=False, default=())
    deleting: bool = False

    @property
    def name(self) -> str:
        return self.ref.name

    @classmethod
    def of(cls, body: Mapping[str, Any]) -> ReportRecord:
        status = body.get("status") or {}
        conditions = status.get("conditions") if isinstance(status, Mapping) else None
        conds = tuple(c for c in conditions or () if isinstance(c, Mapping))
        accepted = next((c for c in conds if c.get("type") == ACCEPTED), None)
        return cls(
            ref=ObjectRef.of("ReplicaReport", body),
            parsed=parse_report(body),
            accepted=copy.deepcopy(dict(accepted)) if accepted else None,
            conditions=tuple(copy.deepcopy(dict(c)) for c in conds),
            deleting=bool(_meta(body).get("deletionTimestamp")),
        )


def report_pool(body: Mapping[str, Any]) -> str:
    """The pool a ReplicaReport object is filed under: its label (what RBAC-free readers and the
    proxies select by), else its spec's claim."""
    labels = _meta(body).get("labels") or {}
    pool = labels.get(POOL_LABEL) if isinstance(labels, Mapping) else None
    if not pool:
        spec = body.get("spec") or {}
        pool = spec.get("pool") if isinstance(spec, Mapping) else None
    return str(pool or "")
