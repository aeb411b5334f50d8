"""Real hostd daemons for tests: a process per daemon, its own config, HOME and socket.

`Hostd` writes a config, starts `python -m hostd serve` as a child process, waits until the
socket answers (polling with a deadline, never a fixed sleep), and talks to it over the real
Unix socket with plain HTTP/1.1. Socket paths stay short (under /tmp) because a Unix socket
path over 107 bytes cannot be bound.
"""

from __future__ import annotations

import compileall
import contextlib
import functools
import http.client
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

import hostd.cli

ROOT = Path(__file__).resolve().parent.parent


def compile_bytecode() -> Path:
    """Write the bytecode of the hostd that daemons and the CLI import here (ROOT's), as an
    installed hostd has it (pip compiles it), and return where it is. Benches call it before
    timing anything: where PYTHONDONTWRITEBYTECODE is set, every CLI call would otherwise
    compile its modules from source (~20 ms a call on these machines)."""
    package = ROOT / "hostd"
    if not compileall.compile_dir(str(package), quiet=1):
        raise RuntimeError(f"could not compile {package}")
    return package


# Ports for daemons told theirs ahead (a peer list): from a block below the kernel's ephemeral
# range (no connection's own end lands there), one block per pytest-xdist worker, taken in
# turn, so two workers, or a test and the one before it, never get the same port.
_PORT_BLOCK = 3000


def _port_block() -> range:
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    k = int(worker) if worker.isdigit() else 0
    start = max(1024, low - _PORT_BLOCK * (k + 1))
    return range(start, start + _PORT_BLOCK)


_ports: Iterator[int] = iter(())


def free_ports(n: int) -> list[int]:
    """`n` TCP ports nothing is bound to now (on any address), from this worker's block."""
    global _ports
    out: list[int] = []
    for _ in range(2 * _PORT_BLOCK):
        port = next(_ports, None)
        if port is None:
            _ports = iter(_port_block())
            continue
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                continue
        out.append(port)
        if len(out) == n:
            return out
    raise RuntimeError(f"no {n} free ports in {_port_block()}")


def short_tmp(prefix: str = "hd") -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"cannot write {v!r} as TOML")


