"""Decoded Secret values, in memory only, and only for data keys that something references.

The kopf index on Secrets holds versions and key *names* (see ``_records.SecretMeta``). Values
arrive here two ways: from a Secret's watch event when a PoolKey or clientAuth already
references it (the common case: start-up, rotation), or by one GET when a reference appears
after the Secret was seen. An entry is trusted only while its resourceVersion equals the
index's, so a rotated value can never be served stale.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from sideproxy.operator._kube import KubeApi
from sideproxy.operator._records import SecretMeta


def decode(value: object) -> str:
    """A Secret data value as text. Undecodable values count as empty (never as garbage)."""
    try:
        return base64.b64decode(str(value), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return ""


@dataclass(slots=True)
class _Entry:
    resource_version: str
    values: dict[str, str] = field(repr=False)


class SecretCache:
    """(namespace, Secret name) -> the referenced values of that Secret's current version."""

    def __init__(self, api: KubeApi) -> None:
        self._api = api
        self._entries: dict[tuple[str, str], _Entry] = {}
        self.fetches = 0

    def __repr__(self) -> str:
        return f"<SecretCache of {len(self._entries)} Secrets>"

    def __len__(self) -> int:
        return len(self._entries)

    def observe(
        self, namespace: str, name: str, body: Mapping[str, Any], wanted: Iterable[str]
    ) -> None:
        """Keep the wanted values from a Secret's watch event (all others are dropped)."""
        data = body.get("data") or {}
        meta = body.get("metadata") or {}
        self._entries[(namespace, name)] = _Entry(
            str(meta.get("resourceVersion", "")),
            {key: decode(data[key]) for key in set(wanted) if key in data},
        )

    def forget(self, namespace: str, name: str) -> None:
        self._entries.pop((namespace, name), None)

    async def resolve(
        self,
        namespace: str,
        wanted: Mapping[str, set[str]],
        meta: Callable[[str, str], SecretMeta | None],
    ) -> dict[str, dict[str, str]]:
        """translate()'s ``secrets`` argument: Secret name -> {data key: value}.

        A Secret the index does not know is absent (translate reports it missing); a key it
        does not hold is absent from that Secret's mapping.
        """
        out: dict[str, dict[str, str]] = {}
        for name, keys in sorted(wanted.items()):
            known = meta(namespace, name)
            if known is None:
                self.forget(namespace, name)
                continue
            present = keys & known.keys
            entry = self._entries.get((namespace, name))
            if (
                entry is None
                or entry.resource_version != known.resource_version
                or not (present <= entry.values.keys())
            ):
                entry = await self._fetch(
                    namespace, name, keys | set(entry.values if entry else ())
                )
                if entry is None:
                    continue
            out[name] = {key: entry.values[key] for key in keys if key in entry.values}
        return out

    async def _fetch(self, namespace: str, name: str, keys: set[str]) -> _Entry | None:
        self.fetches += 1
        body = await self._api.get_secret(namespace, name)
        if body is None:
            self.forget(namespace, name)
            return None
        self.observe(namespace, name, body, keys)
        return self._entries[(namespace, name)]
