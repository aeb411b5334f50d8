"""Fleet fan-out benchmark: N hosts restoring one snapshot at once, with peers and without.

    .venv/bin/python bench/fanout.py --hosts 8 --size 256MiB \
        --origin-rate 400mbit --host-rate 1gbit [--rounds 1] [--mode link] [--json OUT]
        [--peers-set hedge_after=10s] [--origin-ranges] [--no-reference] [--profile DIR]
        [--broken N]

as root (network namespaces and tc need it; the bench says so and stops otherwise).

Builds a tests/netns.py Cluster (hosts h0..h{N-1} and an origin, each link shaped with tc),
publishes a weights-like snapshot (4 safetensors-like shards and 20 small files of random
bytes) to a file:// origin from a daemon in the root namespace, serves that directory from
the origin's namespace over plain HTTP (python -m http.server, which ignores ranges; with
--origin-ranges a server that answers them, as an object store does), and starts one real
daemon per host namespace with the origin at http://<origin>:<port>, its own tmpfs tier and
`access.link_to_writers`. Then,
per round:
  peers        every host with [peers] (all hosts listed, a shared secret) restores at once;
               timed after every host sees every other live in GET /v1/status
  late host    one host's daemon replaced by a fresh one (empty tier) that restores alone
               while the other N-1 hold the snapshot: its throughput against the host link
  broken       (--broken N) the last N hosts' own origin holds nothing (credentials for
               another bucket): live members that cannot pull what they own; the others
               restore at once, and what the origin sends is the figure
  origin-only  fresh daemons without [peers], every host restoring at once
  reference    the same bytes moved by curl and a sendfile HTTP server on the schedule peers
               aim for (each host pulls 1/N from the origin, then the rest from the others),
               and one host fetching it all from the others: what this machine's CPUs and
               emulated links allow at all, measured between the same runs
For each run: the time until the last host finishes and each host's time, origin egress at
the origin's link (tc-shaped veth counters) and by hostd's metrics, bytes by source per host,
bytes each host uploaded to peers, the daemons' CPU seconds (/proc/<pid>/stat, the daemon and
its children) and the machine's CPU use, and how busy the links were. Targets (issue 10):
origin egress <= 1.2x the snapshot, time-to-all <= 1/4 of origin-only and <= 1.5x
max(S/B_origin, S/B_host), the late host >= 0.8x B_host.

Needs root (network namespaces, tc). Benchmarks are not tests: nothing here fails on a
timing. Record results in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import resource
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))
from harness import Hostd  # noqa: E402
from netns import ORIGIN, Cluster, netns_problem, serve, serve_dir, wait_listening  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from hostd.core.units import parse_size  # noqa: E402

GiB = 1 << 30
MiB = 1 << 20
REF = "bench/fanout"
PEER_PORT = 7460
ORIGIN_PORT = 8080
SAMPLE_EVERY = 0.25  # seconds between link/CPU samples during a run
TICK = os.sysconf("SC_CLK_TCK")
CPUS = os.cpu_count() or 1
SHARDS = 4
SMALL_FILES = 20

# --- units -----------------------------------------------------------------------------------

_RATE = re.compile(r"(\d+(?:\.\d+)?)([kmgt]?)(i?)(bit|bps)", re.IGNORECASE)


def parse_rate(text: str) -> float:
    """Bytes per second from a tc rate: "400mbit", "1gbit", "1.5gibit", "100mbps" (bytes)."""
    m = _RATE.fullmatch(text.strip())
    if m is None:
        raise SystemExit(f"{text!r} is not a tc rate: write e.g. 400mbit, 1gbit or 100mbps")
    prefix = m.group(2).lower()
    scale: int = (1024 if m.group(3) else 1000) ** "_kmgt".index(prefix or "_")
    value = float(m.group(1)) * scale
    return value / 8 if m.group(4).lower() == "bit" else value


# --- the snapshot ----------------------------------------------------------------------------


def make_snapshot(root: Path, size: int, seed: int = 10) -> int:
    """4 shards with ~97% of the bytes and 20 small files (configs, tokenizer); returns the
    file count. Random bytes, so no chunk dedups or compresses."""
    rng = random.Random(seed)
    root.mkdir(parents=True)
    small = [max(1024, min(2 * MiB, size // 400 * (1 + j % 5))) for j in range(SMALL_FILES)]
    shard = (size - sum(small)) // SHARDS
    for i in range(SHARDS):
        left = shard + (size - sum(small) - SHARDS * shard if i == SHARDS - 1 else 0)
        with open(root / f"model-{i + 1:05d}-of-{SHARDS:05d}.safetensors", "wb") as f:
            while left > 0:
                piece = rng.randbytes(min(left, 16 * MiB))
                f.write(piece)
                left -= len(piece)
    names = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"]
    for j, n in enumerate(small):
        sub = root if j < len(names) else root / "extra"
        sub.mkdir(exist_ok=True)
        name = names[j] if j < len(names) else f"part-{j:02d}.bin"
        (sub / name).write_bytes(rng.randbytes(n))
    return SHARDS + SMALL_FILES


def tree_sizes(root: Path) -> dict[str, int]:
    return {
        str(p.relative_to(root)): p.stat().st_size
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


# --- measuring -------------------------------------------------------------------------------


def proc_cpu(pid: int) -> tuple[float, float]:
    """CPU seconds (user, system) of a process, with its reaped children's."""
    text = Path(f"/proc/{pid}/stat").read_text()
    f = [int(x) for x in text[text.rindex(")") + 2 :].split()[11:15]]  # after "pid (comm) "
    return (f[0] + f[2]) / TICK, (f[1] + f[3]) / TICK  # utime + cutime, stime + cstime


