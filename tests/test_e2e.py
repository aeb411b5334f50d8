"""End-to-end checks with real daemon processes, as a user of hostd would make them.

Every test starts real `hostd serve` processes (tests/harness.py) and talks to them over
their real Unix socket, their TCP metrics port, signals and the `hostd` command line. The
origin is a `file://` directory, or, where a fetch must be caught half way, that directory
served over plain HTTP by a server in this process that holds chunk requests until the test
lets them go. Nothing sleeps: every wait polls with a deadline or blocks on an event.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from harness import (
    ROOT,
    HeldOrigin,
    Hostd,
    NotifyListener,
    UnixHTTPConnection,
    make_tree,
    outcome,
    rmtree,
    short_tmp,
    stream,
    tree_digest,
)
from prometheus_client.openmetrics import parser as openmetrics_parser
from prometheus_client.parser import text_string_to_metric_families

import hostd

KiB = 1024
MiB = 1024 * 1024
SMALL_CHUNK = 64 * KiB  # the smallest chunk size a snapshot may use: many chunks, few bytes


# -- helpers ------------------------------------------------------------------------------


@pytest.fixture
def work() -> Iterator[Path]:
    """A short scratch directory under /tmp (socket paths must stay short), removed after."""
    root = short_tmp("e2")
    try:
        yield root
    finally:
        rmtree(root)


def wait_for(check: Callable[[], Any], what: str, timeout: float = 20.0) -> Any:
    """Poll `check` until it returns something truthy; fail naming `what` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


def tree_with_outside_link(work: Path, name: str = "src", seed: int = 1) -> tuple[Path, Any]:
    """make_tree plus a symlink that leaves the tree; returns (tree, what a restore gives)."""
    src = make_tree(work / name, seed=seed)
    outside = work / f"{name}-outside.bin"
    outside.write_bytes(random.Random(seed + 100).randbytes(70_000))
    outside.chmod(0o755)
    os.symlink(outside, src / "sub" / "outside-link")
    expected = tree_digest(src)
    expected["sub/outside-link"] = ("file", outside.read_bytes(), True, outside.stat().st_mtime_ns)
    return src, expected


def files_tree(root: Path, sizes: Mapping[str, int], seed: int) -> Path:
    """A directory of random (so never deduplicated) files of the given sizes."""
    rng = random.Random(seed)
    root.mkdir(parents=True)
    for name, size in sizes.items():
        (root / name).write_bytes(rng.randbytes(size))
    return root


def hidden_leftovers(parent: Path) -> list[str]:
    """Build or old-tree directories a restore left beside its target."""
    return sorted(
        p.name for p in parent.iterdir() if p.name.startswith(".") and ".hostd-" in p.name
    )


def unique_bytes(tree: Path | Mapping[str, Any]) -> int:
    """Bytes of distinct file contents (what a cold restore must fetch), of a tree or of what
    tree_digest says of one."""
    entries = tree_digest(tree) if isinstance(tree, Path) else tree
    return sum(len(data) for data in {e[1] for e in entries.values() if e[0] == "file"})


def blob_files(tier: Path) -> list[Path]:
    """Complete blobs in a tier directory: `<tier>/blobs/xx/<digest>`."""
    return sorted(p for p in (tier / "blobs").glob("*/*") if len(p.name) == 64)


def partial_files(tier: Path) -> list[Path]:
    return sorted(p for p in (tier / "partial").glob("*") if len(p.name) == 64)


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a Prometheus text exposition, by (name, labels)."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def sample(text: str, name: str, **labels: str) -> float:
    got = samples(text).get((name, frozenset(labels.items())))
    assert got is not None, f"no sample {name}{labels} in:\n{text}"
    return got


def raw_request(
    sock: Path, method: str, path: str, body: bytes | None = None
) -> tuple[int, str, Any]:
    """One request with a body sent as is; returns (status, content type, decoded JSON)."""
    conn = UnixHTTPConnection(str(sock), 30)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, resp.getheader("Content-Type", ""), json.loads(resp.read())
    finally:
        conn.close()


def assert_error_body(body: Any, code: str) -> None:
    assert isinstance(body, dict), body
    # (and `stopping`, where a stopping daemon refuses: unavailable, but no cap)
    assert set(body) - {"stopping"} == {"error", "message"}, body
    assert body["error"] == code, body
    assert isinstance(body["message"], str), body
    assert body["message"], body


