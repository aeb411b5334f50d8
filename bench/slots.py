"""DigestSlots' hot calls in time, and what a key costs in memory: the pure-Python twin
(PyDigestSlots) against the compiled one (native/slots.c).

    .venv/bin/python bench/slots.py [--keys 1000000] [--rounds 3] [--json out.json]

Each implementation runs in a child process of its own (so that its RSS is its own), on N
BLAKE3 digests: the time per call (best of --rounds) of `add` and `put` of every key into an
empty table (growing it as they go), then `find` of present keys and of absent ones, `put` of
present keys and `remove`, in a shuffled order: the keys asked for are new objects, made in
that order, as a cache meets them (a digest just read, its record anywhere in the table).
"loop floor" is the same loop calling `len`: what any call from Python costs; "dict.get" a
dict's lookup of the same keys, for scale (at a million keys both wait on memory). Each
figure is the median over chunks of 10,000 calls (these machines are shared). Memory: RSS
growth and `nbytes()` per key after the first `add` pass. Benchmarks are not tests: nothing
here fails on a timing. Record results in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import blake3

from hostd.core.slots import WHY_NOT_NATIVE, NativeDigestSlots, PyDigestSlots, Slots

OPS = ("loop floor", "add", "put (absent)", "find (present)", "find (absent)", "put (present)")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def digests(start: int, n: int) -> list[bytes]:
    return [blake3.blake3(i.to_bytes(8, "little")).digest() for i in range(start, start + n)]


def per_call(call: Callable[[Any], object], args: list[Any], chunk: int = 10_000) -> float:
    """Nanoseconds a call, the loop included: the median over chunks of `chunk` calls, so
    that a chunk during which another process had the core does not count."""
    took = []
    for at in range(0, len(args), chunk):
        part = args[at : at + chunk]
        t0 = time.perf_counter_ns()
        for a in part:
            call(a)
        took.append((time.perf_counter_ns() - t0) / len(part))
    return statistics.median(took)


def measure(cls: type[Slots], n: int, rounds: int) -> dict[str, Any]:
    """One implementation's figures (run in its own process)."""
    keys, absent = digests(0, n), digests(n, n)
    order = list(range(n))
    random.Random(1).shuffle(order)
    # The same keys in another order, made afresh: the caller's key is new (a digest just
    # read), the table's copy of it anywhere in memory.
    shuffled = [blake3.blake3(i.to_bytes(8, "little")).digest() for i in order]
    gc.collect()
    base = rss()
    table = cls()
    best = {"add": per_call(table.add, keys)}
    grown = rss() - base
    nbytes = table.nbytes()
    for r in range(rounds):
        if r:
            del table
            table = cls()
            best["add"] = min(best["add"], per_call(table.add, keys))
        fresh = cls()
        times = {
            "loop floor": per_call(len, shuffled),
            "put (absent)": per_call(fresh.put, keys),
            "find (present)": per_call(table.find, shuffled),
            "find (absent)": per_call(table.find, absent),
            "put (present)": per_call(table.put, shuffled),
        }
        del fresh
        times["remove"] = per_call(table.remove, [table.find(k) for k in shuffled])
        assert len(table) == 0
        for op, ns in times.items():
            best[op] = min(best.get(op, ns), ns)
    del table
    reference = dict.fromkeys(keys, 0)  # what a dict's lookup costs on the same keys
    best["dict.get (present)"] = min(per_call(reference.get, shuffled) for _ in range(rounds))
    return {"ns": best, "rss_per_key": grown / n, "nbytes_per_key": nbytes / n}


def child(impl: str, n: int, rounds: int) -> None:
    cls = PyDigestSlots if impl == "python" else NativeDigestSlots
    if cls is None:
        raise SystemExit(WHY_NOT_NATIVE)
    print(json.dumps(measure(cls, n, rounds)))


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--keys", type=int, default=1_000_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", help="write the figures here too")
    ap.add_argument("--impl", choices=["python", "native"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.impl:
        child(args.impl, args.keys, args.rounds)
        return
    impls = ["python"] + ([] if WHY_NOT_NATIVE else ["native"])
    if WHY_NOT_NATIVE:
        print(f"native: skipped, {WHY_NOT_NATIVE}")
    got: dict[str, dict[str, Any]] = {}
    for impl in impls:
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                f"--impl={impl}",
                f"--keys={args.keys}",
                f"--rounds={args.rounds}",
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        got[impl] = json.loads(out.stdout)
    print(f"{args.keys:,} keys of 32 bytes, best of {args.rounds}, ns per call")
    print(f"{'':20}" + "".join(f"{impl:>10}" for impl in impls) + ("   speedup" * (len(impls) > 1)))
    for op in (*OPS, "remove", "dict.get (present)"):
        ns = [got[impl]["ns"][op] for impl in impls]
        speedup = f"{ns[0] / ns[1]:9.1f}x" if len(ns) > 1 else ""
        print(f"{op:20}" + "".join(f"{v:10.0f}" for v in ns) + speedup)
    for what in ("rss_per_key", "nbytes_per_key"):
        print(f"{what:20}" + "".join(f"{got[impl][what]:10.1f}" for impl in impls))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"keys": args.keys, "rounds": args.rounds, **got}, f, indent=2)


if __name__ == "__main__":
    main()
