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

from sideproxy.models import CreditPoolSpec, PoolKeySpec, PoolKeyStatus
from sideproxy.translate import explain_spec_error

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