def self_cpu() -> float:
    """CPU seconds of this process (the clients reading the restore streams, the sampler)."""
    t = os.times()
    return t.user + t.system


def tree_cpu(pid: int) -> tuple[float, float]:
    """CPU seconds (user, system) of a process and its live descendants (helpers), reaped
    ones included."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            text = (d / "stat").read_text()
        except OSError:
            continue
        ppid = int(text[text.rindex(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(d.name))
    user = system = 0.0
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            u, s = proc_cpu(p)
        except (OSError, ValueError):
            continue
        user, system = user + u, system + s
        todo += children.get(p, [])
    return user, system


CPU_FIELDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")


def machine_cpu() -> list[int]:
    """Jiffies of all CPUs since boot, by CPU_FIELDS (guest time is already in user)."""
    line = Path("/proc/stat").read_text().split("\n", 1)[0]
    return [int(x) for x in line.split()[1 : 1 + len(CPU_FIELDS)]]


def link_counters(cluster: Cluster) -> dict[str, tuple[int, int]]:
    """Every node's (tx, rx) bytes, read at its switch port in one call (port rx = node tx)."""
    out = subprocess.run(
        ["ip", "-n", cluster.ns("sw"), "-j", "-s", "link", "show"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    got: dict[str, tuple[int, int]] = {}
    for link in json.loads(out):
        name = str(link["ifname"]).split("@")[0]
        if name.startswith("p-"):
            st = link["stats64"]
            got[name[2:]] = (int(st["rx"]["bytes"]), int(st["tx"]["bytes"]))
    return got


class Sampler:
    """Samples every node's link counters and the machine's CPU during a run, in a thread."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.samples: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)

    def __enter__(self) -> Sampler:
        self._t0 = time.monotonic()
        self._take()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._take()

    def _take(self) -> None:
        self.samples.append(
            {
                "t": time.monotonic() - self._t0,
                "links": link_counters(self.cluster),
                "cpu": machine_cpu(),
            }
        )

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_EVERY):
            self._take()

    def summary(self, rates: dict[str, float], cpus: int) -> dict[str, Any]:
        """Mean utilisation of each link direction over the run, the share of the run's
        samples in which the origin's uplink ran at >= 90% of its rate, and CPU use."""
        a, b = self.samples[0], self.samples[-1]
        dt = max(b["t"] - a["t"], 1e-9)
        mean = {
            node: {
                "tx": (b["links"][node][0] - a["links"][node][0]) / dt / rates[node],
                "rx": (b["links"][node][1] - a["links"][node][1]) / dt / rates[node],
            }
            for node in a["links"]
        }
        saturated = 0
        for p, q in zip(self.samples, self.samples[1:], strict=False):
            step = q["t"] - p["t"]
            if step > 0:
                sent = q["links"][ORIGIN][0] - p["links"][ORIGIN][0]
                saturated += sent / step >= 0.9 * rates[ORIGIN]
        used = dict(
            zip(CPU_FIELDS, (y - x for x, y in zip(a["cpu"], b["cpu"], strict=True)), strict=True)
        )
        total = max(sum(used.values()), 1)
        busy = 1 - (used["idle"] + used["iowait"]) / total
        return {
            "link_use": mean,
            "origin_saturated_share": saturated / max(len(self.samples) - 1, 1),
            "machine_cpu_busy": busy,
            "machine_cpu_seconds": busy * dt * cpus,
            # where the machine's CPU time went (shares of all CPUs' time over the run)
            "machine_cpu_shares": {k: v / total for k, v in used.items()},
        }


def log_warnings(d: Hostd, offset: int) -> list[str]:
    """The daemon's warning and error lines logged after byte `offset` of its log."""
    with open(d.log_path, "rb") as f:
        f.seek(offset)
        lines = f.read().decode(errors="replace").splitlines()
    return [x for x in lines if "level=warning" in x or "level=error" in x]


def metric_sums(h: Hostd) -> dict[str, float]:
    """The counters this bench reads from one daemon's /metrics."""
    want = {
        ("hostd_origin_bytes_total", "in"): "origin_in",
        ("hostd_peer_served_bytes_total", None): "served",
        ("hostd_origin_saved_bytes_total", None): "saved",
        ("hostd_peer_hedges_total", "started"): "hedges",
        ("hostd_peer_strikes_total", None): "strikes",
    }
    out = dict.fromkeys(want.values(), 0.0)
    for fam in text_string_to_metric_families(h.metrics()):
        for s in fam.samples:
            label = s.labels.get("direction") or s.labels.get("result")
            key = want.get((s.name, label)) or want.get((s.name, None))
            if key is not None:
                out[key] += s.value
    return out


# --- the fleet -------------------------------------------------------------------------------


@dataclass
class Setup:
    cluster: Cluster
    work: Path
    origin_url: str
    key: Path
    size: int
    budget: int
    mode: str
    logs: Path  # daemons' logs are copied here before their roots are deleted
    origin_pid: int  # the origin's HTTP server
    reference: bool = True  # also time the stock-tools reference each round
    peers_extra: dict[str, str | int] | None = None  # more [peers] keys (--peers-set)
    profile: Path | None = None  # py-spy's collapsed stacks of every daemon in every run
    broken: int = 0  # hosts whose own origin holds nothing (--broken), in a run of their own

    def peer_addr(self, host: str) -> str:
        return f"{self.cluster.addr(host)}:{PEER_PORT}"

    def daemon(self, host: str, name: str, peers: bool, broken: bool = False) -> Hostd:
        """A daemon in `host`'s namespace with an empty tier of its own under `name`;
        `broken`: its origin is a prefix of the origin's server that holds nothing (a host
        whose credentials name another bucket)."""
        root = self.work / name
        config: dict[str, Any] = {
            "origin": f"{self.origin_url}/no-such-bucket" if broken else self.origin_url,
            "tiers": [{"name": "mem", "path": str(root / "mem"), "budget": self.budget}],
            "access": {"link_to_writers": True},
            "log_level": "info",
        }
        if peers:
            config["peers"] = {
                "listen": self.peer_addr(host),
                "static": [self.peer_addr(h) for h in self.cluster.hosts],
                "secret_file": str(self.key),
                **(self.peers_extra or {}),
            }
        return Hostd(root, wrap=["ip", "netns", "exec", self.cluster.ns(host)], **config)


def start_all(daemons: list[Hostd]) -> None:
    with ThreadPoolExecutor(len(daemons)) as ex:
        list(ex.map(lambda d: d.start(timeout=60), daemons))
    for d in daemons:
        assert d.proc is not None
        cmd = Path(f"/proc/{d.proc.pid}/cmdline").read_bytes().split(b"\0")
        # `ip netns exec` execs the daemon: the pid we hold is the daemon's own
        if b"hostd" not in cmd or b"serve" not in cmd:
            raise RuntimeError(f"pid {d.proc.pid} is not the daemon: {cmd!r}")


def wait_all_live(daemons: list[Hostd], addrs: list[str], timeout: float = 60.0) -> float:
    """Poll until every daemon sees every listed address live (or as itself); seconds taken."""
    t0 = time.monotonic()
    deadline = t0 + timeout
    pending = list(daemons)
    while pending:
        d = pending[0]
        code, st = d.api("GET", "/v1/status")
        peers = st.get("peers", {}) if isinstance(st, dict) else {}
        states = {m["address"]: m["state"] for m in peers.get("members", [])}
        if code == 200 and all(states.get(a) in ("live", "self") for a in addrs):
            pending.pop(0)
            continue
        if time.monotonic() > deadline:
            raise TimeoutError(f"{d.root.name} sees {states} after {timeout}s, wants all live")
        time.sleep(0.05)
    return time.monotonic() - t0


@contextmanager
def profiled(s: Setup, pids: list[int], names: list[str]) -> Iterator[None]:
    """With --profile: py-spy samples each daemon (its Python stacks, as collapsed stacks
    with native frames) and, where perf is installed, `perf record -a` the whole machine
    (which process, library and kernel function the CPU time went to) for the duration;
    both stopped with SIGINT, which makes them write."""
    if s.profile is None:
        yield
        return
    spies: list[tuple[str, subprocess.Popen[bytes]]] = []
    quiet, pipe = subprocess.DEVNULL, subprocess.PIPE
    if shutil.which("perf") is not None:
        out = s.profile / f"{names[0].rsplit('-', 1)[0]}.perf.data"
        argv = ["perf", "record", "-a", "-F", "499", "-o", str(out)]
        spies.append(("perf", subprocess.Popen(argv, stdout=quiet, stderr=pipe)))
    for pid, name in zip(pids, names, strict=True):
        out = s.profile / f"{name}.txt"
        argv = ["py-spy", "record", "--pid", str(pid), "--rate", "50"]
        argv += ["--native", "--format", "raw", "--output", str(out)]
        spies.append(("py-spy", subprocess.Popen(argv, stdout=quiet, stderr=pipe)))
    time.sleep(1.0)  # py-spy attaches (no readiness signal; only used when profiling)
    try:
        yield
    finally:
        for _, p in spies:
            p.send_signal(signal.SIGINT)
        for tool, p in spies:
            _, err = p.communicate(timeout=60)
            if p.returncode not in (0, -signal.SIGINT):
                print(f"{tool} exited {p.returncode}: {err.decode()[-300:]}", file=sys.stderr)


@contextmanager
def running(daemons: list[Hostd]) -> Iterator[list[Hostd]]:
    try:
        start_all(daemons)
        yield daemons
    finally:
        for d in daemons:
            d.close()


def restore_at_once(
    s: Setup, daemons: list[Hostd], hosts: list[str], run: str, sizes: dict[str, int]
) -> dict[str, Any]:
    """All `daemons` restore the snapshot at once; their figures and the cluster's."""
    cluster = s.cluster
    pids = [d.proc.pid for d in daemons if d.proc is not None]
    before_m = [metric_sums(d) for d in daemons]
    log_at = [d.log_path.stat().st_size for d in daemons]
    before_cpu = [tree_cpu(p) for p in pids]
    others0 = sum(proc_cpu(s.origin_pid)), self_cpu()
    origin_tx0 = cluster.tx_bytes(ORIGIN)
    load = Path("/proc/loadavg").read_text().split()[:3]
    barrier = threading.Barrier(len(daemons) + 1)
    ends: list[float] = [0.0] * len(daemons)
    outs: list[dict[str, Any]] = [{}] * len(daemons)

    def one(i: int) -> None:
        d = daemons[i]
        target = s.work / f"{run}-t-{hosts[i]}"
        body = {"ref": REF, "target": str(target), "mode": s.mode}
        barrier.wait()
        try:
            outs[i] = d.stream("/v1/restore", body, timeout=900)
        except Exception as e:  # a failed host is reported, not fatal to the others' figures
            outs[i] = {"event": "error", "message": f"{type(e).__name__}: {e}"}
        ends[i] = time.monotonic()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(daemons))]
    for t in threads:
        t.start()
    with profiled(s, pids, [f"{run}-{h}" for h in hosts]), Sampler(cluster) as sampler:
        barrier.wait()
        t0 = time.monotonic()
        for t in threads:
            t.join()
    origin_tx = cluster.tx_bytes(ORIGIN) - origin_tx0
    after_cpu = [tree_cpu(p) for p in pids]
    others1 = sum(proc_cpu(s.origin_pid)), self_cpu()
    after_m = [metric_sums(d) for d in daemons]
    rates = {h: parse_rate(cluster.host_rate or "0bit") for h in cluster.hosts}
    rates[ORIGIN] = parse_rate(cluster.origin_rate or "0bit")
    per_host = []
    for i, h in enumerate(hosts):
        out = outs[i]
        ok = out.get("event") == "result"
        if ok and tree_sizes(s.work / f"{run}-t-{h}") != sizes:
            ok, out = False, {**out, "message": "restored tree differs from the source"}
        m = {k: after_m[i][k] - before_m[i][k] for k in after_m[i]}
        warnings = log_warnings(daemons[i], log_at[i])
        per_host.append(
            {
                "host": h,
                "pid": pids[i],
                "ok": ok,
                "error": None if ok else out.get("message", out),
                "seconds": ends[i] - t0,
                "bytes_by_source": out.get("bytes_by_source", {}),
                "timings": out.get("timings", {}),
                "uploaded": m["served"],
                "origin_in": m["origin_in"],
                "hedges": m["hedges"],
                "strikes": m["strikes"],
                "cpu_s": sum(after_cpu[i]) - sum(before_cpu[i]),
                "cpu_sys_s": after_cpu[i][1] - before_cpu[i][1],
                "warnings": len(warnings),
                "first_warnings": warnings[:3],
            }
        )
    return {
        "run": run,
        "hosts": len(daemons),
        "load_before": load,
        "time_to_all": max(ends) - t0,
        "per_host": per_host,
        "origin_egress_link": origin_tx,
        "origin_egress_hostd": sum(p["origin_in"] for p in per_host),
        "max_uploaded": max(p["uploaded"] for p in per_host),
        "cpu_s": sum(p["cpu_s"] for p in per_host),
        "cpu_sys_s": sum(p["cpu_sys_s"] for p in per_host),
        "origin_server_cpu_s": others1[0] - others0[0],
        "bench_cpu_s": others1[1] - others0[1],
        **sampler.summary(rates, CPUS),
        "samples": [
            {"t": x["t"], "origin_tx": x["links"][ORIGIN][0], "cpu": x["cpu"]}
            for x in sampler.samples
        ],
    }


