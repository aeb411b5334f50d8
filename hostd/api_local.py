"""The local API: HTTP/1.1 + JSON over the Unix socket (and /metrics beside /v1/).

Every error answer is `{"error": CODE, "message": TEXT}`: unknown paths, wrong methods, bad
JSON and oversized bodies included. Long operations answer a stream of newline-delimited
JSON events that always ends with one `result` or `error`; the status line goes out before
the outcome is known. A client that disconnects cancels its operation.

Before a handler reads a byte of the body, `guard` decides for the caller (SO_PEERCRED and
SO_PEERGROUPS, `request_caller`): whether `[access]` lets it use the route's class (403
forbidden, access.py), and whether an operation that does work fits under the caps (503
unavailable). `ROUTES` names each route's class.

This module parses and answers; the work is done by the parts the daemon hands it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from hostd import access, prune, refs
from hostd.caller import Caller, peer_caller, peer_pidfd, quota_uid
from hostd.core import compat
from hostd.core import manifest as mf
from hostd.core import request as request_fields
from hostd.core.pathfilter import MAX_PATTERNS, compile_pattern
from hostd.core.request import parse_body, parse_query
from hostd.desk import answer, caller_part
from hostd.errors import (
    Forbidden,
    HostdError,
    NotFound,
    RequestTimeout,
    Stopping,
    UsageError,
)
from hostd.materialize import MODES
from hostd.metrics import Snapshot, render
from hostd.origin import retry_observer as origin_retries
from hostd.publish import PublishRequest
from hostd.restore import Progress, RestoreRequest

if TYPE_CHECKING:
    from hostd.daemon import Daemon

log = logging.getLogger(__name__)

PROGRESS_EVERY = 0.25  # seconds between progress events while something changes
BODY_TIMEOUT = 10.0  # seconds a request's body may take to arrive (idle_timeout, if shorter)
# Characters of glob patterns a request's check compiles on the loop; more, on a thread.
PATTERN_CHARS_ON_LOOP = 4096
DAEMON_KEY: web.AppKey[Daemon] = web.AppKey("daemon")
CALLER_KEY: web.RequestKey[Caller] = web.RequestKey("caller", Caller)

_HTTP_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "too_large",
    415: "unsupported_media_type",
}


@web.middleware
async def errors_as_json(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        return await handler(request)
    except HostdError as e:
        return web.json_response(e.to_json(), status=e.status)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        code = _HTTP_CODES.get(e.status, "http_error")
        msg = e.text if e.text and not e.text.startswith(str(e.status)) else e.reason
        if e.status == 404:
            msg = f"no such endpoint: {request.method} {request.path}"
        elif e.status == 405:
            msg = f"method {request.method} is not allowed on {request.path}"
        return web.json_response({"error": code, "message": msg}, status=e.status)
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("internal error answering %s %s", request.method, request.path)
        return web.json_response(
            {"error": "internal", "message": "internal error (see the daemon's log)"}, status=500
        )


@contextlib.contextmanager
def caller_pidfd(request: web.Request) -> Iterator[int]:
    """A pidfd of the process that connected (SO_PEERPIDFD), or -1, closed on exit: the work
    that uses it is over when stream() returns, cancelled or not."""
    transport = request.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    fd = peer_pidfd(sock) if sock is not None and sock.family == socket.AF_UNIX else -1
    try:
        yield fd
    finally:
        if fd >= 0:
            os.close(fd)


def request_caller(request: web.Request) -> Caller:
    """Who sent `request`: SO_PEERCRED and SO_PEERGROUPS of its Unix socket, taken once.

    A request that came some other way (the TCP metrics port) names no caller, and one whose
    connection is already gone cannot be asked: both are Forbidden, never a guess.
    """
    if isinstance(known := request.get(CALLER_KEY), Caller):
        return known
    transport = request.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or sock.family != socket.AF_UNIX:
        raise Forbidden("only a caller on hostd's Unix socket may ask for this")
    try:
        caller = peer_caller(sock)
    except OSError as e:
        raise Forbidden(f"cannot tell who is calling (SO_PEERCRED: {e.strerror or e})") from e
    request[CALLER_KEY] = caller
    return caller


async def _body(request: web.Request, allowed: set[str]) -> dict[str, Any]:
    """The request's JSON object, read within BODY_TIMEOUT (or `idle_timeout`, if shorter) and
    checked by core/request.py.

    aiohttp's timeouts cover only the wait for a request, so a client that trickles its body
    byte by byte would hold its connection (and its place under the caps) for ever. Past the
    deadline it is answered 408 and the connection closes once that is sent: failing the
    payload ends aiohttp's lingering read of the unread rest at once, and it then closes.
    A body is a JSON object of a few hundred bytes: a client that cannot send it in 10 s
    only holds a place others wait for.
    """
    if not request.can_read_body:
        return {}
    timeout = min(BODY_TIMEOUT, request.app[DAEMON_KEY].config.idle_timeout)
    try:
        async with asyncio.timeout(timeout):
            raw = await request.read()
    except TimeoutError:
        request.content.set_exception(TimeoutError())
        raise RequestTimeout(f"the request body did not arrive within {timeout:g}s") from None
    except (web.RequestPayloadError, HttpProcessingError) as e:
        # a broken chunked encoding or Content-Encoding: aiohttp wraps the parser's error
        cause = e.__cause__ if isinstance(e.__cause__, HttpProcessingError) else e
        why = cause.message if isinstance(cause, HttpProcessingError) else str(cause)
        raise UsageError(f"request body could not be read: {why}") from e
    return parse_body(raw, allowed)


# The field helpers (core/request.py), under the names the handlers use.
_str = request_fields.string
_opt_str = request_fields.opt_string
_bool = request_fields.boolean
_facts = request_fields.facts
_path = request_fields.path


def _tier(d: Daemon, body: Mapping[str, Any]) -> str | None:
    """The request's tier name, if any: naming a tier this host lacks is the caller's error."""
    name = _opt_str(body, "tier")
    names = [t.name for t in d.cache.tiers]
    if name is not None and name not in names:
        raise UsageError(f"field 'tier': no tier named {name!r} (tiers: {', '.join(names)})")
    return name


async def stream(
    request: web.Request,
    operation: str,
    work: Callable[[Progress], Awaitable[dict[str, Any]]],
    *,
    admitted: bool = False,
) -> web.StreamResponse:
    """Run `work`, streaming its progress as NDJSON, ending with one result or error event.

    The status line waits until the work says its request is admitted (`Progress.admitted`:
    the ref resolved, the source scanned; `admitted=True`: at once), or until there is
    something to tell (an origin retry, a warning): a failure before that (unknown ref, bad
    request, forbidden, busy) is answered with its own HTTP status and JSON body, so
    `curl -f` fails; only one after it is an `error` event in a 200 stream."""
    d = request.app[DAEMON_KEY]
    d.check_accepting()
    progress = Progress(admitted=admitted)
    d.in_flight += 1
    d.board.refresh()  # the desk's status counts it at once
    running = True

    def ended() -> None:
        """Count the operation out, before its last event goes: whoever reads that event
        and then asks for the status must not see it still running."""
        nonlocal running
        if running:
            running = False
            d.in_flight -= 1
            d.board.refresh()

    def resumed() -> None:
        """Count it in again where it was counted out for a result that never went (the
        client went as it was written): it runs again while what it placed is taken back."""
        nonlocal running
        if not running:
            running = True
            d.in_flight += 1
            d.board.refresh()

    # The work's tasks (and the fetch flights they start) inherit this: they report retries.
    token = origin_retries.set(progress.on_retry)
    try:
        task = asyncio.ensure_future(work(progress))
    finally:
        origin_retries.reset(token)
    d.operations.add(task)  # the daemon cancels it when a stop's drain runs out
    result = "error"
    resp: web.StreamResponse | None = None
    delivered = False  # the result event went out
    observed = False  # counted in the metrics
    try:
        last: dict[str, Any] | None = None
        warned = 0
        while True:
            # a `file` event goes out as it happens; a progress event when something changed,
            # at least every PROGRESS_EVERY
            news = asyncio.ensure_future(progress.news.wait())
            try:
                done, _ = await asyncio.wait(
                    {task, news}, timeout=PROGRESS_EVERY, return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                # also when the handler is cancelled here (the client went away): a wait
                # left pending is destroyed with the Progress ("Task was destroyed but it
                # is pending!", logged at ERROR)
                news.cancel()
            progress.news.clear()
            done.discard(news)
            if resp is None and not done and _to_tell(progress):
                resp = await _start(request)
            if resp is not None:
                warned = await _warn(resp, progress, warned)
                while progress.files:
                    await _send(resp, progress.files.popleft())
                ev = progress.event()
                if ev != last and ev["phase"]:
                    await _send(resp, ev)
                    last = ev
            if done:
                break
        ended()
        try:
            out = task.result()
        except asyncio.CancelledError:  # by the daemon: it is stopping and the drain ran out
            result = "cancelled"
            log.info("%s cancelled: hostd is stopping", operation)
            err = Stopping(f"hostd stopped before the {operation} finished; it was cancelled")
            if resp is None:
                raise err from None
            await _send(resp, {"event": "error", **err.to_json()})
        except HostdError as e:
            result = "not_found" if isinstance(e, NotFound) else "error"
            log.info("%s by %s failed: %s", operation, _who(request), e.message)
            if resp is None:  # known before the stream started: its own HTTP status
                raise
            await _send(resp, {"event": "error", **e.to_json()})
        except Exception:
            log.exception("%s failed", operation)
            internal = {"error": "internal", "message": "internal error"}
            if resp is None:
                return web.json_response(internal, status=500)
            await _send(resp, {"event": "error", **internal})
        else:
            result = "ok"
            _done(request, operation, {**out, "seconds": out.get("timings", {}).get("total")})
            if progress.take_back is None:
                # done whether or not its client hears it (counted once)
                d.metrics.observe(operation, result, out)
                observed = True
            if resp is None:
                resp = await _start(request)
            await _warn(resp, progress, warned)
            while progress.files:
                await _send(resp, progress.files.popleft())
            await _send(resp, {"event": "result", **out})
            delivered = True
            if not observed:  # a progressive restore, whose client heard it: it stays
                d.metrics.observe(operation, result, out)
                observed = True
        await resp.write_eof()
    except asyncio.CancelledError:
        result = "cancelled"
        log.info("%s cancelled: the client went away", operation)
        raise
    except ConnectionError:
        # An event could not be written: the client went away. Nothing is left to answer,
        # and it is no internal error: aiohttp ends the response it is handed back quietly.
        result = "cancelled"
        log.info("%s cancelled: the client went away", operation)
        return resp if resp is not None else web.Response()
    finally:
        # Counted out last where nothing counted it out yet (the client went): while its
        # work stops and what it placed is taken back, it is still running, and still holds
        # its place under the caps (until this handler returns). A client gone as an event
        # was written (ConnectionError) is heard of twice: aiohttp then cancels this handler
        # too, as the connection is lost, while the winding down waits; it is seen through.
        async def wind_down() -> None:
            try:
                d.operations.discard(task)
                if not task.done():
                    task.cancel()
                    await asyncio.wait({task})
                back, progress.take_back = progress.take_back, None
                if back is not None and result == "cancelled" and not delivered:
                    # It had placed everything, but the caller went before it heard so: as
                    # any cancel, the progressive restore is taken back.
                    resumed()
                    log.info("%s: taking back what it placed in %s", operation, back.ledger.path)
                    await d.restorer.spawner.run(back.run)
                elif back is not None:
                    back.close()
                if not observed:
                    d.metrics.observe(operation, result, None)
            finally:
                ended()
                d.trimmer.ended()

        winding = asyncio.ensure_future(wind_down())
        cancelled = False
        while not winding.done():
            try:
                await asyncio.shield(winding)
            except asyncio.CancelledError:
                if winding.done() and winding.cancelled():
                    raise
                cancelled = True
        winding.result()
        if cancelled:
            raise asyncio.CancelledError
    return resp


def _done(request: web.Request, operation: str, out: Mapping[str, Any]) -> None:
    """One log line for an operation that succeeded: who asked, and what it did (the
    result's plain values), so that "who moved this ref, removed that snapshot" is answered
    by the log."""
    what = " ".join(
        f"{k}={_plain(v)}" for k, v in out.items() if isinstance(v, str | int | float | bool)
    )
    log.info("%s by %s: %s", operation, _who(request), what)


def _plain(v: str | float | bool) -> str:
    """A value as a log line shows it: bare where that cannot be misread, else quoted."""
    if isinstance(v, float):
        return f"{v:.3f}"
    if isinstance(v, str) and v and not any(c in v for c in ' "=\\'):
        return v
    return json.dumps(v)


def _who(request: web.Request) -> str:
    known = request.get(CALLER_KEY)
    return f"uid {known.uid} (pid {known.pid})" if isinstance(known, Caller) else "a caller"


def _to_tell(progress: Progress) -> bool:
    return progress.admitted or progress.retry is not None or bool(progress.warnings)


async def _start(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await resp.prepare(request)
    return resp


async def _warn(resp: web.StreamResponse, progress: Progress, sent: int) -> int:
    """Send the warnings not sent yet, as `warning` events; how many are sent now."""
    for warning in progress.warnings[sent:]:
        await _send(resp, {"event": "warning", **warning})
    return len(progress.warnings)


async def _send(resp: web.StreamResponse, event: Mapping[str, Any]) -> None:
    await resp.write(json.dumps(event, separators=(",", ":")).encode() + b"\n")


async def status(request: web.Request) -> web.Response:
    """The status, fresh: the desk (desk.py) answers most status requests off the loop, and
    hands here those it cannot take whole; both answer the same document."""
    d = request.app[DAEMON_KEY]
    part = caller_part(d.config.access, request.app[EUID_KEY], request_caller(request))
    body = answer(d.board, d.board.refresh(), 0.0, part)
    return web.Response(body=body, headers={"Content-Type": "application/json; charset=utf-8"})


async def restore(request: web.Request) -> web.StreamResponse:
    d = request.app[DAEMON_KEY]
    body = await _body(
        request,
        {
            "ref",
            "target",
            "mode",
            "replace",
            "compat",
            "tier",
            "progressive",
            "keep_partial",
            "order",
            "ranges",
        },
    )
    mode = _str(body, "mode", "auto")
    if mode not in MODES:
        raise UsageError(f"field 'mode' must be one of {', '.join(MODES)}, got {mode!r}")
    tier = _tier(d, body)
    progressive = _bool(body, "progressive")
    if not progressive and ({"keep_partial", "order", "ranges"} & body.keys()):
        raise UsageError(
            "fields 'keep_partial', 'order' and 'ranges' are for a progressive restore only"
        )
    with caller_pidfd(request) as pidfd:
        req = RestoreRequest(
            ref=_str(body, "ref"),
            target=_path(body, "target"),
            caller=request_caller(request),
            mode=mode,
            replace=_bool(body, "replace"),
            progressive=progressive,
            keep_partial=_bool(body, "keep_partial"),
            order=await _patterns(body, "order"),
            ranges=_bool(body, "ranges"),
            compat=_facts(body, "compat"),
            tier=tier,
            pidfd=pidfd,
        )
        return await stream(request, "restore", lambda p: d.restorer.restore(req, p))


async def prefetch(request: web.Request) -> web.StreamResponse:
    d = request.app[DAEMON_KEY]
    body = await _body(request, {"ref", "tier", "compat"})
    ref, tier, given = _str(body, "ref"), _tier(d, body), _facts(body, "compat")
    return await stream(request, "prefetch", lambda p: d.restorer.prefetch(ref, given, tier, p))


async def publish(request: web.Request) -> web.StreamResponse:
    d = request.app[DAEMON_KEY]
    body = await _body(
        request,
        {
            "path",
            "ref",
            "kind",
            "facts",
            "compat",
            "meta",
            "chunk_size",
            "include",
            "exclude",
            "force",
        },
    )
    include, exclude = await _patterns(body, "include"), await _patterns(body, "exclude")
    facts = body.get("facts")
    if facts is not None and (
        not isinstance(facts, list) or not all(isinstance(f, str) and f for f in facts)
    ):
        raise UsageError("field 'facts' must be a list of fact names")
    given = _facts(body, "compat")
    for name in [*(facts or []), *given]:
        # (checked here, not first when the manifest is built: a typo is a usage error, 2)
        if not mf.FACT_NAME.fullmatch(name):
            raise UsageError(
                f"compat fact name {name!r} must match [a-z][a-z0-9_]* (64 characters at most)"
            )
    kind = _str(body, "kind", compat.DEFAULT_KIND)
    if kind not in compat.KINDS:
        raise UsageError(f"field 'kind' must be one of {', '.join(compat.KINDS)}, got {kind!r}")
    if facts is not None and "kind" in body:
        raise UsageError("fields 'kind' and 'facts' both choose the compat facts: give one")
    cs = body.get("chunk_size")
    if cs is not None and (
        not isinstance(cs, int)
        or isinstance(cs, bool)
        or not mf.MIN_CHUNK_SIZE <= cs <= mf.MAX_CHUNK_SIZE
        or cs & (cs - 1)
    ):
        raise UsageError("field 'chunk_size' must be a power of two from 64 KiB to 256 MiB")
    with caller_pidfd(request) as pidfd:
        req = PublishRequest(
            path=_path(body, "path"),
            ref=_str(body, "ref"),
            caller=request_caller(request),
            facts=facts,
            kind=kind,
            compat=given,
            meta=_facts(body, "meta"),
            chunk_size=cs,
            pidfd=pidfd,
            include=include,
            exclude=exclude,
            force=_bool(body, "force"),
        )
        return await stream(request, "publish", lambda p: d.publisher.publish(req, p))


async def _patterns(body: Mapping[str, Any], name: str) -> list[str]:
    """A list of glob patterns (core/pathfilter.py: publish filters, a load order), each
    checked to compile: on a thread where they are long (256 of 1,024 characters take half
    a second), after the count (a 1 MiB body holds 100,000 short ones)."""
    value = body.get(name, [])
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        raise UsageError(f"field {name!r} must be a list of glob patterns")
    if len(value) > MAX_PATTERNS:
        raise UsageError(f"field {name!r}: more than {MAX_PATTERNS} patterns")
    if sum(map(len, value)) > PATTERN_CHARS_ON_LOOP:
        await asyncio.to_thread(_compiles, value, name)
    else:
        _compiles(value, name)
    return value


def _compiles(patterns: list[str], name: str) -> None:
    for pattern in patterns:
        try:
            compile_pattern(pattern)
        except ValueError as e:
            raise UsageError(f"field {name!r}: {e}") from None


async def pin(request: web.Request) -> web.Response:
    return await _pin(request, True)


async def unpin(request: web.Request) -> web.Response:
    return await _pin(request, False)


async def _pin(request: web.Request, pinned: bool) -> web.Response:
    d = request.app[DAEMON_KEY]
    body = await _body(request, {"ref", "snapshot", "compat"})
    if "snapshot" in body:
        sid = prune.known_id(d.cache, _str(body, "snapshot"))  # a full id or unique prefix
    else:
        res = await d.restorer.resolver.resolve(_str(body, "ref"), _facts(body, "compat"))
        sid = res.snapshot_id
        d.cache.record_snapshot(res.manifest)
    d.cache.set_pinned(sid, pinned)
    out = {"snapshot": sid, "pinned": pinned}
    _done(request, "pin" if pinned else "unpin", out)
    return web.json_response(out)


async def snapshots(request: web.Request) -> web.Response:
    return web.json_response({"snapshots": await request.app[DAEMON_KEY].list_snapshots()})


async def gc(request: web.Request) -> web.Response:
    await _body(request, set())
    out = await request.app[DAEMON_KEY].gc()
    _done(request, "gc", out)
    return web.json_response(out)


async def rm(request: web.Request) -> web.Response:
    d = request.app[DAEMON_KEY]
    body = await _body(request, {"names"})
    names = body.get("names")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise UsageError("field 'names' must be a non-empty list of refs or snapshot ids")
    d.check_accepting()
    out = await prune.rm(d.cache, names, d.filler.filling())
    _done(request, "rm", {"names": " ".join(names), **out})
    return web.json_response(out)


async def prune_snapshots(request: web.Request) -> web.Response:
    d = request.app[DAEMON_KEY]
    body = await _body(request, {"keep", "unused_for", "dry_run"})
    keep, unused = body.get("keep"), body.get("unused_for")
    if keep is not None and (type(keep) is not int or keep < 0):
        raise UsageError("field 'keep' must be a whole number, 0 or more")
    if unused is not None and (type(unused) not in (int, float) or not 0 <= unused < 1e12):
        raise UsageError("field 'unused_for' must be a number of seconds, 0 or more")
    d.check_accepting()
    result = await prune.prune(
        d.cache,
        keep=keep,
        unused_for=None if unused is None else float(unused),
        dry_run=_bool(body, "dry_run"),
        busy=d.filler.filling(),
    )
    _done(request, "prune", result)
    return web.json_response(result)


async def list_refs(request: web.Request) -> web.Response:
    d = request.app[DAEMON_KEY]
    prefix = parse_query(request.query.items(), {"prefix"}).get("prefix", "")
    return web.json_response(await refs.list_refs(d.origin, d.restorer.resolver, d.cache, prefix))


async def inspect(request: web.Request) -> web.Response:
    d = request.app[DAEMON_KEY]
    body = await _body(request, {"name", "compat"})
    name, given = _str(body, "name"), _facts(body, "compat")
    return web.json_response(
        await refs.inspect(d.origin, d.restorer.resolver, d.cache, name, given)
    )


async def ref_history(request: web.Request) -> web.Response:
    d = request.app[DAEMON_KEY]
    body = await _body(request, {"ref", "limit"})
    limit = body.get("limit", refs.HISTORY_SHOWN)
    if type(limit) is not int or not 1 <= limit <= 10_000:
        raise UsageError("field 'limit' must be a whole number from 1 to 10000")
    log = d.publisher.reflog
    return web.json_response(
        await refs.history(log, d.restorer.resolver, d.cache, _str(body, "ref"), limit)
    )


async def ref_set(request: web.Request) -> web.Response:
    d = request.app[DAEMON_KEY]
    body = await _body(request, {"ref", "snapshot"})
    ref, snapshot = _str(body, "ref"), _str(body, "snapshot")
    d.check_accepting()
    out = await refs.set_ref(d.publisher.reflog, d.restorer.resolver, d.cache, ref, snapshot)
    _done(request, "ref set", {"ref": ref, **out})
    return web.json_response(out)


async def verify(request: web.Request) -> web.StreamResponse:
    d = request.app[DAEMON_KEY]
    await _body(request, set())
    return await stream(request, "verify", d.verify, admitted=True)


async def metrics(request: web.Request) -> web.Response:
    """The metrics in the format the scraper asks for (Accept): OpenMetrics for a Prometheus
    server, which asks for it first, else the text format (0.0.4, which every scraper reads;
    not the client library's latest, whose media type changes with its version)."""
    # Collected here on the loop, a consistent snapshot; only the formatting goes to a thread.
    snapshot = Snapshot(request.app[DAEMON_KEY].metrics.registry)
    accept = request.headers.get("Accept", "")
    body, content_type = await asyncio.to_thread(render, snapshot, accept)
    return web.Response(body=body, headers={"Content-Type": content_type})


@dataclass(frozen=True, slots=True)
class Rule:
    """What a route asks of its caller: a class of operation, and a place under the caps."""

    cls: str
    counted: bool  # it does work (status and listings do not)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Every route of the socket, with the class of operation (access.py) its caller needs, or
# None for a route open to every socket user, and whether it counts under the caps.
ROUTES: tuple[tuple[str, str, Handler, Rule | None], ...] = (
    ("GET", "/v1/status", status, Rule("restore", counted=False)),
    ("POST", "/v1/restore", restore, Rule("restore", counted=True)),
    ("POST", "/v1/prefetch", prefetch, Rule("restore", counted=True)),
    ("POST", "/v1/publish", publish, Rule("publish", counted=True)),
    ("POST", "/v1/pin", pin, Rule("admin", counted=True)),
    ("POST", "/v1/unpin", unpin, Rule("admin", counted=True)),
    ("GET", "/v1/snapshots", snapshots, Rule("restore", counted=False)),
    ("POST", "/v1/gc", gc, Rule("admin", counted=True)),
    ("POST", "/v1/verify", verify, Rule("admin", counted=True)),
    ("POST", "/v1/rm", rm, Rule("admin", counted=True)),
    ("POST", "/v1/prune", prune_snapshots, Rule("admin", counted=True)),
    ("GET", "/v1/refs", list_refs, Rule("restore", counted=True)),
    ("POST", "/v1/inspect", inspect, Rule("restore", counted=True)),
    ("POST", "/v1/ref/history", ref_history, Rule("restore", counted=True)),
    ("POST", "/v1/ref/set", ref_set, Rule("publish", counted=True)),
    ("GET", "/metrics", metrics, None),
)
RULES_KEY: web.AppKey[dict[web.AbstractResource, Rule]] = web.AppKey("rules")
OPERATIONS_KEY: web.AppKey[access.Operations] = web.AppKey("operations")
EUID_KEY: web.AppKey[int] = web.AppKey("euid")


@web.middleware
async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Decide for the caller before its handler reads a byte of the body: may it use the
    route's class (403 if not), and is there room under the caps (503 if not). The place
    under the caps is held until the handler returns or is cancelled (client gone): so the
    bodies being read are as many as the places, at most, each within client_max_size."""
    resource = request.match_info.route.resource
    rule = request.app[RULES_KEY].get(resource) if resource is not None else None
    if rule is None:  # /metrics, or an answer of the router itself (404, 405)
        return await handler(request)
    config = request.app[DAEMON_KEY].config.access
    caller = request_caller(request)
    access.check(config, request.app[EUID_KEY], caller, rule.cls)
    if not rule.counted:
        return await handler(request)
    operations = request.app[OPERATIONS_KEY]
    # (a rootless container's subordinate uids count as the user who made it)
    with caller_pidfd(request) as pidfd:
        key = quota_uid(caller.pid, caller.uid, request.app[EUID_KEY], pidfd)
    slot = operations.take(config, key)
    try:
        return await handler(request)
    finally:
        operations.release(slot)
        request.app[DAEMON_KEY].board.refresh()  # what it changed shows in the next status


def make_app(daemon: Daemon, max_body: int, *, euid: int | None = None) -> web.Application:
    """The socket's app. `euid` is the daemon's effective uid (default: this process's)."""
    app = web.Application(middlewares=[errors_as_json, guard], client_max_size=max_body)
    app[DAEMON_KEY] = daemon
    app[EUID_KEY] = os.geteuid() if euid is None else euid
    app[OPERATIONS_KEY] = access.Operations()
    rules: dict[web.AbstractResource, Rule] = {}
    for method, path, handler, rule in ROUTES:
        # add_get also answers HEAD, on the same resource and so under the same rule
        route = (
            app.router.add_get(path, handler)
            if method == "GET"
            else app.router.add_route(method, path, handler)
        )
        if rule is not None and route.resource is not None:
            rules[route.resource] = rule
    app[RULES_KEY] = rules
    return app


def make_metrics_app(daemon: Daemon) -> web.Application:
    app = web.Application(middlewares=[errors_as_json])
    app[DAEMON_KEY] = daemon
    app.add_routes([web.get("/metrics", metrics)])
    return app
