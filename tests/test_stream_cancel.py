"""The local API's stream loop, cancelled as aiohttp cancels a handler whose client went
away: it must leave no task of its own pending (a pending `Event.wait()` task is destroyed
with the operation's Progress, and asyncio logs that at ERROR)."""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
from collections.abc import Awaitable, Callable
from types import SimpleNamespace
from typing import Any, cast

import pytest
from aiohttp import web
from aiohttp.client_exceptions import ClientConnectionResetError

from hostd import api_local
from hostd.core import manifest as mf
from hostd.restore import Progress


class _Request:
    method = "POST"
    path = "/v1/restore"

    def __init__(self, daemon: Any) -> None:
        self.app = {api_local.DAEMON_KEY: daemon}

    def get(self, key: object, default: object = None) -> object:
        return default  # (no caller taken: a web.Request's own keys)


def _daemon(observe: Callable[..., None] = lambda *a: None) -> Any:
    """What `stream` uses of the daemon, and nothing more."""
    return SimpleNamespace(
        check_accepting=lambda: None,
        in_flight=0,
        board=SimpleNamespace(refresh=lambda: None),
        operations=set(),
        trimmer=SimpleNamespace(ended=lambda: None),
        metrics=SimpleNamespace(observe=observe),
    )


async def test_a_cancelled_stream_leaves_no_pending_wait_behind() -> None:
    started = asyncio.Event()
    daemon = _daemon()

    async def work(progress: Progress) -> dict[str, Any]:
        started.set()
        await asyncio.Event().wait()  # a restore still fetching
        return {}

    before = asyncio.all_tasks()
    handler = asyncio.ensure_future(
        api_local.stream(cast(web.Request, _Request(daemon)), "restore", work)
    )
    await started.wait()
    await asyncio.sleep(0)  # the loop is in its wait for news or the end of the work
    handler.cancel()  # the client hung up
    await asyncio.wait({handler})
    assert handler.cancelled()
    for _ in range(3):  # let cancelled tasks unwind
        await asyncio.sleep(0)
    left = [t for t in asyncio.all_tasks() - before if t is not asyncio.current_task()]
    assert [t for t in left if not t.done()] == []
    assert daemon.in_flight == 0


class _GoneResponse:
    """A stream response whose client has gone: every write fails as aiohttp's does."""

    async def write(self, data: bytes) -> None:
        raise ClientConnectionResetError("Cannot write to closing transport")

    async def write_eof(self, data: bytes = b"") -> None:
        raise ClientConnectionResetError("Cannot write to closing transport")


async def test_a_client_gone_before_its_result_is_a_cancel_not_an_internal_error(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    observed: list[str] = []
    daemon = _daemon(observe=lambda op, result, out: observed.append(result))
    gone = _GoneResponse()

    async def start(request: web.Request) -> _GoneResponse:
        return gone

    async def work(progress: Progress) -> dict[str, Any]:
        return {"snapshot": "0" * 64}  # the restore is done; its client is not there to hear

    monkeypatch.setattr(api_local, "_start", start)
    request = _Request(daemon)
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]] = functools.partial(
        api_local.stream, operation="restore", work=work
    )
    with caplog.at_level(logging.INFO, logger="hostd.api_local"):
        resp = await api_local.errors_as_json(cast(web.Request, request), handler)
    assert cast(object, resp) is gone  # handed back for aiohttp to end, not a 500 answer
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert observed == ["ok"]  # it did its work; counted once
    assert daemon.in_flight == 0


