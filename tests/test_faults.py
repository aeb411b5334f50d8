"""Every fault of issue 2's "Bad input and faults" list, against real daemon processes.

Each test drives `python -m hostd serve` (tests/harness.py) over its real Unix socket and
checks what a user would see: an error event with the right code and a message that names the
thing at fault, nothing half-made at the target, and a daemon that still answers
`/v1/status` afterwards.

Origins are `file://` directories, moto's S3 server, or `HttpOrigin` below: a static HTTP
server over a published `file://` directory that can hold chunk requests at a gate the test
opens one chunk at a time (a `file://` origin is too fast to stop a fetch half way), or stall
every request. Full and read-only tiers are made inside the daemon's own mount namespace
(`unshare -m` through the harness's `wrap`), so nothing is mounted on the host; those tests
need root and skip without it (or fail, under CI=true). Nothing sleeps and hopes: waits poll
with a deadline, and the order of events is set by the gate.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Generator, Iterator
from email.utils import formatdate
from pathlib import Path
from typing import Any, TypeVar, cast

import pytest
from aiohttp import web
from harness import ROOT, Hostd, free_ports, iter_events, make_tree, rmtree, short_tmp, tree_digest
from harness import write_config as write_toml
from prometheus_client.parser import text_string_to_metric_families
from s3server import S3Bucket

from hostd import fsops
from hostd.core import manifest as mf
from hostd.core.ids import chunk_id, compat_digest

T = TypeVar("T")
DEADLINE = 30.0
SMALL_CHUNK = 64 * 1024


# -- helpers --------------------------------------------------------------------------------


@pytest.fixture
def work() -> Iterator[Path]:
    """A short directory under /tmp (socket paths must stay short), removed afterwards."""
    path = short_tmp("hf")
    yield path
    rmtree(path)


def wait_for(what: str, check: Callable[[], bool], timeout: float = DEADLINE) -> None:
    """Poll `check` until it holds; fail naming `what` at the deadline."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def assert_serving(d: Hostd) -> dict[str, Any]:
    """The daemon still answers status; returns the status document."""
    assert d.proc is not None, d.log()
    assert d.proc.poll() is None, d.log()
    status, body = d.api("GET", "/v1/status", timeout=10)
    assert status == 200, body
    assert isinstance(body, dict), body
    assert body["version"], body
    return body


def metric(d: Hostd, name: str, default: float | None = None, **labels: str) -> float:
    """One sample's value from the daemon's /metrics (`default` where there is none yet)."""
    for family in text_string_to_metric_families(d.metrics()):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    if default is not None:
        return default
    raise AssertionError(f"no metric sample {name}{labels}")


def hidden_builds(target: Path) -> list[str]:
    """Temp dirs a restore builds beside its target (`.<name>.hostd-*`)."""
    prefix = f".{target.name}.hostd-"
    return sorted(p.name for p in target.parent.iterdir() if p.name.startswith(prefix))


def assert_nothing_left(target: Path) -> None:
    """After a SIGKILL of the daemon: a cold restore builds its tree while it fetches, and the
    restore's helper removes that build once it sees the daemon's socket close."""
    wait_for("the helper to remove its build", lambda: not hidden_builds(target))
    assert_nothing_made(target)


def assert_nothing_made(target: Path) -> None:
    assert not target.exists(), f"{target} was created"
    assert not target.is_symlink(), f"{target} was created"
    assert hidden_builds(target) == [], hidden_builds(target)


def failed(out: dict[str, Any], code: str) -> str:
    """Check a stream ended in error `code`; return its message."""
    assert out["event"] == "error", out
    assert out["error"] == code, out
    message = out["message"]
    assert isinstance(message, str)
    assert message
    return message


def read_manifest(origin: Path, snapshot_id: str) -> mf.Manifest:
    return mf.decode((origin / "manifests" / snapshot_id).read_bytes())


def chunk_key(cid: bytes) -> str:
    return f"chunks/{cid.hex()[:2]}/{cid.hex()}"


