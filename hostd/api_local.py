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
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from hostd import access
from hostd.caller import Caller, peer_caller, peer_pidfd
from hostd.core import manifest as mf
from hostd.core import request as request_fields
from hostd.core.request import parse_body
from hostd.errors import Busy, Forbidden, HostdError, NotFound, RequestTimeout, UsageError
from hostd.materialize import MODES
from hostd.metrics import Snapshot
from hostd.publish import PublishRequest
from hostd.restore import Progress, RestoreRequest

if TYPE_CHECKING:
    from hostd.daemon import Daemon

log = logging.getLogger(__name__)

PROGRESS_EVERY = 0.25  # seconds between progress events while something changes
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
    """The request's JSON object, read within `idle_timeout` and checked by core/request.py.

    aiohttp's timeouts cover only the wait for a request, so a client that trickles its body
    byte by byte would hold its connection (and its place under the caps) for ever. Past the
    deadline it is answered 408 and the connection closes once that is sent: failing the
    payload ends aiohttp's lingering read of the unread rest at once, and it then closes.
    """
    if not request.can_read_body:
        return {}
    timeout = request.app[DAEMON_KEY].config.idle_timeout
    try:
        async with asyncio.timeout(timeout):
            raw = await request.read()
    except TimeoutError:
        request.content.set_exception(TimeoutError())
        raise RequestTimeout(
            f"the request body did not arrive within idle_timeout ({timeout:g}s)"
        ) from None
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
    request: web.Request, operation: str, work: Callable[[Progress], Awaitable[dict[str, Any]]]
) -> web.StreamResponse:
    """Run `work`, streaming its progress as NDJSON, ending with one result or error event."""
    d = request.app[DAEMON_KEY]
    d.check_accepting()
    resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await resp.prepare(request)
    progress = Progress()
    d.in_flight += 1
    task = asyncio.ensure_future(work(progress))
    d.operations.add(task)  # the daemon cancels it when a stop's drain runs out
    result = "error"
    try:
        last: dict[str, Any] | None = None
        while True:
            done, _ = await asyncio.wait({task}, timeout=PROGRESS_EVERY)
            ev = progress.event()
            if ev != last and ev["phase"]:
                await _send(resp, ev)
                last = ev
            if done:
                break
        try:
            out = task.result()
        except asyncio.CancelledError:  # by the daemon: it is stopping and the drain ran out
            result = "cancelled"
            log.info("%s cancelled: hostd is stopping", operation)
            err = Busy(f"hostd stopped before the {operation} finished; it was cancelled")
            await _send(resp, {"event": "error", **err.to_json()})
        except HostdError as e:
            result = "not_found" if isinstance(e, NotFound) else "error"
            log.info("%s failed: %s", operation, e.message)
            await _send(resp, {"event": "error", **e.to_json()})
        except Exception:
            log.exception("%s failed", operation)
            await _send(resp, {"event": "error", "error": "internal", "message": "internal error"})
        else:
            result = "ok"
            d.metrics.observe(operation, result, out.get("timings"))
            for src, n in out.get("bytes_by_source", {}).items():
                d.metrics.restore_bytes.labels(src).inc(n)
            await _send(resp, {"event": "result", **out})
        await resp.write_eof()
    except (asyncio.CancelledError, ConnectionError):
        result = "cancelled"
        log.info("%s cancelled: the client went away", operation)
        raise
    finally:
        d.in_flight -= 1
        d.operations.discard(task)
        if not task.done():
            task.cancel()
            await asyncio.wait({task})
        if result != "ok":
            d.metrics.observe(operation, result, None)
    return resp


async def _send(resp: web.StreamResponse, event: Mapping[str, Any]) -> None:
    await resp.write(json.dumps(event, separators=(",", ":")).encode() + b"\n")


async def status(request: web.Request) -> web.Response:
    d = request.app[DAEMON_KEY]
    caller = request_caller(request)
    may = access.classes(d.config.access, request.app[EUID_KEY], caller)
    return web.json_response({**d.status(), "caller": {**caller.to_json(), "classes": list(may)}})


async def restore(request: web.Request) -> web.StreamResponse:
    d = request.app[DAEMON_KEY]
    body = await _body(request, {"ref", "target", "mode", "replace", "compat", "tier"})
    mode = _str(body, "mode", "auto")
    if mode not in MODES:
        raise UsageError(f"field 'mode' must be one of {', '.join(MODES)}, got {mode!r}")
    tier = _tier(d, body)
    with caller_pidfd(request) as pidfd:
        req = RestoreRequest(
            ref=_str(body, "ref"),
            target=_path(body, "target"),
            caller=request_caller(request),
            mode=mode,
            replace=_bool(body, "replace"),
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
    body = await _body(request, {"path", "ref", "facts", "compat", "meta", "chunk_size"})
    facts = body.get("facts")
    if facts is not None and (
        not isinstance(facts, list) or not all(isinstance(f, str) and f for f in facts)
    ):
        raise UsageError("field 'facts' must be a list of fact names")
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
            compat=_facts(body, "compat"),
            meta=_facts(body, "meta"),
            chunk_size=cs,
            pidfd=pidfd,
        )
        return await stream(request, "publish", lambda p: d.publisher.publish(req, p))


async def pin(request: web.Request) -> web.Response:
    return await _pin(request, True)


async def unpin(request: web.Request) -> web.Response:
    return await _pin(request, False)


async def _pin(request: web.Request, pinned: bool) -> web.Response:
    d = request.app[DAEMON_KEY]
    body = await _body(request, {"ref", "snapshot", "compat"})
    if "snapshot" in body:
        sid = _str(body, "snapshot")
        if d.cache.snapshot(sid) is None:
            raise NotFound(f"snapshot {sid} is not known on this host (prefetch it first)")
    else:
        res = await d.restorer.resolver.resolve(_str(body, "ref"), _facts(body, "compat"))
        sid = res.snapshot_id
        d.cache.record_snapshot(res.manifest)
    d.cache.set_pinned(sid, pinned)
    return web.json_response({"snapshot": sid, "pinned": pinned})


async def snapshots(request: web.Request) -> web.Response:
    return web.json_response({"snapshots": await request.app[DAEMON_KEY].list_snapshots()})


async def gc(request: web.Request) -> web.Response:
    await _body(request, set())
    return web.json_response(await request.app[DAEMON_KEY].gc())


async def verify(request: web.Request) -> web.StreamResponse:
    d = request.app[DAEMON_KEY]
    await _body(request, set())
    return await stream(request, "verify", d.verify)


async def metrics(request: web.Request) -> web.Response:
    # Collected here on the loop, a consistent snapshot; only the formatting goes to a thread.
    snapshot = Snapshot(request.app[DAEMON_KEY].metrics.registry)
    body = await asyncio.to_thread(generate_latest, snapshot)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


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
    ("GET", "/metrics", metrics, None),
)
RULES_KEY: web.AppKey[dict[web.AbstractResource, Rule]] = web.AppKey("rules")
OPERATIONS_KEY: web.AppKey[access.Operations] = web.AppKey("operations")
EUID_KEY: web.AppKey[int] = web.AppKey("euid")


@web.middleware
async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Decide for the caller before its handler reads a byte of the body: may it use the
    route's class (403 if not), and is there room under the caps (503 if not). The place
    under the caps is held until the handler returns or is cancelled (client gone)."""
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
    slot = operations.take(config, caller.uid)
    try:
        return await handler(request)
    finally:
        operations.release(slot)


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
