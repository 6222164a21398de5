"""Prometheus metrics, in a registry of the app's own (never the process-global one).

Labels carry key *names* only, never values. The request path's counters and histograms are
plain numbers exported at scrape time (``_HotPath``); so is key state, from ``pool.statuses()``
(which only reads). prometheus_client objects remain for what changes rarely.
"""

from __future__ import annotations

import math
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
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


class _Histogram:
    """Bucket counts and a sum: what ``observe`` costs is one bisect and two additions."""

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(_LATENCY_BUCKETS) + 1)  # the last one is +Inf
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(_LATENCY_BUCKETS, seconds)] += 1
        self.total += seconds

    def buckets(self) -> list[tuple[str, float]]:
        cumulative, out = 0, []
        for bound, count in zip((*_LATENCY_BUCKETS, math.inf), self.counts, strict=True):
            cumulative += count
            out.append(("+Inf" if bound == math.inf else repr(bound), float(cumulative)))
        return out


class _HotPath(Collector):
    """The request path's counters: plain ints and lists in dicts, exported at scrape time.

    prometheus_client's children take a lock per ``inc``/``observe`` (about eight a request);
    the event loop is one thread, so plain integers are exact and cost a dict lookup each."""

    def __init__(self, metrics: Metrics) -> None:
        self._m = metrics

    def collect(self) -> Iterable[Metric]:
        m = self._m
        yield _counter(
            "sideproxy_upstream_requests",
            "Upstream attempts by key name, provider and status ('error', 'timeout' or "
            "'cancelled' when there was none).",
            ["key", "provider", "status"],
            m.upstream_counts,
        )
        yield _counter(
            "sideproxy_requests",
            "Client requests by provider and the status the proxy answered (499: client left).",
            ["provider", "status"],
            m.client_counts,
        )
        yield _counter(
            "sideproxy_retries",
            "Attempts repeated on another key, by provider and what the previous attempt got.",
            ["provider", "reason"],
            m.retry_counts,
        )
        yield _counter(
            "sideproxy_route_requests",
            "Client requests for a route's model, by route, the target that served it last "
            "('<provider>/<model>', '-' when none could) and the status answered. Routes and "
            "targets come from the pool's configuration, so the labels are bounded.",
            ["route", "target", "status"],
            m.route_counts,
        )
        yield _histogram(
            "sideproxy_upstream_latency_seconds",
            "One upstream attempt, from sending the request to the end of the response body.",
            m.latencies,
        )
        yield _histogram(
            "sideproxy_time_to_first_byte_seconds",
            "From the client's request arriving to the first response byte sent back.",
            m.ttfbs,
        )
        yield GaugeMetricFamily(
            "sideproxy_inflight_requests", "Client requests in progress.", value=m.inflight
        )


def _counter(
    name: str, doc: str, labels: list[str], counts: dict[tuple[str, ...], int]
) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc, labels=labels)
    for values, count in list(counts.items()):
        family.add_metric(list(values), float(count))
    return family


def _histogram(name: str, doc: str, series: dict[str, _Histogram]) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, doc, labels=["provider"])
    for provider, hist in list(series.items()):
        family.add_metric([provider], hist.buckets(), hist.total)
    return family


class Metrics:
    def __init__(self, pool: ManagedCreditPool, clock: Callable[[], float] = time.time) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        # The hot path's: plain numbers (see _HotPath).
        self.inflight = 0
        self.upstream_counts: dict[tuple[str, ...], int] = {}
        self.client_counts: dict[tuple[str, ...], int] = {}
        self.retry_counts: dict[tuple[str, ...], int] = {}
        self.route_counts: dict[tuple[str, ...], int] = {}
        self.latencies: dict[str, _Histogram] = {}
        self.ttfbs: dict[str, _Histogram] = {}
        self._cooldowns = Counter(
            "sideproxy_key_transitions",
            "Key health changes learnt from provider answers (cool-downs, exhaustion, "
            "revocations, breaker, recoveries), by key name and reason.",
            ["key", "reason"],
            registry=r,
        )
        self._no_key = Counter(
            "sideproxy_no_key_available",
            "Requests answered 429 because no key of the provider was usable.",
            ["provider"],
            registry=r,
        )
        self._probes = Counter(
            "sideproxy_key_probes",
            "Token-free probes (GET <baseURL>/models) of exhausted or revoked keys, by result "
            "(ok: the key is back; refused; no_answer).",
            ["provider", "result"],
            registry=r,
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
        r.register(_HotPath(self))
        r.register(_KeyStateCollector(pool, clock))
        self._transition_labels: set[tuple[str, str]] = set()

    def upstream(self, key: str, provider: str, status: str) -> None:
        labels = (key, provider, status)
        counts = self.upstream_counts
        counts[labels] = counts.get(labels, 0) + 1

    def client(self, provider: str, status: int) -> None:
        labels = (provider, str(status))
        counts = self.client_counts
        counts[labels] = counts.get(labels, 0) + 1

    def route(self, route: str, target: str, status: int) -> None:
        labels = (route, target, str(status))
        counts = self.route_counts
        counts[labels] = counts.get(labels, 0) + 1

    def retry(self, provider: str, reason: str) -> None:
        labels = (provider, reason)
        counts = self.retry_counts
        counts[labels] = counts.get(labels, 0) + 1

    def latency(self, provider: str, seconds: float) -> None:
        hist = self.latencies.get(provider)
        if hist is None:
            hist = self.latencies[provider] = _Histogram()
        hist.observe(seconds)

    def ttfb(self, provider: str, seconds: float) -> None:
        hist = self.ttfbs.get(provider)
        if hist is None:
            hist = self.ttfbs[provider] = _Histogram()
        hist.observe(seconds)

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
        for labels in [lbl for lbl in self.upstream_counts if lbl[0] not in keep]:
            del self.upstream_counts[labels]
        for pair in [lbl for lbl in self._transition_labels if lbl[0] not in keep]:
            self._transition_labels.discard(pair)
            self._cooldowns.remove(*pair)
