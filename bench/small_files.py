"""Small-file benchmark (issue 11): publish and restore a tree of many small files, as ratios
against `cp -r` / `cp -al` of the same tree in the same run.

    .venv/bin/python bench/small_files.py [--files N | --scale] [--fs tmpfs|ext4|both|none]
        [--rounds 3] [--million] [--json out.json]

The tree is deterministic for a seed: N files of 1-16 KiB of random bytes (about 85 MiB at
10,000; one in eight executable) in directories of 100, plus 20 files of 1 MiB, each file
with its own past mtime (nanoseconds included). On each filesystem (tmpfs, then ext4 on a
loop file where we are root), with source, origin, tier and targets all on it, each of
--rounds interleaved rounds times every operation right after its reference:
  publish       `hostd publish` (CLI, wall time) into a fresh daemon, tier and file:// origin
                vs `cp -r` of the tree                               target: ratio >= 0.5
  cold copy     `hostd restore --mode copy` (CLI, wall time) from a fresh daemon with empty
                tiers, the origin populated, vs `cp -r`               target: ratio >= 0.4
  warm copy     the same restore again from the now-filled tier, vs `cp -r`      >= 0.8
  link          the daemon's own time (`timings.total`) of a `link` restore asked by an
                unprivileged caller (curl as nobody; --link-caller self uses the CLI with
                `[access] link_to_writers = true` instead) vs `cp -al`   >= 0.5 (<= 2x)
Ratios are reference time / hostd time (above 1: hostd was faster); the figure is the median
of the rounds' ratios. After every restore each file's bytes, exec bit and mtime_ns are
compared with the source: mtimes are reported ("mtimes exact: yes/no"), not failed on.

Then, on a fresh daemon: `GET /v1/status` latency over the socket, idle and while a cold and
a warm copy restore run (p99 target: within 3x idle), beside a trivial server in a process of
its own asked alike (what the loaded machine's scheduling alone costs a request), and the
daemon's VmRSS/VmHWM after those runs with the number of chunks it knows (the tiers' blobs),
and its VmRSS at rest, two seconds later (hostd gives freed heap back once idle:
hostd/memory.py).
--files 100000 runs that size instead; --scale runs 10,000 and 100,000 and checks that every
operation took at most 12x its 10,000-file time. --million (optional, slow) publishes
snapshots of tiny distinct files into one daemon until it knows 1,000,000 chunks, restarts
it, and reports its RSS (target < 300 MiB), start time and status latency (about 10 GiB of
tmpfs; `--fs none --million` runs only that).
Benchmarks are not tests: nothing here fails on a timing. Record results in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import blake3

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # (run from a checkout)
from hostd.memory import IDLE_DELAY

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from harness import Hostd, compile_bytecode, request

ROOT = Path(__file__).resolve().parent.parent
KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
NOBODY = 65534
AS_NOBODY = ("setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups")
REF = "bench/small"

# operation -> (reference it is measured against, least ratio reference/hostd that meets it)
TARGETS: dict[str, tuple[str, float]] = {
    "publish": ("cp -r", 0.5),
    "cold_copy": ("cp -r", 0.4),
    "warm_copy": ("cp -r", 0.8),
    "link": ("cp -al", 0.5),
}
SCALE_LIMIT = 12.0  # at 100,000 files each operation within 12x its 10,000-file time
STATUS_LIMIT = 3.0  # status p99 during a restore within 3x its idle p99
RSS_LIMIT = 300 * MiB  # with a million known chunks
MILLION = 1_000_000


class BenchError(Exception):
    pass


# -- the tree ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    path: str
    size: int
    mode: int
    mtime_ns: int
    digest: bytes  # BLAKE3 of the content


def make_tree(
    root: Path, files: int, big: int = 20, seed: int = 11, tiny: bool = False
) -> list[Entry]:
    """Write the tree; return what each file must be. Deterministic for (files, big, seed).

    `tiny`: 16-80 byte files and no big ones (for --million: a chunk each, little memory)."""
    rng = random.Random(seed)
    root.mkdir(parents=True)
    exts = (".py", ".pyc", ".so", ".json", ".bin", ".cubin", ".txt", "")
    base_ns = 1_500_000_000 * 10**9  # 2017-07-14; mtimes fall in the ~3 years after
    entries = []
    specs: list[tuple[str, int, int]] = []
    for i in range(files):
        size = rng.randint(16, 80) if tiny else rng.randint(KiB, 16 * KiB)
        mode = 0o755 if rng.random() < 0.125 else 0o644
        specs.append(
            (f"d{i // 10000:02d}/s{i // 100 % 100:02d}/f{i:06d}{rng.choice(exts)}", size, mode)
        )
    for j in range(0 if tiny else big):
        specs.append((f"big/blob-{j:02d}.bin", MiB, 0o644))
    made: set[str] = set()
    for path, size, mode in specs:
        data = rng.randbytes(size)
        mtime_ns = base_ns + rng.randrange(0, 3 * 365 * 86400 * 10**9)
        p = root / path
        if path.rsplit("/", 1)[0] not in made:
            p.parent.mkdir(parents=True, exist_ok=True)
            made.add(path.rsplit("/", 1)[0])
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        try:
            os.write(fd, data)
            os.fchmod(fd, mode)
        finally:
            os.close(fd)
        os.utime(p, ns=(mtime_ns, mtime_ns))
        entries.append(Entry(path, size, mode, mtime_ns, blake3.blake3(data).digest()))
    return entries


@dataclass
class Check:
    files_ok: bool = True  # the same set of files, each with the source's bytes
    exec_ok: bool = True  # exec bits as in the source
    mtimes_exact: int = 0  # files whose mtime_ns equals the source's
    total: int = 0
    first_problem: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "files_ok": self.files_ok,
            "exec_ok": self.exec_ok,
            "mtimes_exact": self.mtimes_exact,
            "files": self.total,
            "first_problem": self.first_problem,
        }


def check_tree(target: Path, entries: list[Entry]) -> Check:
    c = Check(total=len(entries))

    def bad(what: str) -> None:
        c.first_problem = c.first_problem or what

    seen = 0
    for e in entries:
        p = target / e.path
        try:
            st = os.stat(p, follow_symlinks=False)
            data = p.read_bytes()
        except OSError as exc:
            c.files_ok = False
            bad(f"{e.path}: {exc}")
            continue
        seen += 1
        if blake3.blake3(data).digest() != e.digest:
            c.files_ok = False
            bad(f"{e.path}: content differs")
        if bool(st.st_mode & 0o111) != bool(e.mode & 0o111):
            c.exec_ok = False
            bad(f"{e.path}: exec bit {oct(st.st_mode & 0o777)} vs {oct(e.mode)}")
        if st.st_mtime_ns == e.mtime_ns:
            c.mtimes_exact += 1
    extra = sum(len(names) for _, _, names in os.walk(target)) - seen
    if extra:
        c.files_ok = False
        bad(f"{extra} files that are not in the source")
    return c


# -- helpers -----------------------------------------------------------------------------------


def rm(*paths: Path) -> None:
    for p in paths:
        shutil.rmtree(p, ignore_errors=True)


def timed(cmd: list[str] | tuple[str, ...]) -> float:
    t = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - t
    if out.returncode != 0:
        raise BenchError(f"{' '.join(cmd)} exited {out.returncode}: {out.stderr.strip()}")
    return elapsed


def hostd_cli(sock: Path, *args: str) -> tuple[float, dict[str, Any]]:
    """Run `hostd ARGS --socket SOCK --json` as this user; (wall seconds, its JSON result)."""
    cmd = [sys.executable, "-m", "hostd", *args, "--socket", str(sock), "--json"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("HOSTD_SOCKET", None)
    t = time.perf_counter()
    # (from ROOT: `-m` puts the working directory, which may be another checkout, first)
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False, cwd=ROOT)
    elapsed = time.perf_counter() - t
    if out.returncode != 0:
        raise BenchError(f"hostd {' '.join(args)} exited {out.returncode}: {out.stderr.strip()}")
    result: dict[str, Any] = json.loads(out.stdout)
    return elapsed, result


def curl_as_nobody(sock: Path, path: str, body: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    """POST a long operation with curl run as nobody; (wall seconds, its result event)."""
    cmd = [*AS_NOBODY, "curl", "-sSN", "--unix-socket", str(sock), "-X", "POST"]
    cmd += ["-H", "Content-Type: application/json", "-d", json.dumps(body), f"http://hostd{path}"]
    t = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - t
    lines = [json.loads(x) for x in out.stdout.splitlines() if x.strip()]
    if out.returncode != 0 or not lines or lines[-1].get("event") != "result":
        raise BenchError(f"restore as nobody failed ({out.returncode}): {out.stderr} {lines[-1:]}")
    last: dict[str, Any] = lines[-1]
    return elapsed, last


def rss(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) in bytes."""
    vals = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            k, v = line.split(":")
            vals[k] = int(v.split()[0]) * KiB
    return vals["VmRSS"], vals["VmHWM"]