def write_config(path: Path, values: Mapping[str, Any], tiers: list[dict[str, Any]]) -> None:
    lines = [f"{k} = {toml_value(v)}" for k, v in values.items()]
    for t in tiers:
        lines.append("\n[[tiers]]")
        lines += [f"{k} = {toml_value(v)}" for k, v in t.items()]
    path.write_text("\n".join(lines) + "\n")


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float = 60.0) -> None:
        super().__init__("hostd", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.settimeout(self.timeout)
            s.connect(self.unix_path)
        except BaseException:
            s.close()
            raise
        self.sock = s


def request(
    sock: Path, method: str, path: str, body: Any = None, timeout: float = 60.0
) -> tuple[int, Any]:
    """One request; returns (status, decoded JSON body, or text if not JSON)."""
    conn = UnixHTTPConnection(str(sock), timeout)
    try:
        data = None if body is None else json.dumps(body).encode()
        conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        raw = resp.read()
        try:
            return resp.status, json.loads(raw)
        except ValueError:
            return resp.status, raw.decode(errors="replace")
    finally:
        conn.close()


def stream(sock: Path, path: str, body: Any, timeout: float = 120.0) -> list[dict[str, Any]]:
    """POST and read the whole NDJSON event stream."""
    conn = UnixHTTPConnection(str(sock), timeout)
    try:
        conn.request("POST", path, body=json.dumps(body).encode())
        resp = conn.getresponse()
        if resp.status != 200:  # refused before streaming: its own status, one error body
            answer = json.loads(resp.read())
            assert resp.status >= 400, (resp.status, answer)
            assert "error" in answer, (resp.status, answer)
            return [{"event": "error", **answer}]
        return [json.loads(line) for line in resp.read().splitlines() if line.strip()]
    finally:
        conn.close()


def outcome(events: list[dict[str, Any]]) -> dict[str, Any]:
    """The final event of a stream (result or error); checks the stream's shape."""
    assert events, "empty stream"
    assert events[-1]["event"] in ("result", "error"), events[-1]
    assert all(e["event"] in ("progress", "warning", "file") for e in events[:-1]), events
    return events[-1]


class Hostd:
    """One daemon process with its own root directory."""

    def __init__(
        self,
        root: Path | None = None,
        *,
        origin: str | None = None,
        origin_options: Mapping[str, str] | None = None,
        tiers: list[dict[str, Any]] | None = None,
        env: Mapping[str, str] | None = None,
        wrap: list[str] | None = None,
        **config: Any,
    ) -> None:
        """`wrap`: a command prefix the daemon runs under; its last element is a shell script
        that ends with `exec "$@"` (e.g. ["unshare", "-m", "sh", "-c", "mount ... && exec \"$@\"",
        "sh"]), so the daemon can run in its own mount namespace with a small tmpfs."""
        self.root = root or short_tmp()
        self.root.mkdir(parents=True, exist_ok=True)
        self.socket = self.root / "s.sock"
        self.config_path = self.root / "hostd.toml"
        values: dict[str, Any] = {
            "origin": origin or f"file://{self.root}/origin",
            "socket": str(self.socket),
            "index": str(self.root / "state" / "index.sqlite3"),
            "metrics_address": "127.0.0.1:0",
            "log_level": "debug",
        }
        if origin_options:
            values["origin_options"] = dict(origin_options)
        values.update(config)
        self.tiers = tiers or [
            {"name": "mem", "path": str(self.root / "mem"), "budget": "2GiB"},
            {"name": "disk", "path": str(self.root / "disk"), "budget": "4GiB"},
        ]
        write_config(self.config_path, values, self.tiers)
        self.env = {
            **os.environ,
            "HOME": str(self.root / "home"),
            "PYTHONPATH": str(ROOT),
            "PYTHONUNBUFFERED": "1",
            **(env or {}),
        }
        self.env.pop("NOTIFY_SOCKET", None)
        if env and "NOTIFY_SOCKET" in env:
            self.env["NOTIFY_SOCKET"] = env["NOTIFY_SOCKET"]
        self.wrap = list(wrap or [])
        self.log_path = self.root / "hostd.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Hostd:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self, timeout: float = 30.0) -> Hostd:
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child owns it
        self.proc = subprocess.Popen(
            [
                *self.wrap,
                sys.executable,
                "-m",
                "hostd",
                "serve",
                "--config",
                str(self.config_path),
            ],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            # `-m` puts the working directory first on the path: run from another checkout
            # (a benchmark's A/B), the daemon would import that checkout's hostd, not ROOT's
            cwd=ROOT,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"hostd exited with {self.proc.returncode}:\n{self.log()}")
            try:
                status, _ = request(self.socket, "GET", "/v1/status", timeout=2)
                if status == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.02)
        raise TimeoutError(f"hostd did not answer on {self.socket} in {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def api(
        self, method: str, path: str, body: Any = None, timeout: float = 60.0
    ) -> tuple[int, Any]:
        return request(self.socket, method, path, body, timeout)

    def stream(self, path: str, body: Any, timeout: float = 120.0) -> dict[str, Any]:
        """POST a long operation; return its final event."""
        return outcome(stream(self.socket, path, body, timeout))

    def publish(self, path: Path, ref: str, **kw: Any) -> dict[str, Any]:
        out = self.stream("/v1/publish", {"path": str(path), "ref": ref, **kw})
        assert out["event"] == "result", out
        return out

    def restore(self, ref: str, target: Path, **kw: Any) -> dict[str, Any]:
        return self.stream("/v1/restore", {"ref": ref, "target": str(target), **kw})

    def metrics(self) -> str:
        status, text = self.api("GET", "/metrics")
        assert status == 200
        return str(text)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()


