"""hostd.loader onto a CUDA device against safetensors.torch.load_file on the same files.

    python3 bench/loader_gpu.py [--shards 4] [--shard-mib 512] [--rounds 5] [--device cuda]
        [--dir /dev/shm] [--sweep] [--experiments] [--json out.json]

Needs torch with a CUDA device. Writes --shards fp16 shards of --shard-mib MiB each
(bench/loader_cpu.py's writer) under --dir (tmpfs by default: the page cache is warm, as a
warm `mem` tier's blobs are), then measures, in this order:
  ceilings      a pinned host buffer copied to the device (the link's limit); a pageable
                one (what a copy that stages nothing gets); the files read into a pinned
                buffer by hostd.loader's own reader (the host side's limit)
  sides         interleaved, --rounds times, which side first alternating; each loads
                every shard onto the device and sums every tensor's bytes there, then
                synchronizes, all inside the timed region, keeping the round's tensors:
                  reference  safetensors.torch.load_file(path, device=...)
                  hostd      hostd.loader.load_file(path, framework="torch", device=...)
  --experiments a side that registers the files' mapped pages with CUDA and copies them
                to the device by DMA, with no staging copy (an idea, not hostd's path)
  --sweep       hostd's staging (pinned buffers per reader, their size) and reader
                threads, each setting over half the rounds
It prints each side's median throughput and hostd/reference (above 1: hostd is faster),
and one JSON line. Benchmarks are not tests: nothing here fails on a timing.
"""

from __future__ import annotations

import argparse
import itertools
import mmap
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from loader_cpu import emit, make_shard

from hostd import loader

MiB = 1 << 20
GiB = 1 << 30


def device_sum(torch: Any, tensors: Any) -> Any:
    """The sum of every byte of every tensor, on the device (a read of every byte there)."""
    parts = [
        torch.sum(t.reshape(-1).view(torch.uint8), dtype=torch.int64) for t in tensors if t.numel()
    ]
    return torch.stack(parts).sum()


def timed_load(
    torch: Any, load: Callable[[Path], dict[str, Any]], paths: list[Path]
) -> tuple[float, int]:
    kept = []
    sums = []
    torch.cuda.synchronize()
    t = time.perf_counter()
    for p in paths:
        tensors = load(p)
        sums.append(device_sum(torch, tensors.values()))
        kept.append(tensors)
    total = int(torch.stack(sums).sum().item())  # (waits for the device)
    elapsed = time.perf_counter() - t
    del kept
    return elapsed, total


def ceilings(torch: Any, device: str, paths: list[Path]) -> dict[str, float]:
    """GiB/s of a pinned and a pageable 1 GiB host->device copy, and of hostd.loader's reader
    filling a pinned buffer from the files (each the best of 3)."""
    n = GiB
    on_device = torch.empty(n, dtype=torch.uint8, device=device)
    pinned = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    pinned.fill_(1)
    pageable = torch.ones(n, dtype=torch.uint8)
    out: dict[str, float] = {}
    for name, src in (("h2d_pinned", pinned), ("h2d_pageable", pageable)):
        best = float("inf")
        for _ in range(3):
            torch.cuda.synchronize()
            t = time.perf_counter()
            on_device.copy_(src, non_blocking=True)
            torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t)
        out[name] = n / best / GiB
    del pageable, on_device
    view = memoryview(pinned.numpy())
    for threads in (1, 2, 4, 8):
        best = float("inf")
        nbytes = 0
        for _ in range(3):
            t = time.perf_counter()
            nbytes = 0
            for p in paths:
                size = min(p.stat().st_size, n)
                fd = os.open(p, os.O_RDONLY)
                try:
                    loader._read_all(fd, 0, [view[:size]], threads, str(p))
                finally:
                    os.close(fd)
                nbytes += size
            best = min(best, time.perf_counter() - t)
        out[f"read_to_pinned_{threads}"] = nbytes / best / GiB
    return out