def reset_peak(pid: int) -> bool:
    """Start VmHWM afresh at VmRSS (proc(5), clear_refs "5"); whether it could."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def known_chunks(d: Hostd) -> int:
    status, body = d.api("GET", "/v1/status")
    if status != 200:
        raise BenchError(f"status answered {status}: {body}")
    return sum(int(t["blobs"]) for t in body["tiers"])


def status_once(sock: Path) -> float:
    t = time.perf_counter()
    status, body = request(sock, "GET", "/v1/status", timeout=120)
    elapsed = time.perf_counter() - t
    if status != 200:
        raise BenchError(f"status answered {status}: {body}")
    return elapsed


def pct(xs: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    s = sorted(xs)
    return s[max(0, math.ceil(p / 100 * len(s)) - 1)]


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * KiB
    return 0


# -- one filesystem, one size ------------------------------------------------------------------


@dataclass
class Place:
    """Where one run keeps everything: source, origin, daemons (tier, index, socket), targets."""

    base: Path
    link_caller: str  # "nobody" (curl as nobody) or "self" (the CLI, with link_to_writers)

    def daemon(self, name: str, access: dict[str, Any] | None = None, **config: Any) -> Hostd:
        root = self.base / name
        rm(root)
        root.mkdir()
        os.chmod(root, 0o755)  # nobody must reach the socket
        access = {
            **({"link_to_writers": True} if self.link_caller == "self" else {}),
            **(access or {}),
        }
        return Hostd(
            root,
            origin=f"file://{self.base / 'origin'}",
            tiers=[{"name": "mem", "path": str(root / "tier"), "budget": "500GiB"}],
            log_level="info",
            socket_mode="0666",
            access=access,
            **config,
        )


class Rounds:
    """Each operation's per-round figures."""

    def __init__(self) -> None:
        self.t: dict[str, list[float]] = {}
        self.ref: dict[str, list[float]] = {}
        self.extra: dict[str, list[dict[str, Any]]] = {}
        self.checks: dict[str, list[Check]] = {}

    def add(self, op: str, t: float, ref: float, extra: dict[str, Any] | None = None) -> None:
        self.t.setdefault(op, []).append(t)
        self.ref.setdefault(op, []).append(ref)
        self.extra.setdefault(op, []).append(extra or {})

    def check(self, op: str, c: Check) -> None:
        self.checks.setdefault(op, []).append(c)

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for op, ts in self.t.items():
            refs = self.ref[op]
            ratios = [r / t for r, t in zip(refs, ts, strict=True)]
            ref_name, least = TARGETS[op]
            ratio = statistics.median(ratios)
            checks = self.checks.get(op, [])
            out[op] = {
                "seconds": statistics.median(ts),
                "reference": ref_name,
                "reference_seconds": statistics.median(refs),
                "ratio": ratio,
                "ratio_range": [min(ratios), max(ratios)],
                "target": least,
                "met": ratio >= least,
                "daemon_seconds": statistics.median(
                    x["daemon_timings"]["total"] for x in self.extra[op]
                ),
                "rounds": [
                    {"seconds": t, "reference_seconds": r, **x}
                    for t, r, x in zip(ts, refs, self.extra[op], strict=True)
                ],
                "checks": [c.to_json() for c in checks],
                "files_ok": all(c.files_ok for c in checks),
                "exec_ok": all(c.exec_ok for c in checks),
                "mtimes_exact": bool(checks) and all(c.mtimes_exact == c.total for c in checks),
            }
        return out


