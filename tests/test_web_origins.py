"""Restores from web servers that misbehave the way real ones and their proxies do, against
real daemon processes: a snapshot published to a `file://` origin, then served over HTTP by
an aiohttp server (test_faults.HttpOrigin) told how to misbehave.

What a user checks: a restore that failed because the server answered wrongly works once
the server answers rightly again (nothing wrong is kept and served again), the log says
what went wrong in one line, and a refusal names the limit the answer broke. (The last is
checked on Origin alone, against test_fastget's raw server: which ranged GETs a restore
makes depends on its plan.)
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from harness import Hostd, make_tree, tree_digest
from test_fastget import Server, plain, serve
from test_faults import DEADLINE, HttpOrigin, wait_for, work

from hostd import wholepacks
from hostd.errors import ChunkCorrupt
from hostd.origin import Origin

__all__ = ["serve", "work"]  # the fixtures, used by name

ERROR_PAGE = b"<html><body><h1>Service temporarily unavailable</h1></body></html>"


class MisbehavingOrigin(HttpOrigin):
    """HttpOrigin, with switches for the answers of web servers and proxies seen in the
    field: `error_page` (every pack GET answered 200 with an HTML error page, ranged or
    not: a proxy's maintenance page), `odd_probe` (a one-byte range at 0 answered with
    the whole object as a 206, as busybox httpd does for "bytes=0-0")."""

    def __init__(self, root: Path) -> None:
        super().__init__(root, gated=())
        self.error_page = False
        self.odd_probe = False

    def __enter__(self) -> MisbehavingOrigin:
        super().__enter__()
        return self

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        key = request.match_info["key"]
        if self.error_page and key.startswith("packs/"):
            return web.Response(body=ERROR_PAGE, content_type="text/html")
        if self.odd_probe and request.headers.get("Range") == "bytes=0-0":
            found = await asyncio.to_thread(self._load, key)
            if found is not None:
                n = len(found)
                return web.Response(
                    status=206, body=found, headers={"Content-Range": f"bytes 0-{n - 1}/{n}"}
                )
        return await super()._handle(request)

    def _load(self, key: str) -> bytes | None:
        path = self.root / key
        return path.read_bytes() if path.is_file() else None


@pytest.fixture
def published(work: Path) -> tuple[Path, Path]:
    """A tree and the `file://` origin directory it was published to, in packs small enough
    that a restore reads them with ranged GETs."""
    src = make_tree(work / "src", big=21 * 1024 * 1024 + 17)
    origin_dir = work / "origin"
    with Hostd(work / "pub", origin=f"file://{origin_dir}", pack_size="8MiB") as pub:
        pub.publish(src, "demo/web")
    return src, origin_dir


def _restore(h: Hostd, target: Path) -> dict[str, Any]:
    return h.restore("demo/web", target, mode="copy")


def test_a_restore_works_once_the_web_server_stops_sending_error_pages(
    work: Path, published: tuple[Path, Path]
) -> None:
    """A web server that answered packs with a 200 HTML error page (a proxy's maintenance
    page) and then recovers: the next restores get the packs, not the error page again.
    Before the fix, the short whole-pack read was kept (wholepacks.Taps) and every restore
    that came within TAP_IDLE of the last one was cut from it, so a host retrying its
    restore every few seconds never asked the server again."""
    src, origin_dir = published
    with MisbehavingOrigin(origin_dir) as o, Hostd(work / "d", origin=o.url) as h:
        o.error_page = True

        def fails_and_learns() -> bool:
            failed = _restore(h, work / "out0")
            assert failed["event"] == "error", failed
            assert "pack" in failed["message"], failed
            return "ignores ranged GETs" in h.log()

        # (a 200 to a ranged GET, an error page's, is what makes packs read whole: a
        # restore whose reads were all of whole packs has not shown that yet)
        wait_for("a failed restore to find the server answers no ranges", fails_and_learns)
        o.error_page = False
        served = sum(o.counts(o.served, "packs/").values())
        deadline = time.monotonic() + 3 * wholepacks.TAP_IDLE
        attempt = 0
        while True:
            attempt += 1
            target = work / f"out{attempt}"
            out = _restore(h, target)
            if out["event"] == "result":
                break
            assert time.monotonic() < deadline, (
                f"restores still fail {3 * wholepacks.TAP_IDLE}s after the server recovered, "
                f"after {attempt} tries and {sum(o.counts(o.served, 'packs/').values()) - served}"
                f" pack answers: {out}"
            )
        assert attempt == 1, f"the first restore after the server recovered failed: {out}"
        assert tree_digest(target) == tree_digest(src)


def test_a_ranges_probe_a_server_answers_oddly_is_logged_in_one_line(
    work: Path, published: tuple[Path, Path]
) -> None:
    """busybox httpd answers "Range: bytes=0-0" with the whole object as a 206. The restore
    still works; the log line about the ranges probe is one line naming the cause, not
    obstore's multi-line debug dump of its client's error."""
    src, origin_dir = published
    with MisbehavingOrigin(origin_dir) as o, Hostd(work / "d", origin=o.url) as h:
        o.odd_probe = True
        out = _restore(h, work / "out")
        assert out["event"] == "result", out
        assert tree_digest(work / "out") == tree_digest(src)
        wait_for("the probe's log line", lambda: "ranges probe failed" in h.log(), DEADLINE)
        line = next(x for x in h.log().splitlines() if "ranges probe failed" in x)
        assert "Debug source" not in line, line
        assert "\\n" not in line, line


async def test_a_ranged_answer_longer_than_asked_is_refused_naming_the_range(
    serve: Callable[[Server], Awaitable[Origin]],
) -> None:
    """A server that sends more than the range asked of a pack (a 206 with the range's
    Content-Range and 5,000 bytes more): refused, and the message says the answer ran
    past the range asked, not past the pack's size (which it did not reach: the message
    read as a contradiction, "sent more than 4096 bytes ..., more than the 16384 bytes
    its manifest says")."""
    data = bytes(range(256)) * 64

    async def answer(path: str, headers: dict[str, str]) -> bytes:
        a, b = (int(x) for x in headers["range"].removeprefix("bytes=").split("-"))
        crange = f"Content-Range: bytes {a}-{b}/{len(data)}\r\n"
        return plain(data[a : b + 1] + bytes(5000), "206 Partial Content", crange)

    o = await serve(Server(answer))
    with pytest.raises(ChunkCorrupt) as e:
        await o.get_pack_range(bytes(32), 4096, 4096, len(data))
    assert "4096 bytes asked for at 4096" in e.value.message, e.value.message
    assert "its manifest says" not in e.value.message, e.value.message
