"""hostd's own errors. Each one is a decision a caller branches on.

Foreign exceptions (obstore's, OSError, aiohttp's) are translated into these at the edge of
the module that talks to the foreign system. Each error carries the API error code, the HTTP
status of the local API, and the exit code of the CLI, so the three always agree.
"""

from __future__ import annotations

import errno
import os

# Types for the checker alone: the CLI imports this module, and none of these.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import asyncio
    from concurrent.futures import Future
    from typing import Any


class HostdError(Exception):
    """Base of every error hostd raises on purpose."""

    code = "internal"
    status = 500
    exit_code = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def to_json(self) -> dict[str, Any]:
        return {"error": self.code, "message": self.message}


class UsageError(HostdError):
    """The caller asked for something malformed (bad JSON, a bad ref name, a bad argument)."""

    code = "bad_request"
    status = 400
    exit_code = 2


class RequestTimeout(HostdError):
    """The request's body did not arrive within `idle_timeout`; the connection is closed."""

    code = "request_timeout"
    status = 408


FILE = "<file>"  # a ConfigError's key where the config file itself is at fault


class ConfigError(HostdError):
    """A config value is wrong. The message names the key."""

    code = "bad_config"
    status = 500
    exit_code = 2

    def __init__(self, key: str, reason: str) -> None:
        # (FILE: the file as a whole, which cannot be read or is not TOML)
        super().__init__(
            f"config file: {reason}" if key == FILE else f"config key {key!r}: {reason}"
        )
        self.key = key


class NotFound(HostdError):
    """No such ref, or no snapshot published under this host's compat key. Boot from scratch."""

    code = "not_found"
    status = 404
    exit_code = 3


class ManifestError(HostdError):
    """A manifest that cannot be decoded or that breaks a format rule."""

    code = "bad_manifest"
    status = 422


class ChunkMissing(HostdError):
    """A chunk source does not have the chunk: try the next source."""

    code = "chunk_missing"
    status = 502


class ChunkCorrupt(HostdError):
    """Bytes that do not hash to their chunk id. Never cached or served; try the next source."""

    code = "chunk_corrupt"
    status = 502


class BlobMoved(ChunkCorrupt):
    """A blob's state (size, mtime, ctime) moved while a restore copied it (or its read
    lease broke), and the copy, read back, does not hash right: a write through a link
    reached it (materialize.Watch). (A link another restore made moves the ctime too, but
    leaves the copy whole.) The copy is not handed over; a restore whose tree is still
    hidden builds it again, once the blob has been checked again."""

    def __init__(self, digest: bytes, path: str, why: str = "") -> None:
        super().__init__(
            f"blob {digest.hex()} ({path!r}) "
            + (
                f"moved while it was copied, and its copy could not be read back ({why})"
                if why
                else "was written to through a link while it was copied"
            )
            + "; try the restore again"
        )
        self.digest = digest
        self.path = path
        self.why = why  # (the copy could not be read back: nothing known of it)


class BlobUnheld(BlobMoved):
    """A blob about to be linked out to a caller could not be held as verified by a read
    lease (hostd/leases.py): it is open for writing somewhere, or changed since its check.
    Not linked; a restore whose tree is still hidden builds it again, checked first."""

    def __init__(self, digest: bytes, path: str, why: str) -> None:
        ChunkCorrupt.__init__(
            self,
            f"blob {digest.hex()} ({path!r}) could not be linked: {why}; try the restore again",
        )
        self.digest = digest
        self.path = path
        self.why = why


class TransientError(HostdError):
    """A failure worth retrying (a timeout, a reset connection, a 5xx)."""

    code = "transient"
    status = 503


class OriginError(HostdError):
    """A permanent failure of the origin: bad credentials, no such bucket, retries exhausted."""

    code = "origin_error"
    status = 502
    # The origin did not answer through every retry (timeouts, refused connections, 5xx):
    # a next request to it now would most likely fare the same.
    unanswered = False


class TargetExists(HostdError):
    """The restore target exists and is not empty, and the caller did not ask to replace it."""

    code = "target_exists"
    status = 409


class TargetError(HostdError):
    """Writing the restore's target failed after it began (its filesystem full or read-only,
    an I/O error): not a usage error, and nothing is left at the target."""

    code = "target_error"
    status = 500


class TierError(HostdError):
    """A tier cannot take a write: not writable, or its filesystem is full."""

    code = "tier_error"
    status = 507

    def __init__(
        self, message: str, cause_errno: int | None = None, tier: str | None = None
    ) -> None:
        super().__init__(message)
        self.errno = cause_errno  # the OSError's, where one was the cause
        self.tier = tier  # the tier's name, where one tier refused

    @property
    def full(self) -> bool:
        """Whether the tier's filesystem (or the daemon's quota on it) is full."""
        return self.errno in FULL


class Busy(HostdError):
    """The daemon is stopping or over a limit; try again later."""

    code = "unavailable"
    status = 503


class Stopping(Busy):
    """The daemon is stopping (SIGTERM, a restart): it refuses a new operation, or cancels
    one its drain outlasted. Told apart from a cap (`"stopping": true` beside the code), so
    that a client exits 4 as for a daemon gone, and a script tries again once it is back."""

    def to_json(self) -> dict[str, Any]:
        return {**super().to_json(), "stopping": True}


class Pinned(HostdError):
    """The operation would drop a pinned snapshot: unpin it first."""

    code = "pinned"
    status = 409


class Forbidden(HostdError):
    """The caller may not use this class of operation (`[access]` in the config)."""

    code = "forbidden"
    status = 403
    exit_code = 5


class DaemonUnreachable(HostdError):
    """The client could not reach the daemon's socket."""

    code = "unreachable"
    status = 503
    exit_code = 4


def first_error(exc: BaseException) -> HostdError | None:
    """The first hostd error in an exception or exception group: what a caller should see."""
    if isinstance(exc, HostdError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for sub in exc.exceptions:
            found = first_error(sub)
            if found is not None:
                return found
    return None


def unheard(job: Future[Any] | asyncio.Future[Any]) -> None:
    """Take the outcome of a job whose waiters may all have left (a done callback): a
    failure nobody waits for any more is no news, and asyncio would log it as an error."""
    if not job.cancelled():
        job.exception()


# A filesystem full, or the writer's quota on it.
FULL = frozenset({errno.ENOSPC, errno.EDQUOT})


def os_cause(e: OSError) -> str:
    """Why a write into one of hostd's directories failed, in the words a user acts on."""
    if e.errno in FULL:
        return "its filesystem is full"
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return "it is not writable"
    return os.strerror(e.errno) if e.errno else str(e)
