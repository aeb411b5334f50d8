# ruff: noqa: F811  (the `work` fixture, imported)
"""/metrics against the Accept headers scrapers and others send: always a 200 in one of the
two formats hostd means to speak, its Content-Type saying which (a real daemon's TCP port)."""

from __future__ import annotations

import http.client
from pathlib import Path

from harness import Hostd
from prometheus_client.openmetrics import parser as openmetrics_parser
from prometheus_client.parser import text_string_to_metric_families
from test_faults import work  # noqa: F401  (a fixture)

ODD_ACCEPTS = [
    "garbage",
    "*/*",
    ",,,;;;=",
    "application/openmetrics-text; version=garbage",  # was a TypeError in choose_encoder: 500
    "application/openmetrics-text;version=1.x,text/plain;q=0.5",
    "text/plain; version=abc",
    "application/openmetrics-text; version=9.9.9",  # echoed as if that format were sent
    "application/openmetrics-text;version=1.0.0;q=0,text/plain;version=0.0.4",  # q=0: never
    "application/openmetrics-text; version=1.0.0; escaping=dots",  # renames every metric
    "text/plain; version=1.0.0; escaping=values",
    "text/plain;q=0.5, " * 380 + "application/openmetrics-text",  # (aiohttp: 8190 at most)
]


def _get_metrics(address: str, accept: str) -> tuple[int, str, str]:
    host, port = address.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request("GET", "/metrics", headers={"Accept": accept})
        r = conn.getresponse()
        return r.status, r.headers.get("Content-Type", ""), r.read().decode(errors="replace")
    finally:
        conn.close()


def test_metrics_answer_any_accept_with_a_format_they_name(work: Path) -> None:
    """Whatever Accept a scraper sends, /metrics answers 200 with one of the two formats hostd
    means to speak (OpenMetrics 1.0.0, text 0.0.4, names unescaped), its Content-Type saying
    which, never a version it did not write; an OpenMetrics refused with q=0 is not sent."""
    with Hostd(work / "d") as d:
        address = d.api("GET", "/v1/status")[1]["metrics_address"]
        for accept in ODD_ACCEPTS:
            status, ctype, body = _get_metrics(address, accept)
            assert status == 200, (accept[:80], status, body[:200])
            if ctype.startswith("application/openmetrics-text"):
                assert ctype.startswith("application/openmetrics-text; version=1.0.0"), ctype
                assert "escaping=" not in ctype or "escaping=underscores" in ctype, ctype
                assert "q=0," not in accept, (accept, ctype)
                names = {f.name for f in openmetrics_parser.text_string_to_metric_families(body)}  # type: ignore[no-untyped-call]
            else:
                assert ctype == "text/plain; version=0.0.4; charset=utf-8", (accept[:80], ctype)
                names = {f.name for f in text_string_to_metric_families(body)}
            assert any(n.startswith("hostd_operations") for n in names), (accept[:80], names)
            assert not any("__" in n for n in names), (accept[:80], ctype)
