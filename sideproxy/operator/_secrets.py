"""Decoded Secret values, in memory only, and only of the Secrets something references.

The operator never lists Secret values. A referenced Secret is read by name (one GET) when a
reconcile first needs it or after the metadata watch (``_watch.py``) saw its resourceVersion
change; only the referenced data keys are decoded and kept, with the *names* of its other keys
(so a missing key is told from one not read yet). An entry is trusted only while its
resourceVersion is the one the watch last reported, so a rotated value is never served stale.
A Secret that does not exist is remembered as absent until the watch sees it appear.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from sideproxy.operator._kube import KubeApi


def decode(value: object) -> str:
    """A Secret data value as text. Undecodable values count as empty (never as garbage)."""
    try:
        return base64.b64decode(str(value), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return ""


@dataclass(slots=True)
class _Entry:
    resource_version: str  # "" for a Secret that does not exist
    values: dict[str, str] = field(repr=False)
    names: frozenset[str] = frozenset()  # every data key of that version


class SecretCache:
    """(namespace, Secret name) -> the referenced values of that Secret's current version."""

    def __init__(self, api: KubeApi) -> None:
        self._api = api
        self._entries: dict[tuple[str, str], _Entry] = {}
        self._seen: dict[tuple[str, str], str] = {}  # resourceVersion the watch reported last
        self.fetches = 0

    def __repr__(self) -> str:
        return f"<SecretCache of {len(self._entries)} Secrets>"

    def __len__(self) -> int:
        return len(self._entries)

    def changed(self, namespace: str, name: str, resource_version: str | None) -> bool:
        """The watch saw a referenced Secret at this version (None: deleted); whether that is
        news, i.e. the pools that use it must reconcile."""
        slot = (namespace, name)
        version = resource_version or ""
        self._seen[slot] = version
        entry = self._entries.get(slot)
        if entry is not None and entry.resource_version == version:
            return False  # what the last reconcile read already
        self._entries.pop(slot, None)
        return True

    def tracked(self, namespace: str | None) -> list[tuple[str, str]]:
        """(namespace, name) of the Secrets known here, in ``namespace`` (None: all)."""
        return sorted({s for s in (*self._entries, *self._seen) if namespace in (None, s[0])})

    def forget(self, namespace: str, name: str) -> None:
        self._entries.pop((namespace, name), None)
        self._seen.pop((namespace, name), None)

    def _valid(self, slot: tuple[str, str], entry: _Entry, keys: set[str]) -> bool:
        seen = self._seen.get(slot)
        if seen is not None and seen != entry.resource_version:
            return False
        return (keys & entry.names) <= entry.values.keys()

    async def resolve(
        self, namespace: str, wanted: Mapping[str, set[str]]
    ) -> dict[str, dict[str, str]]:
        """translate()'s ``secrets`` argument: Secret name -> {data key: value}.

        A Secret that does not exist is absent (translate reports it missing); a key it does
        not hold is absent from that Secret's mapping.
        """
        out: dict[str, dict[str, str]] = {}
        for name, keys in sorted(wanted.items()):
            slot = (namespace, name)
            entry = self._entries.get(slot)
            if entry is None or not self._valid(slot, entry, keys):
                kept = set(entry.values) if entry is not None else set()
                entry = await self._fetch(namespace, name, keys | kept)
            if not entry.resource_version:
                continue
            out[name] = {key: entry.values[key] for key in keys if key in entry.values}
        return out

    def observe(
        self, namespace: str, name: str, body: Mapping[str, Any], wanted: Iterable[str]
    ) -> None:
        """Keep the wanted values of a Secret read by name (all others are dropped)."""
        data = body.get("data") or {}
        meta = body.get("metadata") or {}
        self._entries[(namespace, name)] = _Entry(
            str(meta.get("resourceVersion", "")),
            {key: decode(data[key]) for key in set(wanted) if key in data},
            frozenset(str(k) for k in data),
        )

    async def _fetch(self, namespace: str, name: str, keys: set[str]) -> _Entry:
        self.fetches += 1
        body = await self._api.get_secret(namespace, name)
        if body is None:
            entry = self._entries[(namespace, name)] = _Entry("", {})
            return entry
        self.observe(namespace, name, body, keys)
        return self._entries[(namespace, name)]
