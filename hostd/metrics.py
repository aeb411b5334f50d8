"""Prometheus metrics on an injected registry.

Events (restores, publishes, phase durations, bytes by source) are counted where they
happen; state (tier use and budget, evictions, chunks in flight, origin requests, GPU memory)
is read at scrape time from the parts that own it, by a collector, so the numbers can never
drift from the truth. Labels are bounded sets: tier, source, result, phase, a GPU's index
and model; never ids or paths.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Protocol

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    exposition,
    openmetrics,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from hostd import __version__
from hostd.cache import Cache
from hostd.fetch import Fetcher
from hostd.guard import Guard
from hostd.hostfacts import GpuMemory, HostFacts
from hostd.origin import Origin
from hostd.peers import Membership, PeerClient

PEER_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30)
PHASE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
# What a stream (api_local.stream) can end as, for each operation that runs as one.
OPERATIONS = ("restore", "publish", "prefetch", "verify")
RESULTS = ("ok", "error", "not_found", "cancelled")
PUBLISH_KINDS = ("read", "stored")  # the source tree's bytes; those the origin was sent


class Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        # process_resident_memory_bytes, process_cpu_seconds_total, open fds: the standard
        # names every Prometheus setup already graphs.
        ProcessCollector(registry=registry)
        self.operations = Counter(
            "hostd_operations",
            "Finished operations by kind (restore, publish, prefetch, verify) and result.",
            ["operation", "result"],
            registry=registry,
        )
        # Each at 0 from the start: a series that first appears at 1 is an increase that
        # Prometheus's rate() and increase() never see, so an alert on the first failure
        # after a (re)start, `increase(hostd_operations_total{result="error"}[5m]) > 0`,
        # would not fire.
        for operation in OPERATIONS:
            for result in RESULTS:
                self.operations.labels(operation, result)
        self.phase_seconds = Histogram(
            "hostd_phase_duration_seconds",
            "Time spent in each phase of an operation.",
            ["operation", "phase"],
            buckets=PHASE_BUCKETS,
            registry=registry,
        )
        self.restore_bytes = Counter(
            "hostd_restore_bytes",
            "Bytes of the restores and prefetches that succeeded, by where they came from "
            "(what failed or cancelled ones fetched: hostd_chunk_fetched_bytes).",
            ["source"],
            registry=registry,
        )
        self.publish_bytes = Counter(
            "hostd_publish_bytes",
            "Bytes published: read from the source tree, and stored at the origin.",
            ["kind"],
            registry=registry,
        )
        for kind in PUBLISH_KINDS:
            self.publish_bytes.labels(kind)

        self.peer_seconds = Histogram(
            "hostd_peer_request_duration_seconds",
            "Requests to other hosts' peer API, by kind (chunk, have, health) and result.",
            ["kind", "result"],
            buckets=PEER_BUCKETS,
            registry=registry,
        )

    def observe_peer(self, kind: str, result: str, seconds: float) -> None:
        self.peer_seconds.labels(kind, result).observe(seconds)

    def sources(self, names: Iterable[str]) -> None:
        """Where restores may get bytes from (tiers, chunk sources), each at 0 from the start,
        as the operations are."""
        for name in names:
            self.restore_bytes.labels(name)

    def observe(self, operation: str, result: str, out: Mapping[str, Any] | None) -> None:
        """A finished operation, with its result document `out` where it succeeded: its
        phases' timings, and the bytes it restored by source or published."""
        self.operations.labels(operation, result).inc()
        out = out or {}
        for phase, seconds in out.get("timings", {}).items():
            self.phase_seconds.labels(operation, phase).observe(seconds)
        for src, n in out.get("bytes_by_source", {}).items():
            self.restore_bytes.labels(src).inc(n)
        if operation == "publish":
            self.publish_bytes.labels("read").inc(out.get("bytes", 0))
            self.publish_bytes.labels("stored").inc(out.get("stored_bytes", 0))


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


TEXT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
OPENMETRICS_TYPE = "application/openmetrics-text; version=1.0.0; charset=utf-8"
MAX_ACCEPT = 4096  # characters of an Accept header read: a scraper names a few media types


def wants_openmetrics(accept: str) -> bool:
    """Whether an Accept header asks for OpenMetrics 1.0.0: that media type with no version
    or version 1.0.0, and a q above 0 (q=0 refuses it). Pure and total: any header, however
    odd, is an answer (the client library's choose_encoder raised on `version=x`, echoed a
    version it never wrote, and honoured `escaping=dots`, which renames every metric)."""
    for item in accept[:MAX_ACCEPT].split(","):
        kind, *params = item.split(";")
        if kind.strip().lower() != "application/openmetrics-text":
            continue
        fields = {k.strip().lower(): v.strip() for k, _, v in (p.partition("=") for p in params)}
        try:
            q = float(fields.get("q", "1"))
        except ValueError:
            continue
        if fields.get("version", "1.0.0") == "1.0.0" and q > 0:
            return True
    return False


