"""Config sources: where the proxy's routing table and key material come from.

A source is anything with an async ``snapshots()`` iterator yielding

* :class:`Snapshot` ``(table, material[, origin])``, or a plain ``(table, material)`` tuple: a
  complete routing table (``models.RoutingTable``) and the key material it names (PoolKey name
  -> key value, plus ``models.VIRTUAL_KEYS_DATA_KEY`` -> the virtual keys when the table
  requires client auth). A key whose material is missing or does not match the table's
  fingerprint sits out (logged) until both agree; or
* :class:`Rejected` ``(reason)``: the source saw a new config and could not read it. The proxy
  logs the reason (which must never contain key material), counts it and keeps serving the last
  good snapshot.

The app consumes the iterator in a background task for its whole life; the iterator may end
(an :class:`EnvSource` yields once) or run forever (a :class:`FileSource` polls). An iterator
that raises is a broken source: the app logs it, answers ``/readyz`` with 503 and calls
``snapshots()`` again after a back-off, serving the last good table meanwhile. The cluster
source (``sideproxy.proxy.kube.KubeSource``: ConfigMap + Secret through the Kubernetes API)
plugs in the same way, and is also a :class:`HealthPeer`: the app hands it the live pool.

Each snapshot is validated and compiled by the app (see ``sideproxy.proxy._compile``); a snapshot
that fails there is treated exactly like a ``Rejected``.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Protocol, runtime_checkable

import yaml

from sideproxy import translate
from sideproxy.models import KeyPhase, Provider, RoutingTable
from sideproxy.pool import ManagedCreditPool

__all__ = [
    "ConfigSource",
    "EnvSource",
    "FileSource",
    "HealthPeer",
    "QueueSource",
    "Rejected",
    "Snapshot",
    "SourceEvent",
    "StaticSource",
    "load_file",
]

log = logging.getLogger("sideproxy.proxy.sources")


class Snapshot(NamedTuple):
    """A complete routing table and the key material it names. A plain 2-tuple
    ``(table, material)`` is accepted wherever a Snapshot is."""

    table: RoutingTable
    material: Mapping[str, str]  # never log this
    origin: str = ""  # for logs: "env", "file pool.yaml", "configmap ns/name", ...

    def __repr__(self) -> str:
        return (
            f"Snapshot(pool={self.table.pool!r}, version={self.table.version}, "
            f"keys={len(self.table.keys)}, origin={self.origin!r})"
        )


@dataclass(frozen=True, slots=True)
class Rejected:
    reason: str  # a sentence without key material
    origin: str = ""


SourceEvent = Snapshot | Rejected | tuple[RoutingTable, Mapping[str, str]]


@runtime_checkable
class ConfigSource(Protocol):
    """Yields snapshots for the life of the app; see the module docstring."""

    def snapshots(self) -> AsyncIterator[SourceEvent]: ...


@runtime_checkable
class HealthPeer(Protocol):
    """A source that also shares key health with other replicas (cluster mode): the app hands
    it the live pool once, before it consumes ``snapshots()``, to apply what others learnt."""

    def attach(self, pool: ManagedCreditPool) -> None: ...


# --------------------------------------------------------------------------- simple sources


class StaticSource:
    """Yields the given events once, in order (tests, embedding)."""

    def __init__(self, *events: SourceEvent) -> None:
        self._events = events

    async def snapshots(self) -> AsyncIterator[SourceEvent]:
        for event in self._events:
            yield event


class QueueSource:
    """Yields whatever is :meth:`push`-ed, until :meth:`close` (tests, custom integrations)."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[SourceEvent | None] = asyncio.Queue()

    def push(self, event: SourceEvent) -> None:
        self._queue.put_nowait(event)

    def close(self) -> None:
        self._queue.put_nowait(None)

    async def snapshots(self) -> AsyncIterator[SourceEvent]:
        while (event := await self._queue.get()) is not None:
            yield event


def _sealed(translation: translate.Translation, version: int) -> RoutingTable:
    return translation.table.sealed(version)


def _log_translation(translation: translate.Translation, origin: str) -> None:
    for name, verdict in sorted(translation.verdicts.items()):
        if verdict.phase is KeyPhase.INVALID:
            log.warning(
                "%s: PoolKey %r left out: %s (%s)", origin, name, verdict.message, verdict.reason
            )
    for problem in translation.problems:
        log.warning("%s: %s", origin, problem)


