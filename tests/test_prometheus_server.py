# ruff: noqa: F811  (the `work` fixture, imported)
"""hostd's metrics as a real Prometheus server scrapes them, as operators run it.

The other metrics tests read the exposition with prometheus_client's parser and lint it
with `promtool check metrics`; this one starts `/usr/bin/prometheus` (Debian package
`prometheus`, which CI installs) against a real daemon's TCP metrics port, and asks
Prometheus's HTTP API what it made of the scrapes: the target's health, the values an
operator graphs, the types it recorded, and its own counters of rejected samples. Every
wait polls with a deadline; nothing sleeps a fixed time.
"""

from __future__ import annotations

import calendar
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from harness import ROOT, Hostd, free_ports, make_tree
from prometheus_client.openmetrics import parser as openmetrics_parser
from prometheus_client.parser import text_string_to_metric_families
from test_e2e import wait_for
from test_faults import work  # noqa: F401  (a fixture)

SCRAPE_INTERVAL = "1s"
# What Prometheus 2.x (2.42, Debian 12's) asks a target for: OpenMetrics first.
PROMETHEUS_ACCEPT = (
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;"
    "q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)

# Prometheus's own counters of samples a scrape brought that it would not store: each
# must stay 0 for hostd's target (a name or type it rejects, a duplicate series, a
# timestamp out of order or bounds, a limit exceeded).
REJECTIONS = (
    "prometheus_target_scrapes_sample_duplicate_timestamp_total",
    "prometheus_target_scrapes_sample_out_of_bounds_total",
    "prometheus_target_scrapes_sample_out_of_order_total",
    "prometheus_target_scrapes_exceeded_sample_limit_total",
    "prometheus_target_scrapes_exceeded_body_size_limit_total",
    "prometheus_target_scrape_pool_exceeded_label_limits_total",
)


def prometheus_binary() -> str:
    found = shutil.which("prometheus", path=f"{os.environ.get('PATH', '')}:/usr/bin")
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail("prometheus is missing (Debian package 'prometheus'); CI must have it")
        pytest.skip("prometheus is not installed (Debian package 'prometheus')")
    return found


class Prometheus:
    """One Prometheus server scraping one target every SCRAPE_INTERVAL, in `root`."""

    def __init__(self, binary: str, root: Path, target: str) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        (root / "prometheus.yml").write_text(
            json.dumps(  # (JSON is YAML)
                {
                    "global": {"scrape_interval": SCRAPE_INTERVAL, "scrape_timeout": "1s"},
                    "scrape_configs": [
                        {"job_name": "hostd", "static_configs": [{"targets": [target]}]}
                    ],
                }
            )
        )
        self.address = f"127.0.0.1:{free_ports(1)[0]}"
        self.log_path = root / "prometheus.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [
                    binary,
                    f"--config.file={root / 'prometheus.yml'}",
                    f"--storage.tsdb.path={root / 'tsdb'}",
                    f"--web.listen-address={self.address}",
                    "--log.level=debug",  # failed scrapes are logged at debug
                    "--log.format=logfmt",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    def __enter__(self) -> Prometheus:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def get(self, path: str, **params: str) -> Any:
        if self.proc.poll() is not None:
            raise AssertionError(f"prometheus exited with {self.proc.returncode}:\n{self.log()}")
        url = f"http://{self.address}{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        with urllib.request.urlopen(url, timeout=5) as r:
            body = r.read().decode()
        if path.startswith("/api/"):
            out = json.loads(body)
            assert out["status"] == "success", out
            assert not out.get("warnings"), out
            return out["data"]
        return body

    def target(self) -> dict[str, Any] | None:
        """hostd's target, once Prometheus's API answers."""
        try:
            active = self.get("/api/v1/targets", state="active")["activeTargets"]
        except OSError:
            return None  # not listening yet
        return next((t for t in active if t["labels"]["job"] == "hostd"), None)

    def query(self, promql: str) -> dict[frozenset[tuple[str, str]], float]:
        """An instant query's samples, by their labels (less __name__, job and instance)."""
        data = self.get("/api/v1/query", query=promql)
        assert data["resultType"] == "vector", data
        drop = {"__name__", "job", "instance"}
        return {
            frozenset((k, v) for k, v in s["metric"].items() if k not in drop): float(s["value"][1])
            for s in data["result"]
        }

    def value(self, promql: str) -> float:
        got = self.query(promql)
        assert len(got) == 1, (promql, got)
        return next(iter(got.values()))

    def own_metrics(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        text = self.get("/metrics")
        return {
            (s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text)
            for s in fam.samples
        }


def status_json(d: Hostd) -> dict[str, Any]:
    """`hostd status --json`, as an operator runs it."""
    p = subprocess.run(
        [sys.executable, "-m", "hostd", "status", "--json", "--socket", str(d.socket)],
        capture_output=True,
        text=True,
        timeout=30,
        env=d.env,
        cwd=ROOT,
        check=True,
    )
    out: dict[str, Any] = json.loads(p.stdout)
    return out


def scraped_since(prom: Prometheus, t: float) -> dict[str, Any] | None:
    """hostd's target once a scrape that started after `t` (Unix time) came back clean."""
    target = prom.target()
    if target is None or target["health"] != "up" or target["lastError"]:
        return None
    last = target["lastScrape"]  # RFC 3339 in UTC, to the nanosecond: "...T07:49:56.1234Z"
    whole, _, fraction = last.rstrip("Z").partition(".")
    started = calendar.timegm(time.strptime(whole, "%Y-%m-%dT%H:%M:%S")) + float(f"0.{fraction}")
    return target if started > t else None


def test_a_prometheus_server_scrapes_hostd(work: Path) -> None:
    binary = prometheus_binary()
    src = make_tree(work / "src")
    (port,) = free_ports(1)
    target_address = f"127.0.0.1:{port}"
    # Prometheus first: it takes its first scrape some seconds after it starts (its target
    # discovery hands targets on every 5 s), time the daemon's start and work overlap.
    with (
        Prometheus(binary, work / "prom", target_address) as prom,
        Hostd(work / "d", metrics_address=target_address) as d,
    ):
        assert d.api("GET", "/v1/status")[1]["metrics_address"] == target_address
        d.publish(src, "prom/m")
        assert d.restore("prom/m", work / "out1")["event"] == "result"
        assert d.restore("prom/m", work / "out2")["event"] == "result"
        done = time.time()
        status = status_json(d)
        target = wait_for(lambda: scraped_since(prom, done), "a clean scrape of hostd", timeout=30)
        assert target["scrapeUrl"] == f"http://{target_address}/metrics"
        assert prom.value('up{job="hostd"}') == 1

        # what an operator graphs: operations by outcome, and the tiers
        assert prom.value('hostd_operations_total{operation="restore",result="ok"}') == 2
        assert prom.value('hostd_operations_total{operation="publish",result="ok"}') == 1
        for t in status["tiers"]:
            tier = f'{{tier="{t["name"]}"}}'
            assert prom.value(f"hostd_tier_used_bytes{tier}") == t["used"], t
            assert prom.value(f"hostd_tier_budget_bytes{tier}") == t["budget"], t
            assert prom.value(f"hostd_tier_blobs{tier}") == t["blobs"], t
            # (room is measured now and then, and other writers share the filesystem)
            assert 0 <= prom.value(f"hostd_tier_room_bytes{tier}") <= t["budget"], t
        assert sum(t["used"] for t in status["tiers"]) > 0
        assert prom.value('hostd_restore_bytes_total{source="mem"}') > 0

        # histograms: cumulative buckets ending in +Inf == _count, and quantiles answer
        restore_total = '{operation="restore",phase="total"}'
        buckets = prom.query(f"hostd_phase_duration_seconds_bucket{restore_total}")
        by_le = sorted((float(dict(k)["le"]), v) for k, v in buckets.items())
        assert by_le[-1][0] == float("inf")
        assert [v for _, v in by_le] == sorted(v for _, v in by_le), by_le
        assert by_le[-1][1] == prom.value(f"hostd_phase_duration_seconds_count{restore_total}")
        assert by_le[-1][1] == 2
        p50 = prom.value(
            "histogram_quantile(0.5, sum by (le) "
            f"(hostd_phase_duration_seconds_bucket{restore_total}))"
        )
        assert 0 < p50 <= by_le[-2][0], by_le  # (not NaN: within the finite buckets)

        # hostd answers Prometheus's Accept header (OpenMetrics first) with a format it parses
        req = urllib.request.Request(target["scrapeUrl"], headers={"Accept": PROMETHEUS_ACCEPT})
        with urllib.request.urlopen(req, timeout=10) as r:
            content_type = r.headers["Content-Type"]
            text = r.read().decode()
        media = content_type.split(";")[0].strip()
        if media == "application/openmetrics-text":
            parse = openmetrics_parser.text_string_to_metric_families  # (untyped)
            families = list(parse(text))  # type: ignore[no-untyped-call]
        else:
            assert media == "text/plain", content_type
            families = list(text_string_to_metric_families(text))

        # the types Prometheus recorded are those hostd declares, for every family
        meta = prom.get("/api/v1/targets/metadata", match_target='{job="hostd"}')
        recorded = {m["metric"]: m["type"] for m in meta}
        for f in families:
            exposed = f"{f.name}_total" if f.type == "counter" else f.name
            assert recorded.get(exposed, recorded.get(f.name)) == f.type, (f.name, recorded)
        names = prom.get("/api/v1/label/__name__/values", match='{job="hostd"}')
        assert all(n.startswith(("hostd_", "process_", "up", "scrape_")) for n in names), names

        # an alert on the first failure fires: its series was there, at 0, before it
        assert d.restore("prom/none", work / "out3")["error"] == "not_found"
        failed = time.time()
        wait_for(lambda: scraped_since(prom, failed), "a scrape after the failed restore")
        not_found = 'hostd_operations_total{operation="restore",result="not_found"}'
        assert prom.value(not_found) == 1
        assert prom.value(f"increase({not_found}[1m])") > 0

        # nothing the scrapes brought was refused, and Prometheus logged no complaint (but
        # that the daemon was not listening yet, were it slow to start)
        own = prom.own_metrics()
        for name in REJECTIONS:
            assert own.get((name, frozenset())) in (0, None), (name, own)
        complaints = [
            line
            for line in prom.log().splitlines()
            if (
                any(w in line.lower() for w in ("scrape failed", "invalid", "sample limit"))
                or "level=warn" in line
                or "level=error" in line
            )
            and "connection refused" not in line
        ]
        assert complaints == [], "\n".join(complaints)

        # a restart starts every counter again from 0, which Prometheus takes as a reset
        d.close()
        d.start()
        restarted = time.time()
        wait_for(lambda: scraped_since(prom, restarted), "a scrape of the restarted hostd")
        counters = prom.query('{__name__=~"hostd_.+_total"}')
        assert counters
        assert {k: v for k, v in counters.items() if v != 0} == {}
        ok = 'hostd_operations_total{operation="restore",result="ok"}'
        assert prom.value(f"resets({ok}[1m])") == 1
