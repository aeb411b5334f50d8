"""The local API: HTTP/1.1 + JSON over the Unix socket (and /metrics beside /v1/).

Every error answer is `{"error": CODE, "message": TEXT}`: unknown paths, wrong methods, bad
JSON and oversized bodies included. Long operations answer a stream of newline-delimited
JSON events that always ends with one `result` or `error`; the status line goes out before
the outcome is known. A client that disconnects cancels its operation.

This module parses and answers; the work is done by the parts the daemon hands it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import struct
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from hostd.core import manifest as mf
from hostd.errors import Busy, HostdError, NotFound, UsageError
from hostd.materialize import MODES
from hostd.publish import PublishRequest
from hostd.restore import Progress, RestoreRequest, peer_owner

if TYPE_CHECKING:
    from hostd.daemon import Daemon

log = logging.getLogger(__name__)

PROGRESS_EVERY = 0.25  # seconds between progress events while something changes
DAEMON_KEY: web.AppKey[Daemon] = web.AppKey("daemon")

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


def peer_credentials(request: web.Request) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of the Unix socket."""
    sock = request.transport.get_extra_info("socket") if request.transport else None
    if sock is None or sock.family != socket.AF_UNIX:
        return (0, -1, -1)
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


async def _body(request: web.Request, allowed: set[str]) -> dict[str, Any]:
    if not request.can_read_body:
        return {}
    try:
        body = await request.json()
    except json.JSONDecodeError as e:
        raise UsageError(f"request body is not valid JSON: {e}") from e
    if not isinstance(body, dict):
        raise UsageError("request body must be a JSON object")
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise UsageError(
            f"unknown field(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}"
        )
    return body


def _str(body: Mapping[str, Any], key: str, default: str | None = None) -> str:
    v = body.get(key, default)
    if not isinstance(v, str) or not v:
        raise UsageError(f"field {key!r} must be a non-empty string")
    return v


def _opt_str(body: Mapping[str, Any], key: str) -> str | None:
    return None if body.get(key) is None else _str(body, key)


def _bool(body: Mapping[str, Any], key: str) -> bool:
    v = body.get(key, False)
    if not isinstance(v, bool):
        raise UsageError(f"field {key!r} must be true or false")
    return v


def _facts(body: Mapping[str, Any], key: str) -> dict[str, str]:
    v = body.get(key, {})
    if not isinstance(v, dict) or not all(
        isinstance(k, str) and isinstance(x, str) for k, x in v.items()
    ):
        raise UsageError(f"field {key!r} must be an object of strings")
    return v


def _path(body: Mapping[str, Any], key: str) -> Path:
    p = Path(_str(body, key))
    if not p.is_absolute() or "\x00" in str(p):
        raise UsageError(f"field {key!r} must be an absolute path, got {str(p)!r}")
    return p


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
    return web.json_response(request.app[DAEMON_KEY].status())


async def restore(request: web.Request) -> web.StreamResponse:
    d = request.app[DAEMON_KEY]
    body = await _body(request, {"ref", "target", "mode", "replace", "compat", "tier"})
    mode = _str(body, "mode", "auto")
    if mode not in MODES:
        raise UsageError(f"field 'mode' must be one of {', '.join(MODES)}, got {mode!r}")
    tier = _tier(d, body)
    _, uid, gid = peer_credentials(request)
    req = RestoreRequest(
        ref=_str(body, "ref"),
        target=_path(body, "target"),
        mode=mode,
        replace=_bool(body, "replace"),
        compat=_facts(body, "compat"),
        tier=tier,
        owner=peer_owner(uid, gid),
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
    req = PublishRequest(
        path=_path(body, "path"),
        ref=_str(body, "ref"),
        facts=facts,
        compat=_facts(body, "compat"),
        meta=_facts(body, "meta"),
        chunk_size=cs,
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
    return web.json_response({"snapshots": request.app[DAEMON_KEY].list_snapshots()})


async def gc(request: web.Request) -> web.Response:
    await _body(request, set())
    return web.json_response(await request.app[DAEMON_KEY].gc())


async def verify(request: web.Request) -> web.StreamResponse:
    d = request.app[DAEMON_KEY]
    await _body(request, set())
    return await stream(request, "verify", d.verify)


async def metrics(request: web.Request) -> web.Response:
    registry = request.app[DAEMON_KEY].metrics.registry
    body = await asyncio.to_thread(generate_latest, registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def make_app(daemon: Daemon, max_body: int) -> web.Application:
    app = web.Application(middlewares=[errors_as_json], client_max_size=max_body)
    app[DAEMON_KEY] = daemon
    app.add_routes(
        [
            web.get("/v1/status", status),
            web.post("/v1/restore", restore),
            web.post("/v1/prefetch", prefetch),
            web.post("/v1/publish", publish),
            web.post("/v1/pin", pin),
            web.post("/v1/unpin", unpin),
            web.get("/v1/snapshots", snapshots),
            web.post("/v1/gc", gc),
            web.post("/v1/verify", verify),
            web.get("/metrics", metrics),
        ]
    )
    return app


def make_metrics_app(daemon: Daemon) -> web.Application:
    app = web.Application(middlewares=[errors_as_json])
    app[DAEMON_KEY] = daemon
    app.add_routes([web.get("/metrics", metrics)])
    return app