def servers_cpu(
    s: Setup, servers: list[Hostd], fn: Callable[[], dict[str, Any]]
) -> tuple[dict[str, Any], float, float]:
    """Run fn while `servers` only serve; (its result, their CPU seconds, bytes they served).
    The result's max_uploaded becomes the most any one server sent."""
    pids = [d.proc.pid for d in servers if d.proc is not None]
    m0 = [metric_sums(d)["served"] for d in servers]
    c0 = [sum(tree_cpu(p)) for p in pids]
    out = fn()
    c1 = [sum(tree_cpu(p)) for p in pids]
    m1 = [metric_sums(d)["served"] for d in servers]
    out["max_uploaded"] = max(b - a for a, b in zip(m0, m1, strict=True))
    return out, sum(c1) - sum(c0), sum(m1) - sum(m0)


def discard(s: Setup, *names: str) -> None:
    """Delete daemon roots and targets under the work dir, keeping each daemon's log."""
    for name in names:
        log = s.work / name / "hostd.log"
        if log.exists():
            shutil.copyfile(log, s.logs / f"{name}.log")
        shutil.rmtree(s.work / name, ignore_errors=True)


def peer_states(daemons: list[Hostd], hosts: list[str]) -> dict[str, dict[str, str]]:
    """Each host's members that are neither live nor itself, with their state and error."""
    out = {}
    for h, d in zip(hosts, daemons, strict=True):
        _, st = d.api("GET", "/v1/status")
        odd = {
            m["address"]: f"{m['state']}: {m.get('last_error') or ''}".strip()
            for m in st.get("peers", {}).get("members", [])
            if m["state"] not in ("live", "self")
        }
        if odd:
            out[h] = odd
    return out


