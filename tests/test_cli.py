"""The `hostd` CLI and its client, against a fake local API on a real Unix socket.

`FakeDaemon` implements the local API contract (docs/ARCHITECTURE.md, "Local API and events")
in memory: JSON error bodies for every error, NDJSON streams that end in one `result` or
`error`, and a few refs that misbehave on purpose (a stream cut short, one cut mid-line, one
that never ends). It runs its own event loop in a thread, because `main` blocks the thread
that calls it; the tests call `main([...])` in-process and read stdout/stderr with capsys, and
a few run `python -m hostd` as a real process. Concurrent events are ordered with threading
events and deadlines, never sleeps."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from hostd import __version__
from hostd.cli import main
from hostd.client import Client, EventReader, error_from_code, resolve_socket
from hostd.errors import HostdError, TargetExists
from hostd.output import PlainPrinter
from hostd.paths import default_paths

JSON = dict[str, Any]
REPO = Path(__file__).resolve().parents[1]
SNAPSHOT_FILES = {"config.json": b'{"layers": 2}', "weights/model.safetensors": b"\x01" * 5000}
DEADLINE = 20.0


class FakeError(Exception):
    """An API error answered as a JSON body before any stream starts."""

    def __init__(self, status: int, code: str, message: str, **extra: object) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.extra = extra


class FakeDaemon:
    """The local API over a Unix socket, in memory. Refs with special behaviour:

    - `cut/early`: a progress event, then the stream ends cleanly with no result or error;
    - `cut/abort`: a progress event and half a line, then the connection is cut;
    - `fail/origin`: a progress event, then an `origin_error` error event;
    - `cut/stopping`: a progress event, then the `unavailable` error event a stopping daemon
      sends when its drain runs out (api_local's cancelled operation);
    - `refused/stopping`, `refused/busy`: 503 `unavailable` before any stream, from a daemon
      that is stopping (`"stopping": true`), or over a cap;
    - `bad/line`: a line that is not JSON;
    - `hang`: a progress event, then nothing until the client goes (sets `cancelled`).
    """

    def __init__(self, socket_path: Path) -> None:
        self.socket_path = socket_path
        self.refs: dict[str, str] = {}
        self.snapshots: dict[str, JSON] = {}
        self.contents: dict[str, dict[str, bytes]] = {}
        self.bad_blobs: list[JSON] = []
        self.plain_text_errors = False
        self.requests: list[tuple[str, JSON]] = []
        self.streaming = threading.Event()  # `hang` sent its first event
        self.cancelled = threading.Event()  # ... and then saw the client go
        self._loop = asyncio.new_event_loop()
        # A daemon thread: a test that fails before stop() must not hang the interpreter.
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="fake-hostd", daemon=True
        )
        self._runner: web.AppRunner | None = None

    def __repr__(self) -> str:
        return f"<FakeDaemon {self.socket_path} snapshots={len(self.snapshots)}>"

    # -- life cycle ---------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(DEADLINE)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self._runner is not None:
            future = asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop)
            future.result(DEADLINE)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(DEADLINE)
        self._loop.close()

    async def _start(self) -> None:
        app = web.Application(middlewares=[self._errors])
        app.add_routes(
            [
                web.get("/v1/status", self._status),
                web.get("/v1/snapshots", self._snapshots),
                web.post("/v1/restore", self._restore),
                web.post("/v1/publish", self._publish),
                web.post("/v1/prefetch", self._prefetch),
                web.post("/v1/pin", self._pin),
                web.post("/v1/unpin", self._unpin),
                web.post("/v1/gc", self._gc),
                web.post("/v1/verify", self._verify),
                web.get("/metrics", self._metrics),
            ]
        )
        # handler_cancellation: a client that goes cancels its stream, as the daemon's does.
        self._runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=1.0)
        await self._runner.setup()
        await web.UnixSite(self._runner, str(self.socket_path)).start()

    # -- state --------------------------------------------------------------------------------

    def add_snapshot(self, ref: str, files: dict[str, bytes]) -> str:
        digest = hashlib.sha256()
        for name in sorted(files):
            digest.update(name.encode() + b"\0" + hashlib.sha256(files[name]).digest())
        snapshot_id = digest.hexdigest()
        self.contents[snapshot_id] = dict(files)
        entry = self.snapshots.setdefault(
            snapshot_id,
            {
                "id": snapshot_id,
                "refs": [],
                "files": len(files),
                "bytes": sum(len(data) for data in files.values()),
                "pinned": False,
                "last_used": None,
                "tiers": {"mem": 0, "disk": sum(len(data) for data in files.values())},
                "complete": True,
            },
        )
        if ref not in entry["refs"]:
            entry["refs"].append(ref)
        self.refs[ref] = snapshot_id
        return snapshot_id

    def last_body(self, path: str) -> JSON:
        return next(body for seen, body in reversed(self.requests) if seen == path)

    # -- plumbing -----------------------------------------------------------------------------

    @web.middleware
    async def _errors(
        self, request: web.Request, handler: Any
    ) -> web.StreamResponse:  # every error is {"error", "message"}
        try:
            response: web.StreamResponse = await handler(request)
            return response
        except FakeError as exc:
            body = {"error": exc.code, "message": exc.message, **exc.extra}
            return web.json_response(body, status=exc.status)
        except web.HTTPException as exc:
            code = "not_found" if exc.status == 404 else "bad_request"
            body = {"error": code, "message": f"{request.method} {request.path}: {exc.reason}"}
            return web.json_response(body, status=exc.status)

    async def _body(self, request: web.Request) -> JSON:
        try:
            body = await request.json()
        except ValueError as exc:
            raise FakeError(400, "bad_request", "body is not JSON") from exc
        if not isinstance(body, dict):
            raise FakeError(400, "bad_request", "body is not a JSON object")
        compat = body.get("compat", {})
        if not isinstance(compat, dict) or not all(isinstance(v, str) for v in compat.values()):
            raise FakeError(400, "bad_request", "compat must map names to strings")
        self.requests.append((request.path, body))
        return body

    @staticmethod
    def _absolute(body: JSON, key: str) -> str:
        value = body.get(key)
        if not isinstance(value, str) or not os.path.isabs(value):
            raise FakeError(400, "bad_request", f"{key} must be an absolute path")
        return value

    @staticmethod
    async def _open(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.content_type = "application/x-ndjson"
        await response.prepare(request)
        return response

    @staticmethod
    async def _send(response: web.StreamResponse, event: JSON) -> None:
        await response.write(json.dumps(event).encode() + b"\n")

    async def _misbehave(
        self, request: web.Request, response: web.StreamResponse, ref: str
    ) -> bool:
        """Play one of the misbehaving refs; False when `ref` is not one of them."""
        if ref == "cut/early":
            await self._send(response, {"event": "progress", "phase": "resolve"})
        elif ref == "cut/abort":
            await self._send(response, {"event": "progress", "phase": "fetch"})
            await response.write(b'{"event": "res')
            assert request.transport is not None
            request.transport.abort()
        elif ref == "fail/origin":
            await self._send(response, {"event": "progress", "phase": "fetch"})
            error = {"event": "error", "error": "origin_error", "message": "origin said 403"}
            await self._send(response, error)
        elif ref == "cut/stopping":
            await self._send(response, {"event": "progress", "phase": "fetch"})
            message = "hostd stopped before the restore finished; it was cancelled"
            stopped = {"event": "error", "error": "unavailable", "message": message}
            await self._send(response, stopped)
        elif ref == "bad/line":
            await response.write(b"this is not json\n")
        elif ref == "hang":
            await self._send(response, {"event": "progress", "phase": "fetch", "done_bytes": 0})
            self.streaming.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
        else:
            return False
        return True

    async def _resolve(self, response: web.StreamResponse, body: JSON) -> str | None:
        ref = body.get("ref")
        snapshot_id = self.refs.get(str(ref))
        if snapshot_id is None:
            message = f"no snapshot for ref {ref!r} under this host's compat key"
            await self._send(response, {"event": "error", "error": "not_found", "message": message})
        return snapshot_id

    # -- endpoints ----------------------------------------------------------------------------

    async def _status(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "version": "0.1.0",
                "pid": 4242,
                "uptime": 3725.5,
                "socket": str(self.socket_path),
                "metrics_address": "127.0.0.1:39111",
                "origin": "file:///var/lib/hostd/origin",
                "tiers": [
                    {
                        "name": "mem",
                        "path": "/dev/shm/hostd",
                        "budget": 1 << 30,
                        "used": 1 << 28,
                        "blobs": 3,
                        "room": 1 << 29,  # (others write /dev/shm too)
                    },
                    {
                        "name": "disk",
                        "path": "/var/cache/hostd",
                        "budget": 8 << 30,
                        "used": 0,
                        "blobs": 0,
                    },
                ],
                "in_flight": 1,
                "peers": {
                    "listen": "10.0.0.1:7460",
                    "node": "00112233aabbccdd",
                    "self": "10.0.0.1:7460",
                    "auth": "hmac",
                    "members": [
                        {"address": "10.0.0.1:7460", "state": "self", "for_s": 10.0},
                        {
                            "address": "10.0.0.2:7460",
                            "state": "rejecting",
                            "for_s": 65.0,
                            "strikes": 0,
                            "last_error": "peer 10.0.0.2:7460: signature does not match",
                        },
                    ],
                },
            }
        )

    async def _snapshots(self, request: web.Request) -> web.Response:
        return web.json_response({"snapshots": list(self.snapshots.values())})

    async def _restore(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        target = self._absolute(body, "target")
        if body.get("mode") not in ("link", "copy", "auto"):
            raise FakeError(400, "bad_request", "mode must be link, copy or auto")
        if body.get("ref") == "refused/stopping":
            message = "hostd is stopping; try again once it is back"
            raise FakeError(503, "unavailable", message, stopping=True)
        if body.get("ref") == "refused/busy":
            raise FakeError(503, "unavailable", "uid 0 has 4 operations running")
        response = await self._open(request)
        if await self._misbehave(request, response, str(body.get("ref"))):
            return response
        await self._send(
            response,
            {
                "event": "progress",
                "phase": "resolve",
                "done_bytes": 0,
                "total_bytes": 0,
                "done_files": 0,
                "total_files": 0,
            },
        )
        snapshot_id = await self._resolve(response, body)
        if snapshot_id is None:
            return response
        files = self.contents[snapshot_id]
        total = sum(len(data) for data in files.values())
        if await asyncio.to_thread(_occupied, Path(target)) and not body.get("replace"):
            message = f"{target} exists and is not empty (use replace)"
            await self._send(
                response, {"event": "error", "error": "target_exists", "message": message}
            )
            return response
        for phase in ("fetch", "materialize"):
            for done in (0, total):
                await self._send(
                    response,
                    {
                        "event": "progress",
                        "phase": phase,
                        "done_bytes": done,
                        "total_bytes": total,
                        "done_files": len(files) * (done == total),
                        "total_files": len(files),
                    },
                )
        await asyncio.to_thread(_materialize, Path(target), files)
        self.snapshots[snapshot_id]["last_used"] = 1_700_000_000
        result = {
            "event": "result",
            "snapshot": snapshot_id,
            "ref": body["ref"],
            "target": target,
            "files": len(files),
            "bytes": total,
            "timings": {"resolve": 0.001, "fetch": 0.25, "materialize": 0.02, "total": 0.271},
            "bytes_by_source": {"mem": 0, "disk": total - 1000, "origin": 1000},
        }
        await self._send(response, result)
        return response

    async def _publish(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        path = self._absolute(body, "path")
        ref = body.get("ref")
        if not isinstance(ref, str) or not ref:
            raise FakeError(400, "bad_request", "ref must be a non-empty string")
        if not await asyncio.to_thread(os.path.isdir, path):
            raise FakeError(400, "bad_request", f"{path} is not a directory")
        response = await self._open(request)
        files = await asyncio.to_thread(_read_tree, Path(path))
        total = sum(len(data) for data in files.values())
        for phase in ("hash", "upload"):
            await self._send(
                response,
                {"event": "progress", "phase": phase, "done_bytes": total, "total_bytes": total},
            )
        snapshot_id = self.add_snapshot(ref, files)
        chunks = sum(max(1, -(-len(data) // (4 << 20))) for data in files.values())
        result = {
            "event": "result",
            "snapshot": snapshot_id,
            "ref": ref,
            "files": len(files),
            "chunks": chunks,
            "bytes": total,
            "new_chunks": chunks,
            "compressed_chunks": 1,
            "stored_bytes": total - 10,
            "timings": {"hash": 0.01, "upload": 0.02, "total": 0.03},
        }
        await self._send(response, result)
        return response

    async def _prefetch(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        asked = body.get("tier")
        tier = asked or "mem"
        if tier not in ("mem", "disk"):
            raise FakeError(400, "bad_request", f"no tier named {tier!r}")
        response = await self._open(request)
        if await self._misbehave(request, response, str(body.get("ref"))):
            return response
        snapshot_id = await self._resolve(response, body)
        if snapshot_id is None:
            return response
        size = self.snapshots[snapshot_id]["bytes"]
        await self._send(
            response,
            {"event": "progress", "phase": "fetch", "done_bytes": size, "total_bytes": size},
        )
        result = {
            "event": "result",
            "snapshot": snapshot_id,
            "ref": body["ref"],
            "tier": asked,
            "tiers": {"mem": size if tier == "mem" else 0, "disk": size if tier == "disk" else 0},
            "bytes": size,
            "bytes_by_source": {"disk": size},
            "timings": {"fetch": 0.5, "total": 0.5},
        }
        await self._send(response, result)
        return response

    async def _pin(self, request: web.Request) -> web.Response:
        return await self._set_pin(request, pinned=True)

    async def _unpin(self, request: web.Request) -> web.Response:
        return await self._set_pin(request, pinned=False)

    async def _set_pin(self, request: web.Request, *, pinned: bool) -> web.Response:
        body = await self._body(request)
        if ("ref" in body) == ("snapshot" in body):
            raise FakeError(400, "bad_request", "name one of ref or snapshot")
        if "ref" in body:
            snapshot_id = self.refs.get(body["ref"])
            if snapshot_id is None:
                raise FakeError(404, "not_found", f"no snapshot for ref {body['ref']!r}")
        else:
            snapshot_id = body["snapshot"]
            if snapshot_id not in self.snapshots:
                raise FakeError(404, "not_found", f"no snapshot {snapshot_id}")
        self.snapshots[snapshot_id]["pinned"] = pinned
        return web.json_response({"snapshot": snapshot_id, "pinned": pinned})

    async def _gc(self, request: web.Request) -> web.Response:
        await self._body(request)
        if self.plain_text_errors:  # what a proxy or a panicking server might send
            return web.Response(status=500, text="Internal Server Error")
        return web.json_response(
            {"removed_blobs": 2, "freed_bytes": 3 << 20, "removed_partials": 1}
        )

    async def _verify(self, request: web.Request) -> web.StreamResponse:
        await self._body(request)
        response = await self._open(request)
        total = sum(snap["bytes"] for snap in self.snapshots.values())
        await self._send(
            response,
            {"event": "progress", "phase": "verify", "done_bytes": total, "total_bytes": total},
        )
        result = {
            "event": "result",
            "checked_blobs": 2 * len(self.snapshots),
            "checked_bytes": total,
            "bad": self.bad_blobs,
        }
        await self._send(response, result)
        return response

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(text='hostd_restores_total{result="ok"} 1\n')


def _occupied(path: Path) -> bool:
    return path.exists() and any(path.iterdir())


def _materialize(target: Path, files: dict[str, bytes]) -> None:
    if target.exists():
        shutil.rmtree(target)
    for name, data in files.items():
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        (target / name).write_bytes(data)


def _read_tree(root: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(root)): path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


# -- fixtures -------------------------------------------------------------------------------


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory under /tmp: tmp_path can be longer than a Unix socket path may be."""
    path = Path(tempfile.mkdtemp(prefix="hostd-cli-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def daemon(short_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeDaemon]:
    monkeypatch.delenv("HOSTD_SOCKET", raising=False)
    fake = FakeDaemon(short_dir / "hostd.sock")
    fake.add_snapshot("models/tiny", SNAPSHOT_FILES)
    fake.start()
    yield fake
    fake.stop()


@pytest.fixture
def sock(daemon: FakeDaemon) -> list[str]:
    return ["--socket", str(daemon.socket_path)]


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> JSON:
    """Run a command with --json; it must succeed with one JSON object and a silent stderr."""
    code = main([*argv, "--json"])
    out, err = capsys.readouterr()
    assert (code, err) == (0, "")
    assert out.endswith("\n")
    assert out.count("\n") == 1
    result = json.loads(out)
    assert isinstance(result, dict)
    return result


def run_human(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert (code, err) == (0, "")
    assert "\x1b" not in out  # not a terminal: no control codes
    return out


def run_failing(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    """Run a command that fails: nothing on stdout, one `hostd: ...` line on stderr."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("hostd: "), err
    assert err.endswith("\n"), err
    assert err.count("\n") == 1, err
    return code, err


# -- status, ls, gc -------------------------------------------------------------------------


def test_status(daemon: FakeDaemon, sock: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    result = run_json(capsys, "status", *sock)
    assert result["pid"] == 4242
    assert result["tiers"][0]["name"] == "mem"

    out = run_human(capsys, "status", *sock)
    assert "4242" in out
    assert "1h 02m 05s" in out
    assert "127.0.0.1:39111" in out
    assert "/dev/shm/hostd" in out
    assert "25%" in out
    assert "1.0 GiB" in out
    assert "tier mem: its filesystem leaves it room for 512.0 MiB of its 1.0 GiB budget" in out
    assert "tier disk:" not in out  # (room as its budget, or not told)
    rejecting = next(line for line in out.splitlines() if "10.0.0.2:7460" in line)
    assert "rejecting" in rejecting
    assert "1m 05s" in rejecting
    assert "signature does not match" in rejecting


def test_ls(daemon: FakeDaemon, sock: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    [snapshot_id] = daemon.snapshots
    result = run_json(capsys, "ls", *sock)
    assert [snap["id"] for snap in result["snapshots"]] == [snapshot_id]

    out = run_human(capsys, "ls", *sock)
    header, row = out.splitlines()
    assert header.split()[:2] == ["SNAPSHOT", "REFS"]
    assert row.startswith(snapshot_id[:12] + " ")  # short ids; --wide gives whole ones
    assert snapshot_id in run_human(capsys, "ls", "--wide", *sock)
    assert "models/tiny" in row
    assert "never" in row
    assert "complete" in row

    daemon.snapshots.clear()
    assert run_human(capsys, "ls", *sock) == "no snapshots\n"


def test_gc(daemon: FakeDaemon, sock: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert run_json(capsys, "gc", *sock) == {
        "removed_blobs": 2,
        "freed_bytes": 3 << 20,
        "removed_partials": 1,
    }
    out = run_human(capsys, "gc", *sock)
    assert "removed blobs" in out
    assert "3.0 MiB (3,145,728 bytes)" in out


# -- restore --------------------------------------------------------------------------------


def test_restore_json_sends_an_absolute_target(
    daemon: FakeDaemon,
    sock: list[str],
    short_dir: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(short_dir)
    result = run_json(
        capsys, "restore", "models/tiny", "out", "--mode", "copy",
        "--compat", "image=sha256:abc", "--compat", "x=a=b", *sock,
    )  # fmt: skip
    target = str(short_dir / "out")
    assert result["target"] == target
    assert result["files"] == 2
    assert "event" not in result
    assert set(result["timings"]) == {"resolve", "fetch", "materialize", "total"}
    assert daemon.last_body("/v1/restore") == {
        "ref": "models/tiny",
        "target": target,
        "mode": "copy",
        "replace": False,
        "compat": {"image": "sha256:abc", "x": "a=b"},
    }
    assert (short_dir / "out" / "config.json").read_bytes() == SNAPSHOT_FILES["config.json"]


def test_restore_human(
    daemon: FakeDaemon, sock: list[str], short_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = run_human(capsys, "restore", "models/tiny", str(short_dir / "out"), *sock)
    [snapshot_id] = daemon.snapshots
    assert snapshot_id in out
    assert "resolve 0.001 s, fetch 0.250 s, materialize 0.020 s, total 0.271 s" in out
    assert "mem 0 B, disk 3.9 KiB, origin 1000 B" in out
    assert "4.9 KiB (5,013 bytes)" in out


def test_restore_target_exists_then_replace(
    daemon: FakeDaemon, sock: list[str], short_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = short_dir / "out"
    target.mkdir()
    (target / "stale").write_text("old")
    code, err = run_failing(capsys, "restore", "models/tiny", str(target), *sock)
    assert code == 1
    assert "exists and is not empty" in err
    run_json(capsys, "restore", "models/tiny", str(target), "--replace", *sock)
    assert not (target / "stale").exists()


def test_restore_unknown_ref_exits_3(
    daemon: FakeDaemon, sock: list[str], short_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for extra in ([], ["--json"]):
        code, err = run_failing(capsys, "restore", "no/such", str(short_dir / "t"), *sock, *extra)
        assert code == 3
        assert err == "hostd: no snapshot for ref 'no/such' under this host's compat key\n"


STOPPED = "hostd: the daemon stopped during the restore; run it again to resume\n"


@pytest.mark.parametrize(
    ("ref", "exit_code", "message"),
    [
        ("fail/origin", 1, "hostd: origin said 403\n"),
        ("cut/early", 4, STOPPED),  # a daemon gone mid-stream: exit 4, as if unreachable
        ("cut/abort", 4, STOPPED),
        # a daemon stopped (SIGTERM, a restart) whose drain ran out tells the stream so: the
        # same exit 4 and advice as one killed, not "hostd is busy" and exit 1
        ("cut/stopping", 4, STOPPED),
        # refused as it stops: exit 4 too (a script tries again once it is back); over a
        # cap, busy and exit 1
        ("refused/stopping", 4, "hostd: hostd is stopping; try again once it is back\n"),
        ("refused/busy", 1, "hostd: hostd is busy: uid 0 has 4 operations running\n"),
        ("bad/line", 1, "hostd: daemon sent a malformed event: b'this is not json'\n"),
    ],
)
def test_restore_stream_failures(
    daemon: FakeDaemon,
    sock: list[str],
    short_dir: Path,
    capsys: pytest.CaptureFixture[str],
    ref: str,
    exit_code: int,
    message: str,
) -> None:
    code, err = run_failing(capsys, "restore", ref, str(short_dir / "t"), "--json", *sock)
    assert code == exit_code
    assert err == message


def test_restore_bad_mode_is_a_usage_error(
    daemon: FakeDaemon, sock: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = run_failing(capsys, "restore", "models/tiny", "/x", "--mode", "move", *sock)
    assert code == 2
    assert err.startswith("hostd: restore: argument --mode: invalid choice")
    assert daemon.requests == []


# -- publish and prefetch -------------------------------------------------------------------


def test_publish_then_restore_round_trip(
    daemon: FakeDaemon,
    sock: list[str],
    short_dir: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    source = short_dir / "src"
    (source / "sub").mkdir(parents=True)
    (source / "a.bin").write_bytes(b"a" * 3000)
    (source / "sub" / "b.txt").write_text("bee")
    monkeypatch.chdir(short_dir)

    result = run_json(
        capsys, "publish", "src", "--ref", "mine/v1", "--facts", "format, gpu_model",
        "--compat", "image=sha256:1", "--meta", "model=tiny", *sock,
    )  # fmt: skip
    assert result["ref"] == "mine/v1"
    assert result["files"] == 2
    assert result["bytes"] == 3003
    assert daemon.last_body("/v1/publish") == {
        "path": str(source),
        "ref": "mine/v1",
        "facts": ["format", "gpu_model"],
        "compat": {"image": "sha256:1"},
        "meta": {"model": "tiny"},
    }

    run_json(capsys, "restore", "mine/v1", "copy", *sock)
    assert (short_dir / "copy" / "sub" / "b.txt").read_text() == "bee"
    assert (short_dir / "copy" / "a.bin").read_bytes() == b"a" * 3000


def test_publish_human_and_default_facts(
    daemon: FakeDaemon, sock: list[str], short_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (short_dir / "src").mkdir()
    (short_dir / "src" / "f").write_bytes(b"x" * 2048)
    out = run_human(capsys, "publish", str(short_dir / "src"), "--ref", "r", *sock)
    assert "facts" not in daemon.last_body("/v1/publish")  # the daemon's default
    snapshot_id = daemon.refs["r"]
    lines = {line.split("  ")[0]: line.split()[-1] for line in out.splitlines()}
    assert lines["snapshot"] == snapshot_id
    assert lines["files"] == "1"
    assert lines["chunks"] == "1"
    assert lines["new chunks"] == "1"
    assert lines["compressed chunks"] == "1"
    assert "2.0 KiB (2,048 bytes)" in out


def test_a_key_given_twice_with_two_values_is_a_usage_error(
    daemon: FakeDaemon, sock: list[str], short_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--compat torch=2.5 --compat torch=2.6` meant one of them: asked, not guessed (the last
    one won, and a compile cache was keyed on a version its publisher did not mean)."""
    (short_dir / "src").mkdir()
    for flag in ("--compat", "--meta"):
        argv = ["publish", str(short_dir / "src"), "--ref", "r", flag, "k=1", flag, "k=2"]
        code, err = run_failing(capsys, *argv, *sock)
        assert (code, err) == (2, f"hostd: {flag}: 'k' given twice, as '1' and '2'\n")
    code, err = run_failing(capsys, "restore", "r", str(short_dir / "t"), *sock,
                            "--compat", "a=x", "--compat", "a=y")  # fmt: skip
    assert (code, err) == (2, "hostd: --compat: 'a' given twice, as 'x' and 'y'\n")
    assert not [seen for seen, _ in daemon.requests if seen != "/v1/status"]  # nothing asked
    assert not (short_dir / "t").exists()
    # the same value twice says one thing: taken
    run_json(capsys, "publish", str(short_dir / "src"), "--ref", "r", "--meta", "k=1",
             "--meta", "k=1", *sock)  # fmt: skip
    assert daemon.last_body("/v1/publish")["meta"] == {"k": "1"}


def test_publish_missing_directory_is_a_usage_error(
    daemon: FakeDaemon, sock: list[str], short_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = run_failing(capsys, "publish", str(short_dir / "nope"), "--ref", "r", *sock)
    assert code == 2
    assert err == f"hostd: {short_dir / 'nope'} is not a directory\n"


def test_prefetch(daemon: FakeDaemon, sock: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    result = run_json(capsys, "prefetch", "models/tiny", "--tier", "disk", *sock)
    assert result["tier"] == "disk"
    assert result["bytes"] == 5013
    assert daemon.last_body("/v1/prefetch") == {"ref": "models/tiny", "tier": "disk", "compat": {}}

    assert result["tiers"] == {"mem": 0, "disk": 5013}

    out = run_human(capsys, "prefetch", "models/tiny", "--compat", "a=b", *sock)
    assert re.search(r"^tier\s+the first with room$", out, re.M), out
    assert re.search(r"^held\s+mem 4.9 KiB, disk 0 B$", out, re.M), out
    assert "disk 4.9 KiB" in out  # (where its bytes came from)
    assert daemon.last_body("/v1/prefetch") == {"ref": "models/tiny", "compat": {"a": "b"}}

    code, err = run_failing(capsys, "prefetch", "models/tiny", "--tier", "gpu", *sock)
    assert (code, err) == (2, "hostd: no tier named 'gpu'\n")
    code, err = run_failing(capsys, "prefetch", "nothing/here", *sock)
    assert code == 3


# -- pin, unpin -----------------------------------------------------------------------------


def test_pin_and_unpin(
    daemon: FakeDaemon, sock: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    [snapshot_id] = daemon.snapshots
    assert run_json(capsys, "pin", "models/tiny", *sock) == {
        "snapshot": snapshot_id,
        "pinned": True,
    }
    assert daemon.snapshots[snapshot_id]["pinned"]
    out = run_human(capsys, "unpin", "--snapshot", snapshot_id, *sock)
    assert out == f"{snapshot_id} unpinned\n"
    assert daemon.last_body("/v1/unpin") == {"snapshot": snapshot_id, "compat": {}}
    assert run_human(capsys, "pin", "--snapshot", snapshot_id, *sock) == f"{snapshot_id} pinned\n"


def test_pin_errors(
    daemon: FakeDaemon, sock: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = run_failing(capsys, "pin", "no/such", *sock)
    assert (code, err) == (3, "hostd: no snapshot for ref 'no/such'\n")
    code, err = run_failing(capsys, "unpin", "--snapshot", "f" * 64, "--json", *sock)
    assert code == 3
    for argv in (["pin"], ["unpin", "models/tiny", "--snapshot", "abc"]):
        code, err = run_failing(capsys, *argv, *sock)
        assert (code, err) == (2, "hostd: name a REF or a --snapshot ID, one of them\n")
    assert [path for path, _ in daemon.requests] == ["/v1/pin", "/v1/unpin"]  # no more


# -- verify ---------------------------------------------------------------------------------


def test_verify(daemon: FakeDaemon, sock: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    result = run_json(capsys, "verify", *sock)
    assert result == {"checked_blobs": 2, "checked_bytes": 5013, "bad": []}
    out = run_human(capsys, "verify", *sock)
    assert "checked blobs" in out
    assert "bad blobs" in out


def test_verify_finding_bad_blobs_exits_1(
    daemon: FakeDaemon, sock: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    daemon.bad_blobs.append({"blob": "ab" * 32, "tier": "disk", "reason": "hash mismatch"})
    code = main(["verify", *sock])
    out, err = capsys.readouterr()
    assert (code, err) == (1, "hostd: verify found 1 bad blob\n")
    assert "ab" * 32 in out
    assert "hash mismatch" in out

    code = main(["verify", "--json", *sock])
    out, err = capsys.readouterr()
    assert (code, err) == (1, "hostd: verify found 1 bad blob\n")
    assert json.loads(out)["bad"] == daemon.bad_blobs


# -- reaching the daemon --------------------------------------------------------------------


def test_missing_socket_exits_4(short_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = short_dir / "nobody.sock"
    for argv in (["status"], ["restore", "r", "/t", "--json"], ["gc"]):
        code, err = run_failing(capsys, *argv, "--socket", str(path))
        assert code == 4
        assert err.startswith(
            f"hostd: cannot reach the daemon at {path}: No such file or directory; is hostd "
            "running (systemctl status hostd, or `hostd serve`), and is this its socket "
            "(--socket, $HOSTD_SOCKET)?"
        ), err


def test_an_empty_socket_path_is_a_usage_error_not_the_default_socket(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, err = run_failing(capsys, "status", "--socket", "")
    assert (code, err) == (2, "hostd: --socket: an empty path names no socket\n")


def test_version_as_json_before_or_as_a_command(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["--version", "--json"], ["--json", "--version"], ["version", "--json"]):
        assert main(argv) == 0
        out, _ = capsys.readouterr()
        assert json.loads(out) == {"version": __version__}, argv


def test_socket_nobody_listens_on_exits_4(
    short_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = short_dir / "dead.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(str(path))  # bound, never listening: what a crashed daemon leaves behind
        code, err = run_failing(capsys, "ls", "--socket", str(path))
    assert code == 4
    assert err.startswith(f"hostd: cannot reach the daemon at {path}: Connection refused; "), err


def test_socket_option_beats_environment(
    daemon: FakeDaemon,
    short_dir: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    missing = str(short_dir / "missing.sock")
    monkeypatch.setenv("HOSTD_SOCKET", str(daemon.socket_path))
    assert run_json(capsys, "status")["pid"] == 4242  # the environment, without --socket
    code, err = run_failing(capsys, "status", "--socket", missing)
    assert code == 4
    assert missing in err
    monkeypatch.setenv("HOSTD_SOCKET", missing)
    assert run_json(capsys, "status", "--socket", str(daemon.socket_path))["pid"] == 4242


def test_default_socket_is_per_user_else_system(
    short_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = {"XDG_RUNTIME_DIR": str(short_dir), "HOME": str(short_dir)}
    user = default_paths(env).socket  # where the config module puts it; not this test's business
    system = short_dir / "system.sock"
    assert resolve_socket(None, env, system_socket=system) == str(user)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(system))
        assert resolve_socket(None, env, system_socket=system) == str(system)
        user.parent.mkdir(parents=True)
        user.touch()
        assert resolve_socket(None, env, system_socket=system) == str(user)
    assert resolve_socket(None, {**env, "HOSTD_SOCKET": "/e.sock"}) == "/e.sock"
    assert resolve_socket("/o.sock", {**env, "HOSTD_SOCKET": "/e.sock"}) == "/o.sock"


def test_default_socket_reaches_the_per_user_daemon(
    short_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HOSTD_SOCKET", raising=False)
    for name in ("XDG_RUNTIME_DIR", "XDG_CACHE_HOME", "HOME"):
        monkeypatch.setenv(name, str(short_dir))
    path = default_paths(os.environ).socket
    path.parent.mkdir(parents=True, exist_ok=True)
    fake = FakeDaemon(path)
    fake.start()
    try:
        assert run_json(capsys, "status")["socket"] == str(path)
    finally:
        fake.stop()


# -- usage ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "hostd: the following arguments are required: COMMAND (see 'hostd --help')"),
        (["restore", "r"], "hostd: restore: the following arguments are required: TARGET"),
        (["publish", "d"], "hostd: publish: the following arguments are required: --ref"),
        (["restore", "r", "t", "--compat", "novalue"], "hostd: restore: argument --compat"),
        (["frobnicate"], "hostd: argument COMMAND: invalid choice: 'frobnicate'"),
    ],
)
def test_usage_errors_exit_2(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    code, err = run_failing(capsys, *argv)
    assert code == 2
    assert err.startswith(message)


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["restore", "--help"]) == 0
    assert "--replace" in capsys.readouterr().out


def test_serve_passes_the_config_path(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[Path | None] = []

    def daemon_main(config_path: Path | None) -> int:
        seen.append(config_path)
        return 0

    fake_daemon_module = types.ModuleType("hostd.daemon")
    fake_daemon_module.main = daemon_main  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "hostd.daemon", fake_daemon_module)
    monkeypatch.delenv("HOSTD_CONFIG", raising=False)
    assert main(["serve"]) == 0
    monkeypatch.setenv("HOSTD_CONFIG", "/etc/hostd/env.toml")
    assert main(["serve"]) == 0
    assert main(["serve", "--config", "/etc/hostd/opt.toml"]) == 0
    assert seen == [None, Path("/etc/hostd/env.toml"), Path("/etc/hostd/opt.toml")]


# -- terminals ------------------------------------------------------------------------------


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_only_on_a_terminal(
    daemon: FakeDaemon,
    sock: list[str],
    short_dir: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("TTY_COMPATIBLE", raising=False)
    run_json(capsys, "restore", "models/tiny", str(short_dir / "a"), *sock)  # stderr is empty

    terminal = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert main(["restore", "models/tiny", str(short_dir / "b"), "--json", *sock]) == 0
    shown = terminal.getvalue()
    assert "\x1b[" in shown  # drawn, then erased (transient)
    assert "restore" in shown or "materialize" in shown
    assert json.loads(capsys.readouterr().out)["files"] == 2  # stdout: still only the JSON


def test_human_output_on_a_terminal_is_rich(
    daemon: FakeDaemon, sock: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    terminal = FakeTerminal()
    monkeypatch.setattr(sys, "stdout", terminal)
    assert main(["status", *sock]) == 0
    shown = terminal.getvalue()
    assert "\x1b[1m" in shown  # bold keys and headers
    assert "1h 02m 05s" in shown
    assert "/dev/shm/hostd" in shown
    assert "signature" in shown  # folded to the terminal's width


def test_plain_output_is_whole_aligned_lines() -> None:
    stream = io.StringIO()
    printer = PlainPrinter(stream)
    printer.table(("A", "WIDE"), [("1", "\u65e5\u672c"), ("22", "x\ny\x1b[31m")])
    printer.pairs([("key", None), ("longer key", "v")])
    printer.line("a\rb")
    assert stream.getvalue() == (
        "A     WIDE\n"
        "1     \u65e5\u672c\n"  # two cells each: the column is 4 wide, and no blank trails
        "22    x?y?[31m\n"  # one line per row, and nothing that drives a terminal
        "key         -\n"
        "longer key  v\n"
        "a?b\n"
    )


# -- the stream reader ----------------------------------------------------------------------


def test_event_reader_splits_lines_across_reads() -> None:
    reader = EventReader(max_line=64)
    assert reader.feed(b'{"event": "progress"}\n{"event": "re') == [{"event": "progress"}]
    assert reader.feed(b'sult", "n": 1}\n\n') == [{"event": "result", "n": 1}]
    assert reader.feed(b'{"a": 2}') == []
    assert reader.finish() == [{"a": 2}]
    with pytest.raises(HostdError, match="not an object"):
        reader.feed(b"[1]\n")
    with pytest.raises(HostdError, match="longer than 64 bytes"):
        reader.feed(b"x" * 65)


# -- real processes -------------------------------------------------------------------------


def hostd_process(*argv: str) -> subprocess.Popen[str]:
    """The CLI as a process, with Ctrl-C's default disposition: a suite started in the
    background of a non-interactive shell (`make test &`) ignores SIGINT, and a child that
    inherits that never sees the Ctrl-C a test sends it."""
    return subprocess.Popen(
        [sys.executable, "-m", "hostd", *argv],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_default_sigint,
    )


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_subprocess_status_json(daemon: FakeDaemon) -> None:
    with hostd_process("status", "--json", "--socket", str(daemon.socket_path)) as proc:
        out, err = proc.communicate(timeout=DEADLINE)
    assert (proc.returncode, err) == (0, "")
    assert json.loads(out)["version"] == "0.1.0"


def test_subprocess_not_found_exits_3(daemon: FakeDaemon, short_dir: Path) -> None:
    with hostd_process("restore", "x/y", str(short_dir / "t"), "--socket",
                       str(daemon.socket_path)) as proc:  # fmt: skip
        out, err = proc.communicate(timeout=DEADLINE)
    assert (proc.returncode, out) == (3, "")
    assert err == "hostd: no snapshot for ref 'x/y' under this host's compat key\n"


def test_ctrl_c_cancels_the_stream_and_exits_130(daemon: FakeDaemon, short_dir: Path) -> None:
    with hostd_process("restore", "hang", str(short_dir / "t"), "--socket",
                       str(daemon.socket_path)) as proc:  # fmt: skip
        try:
            assert daemon.streaming.wait(DEADLINE), "the restore never started streaming"
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=DEADLINE)
        finally:
            if proc.returncode is None:
                proc.kill()
    assert (proc.returncode, out, err) == (130, "", "hostd: interrupted\n")
    assert daemon.cancelled.wait(DEADLINE), "the daemon never saw the client go"


def test_subprocess_closed_stdout_is_quiet(daemon: FakeDaemon) -> None:
    with hostd_process("ls", "--socket", str(daemon.socket_path)) as proc:
        assert proc.stdout is not None
        proc.stdout.close()  # `hostd ls | head -0`: the reader is gone before the first line
        _, err = proc.communicate(timeout=DEADLINE)
    assert (proc.returncode, err) == (1, "")


# What a client command may import: not the daemon's stack (aiohttp, asyncio), not rich on a
# pipe, not http.client (40 ms of email and ssl). Each costs more than the command's own work.
# Nor the config loader (tomllib, difflib: ~90 ms), even to find the default socket. Nor
# typing, pathlib, dataclasses (inspect), shutil (bz2, lzma), socket (selectors; unixhttp
# uses its C core) or threading: 1-9 ms each, where the interpreter itself starts in ~10 ms
# and `hostd status` should take at most 3 times that.
HEAVY_MODULES = (
    "aiohttp",
    "asyncio",
    "rich",
    "http",
    "email",
    "ssl",
    "hostd.daemon",
    "hostd.config",
    "tomllib",
    "difflib",
    "typing",
    "pathlib",
    "dataclasses",
    "inspect",
    "shutil",
    "socket",
    "selectors",
    "threading",
)


def test_client_commands_start_without_heavy_modules(daemon: FakeDaemon, short_dir: Path) -> None:
    code = """if True:
        import json, sys
        from hostd.cli import main
        sock, target, heavy = sys.argv[1], sys.argv[2], tuple(sys.argv[3].split(","))
        commands = [
            ["status", "--json"], ["status"], ["ls"], ["gc"], ["verify"], ["pin", "models/tiny"],
            ["restore", "models/tiny", target, "--json"], ["prefetch", "models/tiny"],
            ["restore", "no/such", target],
        ]
        codes = [main([*argv, "--socket", sock]) for argv in commands]
        codes.append(main(["status", "--json", "--socket", sock + ".none"]))
        default = main(["status", "--json"])  # no socket named: the default one is found
        codes.append(4 if default == 0 else default)  # 0: a system daemon runs on this host
        loaded = [m for m in sys.modules if m.split(".")[0] in heavy or m in heavy]
        print(json.dumps({"codes": codes, "loaded": sorted(loaded)}))
    """
    argv = [str(daemon.socket_path), str(short_dir / "t"), ",".join(HEAVY_MODULES)]
    env = {k: v for k, v in os.environ.items() if k not in ("HOSTD_SOCKET", "XDG_RUNTIME_DIR")}
    proc = subprocess.run(
        [sys.executable, "-c", code, *argv],
        cwd=REPO,
        env={**env, "HOME": str(short_dir / "home")},
        capture_output=True,
        text=True,
        timeout=DEADLINE,
    )
    report = json.loads(proc.stdout.splitlines()[-1])
    assert report == {"codes": [0, 0, 0, 0, 0, 0, 0, 0, 3, 4, 4], "loaded": []}, proc.stderr


async def test_an_asyncio_caller_runs_calls_in_a_thread_and_cuts_them_with_close(
    daemon: FakeDaemon, short_dir: Path
) -> None:
    with Client(daemon.socket_path) as client:
        assert (await asyncio.to_thread(client.status))["pid"] == 4242
        restore = asyncio.ensure_future(asyncio.to_thread(client.restore, "hang", short_dir / "t"))
        assert await asyncio.to_thread(daemon.streaming.wait, DEADLINE), "never streamed"
        client.close()  # from the loop's thread: the call in the worker thread ends
        with pytest.raises(HostdError, match="closed the stream early"):
            await asyncio.wait_for(restore, DEADLINE)
    assert await asyncio.to_thread(daemon.cancelled.wait, DEADLINE), "the daemon never saw it"


def test_error_codes_map_to_exit_codes() -> None:
    assert isinstance(error_from_code("target_exists", "m"), TargetExists)
    assert error_from_code("bad_request", "m").exit_code == 2
    assert error_from_code("not_found", "m").exit_code == 3
    for code in ("bad_config", "unreachable", "something_new"):  # from the daemon: a failure
        error = error_from_code(code, "m")
        assert (error.code, error.exit_code, error.message) == (code, 1, "m")


def test_error_without_a_json_body_exits_1(
    daemon: FakeDaemon, sock: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    daemon.plain_text_errors = True
    code, err = run_failing(capsys, "gc", *sock)
    assert (code, err) == (
        1,
        "hostd: daemon answered HTTP 500 Internal Server Error: Internal Server Error\n",
    )
