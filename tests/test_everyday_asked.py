"""Issue 12, "doing what was asked, or saying why not" and publish filters, as a user meets
them: the real CLI (`python -m hostd`) against a real daemon, real origins that refuse,
stall or go away, and a daemon killed with SIGKILL in the middle of a restore."""

from __future__ import annotations

import http.server
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import ROOT, Hostd, free_ports, iter_events, make_tree, rmtree, short_tmp

from hostd.core.pathfilter import PathFilter, compile_pattern

DEADLINE = 60.0


@pytest.fixture
def work() -> Iterator[Path]:
    root = short_tmp("ea")
    try:
        yield root
    finally:
        rmtree(root)


def hostd(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hostd", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        check=False,
    )


def closed_port() -> int:
    """A loopback port nothing listens on (and no other test is given)."""
    return free_ports(1)[0]


class Origin(http.server.ThreadingHTTPServer):
    """An http:// origin over a directory: answers `status` to everything if set, else
    serves files, holding every chunk and pack GET until `release` is set."""

    daemon_threads = True

    def __init__(self, root: Path, *, status: int | None = None) -> None:
        self.root = root
        self.status = status
        self.release = threading.Event()
        self.held = threading.Event()  # a chunk or pack GET is waiting
        super().__init__(("127.0.0.1", 0), _Handler)
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/"

    def __enter__(self) -> Origin:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        self.shutdown()
        self.server_close()


