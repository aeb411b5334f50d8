"""Bounded requests on the real socket of a real daemon: malformed bodies get a 4xx JSON error
(never a 500), a body that trickles or stalls is cut off within idle_timeout, and scrapes of
/metrics succeed while restores and evictions change the state they read."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import select
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import Hostd, make_tree, short_tmp
from prometheus_client.parser import text_string_to_metric_families

from hostd import api_local
from hostd.core.pathfilter import MAX_PATTERNS, compile_pattern
from hostd.errors import UsageError

IDLE = 1.0  # the daemon's idle_timeout in these tests


@pytest.fixture(scope="module")
def daemon() -> Iterator[Hostd]:
    with Hostd(idle_timeout=f"{IDLE}s") as h:
        yield h


def connect(h: Hostd) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(str(h.socket))
    return s


def send_raw(h: Hostd, method: str, path: str, body: bytes, **headers: str) -> tuple[int, Any]:
    """One request with exactly these body bytes; (status, the JSON answer)."""
    lines = [f"{method} {path} HTTP/1.1", "Host: hostd", "Connection: close"]
    lines += [f"{k.replace('_', '-')}: {v}" for k, v in headers.items()]
    if "Content_Length" not in headers and "Transfer_Encoding" not in headers:
        lines.append(f"Content-Length: {len(body)}")
    with connect(h) as s:
        s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        return read_response(s)


def read_response(s: socket.socket) -> tuple[int, Any]:
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    head, _, payload = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(payload)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"ref": "\xff\xfe"}', "request body is not UTF-8 (byte 9 is 0xff)"),
        (b"[" * 10_000 + b"]" * 10_000, "request body nests 10000 deep; at most 32 is allowed"),
        (b'{"ref": ' * 5_000 + b"1" + b"}" * 5_000, "request body nests 5000 deep"),
        (
            b'{"ref": "x", "target": ' + b"9" * 5000 + b"}",
            "request body has an integer out of range",
        ),
        (b'{"ref": "x", "target": NaN}', "request body has NaN, which is not a JSON number"),
        (b'{"ref": "x", "ref": "y"}', "request body has the key 'ref' twice in one object"),
        (b'{"ref": "x\\u0000"}', "field 'ref' holds a NUL character"),
        (b'["ref"]', "request body must be a JSON object, not an array"),
        (b'{"ref": "x", "nope": 1}', "unknown field(s) 'nope'"),
        (b'{"ref": "x", "target": "rel/dir"}', "field 'target' must be an absolute path"),
        (b'{"ref": "x", "target": 7}', "field 'target' must be a non-empty string"),
        (
            b'{"ref": "x", "target": "/' + b"a" * 5000 + b'"}',
            "field 'target' is a path of 5001 bytes; at most 4095 are allowed",
        ),
        (
            b'{"ref": "x", "target": "/t/' + b"a" * 300 + b'"}',
            "field 'target' has a path component of 300 bytes",
        ),
    ],
)
def test_malformed_bodies_are_400(daemon: Hostd, body: bytes, message: str) -> None:
    status, answer = send_raw(daemon, "POST", "/v1/restore", body)
    assert status == 400, answer
    assert answer["error"] == "bad_request"
    assert answer["message"].startswith(message), answer


@pytest.mark.parametrize(
    "extra", [{"facts": ["gpu_model", "BAD"]}, {"compat": {"Torch": "2.5"}}, {"facts": ["a" * 65]}]
)
def test_a_publish_with_a_bad_fact_name_is_400_before_any_work(
    daemon: Hostd, tmp_path: Path, extra: dict[str, Any]
) -> None:
    """A fact name the manifest cannot hold is the caller's mistake (exit 2), found before
    the source is read; it was a 500-class failure (exit 1) found only once the tree was
    hashed and its chunks stored."""
    src = make_tree(tmp_path / "src", big=1)
    body = {"path": str(src), "ref": "bounds/facts", **extra}
    status, answer = daemon.api("POST", "/v1/publish", body)
    assert status == 400, answer
    assert answer["error"] == "bad_request"
    assert answer["message"].startswith("compat fact name "), answer
    assert "must match [a-z][a-z0-9_]*" in answer["message"], answer


def test_a_body_aiohttp_cannot_decode_is_400(daemon: Hostd) -> None:
    status, answer = send_raw(daemon, "POST", "/v1/gc", b"not gzip", Content_Encoding="gzip")
    assert status == 400, answer
    assert answer == {
        "error": "bad_request",
        "message": "request body could not be read: Can not decode content-encoding: gzip",
    }
    assert daemon.api("GET", "/v1/status")[0] == 200


def test_an_oversized_body_is_413(daemon: Hostd) -> None:
    status, answer = send_raw(daemon, "POST", "/v1/gc", b" " * (1024 * 1024 + 1))
    assert (status, answer["error"]) == (413, "too_large"), answer


def wait_for_close(s: socket.socket, deadline: float, trickle: bool) -> bytes:
    """Read until the daemon closes the connection, sending one byte per 0.1 s if `trickle`;
    fail at `deadline`. Returns what the daemon sent."""
    got = b""
    while (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([s], [], [], min(left, 0.1) if trickle else left)
        if ready:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                return got
            if not chunk:
                return got
            got += chunk
        elif trickle:
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                s.sendall(b" ")  # if it is closed, the next recv says so
    pytest.fail(f"the daemon kept the connection open past the deadline; it sent {got!r}")


@pytest.mark.parametrize("trickle", [True, False], ids=["trickle", "stall"])
def test_a_slow_body_is_cut_off_within_idle_timeout(daemon: Hostd, trickle: bool) -> None:
    with connect(daemon) as s:
        start = time.monotonic()
        s.sendall(b"POST /v1/restore HTTP/1.1\r\nHost: hostd\r\nContent-Length: 1000\r\n\r\n{")
        # meanwhile the daemon serves others
        assert daemon.api("GET", "/v1/status", timeout=IDLE)[0] == 200
        got = wait_for_close(s, start + IDLE + 3, trickle)
        elapsed = time.monotonic() - start
    assert elapsed >= IDLE * 0.9, elapsed
    head, _, payload = got.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 "), got
    answer = json.loads(payload)
    assert answer["error"] == "request_timeout"
    assert "did not arrive within 1s" in answer["message"]
    assert daemon.api("GET", "/v1/status")[0] == 200


def test_scrapes_are_consistent_while_restores_and_evictions_run(tmp_path: Path) -> None:
    root = short_tmp()
    tiers = [
        {"name": "mem", "path": str(root / "mem"), "budget": "4MiB"},
        {"name": "disk", "path": str(root / "disk"), "budget": "1GiB"},
    ]
    with Hostd(root, tiers=tiers) as h:
        refs = []
        for seed in (1, 2, 3):
            make_tree(tmp_path / f"src{seed}", seed=seed)
            h.publish(tmp_path / f"src{seed}", f"scrape/{seed}")
            refs.append(f"scrape/{seed}")
        _, status = h.api("GET", "/v1/status")
        host, _, port = status["metrics_address"].rpartition(":")

        stop = threading.Event()
        restores: list[str] = []
        failures: list[BaseException] = []

        def restore_loop() -> None:
            try:
                i = 0
                while not stop.is_set():
                    ref = refs[i % len(refs)]
                    # into the small tier: each restore evicts the last one's blobs
                    out = h.restore(
                        ref, tmp_path / f"out{i % 2}", mode="copy", replace=True, tier="mem"
                    )
                    assert out["event"] == "result", out
                    restores.append(ref)
                    i += 1
            except BaseException as e:
                failures.append(e)

        worker = threading.Thread(target=restore_loop)
        worker.start()
        tcp = http.client.HTTPConnection(host.strip("[]"), int(port), timeout=30)
        try:
            deadline = time.monotonic() + 60
            i = 0
            while i < 200 or len(restores) < 6:
                assert time.monotonic() < deadline, (i, len(restores))
                i += 1
                if i % 2:
                    tcp.request("GET", "/metrics")
                    resp = tcp.getresponse()
                    code, text = resp.status, resp.read().decode()
                else:
                    code, text = h.api("GET", "/metrics")
                assert code == 200, text
                names = {f.name for f in text_string_to_metric_families(text)}
                assert {"hostd_tier_used_bytes", "hostd_evictions"} <= names
                if failures:
                    break
        finally:
            stop.set()
            worker.join(60)
            tcp.close()
        assert not failures, failures
        evictions = sum(
            s.value
            for f in text_string_to_metric_families(h.metrics())
            if f.name == "hostd_evictions"
            for s in f.samples
            if s.name == "hostd_evictions_total"
        )
        assert evictions > 0


def test_too_many_order_patterns_are_refused_before_any_is_compiled(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The count is the cheap check: a 1 MiB body holds 100,000 short patterns, which took
    the loop over a second to compile before the count refused them."""
    compiled: list[str] = []
    monkeypatch.setattr(api_local, "compile_pattern", compiled.append)
    with pytest.raises(UsageError, match=f"more than {MAX_PATTERNS} patterns"):
        asyncio.run(api_local._patterns({"order": ["?a"] * (MAX_PATTERNS + 1)}, "order"))
    assert compiled == []


def test_long_patterns_are_compiled_off_the_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """256 patterns of 1,024 characters take half a second to compile: a request's check
    compiles them on a thread, the loop (every other client) going on; a few short ones
    stay on the loop (a thread hop would cost more)."""
    where: list[threading.Thread] = []
    real = compile_pattern

    def compiling(pattern: str) -> object:
        where.append(threading.current_thread())
        return real(pattern)

    monkeypatch.setattr(api_local, "compile_pattern", compiling)
    long = ["dir/" * 200 + f"{i}.bin" for i in range(16)]
    assert sum(map(len, long)) > api_local.PATTERN_CHARS_ON_LOOP
    assert asyncio.run(api_local._patterns({"order": long}, "order")) == long
    assert where
    assert threading.main_thread() not in where
    where.clear()
    asyncio.run(api_local._patterns({"order": ["*.safetensors"]}, "order"))
    assert where == [threading.main_thread()]
