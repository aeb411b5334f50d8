"""Client for hostd's local API: HTTP/1.1 + JSON over the daemon's Unix socket, blocking.

One method per API call. Long operations answer with a stream of newline-delimited JSON
events; the client hands each `progress` event to a callback, returns the `result` event
and raises the `error` event, so a caller sees a stream exactly like a plain call.

Every foreign exception (OSError, bad HTTP, bad JSON) becomes a HostdError at this edge,
with the exit code the contract gives it: bad_request 2, not_found 3, an unreachable socket or
a daemon gone before its answer 4, forbidden 5, anything else 1. This module must not print,
exit or know about terminals: that is cli.py's. It imports the standard library's small
modules only (no asyncio, no aiohttp, not even http.client): every client command pays for
what it imports at start.
"""

from __future__ import annotations

import json
import os

from hostd import unixhttp
from hostd.errors import (
    Busy,
    ChunkCorrupt,
    ChunkMissing,
    DaemonUnreachable,
    Forbidden,
    HostdError,
    ManifestError,
    NotFound,
    OriginError,
    Pinned,
    TargetError,
    TargetExists,
    TierError,
    TransientError,
    UsageError,
)

# Types for the checker alone: typing and pathlib cost every client command ~6 ms of imports.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from types import TracebackType
    from typing import Any, TypeVar

    JSON = dict[str, Any]
    T = TypeVar("T")
    ProgressCallback = Callable[[JSON], None]

NDJSON = "application/x-ndjson"
_REF_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-/"
MAX_EVENT_BYTES = 64 * 1024 * 1024
"""One event line longer than this is a broken daemon, not a big result."""
MAX_ERROR_BODY = 64 * 1024
MAX_ANSWER_BYTES = MAX_EVENT_BYTES
"""Nor is a plain answer (status, snapshots, metrics) longer than this."""

# The daemon's error codes this client raises as hostd's own classes. ConfigError and
# DaemonUnreachable are left out on purpose: from the daemon they are plain failures (exit 1),
# not a usage error of this command or an unreachable socket.
_ERROR_CLASSES: dict[str, type[HostdError]] = {
    cls.code: cls
    for cls in (
        UsageError,
        NotFound,
        ManifestError,
        ChunkMissing,
        ChunkCorrupt,
        TransientError,
        OriginError,
        TargetExists,
        TargetError,
        TierError,
        Pinned,
        Busy,
        Forbidden,
    )
}