async def test_a_take_back_after_a_result_that_could_not_be_written_is_still_running(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A progressive restore that placed everything, whose client went as its result was
    written: it was counted out for that result, but what it placed is taken back now, and
    until that is done it is running (in_flight), as a client gone earlier is; and it is
    counted a cancel, not a success, since nothing of it stays."""
    observed: list[str] = []
    daemon = _daemon(observe=lambda op, result, out: observed.append(result))
    seen: list[int] = []

    async def run(fn: Callable[[], object]) -> object:
        return fn()

    daemon.restorer = SimpleNamespace(spawner=SimpleNamespace(run=run))
    back = SimpleNamespace(
        ledger=SimpleNamespace(path="/out"),
        run=lambda: seen.append(daemon.in_flight),
        close=lambda: None,
    )

    async def start(request: web.Request) -> _GoneResponse:
        return _GoneResponse()

    async def work(progress: Progress) -> dict[str, Any]:
        progress.take_back = cast(Any, back)  # it placed everything: taken back on a cancel
        return {"snapshot": "0" * 64}

    monkeypatch.setattr(api_local, "_start", start)
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]] = functools.partial(
        api_local.stream, operation="restore", work=work
    )
    await api_local.errors_as_json(cast(web.Request, _Request(daemon)), handler)
    assert seen == [1]  # taken back while still counted
    assert daemon.in_flight == 0
    assert observed == ["cancelled"]  # nothing of it stays: not counted a success


class _HeardResponse:
    """A stream response whose client reads everything."""

    def __init__(self) -> None:
        self.events: list[bytes] = []

    async def write(self, data: bytes) -> None:
        self.events.append(data)

    async def write_eof(self, data: bytes = b"") -> None:
        pass


async def test_a_progressive_restore_whose_client_heard_its_result_is_counted_a_success(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    observed: list[str] = []
    daemon = _daemon(observe=lambda op, result, out: observed.append(result))
    closed: list[bool] = []
    back = SimpleNamespace(run=lambda: pytest.fail("taken back"), close=lambda: closed.append(True))
    heard = _HeardResponse()

    async def start(request: web.Request) -> _HeardResponse:
        return heard

    async def work(progress: Progress) -> dict[str, Any]:
        progress.take_back = cast(Any, back)
        return {"snapshot": "0" * 64}

    monkeypatch.setattr(api_local, "_start", start)
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]] = functools.partial(
        api_local.stream, operation="restore", work=work
    )
    await api_local.errors_as_json(cast(web.Request, _Request(daemon)), handler)
    assert any(b'"result"' in e for e in heard.events)
    assert observed == ["ok"]
    assert closed == [True]  # kept: its ledger is let go
    assert daemon.in_flight == 0


async def _settle(handler: asyncio.Future[Any]) -> None:
    """Let a cancelled handler run what it runs at once (a few steps of the loop)."""
    for _ in range(5):
        if handler.done():
            return
        await asyncio.sleep(0)


async def test_a_take_back_outlasts_the_cancel_of_a_lost_connection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The result could not be written (ClientConnectionResetError: the transport is
    closing), so what the restore placed is taken back; then aiohttp, hearing the connection
    lost, cancels the handler (handler_cancellation=True) while that take-back runs. The
    handler must not count the operation out (in_flight, and its place under the caps,
    which the guard gives back when the handler returns) until the take-back is done."""
    observed: list[str] = []
    daemon = _daemon(observe=lambda op, result, out: observed.append(result))
    taking = threading.Event()
    release = threading.Event()

    async def run(fn: Callable[[], object]) -> object:
        return await asyncio.to_thread(fn)

    def take_back() -> None:
        taking.set()
        release.wait(60)

    daemon.restorer = SimpleNamespace(spawner=SimpleNamespace(run=run))
    back = SimpleNamespace(ledger=SimpleNamespace(path="/out"), run=take_back, close=lambda: None)

    async def start(request: web.Request) -> _GoneResponse:
        return _GoneResponse()

    async def work(progress: Progress) -> dict[str, Any]:
        progress.take_back = cast(Any, back)
        return {"snapshot": "0" * 64}

    monkeypatch.setattr(api_local, "_start", start)
    handler = asyncio.ensure_future(
        api_local.stream(cast(web.Request, _Request(daemon)), "restore", work)
    )
    try:
        assert await asyncio.to_thread(taking.wait, 60)
        handler.cancel()  # aiohttp's connection_lost, for the same hang-up
        await _settle(handler)
        assert not handler.done()  # still taking back
        assert daemon.in_flight == 1
    finally:
        release.set()
    await asyncio.wait({handler})
    assert daemon.in_flight == 0
    assert observed == ["cancelled"]  # taken back: nothing of it stays


async def test_a_work_unwinding_outlasts_the_cancel_of_a_lost_connection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An event could not be written mid-restore (ConnectionError): the handler cancels the
    work and waits while it unwinds (a progressive restore takes back what it placed); the
    cancel aiohttp then sends for the lost connection must not count it out before the
    work is done, nor leave the cancel uncounted in the metrics."""
    observed: list[str] = []
    daemon = _daemon(observe=lambda op, result, out: observed.append(result))
    unwinding = asyncio.Event()
    unwound = asyncio.Event()

    async def start(request: web.Request) -> _GoneResponse:
        return _GoneResponse()

    async def work(progress: Progress) -> dict[str, Any]:
        progress.placed([mf.FileEntry("a", 0o644, 1, ())])  # a `file` event to write
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            unwinding.set()
            await unwound.wait()  # its abort: what it placed, taken back
            raise
        return {}

    monkeypatch.setattr(api_local, "_start", start)
    handler = asyncio.ensure_future(
        api_local.stream(cast(web.Request, _Request(daemon)), "restore", work, admitted=True)
    )
    await unwinding.wait()
    handler.cancel()  # aiohttp's connection_lost
    await _settle(handler)
    assert not handler.done()
    assert daemon.in_flight == 1
    unwound.set()
    await asyncio.wait({handler})
    assert daemon.in_flight == 0
    assert observed == ["cancelled"]
