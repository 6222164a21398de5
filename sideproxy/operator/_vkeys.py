"""VirtualKeys in the operator: their records, their part of a pool's reconcile, their status.

A VirtualKey joins its pool's reconcile (``Reconciler._translate``): its Secret is resolved with
the pool's, ``translate()`` puts its digest, models and limits in the routing table, and its
verdict becomes the ``Ready`` condition here. A key whose Secret is missing or empty, whose
value another VirtualKey holds, or whose spec is invalid gets ``Ready=False`` with the reason
and a Warning Event (once per change of reason or message), and authenticates nothing.

Usage in ``status`` (``currentMinute``, ``total``, ``lastUsed``) is summed from the pool's
``ReplicaReport``s (``spec.virtualKeys``) and written at most every ``USAGE_INTERVAL`` seconds
per pool (:class:`UsageBook`). ``total`` sums the cumulative counts of the replicas reporting
now (a restarted replica starts again from zero: see docs/kubernetes.md).

Names, counts and fingerprints only: no key value reaches a status, an Event or a log line.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from sideproxy.models import API_GROUP, API_VERSION, VirtualKeySpec
from sideproxy.operator._kube import KubeApi, NotFound
from sideproxy.operator._records import ObjectRef, SecretUse, _parse_spec, _status_copy
from sideproxy.operator._status import Cond, merge_conditions, rfc3339, status_patch
from sideproxy.translate import VirtualKeyInput, VirtualKeyVerdict
from sideproxy.wire import InvalidReport, parse_report

__all__ = [
    "USAGE_INTERVAL",
    "UsageBook",
    "VirtualKeyRecord",
    "inputs",
    "vkey_secret_use",
    "want_secrets",
    "write_statuses",
]

log = logging.getLogger("sideproxy.operator")

USAGE_INTERVAL = 5.0
_GV = {"group": API_GROUP, "version": API_VERSION}
_READY = "Ready"


@dataclass(frozen=True, slots=True)
class VirtualKeyRecord:
    ref: ObjectRef
    pool: str
    spec: VirtualKeySpec | None
    spec_error: str
    status: Mapping[str, Any] = field(hash=False)

    @property
    def name(self) -> str:
        return self.ref.name

    @classmethod
    def of(cls, body: Mapping[str, Any]) -> VirtualKeyRecord:
        raw = body.get("spec") or {}
        pool = str(raw.get("pool", "")) if isinstance(raw, Mapping) else ""
        spec, error = _parse_spec(VirtualKeySpec, raw)
        return cls(ObjectRef.of("VirtualKey", body), pool, spec, error, _status_copy(body))


def vkey_secret_use(body: Mapping[str, Any]) -> tuple[str, SecretUse] | None:
    """(Secret name, use) for a VirtualKey body, if it names a Secret."""
    spec = body.get("spec") or {}
    ref = spec.get("secretRef") if isinstance(spec, Mapping) else None
    if not isinstance(ref, Mapping) or not ref.get("name") or not ref.get("key"):
        return None
    return str(ref["name"]), SecretUse(pool=str(spec.get("pool", "")), key=str(ref["key"]))


def want_secrets(records: Iterable[VirtualKeyRecord], wanted: dict[str, set[str]]) -> None:
    """Add the Secret data keys the pool's VirtualKeys name to ``wanted``."""
    for record in records:
        if record.spec is not None and not record.spec.disabled:
            ref = record.spec.secret_ref
            wanted.setdefault(ref.name, set()).add(ref.key)


def inputs(records: Iterable[VirtualKeyRecord]) -> tuple[VirtualKeyInput, ...]:
    return tuple(
        VirtualKeyInput(r.name, r.spec, r.ref.generation) for r in records if r.spec is not None
    )


def _desired(
    record: VirtualKeyRecord, verdict: VirtualKeyVerdict | None, stamp: str
) -> tuple[dict[str, Any], Cond]:
    if record.spec is None:
        cond = Cond(_READY, "False", "InvalidSpec", record.spec_error)
    elif verdict is None:
        cond = Cond(_READY, "False", "PoolNotServing", f"CreditPool {record.pool!r} not found")
    else:
        cond = Cond(_READY, "True" if verdict.ready else "False", verdict.reason, verdict.message)
    current = record.status.get("conditions")
    desired: dict[str, Any] = {
        "conditions": merge_conditions(
            current if isinstance(current, list) else None, [cond], record.ref.generation, stamp
        ),
        "observedGeneration": record.ref.generation,
        "fingerprint": verdict.fingerprint if verdict is not None else None,
    }
    return desired, cond


