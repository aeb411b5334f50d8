"""hostd.loader.load_file against safetensors.numpy.load_file on the same files, on the CPU.

    .venv/bin/python bench/loader_cpu.py [--shards 4] [--shard-mib 512] [--rounds 5]
        [--dir /dev/shm] [--threads N] [--small 10000] [--cold] [--json out.json]

Writes --shards fp16 safetensors shards of --shard-mib MiB each with the real writer
(safetensors.numpy.save_file): layers of four 4096x4096 matrices and two 4096 norms, the last
matrix cut to fill the shard, random bits. Then, interleaved, --rounds times (which side
goes first alternates), each side loads every shard and XORs every array's bytes (a uint64
view, `np.bitwise_xor.reduce`: memory-bound, about 16 GiB/s here, and the same on both
sides), all inside the timed region, keeping the round's arrays until its end as a model
would. Before each side, as much memory as the files hold is touched and freed, untimed, so
that both sides find it backed (see back_memory); an untimed round first checks that every
side reads the same bytes. Sides:
  reference      safetensors.numpy.load_file
  hostd          hostd.loader.load_file (its default threads, or --threads)
  hostd 1 thread hostd.loader.load_file(threads=1)
It prints each side's median (and best) throughput and the ratio hostd/reference (above 1:
hostd is faster; the target is >= 0.8x), then the same for one file of --small tensors of
4 KiB each (per-tensor overhead; 0 skips it), and one JSON line with the figures.

On tmpfs (the default) the page cache is warm for both sides by construction. --cold evicts
each file from the page cache before each load (posix_fadvise DONTNEED after an fsync): use
it with a --dir on a disk, where it measures reading the disk.
Benchmarks are not tests: nothing here fails on a timing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file as reference_load_file
from safetensors.numpy import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from hostd import loader

MiB = 1 << 20
GiB = 1 << 30
HIDDEN = 4096
TARGET = 0.8

Loader = Callable[[Path], dict[str, Any]]


def make_shard(path: Path, size: int, rng: np.random.Generator, first_layer: int = 0) -> int:
    """An fp16 shard of `size` bytes of tensor data (rounded down to whole elements), its
    layers numbered from `first_layer`; the number of the next layer."""
    tensors: dict[str, np.ndarray[Any, Any]] = {}
    left = size // 2  # fp16 elements still to place
    layer = first_layer
    while left > 0:
        for name in ("q", "k", "v", "o"):
            rows = min(HIDDEN, left // HIDDEN)
            if rows == 0:
                break
            tensors[f"layers.{layer}.attn.{name}.weight"] = fp16(rng, (rows, HIDDEN))
            left -= rows * HIDDEN
        for name in ("input_norm", "post_norm"):
            n = min(HIDDEN, left)
            if n == 0:
                break
            tensors[f"layers.{layer}.{name}.weight"] = fp16(rng, (n,))
            left -= n
        layer += 1
    save_file(tensors, str(path), metadata={"format": "np", "bench": "loader_cpu"})
    return layer


def fp16(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray[Any, Any]:
    return rng.integers(0, 1 << 16, size=shape, dtype=np.uint16).view(np.float16)


def make_small(path: Path, count: int, rng: np.random.Generator) -> None:
    """`count` tensors of 4 KiB (2048 fp16 each): the per-tensor cost."""
    save_file({f"t.{i}": fp16(rng, (2048,)) for i in range(count)}, str(path))


def checksum(arrays: Iterable[Any]) -> int:
    """XOR of every array's bytes as uint64 words (the odd tail bytes folded in too)."""
    x = 0
    for arr in arrays:
        raw = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
        whole = raw.size // 8 * 8
        if whole:
            x ^= int(np.bitwise_xor.reduce(raw[:whole].view(np.uint64)))
        for i, b in enumerate(raw[whole:].tolist()):
            x ^= b << (8 * i)
    return x


def emit(result: dict[str, Any], path: Path | None) -> None:
    """A bench's figures as one JSON line, printed and, with --json, written to `path`."""
    line = json.dumps(result)
    print(line)
    if path is not None:
        path.write_text(line + "\n")


def evict(paths: list[Path]) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def back_memory(nbytes: int) -> None:
    """Touch and free `nbytes` of memory, so that the side timed next finds it backed.

    This VM hands memory that stays free for a second or two back to its host, and the next
    touch of it runs at a tenth of the speed (about 0.6 GiB/s against 6). Without this, the
    side timed after a slow one paid for memory the slow one had freed."""
    buf = np.empty(nbytes, np.uint8)
    buf.fill(0)
    del buf


def time_side(load: Loader, paths: list[Path], cold: bool) -> tuple[float, int]:
    """Seconds to load every file and checksum every array, and the checksum."""
    if cold:
        evict(paths)
    back_memory(sum(p.stat().st_size for p in paths))
    kept = []
    x = 0
    t = time.perf_counter()
    for p in paths:
        tensors = load(p)
        x ^= checksum(tensors.values())
        kept.append(tensors)  # the round keeps what it loaded, as a model would
    elapsed = time.perf_counter() - t
    del kept
    return elapsed, x


