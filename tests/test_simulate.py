"""The fleet simulation (bench/simulate.py) as a check of the real scheduling code: in
virtual time, deterministic for a seed, so what it asserts is the protocol's behaviour, not a
timing of this machine. Hosts that scale up together pull each chunk from the origin once;
hosts leaving and joining part way cost a little more, never a loop or a stuck restore."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from simulate import Model, simulate

MiB = 1 << 20


def test_eight_hosts_pull_each_chunk_from_the_origin_once() -> None:
    r = simulate(Model(hosts=8, size=64 * MiB))
    assert r["origin_egress_snapshots"] == 1.0
    assert r["origin_fetches_per_chunk_max"] == 1
    assert r["completion_over_bound"] <= 1.5
    assert r["max_upload_over_fair"] <= 3.0


def test_hosts_leaving_and_joining_part_way_all_finish_with_little_extra_egress() -> None:
    r = simulate(Model(hosts=40, size=64 * MiB, churn=0.1))
    assert r["left"] == 2
    assert r["joined"] == 2
    assert r["origin_egress_snapshots"] <= 1.2
    # every host that stayed or joined finished (a stuck restore would never return)
    assert r["completion_all_s"] < 10 * r["bound_s"]


def test_the_same_seed_gives_the_same_run() -> None:
    m = Model(hosts=12, size=32 * MiB, churn=0.2, seed=5)
    a, b = simulate(m), simulate(m)
    a.pop("cpu_s")
    b.pop("cpu_s")
    assert a == b
