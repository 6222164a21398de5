"""Stage 2b, admit: a VirtualKey's model list and limits, held across every replica of a pool.

Called by the forwarder after authentication and routing (the model is known then)::

    ticket = admission.admit(identity, model)   # raises ModelNotAllowed (403) or
                                                # VirtualKeyLimit (429 + Retry-After)
    ...                                         # attempts, relay
    ticket.usage(body | stream tail)            # tokens the provider reported, if any
    ticket.close()                              # always: in flight -1, tokens counted

A refused request costs no upstream attempt and never touches the pool's keys. Anonymous
identities (``clientAuth.secretRef``) and VirtualKeys without limits only get counted.

**Limits across replicas without a store** (docs/kubernetes.md, "Virtual keys"). Each replica
*claims* a part of each limit for the current window (a calendar minute) and publishes its claims
and usage in its ``ReplicaReport`` (``wire.VirtualKeyUsage``); every replica watches the reports
of its pool. A replica may admit only inside its own claim. Its claim is re-computed (an
*anchor*) from the claims it sees of the others::

    claim = used + (limit - used - sum(others' claims)) / active replicas

only when something new arrived from another replica (or one stopped being active), never twice
on the same view: summed over replicas that each use the others' last published claims, the new
claims never exceed the limit, because a claim is never below its own usage. A replica that
is refused asks for more by publishing (its ``refused`` count moves); the others re-anchor, an
idle one gives back most of its claim, and the busy one grows in a few rounds. A dead replica
stops publishing: after ``ACTIVE_GRACE`` it no longer counts as active, and what it had
claimed but not used is freed (its last reported usage still counts until the window ends).
``maxConcurrent`` is split between the active replicas by rank (they sum to the limit).

The core here is pure: ``now`` comes from the clock passed in, there is no I/O; the replica's
report channel feeds it (``_vkshare.UsagePart`` publishes its claims and hands it the others').
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from sideproxy.proxy import _json
from sideproxy.proxy._auth import Identity
from sideproxy.proxy._errors import ModelNotAllowed, VirtualKeyLimit

if TYPE_CHECKING:
    from sideproxy.models import VirtualKeyLimits

__all__ = [
    "ACTIVE_GRACE",
    "Admission",
    "ModelNotAllowed",
    "PeerUsage",
    "Ticket",
    "VirtualKeyLimit",
    "usage_of",
    "window_from_env",
]

# The window is a calendar minute; tests may shorten it (never in production).
WINDOW_ENV = "SIDEPROXY_VKEY_WINDOW_SECONDS"
# A replica that has not published for this long is not active: its share is freed.
ACTIVE_GRACE = 3.0
# How often an active replica publishes even when nothing changed (see ACTIVE_GRACE).
ACTIVE_HEARTBEAT = 1.0
_USAGE = b'"usage"'
_USAGE_CAP = 4096  # bytes after '"usage"' parsed at most


def window_from_env() -> float:
    """60 s, or ``SIDEPROXY_VKEY_WINDOW_SECONDS`` (for tests that cannot wait minutes)."""
    raw = os.environ.get(WINDOW_ENV, "")
    try:
        value = float(raw) if raw else 60.0
    except ValueError:
        return 60.0
    return value if 0 < value <= 3600 else 60.0


@dataclass(frozen=True, slots=True)
class PeerUsage:
    """What another replica published about one VirtualKey (``wire.VirtualKeyUsage``)."""

    window_start: float
    claimed_requests: float
    claimed_tokens: float
    requests: int
    tokens: int


class _Peer:
    __slots__ = ("active_until", "keys")

    def __init__(self) -> None:
        self.active_until = 0.0
        self.keys: dict[str, PeerUsage] = {}


class _Key:
    """One VirtualKey's state on this replica, for the current window."""

    __slots__ = (
        "claim_requests",
        "claim_tokens",
        "completion",
        "epoch",
        "inflight",
        "last_used",
        "pending_requests",
        "pending_tokens",
        "prompt",
        "refused",
        "requests",
        "total_completion",
        "total_prompt",
        "total_requests",
        "window",
    )

    def __init__(self) -> None:
        self.window = -1.0  # start of the window the counts below are for
        self.requests = 0
        self.prompt = 0
        self.completion = 0
        self.refused = 0
        self.inflight = 0
        # The claims in force, and the ones computed but not yet published: a claim may
        # shrink at once, it grows only once the others can see it (``published``).
        self.claim_requests = math.inf
        self.claim_tokens = math.inf
        self.pending_requests = math.inf
        self.pending_tokens = math.inf
        self.epoch = -1  # the view epoch the claims were computed on
        self.total_requests = 0
        self.total_prompt = 0
        self.total_completion = 0
        self.last_used = 0.0

    @property
    def tokens(self) -> int:
        return self.prompt + self.completion


