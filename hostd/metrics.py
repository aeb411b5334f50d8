"""Prometheus metrics on an injected registry.

Events (restores, publishes, phase durations, bytes by source) are counted where they
happen; state (tier use and budget, evictions, chunks in flight, origin requests) is read at
scrape time from the parts that own it, by a collector, so the numbers can never drift from
the truth. Labels are bounded sets: tier, source, result, phase; never ids or paths.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from hostd import __version__
from hostd.cache import Cache
from hostd.fetch import Fetcher
from hostd.origin import Origin

PHASE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.operations = Counter(
            "hostd_operations",
            "Finished operations by kind (restore, publish, prefetch, verify) and result.",
            ["operation", "result"],
            registry=registry,
        )
        self.phase_seconds = Histogram(
            "hostd_phase_duration_seconds",
            "Time spent in each phase of an operation.",
            ["operation", "phase"],
            buckets=PHASE_BUCKETS,
            registry=registry,
        )
        self.restore_bytes = Counter(
            "hostd_restore_bytes",
            "Bytes restores and prefetches obtained, by where they came from.",
            ["source"],
            registry=registry,
        )
        self.publish_bytes = Counter(
            "hostd_publish_bytes",
            "Bytes published: read from the source tree, and stored at the origin.",
            ["kind"],
            registry=registry,
        )

    def observe(self, operation: str, result: str, timings: dict[str, float] | None) -> None:
        self.operations.labels(operation, result).inc()
        for phase, seconds in (timings or {}).items():
            self.phase_seconds.labels(operation, phase).observe(seconds)


class Snapshot(Collector):
    """Every metric of a registry, collected at once, to format later (e.g. in a thread).

    Take it on the event loop: the state collector reads dicts that the loop changes
    between awaits (the cache's blobs and evictions, fetch and origin stats), so a scrape
    that iterated them from a worker thread could fail with "dictionary changed size
    during iteration", or mix two moments. Collecting is cheap (no I/O); formatting, the
    larger share, needs no loop state since every family here is a fresh object.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.families = list(registry.collect())

    def __repr__(self) -> str:
        return f"Snapshot({len(self.families)} families)"

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


class _Running(Protocol):
    @property
    def in_flight(self) -> int: ...


class StateCollector(Collector):
    """Gauges and counters read at scrape time from the cache, fetcher and origin."""

    def __init__(self, cache: Cache, fetcher: Fetcher, origin: Origin, running: _Running) -> None:
        self.cache = cache
        self.fetcher = fetcher
        self.origin = origin
        self.running = running

    def collect(self) -> Iterator[Metric]:
        used = GaugeMetricFamily("hostd_tier_used_bytes", "Bytes held in a tier.", labels=["tier"])
        budget = GaugeMetricFamily("hostd_tier_budget_bytes", "A tier's budget.", labels=["tier"])
        blobs = GaugeMetricFamily("hostd_tier_blobs", "Blobs held in a tier.", labels=["tier"])
        for u in self.cache.usage():
            used.add_metric([u.name], u.used)
            budget.add_metric([u.name], u.budget)
            blobs.add_metric([u.name], u.blobs)
        yield from (used, budget, blobs)
        ev = CounterMetricFamily(
            "hostd_evictions", "Blobs evicted from a tier, by action.", labels=["tier", "action"]
        )
        for t in self.cache.tiers:
            for action in ("demote", "delete"):
                ev.add_metric([t.name, action], self.cache.evictions[(t.name, action)])
        yield ev
        yield GaugeMetricFamily(
            "hostd_chunks_in_flight", "Chunk fetches under way.", value=self.fetcher.in_flight
        )
        yield GaugeMetricFamily(
            "hostd_operations_in_flight", "API operations running.", value=self.running.in_flight
        )
        yield CounterMetricFamily(
            "hostd_singleflight_joins",
            "Chunk requests that joined a fetch already under way.",
            value=self.fetcher.stats.joins,
        )
        st = self.fetcher.stats
        fetched = CounterMetricFamily(
            "hostd_chunks_fetched", "Chunks fetched, by source.", labels=["source"]
        )
        fetched_bytes = CounterMetricFamily(
            "hostd_chunk_fetched_bytes", "Chunk bytes fetched, by source.", labels=["source"]
        )
        errors = CounterMetricFamily(
            "hostd_chunk_errors",
            "Chunk fetches that failed, by source and kind.",
            labels=["source", "kind"],
        )
        for src in self.fetcher.sources:
            fetched.add_metric([src.name], st.chunks[src.name])
            fetched_bytes.add_metric([src.name], st.bytes[src.name])
            errors.add_metric([src.name, "missing"], st.missing[src.name])
            errors.add_metric([src.name, "corrupt"], st.corrupt[src.name])
        yield from (fetched, fetched_bytes, errors)
        o = self.origin.stats
        req = CounterMetricFamily(
            "hostd_origin_requests", "Requests to the origin, by result.", labels=["result"]
        )
        for result, n in (
            ("ok", o.requests_ok),
            ("missing", o.requests_missing),
            ("retried", o.requests_retried),
            ("failed", o.requests_failed),
        ):
            req.add_metric([result], n)
        yield req
        ob = CounterMetricFamily(
            "hostd_origin_bytes", "Bytes moved to and from the origin.", labels=["direction"]
        )
        ob.add_metric(["in"], o.bytes_in)
        ob.add_metric(["out"], o.bytes_out)
        yield ob
        info = GaugeMetricFamily("hostd_build_info", "hostd's version.", labels=["version"])
        info.add_metric([__version__], 1)
        yield info