def compare(
    sides: dict[str, Loader], paths: list[Path], rounds: int, cold: bool
) -> dict[str, dict[str, Any]]:
    """Each side once untimed, then `rounds` interleaved timed rounds; every side must read
    the same bytes."""
    nbytes = sum(p.stat().st_size for p in paths)
    times: dict[str, list[float]] = {name: [] for name in sides}
    order = list(sides)
    want = None
    for r in range(-1, rounds):
        for name in order if r % 2 == 0 else order[::-1]:
            elapsed, x = time_side(sides[name], paths, cold)
            want = x if want is None else want
            if x != want:
                raise SystemExit(f"loader_cpu: {name} read different bytes (checksum {x:#x})")
            if r >= 0:
                times[name].append(elapsed)
    out = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        out[name] = {
            "seconds": med,
            "gib_per_s": nbytes / med / GiB,
            "best_gib_per_s": nbytes / min(ts) / GiB,
            "rounds_gib_per_s": [round(nbytes / t / GiB, 3) for t in ts],
        }
    return out


def report(title: str, res: dict[str, dict[str, Any]], nbytes: int) -> float:
    """Print the sides; set each one's ratios to the reference; return hostd's."""
    ref = res["reference"]
    print(f"{title} ({nbytes / GiB:.2f} GiB), median (best) of the rounds:")
    for name, r in res.items():
        r["ratio"] = r["gib_per_s"] / ref["gib_per_s"]
        r["best_ratio"] = r["best_gib_per_s"] / ref["best_gib_per_s"]
        print(
            f"  {name:16s} {r['seconds'] * 1000:8.0f} ms  {r['gib_per_s']:6.2f} GiB/s "
            f"({r['best_gib_per_s']:.2f})  {r['ratio']:5.2f}x reference ({r['best_ratio']:.2f}x)"
        )
    ratio = float(res["hostd"]["ratio"])
    met = "met" if ratio >= TARGET else "NOT met"
    print(f"  hostd/reference: {ratio:.2f}x (target >= {TARGET}x: {met})")
    return ratio


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = ap.add_argument
    add("--shards", type=int, default=4, help="fp16 shards (default 4)")
    add("--shard-mib", type=int, default=512, help="MiB of tensor data a shard (default 512)")
    add("--rounds", type=int, default=5, help="interleaved rounds, the median kept (default 5)")
    add("--dir", type=Path, default=Path("/dev/shm"), help="where the files go (default tmpfs)")
    add("--threads", type=int, help="hostd.loader's threads (default: its own choice)")
    add("--small", type=int, default=10000, help="tensors in the 4 KiB-tensor file (0: none)")
    add("--cold", action="store_true", help="evict the files from the page cache before loads")
    add("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    need = args.shards * args.shard_mib * MiB + args.small * 4096
    if shutil.disk_usage(args.dir).free < need + GiB:
        raise SystemExit(f"loader_cpu: {args.dir} has too little room for {need / GiB:.1f} GiB")

    sides: dict[str, Loader] = {
        "reference": lambda p: reference_load_file(p),
        "hostd": lambda p: loader.load_file(p, threads=args.threads),
        "hostd 1 thread": lambda p: loader.load_file(p, threads=1),
    }
    work = Path(tempfile.mkdtemp(prefix="hostd-loader-bench-", dir=args.dir))
    try:
        rng = np.random.default_rng(7)
        t = time.perf_counter()
        shards = [
            work / f"model-{i:05d}-of-{args.shards:05d}.safetensors" for i in range(args.shards)
        ]
        for p in shards:
            make_shard(p, args.shard_mib * MiB, rng)
        small = work / "small.safetensors"
        if args.small:
            make_small(small, args.small, rng)
        if args.cold:
            os.sync()
        print(f"wrote the files in {time.perf_counter() - t:.1f} s under {work}", flush=True)

        nbytes = sum(p.stat().st_size for p in shards)
        res = compare(sides, shards, args.rounds, args.cold)
        ratio = report(f"{args.shards} shards of {args.shard_mib} MiB, fp16", res, nbytes)
        result: dict[str, Any] = {
            "bench": "loader_cpu",
            "shards": args.shards,
            "shard_mib": args.shard_mib,
            "rounds": args.rounds,
            "dir": str(args.dir),
            "cold": args.cold,
            "cores": len(os.sched_getaffinity(0)),
            "hostd_threads": args.threads,
            "bytes": nbytes,
            "shards_result": res,
            "ratio": ratio,
            "target": TARGET,
            "met": ratio >= TARGET,
        }
        if args.small:
            small_res = compare(sides, [small], args.rounds, args.cold)
            result["small_tensors"] = args.small
            result["small_result"] = small_res
            result["small_ratio"] = report(
                f"{args.small} tensors of 4 KiB", small_res, small.stat().st_size
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    emit(result, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
