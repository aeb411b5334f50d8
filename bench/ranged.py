"""Cold restores from an origin with an object store's latency: packs of large files read
with ranged GETs of `fetch_range` against one GET per chunk.

    .venv/bin/python bench/ranged.py [--size 1GiB] [--rounds 3] [--latency 30ms]
        [--conn-rate 32MiB] [--rate 4GiB] [--fetch-range 64MiB] [--json out.json]

One tree of SHARDS large files (random bytes), published twice to a `file://` origin
directory: `packed` with `pack_size` 64MiB, the default (each large file's chunks back to back in
packs), `perchunk` with `pack_size = 0` (an object per chunk, the layout before packs of
large files). bench/throttled.py serves the directory over HTTP with ranges, holding each
answer's head `--latency` (an object store's first-byte latency) and giving each connection
`--conn-rate` (its per-connection throughput), all connections `--rate`. Each round restores
both refs, interleaved, with a fresh daemon and server and a cold tier (`--mode copy` into
/dev/shm, by root): wall time of the CLI, and the origin's request count. The ratio is taken
within each round (perchunk / packed: above 1 is packed faster), then the median.
Benchmarks are not tests: nothing here fails on a timing. Record results in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from harness import Hostd

from hostd.client import Client
from hostd.core.units import parse_size

ROOT = Path(__file__).resolve().parent.parent

SHARDS = 4
REFS = {"packed": "bench/packed", "perchunk": "bench/perchunk"}
PACK_SIZE = {"packed": "64MiB", "perchunk": "0"}
SHM = Path("/dev/shm")


def make_tree(root: Path, size: int) -> None:
    root.mkdir(parents=True)
    for i in range(SHARDS):
        with (root / f"model-{i:05d}.safetensors").open("wb") as f:
            left = size // SHARDS
            while left:
                n = min(left, 16 << 20)
                f.write(os.urandom(n))
                left -= n


def publish(work: Path, origin: Path, src: Path, case: str) -> None:
    extra: dict[str, Any] = {"pack_size": PACK_SIZE[case]}
    root = work / f"pub-{case}"
    tiers = [{"name": "disk", "path": str(root / "tier"), "budget": "64GiB"}]
    with Hostd(root, origin=origin.as_uri(), tiers=tiers, **extra) as h, Client(h.socket) as c:
        c.publish(src, ref=REFS[case])
    shutil.rmtree(root)


@contextlib.contextmanager
def serving(origin: Path, args: argparse.Namespace) -> Iterator[tuple[str, list[int]]]:
    """bench/throttled.py on `origin`; yields its URL and, once it stopped, its requests."""
    cmd = [sys.executable, str(ROOT / "bench" / "throttled.py"), str(origin), "--ranges"]
    cmd += ["--rate", args.rate, "--latency", args.latency]
    if args.conn_rate:
        cmd += ["--conn-rate", args.conn_rate]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    counted: list[int] = []
    try:
        assert p.stdout is not None
        line = p.stdout.readline().split()
        assert line[:1] == ["listening"], line
        yield line[1], counted
    finally:
        p.terminate()
        out, _ = p.communicate(timeout=30)
        for ln in out.splitlines():
            if ln.startswith("requests "):
                counted.append(int(ln.split()[1]))


def restore(work: Path, origin: Path, case: str, args: argparse.Namespace) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix=f"d-{case}-", dir=work))
    mem = Path(tempfile.mkdtemp(prefix="hostd-ranged-mem-", dir=SHM))
    target = Path(tempfile.mkdtemp(prefix="hostd-ranged-out-", dir=SHM)) / "out"
    extra: dict[str, Any] = {}
    if args.fetch_range:
        extra["fetch_range"] = args.fetch_range
    try:
        with serving(origin, args) as (url, counted):
            tiers = [{"name": "mem", "path": str(mem), "budget": "8GiB"}]
            with Hostd(root, origin=url, tiers=tiers, **extra) as h:
                t = time.perf_counter()
                with Client(h.socket) as c:
                    c.restore(REFS[case], target, mode="copy")
                wall = time.perf_counter() - t
        return {"case": case, "seconds": wall, "requests": counted[0] if counted else None}
    finally:
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(mem, ignore_errors=True)
        shutil.rmtree(target.parent, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--size", default="1GiB")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--latency", default="30ms", help="each answer's head held this long")
    ap.add_argument("--conn-rate", default="32MiB", help="each connection's bytes/s")
    ap.add_argument("--rate", default="4GiB", help="all connections' bytes/s")
    ap.add_argument("--fetch-range", help="the restoring daemons' fetch_range")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    size = parse_size(args.size, "--size")
    with tempfile.TemporaryDirectory(prefix="hostd-ranged-", dir="/var/tmp") as tmp:
        work = Path(tmp)
        src, origin = work / "src", work / "origin"
        make_tree(src, size)
        origin.mkdir()
        for case in REFS:
            publish(work, origin, src, case)
        runs: list[dict[str, Any]] = []
        for rnd in range(args.rounds):
            order = list(REFS) if rnd % 2 == 0 else list(REFS)[::-1]
            for case in order:
                r = {"round": rnd, **restore(work, origin, case, args)}
                runs.append(r)
                print(f"round {rnd} {case:<9} {r['seconds']:7.3f}s {r['requests']} requests")
    ratios = []
    for rnd in range(args.rounds):
        by = {r["case"]: r["seconds"] for r in runs if r["round"] == rnd}
        ratios.append(by["perchunk"] / by["packed"])
    print(f"\n{args.size}, latency {args.latency}, per connection {args.conn_rate}/s")
    for case in REFS:
        secs = [r["seconds"] for r in runs if r["case"] == case]
        reqs = [r["requests"] for r in runs if r["case"] == case]
        print(
            f"{case:<9} median {statistics.median(secs):6.2f} s "
            f"({size / statistics.median(secs) / 2**20:6.0f} MiB/s), requests {reqs}"
        )
    print(f"perchunk / packed (median of per-round ratios): {statistics.median(ratios):.2f}")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": None}, "runs": runs}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
