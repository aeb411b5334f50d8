"""The origin: durable object storage holding chunks, manifests and refs, through obstore.

One code path for s3://, gs://, az://, http(s):// and file:// (and memory:// for tests):
`obstore.store.from_url` picks the store, and every operation goes through `Origin._request`,
which bounds it (one shared semaphore, a per-attempt timeout), retries transient failures
with jittered backoff on the injected sleep and rng, counts outcomes in `OriginStats`, and
translates obstore's exceptions into hostd's (`ChunkMissing`, `NotFound`, `OriginError`).

Every read is capped at the size the format allows for what it fetches (a chunk: the
caller's `codec.max_stored_size` of its raw size; a manifest: `MAX_MANIFEST_BYTES`; a ref:
`MAX_REF_BYTES`) before it is buffered: an object that states a larger size is refused
without reading its body, and a server's body is streamed and dropped as soon as it
passes the cap, so one that states less than it sends cannot make us hold more (a file://
read is bounded by the size of the file it opened).

Layout under the URL's path prefix (docs/FORMAT.md section 6):
    chunks/<hex[0:2]>/<hex>   packs/<hex[0:2]>/<hex>   manifests/<snapshot-id>   refs/<ref>/<compat>
    history/<ref>/<compat>/<seq>

This module must not: decode or verify chunk bytes (callers check blake3 of the raw bytes;
correctness never rests on the store), cache anything, let a foreign exception out, put
credentials into a URL, message or repr, or buffer more of an object than its cap.
"""

from __future__ import annotations

import asyncio
import contextvars
import enum
import http
import logging
import os
import random
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar
from urllib.parse import urlsplit, urlunsplit

import obstore
from obstore.exceptions import (
    BaseError,
    GenericError,
    JoinError,
    NotFoundError,
    PermissionDeniedError,
    UnauthenticatedError,
)
from obstore.store import HTTPStore, LocalStore, MemoryStore, from_url

from hostd import fastget, wholepacks
from hostd.core import refentry
from hostd.core.codec import max_stored_size
from hostd.core.ids import HASH_LEN, is_hex_id
from hostd.core.manifest import MAX_CHUNK_SIZE, MAX_MANIFEST_BYTES, Chunk
from hostd.core.retry import RetryPolicy
from hostd.errors import (
    ChunkCorrupt,
    ChunkMissing,
    ConfigError,
    ManifestError,
    NotFound,
    OriginError,
    UsageError,
)

if TYPE_CHECKING:
    from obstore import GetResult
    from obstore.store import ObjectStore

T = TypeVar("T")

log = logging.getLogger(__name__)

MAX_REF_LEN = 256
# A ref object holds a 64-hex snapshot id (FORMAT.md section 6), with surrounding whitespace
# tolerated: a few hundred bytes is generous, and anything longer is not a ref.
MAX_REF_BYTES = 256
# A transfer gets the request timeout to begin, and then its bytes at this rate at least:
# a read or a write that keeps moving is not cut off at a fixed deadline (16 reads sharing a
# slow link, a 64 MiB pack uploaded over a modest uplink, a large manifest). A connection
# that stops moving is ended sooner, by the request timeout between reads (obstore's
# read_timeout, fastget's socket timeout); one that trickles slower than this is cut off.
MIN_RATE = 16 << 10  # bytes a second
# The cap of a chunk read when the caller names none: the largest chunk the format allows,
# stored as zstd's worst-case frame.
MAX_CHUNK_OBJECT = max_stored_size(MAX_CHUNK_SIZE)
# Objects larger than this are streamed in pieces of this size and joined; one within it
# (every chunk of the default 4 MiB size, nearly every manifest) comes as a single buffer.
_READ_PIECE = 16 * 1024 * 1024
_REF_SEGMENT = re.compile(r"[A-Za-z0-9._-]+")
_REF_PREFIX = re.compile(r"[A-Za-z0-9._/-]{1,256}")

# The schemes obstore maps to a cloud or HTTP store; file:// and memory:// are built apart
# because LocalStore takes no client options and must be told to create its directory.
_REMOTE_SCHEMES = frozenset(
    {"s3", "s3a", "gs", "az", "azure", "abfs", "abfss", "adl", "http", "https"}
)

# obstore's ClientConfig keys. They must go in `client_options`: passed in the store config
# (where the rest of origin_options go) obstore 0.12 panics ("Expected config prefix to
# start with aws_") instead of raising, so origin_options is split before it gets there.
_CLIENT_KEYS = frozenset(
    {
        "allow_http",
        "allow_invalid_certificates",
        "connect_timeout",
        "default_content_type",
        "http1_only",
        "http2_keep_alive_interval",
        "http2_keep_alive_timeout",
        "http2_keep_alive_while_idle",
        "http2_only",
        "pool_idle_timeout",
        "pool_max_idle_per_host",
        "proxy_url",
        "proxy_ca_certificate",
        "proxy_excludes",
        "randomize_addresses",
        "read_timeout",
        "root_certificate",
        "timeout",
        "user_agent",
    }
)
_PROVIDER_PREFIXES = ("aws_", "google_", "azure_")
_ENV_PREFIXES = {"s3": "AWS_", "s3a": "AWS_", "gs": "GOOGLE_"} | dict.fromkeys(
    ("az", "azure", "abfs", "abfss", "adl"), "AZURE_"
)
_ENDPOINT_KEYS = frozenset(
    {"endpoint", "endpoint_url", "aws_endpoint", "aws_endpoint_url", "aws_endpoint_url_s3"}
)

# obstore reports HTTP failures as text: "... Server returned non-2xx status code: 503 ...".
_STATUS_RE = re.compile(r"status(?: code)?:? (\d{3})\b")
_TRANSIENT_STATUSES = frozenset({408, 425, 429})
# A missing bucket or container comes back as the same "not found" as a missing object;
# it is a broken deployment, not an absent chunk, and must not read as "boot from scratch".
_NO_CONTAINER = ("NoSuchBucket", "ContainerNotFound", "The specified bucket does not exist")
_SECRET_PARAM_RE = re.compile(
    r"(?i)\b([\w-]*(?:sig|signature|credential|token|key)[\w-]*)=[^&\s\"'<]+"
)
_USERINFO_RE = re.compile(r"(?<=//)[^/@\s]+@")
_MAX_CAUSE = 400
# obstore's HTTP store needs each answer's Content-Length: a chunked one fails with this.
_NO_LENGTH = "Content-Length Header missing"
# rustls's refusal of a server's certificate, shown only in obstore's debug dump:
# "InvalidCertificate(UnknownIssuer)", "InvalidCertificate(\n Other(\n OtherError(\n Ca...".
_BAD_CERT_RE = re.compile(r"InvalidCertificate\(([^)]*)")


class RefKey(NamedTuple):
    """A ref set under one compat key at the origin, and when it was last set."""

    ref: str
    compat_digest: str
    modified: float  # epoch seconds


class Failure(enum.Enum):
    """What a failed request means for the caller."""

    MISSING = "missing"  # no such object: try the next source, or report absence
    AUTH = "auth"  # credentials rejected: retrying will not help
    TRANSIENT = "transient"  # timeout, connection error, 5xx, throttling: retry
    PERMANENT = "permanent"  # anything else: fail now with the cause