def one_round(s: Setup, k: int, sizes: dict[str, int], res: dict[str, Any]) -> None:
    """The three runs with fresh daemons; figures go into `res` as each run ends, and a row
    is printed for each."""
    hosts = s.cluster.hosts
    addrs = [s.peer_addr(h) for h in hosts]
    res["round"] = k
    with ExitStack() as stack:
        fleet = stack.enter_context(
            running([s.daemon(h, f"r{k}-peers-{h}", peers=True) for h in hosts])
        )
        res["wait_live_s"] = wait_all_live(fleet, addrs)
        print(f"\n## round {k} (hosts saw each other live {res['wait_live_s']:.2f} s after start)")
        print_head()
        res["peers"] = restore_at_once(s, fleet, hosts, f"r{k}-peers", sizes)
        res["peers"]["peer_states_after"] = peer_states(fleet, hosts)
        print_run("peers", res["peers"])
        if len(hosts) > 1:
            # The last host's daemon goes; a fresh one with an empty tier takes its place and
            # restores alone. Only its own view of the others matters: the servers only serve.
            late_host = hosts[-1]
            fleet[-1].close()
            servers = fleet[:-1]
            late = stack.enter_context(running([s.daemon(late_host, f"r{k}-late", peers=True)]))
            wait_all_live(late, addrs)
            out, cpu, served = servers_cpu(
                s,
                servers,
                lambda: restore_at_once(s, late, [late_host], f"r{k}-late", sizes),
            )
            out["servers_cpu_s"] = cpu
            out["servers_served"] = served
            res["late"] = out
            print_run("late", out)
    discard(s, f"r{k}-late", f"r{k}-late-t-{hosts[-1]}")
    discard(s, *(f"r{k}-peers{x}-{h}" for h in hosts for x in ("", "-t")))
    if 0 < s.broken < len(hosts):
        # The last hosts' own origin holds nothing: live members that cannot pull what they
        # own. The others restore at once; what the origin sends is the figure.
        good = hosts[: -s.broken]
        broken_fleet = [
            s.daemon(h, f"r{k}-broken-{h}", peers=True, broken=h not in good) for h in hosts
        ]
        with running(broken_fleet) as fleet:
            wait_all_live(fleet, addrs)
            res["broken"] = restore_at_once(s, fleet[: len(good)], good, f"r{k}-broken", sizes)
            print_run("broken", res["broken"])
        discard(s, *(f"r{k}-broken{x}-{h}" for h in hosts for x in ("", "-t")))
    with running([s.daemon(h, f"r{k}-origin-{h}", peers=False) for h in hosts]) as plain:
        res["origin_only"] = restore_at_once(s, plain, hosts, f"r{k}-origin", sizes)
        print_run("origin_only", res["origin_only"])
    discard(s, *(f"r{k}-origin{x}-{h}" for h in hosts for x in ("", "-t")))
    if s.reference:
        res["reference"] = reference(s, sizes)
        print_reference(res["reference"])