class RemoteError(HostdError):
    """An error the daemon reported under a code this client has no class for (exit 1)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def error_from_code(code: str, message: str) -> HostdError:
    """The HostdError for an API error body or stream `error` event."""
    cls = _ERROR_CLASSES.get(code)
    if cls is None:
        return RemoteError(code, message)
    return cls(message)


def resolve_socket(
    explicit: str | os.PathLike[str] | None,
    environ: Mapping[str, str],
    *,
    system_socket: str | os.PathLike[str] | None = None,
) -> str:
    """The socket to talk to: `--socket`, else `$HOSTD_SOCKET`, else the default.

    The default is the per-user socket, unless nothing is there and the system daemon's
    socket (`system_socket`, default /run/hostd/hostd.sock) exists: a host runs hostd under
    systemd, and users run the CLI without options.
    """
    if explicit is not None:
        if not os.fspath(explicit):
            raise UsageError("--socket: an empty path names no socket")
        return os.fspath(explicit)
    from_env = environ.get("HOSTD_SOCKET")
    if from_env:
        return from_env
    # Imported here: a command given its socket pays nothing for finding one.
    from hostd.paths import default_socket

    if system_socket is None:
        return default_socket(environ)
    return default_socket(environ, system_socket=os.fspath(system_socket))


def absolute(path: str | os.PathLike[str]) -> str:
    """`path` made absolute against this process's working directory (the daemon has another).

    Lexical only: the path need not exist here, and symlinks are the daemon's to follow.
    """
    return os.path.abspath(path)


class EventReader:
    """Splits NDJSON bytes into event objects. Pure: feed it bytes, get events back."""

    def __init__(self, max_line: int = MAX_EVENT_BYTES) -> None:
        self._buffer = bytearray()
        self._max_line = max_line

    def __repr__(self) -> str:
        return f"<EventReader buffered={len(self._buffer)}>"

    def feed(self, data: bytes) -> list[JSON]:
        self._buffer += data
        events: list[JSON] = []
        while (end := self._buffer.find(b"\n")) >= 0:
            line = bytes(self._buffer[:end])
            del self._buffer[: end + 1]
            if line.strip():
                events.append(_parse_event(line))
        if len(self._buffer) > self._max_line:
            raise HostdError(f"daemon sent an event line longer than {self._max_line} bytes")
        return events

    def finish(self) -> list[JSON]:
        """Events left when the stream ends: a last line without its newline."""
        line, self._buffer = bytes(self._buffer), bytearray()
        return [_parse_event(line)] if line.strip() else []


def _parse_event(line: bytes) -> JSON:
    try:
        event = json.loads(line)
    except ValueError as exc:
        raise HostdError(f"daemon sent a malformed event: {line[:200]!r}") from exc
    if not isinstance(event, dict):
        raise HostdError(f"daemon sent an event that is not an object: {line[:200]!r}")
    return event


class Client:
    """The daemon's API over its socket, one connection per call.

    Use as `with Client(path) as c: ...`: leaving the block cuts a call still in flight. Calls
    block; an asyncio caller runs them in a thread (`asyncio.to_thread`), and may `close()`
    from its own thread to cut the call.
    """

    def __init__(self, socket_path: str | os.PathLike[str], *, connect_timeout: float = 10.0):
        self.socket_path = os.fspath(socket_path)
        self._connect_timeout = connect_timeout
        self._conn: unixhttp.Connection | None = None
        self._cut = False  # close() cut a call: its end is this side's doing, not the daemon's

    def __repr__(self) -> str:
        state = "in a call" if self._conn is not None else "idle"
        return f"<Client socket={self.socket_path!r} {state}>"

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Cut the call in flight, if any (from any thread); the daemon cancels a stream."""
        conn = self._conn
        if conn is not None:
            self._cut = True
            conn.abort()

    def stop(self) -> None:
        """Ask the call in flight, if any, to stop (from any thread) without cutting it: the
        daemon sees its client go and cancels a stream (a progressive restore takes back
        what it placed), and the call still reads what the daemon sent before it saw that:
        the result of a call that had ended already is returned as usual."""
        conn = self._conn
        if conn is not None:
            self._cut = True
            conn.stop()

    # -- plain calls ------------------------------------------------------------------------

    def status(self) -> JSON:
        return self._call("GET", "/v1/status")

    def snapshots(self) -> JSON:
        return self._call("GET", "/v1/snapshots")

    def gc(self) -> JSON:
        return self._call("POST", "/v1/gc", {})

    def pin(
        self,
        *,
        ref: str | None = None,
        snapshot: str | None = None,
        compat: Mapping[str, str] | None = None,
    ) -> JSON:
        return self._call("POST", "/v1/pin", _pin_body(ref, snapshot, compat))

    def unpin(
        self,
        *,
        ref: str | None = None,
        snapshot: str | None = None,
        compat: Mapping[str, str] | None = None,
    ) -> JSON:
        return self._call("POST", "/v1/unpin", _pin_body(ref, snapshot, compat))

    def rm(self, names: list[str]) -> JSON:
        """Forget cached snapshots, by ref or snapshot id (or unique prefix)."""
        return self._call("POST", "/v1/rm", {"names": list(names)})

    def prune(
        self, *, keep: int | None = None, unused_for: float | None = None, dry_run: bool = False
    ) -> JSON:
        body: JSON = {"dry_run": dry_run}
        if keep is not None:
            body["keep"] = keep
        if unused_for is not None:
            body["unused_for"] = unused_for
        return self._call("POST", "/v1/prune", body)

    def refs(self, prefix: str = "") -> JSON:
        """The refs at the origin whose names start with `prefix`."""
        if prefix.strip(_REF_CHARS):
            raise UsageError(f"bad ref prefix {prefix!r}: refs are [A-Za-z0-9._-] joined by '/'")
        return self._call("GET", f"/v1/refs?prefix={prefix}" if prefix else "/v1/refs")

    def inspect(self, name: str, *, compat: Mapping[str, str] | None = None) -> JSON:
        """A snapshot's manifest summary and entries, by ref or snapshot id (or prefix)."""
        return self._call("POST", "/v1/inspect", {"name": name, "compat": dict(compat or {})})

    def ref_history(self, ref: str, *, limit: int | None = None) -> JSON:
        body: JSON = {"ref": ref}
        if limit is not None:
            body["limit"] = limit
        return self._call("POST", "/v1/ref/history", body)

    def ref_set(self, ref: str, snapshot: str) -> JSON:
        """Point `ref` at a published snapshot (a rollback), as a new history entry."""
        return self._call("POST", "/v1/ref/set", {"ref": ref, "snapshot": snapshot})

    def metrics(self) -> str:
        def read(response: unixhttp.Response) -> str:
            return _read_answer(response, "/metrics").decode(response.head.charset, "replace")

        return self._request("GET", "/metrics", None, read)

    # -- streams ----------------------------------------------------------------------------

    def restore(
        self,
        ref: str,
        target: str | os.PathLike[str],
        *,
        mode: str = "auto",
        replace: bool = False,
        compat: Mapping[str, str] | None = None,
        on_progress: ProgressCallback | None = None,
        progressive: bool = False,
        keep_partial: bool = False,
        order: list[str] | None = None,
        on_file: ProgressCallback | None = None,
        ranges: bool = False,
        on_range: ProgressCallback | None = None,
    ) -> JSON:
        """`progressive`: the target appears at once and each file lands whole as soon as
        its blob is verified; `on_file` gets each `file` event ({path, size, done_files,
        total_files, done_bytes, total_bytes}) in the order they land. `order`: paths or
        globs, fetched first in that order. A failure removes what landed unless
        `keep_partial`. `ranges`: files of several chunks are also written a verified
        chunk at a time under a scratch name before they land, and `on_range` gets a
        `range` event ({path, part, offset, length}) for each chunk written."""
        body: JSON = {
            "ref": ref,
            "target": absolute(target),
            "mode": mode,
            "replace": replace,
            "compat": dict(compat or {}),
        }
        if progressive:
            body["progressive"] = True
            if keep_partial:
                body["keep_partial"] = True
            if order:
                body["order"] = list(order)
            if ranges:
                body["ranges"] = True
        return self._stream("/v1/restore", body, on_progress, on_file, on_range)

    def publish(
        self,
        path: str | os.PathLike[str],
        *,
        ref: str,
        kind: str | None = None,
        facts: list[str] | None = None,
        compat: Mapping[str, str] | None = None,
        meta: Mapping[str, str] | None = None,
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        force: bool = False,
        on_progress: ProgressCallback | None = None,
    ) -> JSON:
        body: JSON = {
            "path": absolute(path),
            "ref": ref,
            "compat": dict(compat or {}),
            "meta": dict(meta or {}),
        }
        if force:  # absent: refuse an empty or much smaller tree
            body["force"] = True
        if include:
            body["include"] = list(include)
        if exclude:
            body["exclude"] = list(exclude)
        if kind is not None:  # absent: files
            body["kind"] = kind
        if facts is not None:  # absent: the kind's facts
            body["facts"] = list(facts)
        return self._stream("/v1/publish", body, on_progress)

    def prefetch(
        self,
        ref: str,
        *,
        tier: str | None = None,
        compat: Mapping[str, str] | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> JSON:
        body: JSON = {"ref": ref, "compat": dict(compat or {})}
        if tier is not None:
            body["tier"] = tier
        return self._stream("/v1/prefetch", body, on_progress)

    def verify(self, *, on_progress: ProgressCallback | None = None) -> JSON:
        return self._stream("/v1/verify", {}, on_progress)

    # -- the edge ---------------------------------------------------------------------------

    def _call(self, method: str, path: str, body: JSON | None = None) -> JSON:
        def read(response: unixhttp.Response) -> JSON:
            try:
                answer = json.loads(_read_answer(response, path))
            except ValueError as exc:
                raise HostdError(f"daemon sent malformed JSON for {path}") from exc
            if not isinstance(answer, dict):
                raise HostdError(f"daemon sent JSON that is not an object for {path}")
            return answer

        return self._request(method, path, body, read)

    def _stream(
        self,
        path: str,
        body: JSON,
        on_progress: ProgressCallback | None,
        on_file: ProgressCallback | None = None,
        on_range: ProgressCallback | None = None,
    ) -> JSON:
        def read(response: unixhttp.Response) -> JSON:
            if response.head.media_type != NDJSON:
                raise HostdError(
                    f"daemon answered {path} with {response.head.media_type}, not {NDJSON}"
                )
            reader = EventReader()
            try:
                for data in response.body():
                    for event in reader.feed(data):
                        outcome = _outcome(event, on_progress, on_file, on_range)
                        if outcome is not None:
                            return outcome
            except OSError as exc:
                if self._cut:  # cut by close() on this side
                    raise HostdError("daemon closed the stream early: the call was cut") from exc
                raise _stopped(path) from exc
            for event in reader.finish():
                outcome = _outcome(event, on_progress, on_file, on_range)
                if outcome is not None:
                    return outcome
            raise _stopped(path)

        try:
            return self._request("POST", path, body, read)
        except _Lost as exc:  # sent, then the daemon went before its first byte
            raise _stopped(path) from exc
        except _CancelledByStop as exc:
            raise _stopped(path) from exc

    def _request(
        self,
        method: str,
        path: str,
        body: JSON | None,
        read: Callable[[unixhttp.Response], T],
    ) -> T:
        """One exchange: connect, send, check the status, `read` the answer; always close."""
        conn = unixhttp.Connection(self.socket_path, connect_timeout=self._connect_timeout)
        self._conn = conn
        try:
            try:
                conn.connect()
            except OSError as exc:
                raise DaemonUnreachable(
                    f"cannot reach the daemon at {self.socket_path}: {_describe(exc)}; is "
                    "hostd running (systemctl status hostd, or `hostd serve`), and is this its "
                    "socket (--socket, $HOSTD_SOCKET)?"
                ) from exc
            payload = None if body is None else json.dumps(body).encode()
            try:
                response = conn.request(method, path, payload, "application/json")
                if not 200 <= response.status < 300:
                    raise _error_from_response(response)
                return read(response)
            except OSError as exc:
                if self._cut:  # cut by close() on this side: not the daemon gone
                    raise HostdError("the call was cut before the daemon answered") from exc
                raise _Lost(
                    f"lost the connection to the daemon at {self.socket_path}: {_describe(exc)}"
                ) from exc
            except unixhttp.ProtocolError as exc:
                raise HostdError(f"daemon sent malformed HTTP: {exc}") from exc
        finally:
            # Also on KeyboardInterrupt: closing is what tells the daemon to cancel a stream.
            self._conn = None
            conn.close()


class _Lost(DaemonUnreachable):
    """The connection ended before a whole answer: the daemon went (stopped, killed) while
    it had the call. Exit 4, as a stream cut so (which says what it was doing), so that a
    script tells "hostd is gone, try again once it is back" from a failure."""


# A stream cut before its result, in the words of what it was doing.
_STOPPED = {
    "/v1/restore": "the daemon stopped during the restore; run it again to resume",
    "/v1/prefetch": "the daemon stopped during the prefetch; run it again to resume",
    "/v1/publish": "the daemon stopped during the publish; run it again",
    "/v1/verify": "the daemon stopped during the verify; run it again",
}


def _stopped(path: str) -> DaemonUnreachable:
    """A stream the daemon left before its result: it was killed, crashed or restarted."""
    return DaemonUnreachable(_STOPPED.get(path, "the daemon stopped before it answered"))


def _pin_body(ref: str | None, snapshot: str | None, compat: Mapping[str, str] | None) -> JSON:
    if (ref is None) == (snapshot is None):
        raise UsageError("name exactly one of a ref or a snapshot id")
    body: JSON = {"compat": dict(compat or {})}
    if ref is not None:
        body["ref"] = ref
    else:
        body["snapshot"] = snapshot
    return body


class _CancelledByStop(Busy):
    """A stream's `unavailable` error event. Caps are checked before a stream starts (a 503
    answer: busy, exit 1, unless it says `stopping`); after its first byte, `unavailable` is
    the daemon stopping with the call still running (SIGTERM, `systemctl restart`, its drain
    ran out): exit 4, as a daemon killed mid-stream, so that a script retries once it is
    back."""


def _outcome(
    event: JSON,
    on_progress: ProgressCallback | None,
    on_file: ProgressCallback | None = None,
    on_range: ProgressCallback | None = None,
) -> JSON | None:
    """The result of a finished stream, None to read on, or the stream's error raised."""
    kind = event.get("event")
    if kind == "result":
        return {key: value for key, value in event.items() if key != "event"}
    if kind == "error":
        code = str(event.get("error") or "internal")
        message = str(event.get("message") or code)
        if code == Busy.code:  # (in a stream: caps are checked before it starts)
            raise _CancelledByStop(message)
        raise error_from_code(code, message)
    if kind == "progress" and on_progress is not None:
        on_progress(event)
    if kind == "file" and on_file is not None:
        on_file(event)
    if kind == "range" and on_range is not None:
        on_range(event)
    return None  # progress, or an event kind newer than this client: read on


def _read_answer(response: unixhttp.Response, path: str) -> bytes:
    raw = response.read(MAX_ANSWER_BYTES + 1)
    if len(raw) > MAX_ANSWER_BYTES:
        raise HostdError(f"daemon answered {path} with more than {MAX_ANSWER_BYTES} bytes")
    return raw


def _error_from_response(response: unixhttp.Response) -> HostdError:
    raw = response.read(MAX_ERROR_BODY)
    try:
        body = json.loads(raw)
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        code: str = body["error"]
        message = str(body.get("message") or code)
        if code == Busy.code and body.get("stopping") is True:
            # (not a cap: the daemon is going, exit 4, as when it is gone already)
            return DaemonUnreachable(message)
        return error_from_code(code, message)
    text = raw.decode("utf-8", "replace").strip()[:200] or "no body"
    head = response.head
    return HostdError(f"daemon answered HTTP {head.status} {head.reason}: {text}")


def _describe(exc: OSError) -> str:
    return exc.strerror or str(exc) or type(exc).__name__