@dataclass
class OriginStats:
    """Counters by result, read by the metrics layer at scrape time.

    One logical request counts once as ok, missing or failed; `requests_retried` counts
    the extra attempts. Bytes are payload bytes of successful requests. An object refused
    for being over its cap counts as failed, not retried, and adds no bytes.
    """

    requests_ok: int = 0
    requests_missing: int = 0
    requests_retried: int = 0
    requests_failed: int = 0
    bytes_in: int = 0
    bytes_out: int = 0


class _Missing(Exception):
    """Internal: the object is absent. Each public method turns it into its own answer."""


class _WrongObject(Exception):
    """Internal: the object is not what was asked for, whichever attempt asks (no retry).
    `what` says how we know, for a message; each public method turns it into its own
    answer."""

    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.what = what


class _Oversized(_WrongObject):
    """Internal: the object is larger than its cap."""


class _Short(_WrongObject):
    """Internal: the object ends before a range asked of it begins (416, or a local file)."""


def _past_end(exc: BaseException) -> bool:
    """obstore's answer to a range that starts past the object's end: a server's 416, or a
    local file's invalid range."""
    if not isinstance(exc, BaseError):
        return False
    text = str(exc)
    match = _STATUS_RE.search(text)
    return (match is not None and match.group(1) == "416") or "range was invalid" in text


def validate_ref(ref: str) -> str:
    """Check a ref name: `/`-joined segments of [A-Za-z0-9._-]+, no `.`/`..`, <= 256 chars."""
    if not isinstance(ref, str) or not ref:
        raise UsageError(f"ref name must be a non-empty string, got {ref!r}")
    if len(ref) > MAX_REF_LEN:
        raise UsageError(f"ref name {ref[:64]!r}... is longer than {MAX_REF_LEN} characters")
    for segment in ref.split("/"):
        if segment in ("", ".", "..") or not _REF_SEGMENT.fullmatch(segment):
            raise UsageError(
                f"bad ref name {ref!r}: segments are [A-Za-z0-9._-]+ joined by '/', "
                "with no empty, '.' or '..' segment"
            )
    return ref


def classify(exc: BaseException) -> Failure:
    """Decide what a foreign exception from one request attempt means. Pure."""
    text = str(exc)
    # TimeoutError (our own per-attempt deadline) is an OSError: test it first.
    if isinstance(exc, TimeoutError):
        return Failure.TRANSIENT
    if isinstance(exc, FileNotFoundError | NotFoundError):
        return Failure.PERMANENT if _names_missing_container(text) else Failure.MISSING
    if isinstance(exc, PermissionDeniedError | UnauthenticatedError):
        return Failure.AUTH
    if isinstance(exc, BaseError):
        match = _STATUS_RE.search(text)
        if match:
            return _classify_status(int(match.group(1)), text)
        if _refused_certificate(text):
            return Failure.PERMANENT  # the next handshake gets the same certificate
        if _NO_LENGTH in text:
            return Failure.PERMANENT  # (a server that streams its answers always does)
        if "builder error" in text or "(os error " in text or "range was invalid" in text:
            # A client that cannot be built (http:// without allow_http), a local
            # filesystem error (EACCES, ENOSPC) or a range past the end of a local object:
            # the same request fails the same way.
            return Failure.PERMANENT
        if isinstance(exc, GenericError | JoinError):
            # No status means it never got an HTTP answer: connect, reset, DNS, body read.
            return Failure.TRANSIENT
        return Failure.PERMANENT  # InvalidPath, NotSupported, Precondition, ...
    if isinstance(exc, ConnectionError):
        return Failure.TRANSIENT
    return Failure.PERMANENT


def _classify_status(status: int, text: str) -> Failure:
    if status in (401, 403):
        return Failure.AUTH
    if status == 404:
        return Failure.PERMANENT if _names_missing_container(text) else Failure.MISSING
    if status in _TRANSIENT_STATUSES or status >= 500:
        return Failure.TRANSIENT
    return Failure.PERMANENT


def _names_missing_container(text: str) -> bool:
    return any(marker in text for marker in _NO_CONTAINER)


def display_url(url: str) -> str:
    """The URL without user info, query or fragment (where SAS tokens and keys hide)."""
    parts = urlsplit(url)
    netloc = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def cause_of(exc: BaseException) -> str | None:
    """The kind of failure in a few words ("connection refused", "403 Forbidden"), or None
    when it is none of the usual ones. Pure; reads obstore's text, whose debug part names
    the transport's error kind."""
    if isinstance(exc, TimeoutError):
        return "timeout"
    text = str(exc)
    lower = text.lower()
    match = _STATUS_RE.search(text)
    if match:
        code = int(match.group(1))
        try:
            return f"{code} {http.HTTPStatus(code).phrase}"
        except ValueError:
            return f"HTTP {code}"
    for markers, cause in _CAUSES:
        if any(marker in lower for marker in markers):
            return cause
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, ConnectionResetError):
        return "connection reset"
    return None


# Markers in obstore's error text (lower-cased), in order: a TLS failure is also a connect
# error, a DNS one too, so those come before the plain ones.
_CAUSES: tuple[tuple[tuple[str, ...], str], ...] = (
    (("dns error", "failed to lookup address"), "DNS lookup failed"),
    (("certificate", "invalidmessage", "invalidcontenttype", "tls", "ssl"), "TLS failed"),
    (("connection refused", "connectionrefused"), "connection refused"),
    (("connection reset", "connectionreset"), "connection reset"),
    (("timed out", "timedout", "kind: timeout"), "timeout"),
    (("kind: connect", "connecterror"), "cannot connect"),
)


def retry_text(note: RetryNote) -> str:
    """The progress line while the origin is retried: what a user sees waiting."""
    return (
        f"origin not answering ({note.cause}), retry {note.retry}/{note.retries} "
        f"in {note.delay:.1f} s"
    )


@dataclass(frozen=True, slots=True)
class RetryNote:
    """One request the origin is about to retry: retry number `retry` of `retries`, after
    `delay` seconds, because of `cause`; `key` is the object."""

    op: str
    key: str
    cause: str
    retry: int
    retries: int
    delay: float

    def to_json(self) -> dict[str, Any]:
        return {
            "op": self.op,
            "key": self.key,
            "cause": self.cause,
            "retry": self.retry,
            "retries": self.retries,
            "delay_s": round(self.delay, 3),
            "message": retry_text(self),
        }


RetryObserver = Callable[[RetryNote | None], None]
retry_observer: contextvars.ContextVar[RetryObserver | None] = contextvars.ContextVar(
    "hostd_origin_retry_observer", default=None
)
"""Who hears of the origin's retries: each operation sets its own (its tasks, and the fetch
flights they start, inherit it), and gets None once a retried request has its answer. A
context variable, not state of the shared Origin: two restores each hear their own."""


def limit(timeout: float, nbytes: int) -> float:
    """Seconds a transfer of `nbytes` may take: `timeout` to begin, then MIN_RATE."""
    return timeout + nbytes / MIN_RATE