def run_size(place: Place, files: int, rounds: int) -> dict[str, Any]:
    base = place.base
    src, origin, out, ref = base / "src", base / "origin", base / "out", base / "ref"
    home = base / "home"  # where the unprivileged caller may make its tree
    t = time.perf_counter()
    entries = make_tree(src, files)
    res: dict[str, Any] = {
        "files": len(entries),
        "bytes": sum(e.size for e in entries),
        "executable": sum(1 for e in entries if e.mode & 0o111),
        "make_tree_seconds": time.perf_counter() - t,
        "load_start": load(),
    }
    print(f"  tree: {len(entries)} files, {res['bytes'] / MiB:.1f} MiB", flush=True)
    home.mkdir()
    os.chown(home, NOBODY, NOBODY)
    r = Rounds()
    cli_start: list[float] = []
    for n in range(rounds):
        # publish: a fresh daemon, tier and origin, so each one does the whole job
        rm(origin)
        with place.daemon("pub") as d:
            cli_start.append(hostd_cli(d.socket, "status")[0])
            t_ref = timed(["cp", "-r", str(src), str(ref)])
            rm(ref)
            t_pub, pub = hostd_cli(d.socket, "publish", str(src), "--ref", REF)
            r.add("publish", t_pub, t_ref, {"daemon_timings": pub["timings"]})
        rm(base / "pub")
        # cold copy: a fresh daemon with empty tiers, the origin populated
        with place.daemon("rest") as d:
            assert d.proc is not None
            t_ref = timed(["cp", "-r", str(src), str(ref)])
            rm(ref)
            t, got = hostd_cli(d.socket, "restore", REF, str(out), "--mode", "copy")
            r.add("cold_copy", t, t_ref, {"daemon_timings": got["timings"]})
            r.check("cold_copy", check_tree(out, entries))
            rm(out)
            # warm copy: the same daemon, its tier now filled
            t_ref = timed(["cp", "-r", str(src), str(ref)])
            rm(ref)
            t, got = hostd_cli(d.socket, "restore", REF, str(out), "--mode", "copy")
            r.add("warm_copy", t, t_ref, {"daemon_timings": got["timings"]})
            r.check("warm_copy", check_tree(out, entries))
            rm(out)
            # link: the daemon's own time against cp -al
            t_ref = timed(["cp", "-al", str(src), str(ref)])
            rm(ref)
            target = home / "out"
            if place.link_caller == "nobody":
                wall, got = curl_as_nobody(
                    d.socket, "/v1/restore", {"ref": REF, "target": str(target), "mode": "link"}
                )
            else:
                wall, got = hostd_cli(d.socket, "restore", REF, str(target), "--mode", "link")
            if got["linked"] == 0:
                raise BenchError(f"the link restore linked nothing: {got}")
            r.add(
                "link",
                got["timings"]["total"],
                t_ref,
                {
                    "wall": wall,
                    "linked": got["linked"],
                    "copied": got["copied"],
                    "daemon_timings": got["timings"],
                },
            )
            r.check("link", check_tree(target, entries))
            rm(target)
        rm(base / "rest")
        print(f"  round {n + 1}/{rounds} done (load {load()})", flush=True)
    res["ops"] = r.summary()
    res["cli_status_seconds"] = statistics.median(cli_start)
    res.update(status_and_rss(place, entries))
    res["load_end"] = load()
    rm(src, origin, home, ref, out)
    return res