def serve_origin(c: Cluster, directory: Path, ranges: bool) -> subprocess.Popen[Any]:
    """The origin's HTTP server in its namespace: http.server (no ranges: a pack is read
    whole, once per host that needs it) or, with `ranges`, bench/throttled.py unthrottled
    (the link's tbf shapes it) answering ranges."""
    if not ranges:
        return serve_dir(c, ORIGIN, directory, ORIGIN_PORT)
    argv = [sys.executable, str(ROOT / "bench" / "throttled.py"), str(directory)]
    argv += ["--bind", c.addr(ORIGIN), "--port", str(ORIGIN_PORT), "--ranges"]
    return serve(c, ORIGIN, argv, ORIGIN_PORT)


# --- the reference: stock tools on an ideal static schedule ------------------------------

SENDFILE_SERVER = """
import http.server, os, sys
class Handler(http.server.SimpleHTTPRequestHandler):
    def copyfile(self, source, outputfile):
        self.wfile.flush()
        self.connection.sendfile(source)
    def log_message(self, *args):
        pass
os.chdir(sys.argv[2])
http.server.ThreadingHTTPServer((sys.argv[1], int(sys.argv[3])), Handler).serve_forever()
"""
REF_PORT = 8090


def reference(s: Setup, sizes: dict[str, int]) -> dict[str, Any]:
    """What this machine does with the same bytes and stock tools, on the schedule peers aim
    for: the snapshot cut into N parts, host i fetches part i from the origin (phase 1, all
    at once), then every host fetches the N-1 other parts from their hosts (phase 2, one
    `curl --parallel` per host), each byte written once to tmpfs; servers send by sendfile.
    Then one host alone fetches the whole snapshot from the others (the late host's case).
    No hashing, no index, no chunking: a floor for the time, not a target."""
    c, hosts, n = s.cluster, s.cluster.hosts, len(s.cluster.hosts)
    root = s.work / "ref"
    part = s.size // n
    (root / ORIGIN).mkdir(parents=True)
    with open("/dev/urandom", "rb") as rnd:
        for i in range(n):
            (root / ORIGIN / f"part{i}").write_bytes(rnd.read(part))
    servers = []
    try:
        for node in [*hosts, ORIGIN]:
            (root / node).mkdir(exist_ok=True)
            argv = [sys.executable, "-c", SENDFILE_SERVER, c.addr(node), str(root / node)]
            servers.append(c.popen(node, [*argv, str(REF_PORT)]))
            wait_listening(c, node, REF_PORT, proc=servers[-1])

        def phase(jobs: dict[str, list[tuple[str, str]]]) -> dict[str, Any]:
            cpu0, ru0 = machine_cpu(), resource.getrusage(resource.RUSAGE_CHILDREN)
            srv0 = sum(sum(proc_cpu(p.pid)) for p in servers)
            t0 = time.monotonic()
            procs = []
            for h, got in jobs.items():
                argv = ["curl", "-sf", "--no-progress-meter", "--parallel", "--parallel-max", "16"]
                for url, out in got:
                    argv += ["-o", out, url]
                quiet = subprocess.DEVNULL
                procs.append(c.popen(h, argv, stdout=quiet, stderr=quiet))
            codes = [p.wait() for p in procs]
            t = time.monotonic() - t0
            ru1, cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN), machine_cpu()
            srv1 = sum(sum(proc_cpu(p.pid)) for p in servers)
            used = [y - x for x, y in zip(cpu0, cpu1, strict=True)]
            return {
                "seconds": t,
                "ok": all(x == 0 for x in codes),
                "curl_cpu_s": ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime,
                "servers_cpu_s": srv1 - srv0,
                "machine_cpu_busy": 1 - (used[3] + used[4]) / max(sum(used), 1),
            }

        def url(node: str, i: int) -> str:
            return f"http://{c.addr(node)}:{REF_PORT}/part{i}"

        one = phase(
            {h: [(url(ORIGIN, i), str(root / h / f"part{i}"))] for i, h in enumerate(hosts)}
        )
        two = phase(
            {
                h: [(url(o, j), str(root / h / f"part{j}")) for j, o in enumerate(hosts) if o != h]
                for h in hosts
            }
        )
        # one host alone fetches the whole snapshot again, spread over the others
        last, others = hosts[-1], hosts[:-1]
        alone = phase(
            {
                last: [
                    (url(others[j % len(others)], j), str(root / last / f"again{j}"))
                    for j in range(n)
                ]
            }
            if others
            else {}
        )
    finally:
        for p in servers:
            p.kill()
            p.wait()
        shutil.rmtree(root, ignore_errors=True)
    return {
        "phase1": one,
        "phase2": two,
        "seconds": one["seconds"] + two["seconds"],
        "alone": alone,
        "alone_rate": part * n / alone["seconds"] if alone["seconds"] > 0 else 0.0,
    }