def make_tree(root: Path, *, seed: int = 1, big: int = 3 * 1024 * 1024 + 17) -> Path:
    """A small tree with every kind of entry a snapshot keeps."""
    import random

    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    (root / "weights.bin").write_bytes(rng.randbytes(big))
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "sub" / "config.json").write_text(json.dumps({"seed": seed}) * 100)
    (root / "sub" / "deeper" / "same-as-weights.bin").write_bytes(
        (root / "weights.bin").read_bytes()
    )
    (root / "run.sh").write_text("#!/bin/sh\necho hi\n")
    (root / "run.sh").chmod(0o755)
    (root / "empty.txt").write_bytes(b"")
    (root / "empty-dir").mkdir()
    os.symlink("sub/config.json", root / "link-to-config")
    os.symlink("../weights.bin", root / "sub" / "up-link")
    return root


def tree_digest(root: Path) -> dict[str, Any]:
    """What a user compares between two trees: kinds, bytes, exec bits, mtimes (to the
    nanosecond: mtime-based caches, make and .pyc files compare them), symlink targets."""
    out: dict[str, Any] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p))
            elif p.is_dir():
                out[rel] = ("dir",)
            else:
                st = p.stat()
                out[rel] = ("file", p.read_bytes(), bool(st.st_mode & 0o111), st.st_mtime_ns)
    return out


def rmtree(p: Path) -> None:
    try:
        shutil.rmtree(p, ignore_errors=True)
    except RecursionError:  # (a tree nested past Python's limit: shutil recurses a level)
        subprocess.run(["rm", "-rf", "--one-file-system", str(p)], check=False)


def iter_events(sock: Path, path: str, body: Any) -> Iterator[dict[str, Any]]:
    """Read a stream event by event (for tests that act in the middle of one)."""
    conn = UnixHTTPConnection(str(sock), 120)
    conn.request("POST", path, body=json.dumps(body).encode())
    resp = conn.getresponse()
    if resp.status != 200:  # refused before streaming: one error body
        try:
            yield {"event": "error", **json.loads(resp.read())}
        finally:
            conn.close()
        return
    try:
        while True:
            line = resp.readline()
            if not line:
                return
            yield json.loads(line)
    finally:
        conn.close()