def probe_status(
    sock: Path, during: Callable[[], Any], reference: Path | None = None
) -> tuple[list[float], list[float], Any]:
    """Ask for status back to back (5 ms apart) while `during` runs, and as often of the
    `reference` server, half way between: both latencies and `during`'s result."""
    lat: list[float] = []
    ref: list[float] = []
    done = threading.Event()
    errors: list[BaseException] = []

    def loop() -> None:
        try:
            while not done.is_set():
                lat.append(status_once(sock))
                done.wait(0.0025)
                if reference is not None:
                    ref.append(status_once(reference))
                done.wait(0.0025)
        except BaseException as e:  # reported after the restore
            errors.append(e)

    th = threading.Thread(target=loop, daemon=True)
    th.start()
    try:
        result = during()
    finally:
        done.set()
        th.join()
    if errors:
        raise BenchError(f"status failed during a restore: {errors[0]!r}")
    return lat, ref, result


# The reference for status latency: a trivial server in a process of its own, answering a
# body of the same size from memory, asked in the same way under the same load. What the
# machine's scheduling alone costs a request while a restore keeps both cores busy.
REFERENCE_SERVER = r"""
import socket, sys
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.bind(sys.argv[1])
sock.listen(128)
body = b'{"x": "' + b"y" * max(0, int(sys.argv[2]) - 10) + b'"}'
answer = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n" % len(
    body
) + b"Connection: close\r\n\r\n" + body
print("ready", flush=True)
while True:
    conn, _ = sock.accept()
    with conn:
        head = b""
        while b"\r\n\r\n" not in head:
            got = conn.recv(8192)
            if not got:
                break
            head += got
        conn.sendall(answer)
"""