def registered(torch: Any, dev: str) -> Callable[[Path], dict[str, Any]]:
    """An experiment: the file's pages (mapped, then registered with CUDA, read-only) copied
    to the device by DMA, with no staging copy on the CPU."""
    cudart = torch.cuda.cudart()

    def load(path: Path) -> dict[str, Any]:
        header = loader.read_header(path)
        fd = os.open(path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            mm = mmap.mmap(fd, size, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        arr = np.frombuffer(mm, np.uint8)
        ptr = arr.ctypes.data
        rc = cudart.cudaHostRegister(ptr, size, 8)  # cudaHostRegisterReadOnly
        if int(rc) != 0:
            raise RuntimeError(f"cudaHostRegister: {rc}")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # not writable: only read from
                host = torch.from_numpy(arr)
            on_device = torch.empty(header.data_size, dtype=torch.uint8, device=dev)
            start = header.data_start
            on_device.copy_(host[start : start + header.data_size], non_blocking=True)
            torch.cuda.current_stream(dev).synchronize()
        finally:
            cudart.cudaHostUnregister(ptr)
        out = {}
        for t in header.tensors.values():
            dtype = getattr(torch, loader.DTYPES[t.dtype].torch)
            out[t.name] = on_device[t.begin : t.end].view(dtype).reshape(t.shape)
        return out

    return load


def compare(
    torch: Any, sides: dict[str, Callable[[Path], dict[str, Any]]], paths: list[Path], rounds: int
) -> dict[str, dict[str, Any]]:
    nbytes = sum(p.stat().st_size for p in paths)
    times: dict[str, list[float]] = {name: [] for name in sides}
    order = list(sides)
    want = None
    for r in range(-1, rounds):  # round -1: untimed, every side must read the same bytes
        for name in order if r % 2 == 0 else order[::-1]:
            elapsed, total = timed_load(torch, sides[name], paths)
            want = total if want is None else want
            if total != want:
                raise SystemExit(f"loader_gpu: {name} read different bytes ({total} != {want})")
            if r >= 0:
                times[name].append(elapsed)
    return {
        name: {
            "seconds": statistics.median(ts),
            "gib_per_s": nbytes / statistics.median(ts) / GiB,
            "best_gib_per_s": nbytes / min(ts) / GiB,
        }
        for name, ts in times.items()
    }


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = ap.add_argument
    add("--shards", type=int, default=4)
    add("--shard-mib", type=int, default=512)
    add("--rounds", type=int, default=5)
    add("--device", default="cuda")
    add("--dir", type=Path, default=Path("/dev/shm"))
    add("--sweep", action="store_true", help="also try other staging settings")
    add("--experiments", action="store_true", help="also time the experimental sides")
    add("--json", type=Path)
    args = ap.parse_args()
    import safetensors.torch
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("loader_gpu: torch finds no CUDA device")
    work = Path(tempfile.mkdtemp(prefix="hostd-loader-gpu-", dir=args.dir))
    try:
        rng = np.random.default_rng(7)
        paths = [work / f"model-{i:05d}.safetensors" for i in range(args.shards)]
        layer = 0
        for p in paths:
            layer = make_shard(p, args.shard_mib * MiB, rng, layer)
        nbytes = sum(p.stat().st_size for p in paths)
        dev = args.device
        result: dict[str, Any] = {
            "bench": "loader_gpu",
            "gpu": torch.cuda.get_device_name(dev),
            "torch": torch.__version__,
            "safetensors": safetensors.__version__,
            "cores": len(os.sched_getaffinity(0)),
            "bytes": nbytes,
            "defaults": {"stages": loader.STAGES, "stage_mib": loader.STAGE_BYTES // MiB},
        }
        result["ceilings_gib_per_s"] = ceil = ceilings(torch, dev, paths)
        print(
            f"{torch.cuda.get_device_name(dev)}, {result['cores']} cores; ceilings: pinned "
            f"h2d {ceil['h2d_pinned']:.1f} GiB/s, pageable h2d {ceil['h2d_pageable']:.1f}, "
            "files read into pinned memory by 1/2/4/8 threads "
            + "/".join(f"{ceil[f'read_to_pinned_{n}']:.1f}" for n in (1, 2, 4, 8)),
            flush=True,
        )
        sides: dict[str, Callable[[Path], dict[str, Any]]] = {
            "reference": lambda p: safetensors.torch.load_file(str(p), device=dev),
            "hostd": lambda p: loader.load_file(p, framework="torch", device=dev),
        }
        if args.experiments:
            try:  # an experiment: where it cannot run, say why and go on without it
                registered(torch, dev)(paths[0])
                sides["registered"] = registered(torch, dev)
            except Exception as e:
                print(f"registered: {type(e).__name__}: {e}", flush=True)
                result["registered_error"] = f"{type(e).__name__}: {e}"
        res = compare(torch, sides, paths, args.rounds)
        ratio = res["hostd"]["gib_per_s"] / res["reference"]["gib_per_s"]
        result["sides"] = res
        result["ratio"] = ratio
        print(f"{args.shards} shards of {args.shard_mib} MiB ({nbytes / GiB:.2f} GiB), median:")
        for name, r in res.items():
            print(f"  {name:10s} {r['seconds'] * 1000:7.0f} ms  {r['gib_per_s']:6.2f} GiB/s")
        print(f"  hostd/reference {ratio:.2f}x", flush=True)
        if args.sweep:
            sweep = []
            defaults = (loader.STAGES, loader.STAGE_BYTES)
            for stages, mib, threads in itertools.product((2, 3), (8, 16, 32), (4, 8, 16)):
                loader.STAGES, loader.STAGE_BYTES = stages, mib * MiB

                def ours(p: Path, n: int = threads) -> dict[str, Any]:
                    return loader.load_file(p, framework="torch", device=dev, threads=n)

                r = compare(torch, {"hostd": ours}, paths, max(1, args.rounds // 2))["hostd"]
                row = {"stages": stages, "stage_mib": mib, "threads": threads, **r}
                sweep.append(row)
                print(
                    f"  sweep stages {stages} x {mib:3d} MiB, {threads} threads: "
                    f"{r['gib_per_s']:6.2f} GiB/s",
                    flush=True,
                )
            loader.STAGES, loader.STAGE_BYTES = defaults
            result["sweep"] = sweep
    finally:
        shutil.rmtree(work, ignore_errors=True)
    emit(result, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
