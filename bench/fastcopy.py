"""hostd.fastcopy's batches alone: twin vs native vs what they replace.

    .venv/bin/python bench/fastcopy.py [--files 10000] [--rounds 5] [--dir /dev/shm]
        [--tree-order]
    .venv/bin/python bench/fastcopy.py --blobs [--files 10000] [--rounds 5] [--dir /dev/shm]
    .venv/bin/python bench/fastcopy.py --open [--files 10000] [--rounds 5] [--dir /dev/shm]

Without --blobs or --open, the restore helper's file-creation step (create_files):
N files of 1-16 KiB (dirs of 100, each with a past mtime) are written once under --dir.
Each round, interleaved, times (wall and CPU, children included):
  cp -r    `cp -r` of the tree (no -p: it keeps neither modes' umask nor mtimes)
  python   mkdir of the directories, then fastcopy.twin_create_files in batches of 512,
           largest first (as materialize sends them: the files of a batch lie in many
           directories), the sources' descriptors opened beforehand
  native   the same with fastcopy.native_create_files: its own choice of threads (auto),
           then each of --threads
and prints the median of each with its ratio cp-r/that (above 1: faster than cp -r), and
the best round's wall time.
The sources' descriptors are opened outside the timing: the daemon opens them, not the
helper.

With --open, the daemon's side of a `copy` restore: opening N blobs (the tree above) in
batches of 512, `os.open` in a loop (python) against fastcopy.native_open_paths (native);
the descriptors are closed outside the timing.

With --blobs, a tier's one-chunk blobs (write_blobs): N blobs of 1-16 KiB held in memory,
each with a past mtime, written into a fresh tier under --dir each round (its 256 prefix
directories made on the way, as on a cold tier), in batches of 64 (fill.WRITE_BATCH), no
sync. Each round, interleaved:
  whole       Tier.write_whole(durable=False) per blob, as fill wrote them before write_blobs
  whole 2w    the same from two threads taking batches in turn (fill.WRITERS)
  twin        fastcopy.twin_write_blobs per batch
  twin 2w     the same from two threads
  native      fastcopy.native_write_blobs per batch, one C thread
  native 2w   the same from two Python threads (as two fill writers call it)
  native x2   one caller, two C threads
and prints each median with its ratio whole/that (above 1: faster than write_whole).
Nothing fails on a timing; record results in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from hostd import fastcopy
from hostd.tier import BLOB_MODE, Tier

KiB = 1024
BATCH = 512  # materialize.BATCH_FILES
BLOB_BATCH = 64  # fill.WRITE_BATCH


def make_tree(root: Path, files: int) -> list[tuple[str, int, int, int]]:
    """(relative path, size, mode, mtime_ns) of each file written under root."""
    rng = random.Random(11)
    out = []
    for i in range(files):
        rel = f"s{i // 100:03d}/f{i:06d}.bin"
        size = rng.randint(KiB, 16 * KiB)
        mode = 0o755 if rng.random() < 0.125 else 0o644
        mtime = 1_500_000_000 * 10**9 + rng.randrange(10**17)
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(rng.randbytes(size))
        p.chmod(mode)
        os.utime(p, ns=(mtime, mtime))
        out.append((rel, size, mode, mtime))
    return out


def cpu() -> float:
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def timed(run: Callable[[], None]) -> tuple[float, float]:
    w, c = time.perf_counter(), cpu()
    run()
    return time.perf_counter() - w, cpu() - c


def restore(
    src: Path,
    dst: Path,
    tree: list[tuple[str, int, int, int]],
    create: Callable[..., None],
    tree_order: bool = False,
) -> Callable[[], None]:
    """A closure that builds dst from src as the helper does (its directories first, then
    the files in batches, largest first, or in tree order as a restore's placer sends
    them); sources opened beforehand."""
    order = list(tree) if tree_order else sorted(tree, key=lambda t: -t[1])
    fds = [os.open(src / rel, os.O_RDONLY | os.O_CLOEXEC) for rel, *_ in order]

    def run() -> None:
        try:
            dst.mkdir()
            top = os.open(dst, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            dirs: dict[str, int] = {}
            try:
                for rel, *_ in tree:
                    up = rel.rpartition("/")[0]
                    if up not in dirs:
                        os.mkdir(up, 0o755, dir_fd=top)
                        dirs[up] = os.open(
                            up, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=top
                        )
                for i in range(0, len(order), BATCH):
                    jobs: list[fastcopy.Job] = []
                    paths = []
                    for (rel, size, mode, mtime), fd in zip(
                        order[i : i + BATCH], fds[i : i + BATCH], strict=True
                    ):
                        up, _, leaf = rel.rpartition("/")
                        jobs.append((dirs[up], leaf, mode, size, fd, mtime))
                        paths.append(rel)
                    create(jobs, paths)
            finally:
                for d in dirs.values():
                    os.close(d)
                os.close(top)
        finally:
            for fd in fds:
                os.close(fd)

    return run


def bench_open(base: Path, n: int, rounds: int) -> None:
    tree = make_tree(base / "src", n)
    paths = [str(base / "src" / rel) for rel, *_ in tree]
    opens: dict[str, Callable[[Sequence[str]], list[int]]] = {
        "python": fastcopy.twin_open_paths,
        "native": fastcopy.native_open_paths,
    }
    if fastcopy.WHY_NOT_NATIVE:
        print(f"no native runs: {fastcopy.WHY_NOT_NATIVE}")
        del opens["native"]
    got: dict[str, list[tuple[float, float]]] = {x: [] for x in opens}
    for _ in range(rounds):
        for name, open_paths in opens.items():
            fds: list[int] = []

            def run(
                open_paths: Callable[[Sequence[str]], list[int]] = open_paths,
                fds: list[int] = fds,
            ) -> None:
                for i in range(0, len(paths), BATCH):
                    fds.extend(open_paths(paths[i : i + BATCH]))

            got[name].append(timed(run))
            for fd in fds:
                os.close(fd)
    print(f"{n} blobs opened on {base.parent}, {rounds} rounds, {os.cpu_count()} cpus")
    report(got, "python", n, "blob")


Blob = tuple[bytes, bytes, int]
"""(digest, bytes, mtime_ns)"""


def make_blobs(n: int) -> list[Blob]:
    rng = random.Random(13)
    return [
        (
            rng.randbytes(32),
            rng.randbytes(rng.randint(KiB, 16 * KiB)),
            1_500_000_000 * 10**9 + rng.randrange(10**17),
        )
        for _ in range(n)
    ]


def blob_writer(name: str, tier: Tier, blobs: list[Blob]) -> Callable[[], None]:
    """A closure writing `blobs` into `tier` the way `name` says (see the module)."""
    batches = [blobs[i : i + BLOB_BATCH] for i in range(0, len(blobs), BLOB_BATCH)]

    def jobs(batch: Sequence[Blob]) -> list[fastcopy.BlobJob]:
        pid, tid = os.getpid(), threading.get_ident()
        out: list[fastcopy.BlobJob] = []
        for i, (digest, data, mtime) in enumerate(batch):
            scratch = f"{tier.tmp_dir}/{digest.hex()}.{pid}.{tid}.{i}"
            out.append((scratch, tier.blob_file(digest), data, mtime, BLOB_MODE))
        return out

    def whole(batch: Sequence[Blob]) -> None:
        for digest, data, mtime in batch:
            tier.write_whole(digest, data, mtime, durable=False)

    def checked(
        write: Callable[[list[fastcopy.BlobJob]], list[fastcopy.Written | fastcopy.Failed]],
    ) -> Callable[[Sequence[Blob]], None]:
        def run(batch: Sequence[Blob]) -> None:
            if any(len(r) != 3 for r in write(jobs(batch))):
                raise SystemExit(f"{name}: a blob failed")

        return run

    kind, _, how = name.partition(" ")
    one: Callable[[Sequence[Blob]], None]
    if kind == "whole":
        one = whole
    elif kind == "twin":
        one = checked(fastcopy.twin_write_blobs)
    else:
        threads = 2 if how == "x2" else 1
        one = checked(lambda j: fastcopy.native_write_blobs(j, threads))

    def run() -> None:
        if how == "2w":
            with ThreadPoolExecutor(2) as pool:
                list(pool.map(one, batches))
        else:
            for b in batches:
                one(b)

    return run


def report(got: dict[str, list[tuple[float, float]]], ref: str, n: int, what: str) -> None:
    base = statistics.median(w for w, _ in got[ref])
    heads = ("wall ms", "cpu ms", f"wall us/{what}", f"cpu us/{what}", f"{ref}/this", "best ms")
    print(f"{'':12}" + "".join(f" {h:>12}" for h in heads))
    for name, runs in got.items():
        w = statistics.median(x for x, _ in runs)
        c = statistics.median(x for _, x in runs)
        best = min(x for x, _ in runs)
        cells = (w * 1e3, c * 1e3, w / n * 1e6, c / n * 1e6, base / w, best * 1e3)
        print(f"{name:12}" + "".join(f" {x:12.2f}" for x in cells))


def bench_blobs(base: Path, n: int, rounds: int) -> None:
    blobs = make_blobs(n)
    names = ["whole", "whole 2w", "twin", "twin 2w", "native", "native 2w", "native x2"]
    if fastcopy.WHY_NOT_NATIVE:
        print(f"no native runs: {fastcopy.WHY_NOT_NATIVE}")
        names = [x for x in names if not x.startswith("native")]
    got: dict[str, list[tuple[float, float]]] = {x: [] for x in names}
    for r in range(rounds):
        for name in names:
            tier = Tier("bench", base / f"tier-{r}-{name.replace(' ', '')}", 1 << 40)
            tier.prepare()
            got[name].append(timed(blob_writer(name, tier, blobs)))
            shutil.rmtree(tier.root)
    print(f"{n} blobs of 1-16 KiB on {base.parent}, {rounds} rounds, {os.cpu_count()} cpus")
    report(got, "whole", n, "blob")


def bench_files(base: Path, n: int, rounds: int, counts: list[int], tree_order: bool) -> None:
    tree = make_tree(base / "src", n)
    names = ["cp -r", "python x4", "native auto"] + [f"native x{t}" for t in counts]
    got: dict[str, list[tuple[float, float]]] = {x: [] for x in names}
    for r in range(rounds):
        for name in names:
            dst = base / f"dst-{r}-{name.replace(' ', '')}"
            if name == "cp -r":
                cmd = ["cp", "-r", str(base / "src"), str(dst)]

                def cp(cmd: list[str] = cmd) -> None:
                    subprocess.run(cmd, check=True)

                got[name].append(timed(cp))
            elif name.startswith("python"):
                got[name].append(
                    timed(restore(base / "src", dst, tree, fastcopy.twin_create_files, tree_order))
                )
            else:
                t = None if name == "native auto" else int(name.split("x")[1])

                def native(jobs: list[fastcopy.Job], paths: list[str], t: int | None = t) -> None:
                    fastcopy.native_create_files(jobs, paths, threads=t)

                got[name].append(timed(restore(base / "src", dst, tree, native, tree_order)))
            shutil.rmtree(dst)
    how = "tree order" if tree_order else "largest first"
    print(f"{n} files of 1-16 KiB on {base.parent}, {how}, {rounds} rounds, {os.cpu_count()} cpus")
    report(got, "cp -r", n, "file")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--files", type=int, default=10_000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dir", default="/dev/shm")
    ap.add_argument("--threads", default="1,2,4", help="native thread counts to time")
    ap.add_argument("--blobs", action="store_true", help="time write_blobs, not create_files")
    ap.add_argument("--open", action="store_true", help="time open_paths, not create_files")
    ap.add_argument(
        "--tree-order",
        action="store_true",
        help="send the files in tree order (a restore's placer), not largest first",
    )
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="fastcopy-", dir=args.dir))
    try:
        if args.blobs:
            bench_blobs(base, args.files, args.rounds)
        elif args.open:
            bench_open(base, args.files, args.rounds)
        else:
            counts = [int(t) for t in args.threads.split(",")]
            bench_files(base, args.files, args.rounds, counts, args.tree_order)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