@contextlib.contextmanager
def reference_server(path: Path, size: int) -> Iterator[Path]:
    proc = subprocess.Popen(
        [sys.executable, "-c", REFERENCE_SERVER, str(path), str(size)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "ready":
            raise BenchError("the reference status server did not start")
        yield path
    finally:
        proc.kill()
        proc.wait()
        path.unlink(missing_ok=True)


def status_and_rss(place: Place, entries: list[Entry]) -> dict[str, Any]:
    """Status latency idle and during cold and warm copy restores, beside a reference server
    asked alike; RSS and known chunks after."""
    out = place.base / "out"
    res: dict[str, Any] = {}
    with place.daemon("probe") as d:
        assert d.proc is not None
        pid = d.proc.pid
        size = len(json.dumps(d.api("GET", "/v1/status")[1]))
        with reference_server(place.base / "ref.sock", size) as ref_sock:
            for _ in range(20):  # warm up the connection path
                status_once(d.socket)
                status_once(ref_sock)
            idle = [status_once(d.socket) for _ in range(300)]
            ref_idle = [status_once(ref_sock) for _ in range(300)]
            res["rss_idle"] = rss(pid)[0]
            lats, refs = {}, {}
            for kind in ("cold", "warm"):
                lats[kind], refs[kind], _ = probe_status(
                    d.socket,
                    lambda: hostd_cli(d.socket, "restore", REF, str(out), "--mode", "copy"),
                    ref_sock,
                )
                rm(out)
        target = place.base / "home" / "out"
        if place.link_caller == "nobody":
            curl_as_nobody(
                d.socket, "/v1/restore", {"ref": REF, "target": str(target), "mode": "link"}
            )
        else:
            hostd_cli(d.socket, "restore", REF, str(target), "--mode", "link")
        rm(target)
        vm_rss, vm_hwm = rss(pid)
        chunks = known_chunks(d)
        rest = rss_at_rest(pid)
    rm(place.base / "probe")
    idle_p99 = pct(idle, 99)
    res["status"] = {
        "idle": {"p50": pct(idle, 50), "p99": idle_p99, "n": len(idle)},
        "reference_idle": {"p50": pct(ref_idle, 50), "p99": pct(ref_idle, 99)},
        **{
            kind: {
                "p50": pct(lat, 50),
                "p99": pct(lat, 99),
                "max": max(lat),
                "n": len(lat),
                "ratio_p99": pct(lat, 99) / idle_p99,
                "met": pct(lat, 99) <= STATUS_LIMIT * idle_p99,
                "reference_p99": pct(refs[kind], 99),
            }
            for kind, lat in lats.items()
        },
    }
    res["rss"] = {
        "idle": res.pop("rss_idle"),
        "after": vm_rss,
        "rest": rest,
        "peak": vm_hwm,
        "known_chunks": chunks,
    }
    return res


def rss_at_rest(pid: int) -> int:
    """VmRSS once the daemon has been idle long enough to give freed heap back
    (hostd/memory.py: a second after the last operation)."""
    time.sleep(IDLE_DELAY + 1.0)
    return rss(pid)[0]


# -- --million -----------------------------------------------------------------------------------


def run_million(place: Place, per_snapshot: int, chunks: int = MILLION) -> dict[str, Any]:
    """Publish snapshots of tiny distinct files until the daemon knows `chunks` chunks (a
    million), then restart it and measure what that many known chunks cost it."""
    base = place.base
    n_snap = math.ceil(chunks / per_snapshot)
    res: dict[str, Any] = {"snapshots": n_snap, "files_each": per_snapshot, "load_start": load()}
    rm(base / "origin")
    d = place.daemon("million")
    pub_times, peaks = [], []
    with d:
        assert d.proc is not None
        for i in range(n_snap):
            src = base / "msrc"
            make_tree(src, per_snapshot, seed=1000 + i, tiny=True)
            each = reset_peak(d.proc.pid)  # (else VmHWM is the peak of all publishes so far)
            t, _ = hostd_cli(d.socket, "publish", str(src), "--ref", f"bench/million-{i}")
            pub_times.append(t)
            rm(src)
            now, peak = rss(d.proc.pid)
            peaks.append(peak)
            print(
                f"  snapshot {i + 1}/{n_snap}: publish {t:.1f} s, RSS {now / MiB:.0f} MiB, "
                f"peak {peak / MiB:.0f} MiB{'' if each else ' (of all publishes so far)'}",
                flush=True,
            )
        res["rss_publishing"] = {"after": rss(d.proc.pid)[0], "peak": max(peaks), "each": peaks}
        res["rss_publishing"]["rest"] = rss_at_rest(d.proc.pid)
        res["known_chunks"] = known_chunks(d)
    res["publish_seconds"] = pub_times
    # a fresh start on the same index and tier: what a restarted host carries
    t = time.perf_counter()
    d.start(timeout=600)  # the tier scan and index load of a million chunks take a while
    try:
        res["start_seconds"] = time.perf_counter() - t
        assert d.proc is not None
        pid = d.proc.pid
        res["rss_after_start"] = rss(pid)[0]
        res["rss_after_start_rest"] = rss_at_rest(pid)  # (the start's load is trimmed too)
        for _ in range(20):
            status_once(d.socket)
        idle = [status_once(d.socket) for _ in range(100)]
        out = base / "out"
        lat, _, (t_restore, _) = probe_status(
            d.socket,
            lambda: hostd_cli(d.socket, "restore", "bench/million-0", str(out), "--mode", "copy"),
        )
        rm(out)
        vm_rss, vm_hwm = rss(pid)
        res["known_chunks_after_start"] = known_chunks(d)
        res["rss_rest"] = rss_at_rest(pid)
    finally:
        d.close()
    res["warm_copy_seconds"] = t_restore
    res["status"] = {"idle_p99": pct(idle, 99), "during_restore_p99": pct(lat, 99), "n": len(lat)}
    res["rss"] = {"after": vm_rss, "peak": vm_hwm, "met": vm_hwm < RSS_LIMIT}
    res["load_end"] = load()
    rm(base / "million", base / "origin")
    return res


# -- filesystems -----------------------------------------------------------------------------------


@contextlib.contextmanager
def tmpfs_place(parent: Path) -> Iterator[Path]:
    base = Path(tempfile.mkdtemp(prefix="hsf", dir=parent))
    os.chmod(base, 0o755)
    try:
        yield base
    finally:
        rm(base)


def ext4_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "not root: cannot make a loop device and mount ext4"
    for tool in ("mkfs.ext4", "losetup", "mount", "umount"):
        if shutil.which(tool) is None:
            return f"{tool} not found"
    if not Path("/dev/loop-control").exists():
        return "no /dev/loop-control"
    return None


def sh(*cmd: str, env: dict[str, str] | None = None) -> str:
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise BenchError(f"{' '.join(cmd)} exited {out.returncode}: {out.stderr.strip()}")
    return out.stdout.strip()


def unmount(mnt: Path) -> None:
    for _ in range(10):
        if subprocess.run(["umount", str(mnt)], capture_output=True, check=False).returncode == 0:
            return
        time.sleep(0.5)  # a daemon's helper still closing
    subprocess.run(["umount", "-l", str(mnt)], check=False)


@contextlib.contextmanager
def ext4_place(image_dir: Path, size: int, inodes: int) -> Iterator[Path]:
    """A fresh ext4 on a loop file under image_dir, mounted for the run; all undone after."""
    with contextlib.ExitStack() as stack:
        work = Path(tempfile.mkdtemp(prefix="hsf-ext4-", dir=image_dir))
        stack.callback(rm, work)
        os.chmod(work, 0o755)  # nobody must reach the socket under mnt/
        image = work / "fs.img"
        with open(image, "wb") as f:
            f.truncate(size)
        # initialise the inode tables and journal now, so no ext4lazyinit thread writes
        # during the run
        sh(
            "mkfs.ext4",
            "-q",
            "-F",
            "-N",
            str(inodes),
            "-E",
            "lazy_itable_init=0,lazy_journal_init=0",
            str(image),
        )
        loop = sh("losetup", "--find", "--show", str(image))
        stack.callback(sh, "losetup", "-d", loop)
        mnt = work / "mnt"
        mnt.mkdir()
        sh("mount", "-t", "ext4", loop, str(mnt))
        stack.callback(unmount, mnt)
        os.chmod(mnt, 0o755)
        yield mnt


# -- report ------------------------------------------------------------------------------------

OP_NAMES = {
    "publish": "publish",
    "cold_copy": "cold copy restore (file:// origin)",
    "warm_copy": "warm copy restore",
    "link": "link restore (daemon's timings.total)",
}


def fmt_s(x: float) -> str:
    return f"{x * 1000:.0f} ms" if x < 1 else f"{x:.2f} s"


def yes(ok: bool) -> str:
    return "yes" if ok else "**no**"


def ops_table(runs: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| fs | files | operation | hostd | daemon's own | reference | ratio (range) | target "
        "| met | mtimes exact |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for run in runs:
        for op, o in run["ops"].items():
            lo, hi = o["ratio_range"]
            mt = "-" if op == "publish" else ("yes" if o["mtimes_exact"] else "no")
            if op != "publish" and not (o["files_ok"] and o["exec_ok"]):
                mt += " (TREE DIFFERS)"
            lines.append(
                f"| {run['fs']} | {run['files']:,} | {OP_NAMES[op]} | {fmt_s(o['seconds'])} "
                f"| {fmt_s(o['daemon_seconds'])} "
                f"| {o['reference']} {fmt_s(o['reference_seconds'])} "
                f"| {o['ratio']:.2f}x ({lo:.2f}-{hi:.2f}) | >= {o['target']}x | {yes(o['met'])} "
                f"| {mt} |"
            )
    return lines


def status_table(runs: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| fs | files | status p99 idle | during cold copy | during warm copy | met (<= 3x) "
        "| reference server p99: idle / cold / warm "
        "| daemon RSS after / at rest / peak | known chunks |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for run in runs:
        s, m = run["status"], run["rss"]
        during = [
            f"{s[k]['p99'] * 1000:.1f} ms ({s[k]['ratio_p99']:.1f}x, n={s[k]['n']})"
            for k in ("cold", "warm")
        ]
        ref = [s["reference_idle"]["p99"], s["cold"]["reference_p99"], s["warm"]["reference_p99"]]
        lines.append(
            f"| {run['fs']} | {run['files']:,} | {s['idle']['p99'] * 1000:.1f} ms "
            f"| {during[0]} | {during[1]} | {yes(s['cold']['met'] and s['warm']['met'])} "
            f"| {' / '.join(f'{x * 1000:.1f}' for x in ref)} ms "
            f"| {m['after'] / MiB:.0f} / {m['rest'] / MiB:.0f} / {m['peak'] / MiB:.0f} MiB "
            f"| {m['known_chunks']:,} |"
        )
    return lines


def scale_table(scale: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| fs | operation | 10,000 files | 100,000 files | factor | target | met |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for s in scale:
        lines.append(
            f"| {s['fs']} | {OP_NAMES.get(s['op'], s['op'])} | {fmt_s(s['small'])} "
            f"| {fmt_s(s['large'])} | {s['factor']:.1f}x | <= {SCALE_LIMIT:.0f}x "
            f"| {yes(s['met']) if not s['op'].startswith('(') else '-'} |"
        )
    return lines


def scale_rows(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    by = {(r["fs"], r["files_asked"]): r for r in runs}
    for (fs, n), small in by.items():
        large = by.get((fs, n * 10))
        if large is None:
            continue
        for op in small["ops"]:
            a, b = small["ops"][op]["seconds"], large["ops"][op]["seconds"]
            rows.append({"fs": fs, "op": op, "small": a, "large": b, "factor": b / a})
        for ref, op in (("cp -r", "warm_copy"), ("cp -al", "link")):
            a = small["ops"][op]["reference_seconds"]
            b = large["ops"][op]["reference_seconds"]
            rows.append(
                {"fs": fs, "op": f"(reference) {ref}", "small": a, "large": b, "factor": b / a}
            )
    for row in rows:
        row["met"] = row["factor"] <= SCALE_LIMIT
    return rows


def summary_lines(result: dict[str, Any]) -> list[str]:
    lines = []
    for run in result["runs"]:
        ops = run["ops"]
        restores = [ops[o] for o in ("cold_copy", "warm_copy", "link")]
        same = all(o["files_ok"] and o["exec_ok"] for o in restores)
        lines.append(
            f"{run['fs']} {run['files']:,} files: mtimes exact: "
            f"{'yes' if all(o['mtimes_exact'] for o in restores) else 'no'}; "
            f"trees otherwise identical (bytes, exec bits): {'yes' if same else 'NO'}; "
            f"`hostd status` CLI wall {fmt_s(run['cli_status_seconds'])}; "
            f"load {run['load_start']} -> {run['load_end']}; {run['wall_seconds']:.0f} s"
        )
        bad = [c["first_problem"] for o in restores for c in o["checks"] if c["first_problem"]]
        if bad:
            lines.append(f"  first difference: {bad[0]}")
    m = result.get("million")
    if m:
        lines += [
            f"million: {m['known_chunks']:,} known chunks ({m['known_chunks_after_start']:,} "
            f"after a restart, which took {m['start_seconds']:.1f} s)",
            f"  daemon RSS after the restart {m['rss_after_start'] / MiB:.0f} MiB "
            f"({m.get('rss_after_start_rest', 0) / MiB:.0f} at rest), after a "
            f"restore {m['rss']['after'] / MiB:.0f} MiB ({m['rss_rest'] / MiB:.0f} at rest), "
            f"peak {m['rss']['peak'] / MiB:.0f} MiB (< {RSS_LIMIT // MiB} MiB: "
            f"{'yes' if m['rss']['met'] else 'NO'}); peak while publishing "
            f"{m['rss_publishing']['peak'] / MiB:.0f} MiB (< {RSS_LIMIT // MiB} MiB: "
            f"{'yes' if m['rss_publishing']['peak'] < RSS_LIMIT else 'NO'}; after the last publish "
            f"{m['rss_publishing']['after'] / MiB:.0f}, at rest "
            f"{m['rss_publishing']['rest'] / MiB:.0f} MiB)",
            f"  status p99 idle {m['status']['idle_p99'] * 1000:.1f} ms, during a restore "
            f"{m['status']['during_restore_p99'] * 1000:.1f} ms; {m['wall_seconds']:.0f} s",
        ]
    lines += [f"skipped: {s}" for s in result["skipped"]]
    lines += [f"FAILED: {s}" for s in result["failed"]]
    lines.append(
        f"hostd from {result['hostd_from']}; load average {result['load_start']} -> "
        f"{result['load_end']}; {result['wall_seconds']:.0f} s in all"
    )
    return lines


# -- main ----------------------------------------------------------------------------------------


def _interrupt(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def hostd_from() -> str:
    """Which hostd the daemons and the CLI import (the checkout this script is in), its
    bytecode written first (harness.compile_bytecode: as an install has it)."""
    compile_bytecode()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONSAFEPATH": "1"}  # (not the cwd's)
    code = "import hostd, os; print(os.path.dirname(os.path.dirname(hostd.__file__)))"
    return sh(sys.executable, "-c", code, env=env)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = ap.add_argument
    add("--files", type=int, default=10000, help="small files in the tree (default 10000)")
    add("--scale", action="store_true", help="run at 10,000 and 100,000 files and compare them")
    add("--rounds", type=int, default=3, help="interleaved rounds, the median kept (default 3)")
    add("--fs", choices=("tmpfs", "ext4", "both", "none"), default="both", help="(default both)")
    add("--tmpfs-dir", type=Path, default=Path("/dev/shm"), help="a tmpfs to work in")
    add("--ext4-dir", type=Path, default=Path("/var/tmp"), help="where the ext4 loop file goes")
    add(
        "--link-caller",
        choices=("nobody", "self"),
        default="nobody" if os.geteuid() == 0 else "self",
        help="who asks for links: nobody (curl through setpriv; the default as root) or this "
        "user (the CLI, with [access] link_to_writers = true)",
    )
    add("--million", action="store_true", help="also fill one daemon with 1M chunks (slow)")
    add("--million-per-snapshot", type=int, default=100000, help="files per --million snapshot")
    add("--million-chunks", type=int, default=MILLION, help=argparse.SUPPRESS)  # to try it small
    add("--json", type=Path, help="write the results here")
    args = ap.parse_args()
    if args.link_caller == "nobody" and os.geteuid() != 0:
        ap.error("--link-caller nobody needs root (setpriv)")
    return args


def run_fs(fs: str, n: int, args: argparse.Namespace) -> dict[str, Any]:
    approx = n * 9 * KiB + 20 * MiB  # one copy of the tree, about
    place_cm: contextlib.AbstractContextManager[Path]
    if fs == "tmpfs":
        room = min(shutil.disk_usage(args.tmpfs_dir).free, mem_available())
        if room < 6 * approx:
            raise BenchError(f"{args.tmpfs_dir} or memory has too little room for {n} files")
        place_cm = tmpfs_place(args.tmpfs_dir)
    else:
        # source, origin, tier, a cp copy and a restored tree, with room to spare
        place_cm = ext4_place(args.ext4_dir, max(2 * GiB, 8 * approx), inodes=n * 8 + 20000)
    t0 = time.perf_counter()
    with place_cm as base:
        run = run_size(Place(base, args.link_caller), n, args.rounds)
    run.update(fs=fs, files_asked=n, wall_seconds=time.perf_counter() - t0)
    return run


def main() -> int:
    args = parse_args()
    sizes = [10000, 100000] if args.scale else [args.files]
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGHUP, _interrupt)
    t_all = time.perf_counter()
    result: dict[str, Any] = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "hostd_from": hostd_from(),
        "cores": os.cpu_count(),
        "load_start": load(),
        "link_caller": args.link_caller,
        "runs": [],
        "skipped": [],
        "failed": [],
    }
    for fs in {"both": ["tmpfs", "ext4"], "none": []}.get(args.fs, [args.fs]):
        why = ext4_unavailable() if fs == "ext4" else None
        if why:
            print(f"ext4: skipped ({why})", flush=True)
            result["skipped"].append(f"ext4: {why}")
            continue
        for n in sizes:
            print(f"{fs}, {n:,} files:", flush=True)
            try:
                run = run_fs(fs, n, args)
            except BenchError as e:  # the other runs still count
                print(f"  failed: {e}", flush=True)
                result["failed"].append(f"{fs}, {n} files: {e}")
                continue
            result["runs"].append(run)
            print("\n".join([*ops_table([run]), "", *status_table([run])]), flush=True)
            print(f"  took {run['wall_seconds']:.0f} s", flush=True)
            if args.json:  # so far, in case a later run fails
                args.json.write_text(json.dumps(result, indent=2))
    if args.million:
        need = args.million_chunks * 10 * KiB  # tier and origin: a page and an inode each
        if min(shutil.disk_usage(args.tmpfs_dir).free, mem_available()) < need:
            raise BenchError(f"--million needs about {need / GiB:.0f} GiB free in {args.tmpfs_dir}")
        print(
            f"{args.million_chunks:,} known chunks ({args.million_per_snapshot:,} tiny files a "
            "snapshot, tmpfs):",
            flush=True,
        )
        t0 = time.perf_counter()
        with tmpfs_place(args.tmpfs_dir) as base:
            place = Place(base, args.link_caller)
            m = run_million(place, args.million_per_snapshot, args.million_chunks)
        m["wall_seconds"] = time.perf_counter() - t0
        result["million"] = m
    result["scale"] = scale_rows(result["runs"])
    result["load_end"] = load()
    result["wall_seconds"] = time.perf_counter() - t_all
    report = []
    if result["runs"]:
        report += [*ops_table(result["runs"]), "", *status_table(result["runs"])]
    if result["scale"]:
        report += ["", *scale_table(result["scale"])]
    print("\n" + "\n".join([*report, "", *summary_lines(result)]))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 1 if result["failed"] else 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except BenchError as e:
        print(f"small_files: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        print("small_files: interrupted; cleaned up", file=sys.stderr)
        raise SystemExit(130) from None
