"""docs/METRICS.md names every metric hostd exports, and nothing it does not: operators build
dashboards and alerts from that page."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SUFFIXES = ("_total", "_bucket", "_sum", "_count")


def defined() -> set[str]:
    """Each family hostd/metrics.py defines: the first argument of a metric or family."""
    text = (ROOT / "hostd" / "metrics.py").read_text()
    return set(re.findall(r'(?:Counter|Gauge|Histogram)(?:MetricFamily)?\(\s*"(hostd_\w+)"', text))


def documented() -> set[str]:
    """Each hostd_ name in a table row of docs/METRICS.md, as its family (no sample suffix)."""
    names = set()
    for line in (ROOT / "docs" / "METRICS.md").read_text().splitlines():
        if m := re.match(r"\| `(hostd_\w+)` \|", line):
            name = m[1]
            for suffix in SUFFIXES:
                name = name.removesuffix(suffix)
            names.add(name)
    return names


def test_every_metric_is_documented_and_every_documented_one_exists() -> None:
    code, docs = defined(), documented()
    assert len(code) > 30  # (the pattern still finds them)
    assert code - docs == set(), "exported, not in docs/METRICS.md"
    assert docs - code == set(), "in docs/METRICS.md, not exported"
