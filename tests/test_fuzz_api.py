"""Fuzzing the local API of one real daemon over its real socket, with Hypothesis.

Each case is one HTTP/1.1 request written byte for byte: a method, a path (the real
endpoints and junk), headers (content types, a Content-Length that is right, short, long or
missing, chunked transfer, gzip) and a body (valid-shaped objects with wrong field types,
raw bytes, invalid UTF-8, deep nesting, huge numbers, duplicate keys, long paths).

The oracle: never a 5xx; every answer is a JSON object (`{"error", "message"}` for an
error), Prometheus text from /metrics, or an NDJSON stream that ends in exactly one result
or error event (never an `internal` one); and the daemon keeps serving.

Safety: the daemon runs as this test's user and may really publish and restore, so every
`path` and `target` in a valid-shaped body lies under the module's own temp dir (or is not
absolute, or not a string), and refs are junk or the test's own: nothing outside the temp
dir is read or written. HTTP that aiohttp cannot parse at all (bad request lines, header
syntax, a method its parser does not know) is out of scope: aiohttp answers it, in
text/plain, before hostd sees a request.

1,000 cases run in the normal suite; the 10,000-case run is marked `slow` (opt-in:
`pytest --run-slow` or `-m slow`).
"""

from __future__ import annotations

import gzip
import http.client
import json
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from harness import Hostd, make_tree, rmtree, short_tmp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

ENDPOINTS = {
    "/v1/status": "GET",
    "/v1/restore": "POST",
    "/v1/prefetch": "POST",
    "/v1/publish": "POST",
    "/v1/pin": "POST",
    "/v1/unpin": "POST",
    "/v1/snapshots": "GET",
    "/v1/gc": "POST",
    "/v1/verify": "POST",
    "/metrics": "GET",
}
# methods aiohttp's parser knows (it answers any other token itself, in text/plain)
METHODS = ["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH", "TRACE", "PROPFIND"]
REFS = ["fuzz/a", "fuzz/b"]  # the test's own; everything else generated is junk


@dataclass
class Env:
    daemon: Hostd
    work: Path  # every path a body names lies under here


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    work = short_tmp("fz")
    make_tree(work / "src", big=70_000)
    (work / "out").mkdir()
    with Hostd(work / "d", idle_timeout="2s") as h:
        h.publish(work / "src", REFS[0])
        yield Env(h, work)
        assert h.proc is not None
        assert h.proc.poll() is None, h.log()[-4000:]
        assert "internal error answering" not in h.log(), h.log()[-4000:]
    rmtree(work)


# -- what to send ---------------------------------------------------------------------------

names = st.text(st.characters(exclude_characters="/"), min_size=1, max_size=12).filter(
    lambda s: s not in (".", "..")
)


def paths(work: Path) -> st.SearchStrategy[Any]:
    """Values for `path`/`target`: absolute only under `work`, or refused before any use."""
    under = st.sampled_from(["out", "nope", "src"]).flatmap(
        lambda top: st.lists(names, max_size=3).map(lambda ns: "/".join([str(work), top, *ns]))
    )
    too_long = st.sampled_from(
        [
            f"{work}/out/" + "n" * 256,
            f"{work}/out" + "/d" * 2100,
            f"{work}/out/" + "é" * 200,
            f"{work}/out/a\x00b",
            f"{work}/out/\ud800",
        ]
    )
    relative = st.text(max_size=20).filter(lambda s: not s.startswith("/"))
    # never an absolute path from the generic junk: "/" itself would be a restore target
    not_a_path = junk_json.filter(lambda v: not (isinstance(v, str) and v.startswith("/")))
    return st.one_of(under, too_long, relative, not_a_path)


junk_json: st.SearchStrategy[Any] = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=8,
)
refs = st.one_of(
    st.sampled_from(REFS), st.text(max_size=30), st.from_regex(r"[a-z./_-]{1,40}", fullmatch=True)
)
facts = st.dictionaries(st.text(max_size=10), st.text(max_size=10), max_size=3)


