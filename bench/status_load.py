"""`GET /v1/status` latency while a restore of many small files runs (issue 11's target: p99
within 3x its idle p99), beside a trivial server in a process of its own asked alike.

    .venv/bin/python bench/status_load.py [--files 10000] [--rounds 3] [--json out.json]

The small_files tree is published once (tmpfs); then each round, on a fresh daemon: status
asked 300 times idle, then back to back (5 ms apart) through a cold and then a warm `copy`
restore of the tree, the reference server asked half way between. Reports each round's p50
and p99 and the medians over the rounds. The reference shows what the loaded machine's
scheduling alone costs a request: what is above it is the daemon's own.
Benchmarks are not tests: nothing here fails on a timing. Record results in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import small_files as sf


def one_round(place: sf.Place, n: int) -> dict[str, Any]:
    out = place.base / "out"
    with place.daemon(f"probe{n}") as d:
        size = len(json.dumps(d.api("GET", "/v1/status")[1]))
        with sf.reference_server(place.base / "ref.sock", size) as ref_sock:
            for _ in range(20):  # warm up the connection path
                sf.status_once(d.socket)
                sf.status_once(ref_sock)
            got: dict[str, Any] = {
                "idle": [sf.status_once(d.socket) for _ in range(300)],
                "reference_idle": [sf.status_once(ref_sock) for _ in range(300)],
            }
            for kind in ("cold", "warm"):
                got[kind], got[f"reference_{kind}"], _ = sf.probe_status(
                    d.socket,
                    lambda: sf.hostd_cli(d.socket, "restore", sf.REF, str(out), "--mode", "copy"),
                    ref_sock,
                )
                sf.rm(out)
    sf.rm(place.base / f"probe{n}")
    return {k: {"p50": sf.pct(v, 50), "p99": sf.pct(v, 99), "n": len(v)} for k, v in got.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--files", type=int, default=10000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tmpfs-dir", type=Path, default=Path("/dev/shm"))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="status-load-", dir=args.tmpfs_dir) as tmp:
        place = sf.Place(Path(tmp), "self")
        sf.make_tree(place.base / "src", args.files)
        with place.daemon("pub") as d:
            sf.hostd_cli(d.socket, "publish", str(place.base / "src"), "--ref", sf.REF)
        rounds = []
        for n in range(args.rounds):
            r = one_round(place, n)
            rounds.append(r)
            print(
                f"round {n + 1}: "
                + ", ".join(
                    f"{k} {v['p50'] * 1e3:.2f}/{v['p99'] * 1e3:.2f} ms (n={v['n']})"
                    for k, v in r.items()
                ),
                flush=True,
            )
    print("medians over the rounds (p50 / p99, ms):")
    for k in rounds[0]:
        p50 = statistics.median(r[k]["p50"] for r in rounds) * 1e3
        p99 = statistics.median(r[k]["p99"] for r in rounds) * 1e3
        print(f"  {k:18} {p50:6.2f} / {p99:6.2f}")
    if args.json:
        args.json.write_text(json.dumps({"command": sys.argv, "rounds": rounds}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