def nvml_env(lib: Path | None, gpus: str = "", **extra: str) -> dict[str, str]:
    """The environment of a process that loads the fake from `lib` (None: no fake)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FAKE_NVML_")}
    env["PYTHONPATH"] = str(ROOT)
    if lib is not None:
        env["LD_LIBRARY_PATH"] = str(lib)
        env["FAKE_NVML_GPUS"] = gpus
        env.update({f"FAKE_NVML_{k.upper()}": v for k, v in extra.items()})
    return env


HELD_FOR = 60.0  # seconds a held GET waits at most


class _Backlogged(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024  # not 5: a connect the backlog drops is retried a second later


class HeldOrigin:
    """A `file://` origin's directory over plain HTTP. A GET of a chunk in `held` waits until
    its event is set; one in `missing` is answered 404; every chunk GET waits for `gate`
    (open unless the test clears it). `asked` lists chunk GETs in order, and `first` is set
    at the first, so a test knows a fetch is under way before it acts. `packs`: GETs of
    packs (small files' bytes) are asked, listed and held at `gate` as chunks' are."""

    def __init__(self, directory: Path, *, gated: bool = False, packs: bool = False) -> None:
        self.packs = packs
        self.gate = threading.Event()
        if not gated:
            self.gate.set()
        self.first = threading.Event()
        self.held: dict[str, threading.Event] = {}
        self.missing: set[str] = set()
        self.asked: queue.Queue[str] = queue.Queue()
        handler = functools.partial(_Handler, self, directory=str(directory))
        self.server = _Backlogged(("127.0.0.1", 0), handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def hold(self, chunk: bytes) -> threading.Event:
        ev = self.held[chunk.hex()] = threading.Event()
        return ev

    def __enter__(self) -> HeldOrigin:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.gate.set()
        for ev in self.held.values():
            ev.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


class _Handler(SimpleHTTPRequestHandler):
    def __init__(self, origin: HeldOrigin, *args: Any, **kwargs: Any) -> None:
        self.origin = origin
        super().__init__(*args, **kwargs)

    def do_GET(self) -> None:
        if self.path.startswith("/chunks/") or (
            self.origin.packs and self.path.startswith("/packs/")
        ):
            key = self.path.rsplit("/", 1)[-1]
            self.origin.asked.put(key)
            self.origin.first.set()
            self.origin.gate.wait(HELD_FOR)
            if key in self.origin.missing:
                self.send_error(404)
                return
            held = self.origin.held.get(key)
            if held is not None:
                held.wait(HELD_FOR)
        super().do_GET()

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def handle(self) -> None:
        with contextlib.suppress(ConnectionError, TimeoutError):
            super().handle()


class Cli:
    """`hostd ...` in-process against one daemon: exit code, stdout, stderr."""

    def __init__(self, h: Hostd, capsys: pytest.CaptureFixture[str]) -> None:
        self.h, self.capsys = h, capsys

    def __call__(self, *argv: str) -> tuple[int, str, str]:
        self.capsys.readouterr()
        code = hostd.cli.main([*argv, "--socket", str(self.h.socket)])
        out, err = self.capsys.readouterr()
        return code, out, err

    def ok(self, *argv: str) -> str:
        code, out, err = self(*argv)
        assert code == 0, (argv, out, err)
        return out

    def json(self, *argv: str) -> dict[str, Any]:
        out = self.ok(*argv, "--json")
        result: dict[str, Any] = json.loads(out)
        return result

    def fails(self, code: int, *argv: str) -> str:
        got, out, err = self(*argv)
        assert got == code, (argv, got, out, err)
        assert err.startswith("hostd: "), err
        assert err.count("\n") == 1, err
        return err


class NotifyListener:
    """The datagram socket systemd would own: collects the daemon's sd_notify messages."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[str] = []

    def close(self) -> None:
        self.sock.close()

    def expect(self, assignment: str, timeout: float = 20.0) -> list[str]:
        """Read datagrams until one holds `assignment` (e.g. READY=1, or EXTEND_TIMEOUT_USEC=
        for any value); return all read."""
        deadline = time.monotonic() + timeout
        read: list[str] = []
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {assignment} from hostd; got {read}")
            self.sock.settimeout(left)
            try:
                msg = self.sock.recv(4096).decode()
            except TimeoutError:
                continue
            read.append(msg)
            self.messages.append(msg)
            lines = msg.splitlines()
            if assignment in lines or (
                assignment.endswith("=") and any(x.startswith(assignment) for x in lines)
            ):
                return read


@contextlib.contextmanager
def small_ext4(work: Path, size: int, *mkfs: str) -> Iterator[Path]:
    """An ext4 filesystem of `size` bytes (mkfs.ext4 `mkfs` options) on a loop device,
    mounted at work/ext while the block runs."""
    tools = [t for t in ("mkfs.ext4", "losetup", "mount", "umount") if shutil.which(t) is None]
    if tools or not Path("/dev/loop-control").exists():
        pytest.skip(f"needs {', '.join(tools) or 'loop devices'} (e2fsprogs, util-linux)")
    image, ext = work / "ext.img", work / "ext"
    with open(image, "wb") as f:
        f.truncate(size)
    subprocess.run(["mkfs.ext4", "-q", *mkfs, str(image)], check=True, timeout=60)
    ext.mkdir()
    loop = subprocess.run(
        ["losetup", "--find", "--show", str(image)], capture_output=True, text=True, check=True
    ).stdout.strip()
    try:
        subprocess.run(["mount", "-t", "ext4", loop, str(ext)], check=True, timeout=60)
        try:
            yield ext
        finally:
            subprocess.run(["umount", str(ext)], check=True, timeout=60)
    finally:
        subprocess.run(["losetup", "--detach", loop], check=True, timeout=60)