def usage_of(payload: bytes) -> tuple[int, int] | None:
    """(prompt, completion) tokens of the last ``usage`` object in a body or a stream's tail
    (OpenAI ``prompt_tokens``/``completion_tokens``, Anthropic ``input_tokens``/
    ``output_tokens``), or None when there is none. Reads at most a few KiB."""
    at = payload.rfind(_USAGE)
    if at < 0:
        return None
    start = payload.find(b"{", at + len(_USAGE), at + len(_USAGE) + 16)
    if start < 0:
        return None
    end = payload.find(b"}", start, start + _USAGE_CAP)
    if end < 0:
        return None
    try:
        usage = _json.loads(payload[start : end + 1])
    except ValueError:
        return None
    if not isinstance(usage, dict):
        return None
    prompt = usage.get("prompt_tokens", usage.get("input_tokens", 0))
    completion = usage.get("completion_tokens", usage.get("output_tokens", 0))
    if not (isinstance(prompt, int) and isinstance(completion, int)):
        return None
    return max(0, prompt), max(0, completion)


# which -> (name, help, labels) of the per-VirtualKey series (``_Meters``).
_FAMILIES: Mapping[str, tuple[str, str, tuple[str, ...]]] = {
    "tokens": (
        "sideproxy_tokens",
        "Tokens the providers reported in 'usage', by virtual key, model and kind "
        "(prompt, completion).",
        ("virtual_key", "model", "kind"),
    ),
    "requests": (
        "sideproxy_virtual_key_requests",
        "Client requests by virtual key and what admission said (admitted, limited, "
        "model_not_allowed).",
        ("virtual_key", "result"),
    ),
    "unmetered": (
        "sideproxy_virtual_key_unmetered_streams",
        "Streams that ended without a 'usage' object: their tokens are not counted.",
        ("virtual_key",),
    ),
}


