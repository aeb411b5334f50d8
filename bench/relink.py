"""Link restores of blobs lent to a writer: each restore after the last one's tree was removed.

    .venv/bin/python bench/relink.py [--files 10000] [--large-mib 0] [--rounds 4]
        [--link-checks writers|lease|all] [--json out.json]

With `[access] link_to_writers = true` a root caller gets links, and the blobs it gets are
marked lent: from then on their ctime counts, and removing the tree (which moves the ctime of
every linked inode) makes the next restore re-hash each blob before linking it again. That is
a container runtime's everyday loop: restore a compile cache by link, run, delete, restore.

The small-file tree of bench/small_files.py (N files of 1-16 KiB plus 20 of 1 MiB, tmpfs) is
published, restored once by copy (warm), then restored by link --rounds times, each tree
removed before the next; the first link round re-hashes nothing (the blobs are not lent yet),
every later one re-hashes them all. Reference: `cp -al` of the same tree, same run. Reported:
each round's daemon time (`timings`) and its ratio to `cp -al`. --large-mib N: the tree is
4 files of N MiB of random bytes instead (weights: the re-hash of big blobs, in GiB/s).
--link-checks C: the restores are asked by nobody (curl through setpriv: a caller that
cannot write the blobs, as root), into a directory of its own, from a daemon with
`[access] link_checks = C`: "writers" lends nothing (no round re-hashes), "lease" holds a
read lease on each blob it links (the first round takes them, none re-hashes), "all" lends
every one (as above). Needs root.
Not a test: nothing fails on a timing.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import small_files as sf


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--files", type=int, default=10_000)
    ap.add_argument("--large-mib", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--tmpfs-dir", type=Path, default=Path("/dev/shm"))
    ap.add_argument("--link-checks", choices=("writers", "lease", "all"))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.link_checks and os.geteuid() != 0:
        ap.error("--link-checks restores as nobody: it needs root (setpriv)")
    hostd_from = sf.hostd_from()  # (its bytecode written before anything is timed)
    base = Path(tempfile.mkdtemp(prefix="hrl", dir=args.tmpfs_dir))
    os.chmod(base, 0o755)
    try:
        result = run(base, args.files, args.rounds, args.large_mib, args.link_checks)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    result["hostd_from"] = hostd_from
    for r in result["rounds"]:
        print(
            f"round {r['round']}: daemon {r['total']:.3f} s (fetch {r['fetch']:.3f}, "
            f"materialize {r['materialize']:.3f}), cp -al {r['cp_al']:.3f} s, "
            f"ratio {r['ratio']:.2f}x, linked {r['linked']}, "
            f"{result['bytes'] / r['total'] / (1 << 30):.2f} GiB/s"
        )
    later = [r["total"] for r in result["rounds"][1:]]
    if later:
        print(f"re-verifying rounds: median {statistics.median(later):.3f} s")
    print(f"hostd from {result['hostd_from']}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


def run(
    base: Path, files: int, rounds: int, large_mib: int, checks: str | None = None
) -> dict[str, Any]:
    src = base / "src"
    if large_mib:
        src.mkdir()
        rng = random.Random(14)
        for i in range(4):
            with open(src / f"model-{i}.safetensors", "wb") as f:
                for _ in range(large_mib):
                    f.write(rng.randbytes(1 << 20))
    else:
        sf.make_tree(src, files)
    size = sum(f.stat().st_size for f in src.rglob("*") if f.is_file())
    # the CLI as root, with link_to_writers on; or nobody (curl), under `checks`
    place = sf.Place(base, "nobody" if checks else "self")
    home = base / "home"  # nobody's
    home.mkdir()
    os.chown(home, sf.NOBODY, sf.NOBODY)
    with place.daemon("pub") as p:
        sf.hostd_cli(p.socket, "publish", str(src), "--ref", sf.REF)
    out: list[dict[str, Any]] = []
    with place.daemon("rest", access={"link_checks": checks} if checks else None) as d:
        sf.hostd_cli(d.socket, "restore", sf.REF, str(base / "warm"), "--mode", "copy")
        shutil.rmtree(base / "warm")
        for i in range(rounds):
            t = time.perf_counter()
            subprocess.run(["cp", "-al", str(src), str(base / "ref")], check=True)
            cp_al = time.perf_counter() - t
            shutil.rmtree(base / "ref")
            target = (home if checks else base) / f"out{i}"
            if checks:
                ask = {"ref": sf.REF, "target": str(target), "mode": "link"}
                _, res = sf.curl_as_nobody(d.socket, "/v1/restore", ask)
            else:
                _, res = sf.hostd_cli(d.socket, "restore", sf.REF, str(target), "--mode", "link")
            shutil.rmtree(target)  # moves the ctime of every linked blob
            timings = res["timings"]
            out.append(
                {
                    "round": i + 1,
                    **{k: timings[k] for k in ("fetch", "materialize", "total")},
                    "cp_al": cp_al,
                    "ratio": cp_al / timings["total"],
                    "linked": res["linked"],
                }
            )
    return {
        "files": 4 if large_mib else files,
        "bytes": size,
        "link_checks": checks,
        "rounds": out,
    }


if __name__ == "__main__":
    raise SystemExit(main())