def render(snapshot: Collector, accept: str) -> tuple[bytes, str]:
    """The body and Content-Type answering `accept` (blocking: formats every family)."""
    if wants_openmetrics(accept):
        encode = openmetrics.exposition.generate_latest  # (untyped)
        return encode(snapshot), OPENMETRICS_TYPE  # type: ignore[no-untyped-call]
    return exposition.generate_latest(snapshot), TEXT_TYPE


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
        used = GaugeMetricFamily(
            "hostd_tier_used_bytes",
            "Bytes held in a tier, with those reserved for blobs being filled at their full size.",
            labels=["tier"],
        )
        budget = GaugeMetricFamily("hostd_tier_budget_bytes", "A tier's budget.", labels=["tier"])
        blobs = GaugeMetricFamily(
            "hostd_tier_blobs", "Blobs held in a tier, those being filled too.", labels=["tier"]
        )
        room = GaugeMetricFamily(
            "hostd_tier_room_bytes",
            "What a tier may hold now: its budget, or less where its filesystem has less room "
            "(other writers), as last measured.",
            labels=["tier"],
        )
        for u in self.cache.usage():
            used.add_metric([u.name], u.used)
            budget.add_metric([u.name], u.budget)
            blobs.add_metric([u.name], u.blobs)
            room.add_metric([u.name], u.room)
        yield from (used, budget, blobs, room)
        ev = CounterMetricFamily(
            "hostd_evictions", "Blobs evicted from a tier, by action.", labels=["tier", "action"]
        )
        for t in self.cache.tiers:
            for action in ("demote", "delete"):
                ev.add_metric([t.name, action], self.cache.evictions[(t.name, action)])
        yield ev
        rh = CounterMetricFamily(
            "hostd_blob_rehashes",
            "Blobs re-hashed: a use that found a blob's state in doubt (a lent blob's ctime "
            "moved, a broken lease), or verify.",
            labels=["tier"],
        )
        for t in self.cache.tiers:
            rh.add_metric([t.name], self.cache.rehashes[t.name])
        yield rh
        if (leases := self.cache.leases) is not None:
            yield GaugeMetricFamily(
                "hostd_link_leases", "Read leases held on blobs linked out.", value=len(leases)
            )
            yield CounterMetricFamily(
                "hostd_link_lease_breaks",
                "Read leases broken: a blob linked out was opened for writing.",
                value=leases.broken,
            )
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
        fast = self.origin.fast_reads
        if fast is not None:
            fr = CounterMetricFamily(
                "hostd_origin_fast_reads",
                "Chunk and pack reads by hostd's own HTTP client: answered, or handed to "
                "obstore (any answer but a plain 200/206 with a Content-Length).",
                labels=["result"],
            )
            fr.add_metric(["taken"], fast[0])
            fr.add_metric(["fallback"], fast[1])
            yield fr
        info = GaugeMetricFamily("hostd_build_info", "hostd's version.", labels=["version"])
        info.add_metric([__version__], 1)
        yield info


class GuardCollector(Collector):
    """The connections each listener's guard (hostd/guard.py) holds and has closed."""

    def __init__(self, guards: Sequence[Guard]) -> None:
        self.guards = guards

    def collect(self) -> Iterator[Metric]:
        held = GaugeMetricFamily(
            "hostd_connections_open", "Connections open, by listener.", labels=["listener"]
        )
        closed = CounterMetricFamily(
            "hostd_connections_closed",
            "Connections the daemon closed unserved, by listener and reason: too_many (the "
            "client, or everyone, had the most open already), displaced (one of the client "
            "holding the most, closed to let in another's while everyone together had the "
            "most open), no_head (no whole request head within the deadline).",
            labels=["listener", "reason"],
        )
        for g in self.guards:
            held.add_metric([g.name], g.connections)
            closed.add_metric([g.name, "too_many"], g.refused)
            closed.add_metric([g.name, "displaced"], g.displaced)
            closed.add_metric([g.name, "no_head"], g.timed_out)
        yield from (held, closed)


