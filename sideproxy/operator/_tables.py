"""A pool's two outputs: the routing ConfigMap (no key material) and the key-material Secret.

Both carry a controller ownerReference to the CreditPool (``blockOwnerDeletion``), so deleting
the pool lets the garbage collector remove them; no finalizer is needed anywhere.

:func:`write_table` compares before it writes: the ConfigMap only when the table's content
hash changed (then with version = previous + 1), the Secret only when the material changed.
The Secret goes first, so a proxy never sees a table whose new key it cannot find; a proxy
also checks each key's material against the table's fingerprint, which covers the opposite
order (a key removed from the Secret a moment before the table drops it). Both writes are
replaces of the exact resourceVersion read, so two writers can never interleave versions.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sideproxy.models import (
    API_GROUP,
    API_VERSION,
    POOL_LABEL,
    TABLE_DATA_KEY,
    TABLE_SIZE_LIMIT,
    RoutingTable,
    key_secret_name,
    routing_configmap_name,
)
from sideproxy.operator._kube import Body, KubeApi
from sideproxy.operator._status import TABLE_WRITTEN, Cond
from sideproxy.translate import Translation

MANAGED_BY = "sideproxy-operator"
VERSION_ANNOTATION = "sideproxy.dev/table-version"
HASH_ANNOTATION = "sideproxy.dev/table-hash"


@dataclass(frozen=True, slots=True)
class Owner:
    namespace: str
    name: str
    uid: str

    def reference(self) -> dict[str, Any]:
        return {
            "apiVersion": f"{API_GROUP}/{API_VERSION}",
            "kind": "CreditPool",
            "name": self.name,
            "uid": self.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }


def labels(pool: str, component: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "sideproxy",
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/part-of": "sideproxy",
        "app.kubernetes.io/managed-by": MANAGED_BY,
        POOL_LABEL: pool,
    }


@dataclass(frozen=True, slots=True)
class TableWrite:
    """The outcome of one :func:`write_table`."""

    version: int | None  # of the table now in the ConfigMap (None: there is none)
    hash: str | None
    table_written: bool
    secret_written: bool
    condition: Cond  # TableWritten
    saved: tuple[tuple[str, str, str], ...] = ()  # (kind, name, resourceVersion) we wrote


def controlled_by(body: Mapping[str, Any], owner: Owner) -> bool:
    """Whether we may write this object: its controller is a CreditPool of the same name.

    A different uid is adopted: it is a previous incarnation of the pool whose objects the
    garbage collector has not removed yet.
    """
    refs = (body.get("metadata") or {}).get("ownerReferences") or []
    for ref in refs:
        if ref.get("controller"):
            return bool(
                str(ref.get("apiVersion", "")).startswith(f"{API_GROUP}/")
                and ref.get("kind") == "CreditPool"
                and ref.get("name") == owner.name
            )
    return False


def _metadata(
    existing: Mapping[str, Any] | None,
    owner: Owner,
    name: str,
    component: str,
    annotations: Mapping[str, str],
) -> dict[str, Any]:
    old = dict((existing or {}).get("metadata") or {})
    others = [r for r in old.get("ownerReferences") or [] if not r.get("controller")]
    meta: dict[str, Any] = {
        "name": name,
        "namespace": owner.namespace,
        "labels": {**(old.get("labels") or {}), **labels(owner.name, component)},
        "ownerReferences": [*others, owner.reference()],
    }
    merged = {**(old.get("annotations") or {}), **annotations}
    if merged:
        meta["annotations"] = merged
    for kept in ("resourceVersion", "finalizers"):
        if old.get(kept):
            meta[kept] = old[kept]
    return meta


def _same_metadata(existing: Mapping[str, Any], wanted: Mapping[str, Any]) -> bool:
    old = existing.get("metadata") or {}
    return all(
        (old.get(field) or None) == (wanted.get(field) or None)
        for field in ("labels", "annotations", "ownerReferences")
    )


def _previous(existing: Mapping[str, Any] | None) -> tuple[int, str | None]:
    """(version, hash) of the table in an existing ConfigMap; hash None if it is not valid."""
    if existing is None:
        return 0, None
    text = (existing.get("data") or {}).get(TABLE_DATA_KEY)
    version = 0
    annotated = ((existing.get("metadata") or {}).get("annotations") or {}).get(
        VERSION_ANNOTATION, ""
    )
    if str(annotated).isdigit():
        version = int(annotated)
    if not text:
        return version, None
    try:
        table = RoutingTable.from_json(text)
    except ValueError:
        try:
            raw = json.loads(text)
            if isinstance(raw, dict) and isinstance(raw.get("version"), int):
                version = max(version, raw["version"])
        except ValueError:
            pass
        return version, None
    return max(version, table.version), table.hash


def _encode(material: Mapping[str, str]) -> dict[str, str]:
    return {k: base64.b64encode(v.encode()).decode() for k, v in sorted(material.items())}


async def write_table(
    api: KubeApi,
    owner: Owner,
    translation: Translation,
    *,
    floor_version: int = 0,
    size_limit: int = TABLE_SIZE_LIMIT,
) -> TableWrite:
    """Bring ``<pool>-keys`` and ``<pool>-routing`` in line with ``translation``.

    ``floor_version`` (the pool's status.tableVersion) keeps versions rising even when someone
    deleted the ConfigMap. Raises ``Conflict`` when an object changed under us (retry).
    """
    cm_name = routing_configmap_name(owner.name)
    secret_name = key_secret_name(owner.name)
    existing_cm = await api.get_configmap(owner.namespace, cm_name)
    prev_version, prev_hash = _previous(existing_cm)
    prev_version = max(prev_version, floor_version if existing_cm is None else 0)
    kept = (prev_version or None, prev_hash)

    if existing_cm is not None and not controlled_by(existing_cm, owner):
        return TableWrite(None, None, False, False, _not_owned("ConfigMap", cm_name))
    new_hash = translation.table.content_hash()
    version = prev_version if new_hash == prev_hash else prev_version + 1
    sealed = translation.table.sealed(version)
    text = sealed.to_json()
    size = len(text.encode())
    if size > size_limit:
        serving = f"proxies keep version {prev_version}" if prev_hash else "no table is served"
        message = (
            f"routing table is {size} bytes, over the {size_limit}-byte ConfigMap limit; "
            f"split the pool ({serving})"
        )
        return TableWrite(
            *kept, False, False, Cond(TABLE_WRITTEN, "False", "TableTooLarge", message)
        )

    material_size = sum(len(k) + len(v.encode()) for k, v in translation.material.items())
    if material_size > size_limit:
        message = (
            f"key material is {material_size} bytes, over the {size_limit}-byte Secret limit; "
            "split the pool"
        )
        return TableWrite(
            *kept, False, False, Cond(TABLE_WRITTEN, "False", "KeyMaterialTooLarge", message)
        )

    existing_secret = await api.get_secret(owner.namespace, secret_name)
    if existing_secret is not None and not controlled_by(existing_secret, owner):
        return TableWrite(*kept, False, False, _not_owned("Secret", secret_name))
    secret_meta = _metadata(existing_secret, owner, secret_name, "key-material", {})
    data = _encode(translation.material)
    secret_written = False
    saved: list[tuple[str, str, str]] = []
    if (
        existing_secret is None
        or (existing_secret.get("data") or {}) != data
        or not _same_metadata(existing_secret, secret_meta)
    ):
        body: Body = {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": secret_meta,
            "type": "Opaque",
            "data": data,
        }
        result = await api.save("Secret", owner.namespace, body)
        saved.append(("Secret", secret_name, _version(result)))
        secret_written = True

    annotations = {VERSION_ANNOTATION: str(version), HASH_ANNOTATION: sealed.hash}
    cm_meta = _metadata(existing_cm, owner, cm_name, "routing-table", annotations)
    table_written = False
    if existing_cm is None or new_hash != prev_hash or not _same_metadata(existing_cm, cm_meta):
        body = {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": cm_meta,
            "data": {TABLE_DATA_KEY: text},
        }
        result = await api.save("ConfigMap", owner.namespace, body)
        saved.append(("ConfigMap", cm_name, _version(result)))
        table_written = True
    message = (
        f"version {version} ({sealed.hash[:12]}) in ConfigMap {cm_name}, "
        f"key material in Secret {secret_name}"
    )
    return TableWrite(
        version,
        sealed.hash,
        table_written,
        secret_written,
        Cond(TABLE_WRITTEN, "True", "TableCurrent", message),
        tuple(saved),
    )


def _version(body: Mapping[str, Any]) -> str:
    return str((body.get("metadata") or {}).get("resourceVersion", ""))


def _not_owned(kind: str, name: str) -> Cond:
    return Cond(
        TABLE_WRITTEN,
        "False",
        "NotOwned",
        f"{kind} {name!r} exists and is not controlled by this CreditPool; "
        "delete or rename it and the operator will create its own",
    )