class _Meters(Collector):
    """The per-VirtualKey series, in the app's registry. ``virtual_key`` is a VirtualKey name
    of the loaded table ('' for anonymous keys); ``model`` a model the pool or the VirtualKey
    names exactly, else 'other': client input never grows the series.

    Plain integers in dicts, exported at scrape time (as ``_metrics._HotPath``): a request
    counts two or three of them, and prometheus_client's children take a lock per ``inc``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._counts: dict[tuple[str, ...], int] = {}  # (which, *labels) -> count
        registry.register(self)

    def count(self, which: str, *labels: str, amount: int = 1) -> None:
        """``which``: tokens, requests or unmetered."""
        key = (which, *labels)
        counts = self._counts
        counts[key] = counts.get(key, 0) + amount

    def forget(self, keep: frozenset[str]) -> None:
        """Drop the series of VirtualKeys no longer configured (cardinality stays bounded)."""
        for key in [k for k in self._counts if k[1] and k[1] not in keep]:
            del self._counts[key]

    def collect(self) -> Iterable[Metric]:
        families = {
            which: CounterMetricFamily(name, doc, labels=list(labels))
            for which, (name, doc, labels) in _FAMILIES.items()
        }
        for (which, *labels), count in list(self._counts.items()):
            families[which].add_metric(labels, float(count))
        yield from families.values()


class Ticket:
    """One admitted request; :meth:`close` exactly once (the forwarder does, in ``finally``)."""

    __slots__ = (
        "_admission",
        "_completion",
        "_key",
        "_prompt",
        "_seen",
        "_streamed",
        "model",
        "name",
    )

    def __init__(self, admission: Admission, name: str, key: _Key | None, model: str) -> None:
        self._admission = admission
        self.name = name
        self._key = key
        self.model = model
        self._prompt = 0
        self._completion = 0
        self._seen = False
        self._streamed = False

    def usage(self, payload: bytes | None, *, streamed: bool = False) -> None:
        """Count the ``usage`` in a whole body or in the tail of a finished stream."""
        self._streamed = streamed
        if payload:
            found = usage_of(payload)
            if found is not None:
                self._prompt, self._completion = found
                self._seen = True

    def close(self, pool_key: str | None = None) -> None:
        """``pool_key``: the PoolKey that answered last, whose token counts grow too."""
        admission = self._admission
        if pool_key is not None and (self._prompt or self._completion):
            tally = admission.pool_key_tokens.setdefault(pool_key, [0, 0])
            tally[0] += self._prompt
            tally[1] += self._completion
        key = self._key
        if key is not None:
            key.inflight -= 1
            key.prompt += self._prompt
            key.completion += self._completion
            key.total_prompt += self._prompt
            key.total_completion += self._completion
            admission.changed()
        meters = admission.meters
        if self._prompt:
            meters.count("tokens", self.name, self.model, "prompt", amount=self._prompt)
        if self._completion:
            meters.count("tokens", self.name, self.model, "completion", amount=self._completion)
        if self._streamed and not self._seen:
            meters.count("unmetered", self.name)


class Admission:
    """The limits of every VirtualKey on this replica, and what it knows of the others."""

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        window: float = 60.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not window > 0:
            raise ValueError("the admission window must be > 0 seconds")
        self.window = window
        self.clock = clock
        self.meters = _Meters(registry)
        self._keys: dict[str, _Key] = {}
        self._peers: dict[str, _Peer] = {}
        # Usage of replicas whose report went away, per (VirtualKey, window start).
        self._departed: dict[tuple[str, float], int] = {}
        self._departed_tokens: dict[tuple[str, float], int] = {}
        self._epoch = 0  # moves whenever the view of the other replicas changes
        self._next_expiry = math.inf  # when a peer stops being active
        self._models: frozenset[str] = frozenset()  # exact model names: metric labels
        self._limits: dict[str, VirtualKeyLimits | None] = {}
        self.on_change: Callable[[], None] | None = None  # the publisher's poke
        # PoolKey name -> [prompt, completion] tokens it served since start: for the health
        # writer's ReplicaReport ``KeyCounts.promptTokens`` / ``completionTokens``.
        self.pool_key_tokens: dict[str, list[int]] = {}
        self.version = 0  # moves on every local change (the publisher compares it)

    # ------------------------------------------------------------------ configuration

    def configure(
        self, limits: Mapping[str, VirtualKeyLimits | None], models: Iterable[str]
    ) -> None:
        """A new table (VirtualKey name -> its limits): forget the state and series of
        VirtualKeys it no longer has."""
        for name in [n for n in self._keys if n not in limits]:
            del self._keys[name]
        had = bool(self._limits)
        self._limits = dict(limits)
        self._models = frozenset(m for m in models if "*" not in m)
        self.meters.forget(frozenset(limits))
        if had != bool(limits):
            self.changed()  # the usage channel starts with the first VirtualKey

    def configured(self) -> bool:
        """Does the loaded table have VirtualKeys?"""
        return bool(self._limits)

    # ------------------------------------------------------------------ the request path

    def admit(self, identity: Identity, model: str | None) -> Ticket:
        name = identity.name
        if name is None:  # anonymous: counted, never limited
            return Ticket(self, "", None, self._label(model, ()))
        meters = self.meters
        if not identity.allows(model):
            meters.count("requests", name, "model_not_allowed")
            shown = (model or "")[:128]
            raise ModelNotAllowed(f"virtual key {name!r} may not use model {shown!r}")
        key = self._keys.get(name)
        if key is None:
            key = self._keys[name] = _Key()
        limits = identity.limits
        now = self.clock()
        if limits is not None:
            self._check(name, key, limits, now)
        else:
            self._roll(key, now)
        key.requests += 1
        key.total_requests += 1
        key.inflight += 1
        key.last_used = now
        meters.count("requests", name, "admitted")
        self.changed()
        return Ticket(self, name, key, self._label(model, identity.models))

    def _label(self, model: str | None, named: tuple[str, ...]) -> str:
        if model is None:
            return ""
        return model if model in self._models or model in named else "other"

    def _roll(self, key: _Key, now: float) -> float:
        start = now - now % self.window
        if key.window != start:
            key.window = start
            key.requests = key.prompt = key.completion = key.refused = 0
            key.claim_requests = key.claim_tokens = math.inf
            key.pending_requests = key.pending_tokens = math.inf
            key.epoch = -1
        return start

    def _check(self, name: str, key: _Key, limits: VirtualKeyLimits, now: float) -> None:
        start = self._roll(key, now)
        if now >= self._next_expiry:
            self._expire(now)
        if key.epoch != self._epoch:
            self._anchor(name, key, limits, start, now)
        rpm, tpm, most = (
            limits.requests_per_minute,
            limits.tokens_per_minute,
            limits.max_concurrent,
        )
        why = None
        if most is not None and key.inflight >= self._concurrency_share(most, now):
            why = f"at most {most} requests in flight"
        elif rpm is not None and key.requests + 1 > key.claim_requests + 1e-9:
            why = f"{rpm} requests per minute"
        elif tpm is not None and key.tokens >= key.claim_tokens:
            why = f"{tpm} tokens per minute"
        if why is None:
            return
        key.refused += 1
        self.meters.count("requests", name, "limited")
        self.changed()  # a refused replica asks the others for room by publishing
        wait = 1 if why.startswith("at most") else self._retry_after(name, key, limits, now)
        raise VirtualKeyLimit(
            f"virtual key {name!r} is over its limit of {why}; retry after {wait}s",
            headers={"Retry-After": str(wait), "retry-after-ms": str(wait * 1000)},
        )

    def _retry_after(self, name: str, key: _Key, limits: VirtualKeyLimits, now: float) -> int:
        """1 s while the pool-wide budget has room (a claim may grow), else the window's end."""
        requests, tokens = self._others(name, key.window, now)
        rpm, tpm = limits.requests_per_minute, limits.tokens_per_minute
        full = (rpm is not None and key.requests + requests >= rpm) or (
            tpm is not None and key.tokens + tokens >= tpm
        )
        return max(1, math.ceil(key.window + self.window - now)) if full else 1

    # ------------------------------------------------------------------ sharing

    def _active_peers(self, now: float) -> int:
        return sum(1 for p in self._peers.values() if p.active_until > now)

    def _concurrency_share(self, limit: int, now: float) -> int:
        """This replica's part of ``limit``: the active replicas split it by rank."""
        others = self._active_peers(now)
        if not others:
            return limit
        # Every replica ranks itself after the others it sees; equal views give each a
        # distinct rank only on average, so round down: the shares never sum over the limit.
        return max(1, limit // (others + 1)) if limit > others else 1

    def _others(
        self, name: str, start: float, now: float, limits: VirtualKeyLimits | None = None
    ) -> tuple[float, float]:
        """What the other replicas hold of this window: an active one its claim (it may still
        use it; one that has published none for this window may take its first share without
        asking, so that share counts), one that is gone only what it used."""
        requests = float(self._departed.get((name, start), 0))
        tokens = float(self._departed_tokens.get((name, start), 0))
        replicas = self._active_peers(now) + 1
        for peer in self._peers.values():
            seen = peer.keys.get(name)
            if seen is None or seen.window_start != start:
                if limits is not None and peer.active_until > now:
                    requests += (limits.requests_per_minute or 0) / replicas
                    tokens += (limits.tokens_per_minute or 0) / replicas
                continue
            if peer.active_until > now:
                requests += max(seen.claimed_requests, seen.requests)
                tokens += max(seen.claimed_tokens, seen.tokens)
            else:
                requests += seen.requests
                tokens += seen.tokens
        return requests, tokens

    def _anchor(
        self, name: str, key: _Key, limits: VirtualKeyLimits, start: float, now: float
    ) -> None:
        replicas = self._active_peers(now) + 1
        requests, tokens = self._others(name, start, now, limits)
        rpm, tpm = limits.requests_per_minute, limits.tokens_per_minute
        if rpm is not None:
            room = rpm - key.requests - requests
            key.pending_requests = key.requests + max(0.0, room / replicas)
        if tpm is not None:
            room = tpm - key.tokens - tokens
            key.pending_tokens = key.tokens + max(0.0, room / replicas)
        alone = not self._peers
        fresh = key.claim_requests == math.inf and key.claim_tokens == math.inf
        if alone or fresh:
            # Nobody to race with, or the window's first claim (the others' first claims
            # were computed from the same view, so the split already sums to the limit).
            key.claim_requests, key.claim_tokens = key.pending_requests, key.pending_tokens
        else:
            key.claim_requests = min(key.claim_requests, key.pending_requests)
            key.claim_tokens = min(key.claim_tokens, key.pending_tokens)
        key.epoch = self._epoch
        self.changed()

    def _expire(self, now: float) -> None:
        """A peer stopped being active since the last look: its share is free."""
        self._epoch += 1
        upcoming = [p.active_until for p in self._peers.values() if p.active_until > now]
        self._next_expiry = min(upcoming, default=math.inf)

    # ------------------------------------------------------------------ the channel

    def observe(self, replica: str, keys: Mapping[str, PeerUsage], active: bool) -> None:
        """Another replica's latest report (``active``: it published recently)."""
        peer = self._peers.get(replica)
        if peer is None:
            peer = self._peers[replica] = _Peer()
        peer.keys = dict(keys)
        now = self.clock()
        if active:
            peer.active_until = now + ACTIVE_GRACE
            self._next_expiry = min(self._next_expiry, peer.active_until)
        self._epoch += 1
        # Re-anchor at once what this replica holds a claim on, so an idle replica gives back
        # room to a busy one without waiting for a request of its own.
        for name in keys:
            key, limits = self._keys.get(name), self._limits.get(name)
            if key is not None and limits is not None and key.window == keys[name].window_start:
                self._anchor(name, key, limits, key.window, now)

    def depart(self, replica: str) -> None:
        """Another replica's report is gone: its usage counts until its windows end."""
        peer = self._peers.pop(replica, None)
        if peer is None:
            return
        for name, seen in peer.keys.items():
            slot = (name, seen.window_start)
            self._departed[slot] = self._departed.get(slot, 0) + seen.requests
            self._departed_tokens[slot] = self._departed_tokens.get(slot, 0) + seen.tokens
        self._epoch += 1

    def changed(self) -> None:
        self.version += 1
        poke = self.on_change
        if poke is not None:
            poke()

    def report(self, now: float) -> list[dict[str, object]]:
        """This replica's entries for its ``ReplicaReport`` (``wire.VirtualKeyUsage`` fields):
        VirtualKeys used in this window or still in flight."""
        start = now - now % self.window
        for slot in [s for s in self._departed if s[1] < start]:
            self._departed.pop(slot, None)
            self._departed_tokens.pop(slot, None)
        entries: list[dict[str, object]] = []
        for name, key in sorted(self._keys.items()):
            if key.window != start and not key.inflight:
                continue
            current = key.window == start
            entries.append(
                {
                    "name": name,
                    "windowStart": start,
                    "requests": key.requests if current else 0,
                    "promptTokens": key.prompt if current else 0,
                    "completionTokens": key.completion if current else 0,
                    "refused": key.refused if current else 0,
                    "claimedRequests": _finite(key.pending_requests) if current else 0.0,
                    "claimedTokens": _finite(key.pending_tokens) if current else 0.0,
                    "inflight": key.inflight,
                    "totalRequests": key.total_requests,
                    "totalPromptTokens": key.total_prompt,
                    "totalCompletionTokens": key.total_completion,
                    "lastUsed": key.last_used,
                }
            )
        return entries

    def published(self, entries: Iterable[Mapping[str, object]]) -> None:
        """The report holding ``entries`` was written: the claims it announced are in force
        (the others see them before anything they write after)."""
        for entry in entries:
            key = self._keys.get(str(entry["name"]))
            if key is None or key.window != entry["windowStart"]:
                continue
            claimed = entry["claimedRequests"]
            if isinstance(claimed, float) and claimed and claimed == _finite(key.pending_requests):
                key.claim_requests = key.pending_requests
            claimed = entry["claimedTokens"]
            if isinstance(claimed, float) and claimed and claimed == _finite(key.pending_tokens):
                key.claim_tokens = key.pending_tokens

    def active(self, now: float) -> bool:
        """Has this replica anything to publish for the current window?"""
        start = now - now % self.window
        return any(k.window == start or k.inflight for k in self._keys.values())


def _finite(value: float) -> float:
    # No limit of that kind: publish no claim (the others treat 0 claims as "nothing held").
    return 0.0 if math.isinf(value) else round(value, 3)