def maybe(right: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly a value of the right type, sometimes anything."""
    return st.one_of(right, right, right, junk_json)


def shaped(endpoint: str, work: Path) -> st.SearchStrategy[dict[str, Any]]:
    """An object shaped like the endpoint's body, with some fields wrong or unknown."""
    fields: dict[str, st.SearchStrategy[Any]] = {
        "/v1/restore": {
            "ref": maybe(refs),
            "target": paths(work),
            "mode": maybe(st.sampled_from(["auto", "copy", "link", "bogus"])),
            "replace": maybe(st.booleans()),
            "compat": maybe(facts),
            "tier": maybe(st.sampled_from(["mem", "disk", "nope"])),
        },
        "/v1/prefetch": {"ref": maybe(refs), "tier": maybe(st.just("mem")), "compat": facts},
        "/v1/publish": {
            "path": paths(work),
            "ref": maybe(refs),
            "facts": maybe(st.lists(st.sampled_from(["format", "gpu_model", "", "x"]))),
            "compat": maybe(facts),
            "meta": maybe(facts),
            "chunk_size": maybe(st.sampled_from([65536, 1 << 20, 1000, 0, -1, 1 << 40])),
        },
        "/v1/pin": {"ref": maybe(refs), "snapshot": maybe(st.text(max_size=64)), "compat": facts},
        "/v1/unpin": {"ref": maybe(refs), "snapshot": maybe(st.text(max_size=64))},
    }.get(endpoint, {})
    fields = {**fields, "zz_unknown": junk_json}
    return st.fixed_dictionaries({}, optional=fields)


@st.composite
def bodies(draw: st.DrawFn, endpoint: str, work: Path) -> bytes:
    kind = draw(st.sampled_from(["shaped"] * 6 + ["raw", "utf8", "deep", "int", "dup", "const"]))
    if kind == "raw":
        return draw(st.binary(max_size=64))
    obj = draw(shaped(endpoint, work))
    text = json.dumps(obj, ensure_ascii=draw(st.booleans()))
    inner = text[1:-1]
    sep = ", " if inner else ""
    if kind == "utf8":
        cut = draw(st.integers(0, len(text)))
        return text[:cut].encode("utf-8", "surrogatepass") + draw(
            st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80"])
        )
    if kind == "deep":
        n = draw(st.integers(1, 5000))
        text = '{"ref": ' + "[" * n + "]" * n + sep + inner + "}"
    elif kind == "int":
        digits = draw(st.integers(15, 6000))
        text = '{"chunk_size": ' + "9" * digits + sep + inner + "}"
    elif kind == "dup" and obj:
        key = draw(st.sampled_from(sorted(obj)))
        text = "{" + json.dumps(key) + ": null, " + inner + "}"
    elif kind == "const":
        c = draw(st.sampled_from(["NaN", "Infinity", "-Infinity", "1e999", "-0.0"]))
        text = '{"replace": ' + c + sep + inner + "}"
    return text.encode("utf-8", "surrogatepass")


@dataclass
class Case:
    method: str
    path: str
    body: bytes
    headers: list[tuple[str, str]] = field(default_factory=list)
    framing: str = "exact"  # exact, short, long (half-closed), none, chunked

    def wire(self) -> bytes:
        lines = [f"{self.method} {self.path} HTTP/1.1", "Host: hostd", "Connection: close"]
        lines += [f"{k}: {v}" for k, v in self.headers]
        body = self.body
        # Bytes past the declared length would be a second, pipelined request, and aiohttp
        # answers a batch holding a broken one with its own text/plain 400: so "short" and
        # "none" send only what they declare (the body cut short, or no body at all).
        if self.framing == "chunked":
            lines.append("Transfer-Encoding: chunked")
            body = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in _pieces(body) if p) + (
                b"0\r\n\r\n"
            )
        elif self.framing == "none":
            body = b""
        else:
            n = {"exact": 0, "short": -1, "long": 7}[self.framing]
            lines.append(f"Content-Length: {max(0, len(body) + n)}")
            if self.framing == "short":
                body = body[:-1]
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def _pieces(b: bytes) -> list[bytes]:
    return [b[i : i + 17] for i in range(0, len(b), 17)]