class _Deadline:
    """An attempt's deadline, which grows once the size of what it moves is known."""

    def __init__(self, cm: asyncio.Timeout, given: float) -> None:
        self.cm = cm
        when = cm.when()
        self.start = (when if when is not None else 0.0) - given

    @property
    def seconds(self) -> float:
        """How long the attempt was given, so far."""
        when = self.cm.when()
        return 0.0 if when is None else when - self.start

    def allow(self, nbytes: int) -> None:
        when = self.cm.when()
        if when is not None and nbytes > 0:
            self.cm.reschedule(when + nbytes / MIN_RATE)


_deadline: contextvars.ContextVar[_Deadline | None] = contextvars.ContextVar(
    "hostd_origin_deadline", default=None
)


def _allow(nbytes: int) -> None:
    """Give the request under way (Origin._request) time for `nbytes` more at MIN_RATE."""
    d = _deadline.get()
    if d is not None:
        d.allow(nbytes)


def _describe(exc: BaseException, timeout: float) -> str:
    """A one-paragraph cause for a message: no Rust debug dump, no secrets."""
    if isinstance(exc, TimeoutError):
        return f"not done within {timeout:g}s"
    full = str(exc)
    text = full.split("\n\nDebug source:", 1)[0].strip() or type(exc).__name__
    text = _USERINFO_RE.sub("", text)
    text = _SECRET_PARAM_RE.sub(r"\1=REDACTED", text)
    text = " ".join(text.split())
    if len(text) > _MAX_CAUSE:
        text = text[:_MAX_CAUSE] + "..."
    if "builder error" in full:
        text += ' (an http:// endpoint needs origin_options allow_http = "true")'
    if _NO_LENGTH in full:
        text += (
            " (a web server origin must send each object with its Content-Length: one that "
            "streams them, as nginx's gunzip and on-the-fly compression do, cannot be read)"
        )
    cert = _refused_certificate(full)
    if cert:
        text += f" (the server's TLS certificate was refused: {cert})"
    if _names_missing_container(full):
        text = "the bucket or container does not exist: " + text
    return text


# rustls's CertificateError variants, in words (the rest by name).
_CERT_WORDS = {
    "Expired": "it has expired",
    "NotValidYet": "it is not valid yet",
    "NotValidForName": "it does not name this host",
    "UnknownIssuer": "its issuer is not one this host trusts",
    "BadSignature": "its signature does not verify against the issuer this host trusts",
    "Revoked": "it is revoked",
    "CaUsedAsEndEntity": "it is a CA certificate, not a server's",
}


def _refused_certificate(text: str) -> str:
    """Why the TLS client refused the server's certificate, where it did; else ''. The
    variant is the first name inside InvalidCertificate(...), past Other(OtherError(...))."""
    match = _BAD_CERT_RE.search(text)
    if match is None:
        return ""
    names = [
        n for n in re.findall(r"[A-Za-z]+", match.group(1)) if n not in ("Other", "OtherError")
    ]
    if not names:
        return "invalid certificate"
    kind = names[0].removesuffix("Context")
    return str(_CERT_WORDS.get(kind, kind))


def _is_panic(exc: BaseException) -> bool:
    # pyo3's PanicException derives from BaseException and is not importable by name; a
    # panic is an obstore bug, reported like any other permanent failure.
    return type(exc).__name__ == "PanicException"


def _split_options(
    scheme: str,
    options: Mapping[str, str],
    timeout: float,
    environ: Mapping[str, str],
    writes: bool = False,
) -> tuple[dict[str, str], dict[str, Any]]:
    """Split origin_options into obstore's store config and its HTTP client options
    (`writes`: a client for uploads, whose answers come only once the body is sent)."""
    config: dict[str, str] = {}
    client: dict[str, Any] = {}
    for key, value in options.items():
        name = key.lower()
        for prefix in _PROVIDER_PREFIXES:
            if name.startswith(prefix) and name[len(prefix) :] in _CLIENT_KEYS:
                name = name[len(prefix) :]
        if name in _CLIENT_KEYS:
            client[name] = value
        else:
            config[key] = value
    # obstore reads client settings such as AWS_ALLOW_HTTP from the environment only when
    # no client_options are passed at all; passing any (the timeouts below) drops them. So
    # the environment's client settings are carried over here, under the explicit options.
    env_prefix = _ENV_PREFIXES.get(scheme)
    endpoints = [v for k, v in config.items() if k.lower() in _ENDPOINT_KEYS]
    if env_prefix is not None:
        for name in _CLIENT_KEYS:
            env_value = environ.get(env_prefix + name.upper())
            if env_value is not None:
                client.setdefault(name, env_value)
        endpoints += [
            v
            for k, v in environ.items()
            if k.startswith(env_prefix) and k.lower() in _ENDPOINT_KEYS
        ]
    # An http:// URL or endpoint is an explicit choice of plain HTTP; obstore would refuse
    # it with an opaque "builder error" unless allow_http is also set.
    if scheme == "http" or any(e.lower().startswith("http://") for e in endpoints):
        client.setdefault("allow_http", "true")
    # obstore's own limits: for reads, a connection that sends nothing for `timeout`
    # (between reads: a slow answer that keeps moving goes on; not for uploads, whose answer
    # starts only once the body is sent); and, as a backstop, a whole request past the
    # longest any of ours may take. Origin._request's deadline, scaled by the size, comes
    # first, and a cancelled await drops obstore's request and its connection with it.
    if not writes:  # (a quarter over: a request's first answer is ours to time, below)
        client.setdefault("read_timeout", timedelta(seconds=timeout * 1.25))
    client.setdefault("timeout", timedelta(seconds=limit(timeout, MAX_MANIFEST_BYTES)))
    client.setdefault("connect_timeout", timedelta(seconds=min(timeout, 5.0)))
    return config, client


def _open_store(
    url: str,
    options: Mapping[str, str],
    timeout: float,
    environ: Mapping[str, str],
    writes: bool = False,
) -> tuple[ObjectStore, dict[str, str], dict[str, Any]]:
    """The store, with the store config and client options it was opened with (both empty
    for a local one). `writes`: for uploads (_split_options)."""
    scheme = urlsplit(url).scheme.lower()
    shown = display_url(url)
    try:
        if scheme in ("file", "memory"):
            if options:
                raise ConfigError(
                    "origin_options",
                    f"a {scheme}:// origin takes no options, got {sorted(options)}",
                )
            if scheme == "memory":
                return MemoryStore(), {}, {}
            # mkdir: the default origin lives under $XDG_DATA_HOME and may not exist yet.
            return LocalStore.from_url(url, mkdir=True), {}, {}
        if scheme not in _REMOTE_SCHEMES:
            raise ConfigError(
                "origin",
                f"unsupported origin {shown!r}: use s3://, gs://, az://, http(s):// or file://",
            )
        config, client = _split_options(scheme, options, timeout, environ, writes)
        # The option keys are only known at run time (obstore checks them), so the typed
        # per-store overloads of from_url cannot apply.
        open_url: Callable[..., ObjectStore] = from_url
        store = open_url(
            url,
            config=config or None,
            client_options=client,
            # Retries are ours (counted, jittered on the injected rng and sleep).
            retry_config={"max_retries": 0},
        )
        return store, config, client
    except ConfigError:
        raise
    except BaseException as exc:
        if not isinstance(exc, Exception) and not _is_panic(exc):
            raise
        key = "origin_options" if options else "origin"
        raise ConfigError(key, f"cannot open origin {shown!r}: {_describe(exc, timeout)}") from exc