class PeerCollector(Collector):
    """The peer client's and server's counters, and the members by state, at scrape time."""

    def __init__(self, client: PeerClient, membership: Membership) -> None:
        self.client = client
        self.membership = membership

    def collect(self) -> Iterator[Metric]:
        st = self.client.stats
        members = GaugeMetricFamily(
            "hostd_peers",
            "Peers known, by state (live, dead, rejecting, struck, self).",
            labels=["state"],
        )
        for state, n in self.membership.roster.counts().items():
            members.add_metric([state], n)
        yield members
        got = CounterMetricFamily(
            "hostd_peer_chunks",
            "Chunks got from peers, by the peer's role (owner, holder) and how it served them "
            "(held: from its cache; pull: pulled through from its origin for us).",
            labels=["role", "how"],
        )
        got_bytes = CounterMetricFamily(
            "hostd_peer_chunk_bytes",
            "Bytes of the chunks counted in hostd_peer_chunks.",
            labels=["role", "how"],
        )
        for role in ("owner", "holder"):
            for how in ("held", "pull"):
                got.add_metric([role, how], st.chunks[(role, how)])
                got_bytes.add_metric([role, how], st.bytes[(role, how)])
        yield from (got, got_bytes)
        yield CounterMetricFamily(
            "hostd_origin_saved_bytes",
            "Chunk bytes got from peers rather than from the origin.",
            value=sum(st.bytes.values()),
        )
        strikes = CounterMetricFamily(
            "hostd_peer_strikes",
            "Peers struck, by reason (corrupt, stall, silent: pull-throughs taken and not sent).",
            labels=["reason"],
        )
        for reason in ("corrupt", "stall", "silent"):
            strikes.add_metric([reason], st.strikes[reason])
        yield strikes
        hedges = CounterMetricFamily(
            "hostd_peer_hedges",
            "Hedged chunk requests: started (a holder raced a slow owner), won (the holder "
            "answered first).",
            labels=["result"],
        )
        for r in ("started", "won"):
            hedges.add_metric([r], st.hedges[r])
        yield hedges
        yield CounterMetricFamily(
            "hostd_peer_busy_waits",
            "Times every peer asked for a chunk answered busy, and this host waited to ask again.",
            value=st.busy_waits,
        )
        served = CounterMetricFamily(
            "hostd_peer_served_chunks",
            "Chunks this host served to peers, by where from (file: a blob by sendfile; "
            "buffer: pulled earlier as owner; pull: pulled through from the origin now).",
            labels=["source"],
        )
        served_bytes = CounterMetricFamily(
            "hostd_peer_served_bytes",
            "Bytes of the chunks in hostd_peer_served_chunks.",
            labels=["source"],
        )
        for src in ("file", "buffer", "pull"):
            served.add_metric([src], st.served_chunks[src])
            served_bytes.add_metric([src], st.served_bytes[src])
        yield from (served, served_bytes)
        refused = CounterMetricFamily(
            "hostd_peer_refused",
            "Peer requests this host refused, by reason (unauthorized, missing, busy, barred: "
            "a pull for an address whose last pull did not verify).",
            labels=["reason"],
        )
        for r in ("unauthorized", "missing", "busy", "barred"):
            refused.add_metric([r], st.refused[r])
        yield refused


class HostCollector(Collector):
    """This host's facts as one info gauge, and each GPU's memory as NVML last told it.

    This runs on the event loop, and NVML can take seconds to answer (or never), so it never
    asks NVML: `memory` (hostfacts.GpuMemory) answers from its last reading and refreshes it
    on a thread of its own. Without NVML there are no GPU series at all, not zeros; nor for a
    GPU NVML could not read (lost), or has left unanswered past its timeout."""

    def __init__(self, host: HostFacts, memory: GpuMemory | None = None) -> None:
        self.host = host
        self.memory = memory if memory is not None else GpuMemory.of(host)

    def __repr__(self) -> str:
        return f"HostCollector({self.host!r}, {self.memory!r})"

    def collect(self) -> Iterator[Metric]:
        facts = self.host.facts
        info = GaugeMetricFamily(
            "hostd_host_info",
            "This host's compat facts (none: the host cannot tell); always 1.",
            labels=list(facts),
        )
        info.add_metric(list(facts.values()), 1)
        yield info
        readings = self.memory.latest()
        if not readings:
            return
        labels = ["gpu", "model"]
        total = GaugeMetricFamily(
            "hostd_gpu_memory_total_bytes", "A GPU's memory, as NVML reports it.", labels=labels
        )
        used = GaugeMetricFamily(
            "hostd_gpu_memory_used_bytes",
            "A GPU's memory in use, by any process, as last read (refreshed between scrapes).",
            labels=labels,
        )
        for gpu, used_bytes, total_bytes in readings:
            total.add_metric([str(gpu.index), gpu.name], total_bytes)
            used.add_metric([str(gpu.index), gpu.name], used_bytes)
        yield from (total, used)