def cli(*args: str, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`python -m hostd ARGS` as a user runs it (stdout and stderr captured, not a tty)."""
    base = {k: v for k, v in os.environ.items() if k != "HOSTD_SOCKET"}
    return subprocess.run(
        [sys.executable, "-m", "hostd", *args],
        env={**base, "PYTHONPATH": str(ROOT), **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def cli_json(*args: str) -> dict[str, Any]:
    """A client command with --json that must succeed: exactly one JSON object on stdout."""
    p = cli(*args, "--json")
    assert p.returncode == 0, (args, p.returncode, p.stderr)
    lines = p.stdout.splitlines()
    assert len(lines) == 1, p.stdout
    out = json.loads(lines[0])
    assert isinstance(out, dict)
    return out


def cli_fails(*args: str, code: int) -> str:
    """A command that must fail with exit `code` and one line on stderr; returns the line."""
    p = cli(*args)
    assert p.returncode == code, (args, p.returncode, p.stdout, p.stderr)
    lines = p.stderr.splitlines()
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("hostd: "), p.stderr
    return lines[0]


# -- publish and restore ------------------------------------------------------------------


def test_publish_restore_modes_replace_and_cold_daemon(work: Path) -> None:
    src, expected = tree_with_outside_link(work)
    origin = f"file://{work}/origin"
    want = unique_bytes(expected)
    # root clients trusted with links (test_trust.py has the default: root gets copies)
    with Hostd(work / "a", origin=origin, access={"link_to_writers": True}) as a:
        pub = a.publish(src, "e2e/tree")
        assert pub["files"] == 6, pub
        assert pub["symlinks"] == 2, pub
        assert pub["bytes"] == sum(len(v[1]) for v in expected.values() if v[0] == "file")

        results: dict[str, dict[str, Any]] = {}
        for mode in ("link", "copy", "auto"):
            out = a.restore("e2e/tree", work / f"out-{mode}", mode=mode)
            assert out["event"] == "result", out
            assert tree_digest(work / f"out-{mode}") == expected, mode
            results[mode] = out
        assert results["link"]["linked"] > 0
        assert results["auto"]["linked"] > 0  # the target shares the tier's filesystem
        assert results["copy"]["linked"] == 0
        shm = Path("/dev/shm")
        if shm.is_dir() and shm.stat().st_dev != (work / "a" / "mem").stat().st_dev:
            elsewhere = Path(tempfile.mkdtemp(prefix="hostd-e2e-", dir=shm))
            try:  # auto on another filesystem copies
                out = a.restore("e2e/tree", elsewhere / "out", mode="auto")
                assert out["linked"] == 0, out
                assert out["copied"] > 0, out
                assert tree_digest(elsewhere / "out") == expected
            finally:
                rmtree(elsewhere)

        # The result a script reads.
        out = results["copy"]
        assert out["snapshot"] == pub["snapshot"]
        assert (out["files"], out["bytes"]) == (pub["files"], pub["bytes"])
        timings = out["timings"]
        assert set(timings) >= {"resolve", "fetch", "materialize", "total"}
        assert all(isinstance(v, float) and v >= 0 for v in timings.values())
        phases = timings["resolve"] + timings["fetch"] + timings["materialize"]
        assert timings["total"] == pytest.approx(phases, abs=1e-3)
        # publish left the blobs in the first tier: a restore on this host is a cache hit
        assert out["bytes_by_source"]["mem"] == want
        assert out["bytes_by_source"]["origin"] == 0

        # An existing non-empty target: refused and untouched without replace ...
        target = work / "existing"
        (target / "keep").mkdir(parents=True)
        (target / "keep" / "old.txt").write_text("old")
        before = tree_digest(target)
        refused = a.restore("e2e/tree", target)
        assert refused["event"] == "error", refused
        assert refused["error"] == "target_exists", refused
        assert str(target) in refused["message"]
        assert tree_digest(target) == before
        a_file = work / "a-file"
        a_file.write_text("x")
        refused = a.restore("e2e/tree", a_file)
        assert refused["error"] == "target_exists"
        assert a_file.read_text() == "x"
        # ... replaced with replace: the old content is gone, the new one complete.
        out = a.restore("e2e/tree", target, replace=True, mode="link")
        assert out["event"] == "result", out
        assert tree_digest(target) == expected
        # An empty directory is a fine target.
        (work / "empty").mkdir()
        assert a.restore("e2e/tree", work / "empty")["event"] == "result"
        assert tree_digest(work / "empty") == expected
        assert hidden_leftovers(work) == []

    # A second host (empty tiers, the same origin) restores cold, then warm from its tier.
    with Hostd(work / "b", origin=origin, access={"link_to_writers": True}) as b:
        cold = b.restore("e2e/tree", work / "cold")
        assert cold["event"] == "result", cold
        assert tree_digest(work / "cold") == expected
        assert cold["bytes_by_source"]["origin"] == want
        assert cold["bytes_by_source"]["mem"] == cold["bytes_by_source"]["disk"] == 0
        warm = b.restore("e2e/tree", work / "warm", mode="link")
        assert warm["bytes_by_source"]["origin"] == 0
        assert warm["bytes_by_source"]["mem"] == want
        assert tree_digest(work / "warm") == expected


def test_concurrent_cold_restores_fetch_each_chunk_from_origin_once(work: Path) -> None:
    src = files_tree(work / "src", {f"w{i}.bin": 300 * KiB + i for i in range(6)}, seed=7)
    make_tree(src / "extra", seed=8, big=700 * KiB)
    expected = tree_digest(src)
    origin = f"file://{work}/origin"
    with Hostd(work / "p", origin=origin) as p:
        pub = p.publish(src, "e2e/many", chunk_size=SMALL_CHUNK)
    chunks = pub["new_chunks"]  # distinct chunks, all new to this fresh origin
    assert chunks > 30, pub

    with Hostd(work / "c", origin=origin) as c:
        targets = [work / f"out{i}" for i in range(8)]
        with concurrent.futures.ThreadPoolExecutor(len(targets)) as pool:
            outs = list(pool.map(lambda t: c.restore("e2e/many", t, mode="copy"), targets))
        for t, out in zip(targets, outs, strict=True):
            assert out["event"] == "result", out
            assert tree_digest(t) == expected
        text = c.metrics()
        assert sample(text, "hostd_chunks_fetched_total", source="origin") == chunks
        assert sample(text, "hostd_chunk_errors_total", source="origin", kind="corrupt") == 0
        assert sample(text, "hostd_operations_total", operation="restore", result="ok") == 8
        # each restore accounts for every byte it needed, wherever it came from
        for out in outs:
            assert sum(out["bytes_by_source"].values()) == unique_bytes(src), out
        assert any(out["bytes_by_source"]["origin"] for out in outs)


# -- prefetch, pin, ls, status --------------------------------------------------------------


def test_prefetch_pin_ls_and_status(work: Path) -> None:
    src = make_tree(work / "src")
    origin = f"file://{work}/origin"
    with Hostd(work / "p", origin=origin) as p:
        sid = p.publish(src, "e2e/pf")["snapshot"]
    with Hostd(work / "d", origin=origin) as d:
        status, st = d.api("GET", "/v1/status")
        assert status == 200
        assert st["socket"] == str(d.socket)
        assert st["version"] == hostd.__version__
        host, _, port = st["metrics_address"].rpartition(":")
        assert host == "127.0.0.1", st
        assert int(port) > 0, st
        with urllib.request.urlopen(f"http://{st['metrics_address']}/metrics", timeout=10) as r:
            assert r.status == 200
            assert b"hostd_tier_budget_bytes" in r.read()
        assert [(t["name"], t["budget"], t["used"]) for t in st["tiers"]] == [
            ("mem", 2 * 1024 * MiB, 0),
            ("disk", 4 * 1024 * MiB, 0),
        ]
        assert d.api("GET", "/v1/snapshots") == (200, {"snapshots": []})

        pf = d.stream("/v1/prefetch", {"ref": "e2e/pf", "tier": "disk"})
        assert pf["event"] == "result", pf
        assert pf["snapshot"] == sid, pf
        assert pf["bytes_by_source"]["origin"] == unique_bytes(src)
        assert pf["tiers"] == {"mem": 0, "disk": unique_bytes(src)}, pf
        (snap,) = d.api("GET", "/v1/snapshots")[1]["snapshots"]
        assert snap["id"] == sid
        assert "e2e/pf" in snap["refs"]
        assert snap["complete"]
        assert snap["tiers"] == {"mem": 0, "disk": unique_bytes(src)}
        assert snap["pinned"] is False
        tiers = {t["name"]: t for t in d.api("GET", "/v1/status")[1]["tiers"]}
        assert tiers["disk"]["used"] == unique_bytes(src)
        assert tiers["mem"]["used"] == 0
        assert len(blob_files(work / "d" / "disk")) == tiers["disk"]["blobs"] > 0

        # a restore after a prefetch is served by the tier that was filled
        out = d.restore("e2e/pf", work / "out")
        assert out["bytes_by_source"]["disk"] == unique_bytes(src)
        assert out["bytes_by_source"]["origin"] == 0

        assert d.api("POST", "/v1/pin", {"ref": "e2e/pf"}) == (
            200,
            {"snapshot": sid, "pinned": True},
        )
        assert d.api("GET", "/v1/snapshots")[1]["snapshots"][0]["pinned"] is True
        assert d.api("POST", "/v1/unpin", {"snapshot": sid}) == (
            200,
            {"snapshot": sid, "pinned": False},
        )
        assert d.api("GET", "/v1/snapshots")[1]["snapshots"][0]["pinned"] is False
        status, body = d.api("POST", "/v1/pin", {"ref": "e2e/no-such"})
        assert status == 404
        assert_error_body(body, "not_found")
        status, body = d.api("POST", "/v1/pin", {"snapshot": "ab" * 32})
        assert status == 404
        assert_error_body(body, "not_found")
        # naming a tier this host lacks is the caller's mistake
        for path, body in [
            ("/v1/prefetch", {"ref": "e2e/pf", "tier": "nvme"}),
            ("/v1/restore", {"ref": "e2e/pf", "target": str(work / "out-nvme"), "tier": "nvme"}),
        ]:
            status, answer = d.api("POST", path, body)
            assert status == 400, answer
            assert_error_body(answer, "bad_request")
            assert "nvme" in answer["message"], answer


# -- gc and verify ------------------------------------------------------------------------------


def test_gc_and_verify(work: Path) -> None:
    src = files_tree(work / "src", {"a.bin": 500 * KiB, "b.bin": 300 * KiB + 5}, seed=3)
    broken = files_tree(work / "broken", {"c.bin": 4 * SMALL_CHUNK}, seed=4)
    origin_dir = work / "origin"
    # pack_size 0: each chunk an object of its own, so the origin can lose one of them
    with Hostd(work / "p", origin=f"file://{origin_dir}", pack_size=0) as p:
        p.publish(src, "e2e/ok")
        before = set(origin_dir.glob("chunks/*/*"))
        p.publish(broken, "e2e/broken", chunk_size=SMALL_CHUNK)
        broken_chunks = sorted(set(origin_dir.glob("chunks/*/*")) - before)
    assert len(broken_chunks) == 4
    broken_chunks[2].unlink()  # the origin lost a chunk of e2e/broken

    root = work / "d"
    mem = root / "mem"
    with Hostd(root, origin=f"file://{origin_dir}") as d:
        assert d.restore("e2e/ok", work / "out")["event"] == "result"
        clean = d.stream("/v1/verify", {})
        assert clean["event"] == "result", clean
        assert clean["bad"] == [], clean
        assert clean["checked_blobs"] == 2, clean
        assert clean["checked_bytes"] == unique_bytes(src)

        # A fill that cannot finish leaves a partial blob to resume; gc removes it.
        failed = d.restore("e2e/broken", work / "out-broken")
        assert failed["event"] == "error", failed
        assert broken_chunks[2].name in failed["message"]
        assert not (work / "out-broken").exists()
        assert len(partial_files(mem)) == 1
        assert d.api("POST", "/v1/gc", {}) == (
            200,
            {
                "forgot_snapshots": 0,
                "removed_blobs": 0,
                "removed_partials": 1,
                "freed_bytes": 4 * SMALL_CHUNK,
            },
        )
        assert partial_files(mem) == []
        assert len(blob_files(mem)) == 2  # what a known snapshot needs stays

        # A blob corrupted on disk (root writes through the read-only bit) ...
        victim = max(blob_files(mem), key=lambda b: b.stat().st_size)
        size = victim.stat().st_size
        os.chmod(victim, 0o644)
        with open(victim, "r+b") as f:
            f.seek(1000)
            f.write(b"\xff" * 64)
        bad = d.stream("/v1/verify", {})
        assert bad["event"] == "result", bad
        assert bad["bad"] == [
            {"blob": victim.name, "tier": "mem", "reason": bad["bad"][0]["reason"]}
        ]
        assert not victim.exists()  # ... is reported and dropped ...
        again = d.restore("e2e/ok", work / "out2", mode="copy")  # ... and fetched again
        assert again["event"] == "result", again
        assert again["bytes_by_source"]["origin"] == size
        assert tree_digest(work / "out2") == tree_digest(src)
        assert d.stream("/v1/verify", {})["bad"] == []

    # A blob no snapshot names (left by something else): gc removes it.
    stray = root / "disk" / "blobs" / "ab" / ("ab" * 32)
    stray.parent.mkdir(parents=True, exist_ok=True)
    stray.write_bytes(b"nobody wants this")
    with Hostd(root, origin=f"file://{origin_dir}") as d:
        status, out = d.api("POST", "/v1/gc", {})
        assert status == 200, out
        assert out["removed_blobs"] == 1, out
        assert not stray.exists()
        assert len(blob_files(mem)) == 2
        assert d.restore("e2e/ok", work / "out3")["bytes_by_source"]["origin"] == 0


# -- eviction -----------------------------------------------------------------------------------


def test_eviction_demotes_lru_blobs_and_keeps_pinned_ones(work: Path) -> None:
    big = files_tree(work / "big", {f"f{i}.bin": MiB for i in range(4)}, seed=11)
    small = files_tree(work / "small", {f"g{i}.bin": MiB for i in range(2)}, seed=12)
    origin = f"file://{work}/origin"
    with Hostd(work / "p", origin=origin) as p:
        p.publish(big, "e2e/big")
        p.publish(small, "e2e/small")
    budget = 2 * MiB + 512 * KiB
    tiers = [
        {"name": "mem", "path": str(work / "e" / "mem"), "budget": f"{budget}"},
        {"name": "disk", "path": str(work / "e" / "disk"), "budget": "64MiB"},
    ]
    # root clients trusted with links: the last restore links from disk (test_trust.py has the
    # default, where root gets copies)
    access = {"link_to_writers": True}
    with Hostd(work / "e", origin=origin, tiers=tiers, access=access) as e:

        def where(ref: str) -> dict[str, int]:
            for s in e.api("GET", "/v1/snapshots")[1]["snapshots"]:
                if ref in s["refs"]:
                    return dict(s["tiers"])
            raise AssertionError(f"{ref} is not listed")

        def mem_used() -> int:
            st = e.api("GET", "/v1/status")[1]
            (mem,) = [t for t in st["tiers"] if t["name"] == "mem"]
            assert mem["budget"] == budget
            return int(mem["used"])

        assert e.api("POST", "/v1/pin", {"ref": "e2e/big"})[0] == 200
        # The snapshot is bigger than the mem tier: what does not fit goes to disk.
        out = e.restore("e2e/big", work / "out-big")
        assert out["event"] == "result", out
        assert tree_digest(work / "out-big") == tree_digest(big)
        assert where("e2e/big") == {"mem": 2 * MiB, "disk": 2 * MiB}
        assert mem_used() <= budget
        # Pinned blobs stay: the next snapshot goes to disk instead.
        out = e.restore("e2e/small", work / "out-small")
        assert out["event"] == "result", out
        assert where("e2e/big") == {"mem": 2 * MiB, "disk": 2 * MiB}
        assert where("e2e/small") == {"mem": 0, "disk": 2 * MiB}
        text = e.metrics()
        assert sample(text, "hostd_evictions_total", tier="mem", action="demote") == 0
        refused = e.stream("/v1/prefetch", {"ref": "e2e/small", "tier": "mem"})
        assert refused["event"] == "error", refused
        assert refused["error"] == "tier_error", refused

        # Unpinned, they are the least recently used, but the restored tree links their
        # inodes: moving them would free nothing of the tier's filesystem.
        assert e.api("POST", "/v1/unpin", {"ref": "e2e/big"})[0] == 200
        refused = e.stream("/v1/prefetch", {"ref": "e2e/small", "tier": "mem"})
        assert refused["event"] == "error", refused
        assert "nothing evictable" in refused["message"], refused
        # With the tree gone, they move down to disk.
        rmtree(work / "out-big")
        out = e.stream("/v1/prefetch", {"ref": "e2e/small", "tier": "mem"})
        assert out["event"] == "result", out
        assert where("e2e/small")["mem"] == 2 * MiB
        assert where("e2e/big") == {"mem": 0, "disk": 4 * MiB}
        assert mem_used() == 2 * MiB
        text = e.metrics()
        assert sample(text, "hostd_evictions_total", tier="mem", action="demote") == 2
        assert sample(text, "hostd_tier_used_bytes", tier="mem") == 2 * MiB
        assert sample(text, "hostd_tier_budget_bytes", tier="mem") == budget
        # the demoted blobs still restore, from disk
        out = e.restore("e2e/big", work / "out-big2", mode="link")
        assert out["bytes_by_source"] == {"mem": 0, "disk": 4 * MiB, "origin": 0}
        assert tree_digest(work / "out-big2") == tree_digest(big)


# -- metrics ------------------------------------------------------------------------------------

ISSUE_METRICS = {
    # restores and publishes by outcome
    "hostd_operations_total": {"operation", "result"},
    # phase-duration histograms
    "hostd_phase_duration_seconds_bucket": {"operation", "phase", "le"},
    "hostd_phase_duration_seconds_sum": {"operation", "phase"},
    "hostd_phase_duration_seconds_count": {"operation", "phase"},
    # bytes by source and by tier
    "hostd_restore_bytes_total": {"source"},
    "hostd_chunks_fetched_total": {"source"},
    # origin requests by result
    "hostd_origin_requests_total": {"result"},
    # tier used and budget bytes
    "hostd_tier_used_bytes": {"tier"},
    "hostd_tier_budget_bytes": {"tier"},
    "hostd_evictions_total": {"tier", "action"},
    "hostd_chunks_in_flight": set(),
    "hostd_singleflight_joins_total": set(),
}


def promtool_check(text: str) -> None:
    promtool = shutil.which("promtool", path=f"{os.environ.get('PATH', '')}:/usr/bin")
    if promtool is None:
        if os.environ.get("CI") == "true":
            pytest.fail("promtool is missing (Debian package 'prometheus'); CI must have it")
        pytest.skip("promtool is not installed (Debian package 'prometheus')")
    p = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
    )
    assert p.returncode == 0, p.stdout + p.stderr


def test_metrics_on_socket_and_tcp(work: Path) -> None:
    src = make_tree(work / "src")
    with Hostd(work / "d") as d:
        published = d.publish(src, "e2e/m")
        assert d.restore("e2e/m", work / "out")["event"] == "result"
        assert d.restore("e2e/no-such", work / "out2")["error"] == "not_found"
        assert d.restore("e2e/m", work / "out")["error"] == "target_exists"

        on_socket = d.metrics()
        address = d.api("GET", "/v1/status")[1]["metrics_address"]
        with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as r:
            assert r.status == 200
            assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            on_tcp = r.read().decode()
        # A Prometheus server asks for OpenMetrics first, and gets it.
        asked = urllib.request.Request(
            f"http://{address}/metrics",
            headers={"Accept": "application/openmetrics-text;version=1.0.0,text/plain;q=0.5"},
        )
        with urllib.request.urlopen(asked, timeout=10) as r:
            assert r.headers["Content-Type"].startswith("application/openmetrics-text")
            parse = openmetrics_parser.text_string_to_metric_families  # (untyped)
            families = {f.name: f for f in parse(r.read().decode())}  # type: ignore[no-untyped-call]
        assert families["hostd_operations"].type == "counter"
        assert any(
            s.labels == {"operation": "publish", "result": "ok"} and s.value == 1
            for s in families["hostd_operations"].samples
        )
        for text in (on_socket, on_tcp):
            found = samples(text)
            for name, labels in ISSUE_METRICS.items():
                assert any(n == name and {k for k, _ in ls} == labels for n, ls in found), name
            assert sample(text, "hostd_operations_total", operation="publish", result="ok") == 1
            assert sample(text, "hostd_operations_total", operation="restore", result="ok") == 1
            assert (
                sample(text, "hostd_operations_total", operation="restore", result="not_found") == 1
            )
            assert sample(text, "hostd_operations_total", operation="restore", result="error") == 1
            assert sample(text, "hostd_restore_bytes_total", source="mem") == unique_bytes(src)
            assert sample(text, "hostd_restore_bytes_total", source="origin") == 0  # none yet
            assert sample(text, "hostd_publish_bytes_total", kind="read") == published["bytes"]
            stored = sample(text, "hostd_publish_bytes_total", kind="stored")
            assert stored == published["stored_bytes"] > 0
            assert (
                sample(
                    text, "hostd_phase_duration_seconds_count", operation="restore", phase="fetch"
                )
                == 1
            )
            assert sample(text, "hostd_tier_budget_bytes", tier="disk") == 4 * 1024 * MiB
            assert sample(text, "hostd_origin_requests_total", result="ok") > 0
            assert sample(text, "hostd_chunks_in_flight") == 0
        promtool_check(on_socket)
        promtool_check(on_tcp)
        status, body = raw_request(d.socket, "POST", "/metrics", b"")[0::2]
        assert status == 405
        assert_error_body(body, "method_not_allowed")


# -- errors ------------------------------------------------------------------------------------


def test_a_target_named_up_to_the_limit_is_restored(work: Path) -> None:
    """A name of 255 bytes is a name the API takes; its hidden build's name, made from it,
    is cut to fit (it failed as "File name too long", naming the build)."""
    src = make_tree(work / "src")
    with Hostd(work / "d", origin=f"file://{work}/origin") as d:
        d.publish(src, "demo/long")
        for name in ("n" * 255, "é" * 127 + "x"):  # (254 bytes of two-byte characters, and one)
            out = d.restore("demo/long", work / name, mode="copy")
            assert out["event"] == "result", out
            assert tree_digest(work / name) == tree_digest(src)
        assert hidden_leftovers(work) == []


def test_api_errors_are_json(work: Path) -> None:
    with Hostd(work / "d", max_request_body="1KiB") as d:
        target = str(work / "out")
        cases: list[tuple[str, str, bytes | None, int, str, str]] = [
            ("GET", "/v1/nope", None, 404, "not_found", "/v1/nope"),
            ("GET", "/nope", None, 404, "not_found", "/nope"),
            ("GET", "/v1/restore", None, 405, "method_not_allowed", "GET"),
            ("DELETE", "/v1/status", None, 405, "method_not_allowed", "DELETE"),
            ("POST", "/v1/restore", b"{not json", 400, "bad_request", "JSON"),
            ("POST", "/v1/restore", b"[1, 2]", 400, "bad_request", "object"),
            (
                "POST",
                "/v1/restore",
                json.dumps({"ref": "a/b", "target": target, "colour": "red"}).encode(),
                400,
                "bad_request",
                "colour",
            ),
            (
                "POST",
                "/v1/restore",
                json.dumps({"ref": "a/b", "target": target, "pad": "x" * 4096}).encode(),
                413,
                "too_large",
                "",
            ),
            (
                "POST",
                "/v1/restore",
                json.dumps({"ref": "a/b", "target": target, "mode": "fast"}).encode(),
                400,
                "bad_request",
                "mode",
            ),
            (
                "POST",
                "/v1/restore",
                json.dumps({"ref": "a/b", "target": "relative/out"}).encode(),
                400,
                "bad_request",
                "target",
            ),
            (
                "POST",
                "/v1/restore",
                json.dumps({"target": target}).encode(),
                400,
                "bad_request",
                "ref",
            ),
            (
                "POST",
                "/v1/restore",
                json.dumps({"ref": "a/b", "target": target, "replace": "yes"}).encode(),
                400,
                "bad_request",
                "replace",
            ),
            ("POST", "/v1/gc", b'{"force": true}', 400, "bad_request", "force"),
            (
                "POST",
                "/v1/publish",
                json.dumps({"path": str(work), "ref": "a/b", "chunk_size": 1000}).encode(),
                400,
                "bad_request",
                "chunk_size",
            ),
        ]
        for method, path, body, status, code, mentions in cases:
            got, ctype, answer = raw_request(d.socket, method, path, body)
            assert got == status, (path, got, answer)
            assert ctype.startswith("application/json"), (path, got, answer)
            assert_error_body(answer, code)
            assert mentions in answer["message"], (method, path, answer)
        assert not (work / "out").exists()

        # An error found once the stream has started is the stream's last event.
        events = stream(d.socket, "/v1/publish", {"path": str(work / "missing"), "ref": "a/b"})
        last = outcome(events)
        assert last["event"] == "error", last
        assert last["error"] == "bad_request", last
        assert set(last) == {"event", "error", "message"}
        # ... and the daemon keeps serving.
        assert d.api("GET", "/v1/status")[0] == 200


# -- daemon lifecycle ---------------------------------------------------------------------------


def test_sd_notify_reload_and_sigterm(work: Path) -> None:
    listener = NotifyListener(work / "notify")
    try:
        d = Hostd(work / "d", env={"NOTIFY_SOCKET": str(listener.path)})
        with d:
            listener.expect("READY=1")

            # SIGHUP applies a new tier budget ...
            text = d.config_path.read_text()
            assert text.count('budget = "2GiB"') == 1
            d.config_path.write_text(text.replace('budget = "2GiB"', 'budget = "512MiB"'))
            d.signal(signal.SIGHUP)
            got = listener.expect("READY=1")
            assert any("RELOADING=1" in m.splitlines() for m in got), got

            def mem_budget() -> int:
                st = d.api("GET", "/v1/status")[1]
                return int(next(t["budget"] for t in st["tiers"] if t["name"] == "mem"))

            assert mem_budget() == 512 * MiB
            # ... and a broken config is refused, the running one kept.
            d.config_path.write_text(text.replace('budget = "2GiB"', 'budget = "plenty"'))
            d.signal(signal.SIGHUP)
            listener.expect("READY=1")
            line = wait_for(
                lambda: next((x for x in d.log().splitlines() if "reload refused" in x), None),
                "the refused reload in the log",
            )
            assert "budget" in line, line
            assert "plenty" in line, line
            assert mem_budget() == 512 * MiB
            assert d.api("GET", "/v1/status")[0] == 200

            # SIGTERM: STOPPING=1, exit 0, socket gone.
            d.signal(signal.SIGTERM)
            listener.expect("STOPPING=1")
            assert d.wait(30) == 0
            assert not d.socket.exists()
    finally:
        listener.close()


def test_second_daemon_is_refused_and_a_stale_socket_is_cleared(work: Path) -> None:
    with Hostd(work / "one") as one:
        two = Hostd(work / "two", socket=str(one.socket))
        p = subprocess.run(
            [sys.executable, "-m", "hostd", "serve", "--config", str(two.config_path)],
            env=two.env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert p.returncode != 0
        assert f"another hostd is already serving on {one.socket}" in p.stderr, p.stderr
        assert one.api("GET", "/v1/status")[0] == 200  # the first one is unharmed

        one.kill()  # SIGKILL: the socket file stays behind
        assert one.socket.exists()
    with Hostd(work / "one") as again:  # the same config: it clears the stale socket
        assert again.api("GET", "/v1/status")[1]["socket"] == str(again.socket)


def test_restore_in_flight_at_sigterm_finishes(work: Path) -> None:
    src = files_tree(work / "src", {"a.bin": 5 * SMALL_CHUNK, "b.bin": 3 * SMALL_CHUNK}, seed=21)
    origin_dir = work / "origin"
    # pack_size 0: chunks as objects of their own, whose GETs HeldOrigin holds
    with Hostd(work / "p", origin=f"file://{origin_dir}", pack_size=0) as p:
        sid = p.publish(src, "e2e/drain", chunk_size=SMALL_CHUNK)["snapshot"]
    target = work / "out"
    with (
        HeldOrigin(origin_dir, gated=True) as http,
        Hostd(work / "d", origin=http.url) as d,
        concurrent.futures.ThreadPoolExecutor(1) as pool,
    ):
        running = pool.submit(stream, d.socket, "/v1/restore", {"ref": sid, "target": str(target)})
        assert http.first.wait(20), "the restore never asked the origin for a chunk"
        d.signal(signal.SIGTERM)
        wait_for(lambda: "stopping" in d.log(), "the daemon to start stopping")
        try:  # new work is refused while the running restore drains
            status, body = d.api("POST", "/v1/restore", {"ref": sid, "target": str(work / "x")})
        except OSError:
            pass  # or the socket no longer accepts connections at all
        else:
            assert status == 503, body
            assert_error_body(body, "unavailable")
            assert body.get("stopping") is True, body  # (not a cap: a client exits 4)
        http.gate.set()
        last = outcome(running.result(60))
        assert last["event"] == "result", last
        assert d.wait(30) == 0
    assert tree_digest(target) == tree_digest(src)
    assert hidden_leftovers(work) == []


def test_restore_aborted_by_sigterm_leaves_nothing(work: Path) -> None:
    src = files_tree(work / "src", {"a.bin": 5 * SMALL_CHUNK}, seed=22)
    origin_dir = work / "origin"
    # pack_size 0: chunks as objects of their own, whose GETs HeldOrigin holds
    with Hostd(work / "p", origin=f"file://{origin_dir}", pack_size=0) as p:
        sid = p.publish(src, "e2e/abort", chunk_size=SMALL_CHUNK)["snapshot"]
    target = work / "out"
    with (
        HeldOrigin(origin_dir, gated=True) as http,
        Hostd(work / "d", origin=http.url, drain_timeout="100ms") as d,
    ):
        conn = UnixHTTPConnection(str(d.socket), 60)
        try:
            conn.request(
                "POST", "/v1/restore", body=json.dumps({"ref": sid, "target": str(target)})
            )
            resp = conn.getresponse()
            assert resp.status == 200
            assert http.first.wait(20), "the restore never asked the origin for a chunk"
            d.signal(signal.SIGTERM)
            assert d.wait(30) == 0  # the drain ran out: the restore was cancelled
            events = [json.loads(x) for x in resp.read().splitlines() if x.strip()]
            last = outcome(events)  # the stream still ends with an error event
            assert last["event"] == "error", last
            assert last["error"] == "unavailable", last
            assert last.get("stopping") is True, last
            assert "stopped" in last["message"]
        finally:
            conn.close()
    assert not target.exists()
    assert hidden_leftovers(work) == []
    assert blob_files(work / "d" / "mem") == []  # nothing half-fetched looks complete


def test_serve_with_a_bad_config_exits_2_naming_the_key(work: Path) -> None:
    for text, key in [
        ('chunk_size = "3MiB"\n', "chunk_size"),
        ('socket_mode = "rw"\n', "socket_mode"),
        ('[[tiers]]\nname = "mem"\npath = "/tmp/x"\nbudget = "lots"\n', "budget"),
        ('colour = "red"\n', "colour"),
    ]:
        bad = work / "bad.toml"
        bad.write_text(text)
        p = cli("serve", "--config", str(bad), env={"HOME": str(work / "home")})
        assert p.returncode == 2, (text, p.returncode, p.stderr)
        assert key in p.stderr, p.stderr
        assert "config key" in p.stderr, p.stderr


# -- the command line -----------------------------------------------------------------------------


def test_cli_commands(work: Path) -> None:
    src, expected = tree_with_outside_link(work)
    with Hostd(work / "d") as d:
        s = ("--socket", str(d.socket))
        pub = cli_json("publish", str(src), "--ref", "cli/tree", *s)
        sid = pub["snapshot"]
        assert pub["files"] == 6
        assert pub["new_chunks"] > 0
        out = cli_json("restore", "cli/tree", str(work / "out"), "--mode", "copy", *s)
        assert out["snapshot"] == sid
        assert set(out) >= {"snapshot", "files", "bytes", "timings", "bytes_by_source"}
        assert set(out["timings"]) >= {"resolve", "fetch", "materialize", "total"}
        assert tree_digest(work / "out") == expected
        line = cli_fails("restore", "cli/tree", str(work / "out"), *s, code=1)
        assert "not empty" in line
        cli_json("restore", "cli/tree", str(work / "out"), "--replace", *s)
        assert tree_digest(work / "out") == expected

        (snap,) = cli_json("ls", *s)["snapshots"]
        assert snap["id"] == sid
        assert "cli/tree" in snap["refs"]
        st = cli_json("status", *s)
        assert st["socket"] == str(d.socket)
        assert st["version"] == hostd.__version__
        assert cli_json("pin", "cli/tree", *s) == {"snapshot": sid, "pinned": True}
        assert cli_json("unpin", "--snapshot", sid, *s) == {"snapshot": sid, "pinned": False}
        pf = cli_json("prefetch", "cli/tree", "--tier", "disk", *s)
        assert pf["snapshot"] == sid
        assert cli_json("gc", *s)["removed_blobs"] == 0
        assert cli_json("verify", *s)["bad"] == []

        # exit codes scripts branch on
        line = cli_fails("restore", "cli/no-such", str(work / "out2"), *s, code=3)
        assert "cli/no-such" in line
        assert not (work / "out2").exists()
        cli_fails("restore", "cli/tree", str(work / "out3"), "--mode", "fast", *s, code=2)
        cli_fails("status", "--socket", str(work / "nobody.sock"), code=4)
        # $HOSTD_SOCKET stands in for --socket
        p = cli("status", "--json", env={"HOSTD_SOCKET": str(d.socket)})
        assert p.returncode == 0
        assert json.loads(p.stdout)["pid"] == st["pid"]
        # human output (not a tty): no JSON, no control codes
        p = cli("restore", "cli/tree", str(work / "out4"), *s)
        assert p.returncode == 0
        assert sid in p.stdout
        assert "\x1b" not in p.stdout + p.stderr
    cli_fails("status", *s, code=4)  # the daemon is gone


def test_what_is_put_at_a_blobs_name_behind_hostd_is_never_handed_out(work: Path) -> None:
    """Root, by hand, while the daemon runs: a blob's file swapped for a symlink to a copy
    outside the tier (same bytes, same mtime), another for a directory. Link restores linked
    the symlink itself into the client's tree (whoever controls the outside path controls
    what the file shows), and a dropped record over a directory was an internal error, in
    the restore and in gc. Neither is a blob: the next use finds the name changed, re-hashes
    it (a regular file only, no symlink followed), drops it, fetches it again."""
    from hostd.core.ids import chunk_id, file_digest

    src = work / "src"
    src.mkdir()
    (src / "a.txt").write_bytes(b"a" * 3000)
    (src / "b.txt").write_bytes(b"b" * 5000)
    (src / "c.txt").write_bytes(b"c" * 7000)
    with Hostd(work / "d", access={"link_to_writers": True}) as d:
        d.publish(src, "t/odd")
        mem = Path(d.tiers[0]["path"])

        def blob(name: str) -> Path:
            data = (src / name).read_bytes()
            h = file_digest([(chunk_id(data), len(data))]).hex()
            return mem / "blobs" / h[:2] / h

        outside = work / "outside"
        shutil.copy2(blob("a.txt"), outside)
        blob("a.txt").unlink()
        blob("a.txt").symlink_to(outside)
        blob("b.txt").unlink()
        (blob("b.txt") / "inside").mkdir(parents=True)
        for i, mode in enumerate(("link", "auto", "copy")):
            out = d.restore("t/odd", work / f"t{i}", mode=mode)
            assert out["event"] == "result", out
            assert tree_digest(work / f"t{i}") == tree_digest(src)  # (a symlink: "link")
        assert not blob("a.txt").is_symlink()
        assert not blob("b.txt").is_dir()
        assert outside.read_bytes() == b"a" * 3000  # not followed, not removed
        status, answer = d.api("POST", "/v1/gc", {})
        assert status == 200, answer