class _Handler(http.server.BaseHTTPRequestHandler):
    server: Origin

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        if self.server.status is not None:
            self._answer(self.server.status, b"no")
            return
        rel = self.path.lstrip("/").split("?")[0]
        if rel.startswith(("chunks/", "packs/")):
            self.server.held.set()
            self.server.release.wait(DEADLINE)
        path = self.server.root / rel
        if not path.is_file():
            self._answer(404, b"")
            return
        self._answer(200, path.read_bytes())

    def _answer(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def wait_for(cond: Any, what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


# -- 1. --mode link links or fails ------------------------------------------------------------


def test_link_into_another_filesystem_fails_before_building_and_auto_copies(work: Path) -> None:
    shm = Path("/dev/shm") / f"ea-{os.getpid()}-{work.name}"
    shm.mkdir()
    try:
        with Hostd(work / "d", access={"link_to_writers": True}) as d:
            d.publish(make_tree(work / "src"), "m/tree")
            sock = ("--socket", str(d.socket))
            target = shm / "out"
            p = hostd("restore", "m/tree", str(target), "--mode", "link", *sock)
            assert p.returncode == 2, p.stderr
            assert p.stderr.startswith(f"hostd: --mode link: cannot link into '{target}': "), (
                p.stderr
            )
            assert "another filesystem" in p.stderr
            assert "use --mode auto" in p.stderr
            assert p.stderr.count("\n") == 1
            assert os.listdir(shm) == []  # nothing built, no build directory left

            p = hostd("restore", "m/tree", str(target), "--mode", "auto", *sock)
            assert p.returncode == 0, p.stderr
            files = sum(
                1
                for f in (work / "src").rglob("*")
                if not f.is_symlink() and f.is_file() and f.stat().st_size
            )
            assert re.search(rf"^mode\s+auto: 0 linked, {files} copied", p.stdout, re.M), p.stdout
    finally:
        shutil.rmtree(shm, ignore_errors=True)


def test_link_and_auto_say_how_many_files_they_linked_and_copied(work: Path) -> None:
    src = make_tree(work / "src")
    (src / "owner-only.sh").write_text("#!/bin/sh\necho mine\n")
    (src / "owner-only.sh").chmod(0o744)
    with Hostd(work / "d", access={"link_to_writers": True}) as d:
        d.publish(src, "m/tree")
        sock = ("--socket", str(d.socket))
        for mode in ("link", "auto"):
            p = hostd(
                "restore", "m/tree", str(work / f"{mode}-json"), "--mode", mode, "--json", *sock
            )
            assert p.returncode == 0, p.stderr
            result = json.loads(p.stdout)
            # run.sh (0755) is linked to its 0555 blob; owner-only.sh's 0744 neither a 0444
            # nor a 0555 blob can show, so it is a counted copy
            assert result["linked"] >= 2, result
            assert result["copied_for_mode"] == 1, result
            assert result["created"] == 1  # empty.txt
            run = os.stat(work / f"{mode}-json" / "run.sh")
            assert (run.st_nlink > 1, run.st_mode & 0o777) == (True, 0o555)
            mine = os.stat(work / f"{mode}-json" / "owner-only.sh")
            assert (mine.st_nlink, mine.st_mode & 0o777) == (1, 0o744)
            p = hostd("restore", "m/tree", str(work / f"{mode}-human"), "--mode", mode, *sock)
            assert p.returncode == 0, p.stderr
            line = f"{mode}: {result['linked']} linked, {result['copied']} copied"
            assert re.search(rf"^mode\s+{re.escape(line)}", p.stdout, re.M), p.stdout
            assert os.stat(work / f"{mode}-human" / "weights.bin").st_nlink > 1


def test_link_for_a_caller_that_could_write_the_cache_is_refused_with_5(work: Path) -> None:
    # CI runs as root: root could write through a linked blob. With link_to_writers off (a
    # root daemon's default) link is refused by [access], before anything is built.
    if os.geteuid() != 0:
        pytest.skip("the caller must be one that could write the cache: root")
    with Hostd(work / "d", access={"link_to_writers": False}) as d:
        d.publish(make_tree(work / "src"), "m/tree")
        target = work / "out"
        p = hostd("restore", "m/tree", str(target), "--mode", "link", "--socket", str(d.socket))
        assert p.returncode == 5, p.stderr
        assert p.stderr.startswith("hostd: forbidden: --mode link")
        assert p.stderr.count("[access]") == 1
        assert "use --mode auto" in p.stderr
        assert "link_to_writers" in p.stderr
        assert not target.exists()
        status, body = d.api(
            "POST", "/v1/restore", {"ref": "m/tree", "target": str(target), "mode": "link"}
        )
        assert (status, body["error"]) == (403, "forbidden")


# -- 2. a slow or unreachable origin ---------------------------------------------------------


def test_a_refusing_origin_is_shown_retrying_and_named_cause_first(work: Path) -> None:
    port = closed_port()
    with Hostd(
        work / "d", origin=f"http://127.0.0.1:{port}/", retries=6, retry_base="1s", retry_max="1s"
    ) as d:
        body = {"ref": "m/x", "target": str(work / "out")}
        events = list(iter_events(d.socket, "/v1/restore", body))
        retrying = [e["retry"] for e in events if e["event"] == "progress" and "retry" in e]
        assert retrying, events
        note = retrying[0]
        assert note["cause"] == "connection refused"
        assert note["retries"] == 5
        assert 1 <= note["retry"] <= 5
        assert re.fullmatch(
            r"origin not answering \(connection refused\), retry \d/5 in \d\.\d s",
            note["message"],
        ), note
        assert note["key"].startswith("refs/m/x/")
        assert events[-1]["event"] == "error"
        message = events[-1]["message"]
        assert message.startswith("connection refused: get ref refs/m/x/"), message
        assert "failed after 6 attempts" in message

        p = hostd("restore", "m/x", str(work / "out"), "--socket", str(d.socket))
        assert p.returncode == 1
        assert p.stderr.startswith("hostd: connection refused: get ref refs/m/x/"), p.stderr


def test_a_403_origin_names_the_status_first_and_the_key_second(work: Path) -> None:
    with Origin(work, status=403) as origin, Hostd(work / "d", origin=origin.url) as d:
        p = hostd("restore", "m/x", str(work / "out"), "--socket", str(d.socket))
        assert p.returncode == 1
        assert re.match(
            r"hostd: 403 Forbidden, access refused by origin http://127\.0\.0\.1:\d+/: "
            r"get ref refs/m/x/[0-9a-f]{64}",
            p.stderr,
        ), p.stderr


def test_human_output_says_a_stale_ref_was_used(work: Path) -> None:
    root = work / "d"
    with Hostd(root) as d:
        d.publish(make_tree(work / "src"), "m/tree")
        assert d.restore("m/tree", work / "first")["event"] == "result"
    # the same host, its origin gone: the ref's last known answer is used, and said so
    with Hostd(root, origin=f"http://127.0.0.1:{closed_port()}/", retries=1) as d:
        p = hostd("restore", "m/tree", str(work / "again"), "--socket", str(d.socket))
        assert p.returncode == 0, p.stderr
        assert re.search(
            r"^note\s+the origin did not answer: used the ref's last known", p.stdout, re.M
        ), p.stdout


# -- 3. a daemon that dies mid-stream --------------------------------------------------------


def test_a_daemon_killed_during_a_restore_exits_4_with_a_plain_message(work: Path) -> None:
    with Hostd(work / "a") as a:
        a.publish(make_tree(work / "src"), "m/tree")
    with Origin(work / "a" / "origin") as origin, Hostd(work / "b", origin=origin.url) as b:
        cli = subprocess.Popen(
            [sys.executable, "-m", "hostd", "restore", "m/tree", str(work / "out"),
             "--socket", str(b.socket)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )  # fmt: skip
        try:
            assert origin.held.wait(DEADLINE), "the restore never asked for a chunk"
            b.kill()  # SIGKILL, mid-stream
            out, err = cli.communicate(timeout=DEADLINE)
        finally:
            if cli.poll() is None:
                cli.kill()
                cli.communicate()
        assert cli.returncode == 4, err
        assert err == "hostd: the daemon stopped during the restore; run it again to resume\n"
        assert out == ""
        assert not (work / "out").exists()


# -- 4. errors known before streaming have their own HTTP status -----------------------------


def test_errors_before_the_stream_have_their_own_status_so_curl_f_fails(work: Path) -> None:
    with Hostd(work / "d") as d:
        d.publish(make_tree(work / "src"), "m/tree")

        def curl(path: str, body: dict[str, Any]) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                ["curl", "-sSfN", "--unix-socket", str(d.socket), "-X", "POST",
                 "--data-binary", json.dumps(body), f"http://hostd{path}"],
                capture_output=True, text=True, timeout=DEADLINE, check=False,
            )  # fmt: skip

        # unknown ref: 404 before any byte of a stream
        status, body = d.api("POST", "/v1/restore", {"ref": "no/such", "target": str(work / "o")})
        assert (status, body["error"]) == (404, "not_found"), body
        assert curl("/v1/restore", {"ref": "no/such", "target": str(work / "o")}).returncode == 22
        # a target that exists: 409
        (work / "full").mkdir()
        (work / "full" / "x").write_text("x")
        status, body = d.api("POST", "/v1/restore", {"ref": "m/tree", "target": str(work / "full")})
        assert (status, body["error"]) == (409, "target_exists"), body
        # a publish path that does not exist: 400
        status, body = d.api("POST", "/v1/publish", {"path": str(work / "nope"), "ref": "m/x"})
        assert (status, body["error"]) == (400, "bad_request"), body
        assert "does not exist" in body["message"]
        # the CLI maps the answers to the same exit codes as before
        p = hostd("restore", "no/such", str(work / "o"), "--socket", str(d.socket))
        assert p.returncode == 3, p.stderr
        # a restore that works still streams
        ok = curl("/v1/restore", {"ref": "m/tree", "target": str(work / "ok")})
        assert ok.returncode == 0, ok.stderr
        assert json.loads(ok.stdout.splitlines()[-1])["event"] == "result"


# -- 5. messages in CLI terms ----------------------------------------------------------------


def test_messages_name_flags_and_paths_as_the_user_wrote_them(work: Path) -> None:
    with Hostd(work / "d") as d:
        d.publish(make_tree(work / "src"), "m/tree")
        sock = ("--socket", str(d.socket))
        p = hostd("prefetch", "m/tree", "--tier", "nvme", *sock)
        assert p.returncode == 2
        assert p.stderr == "hostd: --tier nvme: no tier named 'nvme' (tiers: mem, disk)\n"

        (work / "full").mkdir()
        (work / "full" / "x").write_text("x")
        p = hostd("restore", "m/tree", str(work / "full"), *sock)
        assert p.returncode == 1
        assert "exists and is not empty" in p.stderr
        assert "--replace" in p.stderr
        assert "use replace" not in p.stderr

        p = hostd("restore", "m/tree", str(work / "missing" / "out"), *sock)
        assert p.returncode == 2
        assert "does not exist" in p.stderr, p.stderr

        # what a progressive restore leaves where its daemon and helper were killed together:
        # the files that landed and the scratch file of one that had not
        cut = work / "cut"
        cut.mkdir()
        (cut / "a.bin").write_bytes(b"landed")
        (cut / ".hostd-part-7").write_bytes(b"half")
        p = hostd("restore", "m/tree", str(cut), "--progressive", *sock)
        assert p.returncode == 1
        assert "'.hostd-part-7': a progressive restore into it was cut off" in p.stderr, p.stderr
        assert "remove it first" in p.stderr, p.stderr
        assert "--replace" not in p.stderr  # (refused with --progressive)
        p = hostd("restore", "m/tree", str(cut), *sock)
        assert p.returncode == 1
        assert "was cut off" in p.stderr, p.stderr
        assert "--replace" in p.stderr, p.stderr
        p = hostd("restore", "m/tree", str(cut), "--replace", *sock)
        assert p.returncode == 0, p.stderr
        assert not (cut / ".hostd-part-7").exists()

        (work / "afile").write_text("x")
        p = hostd("restore", "m/tree", str(work / "afile" / "out"), *sock)
        assert p.returncode == 2
        assert f"target's parent '{work / 'afile'}' is a file" in p.stderr, p.stderr

        p = hostd("publish", str(work / "nope"), "--ref", "m/x", "--exclude", "", *sock)
        assert p.returncode == 2
        assert p.stderr == "hostd: --exclude: pattern '' is empty\n", p.stderr


# -- 6. publish filters, special files skipped ---------------------------------------------


def _filter_tree(root: Path) -> Path:
    for rel, data in {
        "model.safetensors": b"w" * 5000,
        "config.json": b"{}",
        "__pycache__/m.cpython-311.pyc": b"pyc",
        "sub/keep.txt": b"keep",
        "sub/__pycache__/x.pyc": b"pyc",
        "sub/deep/also.pyc": b"pyc",
        "logs/run-1.txt": b"log",
        "logs/inner/run-2.txt": b"log",
    }.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def _files(tree: Path) -> set[str]:
    return {str(p.relative_to(tree)) for p in tree.rglob("*") if p.is_file()}


def test_publish_exclude_and_include_and_special_files_are_skipped(work: Path) -> None:
    src = _filter_tree(work / "src")
    os.mkfifo(src / "sub" / "pipe")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(src / "ctl.sock"))
    try:
        with Hostd(work / "d") as d:
            sock = ("--socket", str(d.socket))
            p = hostd(
                "publish", str(src), "--ref", "m/f", "--exclude", "*.pyc",
                "--exclude", "__pycache__", "--exclude", "/logs", *sock,
            )  # fmt: skip
            assert p.returncode == 0, p.stderr
            assert re.search(r"^skipped\s+ctl\.sock \(socket\), sub/pipe \(FIFO\)", p.stdout, re.M)
            assert p.stderr.splitlines() == [
                "hostd: warning: skipped 'ctl.sock': a socket, not published (never opened)",
                "hostd: warning: skipped 'sub/pipe': a FIFO, not published (never opened)",
            ]
            assert hostd("restore", "m/f", str(work / "out"), *sock).returncode == 0
            assert _files(work / "out") == {"model.safetensors", "config.json", "sub/keep.txt"}

            # --include narrows; --exclude still wins; the JSON result names what was skipped
            p = hostd(
                "publish", str(src), "--ref", "m/g", "--include", "sub/**",
                "--include", "*.json", "--exclude", "*.pyc", "--json", *sock,
            )  # fmt: skip
            assert p.returncode == 0, p.stderr
            result = json.loads(p.stdout)
            assert result["skipped"] == [{"path": "sub/pipe", "kind": "FIFO"}], result
            assert hostd("restore", "m/g", str(work / "out2"), *sock).returncode == 0
            assert _files(work / "out2") == {"config.json", "sub/keep.txt"}

            # the warning is also an event in the stream, before the result
            events = list(iter_events(d.socket, "/v1/publish", {"path": str(src), "ref": "m/h"}))
            warnings = [e for e in events if e["event"] == "warning"]
            assert [(w["path"], w["kind"]) for w in warnings] == [
                ("ctl.sock", "socket"),
                ("sub/pipe", "FIFO"),
            ]
            assert events[-1]["event"] == "result"
    finally:
        listener.close()


@pytest.mark.parametrize(
    ("pattern", "path", "matches"),
    [
        ("*.pyc", "a.pyc", True),
        ("*.pyc", "x/y/a.pyc", True),
        ("*.pyc", "a.pyc/b", False),  # matched the directory: keeps() handles below
        ("logs/*.txt", "logs/a.txt", True),
        ("logs/*.txt", "logs/x/a.txt", False),
        ("logs/*.txt", "x/logs/a.txt", False),
        ("/notes.md", "notes.md", True),
        ("/notes.md", "x/notes.md", False),
        ("a/**/b", "a/b", True),
        ("a/**/b", "a/x/y/b", True),
        ("logs/**", "logs/x/y", True),
        ("**/cache", "x/cache", True),
        ("r?n.[!a-c]", "run.d", True),
        ("r?n.[!a-c]", "run.a", False),
        ("[", "[", True),
    ],
)
def test_patterns(pattern: str, path: str, matches: bool) -> None:
    assert bool(compile_pattern(pattern).fullmatch(path)) is matches


def test_a_pattern_that_matches_a_directory_matches_what_is_below_it() -> None:
    f = PathFilter(include=["sub"], exclude=["sub/private"])
    assert f.keeps("sub/a/b.txt")
    assert not f.keeps("sub/private/key")
    assert not f.keeps("top.txt")
    assert PathFilter().keeps("anything")
    with pytest.raises(ValueError, match="empty"):
        PathFilter(exclude=["/"])


def test_a_config_hostd_cannot_read_is_1_and_a_bad_value_is_2(work: Path) -> None:
    p = hostd("serve", "--config", str(work / "missing.toml"), timeout=DEADLINE)
    assert p.returncode == 1, p.stderr
    assert p.stderr == (
        f"hostd: config file: cannot read {work / 'missing.toml'}: No such file or directory\n"
    )
    (work / "bad.toml").write_text("fetch_concurency = 3\n")
    p = hostd("serve", "--config", str(work / "bad.toml"), timeout=DEADLINE)
    assert p.returncode == 2, p.stderr
    assert "did you mean 'fetch_concurrency'" in p.stderr


def test_a_metrics_port_already_taken_stops_the_start_with_a_message(work: Path) -> None:
    """An exporter already on metrics_address (the shipped config's fixed 9464) is named in
    one line, the log's last, with what to do, and exit 1: no traceback, and nothing left
    serving."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        (work / "taken.toml").write_text(
            f'origin = "file://{work}/origin"\n'
            f'socket = "{work}/s.sock"\n'
            f'index = "{work}/index/index.sqlite3"\n'
            f'metrics_address = "127.0.0.1:{port}"\n'
            f'[[tiers]]\nname = "disk"\npath = "{work}/disk"\nbudget = "64MiB"\n'
        )
        p = hostd("serve", "--config", str(work / "taken.toml"), timeout=DEADLINE)
    assert p.returncode == 1, p.stderr
    assert "Traceback" not in p.stderr, p.stderr
    last = p.stderr.splitlines()[-1]
    assert "level=error" in last, last
    assert f'msg="metrics_address 127.0.0.1:{port}: cannot listen there' in last, last
    assert "address already in use" in last, last
    assert "pick a free port" in last, last
    assert p.stderr.count("cannot listen there") == 1, p.stderr  # said once
    assert not (work / "s.sock").exists()


def test_a_target_filesystem_that_fills_up_is_a_failure_not_a_usage_error(work: Path) -> None:
    """Exit 2 is for usage errors only: a restore into a filesystem too small for the tree
    fails with 1, says why, and leaves nothing behind."""
    src = work / "src"
    src.mkdir()
    (src / "big.bin").write_bytes(os.urandom(2 << 20))
    (src / "small.txt").write_text("fits\n")
    small = work / "small"
    small.mkdir()
    with Hostd(work / "d") as d:
        d.publish(src, "m/big")
        script = (
            f"mount -t tmpfs -o size=1m none {small} && "
            f"{sys.executable} -m hostd restore m/big {small}/t --mode copy --socket {d.socket}; "
            f"echo exit=$?; ls -A {small}"
        )
        p = subprocess.run(
            ["unshare", "-m", "--propagation", "private", "sh", "-c", script],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            check=False,
        )
    out = p.stdout.splitlines()
    assert out[0] == "exit=1", (p.stdout, p.stderr)
    assert out[1:] == []  # the client's tmpfs holds nothing: no tree, no build directory
    assert p.stderr.startswith(f"hostd: restoring into '{small}/t' failed: No space left"), p.stderr
    assert "the target is as it was" in p.stderr
    assert p.stderr.count("\n") == 1


def test_readme_filter_commands_run_verbatim(work: Path) -> None:
    """README's "Everyday use" publishes with filters: run its lines as written."""
    text = (ROOT / "README.md").read_text()
    block = re.search(
        r"<!-- everyday:filters -->\n```sh\n(.*?)```\n<!-- /everyday:filters -->", text, re.S
    )
    assert block, "README.md lacks the everyday:filters block"
    commands = [line for line in block.group(1).splitlines() if line.strip()]
    assert len(commands) == 2
    model, cache = work / "model", work / "cache"
    for rel in ("w.safetensors", "run.pyc", "__pycache__/m.cpython-311.pyc", "logs/a.log",
                "sub/logs/kept.log", "config.json"):  # fmt: skip
        (model / rel).parent.mkdir(parents=True, exist_ok=True)
        (model / rel).write_text(rel)
    for rel in ("inductor/x/k.py", "triton/k.cubin", "meta.json", "other.txt"):
        (cache / rel).parent.mkdir(parents=True, exist_ok=True)
        (cache / rel).write_text(rel)
    with Hostd(work / "d") as d:
        env = {
            **os.environ,
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "HOSTD_SOCKET": str(d.socket),
            "PYTHONPATH": str(ROOT),
        }
        for command in commands:
            p = subprocess.run(
                ["sh", "-c", command], cwd=work, env=env, capture_output=True, text=True,
                timeout=120, check=False,
            )  # fmt: skip
            assert p.returncode == 0, (command, p.stderr)
        for ref, out in (("demo/llama", "m"), ("demo/cc", "c")):
            assert hostd("restore", ref, str(work / out), "--socket", str(d.socket)).returncode == 0
    assert _files(work / "m") == {"w.safetensors", "sub/logs/kept.log", "config.json"}
    assert _files(work / "c") == {"inductor/x/k.py", "meta.json"}