@st.composite
def cases(draw: st.DrawFn, work: Path) -> Case:
    endpoint = draw(st.sampled_from(sorted(ENDPOINTS)))
    path = draw(
        st.one_of(
            st.just(endpoint),
            st.just(endpoint),
            st.just(endpoint),
            st.text(max_size=20).map(lambda s: endpoint + quote(s, safe="/?=&")),
            st.text(max_size=20).map(lambda s: "/" + quote(s, safe="/")),
        )
    )
    method = draw(st.one_of(st.just(ENDPOINTS[endpoint]), st.sampled_from(METHODS)))
    body = draw(st.one_of(st.just(b""), bodies(endpoint, work)))
    headers = []
    ctype = draw(
        st.sampled_from(
            [
                None,
                "application/json",
                "text/plain",
                "application/json; charset=latin-1",
                "application/json; charset=bogus",
                "multipart/form-data; boundary=x",
            ]
        )
    )
    if ctype:
        headers.append(("Content-Type", ctype))
    if body and draw(st.integers(0, 9)) == 0:
        headers.append(("Content-Encoding", "gzip"))
        if draw(st.booleans()):
            body = gzip.compress(body)
    framing = draw(st.sampled_from(["exact"] * 8 + ["short", "long", "none", "chunked"]))
    return Case(method, path, body, headers, framing)


# -- the oracle -----------------------------------------------------------------------------


def send(d: Hostd, case: Case) -> tuple[int, str, bytes] | None:
    """Send a case; (status, content type, body), or None if the daemon closed without one
    (allowed only when the request's body never ended)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(60)
    try:
        s.connect(str(d.socket))
        s.sendall(case.wire())
        if case.framing == "long":  # a body that never ends: end it, do not wait it out
            s.shutdown(socket.SHUT_WR)
        resp = http.client.HTTPResponse(s, method=case.method)
        try:
            resp.begin()
        except (http.client.RemoteDisconnected, ConnectionResetError):
            assert case.framing == "long", "the daemon closed without answering"
            return None
        return resp.status, resp.getheader("Content-Type", ""), resp.read()
    finally:
        s.close()


def check(d: Hostd, case: Case) -> None:
    got = send(d, case)
    if got is None:
        return
    status, ctype, body = got
    assert status < 500, (status, body[:2000])
    if case.method == "HEAD":
        return
    if ctype.startswith("application/x-ndjson"):
        assert status == 200
        events = [json.loads(line) for line in body.splitlines() if line.strip()]
        assert events, "an empty stream"
        *progress, last = events
        assert last["event"] in ("result", "error"), events
        assert all(e["event"] not in ("result", "error") for e in progress), events
        if last["event"] == "error":
            assert isinstance(last["message"], str)
            assert last["error"] not in ("internal", None), last
    elif ctype.startswith("application/json"):
        answer = json.loads(body)
        assert isinstance(answer, dict), answer
        if status >= 400:
            assert set(answer) == {"error", "message"}, answer
            assert all(isinstance(v, str) and v for v in answer.values()), answer
    else:
        assert case.path == "/metrics", (status, ctype, body[:2000])
        assert (status, ctype.split(";")[0]) == (200, "text/plain")
    assert d.proc is not None
    assert d.proc.poll() is None, d.log()[-4000:]


def run_fuzz(env: Env, examples: int) -> None:
    @settings(
        max_examples=examples,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        database=None,
    )
    @given(data=st.data())
    def fuzz(data: st.DataObject) -> None:
        check(env.daemon, data.draw(cases(env.work), label="case"))

    fuzz()
    assert env.daemon.api("GET", "/v1/status")[0] == 200


def test_fuzz_local_api(env: Env) -> None:
    run_fuzz(env, 1_000)


@pytest.mark.slow
def test_fuzz_local_api_long(env: Env) -> None:
    run_fuzz(env, 10_000)
