"""A model's variant published under a second ref: the same weights, its own small files.

    .venv/bin/python bench/variant_publish.py [--shards 4] [--shard-mib 256] [--rounds 3]
        [--dir /var/tmp] [--json out.json]

A base tree (--shards files of --shard-mib MiB of random bytes, a config and a tokenizer) is
published under `bench/base` into a fresh daemon and `file://` origin; then a variant (the
same shards, its own config and tokenizer) is published under `bench/variant`, which no
earlier snapshot of its own names. Reported per round: the variant's publish (CLI wall
time), what it stored at the origin (`stored_bytes`, `packs`), and `cp -r` of the variant
into the same filesystem (the reference: a publish must at least read every byte, and
without dedup across refs it writes them all again). The daemon, the origin and the trees
live under --dir (on ext4 the upload is a real write). Not a test: nothing fails on a timing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import small_files as sf
from harness import Hostd

MiB = 1 << 20


def make_trees(base: Path, variant: Path, shards: int, shard_mib: int) -> int:
    """The two trees, the shards written once and copied; the bytes of the variant."""
    base.mkdir()
    variant.mkdir()
    for i in range(shards):
        name = f"model-{i:05d}-of-{shards:05d}.safetensors"
        with open(base / name, "wb") as f:
            for _ in range(shard_mib):
                f.write(os.urandom(MiB))
        shutil.copyfile(base / name, variant / name)
    for tree, seed in ((base, b"base"), (variant, b"variant")):
        (tree / "config.json").write_bytes(b'{"seed": "%s"}\n' % seed * 40)
        (tree / "tokenizer.json").write_bytes(os.urandom(2 * MiB))
    return sum(p.stat().st_size for p in variant.iterdir())


def run(root: Path, shards: int, shard_mib: int, rounds: int) -> dict[str, Any]:
    base, variant = root / "base", root / "variant"
    size = make_trees(base, variant, shards, shard_mib)
    out: dict[str, Any] = {"bytes": size, "rounds": []}
    for n in range(rounds):
        origin, state = root / "origin", root / "state"
        sf.rm(origin, state)
        with Hostd(state, origin=origin.as_uri(), log_level="info") as d:
            sf.hostd_cli(d.socket, "publish", str(base), "--ref", "bench/base")
            t_ref = sf.timed(["cp", "-r", str(variant), str(root / "ref")])
            sf.rm(root / "ref")
            t_pub, pub = sf.hostd_cli(d.socket, "publish", str(variant), "--ref", "bench/variant")
        sf.rm(state)
        r = {
            "round": n,
            "publish": t_pub,
            "cp_r": t_ref,
            "ratio": t_ref / t_pub,
            "stored_bytes": pub["stored_bytes"],
            "packs": pub["packs"],
            "new_chunks": pub["new_chunks"],
        }
        out["rounds"].append(r)
        print(
            f"round {n}: variant publish {t_pub:.2f} s, cp -r {t_ref:.2f} s "
            f"(ratio {r['ratio']:.2f}x), stored {pub['stored_bytes'] / MiB:.1f} MiB "
            f"in {pub['packs']} packs of {size / MiB:.0f} MiB",
            flush=True,
        )
    return out


def main() -> int:
    raw = argparse.RawDescriptionHelpFormatter
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=raw)
    ap.add_argument("--shards", type=int, default=4, help="weight files (default 4)")
    ap.add_argument("--shard-mib", type=int, default=256, help="MiB each (default 256)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=Path("/var/tmp"), help="where it all lives")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    hostd_from = sf.hostd_from()
    root = Path(tempfile.mkdtemp(prefix="hvp", dir=args.dir))
    try:
        result = run(root, args.shards, args.shard_mib, args.rounds)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    result["hostd_from"] = hostd_from
    rounds = result["rounds"]
    print(
        f"median: variant publish {statistics.median(r['publish'] for r in rounds):.2f} s, "
        f"ratio to cp -r {statistics.median(r['ratio'] for r in rounds):.2f}x, stored "
        f"{statistics.median(r['stored_bytes'] for r in rounds) / MiB:.1f} MiB; "
        f"hostd from {hostd_from}"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