def print_reference(x: dict[str, Any]) -> None:
    one, two = x["phase1"], x["phase2"]
    print(
        f"{'reference':<12} {x['seconds']:>8.2f}s  = origin phase {one['seconds']:.2f} s "
        f"(machine cpu {one['machine_cpu_busy']:.0%}) + all-to-all {two['seconds']:.2f} s "
        f"(machine cpu {two['machine_cpu_busy']:.0%}; curl {two['curl_cpu_s']:.1f} s, "
        f"servers {two['servers_cpu_s']:.1f} s)" + ("" if one["ok"] and two["ok"] else " FAILED"),
    )
    alone = x["alone"]
    print(
        f"{'ref. late':<12} {alone['seconds']:>8.2f}s  = {x['alone_rate'] / MiB:.0f} MiB/s, one "
        f"host fetching the snapshot from the others (machine cpu {alone['machine_cpu_busy']:.0%}; "
        f"curl {alone['curl_cpu_s']:.1f} s, servers {alone['servers_cpu_s']:.1f} s)"
        + ("" if alone["ok"] else " FAILED"),
        flush=True,
    )


# --- report ----------------------------------------------------------------------------------


def fmt_b(n: float) -> str:
    return f"{n / MiB:.0f} MiB" if abs(n) < 10 * GiB else f"{n / GiB:.2f} GiB"


def judge(r: dict[str, Any], size: int, b_o: float, b_p: float) -> list[tuple[str, str, str]]:
    """(target, figure, met) rows for one round."""
    bound = max(size / b_o, size / b_p)
    p, o = r["peers"], r["origin_only"]
    rows = [
        (
            "origin egress <= 1.2x S (peers)",
            f"{p['origin_egress_link'] / size:.3f}x S at the link, "
            f"{p['origin_egress_hostd'] / size:.3f}x by hostd",
            "yes" if p["origin_egress_link"] <= 1.2 * size else "NO",
        ),
        (
            "origin egress ~ Nx S (origin-only)",
            f"{o['origin_egress_link'] / size:.2f}x S (N = {o['hosts']})",
            "-",
        ),
        (
            "time-to-all <= 1/4 of origin-only",
            f"{p['time_to_all']:.2f} s vs {o['time_to_all']:.2f} s "
            f"= 1/{o['time_to_all'] / p['time_to_all']:.2f}",
            "yes" if p["time_to_all"] * 4 <= o["time_to_all"] else "NO",
        ),
        (
            "time-to-all <= 1.5x max(S/B_o, S/B_p)",
            f"{p['time_to_all']:.2f} s = {p['time_to_all'] / bound:.2f}x of {bound:.2f} s",
            "yes" if p["time_to_all"] <= 1.5 * bound else "NO",
        ),
    ]
    if "reference" in r:
        ref = r["reference"]["seconds"]
        rows.append(
            (
                "(reference: curl + sendfile, ideal plan)",
                f"{ref:.2f} s = {ref / bound:.2f}x of the bound; "
                f"peers took {p['time_to_all'] / ref:.2f}x of it",
                "-",
            )
        )
    if "broken" in r:
        x = r["broken"]
        rows.append(
            (
                "origin egress <= 1.2x S (with broken hosts)",
                f"{x['origin_egress_link'] / size:.3f}x S at the link "
                f"({x['hosts']} hosts restoring, {len(r['peers']['per_host']) - x['hosts']} "
                "broken)",
                "yes" if x["origin_egress_link"] <= 1.2 * size else "NO",
            )
        )
    if "late" in r:
        late = r["late"]
        rate = size / late["time_to_all"]
        rows.append(
            (
                "late host >= 0.8x B_p",
                f"{late['time_to_all']:.2f} s = {rate / MiB:.0f} MiB/s = {rate / b_p:.2f}x B_p",
                "yes" if rate >= 0.8 * b_p else "NO",
            )
        )
        if "reference" in r and r["reference"]["alone_rate"]:
            ref_rate = r["reference"]["alone_rate"]
            rows.append(
                (
                    "(reference late host: curl + sendfile)",
                    f"{ref_rate / MiB:.0f} MiB/s = {ref_rate / b_p:.2f}x B_p; "
                    f"hostd got {rate / ref_rate:.2f}x of it",
                    "-",
                )
            )
    return rows


def print_head() -> None:
    print(
        f"{'run':<12} {'all done':>9} {'per host min/med/max s':>23} {'origin egress':>14} "
        f"{'(hostd)':>10} {'max upload':>11} {'daemon cpu':>10} {'machine cpu':>11} "
        f"{'origin link':>11}"
    )


def print_run(name: str, x: dict[str, Any]) -> None:
    secs = [p["seconds"] for p in x["per_host"]]
    failed = [p["host"] for p in x["per_host"] if not p["ok"]]
    print(
        f"{name:<12} {x['time_to_all']:>8.2f}s "
        f"{min(secs):>7.2f}/{statistics.median(secs):>7.2f}/{max(secs):>7.2f} "
        f"{fmt_b(x['origin_egress_link']):>14} {fmt_b(x['origin_egress_hostd']):>10} "
        f"{fmt_b(x['max_uploaded']):>11} {x['cpu_s']:>9.1f}s "
        f"{x['machine_cpu_busy']:>10.0%} "
        f"{x['link_use'][ORIGIN]['tx']:>10.0%}" + (f"  FAILED: {failed}" if failed else ""),
        flush=True,
    )