def hostd_cli(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    """`python -m hostd ARGS` as a user runs it."""
    env = {**os.environ, "HOME": str(home), "PYTHONPATH": str(ROOT)}
    env.pop("HOSTD_SOCKET", None)
    return subprocess.run(
        [sys.executable, "-m", "hostd", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def closed_port() -> int:
    """A loopback port nothing listens on (and no other test is given)."""
    return free_ports(1)[0]


def random_file(path: Path, size: int, seed: int) -> None:
    import random

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(random.Random(seed).randbytes(size))


def need_root() -> None:
    """Mount namespaces need root and util-linux; skip with the reason, fail under CI."""
    why = None
    if os.geteuid() != 0:
        why = "needs root: makes mounts in a private mount namespace (unshare -m)"
    else:
        tools = ("unshare", "nsenter", "mount", "findmnt", "stat", "find")
        missing = [t for t in tools if not shutil.which(t)]
        if missing:
            why = f"needs {', '.join(missing)} (util-linux, coreutils)"
    if why is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true: {why}")
        pytest.skip(why)


def in_namespace(script: str) -> list[str]:
    """A `wrap` prefix: a private mount namespace set up by `script`, then the daemon."""
    return ["unshare", "-m", "sh", "-c", f'set -e; {script}; exec "$@"', "sh"]


def nsenter(d: Hostd, *cmd: str) -> str:
    """Run a command in the daemon's mount namespace (where its private mounts are)."""
    assert d.proc is not None
    done = subprocess.run(
        ["nsenter", "-t", str(d.proc.pid), "-m", *cmd],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, (cmd, done.stderr)
    return done.stdout


def publish_to(origin: Path, root: Path, trees: dict[str, Path], **kw: Any) -> dict[str, str]:
    """Publish `trees` (ref -> dir) into a file:// origin with a short-lived daemon, large
    files' chunks as objects of their own (pack_size 0): what HttpOrigin gates and these
    tests corrupt, lose or hold one by one."""
    with Hostd(root, origin=f"file://{origin}", pack_size=0) as pub:
        return {ref: pub.publish(src, ref, **kw)["snapshot"] for ref, src in trees.items()}


class HttpOrigin:
    """A published file:// origin served over plain HTTP, as a static web server would.

    Counts requests per key (`requested` on arrival, `served` once the body is written).
    Requests for keys under `gated` (chunks, by default; packs of small files too where a
    test asks) pass a gate: `gate(0)` holds them until `allow(n)` lets n more through,
    `gate(None)` opens it. With `stall` set every request hangs until the server closes.
    A Range header gets its bytes (206), as a pack's reader asks. Runs its own event loop in
    a thread, so the test body stays synchronous.
    """

    def __init__(self, root: Path, gated: tuple[str, ...] = ("chunks/",)) -> None:
        self.root = root
        self.gated = gated
        self.url = ""
        self.stall = False
        self.requested: Counter[str] = Counter()
        self.served: Counter[str] = Counter()
        self.waiting = 0  # chunk requests held at the gate right now
        self._permits: int | None = None
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="http-origin")
        self._runner: web.AppRunner | None = None
        self._cond: asyncio.Condition | None = None
        self._closing: asyncio.Event | None = None

    def __repr__(self) -> str:
        return f"<HttpOrigin {self.url} permits={self._permits} waiting={self.waiting}>"

    def __enter__(self) -> HttpOrigin:
        self._thread.start()
        self._call(self._start())
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self._call(self._stop())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop.close()

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(DEADLINE)

    def gate(self, permits: int | None) -> None:
        self._call(self._set(lambda _: permits))

    def allow(self, n: int) -> None:
        self._call(self._set(lambda p: (p or 0) + n))

    def counts(self, counter: Counter[str], prefix: str = "") -> dict[str, int]:
        """A snapshot of `requested` or `served`, for the keys under `prefix`."""
        with self._lock:
            return {k: n for k, n in counter.items() if k.startswith(prefix)}

    def chunk_counts(self, counter: Counter[str]) -> dict[str, int]:
        return self.counts(counter, "chunks/")

    async def _set(self, change: Callable[[int | None], int | None]) -> None:
        assert self._cond is not None
        async with self._cond:
            self._permits = change(self._permits)
            self._cond.notify_all()

    async def _start(self) -> None:
        self._cond, self._closing = asyncio.Condition(), asyncio.Event()
        app = web.Application()
        app.router.add_get("/{key:.*}", self._handle, allow_head=False)
        self._runner = web.AppRunner(
            app, handler_cancellation=True, access_log=None, shutdown_timeout=2
        )
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}/"

    async def _stop(self) -> None:
        assert self._closing is not None
        assert self._runner is not None
        self._closing.set()
        await self._set(lambda _: None)
        await self._runner.cleanup()

    async def _pass_gate(self) -> None:
        assert self._cond is not None
        with self._lock:
            self.waiting += 1
        try:
            async with self._cond:
                await self._cond.wait_for(lambda: self._permits is None or self._permits > 0)
                if self._permits is not None:
                    self._permits -= 1
        finally:
            with self._lock:
                self.waiting -= 1

    def _read(self, key: str) -> tuple[bytes, float] | None:
        path = self.root / key
        if ".." in key.split("/") or not path.is_file():
            return None
        return path.read_bytes(), path.stat().st_mtime

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        assert self._closing is not None
        key = request.match_info["key"]
        with self._lock:
            self.requested[key] += 1
        if self.stall:
            await self._closing.wait()
            raise web.HTTPServiceUnavailable()
        if key.startswith(self.gated):
            await self._pass_gate()
        found = await asyncio.to_thread(self._read, key)
        if found is None:
            raise web.HTTPNotFound()
        data, mtime = found
        resp = web.StreamResponse(headers={"Last-Modified": formatdate(mtime, usegmt=True)})
        if "Range" in request.headers:
            part = request.http_range
            start, stop, _ = part.indices(len(data))
            resp.set_status(206)
            resp.headers["Content-Range"] = f"bytes {start}-{stop - 1}/{len(data)}"
            data = data[start:stop]
        resp.content_length = len(data)
        await resp.prepare(request)
        await resp.write(data)
        await resp.write_eof()
        with self._lock:
            self.served[key] += 1
        return resp


# -- 1. a malformed or truncated manifest ---------------------------------------------------


def test_malformed_or_truncated_manifest_is_bad_manifest(work: Path) -> None:
    origin = work / "origin"
    trees = {f"bad/{i}": make_tree(work / f"src{i}", seed=i, big=1000 + i) for i in range(4)}
    ids = publish_to(origin, work / "pub", trees)
    good = (origin / "manifests" / ids["bad/0"]).read_bytes()
    damage = {
        "bad/0": b"\xc1 this is not msgpack \xff" * 8,  # garbage
        "bad/1": good[: len(good) // 2],  # truncated mid-object
        "bad/2": b"\x81\xa1a\x01",  # valid msgpack, not a manifest
        "bad/3": good,  # a valid manifest, but not the one its name promises
    }
    for ref, data in damage.items():
        (origin / "manifests" / ids[ref]).write_bytes(data)
    # A fresh daemon: the publisher has these manifests cached and would never re-read them.
    with Hostd(work / "d", origin=f"file://{origin}") as d:
        for ref in damage:
            target = work / "out" / ref.replace("/", "-")
            target.parent.mkdir(exist_ok=True)
            message = failed(d.restore(ref, target), "bad_manifest")
            assert ids[ref] in message, message  # names the snapshot whose manifest is bad
            # checked before a byte is decoded: what is wrong is that these are not its bytes
            assert "does not hash to its id" in message, message
            assert_nothing_made(target)
            assert_serving(d)
        assert metric(d, "hostd_operations_total", operation="restore", result="error") == 4


# -- 2. manifest paths that escape the target -----------------------------------------------


def _store_manifest(origin: Path, ref: str, m: mf.Manifest) -> str:
    """Put a manifest at the origin as publish would, and point `ref` at it (format key)."""
    data = mf.encode(m)
    sid = chunk_id(data).hex()
    (origin / "manifests").mkdir(parents=True, exist_ok=True)
    (origin / "manifests" / sid).write_bytes(data)
    key = compat_digest({"format": str(mf.FORMAT_VERSION)})
    (origin / "refs" / ref).mkdir(parents=True, exist_ok=True)
    (origin / "refs" / ref / key).write_text(sid)
    return sid


def test_manifest_paths_that_escape_the_target_are_refused(work: Path) -> None:
    origin = work / "origin"
    content = b"written where it must not be\n" * 10
    cid = chunk_id(content)
    (origin / "chunks" / cid.hex()[:2]).mkdir(parents=True)
    (origin / "chunks" / cid.hex()[:2] / cid.hex()).write_bytes(content)
    outside = work / "t" / "abs-escape.txt"

    def file(path: str) -> mf.FileEntry:
        return mf.FileEntry(path, 0o644, len(content), (mf.Chunk(cid, len(content)),), 0)

    ok = file("ok.txt")
    # Built directly (not with mf.build) so the bad paths get past publish's validation.
    crafted = {
        "dotdot": mf.Manifest(SMALL_CHUNK, files=(file("../escape.txt"), ok)),
        "deep-dotdot": mf.Manifest(SMALL_CHUNK, files=(ok, file("sub/../../escape.txt"))),
        "absolute": mf.Manifest(SMALL_CHUNK, files=(file(str(outside)), ok)),
        "nul": mf.Manifest(SMALL_CHUNK, files=(file("ok\x00.txt"),)),
        "dir-dotdot": mf.Manifest(SMALL_CHUNK, files=(ok,), dirs=("../escape-dir",)),
        "link-up": mf.Manifest(
            SMALL_CHUNK, files=(ok,), symlinks=(mf.Symlink("sub/link", "../../escape.txt"),)
        ),
        "link-absolute": mf.Manifest(
            SMALL_CHUNK, files=(ok,), symlinks=(mf.Symlink("link", "/etc/passwd"),)
        ),
        "through-link": mf.Manifest(
            SMALL_CHUNK,
            files=(file("a/escape.txt"), ok),
            symlinks=(mf.Symlink("a", "sub"),),
            dirs=("sub",),
        ),
    }
    ids = {name: _store_manifest(origin, f"evil/{name}", m) for name, m in crafted.items()}
    (work / "t").mkdir()
    with Hostd(work / "d", origin=f"file://{origin}") as d:
        for name in crafted:
            target = work / "t" / "out"
            message = failed(d.restore(f"evil/{name}", target), "bad_manifest")
            assert ids[name] in message, message
            # Nothing at the target, nothing beside it, nothing anywhere above it.
            assert sorted(os.listdir(work / "t")) == [], (name, os.listdir(work / "t"))
            assert not (work / "escape.txt").exists()
            assert not (work / "escape-dir").exists()
            assert_serving(d)
        # The message says what is wrong with which path.
        assert "'..'" in failed(d.restore("evil/dotdot", work / "t" / "x"), "bad_manifest")
        assert "absolute" in failed(d.restore("evil/absolute", work / "t" / "x"), "bad_manifest")
        assert "NUL" in failed(d.restore("evil/nul", work / "t" / "x"), "bad_manifest")
        assert "outside" in failed(d.restore("evil/link-up", work / "t" / "x"), "bad_manifest")
        # The one chunk these manifests name was never fetched for them.
        assert metric(d, "hostd_chunks_fetched_total", source="origin") == 0


# -- 3. an unknown ref -----------------------------------------------------------------------


def test_unknown_ref_is_not_found_with_exit_code_3(work: Path) -> None:
    with Hostd(work / "d") as d:
        target = work / "out"
        message = failed(d.restore("no/such-ref", target), "not_found")
        assert "no/such-ref" in message
        cli = hostd_cli(
            "restore", "no/such-ref", str(target), "--socket", str(d.socket), home=d.root
        )
        assert cli.returncode == 3, (cli.returncode, cli.stdout, cli.stderr)
        lines = cli.stderr.strip().splitlines()
        assert len(lines) == 1
        assert lines[0].startswith("hostd: ")
        assert "no/such-ref" in lines[0]
        assert_nothing_made(target)
        # A malformed ref name is a usage error (2), not "boot from scratch" (3).
        cli = hostd_cli("restore", "bad//ref", str(target), "--socket", str(d.socket), home=d.root)
        assert cli.returncode == 2, (cli.returncode, cli.stderr)
        assert metric(d, "hostd_operations_total", operation="restore", result="not_found") == 2
        assert_serving(d)


def test_a_ref_whose_manifest_is_gone_is_a_broken_origin_not_an_unknown_ref(work: Path) -> None:
    """Exit 3 tells a caller there is no such ref, to publish one (boot from scratch):
    automation would re-publish on every host. A ref whose manifest the origin lacks is a
    broken origin: exit 1, naming the ref and the snapshot."""
    origin = work / "origin"
    src = make_tree(work / "src")
    sid = publish_to(origin, work / "pub", {"demo/gone": src})["demo/gone"]
    (origin / "manifests" / sid).unlink()
    with Hostd(work / "d", origin=f"file://{origin}") as d:
        target = work / "out"
        message = failed(d.restore("demo/gone", target), "bad_manifest")
        assert "demo/gone" in message
        assert sid in message
        cli = hostd_cli("restore", "demo/gone", str(target), "--socket", str(d.socket), home=d.root)
        assert cli.returncode == 1, (cli.returncode, cli.stdout, cli.stderr)
        assert_nothing_made(target)


# -- 4. a corrupted chunk at the origin --------------------------------------------------------


def test_corrupted_chunk_at_origin_is_named_and_never_materialized(work: Path) -> None:
    origin = work / "origin"
    src = make_tree(work / "src")
    # Small chunks: weights.bin spans several, each an object of its own (a file of one chunk
    # would go into a pack).
    ids = publish_to(origin, work / "pub", {"demo/tree": src}, chunk_size=SMALL_CHUNK)
    m = read_manifest(origin, ids["demo/tree"])
    weights = next(f for f in m.files if f.path == "weights.bin")
    assert weights.chunks[0].packed is None
    bad = weights.chunks[0].id
    stored = origin / chunk_key(bad)
    original = stored.read_bytes()
    flipped = bytearray(original)
    flipped[len(flipped) // 2] ^= 0x40
    stored.write_bytes(bytes(flipped))

    with Hostd(work / "d", origin=f"file://{origin}") as d:
        target = work / "out"
        message = failed(d.restore("demo/tree", target), "chunk_corrupt")
        assert bad.hex() in message, message
        assert "weights.bin" in message, message  # and the file that needs it
        assert_nothing_made(target)
        assert metric(d, "hostd_chunk_errors_total", source="origin", kind="corrupt") >= 1
        # No blob holds the bad bytes: the blob is not complete, and verify finds nothing bad.
        (snap,) = d.api("GET", "/v1/snapshots")[1]["snapshots"]
        assert snap["complete"] is False
        out = d.stream("/v1/verify", {})
        assert out["event"] == "result", out
        assert out["bad"] == [], out
        assert_serving(d)

        # Once the origin holds the right bytes again, the same restore works.
        stored.write_bytes(original)
        out = d.restore("demo/tree", target)
        assert out["event"] == "result", out
        assert tree_digest(target) == tree_digest(src)


def test_a_tree_nested_past_the_recursion_limit_is_replaced_and_cleaned_up(
    work: Path, request: pytest.FixtureRequest
) -> None:
    """A path may nest ~2,000 directories and still fit its 4,096 bytes. The helper removed
    trees with shutil.rmtree, which recursed once a level and raised RecursionError past
    ~1,000: a replace swapped the new tree in, then reported failure and left the old one;
    a failed restore left its build beside the target, and every later restore there
    failed on it, until removed by hand."""
    src = work / "src"
    src.mkdir()
    fd = os.open(src, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(1500):  # (a level at a time: pathlib's mkdir recurses too)
        os.mkdir("d", dir_fd=fd)
        fd, up = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd), fd
        os.close(up)
    with open(os.open("f", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd), "wb") as f:
        f.write(b"deep")
    os.close(fd)
    (src / "w.bin").write_bytes(os.urandom(3 * SMALL_CHUNK))  # chunks of its own, corruptible
    origin = work / "origin"
    ids = publish_to(origin, work / "pub", {"t/deep": src}, chunk_size=SMALL_CHUNK)
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(10_000)  # (for the test's own os.walk and rmtree, which recurse)
    request.addfinalizer(lambda: sys.setrecursionlimit(limit))
    with Hostd(work / "d", origin=f"file://{origin}") as d:
        target = work / "out"
        assert d.restore("t/deep", target)["event"] == "result"
        out = d.restore("t/deep", target, replace=True)
        assert out["event"] == "result", out
        assert tree_digest(target) == tree_digest(src)
        assert hidden_builds(target) == []
    # a cold restore that fails on a corrupt chunk, once its deep tree is made
    m = read_manifest(origin, ids["t/deep"])
    stored = origin / chunk_key(next(f for f in m.files if f.path == "w.bin").chunks[-1].id)
    original = stored.read_bytes()
    stored.write_bytes(bytes(b ^ 0x40 for b in original))
    with Hostd(work / "d2", origin=f"file://{origin}") as d:
        target = work / "out2"
        failed(d.restore("t/deep", target), "chunk_corrupt")
        assert_nothing_made(target)
        stored.write_bytes(original)
        assert d.restore("t/deep", target)["event"] == "result"
        assert tree_digest(target) == tree_digest(src)


def test_a_tree_of_more_directories_than_descriptors_fails_and_leaves_nothing(
    work: Path,
) -> None:
    """The helper keeps each directory of the tree open while it is built. Out of
    descriptors, the restore fails, and said so; but the removal of the build needed one
    more, and left it, and a progressive restore left the directory whose open failed."""
    src = work / "src"
    for i in range(600):
        (src / f"d{i:03d}").mkdir(parents=True)
        (src / f"d{i:03d}" / "f").write_bytes(b"x")
    origin = f"file://{work}/origin"
    with Hostd(work / "pub", origin=origin) as pub:
        pub.publish(src, "t/wide")
    with Hostd(work / "d", origin=origin, wrap=["prlimit", "--nofile=400:400"]) as d:
        for target, progressive in ((work / "out", False), (work / "prog", True)):
            message = failed(d.restore("t/wide", target, progressive=progressive), "bad_request")
            assert "Too many open files" in message, message
            assert_nothing_made(target)
        assert_serving(d)


def test_a_replace_removes_the_old_tree_with_the_descriptors_the_new_one_held(
    work: Path,
) -> None:
    """The old tree is removed a level at a time, a descriptor each; the new tree's own (one
    per directory) were still open then. Near the descriptor limit the old tree was left
    (`old_tree_left`), with its build beside the target."""
    deep, wide = work / "deep", work / "wide"
    deep.joinpath(*["d"] * 80).mkdir(parents=True)
    deep.joinpath(*["d"] * 80, "f").write_bytes(b"deep")
    for i in range(330):
        (wide / f"w{i:03d}").mkdir(parents=True)
    (wide / "f").write_bytes(b"wide")
    origin = f"file://{work}/origin"
    with Hostd(work / "pub", origin=origin) as pub:
        pub.publish(deep, "t/deep")
        pub.publish(wide, "t/wide")
    with Hostd(work / "d", origin=origin, wrap=["prlimit", "--nofile=400:400"]) as d:
        target = work / "out"
        assert d.restore("t/deep", target)["event"] == "result"
        out = d.restore("t/wide", target, replace=True)
        assert out["event"] == "result", out
        assert "old_tree_left" not in out, out
        assert sorted(p.name for p in target.iterdir()) == sorted(p.name for p in wide.iterdir())
        assert hidden_builds(target) == []


# -- 5. the origin down or slow ----------------------------------------------------------------


def test_origin_down_retries_then_fails_and_cached_snapshots_still_restore(
    work: Path, s3_server: S3Bucket
) -> None:
    src = make_tree(work / "src")
    url = s3_server.url("fleet")
    with Hostd(work / "pub", origin=url, origin_options=s3_server.options) as pub:
        sid = pub.publish(src, "demo/cached")["snapshot"]
        pub.publish(make_tree(work / "src2", seed=2), "demo/uncached")
    with Hostd(work / "d", origin=url, origin_options=s3_server.options) as d:
        assert d.restore("demo/cached", work / "warm")["event"] == "result"

    # The same host, its S3 endpoint now a closed port: the origin is down.
    down = {**s3_server.options, "endpoint": f"http://127.0.0.1:{closed_port()}"}
    fast_retries: dict[str, Any] = {"retries": 3, "retry_base": "10ms", "retry_max": "40ms"}
    with Hostd(work / "d", origin=url, origin_options=down, **fast_retries) as d:
        target = work / "out-uncached"
        message = failed(d.restore("demo/uncached", target), "origin_error")
        assert url in message, message
        assert "3 attempts" in message, message
        assert_nothing_made(target)
        assert metric(d, "hostd_origin_requests_total", result="retried") == 2
        assert metric(d, "hostd_origin_requests_total", result="failed") == 1
        assert_serving(d)

        # A snapshot this host already has restores from its last known resolution.
        out = d.restore("demo/cached", work / "out-cached")
        assert out["event"] == "result", out
        assert out["stale_ref"] is True
        assert out["snapshot"] == sid
        assert out["bytes_by_source"]["origin"] == 0
        assert tree_digest(work / "out-cached") == tree_digest(src)
        assert_serving(d)


def test_origin_slow_times_out_retries_then_fails(work: Path) -> None:
    origin = work / "origin"
    publish_to(origin, work / "pub", {"demo/tree": make_tree(work / "src")})
    with HttpOrigin(origin) as http:
        http.stall = True
        config: dict[str, Any] = {"retries": 3, "retry_base": "10ms", "retry_max": "20ms"}
        with Hostd(work / "d", origin=http.url, request_timeout="500ms", **config) as d:
            target = work / "out"
            outcome: list[dict[str, Any]] = []
            client = threading.Thread(target=lambda: outcome.append(d.restore("demo/tree", target)))
            client.start()
            try:
                wait_for(
                    "a request hanging at the origin", lambda: bool(http.counts(http.requested))
                )
                assert_serving(d)  # answers while its origin hangs
            finally:
                client.join(DEADLINE)
            message = failed(outcome[0], "origin_error")
            assert http.url in message, message
            assert "3 attempts" in message, message
            # Three attempts at the first ref key, then the error; nothing else was asked.
            assert list(http.counts(http.requested).values()) == [3], http.requested
            assert_nothing_made(target)
            assert metric(d, "hostd_origin_requests_total", result="retried") == 2
            assert_serving(d)

            # When the origin answers again, the daemon has kept serving and restores.
            http.stall = False
            assert d.restore("demo/tree", target)["event"] == "result"


# -- 6. the target already exists --------------------------------------------------------------


def test_existing_target_is_refused_and_left_untouched(work: Path) -> None:
    with Hostd(work / "d") as d:
        d.publish(make_tree(work / "src"), "demo/tree")
        target = work / "existing"
        (target / "keep").mkdir(parents=True)
        (target / "keep" / "mine.txt").write_text("the user's work\n")
        os.symlink("keep/mine.txt", target / "link")
        before = tree_digest(target)
        message = failed(d.restore("demo/tree", target), "target_exists")
        assert str(target) in message
        assert tree_digest(target) == before
        assert hidden_builds(target) == []

        a_file = work / "a-file"
        a_file.write_text("not a directory\n")
        assert str(a_file) in failed(d.restore("demo/tree", a_file), "target_exists")
        assert a_file.read_text() == "not a directory\n"
        assert hidden_builds(a_file) == []

        cli = hostd_cli("restore", "demo/tree", str(target), "--socket", str(d.socket), home=d.root)
        assert cli.returncode == 1, (cli.returncode, cli.stderr)
        assert str(target) in cli.stderr, (cli.returncode, cli.stderr)
        assert tree_digest(target) == before
        assert_serving(d)

        # An empty directory is not "existing work": restoring into it is fine.
        (work / "empty").mkdir()
        assert d.restore("demo/tree", work / "empty")["event"] == "result"


# -- 7. a tier directory that is not writable ----------------------------------------------------


@pytest.mark.root
def test_read_only_tier_refuses_to_start_naming_the_tier(work: Path) -> None:
    need_root()
    ro = work / "d" / "disk"
    ro.mkdir(parents=True)
    tiers = [
        {"name": "mem", "path": str(work / "d" / "mem"), "budget": "64MiB"},
        {"name": "disk", "path": str(ro), "budget": "64MiB"},
    ]
    wrap = in_namespace(f"mount --bind {ro} {ro}; mount -o remount,bind,ro {ro}")
    d = Hostd(work / "d", tiers=tiers, wrap=wrap)
    try:
        with pytest.raises(RuntimeError, match="hostd exited with 1"):
            d.start()
    finally:
        d.close()  # only does something if it started after all
    log = d.log()
    assert "tier 'disk'" in log, log
    assert str(ro) in log, log
    assert "not writable" in log, log
    assert not d.socket.exists()


@pytest.mark.root
def test_tier_that_turns_read_only_fails_restore_with_tier_error(work: Path) -> None:
    need_root()
    origin = work / "origin"
    ids = publish_to(origin, work / "pub", {"demo/tree": make_tree(work / "src")})
    tier = work / "d" / "mem"
    tier.mkdir(parents=True)
    with Hostd(
        work / "d",
        origin=f"file://{origin}",
        tiers=[{"name": "mem", "path": str(tier), "budget": "64MiB"}],
        wrap=in_namespace(f"mount --bind {tier} {tier}"),
    ) as d:
        nsenter(d, "mount", "-o", "remount,bind,ro", str(tier))
        target = work / "out"
        message = failed(d.restore("demo/tree", target), "tier_error")
        assert "tier 'mem'" in message, message
        assert "not writable" in message, message
        assert_nothing_made(target)
        status = assert_serving(d)
        assert status["tiers"][0]["used"] == 0
        assert status["tiers"][0]["blobs"] == 0

        nsenter(d, "mount", "-o", "remount,bind,rw", str(tier))
        out = d.restore("demo/tree", target)
        assert out["event"] == "result", out
        assert out["snapshot"] == ids["demo/tree"], out


# -- 8. the tier's filesystem fills up during a fill ----------------------------------------------


@pytest.mark.root
def test_full_tmpfs_during_fill_is_tier_error_and_space_is_reclaimed(work: Path) -> None:
    need_root()
    origin = work / "origin"
    # One blob bigger than the filesystem: it can never complete, whatever the order.
    random_file(work / "big" / "weights.bin", 12 * 1024 * 1024, seed=1)
    random_file(work / "small" / "weights.bin", 2 * 1024 * 1024, seed=3)
    ids = publish_to(origin, work / "pub", {"big/x": work / "big", "small/x": work / "small"})
    tier = work / "d" / "mem"
    tier.mkdir(parents=True)
    with Hostd(
        work / "d",
        origin=f"file://{origin}",
        # The budget says 64 MiB; the filesystem under it holds 8.
        tiers=[{"name": "mem", "path": str(tier), "budget": "64MiB"}],
        # mode=0700: a fresh tmpfs is 1777 (sticky), which hostd refuses as a shared directory.
        wrap=in_namespace(f"mount -t tmpfs -o size=8m,mode=0700 hostd-test {tier}"),
    ) as d:

        def fs_used() -> int:
            blocks, free, size = nsenter(d, "stat", "-f", "-c", "%b %f %S", str(tier)).split()
            return (int(blocks) - int(free)) * int(size)

        assert "hostd-test" in nsenter(d, "findmnt", "-n", "-o", "SOURCE", str(tier))
        target = work / "out-big"
        message = failed(d.restore("big/x", target), "tier_error")
        # (refused at admission: the filesystem was measured; or while written: full)
        assert "mem: " in message or "tier 'mem'" in message, message
        assert "filesystem" in message, message
        assert_nothing_made(target)
        # No blob marked complete, no partial left, the space given back.
        assert nsenter(d, "find", str(tier / "blobs"), "-type", "f") == ""
        assert nsenter(d, "ls", "-A", str(tier / "partial")) == ""
        assert fs_used() < 256 * 1024, fs_used()
        status = assert_serving(d)
        assert status["tiers"][0]["used"] == 0
        assert status["tiers"][0]["blobs"] == 0
        (snap,) = d.api("GET", "/v1/snapshots")[1]["snapshots"]
        assert snap["id"] == ids["big/x"]
        assert snap["complete"] is False

        # What fits still restores.
        out = d.restore("small/x", work / "out-small")
        assert out["event"] == "result", out
        assert tree_digest(work / "out-small") == tree_digest(work / "small")
        assert assert_serving(d)["tiers"][0]["used"] == 2 * 1024 * 1024


# -- 9. SIGKILL in the middle of a fetch, then a restart ------------------------------------------


def _consume(sock: Path, body: dict[str, Any], events: list[dict[str, Any]]) -> None:
    """Read a restore's stream until it ends or the daemon dies under it (a cut chunked
    stream may read as a clean end or as an error; either is recorded)."""
    try:
        for ev in iter_events(sock, "/v1/restore", body):
            events.append(ev)
    except Exception as e:  # the daemon was killed mid-stream
        events.append({"event": "gone", "why": repr(e)})
    else:
        events.append({"event": "end"})


def test_sigkill_mid_fetch_then_restart_resumes_without_refetching(work: Path) -> None:
    origin = work / "origin"
    (work / "src").mkdir()
    random_file(work / "src" / "model.bin", 40 * SMALL_CHUNK, seed=9)
    random_file(work / "src" / "tail.bin", 3 * SMALL_CHUNK + 5, seed=10)
    ids = publish_to(origin, work / "pub", {"demo/model": work / "src"}, chunk_size=SMALL_CHUNK)
    m = read_manifest(origin, ids["demo/model"])
    model = next(f for f in m.files if f.path == "model.bin")
    all_keys = {chunk_key(c.id) for f in m.files for c in f.chunks}
    have_path = work / "d" / "mem" / "partial" / f"{model.digest.hex()}.have"
    target = work / "out"
    let_through = 10

    with HttpOrigin(origin) as http, Hostd(work / "d", origin=http.url, fetch_concurrency=4) as d:
        http.gate(0)
        events: list[dict[str, Any]] = []
        reader = threading.Thread(
            target=_consume, args=(d.socket, {"ref": "demo/model", "target": str(target)}, events)
        )
        reader.start()
        try:
            wait_for("the fetch to queue at the gate", lambda: http.waiting == 4)
            http.allow(let_through)

            def written() -> int:
                return have_path.read_bytes().count(1) if have_path.exists() else 0

            wait_for(f"{let_through} chunks on disk", lambda: written() == let_through)
            d.kill()  # SIGKILL
        finally:
            reader.join(DEADLINE)
        # The stream was cut: no outcome ever reached the client.
        assert events, events
        assert all(e["event"] not in ("result", "error") for e in events), events
        wait_for("the killed daemon's requests to go", lambda: http.waiting == 0)
        assert_nothing_left(target)
        present = have_path.read_bytes()
        kept = {chunk_key(c.id) for c, h in zip(model.chunks, present, strict=True) if h}
        assert len(kept) == let_through
        served_before = http.chunk_counts(http.served)
        assert set(served_before) == kept, (served_before, kept)

        http.gate(None)
        d.start()
        out = d.restore("demo/model", target)
        assert out["event"] == "result", out
        assert tree_digest(target) == tree_digest(work / "src")
        assert out["bytes_by_source"]["resumed"] == let_through * SMALL_CHUNK, out
        # The origin sent every chunk exactly once over both runs: the kept ones only before.
        served = http.chunk_counts(http.served)
        assert served == dict.fromkeys(all_keys, 1), served
        requested = http.chunk_counts(http.requested)
        assert all(requested[k] == 1 for k in kept), requested

        cli = hostd_cli("verify", "--json", "--socket", str(d.socket), home=d.root)
        assert cli.returncode == 0, (cli.stdout, cli.stderr)
        assert '"bad": []' in cli.stdout or '"bad":[]' in cli.stdout, cli.stdout
        assert_serving(d)


def small_tree(root: Path, files: int, seed: int) -> Path:
    """`files` files of 1-4 KiB (a compile cache's shape) in directories of 100, each with its
    own past mtime, nanoseconds included (one before 1970)."""
    import random

    rng = random.Random(seed)
    for i in range(files):
        p = root / f"d{i // 100:02d}" / f"f{i:04d}.bin"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(rng.randbytes(rng.randint(1024, 4096)))
        mtime = -123_456_789 if i == 7 else 1_500_000_000 * 10**9 + rng.randrange(10**17)
        os.utime(p, ns=(mtime, mtime))
    return root


def recorded_blobs(index: Path, tier: str) -> list[tuple[bytes, int, int]]:
    """(digest, size, mtime_ns) of each blob the index records as complete in `tier`."""
    import sqlite3

    db = sqlite3.connect(f"file:{index}?mode=ro", uri=True)
    try:
        rows = db.execute(
            "SELECT digest, size, mtime_ns FROM blobs WHERE complete=1 AND tier=?", (tier,)
        ).fetchall()
    finally:
        db.close()
    return [(bytes(d), int(n), int(m)) for d, n, m in rows]


def test_sigkill_mid_fill_of_small_files_then_restart_serves_every_byte(work: Path) -> None:
    """Small files are written without an fsync each and recorded a batch at a time after a
    syncfs. Killed mid-fill, the daemon leaves blobs recorded (each intact, with its file's
    mtime) and maybe blobs on disk with no row yet; the next one re-hashes those before use,
    keeps what it recorded, and restores a tree identical to the source, byte for byte."""
    from hostd.cache import blob_is_intact

    origin = work / "origin"
    src = small_tree(work / "src", 600, seed=12)
    ids = publish_to(origin, work / "pub", {"demo/small": src}, chunk_size=SMALL_CHUNK)
    m = read_manifest(origin, ids["demo/small"])
    packs = {c.packed.pack for f in m.files for c in f.chunks if c.packed is not None}
    assert len(packs) >= 10, "the small files should be packed"
    tier = work / "d" / "mem"
    index = work / "d" / "state" / "index.sqlite3"
    target = work / "out"

    with (
        HttpOrigin(origin, gated=("chunks/", "packs/")) as http,
        Hostd(work / "d", origin=http.url, fetch_concurrency=4) as d,
    ):
        http.gate(0)
        events: list[dict[str, Any]] = []
        reader = threading.Thread(
            target=_consume, args=(d.socket, {"ref": "demo/small", "target": str(target)}, events)
        )
        reader.start()
        try:
            wait_for("the fill to queue at the gate", lambda: http.waiting > 0)
            http.allow(len(packs) // 2)
            # Some batches synced and recorded; the fill goes on through the allowed packs.
            wait_for("recorded batches", lambda: len(recorded_blobs(index, "mem")) >= 100)
            d.kill()  # SIGKILL, mid-fill
        finally:
            reader.join(DEADLINE)
        assert all(e["event"] not in ("result", "error") for e in events), events
        assert_nothing_left(target)

        # What the index records is there, intact, with the mtime it records.
        recorded = recorded_blobs(index, "mem")
        assert len(recorded) >= 100
        for digest, size, mtime in recorded:
            path = tier / "blobs" / digest.hex()[:2] / digest.hex()
            st = os.stat(path)
            assert (st.st_size, st.st_mtime_ns) == (size, mtime), digest.hex()
            assert blob_is_intact(path, digest, size, SMALL_CHUNK) is None, digest.hex()
        on_disk = {p.name for p in (tier / "blobs").glob("*/*")}
        assert {d.hex() for d, _, _ in recorded} <= on_disk
        assert len(on_disk) < len(m.files), "killed before the fill ended"

        http.gate(None)
        d.start()
        out = d.restore("demo/small", target)
        assert out["event"] == "result", out
        assert tree_digest(target) == tree_digest(src)  # every byte, exec bit and mtime
        # What was recorded was kept, not fetched again.
        assert out["bytes_by_source"]["mem"] >= sum(size for _, size, _ in recorded), out
        cli = hostd_cli("verify", "--json", "--socket", str(d.socket), home=d.root)
        assert cli.returncode == 0, (cli.stdout, cli.stderr)
        assert '"bad": []' in cli.stdout or '"bad":[]' in cli.stdout, cli.stdout
        # Once the restore is through, every blob it made is recorded.
        assert len(recorded_blobs(index, "mem")) == len(m.blobs())
        assert_serving(d)


# -- 10. the client goes away in the middle of a restore ---------------------------------------


def test_client_disconnect_cancels_restore_and_leaves_nothing(work: Path) -> None:
    origin = work / "origin"
    src = make_tree(work / "src")
    publish_to(origin, work / "pub", {"demo/tree": src}, chunk_size=SMALL_CHUNK)
    target = work / "out"
    with HttpOrigin(origin) as http, Hostd(work / "d", origin=http.url) as d:
        http.gate(0)
        body = {"ref": "demo/tree", "target": str(target)}
        stream = cast(
            Generator[dict[str, Any], None, None], iter_events(d.socket, "/v1/restore", body)
        )
        try:
            for ev in stream:
                assert ev["event"] == "progress", ev
                if ev["phase"] == "fetch":
                    break
            wait_for("chunk requests at the gate", lambda: http.waiting > 0)
        finally:
            stream.close()  # the client hangs up mid-restore

        def cancelled() -> float:
            return metric(d, "hostd_operations_total", 0, operation="restore", result="cancelled")

        wait_for("the restore to be cancelled", lambda: cancelled() == 1)
        wait_for("no operation in flight", lambda: assert_serving(d)["in_flight"] == 0)
        wait_for("no chunk fetch in flight", lambda: metric(d, "hostd_chunks_in_flight") == 0)
        assert_nothing_made(target)
        assert http.chunk_counts(http.served) == {}

        http.gate(None)
        out = d.restore("demo/tree", target)
        assert out["event"] == "result", out
        assert tree_digest(target) == tree_digest(src)
        assert hidden_builds(target) == []


# A client that connects, asks for a restore and reads its events until it is killed.
_RESTORING_CLIENT = r"""
import json, socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
body = json.dumps(json.loads(sys.argv[2])).encode()
head = b"POST /v1/restore HTTP/1.1\r\nHost: h\r\nContent-Type: application/json\r\n"
s.sendall(head + b"Content-Length: %d\r\n\r\n" % len(body) + body)
while s.recv(65536):
    pass
"""


@pytest.mark.parametrize("progressive", [False, True], ids=["copy", "progressive"])
def test_a_client_killed_while_its_tree_is_made_leaves_nothing(
    work: Path, progressive: bool
) -> None:
    """The caller is killed while the helper makes the tree's directories and empty files
    (the placer's begin, on its own thread). The cancel closed the helper under that
    thread, and its clean-up then needed a new helper in the caller's root, which a dead
    caller no longer has: the hidden build (or a progressive restore's target, with its
    directories and empty files) stayed for good. Now the cancel waits for begin, and the
    helper takes back what it made."""
    src = work / "src"
    for i in range(3000):  # many directories: begin makes each of them
        sub = src / f"a{i % 30:02d}" / f"b{i:04d}"
        sub.mkdir(parents=True)
        (sub / "f").write_bytes(b"x" * (1 + i % 500))
    (src / "e").mkdir()
    for i in range(2000):  # and empty files, made right after them
        (src / "e" / f"{i:04d}").write_bytes(b"")
    origin = work / "origin"
    publish_to(origin, work / "pub", {"demo/dirs": src})
    target = work / "out"

    def made() -> list[Path]:  # what begin makes: the hidden build, or the target itself
        if progressive:
            return [target] if target.exists() else []
        return [target.parent / n for n in hidden_builds(target)]

    def trees() -> list[Path]:  # where it makes the tree: the build's, or the target
        return made() if progressive else [m / fsops.BUILD_TREE for m in made()]

    with Hostd(work / "d", origin=f"file://{origin}") as d:
        body: dict[str, Any] = {"ref": "demo/dirs", "target": str(target), "mode": "copy"}
        if progressive:
            body["progressive"] = True
        client = subprocess.Popen(
            [sys.executable, "-c", _RESTORING_CLIENT, str(d.socket), json.dumps(body)]
        )
        try:
            # killed once the empty files are being made: begin is running
            wait_for(
                "the tree's empty files to be made",
                lambda: any((m / "e").is_dir() and os.listdir(m / "e") for m in trees()),
            )
        finally:
            client.kill()
            client.wait()
        wait_for("the restore to be cancelled", lambda: assert_serving(d)["in_flight"] == 0)
        wait_for("what begin made to be taken back", lambda: not made(), timeout=30)
        assert "could not clean up" not in d.log()
        out = d.restore("demo/dirs", target)
        assert out["event"] == "result", out
        assert tree_digest(target) == tree_digest(src)


# -- 11. bad config values --------------------------------------------------------------------


BAD_CONFIG: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    ("tiers[0].budget", {}, {"budget": "lots"}),
    ("tiers[0].budget", {}, {"budget": True}),
    ("tiers[0].path", {}, {"path": ""}),
    ("socket_mode", {"socket_mode": "rw-rw----"}, {}),
    ("socket_mode", {"socket_mode": 660}, {}),
    ("metrics_address", {"metrics_address": "localhost"}, {}),
    ("metrics_address", {"metrics_address": "127.0.0.1:99999"}, {}),
    ("origin", {"origin": "ftp://host/x"}, {}),
    ("origin", {"origin": "file://relative/dir"}, {}),
    ("origin_options", {"origin_options": {"region": "x"}}, {}),  # file:// takes none
    ("origin_options", {"origin": "s3://b/p", "origin_options": {"no_such_option": "1"}}, {}),
    ("retries", {"retries": 0}, {}),
    ("request_timeout", {"request_timeout": "soon"}, {}),
    ("socket", {"socket": "/tmp/" + "s" * 120 + ".sock"}, {}),
    ("fetch_concurency", {"fetch_concurency": 4}, {}),
]


@pytest.mark.parametrize(
    ("key", "top", "tier"),
    BAD_CONFIG,
    ids=[f"{k}={next(iter({**t, **x}.values()))!r}"[:40] for k, t, x in BAD_CONFIG],
)
def test_bad_config_value_exits_2_naming_the_key(
    work: Path, key: str, top: dict[str, Any], tier: dict[str, Any]
) -> None:
    values: dict[str, Any] = {
        "origin": f"file://{work}/origin",
        "socket": str(work / "s.sock"),
        "index": str(work / "state" / "index.sqlite3"),
        "metrics_address": "127.0.0.1:0",
        **top,
    }
    tiers = [{"name": "mem", "path": str(work / "mem"), "budget": "64MiB", **tier}]
    config = work / "hostd.toml"
    write_toml(config, values, tiers)
    done = hostd_cli("serve", "--config", str(config), home=work / "home")
    assert done.returncode == 2, (done.returncode, done.stderr)
    said = [line for line in done.stderr.splitlines() if line.startswith("hostd: ")]
    assert len(said) == 1, done.stderr
    assert repr(key) in said[0], done.stderr
    assert not (work / "s.sock").exists()