def _changed(cond: Cond, status: Mapping[str, Any]) -> bool:
    for old in status.get("conditions") or ():
        if isinstance(old, Mapping) and old.get("type") == _READY:
            return old.get("reason") != cond.reason or old.get("message") != cond.message
    return True


async def write_statuses(
    api: KubeApi,
    records: Collection[VirtualKeyRecord],
    verdicts: Mapping[str, VirtualKeyVerdict],
    now: float,
) -> int:
    """Patch the Ready condition of each VirtualKey that differs (+ a Warning Event when it
    turns or stays not ready for a new reason); the number patched."""
    stamp = rfc3339(now)
    written = 0
    for record in records:
        desired, cond = _desired(record, verdicts.get(record.name), stamp)
        patch = status_patch(record.status, desired)
        if not patch:
            continue
        if cond.status == "False" and _changed(cond, record.status):
            await api.post_event(
                record.ref.involved(f"{API_GROUP}/{API_VERSION}"),
                type_="Warning",
                reason=cond.reason,
                message=cond.message,
            )
        try:
            await api.patch_status("virtualkeys", record.ref.namespace, record.name, patch, **_GV)
        except NotFound:
            continue
        written += 1
    return written


# --------------------------------------------------------------------------- usage


def _usage(requests: int, prompt: int, completion: int) -> dict[str, int]:
    return {
        "requests": requests,
        "promptTokens": prompt,
        "completionTokens": completion,
        "tokens": prompt + completion,
    }


class UsageBook:
    """The latest ``spec.virtualKeys`` of every ReplicaReport, summed per VirtualKey."""

    def __init__(self) -> None:
        # (namespace, report name) -> (pool, entries)
        self._reports: dict[tuple[str, str], tuple[str, list[Any]]] = {}
        self._window: dict[tuple[str, str], float] = {}
        self._written: dict[tuple[str, str], float] = {}  # (namespace, pool) -> last write
        self.lock = asyncio.Lock()

    def report_event(self, body: Mapping[str, Any], deleted: bool) -> tuple[str, str] | None:
        """Note a report; the pool (namespace, name) whose usage changed, if any."""
        report = parse_report(body)
        if isinstance(report, InvalidReport):
            return None
        slot = (report.namespace, report.name)
        pool = (report.namespace, report.spec.pool)
        if deleted:
            self._reports.pop(slot, None)
            return pool
        self._reports[slot] = (report.spec.pool, list(report.spec.virtual_keys or ()))
        self._window[pool] = report.spec.window_seconds or 60.0
        return pool

    def due(self, pool: tuple[str, str], now: float) -> bool:
        return now - self._written.get(pool, 0.0) >= USAGE_INTERVAL

    def usage(self, pool: tuple[str, str], now: float) -> dict[str, dict[str, Any]]:
        """VirtualKey name -> the usage part of its status, from this pool's reports."""
        window = self._window.get(pool, 60.0)
        start = now - now % window
        out: dict[str, dict[str, Any]] = {}
        sums: dict[str, list[int]] = {}
        last: dict[str, float] = {}
        for (namespace, _), (name, entries) in self._reports.items():
            if (namespace, name) != pool:
                continue
            for entry in entries:
                acc = sums.setdefault(entry.name, [0] * 6)
                if entry.window_start == start:
                    acc[0] += entry.requests
                    acc[1] += entry.prompt_tokens
                    acc[2] += entry.completion_tokens
                acc[3] += entry.total_requests
                acc[4] += entry.total_prompt_tokens
                acc[5] += entry.total_completion_tokens
                last[entry.name] = max(last.get(entry.name, 0.0), entry.last_used)
        for name, acc in sums.items():
            out[name] = {
                "minute": rfc3339(start),
                "currentMinute": _usage(acc[0], acc[1], acc[2]),
                "total": _usage(acc[3], acc[4], acc[5]),
                "lastUsed": rfc3339(last[name]) if last.get(name) else None,
            }
        return out

    async def write(
        self,
        api: KubeApi,
        pool: tuple[str, str],
        records: Collection[VirtualKeyRecord],
        now: float,
    ) -> int:
        """Write the pool's VirtualKey usage (at most every USAGE_INTERVAL per pool)."""
        self._written[pool] = now
        usage = self.usage(pool, now)
        written = 0
        for record in records:
            desired = usage.get(record.name)
            if desired is None:
                continue
            patch = status_patch(record.status, desired)
            if not patch:
                continue
            try:
                await api.patch_status(
                    "virtualkeys", record.ref.namespace, record.name, patch, **_GV
                )
            except NotFound:
                continue
            written += 1
        return written