class Origin:
    """Chunks, manifests and refs in one object store, with limits, retries and counters."""

    def __init__(
        self,
        url: str,
        options: Mapping[str, str],
        *,
        concurrency: int = 16,
        retry: RetryPolicy,
        timeout: float = 30.0,
        rng: random.Random | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if concurrency < 1:
            raise ValueError(f"origin concurrency must be at least 1, got {concurrency}")
        if not timeout > 0:
            raise ValueError(f"origin timeout must be positive, got {timeout}")
        self._url = display_url(url)
        self._opened_with = (url, dict(options))
        self._store, config, client = _open_store(url, options, timeout, os.environ)
        self._whole_store: ObjectStore | None = None  # (open_whole's: no whole-body timeout)
        self._write_store: ObjectStore | None = None  # (_put's: no read timeout)
        # Plain HTTP has no listing (obstore tries WebDAV PROPFIND, which a static server
        # answers with 405): list_ref says "cannot list" rather than failing.
        self._can_list = not isinstance(self._store, HTTPStore)
        # No server between us and the bytes: see _get.
        self._local = isinstance(self._store, LocalStore | MemoryStore)
        # Chunk and pack reads go through fastget first, where obstore's requests would be
        # plain ones (no proxy, no special client options): one copy of each byte, not two.
        self._fast = fastget.for_store(
            self._store,
            url,
            client,
            os.environ,
            threads=concurrency,
            config=config,
            timeout=timeout / 2,  # (an attempt that gets no answer there asks obstore)
        )
        # Whether the server answers ranged GETs (a plain web server may not): None until a
        # ranged read or answers_ranges's probe shows which. Where it does not, packs are
        # read whole (wholepacks); that verdict is tried again after RANGES_RECHECK. Object
        # stores and local files answer ranges.
        self._ranges: bool | None = None if isinstance(self._store, HTTPStore) else True
        # A web server's Content-Encoding changes the bytes sent (an object store's is only
        # a stored header: the bytes are as stored, and verified as ever).
        self._encodes = isinstance(self._store, HTTPStore)
        self._ranges_until = 0.0  # monotonic time when "no ranges" is to be tried again
        self._probe: asyncio.Future[bool | None] | None = None
        self._probe_after = 0.0  # monotonic time before which a failed probe is not retried
        self._taps = wholepacks.Taps(self)
        self._sem = asyncio.Semaphore(concurrency)
        self._concurrency = concurrency
        self._retry = retry
        self._timeout = timeout
        self._rng = rng if rng is not None else random.Random()
        self._sleep = sleep
        self._closed = False
        self.stats = OriginStats()

    @property
    def fast_reads(self) -> tuple[int, int] | None:
        """Chunk and pack reads fastget answered, and those it handed to obstore; None
        where it is off for this origin."""
        f = self._fast
        return None if f is None else (f.taken, f.fallbacks)

    @property
    def timeout(self) -> float:
        """Seconds a request may wait for an answer (or between reads of its body)."""
        return self._timeout

    def limit(self, nbytes: int) -> float:
        """Seconds a transfer of `nbytes` may take: the timeout, then MIN_RATE."""
        return limit(self._timeout, nbytes)

    @property
    def url(self) -> str:
        """The origin's URL for status and logs, without credentials."""
        return self._url

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<Origin {self._url} {state} concurrency={self._concurrency} {self.stats}>"

    # -- chunks ---------------------------------------------------------------------------

    async def get_chunk(self, cid: bytes, max_size: int = MAX_CHUNK_OBJECT) -> memoryview:
        """The stored bytes of a chunk (raw or zstd, as published); the caller verifies.

        At most `max_size` bytes are read (the caller passes `codec.max_stored_size` of the
        chunk's raw size): a larger object is ChunkCorrupt, never buffered whole. A view of
        the buffer the object arrived in (one piece up to 16 MiB), not a further copy: a
        chunk is megabytes, and each copy costs a share of a restore's time."""
        key = _chunk_key(cid)
        try:
            return await self._get("get chunk", key, max_size, fast=True)
        except _Missing:
            raise ChunkMissing(f"chunk {cid.hex()} is not at origin {self._url}") from None
        except _Oversized as e:
            raise ChunkCorrupt(
                f"chunk {cid.hex()} at origin {self._url} {e.what}, over its cap of "
                f"{max_size} bytes"
            ) from None

    async def has_chunk(self, cid: bytes) -> bool:
        return await self.chunk_stored_size(cid) is not None

    async def chunk_stored_size(self, cid: bytes) -> int | None:
        """The size of a chunk's object at the origin (a HEAD), None if there is none. Only
        a hint (a server's answer): publish uploads again over an object of a size its bytes
        cannot have (a zero-byte or truncated object), and readers verify what they get."""
        return await self._stored_size("head chunk", _chunk_key(cid))

    async def _stored_size(self, op: str, key: str) -> int | None:
        async def call() -> int:
            return int((await obstore.head_async(self._store, key))["size"])

        try:
            return await self._request(op, key, call)
        except _Missing:
            return None

    async def put_chunk(self, cid: bytes, data: bytes) -> None:
        await self._put("put chunk", _chunk_key(cid), data)

    # -- packs: many chunks' stored bytes in one object (format 2) --------------------------

    async def get_pack_range(
        self, pack: bytes, offset: int, length: int, pack_size: int
    ) -> memoryview:
        """`length` bytes at `offset` of a pack of `pack_size` bytes (as its manifest says):
        one ranged GET, or a plain one when the range is the whole pack. The caller splits
        and verifies the chunks in it. Fewer bytes than asked (a pack shorter than its
        manifest says) is ChunkCorrupt; a missing pack is ChunkMissing.

        A server that cannot answer ranges (a plain web server may not) gets one GET of the
        whole pack, and this range and every other one asked while it is kept are cut from
        it as it arrives (wholepacks.Taps): an owner's pull-throughs of the pack's chunks
        cost the origin the pack once, not once a range."""
        key = _pack_key(pack)
        whole = offset == 0 and length == pack_size

        async def ranged() -> memoryview | None:
            if self._fast is not None:
                try:
                    fast = await _fast(self._fast, key, length, (offset, length))
                except fastget.Whole:
                    self._learnt(ranges=False)
                    return None
                if fast is not None:
                    self._learnt(ranges=True)
                    return fast
            try:
                if self._local:  # no server to lie; its stream moves 8 KiB a thread hop
                    got = await obstore.get_range_async(
                        self._store, key, start=offset, length=length
                    )
                    self._learnt(ranges=True)
                    return memoryview(got)
                result = await obstore.get_async(
                    self._store, key, options={"range": (offset, offset + length)}
                )
            except BaseException as exc:
                if _past_end(exc):
                    raise _Short(f"has no byte at {offset}") from None
                if not _no_ranges(exc):
                    raise
                self._learnt(ranges=False)
                return None
            _check_head(result, None, self._encodes)
            self._learnt(ranges=True)
            # (its body held to the range: get_range_async reads whatever the server sends)
            return await _read_capped(result, length)

        async def read_whole() -> memoryview:
            if self._fast is not None:
                fast = await _fast(self._fast, key, pack_size)
                if fast is not None:
                    return fast
            result = await obstore.get_async(self._store, key)
            _check_head(result, pack_size, self._encodes)
            if self._local:
                return memoryview(await result.bytes_async())[: pack_size + 1]
            return await _read_capped(result, pack_size)

        try:
            data = None
            if whole:
                data = await self._request("get pack range", key, read_whole, size=pack_size)
            elif self._knows_ranges() is not False:
                data = await self._request("get pack range", key, ranged, size=length)
            if data is not None:
                self.stats.bytes_in += len(data)
            else:  # the server answers no ranges
                data = await self._taps.cut(pack, pack_size, offset, length)
        except _Missing:
            raise ChunkMissing(f"pack {pack.hex()} is not at origin {self._url}") from None
        except _Oversized as e:
            # (a ranged answer is held to the range asked, a whole one to the pack's size)
            asked = (
                f"{pack_size} bytes its manifest says"
                if whole
                else f"{length} bytes asked for at {offset}"
            )
            raise ChunkCorrupt(
                f"pack {pack.hex()} at origin {self._url} {e.what}, more than the {asked}"
            ) from None
        except _Short as e:
            raise ChunkCorrupt(
                f"pack {pack.hex()} at origin {self._url} {e.what}: it is shorter than the "
                f"{pack_size} bytes its manifest says"
            ) from None
        if len(data) != length:
            raise ChunkCorrupt(
                f"pack {pack.hex()} at origin {self._url}: asked for {length} bytes at {offset}, "
                f"got {len(data)}"
            )
        return data

    @property
    def ignores_ranges(self) -> bool:
        """Whether the server is known to answer ranged GETs with whole objects."""
        return self._knows_ranges() is False

    def _knows_ranges(self) -> bool | None:
        if self._ranges is False and time.monotonic() >= self._ranges_until:
            self._ranges = None  # (a stray whole answer must not settle it for good)
        return self._ranges

    async def answers_ranges(self, pack: bytes) -> bool:
        """Whether the origin answers ranged GETs: known once a ranged read came back, and
        until then asked, with a one-byte range of `pack` whose body a server that ignores
        the range is not read for. One probe at a time, one attempt of at most
        PROBE_TIMEOUT, waited for PROBE_WAIT at most (ranges assumed meanwhile); one that
        fails tells nothing, and is tried again after PROBE_AGAIN."""
        known = self._knows_ranges()
        if known is not None:
            return known
        if self._probe is None and time.monotonic() >= self._probe_after:
            self._probe = asyncio.ensure_future(self._probe_ranges(pack))
        if self._probe is None:
            return True
        try:
            async with asyncio.timeout(PROBE_WAIT):
                answer = await asyncio.shield(self._probe)
        except TimeoutError:
            return True
        return True if answer is None else answer

    async def _probe_ranges(self, pack: bytes) -> bool | None:
        key = _pack_key(pack)
        try:
            async with self._sem, asyncio.timeout(min(self._timeout, PROBE_TIMEOUT)):
                # the answer's head tells: its body is not read (dropped with the result)
                await obstore.get_async(self._store, key, options={"range": (0, 1)})
            answer = True
        except Exception as exc:
            if not _no_ranges(exc):
                why = cause_of(exc) or _describe(exc, self._timeout)
                log.info("origin %s: a ranges probe failed: %s", self._url, why)
                self._probe_after = time.monotonic() + PROBE_AGAIN
                return None
            answer = False
        finally:
            self._probe = None
        if self._knows_ranges() is None:
            self._learnt(ranges=answer)
        return answer

    def _learnt(self, *, ranges: bool) -> None:
        """What a ranged read (or the probe) showed; a change is logged, a server that
        ignores ranges as a warning: every pack is then read whole."""
        if ranges is False:
            self._ranges_until = time.monotonic() + RANGES_RECHECK
        if self._ranges is ranges:
            return
        self._ranges = ranges
        if ranges:
            log.info("origin %s answers ranged GETs", self._url)
        else:
            log.warning(
                "origin %s ignores ranged GETs: each pack is read whole, once per host that "
                "needs it (publish with pack_size = 0 for such an origin)",
                self._url,
            )

    def fast_whole(self, pack: bytes, size: int) -> fastget.Stream | None:
        """fastget's GET of a whole pack of at most `size` bytes (wholepacks), where
        fastget takes this origin's reads."""
        return None if self._fast is None else self._fast.whole(_pack_key(pack), size)

    def _another_store(self, timeout: float, writes: bool = False) -> ObjectStore:
        """A second client of the same store, with other limits (_split_options)."""
        url, options = self._opened_with
        return _open_store(url, options, timeout, os.environ, writes)[0]

    async def open_whole(self, pack: bytes, size: int) -> GetResult:
        """One GET of a whole pack of `size` bytes (as its manifest says), its body not
        read yet (wholepacks)."""
        key = _pack_key(pack)
        if self._whole_store is None:
            # obstore's client timeout bounds a whole answer, body included: a large pack
            # from a slow origin would break off at the same byte every time it is asked
            # again. This store's is a day; wholepacks times each piece of the body.
            self._whole_store = self._another_store(WHOLE_BODY_TIMEOUT)
        store = self._whole_store

        async def call() -> GetResult:
            result = await obstore.get_async(store, key)
            _check_head(result, size, self._encodes)
            return result

        try:
            return await self._request("get pack", key, call)
        except _Missing:
            raise ChunkMissing(f"pack {pack.hex()} is not at origin {self._url}") from None
        except _Oversized as e:
            raise ChunkCorrupt(
                f"pack {pack.hex()} at origin {self._url} {e.what}, more than the {size} "
                "bytes its manifest says"
            ) from None

    def pack_run(self, pack: bytes, offset: int, length: int, pack_size: int) -> PackRun:
        """`length` bytes at `offset` of a pack, to be read in order, a piece at a time
        (PackRun.read): one ranged GET where fastget can take it."""
        return PackRun(self, pack, offset, length, pack_size)

    async def pack_stored_size(self, pack: bytes) -> int | None:
        """The size of a pack's object at the origin (a HEAD), None if there is none."""
        return await self._stored_size("head pack", _pack_key(pack))

    async def put_pack(self, pack: bytes, data: bytes) -> None:
        await self._put("put pack", _pack_key(pack), data)

    # -- manifests ------------------------------------------------------------------------

    async def get_manifest(self, snapshot_id: str) -> bytes:
        key = f"manifests/{_check_hex(snapshot_id, 'snapshot id')}"
        try:
            return bytes(await self._get("get manifest", key, MAX_MANIFEST_BYTES))
        except _Missing:
            raise NotFound(f"no manifest {snapshot_id} at origin {self._url}") from None
        except _Oversized as e:
            raise ManifestError(
                f"manifest {key} at origin {self._url} {e.what}, over the format's limit of "
                f"{MAX_MANIFEST_BYTES} bytes"
            ) from None

    async def put_manifest(self, snapshot_id: str, data: bytes) -> None:
        await self._put("put manifest", f"manifests/{_check_hex(snapshot_id, 'snapshot id')}", data)

    # -- refs -----------------------------------------------------------------------------

    async def get_ref(self, ref: str, compat_digest: str) -> str | None:
        """The snapshot id `ref` points to under `compat_digest`, or None if it is not set."""
        key = _ref_key(ref, compat_digest)
        try:
            data = await self._get("get ref", key, MAX_REF_BYTES)
        except _Missing:
            return None
        except _Oversized as e:
            raise OriginError(
                f"ref {key} at origin {self._url} {e.what}, over the limit of {MAX_REF_BYTES} "
                "bytes for a ref: not a snapshot id"
            ) from None
        text = bytes(data).decode("ascii", errors="replace").strip()
        if not is_hex_id(text):
            raise OriginError(
                f"ref {ref} under compat key {compat_digest} at origin {self._url} holds "
                f"{text[:80]!r}, not a 64-hex snapshot id"
            )
        return text

    async def put_ref(self, ref: str, compat_digest: str, snapshot_id: str) -> None:
        key = _ref_key(ref, compat_digest)
        body = _check_hex(snapshot_id, "snapshot id").encode("ascii")
        await self._put("put ref", key, body)

    async def list_ref(self, ref: str) -> list[str] | None:
        """The compat digests `ref` is set under (sorted); None if this store cannot list."""
        prefix = f"refs/{validate_ref(ref)}/"
        if not self._can_list:
            return None

        async def call() -> list[str]:
            # With a delimiter, refs/<ref>/<sub>/... (a longer ref) stays out of the answer.
            result = await obstore.list_with_delimiter_async(self._store, prefix)
            names = (meta["path"].rpartition("/")[2] for meta in result["objects"])
            return sorted(name for name in names if is_hex_id(name))

        try:
            return await self._request("list refs", prefix, call)
        except _Missing:
            return []

    async def list_refs(self, prefix: str, limit: int) -> tuple[list[RefKey], bool] | None:
        """Every (ref, compat digest, last modified) at the origin whose ref name starts with
        `prefix` (as text), sorted, at most `limit` of them, and whether more were left out;
        None if this store cannot list. Only what lies under the prefix's whole segments is
        listed (`demo/ll` lists `refs/demo/`)."""
        # (its whole segments are listed under: none may be empty, '.' or '..')
        if prefix and (
            not _REF_PREFIX.fullmatch(prefix)
            or any(seg in ("", ".", "..") for seg in prefix.split("/")[:-1])
        ):
            raise UsageError(
                f"bad ref prefix {prefix!r}: refs are [A-Za-z0-9._-] segments joined by '/', "
                "with no empty, '.' or '..' segment"
            )
        if not self._can_list:
            return None
        base = prefix.rpartition("/")[0]
        where = f"refs/{base}" if base else "refs"

        async def call() -> tuple[list[RefKey], bool]:
            found: list[RefKey] = []
            async for batch in obstore.list(self._store, where, chunk_size=1000):
                for meta in batch:
                    ref, _, digest = meta["path"].removeprefix("refs/").rpartition("/")
                    if not is_hex_id(digest) or not ref.startswith(prefix) or not _is_ref(ref):
                        continue
                    found.append(RefKey(ref, digest, meta["last_modified"].timestamp()))
                    if len(found) > limit:
                        return sorted(found)[:limit], True
            return sorted(found), False

        try:
            return await self._request("list refs", where, call)
        except _Missing:
            return [], False

    async def ref_modified(self, ref: str, compat_digest: str) -> float | None:
        """When `ref` was last set under `compat_digest` (epoch seconds), None if it is not."""
        return await self._modified("head ref", _ref_key(ref, compat_digest))

    async def manifest_modified(self, snapshot_id: str) -> float | None:
        """When a manifest was last uploaded (epoch seconds), None if it is not there."""
        key = f"manifests/{_check_hex(snapshot_id, 'snapshot id')}"
        return await self._modified("head manifest", key)

    async def _modified(self, op: str, key: str) -> float | None:
        async def call() -> float:
            return (await obstore.head_async(self._store, key))["last_modified"].timestamp()

        try:
            return await self._request(op, key, call)
        except _Missing:
            return None

    # -- ref history: history/<ref>/<compat>/<seq> (FORMAT.md section 6, core/refentry.py) --

    async def list_history(self, ref: str, compat_digest: str) -> list[int] | None:
        """The seqs of a ref's history entries under one compat key, ascending; None if this
        store cannot list."""
        prefix = _history_dir(ref, compat_digest)
        if not self._can_list:
            return None

        async def call() -> list[int]:
            result = await obstore.list_with_delimiter_async(self._store, prefix)
            names = (meta["path"].rpartition("/")[2] for meta in result["objects"])
            return sorted(s for s in map(refentry.parse_seq_name, names) if s is not None)

        try:
            return await self._request("list ref history", prefix, call)
        except _Missing:
            return []

    async def get_history(self, ref: str, compat_digest: str, seq: int) -> bytes | None:
        """An entry's bytes (the caller decodes them), None if there is none."""
        key = _history_dir(ref, compat_digest) + refentry.seq_name(seq)
        try:
            return bytes(await self._get("get ref history", key, refentry.MAX_ENTRY_BYTES))
        except _Missing:
            return None
        except _Oversized as e:
            raise OriginError(
                f"ref history entry {key} at origin {self._url} {e.what}, over the limit of "
                f"{refentry.MAX_ENTRY_BYTES} bytes"
            ) from None

    async def put_history(self, ref: str, compat_digest: str, seq: int, data: bytes) -> None:
        key = _history_dir(ref, compat_digest) + refentry.seq_name(seq)
        await self._put("put ref history", key, data)

    async def close(self) -> None:
        """Refuse new requests. obstore holds no resource that needs an explicit release;
        requests already running finish on their own deadline."""
        self._closed = True
        if self._fast is not None:
            self._fast.close()
        self._taps.close()

    # -- the one request path -------------------------------------------------------------

    async def _get(self, op: str, key: str, cap: int, *, fast: bool = False) -> memoryview:
        """The object at `key`, at most `cap` bytes. `fast`: through fastget first (chunks:
        the bulk of a restore's bytes)."""

        async def call() -> memoryview:
            if fast and self._fast is not None:
                _allow(cap)  # (its size shows in a thread: the most it may be)
                got = await _fast(self._fast, key, cap)
                if got is not None:
                    return got
            result = await obstore.get_async(self._store, key)
            _check_head(result, cap, self._encodes)
            _allow(result.meta["size"])
            if not self._local:
                return await _read_capped(result, cap)
            # A local read is of the file this get opened, up to the size fstat gave at open
            # (obstore reads `take(size)` of that descriptor; a test holds it to that), so the
            # check above bounds it. Its stream would read in 8 KiB thread hops, 10x slower.
            data = memoryview(await result.bytes_async())
            if len(data) > cap:
                raise _Oversized(f"sent more than {cap} bytes (it stated {result.meta['size']})")
            return data

        data = await self._request(op, key, call)
        self.stats.bytes_in += len(data)
        return data

    async def _put(self, op: str, key: str, data: bytes) -> None:
        store = self._write_store
        if store is None:
            store = self._store if self._local else self._another_store(self._timeout, True)
            self._write_store = store

        async def call() -> None:
            # One PUT, never multipart: the object appears whole or not at all, and no
            # abandoned parts linger in the bucket. (LocalStore writes <key>#<n>, renames.)
            await obstore.put_async(store, key, data, use_multipart=False)

        await self._request(op, key, call, absent_ok=False, size=len(data))
        self.stats.bytes_out += len(data)

    async def _request(
        self,
        op: str,
        key: str,
        call: Callable[[], Awaitable[T]],
        *,
        absent_ok: bool = True,
        size: int = 0,
    ) -> T:
        """Run `call` under the shared limit and deadline, retrying transient failures.

        The deadline of an attempt is the request timeout and `size` bytes at MIN_RATE; a
        read whose size shows only in its answer's head adds it then (_allow).
        Raises _Missing for an absent object, OriginError for everything that is not ok.
        With `absent_ok=False` (writes) "not found" is a failure: the bucket is missing.
        """
        if self._closed:
            raise OriginError(f"origin {self._url} is closed ({op} {key})")
        attempt = 0
        while True:
            deadline: _Deadline | None = None
            try:
                # The deadline starts once a slot is held: queueing is not the origin's fault.
                given = limit(self._timeout, size)
                async with self._sem, asyncio.timeout(given) as cm:
                    deadline = _Deadline(cm, given)
                    token = _deadline.set(deadline)
                    try:
                        result = await call()
                    finally:
                        _deadline.reset(token)
            except _WrongObject as exc:
                # The object is wrong, not the connection: asking again gets the same bytes.
                # Raised without the frames below: they hold the answer, whose connection
                # (its body still coming) is dropped now, not when a collector finds them.
                self.stats.requests_failed += 1
                raise exc.with_traceback(None) from None
            except BaseException as exc:
                # CancelledError (a caller's cancel) and KeyboardInterrupt pass through.
                if not isinstance(exc, Exception) and not _is_panic(exc):
                    raise
                failure = classify(exc)
                if failure is Failure.MISSING and not absent_ok:
                    failure = Failure.PERMANENT
                if failure is Failure.MISSING:
                    self.stats.requests_missing += 1
                    raise _Missing(key) from exc
                if failure is Failure.TRANSIENT and self._retry.retries_left(attempt):
                    self.stats.requests_retried += 1
                    delay = self._retry.delay(attempt, self._rng)
                    attempt += 1
                    _tell(
                        RetryNote(
                            op,
                            key,
                            cause_of(exc) or "no answer",
                            attempt,
                            self._retry.attempts - 1,
                            delay,
                        )
                    )
                    # Sleep without holding a slot, so other requests can still run.
                    await self._sleep(delay)
                    continue
                self.stats.requests_failed += 1
                took = deadline.seconds if deadline is not None else self._timeout
                raise self._failure(op, key, failure, attempt + 1, exc, took) from exc
            self.stats.requests_ok += 1
            if attempt:
                _tell(None)
            return result

    def _failure(
        self,
        op: str,
        key: str,
        failure: Failure,
        attempts: int,
        exc: BaseException,
        seconds: float,
    ) -> OriginError:
        # The cause first (what a user acts on), then the object, then the details.
        detail = _describe(exc, seconds)
        cause = cause_of(exc) or "origin error"
        if failure is Failure.AUTH and isinstance(self._store, HTTPStore):
            # (a web server: no credentials of ours to reject; its files' permissions, say)
            return OriginError(
                f"{cause}, access refused by origin {self._url}: {op} {key}: {detail}; check "
                "that the server may read the objects (their permissions, its access rules)"
            )
        if failure is Failure.AUTH:
            return OriginError(
                f"{cause}, credentials rejected by origin {self._url}: {op} {key}: {detail}"
            )
        if failure is Failure.TRANSIENT:
            err = OriginError(
                f"{cause}: {op} {key} at origin {self._url} failed after {attempts} attempts: "
                f"{detail}"
            )
            err.unanswered = True
            return err
        return OriginError(f"{cause}: {op} {key} at origin {self._url} failed: {detail}")


class PackRun:
    """Adjacent ranges of one pack read in order, a piece at a time: a pack run's chunks.

    Through fastget, the whole run is one ranged GET whose body is received a piece at a time
    into a buffer of its own, and each piece handed to `then` on the thread that received it
    (verified there: no hop to another thread). A connection that breaks mid-run, or a piece
    over the request timeout, reopens the range at the first byte not read, BREAKS times at
    most. Where fastget is off or cannot take the answer, or the run broke that often, each
    piece is a ranged GET of its own through obstore (get_pack_range, with its retries):
    correct, one request a piece, as before packs of large files. A server that does not
    answer ranges gets one GET of the whole pack for a run from its first byte
    (wholepacks.PackStream; a fill cuts its spans at the packs' edges there, so that is the
    pack once), and any other run's pieces are cut from the pack's shared whole read
    (wholepacks.Taps). Holds none of the origin's request slots (the fetcher's limiter
    bounds runs), and one piece of the body at a time."""

    BREAKS = 2

    def __init__(
        self, origin: Origin, pack: bytes, offset: int, length: int, pack_size: int
    ) -> None:
        self._origin = origin
        self._pack = pack
        self._key = _pack_key(pack)
        self._pos = offset
        self._end = offset + length
        self._pack_size = pack_size
        self._stream: fastget.Stream | wholepacks.PackStream | None = None
        self._breaks = 0
        self._fast = origin._fast is not None  # until fastget cannot take the answer

    def __repr__(self) -> str:
        return f"PackRun({self._key}, at {self._pos} of [..{self._end}), breaks={self._breaks})"

    async def read(self, n: int, then: Callable[[memoryview], T]) -> T:
        """`then` of the run's next `n` bytes (its exceptions pass through; the bytes count
        as read). ChunkMissing for a missing pack, ChunkCorrupt for one shorter than its
        manifest says, OriginError for an origin that keeps failing."""
        if n > self._end - self._pos:
            raise ValueError(f"{n} bytes asked of a pack run with {self._end - self._pos} left")
        start = self._pos
        try:
            return await self._read(n, then)
        except Exception:
            if self._pos == start:  # failed before its bytes were had: the run moves past them
                self.close()  # (a stream still at them is asked again from the next piece)
                self._pos = start + n
            raise

    async def _read(self, n: int, then: Callable[[memoryview], T]) -> T:
        o = self._origin
        while True:
            stream = await self._opened()
            if stream is None:
                data = await o.get_pack_range(self._pack, self._pos, n, self._pack_size)
                self._pos += n
                return await wholepacks.handed(then, data)
            try:
                async with asyncio.timeout(limit(o._timeout, n)):
                    got = await stream.read(n, then)
            except (fastget.Broken, TimeoutError) as e:
                self._breaks += 1
                self._stream = None
                stream.close()
                o.stats.requests_retried += 1
                log.info(
                    "%s %s broke at byte %d (%s): asking again", o.url, self._key, self._pos, e
                )
                continue
            finally:
                if self._stream is stream:
                    self._pos = self._end - stream.left
            if isinstance(stream, fastget.Stream):  # (a PackStream counts what it receives)
                o.stats.bytes_in += n
            return got

    async def _opened(self) -> fastget.Stream | wholepacks.PackStream | None:
        """The run's GET, open (None: read the piece through get_pack_range)."""
        if self._stream is not None:
            return self._stream
        o = self._origin
        if self._breaks >= self.BREAKS:
            return None
        if o._knows_ranges() is False:
            if self._pos > 0 or o._taps.holds(self._pack, self._pack_size):
                return None  # (its pieces cut from the pack's shared whole read: Taps)
            left = self._end - self._pos
            whole = wholepacks.PackStream(o, self._pack, self._pos, left, self._pack_size)
            try:
                await whole.open()
            except (fastget.Broken, TimeoutError):
                whole.close()
                self._breaks += 1
                return None
            except BaseException:
                whole.close()
                raise
            self._stream = whole
            return whole
        if not self._fast or o._fast is None:
            return None
        stream = o._fast.stream(self._key, self._pos, self._end - self._pos)
        try:
            async with asyncio.timeout(o._timeout):
                opened = await stream.open()
        except fastget.Whole:  # (its pieces now come from get_pack_range: a whole read)
            stream.close()
            o._learnt(ranges=False)
            return None
        except fastget.Oversized as e:
            o.stats.requests_failed += 1
            raise ChunkCorrupt(
                f"pack {self._pack.hex()} at origin {o.url}: a range of it {e}, more than asked"
            ) from None
        except TimeoutError:
            stream.close()
            self._breaks += 1
            return None
        if not opened:
            self._fast = False
            return None
        o._learnt(ranges=True)
        o.stats.requests_ok += 1
        self._stream = stream
        return stream

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None


# After a ranges probe that failed, seconds before another; its one attempt's limit; how
# long a peer fetch waits for it.
PROBE_AGAIN = 30.0
PROBE_TIMEOUT = 5.0
PROBE_WAIT = 2.0
# Seconds after which an origin found to ignore ranges is asked a range again.
RANGES_RECHECK = 600.0
# The client timeout of the store whole packs are read through (the body is timed a piece
# at a time instead).
WHOLE_BODY_TIMEOUT = 86400.0


def _tell(note: RetryNote | None) -> None:
    observer = retry_observer.get()
    if observer is not None:
        observer(note)


def _no_ranges(exc: BaseException) -> bool:
    """obstore's answer to a server that sent the whole object for a ranged GET."""
    return "Range request not supported" in str(exc)


async def _fast(
    fast: fastget.FastGet, key: str, cap: int, span: tuple[int, int] | None = None
) -> memoryview | None:
    """fastget's answer (None: ask obstore), its refusal of a stated size as ours."""
    try:
        return await fast.get(key, cap, span)
    except fastget.Oversized as e:
        raise _Oversized(str(e)) from None


# Content-Encodings that make a web server's body other than the object's bytes (others,
# such as aws-chunked, which S3-compatible servers store and send back, leave them as they are).
_COMPRESSED = frozenset({"gzip", "x-gzip", "deflate", "br", "zstd", "compress", "x-compress"})


class _Encoded(Exception):
    """A web server sent an object encoded (Content-Encoding): not its bytes as stored."""


def _check_head(result: GetResult, cap: int | None, encodes: bool) -> None:
    """Refuse an answer before any of its body is read: an object whose stated size is over
    `cap` (None: no check), or one a web server (`encodes`) sent compressed.

    The size is only a shortcut: it comes from the server (Content-Length, a stat), and
    `_read_capped` holds the body to the cap whatever was stated. An encoded body would
    fail its size or its hash, blamed on the object: the message names the encoding."""
    encoding = str(result.attributes.get("Content-Encoding") or "")
    if encodes and _COMPRESSED.intersection(c.strip() for c in encoding.lower().split(",")):
        raise _Encoded(
            f"the server sent it with Content-Encoding: {encoding}, not as stored; hostd "
            "verifies the stored bytes: turn compression off for the origin's files (nginx: "
            "gzip and gzip_static off; a proxy's compression)"
        )
    if cap is not None and result.meta["size"] > cap:
        raise _Oversized(f"is {result.meta['size']} bytes")


async def _read_capped(result: GetResult, cap: int) -> memoryview:
    """The object's body if it is at most `cap` bytes; _Oversized as soon as it passes it.

    obstore's stream hands over a piece once it holds `min_chunk_size` bytes or the body
    ends. Asked for cap + 1 (up to _READ_PIECE), an object within the cap comes as one piece,
    and one over it is dropped holding at most the cap plus one piece (and one network read).
    Past _READ_PIECE the pieces are joined, so for that moment an object is held twice.
    """
    pieces: list[bytes] = []
    total = 0
    async for piece in result.stream(min_chunk_size=min(cap + 1, _READ_PIECE)):
        total += len(piece)
        if total > cap:
            raise _Oversized(f"sent more than {cap} bytes (it stated {result.meta['size']})")
        pieces.append(piece)
    if len(pieces) == 1:
        return memoryview(pieces[0])
    return memoryview(b"".join(pieces))


def _chunk_key(cid: bytes) -> str:
    return _object_key("chunks", cid, "chunk")


def _pack_key(pack: bytes) -> str:
    return _object_key("packs", pack, "pack")


def stored_at(chunk: Chunk, url: str) -> str:
    """Where a chunk's stored bytes lie at the origin, for a message: its own object, or its
    pack's key and the offset in it (a pack damaged in place at its size is mended by
    deleting that object and publishing again: the operator needs its name)."""
    p = chunk.packed
    if p is None:
        return f"from origin {url}"
    return f"from origin {url}, pack object {_pack_key(p.pack)} at offset {p.offset}"


def _object_key(prefix: str, oid: bytes, what: str) -> str:
    if not isinstance(oid, bytes) or len(oid) != HASH_LEN:
        raise UsageError(f"a {what} id is {HASH_LEN} bytes, got {oid!r}")
    h = oid.hex()
    return f"{prefix}/{h[:2]}/{h}"


def _history_dir(ref: str, compat_digest: str) -> str:
    return f"history/{validate_ref(ref)}/{_check_hex(compat_digest, 'compat digest')}/"


def _is_ref(name: str) -> bool:
    try:
        validate_ref(name)
    except UsageError:
        return False
    return True


def _ref_key(ref: str, compat_digest: str) -> str:
    return f"refs/{validate_ref(ref)}/{_check_hex(compat_digest, 'compat digest')}"


def _check_hex(text: str, what: str) -> str:
    if not isinstance(text, str) or not is_hex_id(text):
        raise UsageError(f"{what} must be 64 lowercase hex digits, got {text!r}")
    return text
