"""A daemon under everyday use for a while: does its memory, thread or descriptor count grow?

    .venv/bin/python bench/soak.py [--minutes 12] [--files 600] [--budget 120MiB]
        [--every 20] [--json out.json]

One daemon with a small `mem` tier (eviction all the time) and a `file://` origin, and four
clients at once until the time is up:
  publisher  a tree of --files small files (bench/small_files.py's) and 3 of 1 MiB, with one
             file changed each round, published under one of 5 refs, then restored by copy
  nobody     restores of those refs as nobody (curl through setpriv), link, auto or copy
  progress   a progressive restore as nobody, `ls`, `status`, a prefetch every third round,
             and a restore whose client is killed part-way
  admin      `gc` every 2 s, `verify` every fifth time, a `/metrics` scrape
Every --every seconds: the daemon's VmRSS, its anonymous memory (smaps_rollup), threads and
open descriptors (link restores' read leases hold one a blob). At the end, the same after 5
seconds at rest (the idle heap trim: hostd/memory.py), and the operations and errors of each
client. Needs root (the nobody clients). Not a test: nothing fails on a figure.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import small_files as sf
from harness import Hostd

REFS = 5


def sample(pid: int) -> dict[str, int]:
    rss, _ = sf.rss(pid)
    anon = 0
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Anonymous:"):
            anon = int(line.split()[1]) * sf.KiB
    return {
        "rss": rss,
        "anon": anon,
        "threads": len(os.listdir(f"/proc/{pid}/task")),
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
    }


class Soak:
    def __init__(self, base: Path, sock: Path, src: Path, until: float) -> None:
        self.base, self.sock, self.src, self.until = base, sock, src, until
        self.home = base / "home"  # nobody's
        self.ops: dict[str, int] = {}
        self.errors: list[str] = []
        self.lock = threading.Lock()

    def running(self) -> bool:
        return time.monotonic() < self.until

    def done(self, what: str) -> None:
        with self.lock:
            self.ops[what] = self.ops.get(what, 0) + 1

    def failed(self, what: str, e: Exception) -> None:
        with self.lock:
            self.errors.append(f"{what}: {str(e)[:300]}")

    def cli(self, *args: str) -> None:
        try:
            sf.hostd_cli(self.sock, *args)
        except sf.BenchError as e:
            self.failed(args[0], e)
        else:
            self.done(args[0])

    def as_nobody(self, what: str, body: dict[str, Any]) -> None:
        try:
            sf.curl_as_nobody(self.sock, "/v1/restore", body)
        except sf.BenchError as e:
            self.failed(what, e)
        else:
            self.done(what)
        subprocess.run(["rm", "-rf", body["target"]], check=False)

    def publisher(self) -> None:
        tree = self.base / "pub"
        for i in range(1 << 30):
            if not self.running():
                return
            shutil.rmtree(tree, ignore_errors=True)
            shutil.copytree(self.src, tree)
            (tree / f"changed-{i % 7}.txt").write_text(f"round {i}\n" * 100)
            self.cli("publish", str(tree), "--ref", f"soak/m{i % REFS}")
            out = self.base / "copy"
            self.cli("restore", f"soak/m{i % REFS}", str(out), "--mode", "copy")
            shutil.rmtree(out, ignore_errors=True)

    def nobody(self) -> None:
        for i in range(1 << 30):
            if not self.running():
                return
            mode = random.choice(["link", "auto", "copy"])
            body = {"ref": f"soak/m{i % REFS}", "target": str(self.home / f"n{i}"), "mode": mode}
            self.as_nobody(f"restore {mode} by nobody", body)

    def progress(self) -> None:
        for i in range(1 << 30):
            if not self.running():
                return
            body = {
                "ref": f"soak/m{i % REFS}",
                "target": str(self.home / "p"),
                "mode": "auto",
                "progressive": True,
            }
            self.as_nobody("progressive by nobody", body)
            self.cli("ls")
            self.cli("status")
            if i % 3 == 0:
                self.cli("prefetch", f"soak/m{(i + 1) % REFS}")
            out = self.base / "cut"  # a client killed part-way
            cmd = [sys.executable, "-m", "hostd", "restore", f"soak/m{(i + 2) % REFS}", str(out)]
            env = {**os.environ, "PYTHONPATH": str(sf.ROOT)}
            client = subprocess.Popen(
                [*cmd, "--socket", str(self.sock)],
                cwd=sf.ROOT,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            time.sleep(random.uniform(0.05, 0.4))
            client.kill()
            client.wait()
            self.done("restore cut")
            shutil.rmtree(out, ignore_errors=True)  # (if it was done; its build is swept)

    def admin(self) -> None:
        for i in range(1 << 30):
            if not self.running():
                return
            time.sleep(2)
            self.cli("gc")
            if i % 5 == 4:
                self.cli("verify")
            curl = ["curl", "-sf", "--unix-socket", str(self.sock), "http://hostd/metrics"]
            if subprocess.run(curl, stdout=subprocess.DEVNULL, check=False).returncode:
                self.failed("metrics", RuntimeError("the scrape failed"))
            else:
                self.done("metrics")


def run(base: Path, args: argparse.Namespace) -> dict[str, Any]:
    src = base / "src"
    sf.make_tree(src, args.files, big=3)
    home = base / "home"
    home.mkdir()
    os.chown(home, sf.NOBODY, sf.NOBODY)
    root = base / "d"
    root.mkdir()
    os.chmod(root, 0o755)  # nobody must reach the socket
    samples: list[dict[str, Any]] = []
    with Hostd(
        root,
        origin=f"file://{base / 'origin'}",
        tiers=[{"name": "mem", "path": str(root / "tier"), "budget": args.budget}],
        socket_mode="0666",
    ) as d:
        assert d.proc is not None
        pid = d.proc.pid
        for i in range(REFS):  # every ref there before the clients ask for them
            sf.hostd_cli(d.socket, "publish", str(src), "--ref", f"soak/m{i}")
        t0 = time.monotonic()
        soak = Soak(base, d.socket, src, t0 + args.minutes * 60)
        roles = [soak.publisher, soak.nobody, soak.progress, soak.admin]
        threads = [threading.Thread(target=role, name=role.__name__) for role in roles]
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            s = {"t": round(time.monotonic() - t0), **sample(pid)}
            samples.append(s)
            print(
                f"t={s['t']:5d} s  rss {s['rss'] / sf.MiB:6.1f} MiB  anon "
                f"{s['anon'] / sf.MiB:6.1f} MiB  threads {s['threads']:3d}  fds {s['fds']:5d}",
                flush=True,
            )
            next_at = time.monotonic() + args.every
            while time.monotonic() < next_at and any(t.is_alive() for t in threads):
                time.sleep(0.5)
        time.sleep(5)
        rest = sample(pid)
    return {"samples": samples, "at_rest": rest, "ops": soak.ops, "errors": soak.errors}


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--minutes", type=float, default=12)
    ap.add_argument("--files", type=int, default=600)
    ap.add_argument("--budget", default="120MiB", help="the mem tier's budget")
    ap.add_argument("--every", type=float, default=20, help="seconds between samples")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if os.geteuid() != 0:
        ap.error("the nobody clients need root (setpriv)")
    base = Path(tempfile.mkdtemp(prefix="hsk", dir="/dev/shm"))
    os.chmod(base, 0o755)
    try:
        result = run(base, args)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    s, rest = result["samples"], result["at_rest"]
    warm = next((x for x in s if x["t"] >= 60), s[-1])  # after a minute: caches filled
    print(
        f"rss after a minute {warm['rss'] / sf.MiB:.1f} MiB, at the end "
        f"{s[-1]['rss'] / sf.MiB:.1f}, peak {max(x['rss'] for x in s) / sf.MiB:.1f}, "
        f"at rest {rest['rss'] / sf.MiB:.1f} (anon {rest['anon'] / sf.MiB:.1f}); threads at "
        f"rest {rest['threads']}, fds {rest['fds']}"
    )
    print("operations:", json.dumps(result["ops"], sort_keys=True))
    print(f"errors: {len(result['errors'])}")
    for e in result["errors"][:20]:
        print("  ", e)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