def print_round(r: dict[str, Any], size: int, b_o: float, b_p: float) -> None:
    print("\nper host (peers run; late host last): seconds, MiB by source, MiB uploaded, CPU s")
    tagged = [("", p) for p in r["peers"]["per_host"]]
    tagged += [("late ", p) for p in r.get("late", {}).get("per_host", [])]
    for tag, p in tagged:
        src = ", ".join(f"{k} {v / MiB:.0f}" for k, v in p["bytes_by_source"].items() if v)
        print(
            f"  {tag + p['host']:<8} {p['seconds']:6.2f} s  [{src}]  up {p['uploaded'] / MiB:6.0f}"
            f"  cpu {p['cpu_s']:5.1f} (sys {p['cpu_sys_s']:4.1f})  hedges {p['hedges']:.0f}"
            + (f"  warnings {p['warnings']}" if p["warnings"] else "")
            + ("" if p["ok"] else f"  ERROR {p['error']}")
        )
        for w in p["first_warnings"]:
            print(f"      {w[:220]}")
    for h, odd in r["peers"]["peer_states_after"].items():
        print(f"  after the peers run, {h} sees: {odd}")
    p = r["peers"]
    served = sum(x["uploaded"] for x in p["per_host"])
    for name in ("peers", "late", "broken", "origin_only"):
        if name in r:
            x = r[name]
            print(
                f"CPU s during {name}: daemons {x['cpu_s']:.1f} (system {x['cpu_sys_s']:.1f}), "
                f"origin server "
                f"{x['origin_server_cpu_s']:.1f}, this bench {x['bench_cpu_s']:.1f}, machine "
                f"{x['machine_cpu_seconds']:.1f} of {x['time_to_all'] * CPUS:.1f} ("
                + ", ".join(
                    f"{k} {v:.0%}" for k, v in x["machine_cpu_shares"].items() if v >= 0.005
                )
                + ")"
            )
    print(
        f"CPU per GiB: peers run {p['cpu_s'] / (size * p['hosts'] / GiB):.2f} s per GiB "
        f"restored (every daemon both serves and fetches; {fmt_b(served)} served by peers)"
    )
    if "late" in r:
        late = r["late"]
        if late["servers_served"] > 0:
            print(
                f"  late host: servers {late['servers_cpu_s']:.2f} s for "
                f"{fmt_b(late['servers_served'])} = "
                f"{late['servers_cpu_s'] / (late['servers_served'] / GiB):.2f} s per GiB served; "
                f"client {late['cpu_s'] / (size / GiB):.2f} s per GiB restored"
            )
    print("\ntargets:")
    for target, figure, met in judge(r, size, b_o, b_p):
        print(f"  {target:<40} {figure:<55} {met}")


