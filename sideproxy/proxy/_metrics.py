"""Prometheus metrics, in a registry of the app's own (never the process-global one).

Labels carry key *names* only, never values. ``labels()`` is a locked dict lookup with tuple
building, too slow for the hot path, so children are cached here per label tuple.
The key-state gauge is computed at scrape time from ``pool.statuses()``: no hot-path cost.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from sideproxy.pool import ManagedCreditPool, Transition

__all__ = ["Metrics"]

_LATENCY_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
)  # fmt: skip


_GLOB = frozenset("*?[")


def _named(models: tuple[str, ...]) -> frozenset[str]:
    """The exact model names of a key's ``models`` list (globs name no one model)."""
    return frozenset(m for m in models if not _GLOB.intersection(m))


class _KeyStateCollector(Collector):
    """Key state at scrape time, from ``pool.statuses`` (which only reads: a scrape never
    changes the pool). A ``model`` label appears only for models a PoolKey names exactly, so
    client input can never grow the series; other cooling models are only counted."""

    def __init__(self, pool: ManagedCreditPool, clock: Callable[[], float]) -> None:
        self._pool = pool
        self._clock = clock

    def collect(self) -> Iterable[Metric]:
        now = self._clock()
        state = GaugeMetricFamily(
            "sideproxy_key_state",
            "1 for each key's current key-wide health (ready, low-headroom, cooling, open, "
            "half-open, exhausted, revoked).",
            labels=["key", "provider", "state"],
        )
        until = GaugeMetricFamily(
            "sideproxy_key_unavailable_seconds",
            "Seconds until a key out for every model (cooling, open, exhausted) may be used or "
            "probed again.",
            labels=["key", "provider"],
        )
        models = GaugeMetricFamily(
            "sideproxy_key_models_cooling",
            "How many models a key is cooling for (rate-limited per model).",
            labels=["key", "provider"],
        )
        model_until = GaugeMetricFamily(
            "sideproxy_key_model_cooling_seconds",
            "Seconds until a key may serve a model again, for models its PoolKey names.",
            labels=["key", "provider", "model"],
        )
        for status in self._pool.statuses(now):
            key = [status.name, status.provider]
            state.add_metric([*key, str(status.health)], 1.0)
            if status.until is not None:
                until.add_metric(key, max(0.0, status.until - now))
            models.add_metric(key, float(len(status.cooling)))
            named = _named(status.models)
            for model, deadline in status.cooling:
                if model in named:
                    model_until.add_metric([*key, model], max(0.0, deadline - now))
        yield from (state, until, models, model_until)


class Metrics:
    def __init__(self, pool: ManagedCreditPool, clock: Callable[[], float] = time.time) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._upstream = Counter(
            "sideproxy_upstream_requests",
            "Upstream attempts by key name, provider and status ('error', 'timeout' or "
            "'cancelled' when there was none).",
            ["key", "provider", "status"],
            registry=r,
        )
        self._client = Counter(
            "sideproxy_requests",
            "Client requests by provider and the status the proxy answered (499: client left).",
            ["provider", "status"],
            registry=r,
        )
        self._retries = Counter(
            "sideproxy_retries",
            "Attempts repeated on another key, by provider and what the previous attempt got.",
            ["provider", "reason"],
            registry=r,
        )
        self._cooldowns = Counter(
            "sideproxy_key_transitions",
            "Key health changes learnt from provider answers (cool-downs, revocations, breaker), "
            "by key name and reason.",
            ["key", "reason"],
            registry=r,
        )
        self._no_key = Counter(
            "sideproxy_no_key_available",
            "Requests answered 429 because no key of the provider was usable.",
            ["provider"],
            registry=r,
        )
        self._latency = Histogram(
            "sideproxy_upstream_latency_seconds",
            "One upstream attempt, from sending the request to the end of the response body.",
            ["provider"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self._ttfb = Histogram(
            "sideproxy_time_to_first_byte_seconds",
            "From the client's request arriving to the first response byte sent back.",
            ["provider"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self._probes = Counter(
            "sideproxy_key_probes",
            "Token-free probes (GET <baseURL>/models) of exhausted or revoked keys, by result "
            "(ok: the key is back; refused; no_answer).",
            ["provider", "result"],
            registry=r,
        )
        self.inflight = Gauge(
            "sideproxy_inflight_requests", "Client requests in progress.", registry=r
        )
        self.reloads = Counter(
            "sideproxy_config_reloads",
            "Routing tables received from the config source, by result (applied, rejected).",
            ["result"],
            registry=r,
        )
        self.table_version = Gauge(
            "sideproxy_table_version", "Version of the routing table being served.", registry=r
        )
        r.register(_KeyStateCollector(pool, clock))
        self._upstream_children: dict[tuple[str, str, str], Counter] = {}
        self._client_children: dict[tuple[str, str], Counter] = {}
        self._retry_children: dict[tuple[str, str], Counter] = {}
        self._latency_children: dict[str, Histogram] = {}
        self._ttfb_children: dict[str, Histogram] = {}
        self._transition_labels: set[tuple[str, str]] = set()

    def upstream(self, key: str, provider: str, status: str) -> None:
        labels = (key, provider, status)
        child = self._upstream_children.get(labels)
        if child is None:
            child = self._upstream_children[labels] = self._upstream.labels(*labels)
        child.inc()

    def client(self, provider: str, status: int) -> None:
        labels = (provider, str(status))
        child = self._client_children.get(labels)
        if child is None:
            child = self._client_children[labels] = self._client.labels(*labels)
        child.inc()

    def retry(self, provider: str, reason: str) -> None:
        labels = (provider, reason)
        child = self._retry_children.get(labels)
        if child is None:
            child = self._retry_children[labels] = self._retries.labels(*labels)
        child.inc()

    def latency(self, provider: str, seconds: float) -> None:
        child = self._latency_children.get(provider)
        if child is None:
            child = self._latency_children[provider] = self._latency.labels(provider)
        child.observe(seconds)

    def ttfb(self, provider: str, seconds: float) -> None:
        child = self._ttfb_children.get(provider)
        if child is None:
            child = self._ttfb_children[provider] = self._ttfb.labels(provider)
        child.observe(seconds)

    def probe(self, provider: str, result: str) -> None:
        self._probes.labels(provider, result).inc()

    def no_key(self, provider: str) -> None:
        self._no_key.labels(provider).inc()

    def transitions(self, transitions: list[Transition]) -> None:
        for t in transitions:
            labels = (t.name, t.reason)
            self._transition_labels.add(labels)
            self._cooldowns.labels(*labels).inc()

    def forget_keys(self, keep: set[str]) -> None:
        """Drop the per-key series of keys no longer configured (cardinality stays bounded)."""
        for labels in [lbl for lbl in self._upstream_children if lbl[0] not in keep]:
            del self._upstream_children[labels]
            self._upstream.remove(*labels)
        for pair in [lbl for lbl in self._transition_labels if lbl[0] not in keep]:
            self._transition_labels.discard(pair)
            self._cooldowns.remove(*pair)