class EnvSource:
    """The seed's ``SIDE_POOL_KEYS="k1,k2"``: one table, keys named key-1..N, then done."""

    def __init__(
        self,
        keys: Iterable[str],
        provider: Provider | str = Provider.GROQ,
        base_url: str | None = None,
    ) -> None:
        self._keys = [k for k in keys if k.strip()]
        self._provider = provider
        self._base_url = base_url

    def __repr__(self) -> str:
        return f"EnvSource({len(self._keys)} keys, provider={self._provider!s})"

    def load(self) -> Snapshot:
        """Raises ``translate.ManifestError`` (or ``ValueError``) when the settings are unusable."""
        provider = Provider(self._provider)
        translation = translate.from_env_keys(self._keys, provider, self._base_url)
        _log_translation(translation, "env")
        return Snapshot(_sealed(translation, 1), translation.material, "env")

    async def snapshots(self) -> AsyncIterator[SourceEvent]:
        try:
            snapshot = self.load()
        except ValueError as exc:
            yield Rejected(str(exc), "env")
            return
        yield snapshot


# --------------------------------------------------------------------------- file source


def load_file(
    path: str | os.PathLike[str], pool: str | None = None, now: float | None = None
) -> Snapshot:
    """Read a pool file (CreditPool + PoolKey + Secret manifests) into a snapshot, version 1.

    Raises ``translate.ManifestError`` with a message naming the object at fault (never a value).
    """
    text = Path(path).read_bytes()
    return _parse_file(text, str(path), pool, 1, time.time() if now is None else now)


def _parse_file(data: bytes, origin: str, pool: str | None, version: int, now: float) -> Snapshot:
    try:
        documents: list[Any] = list(yaml.safe_load_all(data))
    except yaml.YAMLError as exc:
        # The problem mark names line and column; the snippet could hold a key, so leave it out.
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise translate.ManifestError(f"{origin}: {problem}{where}") from None
    for doc in documents:
        if doc is not None and not isinstance(doc, dict):
            raise translate.ManifestError(f"{origin}: every YAML document must be a mapping")
    try:
        pool_input, keys, secrets = translate.from_manifests(documents, pool)
    except translate.ManifestError as exc:
        raise translate.ManifestError(f"{origin}: {exc}") from None
    translation = translate.translate(pool_input, keys, secrets, now)
    _log_translation(translation, origin)
    return Snapshot(_sealed(translation, version), translation.material, origin)


class FileSource:
    """A pool file, reloaded when it changes.

    The file is polled every ``interval`` seconds: ``stat()`` (mtime + size + inode) first, and
    only when that moved, a read and a SHA-256 of the content, so touching the file or an atomic
    rename of identical content (Kubernetes' ConfigMap volume updates) reloads nothing. A file
    that is missing, half-written or invalid yields one ``Rejected`` per distinct problem, and the
    proxy keeps serving the last good table. Polling rather than inotify works the same on every
    filesystem, including ConfigMap volumes and network mounts.
    """

    def __init__(
        self, path: str | os.PathLike[str], *, pool: str | None = None, interval: float = 1.0
    ) -> None:
        self.path = Path(path)
        self._pool = pool
        self._interval = interval
        self._version = 0

    def __repr__(self) -> str:
        return f"FileSource({str(self.path)!r})"

    async def snapshots(self) -> AsyncIterator[SourceEvent]:
        origin = f"file {self.path}"
        stamp: tuple[int, int, int] | None = None
        digest: str | None = None
        last_problem: str | None = None
        while True:
            event: SourceEvent | None = None
            try:
                st = await asyncio.to_thread(os.stat, self.path)
                new_stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
                if new_stamp != stamp:
                    data = await asyncio.to_thread(self.path.read_bytes)
                    stamp = new_stamp
                    new_digest = hashlib.sha256(data).hexdigest()
                    if new_digest != digest:
                        digest = new_digest
                        event = self._parse(data, origin)
            except OSError as exc:
                stamp = digest = None
                event = Rejected(f"{origin}: cannot read: {exc.strerror or exc}", origin)
            if isinstance(event, Rejected):
                if event.reason != last_problem:
                    last_problem = event.reason
                    yield event
            elif event is not None:
                last_problem = None
                yield event
            await asyncio.sleep(self._interval)

    def _parse(self, data: bytes, origin: str) -> SourceEvent:
        try:
            snapshot = _parse_file(data, origin, self._pool, self._version + 1, time.time())
        except (translate.ManifestError, ValueError) as exc:
            return Rejected(str(exc), origin)
        except Exception as exc:
            # A shape the parser did not expect must not end the follow task (issue 15.3): it
            # is one more bad file. Its type only: the text could quote the file.
            log.error("%s: unexpected %s reading the pool file", origin, type(exc).__name__)
            return Rejected(f"{origin}: unreadable pool file ({type(exc).__name__})", origin)
        self._version += 1
        return snapshot