def code_state() -> str:
    """The commit the daemons run, and whether hostd/ differs from it (read-only git)."""
    git = ["git", "--no-optional-locks", "-C", str(ROOT)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    diff = subprocess.run([*git, "diff", "HEAD", "--", "hostd"], capture_output=True).stdout
    if head.returncode != 0:
        return "not a git checkout"
    changed = f" + uncommitted hostd/ changes (diff sha1 {hashlib.sha1(diff).hexdigest()[:10]})"
    return head.stdout.strip() + (changed if diff else "")


def print_summary(rounds: list[dict[str, Any]], size: int, b_o: float, b_p: float) -> None:
    """Median and range over the rounds of each figure a target is judged on."""
    done = [r for r in rounds if "origin_only" in r]
    if len(done) < 2:
        return
    bound = max(size / b_o, size / b_p)
    figures: dict[str, list[float]] = {
        "peers: time-to-all, s": [r["peers"]["time_to_all"] for r in done],
        "peers: time-to-all / bound": [r["peers"]["time_to_all"] / bound for r in done],
        "peers: origin egress / S": [r["peers"]["origin_egress_link"] / size for r in done],
        "origin-only: time-to-all, s": [r["origin_only"]["time_to_all"] for r in done],
        "origin-only / peers": [
            r["origin_only"]["time_to_all"] / r["peers"]["time_to_all"] for r in done
        ],
    }
    if all("broken" in r for r in done):
        figures["broken: origin egress / S"] = [
            r["broken"]["origin_egress_link"] / size for r in done
        ]
    if all("late" in r for r in done):
        figures["late host / B_p"] = [size / r["late"]["time_to_all"] / b_p for r in done]
    if all("reference" in r for r in done):
        figures["reference: time, s"] = [r["reference"]["seconds"] for r in done]
        figures["reference late host / B_p"] = [r["reference"]["alone_rate"] / b_p for r in done]
    print(f"\nover {len(done)} rounds: median (min..max)")
    for name, xs in figures.items():
        print(f"  {name:<30} {statistics.median(xs):7.2f}  ({min(xs):.2f}..{max(xs):.2f})")


# --- main ------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--hosts", type=int, default=8, help="hosts in the fleet (default 8)")
    ap.add_argument("--size", default="256MiB", help="snapshot size (default 256MiB)")
    ap.add_argument("--origin-rate", default="400mbit", help="origin link, a tc rate")
    ap.add_argument("--host-rate", default="1gbit", help="each host's link, a tc rate")
    ap.add_argument("--rounds", type=int, default=1, help="rounds of the three runs")
    ap.add_argument("--mode", choices=("link", "copy"), default="link", help="restore mode")
    ap.add_argument("--json", type=Path, help="write the figures here")
    ap.add_argument(
        "--peers-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set a [peers] key on every host (e.g. hedge_after=10s; digits make an integer); "
        "repeatable",
    )
    ap.add_argument(
        "--origin-ranges",
        action="store_true",
        help="serve the origin with bench/throttled.py, which answers ranged GETs as an "
        "object store or nginx does (default: python -m http.server, which ignores them)",
    )
    ap.add_argument(
        "--broken",
        type=int,
        default=0,
        metavar="N",
        help="also a run where the last N hosts' own origin holds nothing (live members that "
        "cannot pull what they own) and the others restore at once: the origin's egress",
    )
    ap.add_argument(
        "--no-reference",
        action="store_true",
        help="skip the reference run (curl and a sendfile HTTP server on the ideal schedule)",
    )
    ap.add_argument(
        "--profile",
        type=Path,
        help="py-spy every daemon during each run, collapsed stacks into this directory "
        "(slows the runs: for finding where the time goes, not for figures)",
    )
    args = ap.parse_args()
    problem = netns_problem()
    if problem is not None:
        print(f"fanout.py must run as root with iproute2 and tc: {problem}", file=sys.stderr)
        return 2
    if args.hosts < 1:
        ap.error("--hosts must be at least 1")
    size = parse_size(args.size, "--size")
    peers_extra: dict[str, str | int] = {}
    for kv in args.peers_set:
        key, eq, value = kv.partition("=")
        if not eq or not key:
            ap.error(f"--peers-set wants KEY=VALUE, got {kv!r}")
        value = value.strip()
        peers_extra[key.strip()] = int(value) if value.isdigit() else value
    if args.profile is not None:
        if shutil.which("py-spy") is None:
            ap.error("--profile needs py-spy on PATH")
        args.profile.mkdir(parents=True, exist_ok=True)
    b_o, b_p = parse_rate(args.origin_rate), parse_rate(args.host_rate)
    shm = Path("/dev/shm")
    # source + origin + the publisher's tier, then N tiers (link restores take no more)
    need = (3 + 2 * args.hosts) * size + 256 * MiB
    if shutil.disk_usage(shm).free < need:
        print(f"{shm} needs {fmt_b(need)} free for this size and fleet", file=sys.stderr)
        return 2
    command = shlex.join(sys.orig_argv)
    print(f"command: {command}")
    print(f"code: {code_state()}")
    print(f"load average before: {Path('/proc/loadavg').read_text().strip()}")
    work = shm / f"hostd-fanout-{os.getpid()}"
    logs = Path(f"/tmp/hostd-fanout-logs-{os.getpid()}")
    rounds: list[dict[str, Any]] = []
    try:
        work.mkdir()
        logs.mkdir()
        src = work / "src"
        files = make_snapshot(src, size)
        sizes = tree_sizes(src)
        origin_dir = work / "origin"
        with Hostd(
            work / "pub",
            origin=f"file://{origin_dir}",
            tiers=[{"name": "mem", "path": str(work / "pub" / "mem"), "budget": 2 * size}],
            log_level="info",
        ) as pub:
            published = pub.publish(src, REF)
        shutil.rmtree(work / "pub", ignore_errors=True)
        key = work / "cluster.key"
        key.write_bytes(os.urandom(24).hex().encode() + b"\n")
        key.chmod(0o600)
        with Cluster(args.hosts, host_rate=args.host_rate, origin_rate=args.origin_rate) as c:
            server = serve_origin(c, origin_dir, args.origin_ranges)
            setup = Setup(
                cluster=c,
                work=work,
                origin_url=f"http://{c.addr(ORIGIN)}:{ORIGIN_PORT}",
                key=key,
                size=size,
                budget=size * 2 + 64 * MiB,
                mode=args.mode,
                logs=logs,
                origin_pid=server.pid,
                profile=args.profile,
                reference=not args.no_reference,
                peers_extra=peers_extra,
                broken=args.broken,
            )
            print(
                f"{args.hosts} hosts at {args.host_rate} ({b_p / MiB:.1f} MiB/s), origin at "
                f"{args.origin_rate} ({b_o / MiB:.1f} MiB/s); snapshot {fmt_b(size)}, {files} "
                f"files, {published.get('new_chunks', '?')} chunks; bound max(S/B_o, S/B_p) = "
                f"{max(size / b_o, size / b_p):.2f} s"
            )
            for k in range(args.rounds):
                rounds.append({})
                one_round(setup, k, sizes, rounds[-1])
                print_round(rounds[-1], size, b_o, b_p)
                sys.stdout.flush()
            print_summary(rounds, size, b_o, b_p)
    finally:
        for log in work.glob("*/hostd.log"):
            shutil.copyfile(log, logs / f"{log.parent.name}.log")
        shutil.rmtree(work, ignore_errors=True)
        print(f"daemon logs: {logs}")
        if args.json:
            write_json(args, command, size, b_o, b_p, rounds)
    print(f"\ncommand: {command}")
    return 0


def write_json(
    args: argparse.Namespace,
    command: str,
    size: int,
    b_o: float,
    b_p: float,
    rounds: list[dict[str, Any]],
) -> None:
    done = [r for r in rounds if "origin_only" in r]
    args.json.write_text(
        json.dumps(
            {
                "command": command,
                "code": code_state(),
                "hosts": args.hosts,
                "size": size,
                "origin_rate": args.origin_rate,
                "origin_ranges": args.origin_ranges,
                "host_rate": args.host_rate,
                "mode": args.mode,
                "cpus": os.cpu_count(),
                "rounds": rounds,
                "targets": [judge(r, size, b_o, b_p) for r in done],
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    raise SystemExit(main())
