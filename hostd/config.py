"""Config: the keys of hostd's TOML file, their defaults, and the per-user default paths.

`load_config` reads one TOML file (or none: the embedded defaults), checks every key and
value, and returns a frozen `Config` whose paths are absolute and whose sizes and durations
are resolved to bytes and seconds. A wrong key or value raises `ConfigError` naming the key
(`tiers[1].budget`, `peers.timeout`, `origin_options.region`) and the reason; tier indexes
count from 0. Relative paths resolve against the directory of the file.

With no file every path is per user (docs/ARCHITECTURE.md, "Config"), and derived from the
cache directory, so two users or two `HOME`s never share a socket, tier, index or origin.

It must not create, change or open anything but the config file itself: the daemon makes
its directories. The only other filesystem access is `os.statvfs` for "%" budgets (on the
nearest existing ancestor of the tier path) and `is_dir` on /dev/shm for the default `mem`
tier, plus the user and group database lookups that turn `[access]` names into ids. No
module state: tests inject the environment and the daemon's effective uid.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import grp
import ipaddress
import math
import os
import pwd
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

from hostd.core import compat
from hostd.core.units import PERCENT_RE, parse_duration, parse_share, parse_size, show
from hostd.errors import FILE, ConfigError
from hostd.paths import DefaultPaths, default_paths

# sun_path is 108 bytes on Linux, one of them the terminating NUL.
MAX_SOCKET_PATH = 107

ORIGIN_SCHEMES = ("s3", "gs", "az", "http", "https", "file")
COMPRESS_MODES = ("auto", "never", "always")
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("logfmt", "json")
DEFAULT_COMPAT_FACTS = compat.COMPILE_CACHE_FACTS  # the compile-cache kind's
DEFAULT_TIER_BUDGET = "50%"
MIN_CHUNK_SIZE = 64 * 1024
MAX_CHUNK_SIZE = 256 * 1024 * 1024
MAX_FETCH_RANGE = 1024 * 1024 * 1024
MAX_PACK_SIZE = 1024 * 1024 * 1024

# The keys the loader accepts, per table. tests/test_config.py checks that config/hostd.toml
# documents exactly these and that they match the dataclass fields below.
TOP_KEYS = (
    "origin",
    "origin_options",
    "socket",
    "socket_mode",
    "metrics_address",
    "compat_facts",
    "tiers",
    "index",
    "chunk_size",
    "fetch_concurrency",
    "fetch_memory",
    "fetch_range",
    "upload_concurrency",
    "pack_size",
    "retries",
    "retry_base",
    "retry_max",
    "request_timeout",
    "drain_timeout",
    "idle_timeout",
    "max_request_body",
    "compress",
    "compress_min_saving",
    "log_level",
    "log_format",
    "peers",
    "access",
    "kinds",
)
KIND_KEYS = compat.KINDS
TIER_KEYS = ("name", "path", "budget")
PEER_KEYS = (
    "listen",
    "static",
    "dns",
    "dns_refresh",
    "secret_file",
    "hedge_after",
    "timeout",
    "allow_unauthenticated",
    "max_uploads",
    "buffer",
)
MAX_UPLOADS_LIMIT = 4096
# Few uploads at once spread a chunk fastest: each copy lands sooner, and the host that got it
# serves others while the rest of the askers are sent to it (bench/simulate.py: at 300 hosts,
# 4 at once finished in 1.20x the bound, 16 at once in 1.32x).
DEFAULT_MAX_UPLOADS = 4
ACCESS_CLASSES = ("restore", "publish", "admin")
ACCESS_KEYS = (
    *ACCESS_CLASSES,
    "link_to_writers",
    "link_checks",
    "max_operations",
    "max_operations_per_uid",
)
# [access] link_checks: which linked blobs are checked by ctime before every later use
# (restore.py, cache.py `lent`): those linked to callers that could write them; those, and
# the others where the daemon holds no read lease on them (hostd/leases.py: the default); or
# all.
LINK_CHECKS = ("writers", "lease", "all")
DEFAULT_MAX_OPERATIONS = 64
DEFAULT_MAX_OPERATIONS_PER_UID = 16
MAX_OPERATIONS_LIMIT = 65536
MAX_ID = 2**32 - 2  # uid_t and gid_t are 32 bits; (uid_t)-1 means "no id"

_TIER_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
_FACT_RE = re.compile(r"[a-z][a-z0-9_]*")
_MODE_RE = re.compile(r"(?:0o|0)?([0-7]{3})")
_HOST_RE = re.compile(r"[A-Za-z0-9_.-]+")
_SECRET_RE = re.compile(r"secret|key|token|passw|credential|sas", re.IGNORECASE)
_PRINCIPAL_RE = re.compile(r"(user|uid|group|gid):(.+)")


@dataclass(frozen=True)
class TierConfig:
    name: str
    path: Path
    budget: int
    budget_spec: str


@dataclass(frozen=True)
class PeersConfig:
    listen: str
    static: tuple[str, ...]
    dns: tuple[str, ...]
    dns_refresh: float
    secret_file: Path | None
    hedge_after: float
    timeout: float
    allow_unauthenticated: bool = False
    max_uploads: int = DEFAULT_MAX_UPLOADS
    buffer: int = 256 * 1024 * 1024


@dataclass(frozen=True)
class AccessConfig:
    """Who may use which class of operation, and how many operations run at once.

    Each class lists callers as "uid:N", "gid:N" or "*": `user:NAME` and `group:NAME` are
    resolved to ids when the config is loaded. Root and the daemon's own effective uid may
    use every class whatever the lists say (access.py decides).
    """

    restore: tuple[str, ...]
    publish: tuple[str, ...]
    admin: tuple[str, ...]
    link_to_writers: bool
    max_operations: int
    max_operations_per_uid: int
    link_checks: str = "lease"


@dataclass(frozen=True)
class Config:
    origin: str
    origin_options: dict[str, str] = field(hash=False)
    socket: Path
    socket_mode: int
    metrics_address: str
    compat_facts: tuple[str, ...]  # the compile-cache kind's facts (kinds["compile-cache"])
    kinds: dict[str, tuple[str, ...]] = field(hash=False)  # each snapshot kind's compat facts
    tiers: tuple[TierConfig, ...]
    tiers_default: bool  # no [[tiers]] in the file: the per-user default tiers
    index: Path
    chunk_size: int
    fetch_concurrency: int
    fetch_memory: int
    fetch_range: int
    upload_concurrency: int
    pack_size: int
    retries: int
    retry_base: float
    retry_max: float
    request_timeout: float
    drain_timeout: float
    idle_timeout: float
    max_request_body: int
    compress: str
    compress_min_saving: float
    log_level: str
    log_format: str
    peers: PeersConfig | None
    access: AccessConfig
    source: Path | None

    def to_json(self) -> dict[str, Any]:
        """A JSON-able view for `status`: paths as strings, secrets in origin options hidden."""
        out = {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}
        out["origin"] = _redact_url(self.origin)
        out["origin_options"] = {
            k: ("***" if _SECRET_RE.search(k) else v) for k, v in self.origin_options.items()
        }
        out["socket_mode"] = f"{self.socket_mode:04o}"
        return out


def known_keys() -> frozenset[str]:
    """Every leaf key the loader accepts: `origin`, `tiers[].budget`, `peers.timeout`..."""
    top = {k for k in TOP_KEYS if k not in ("tiers", "peers", "access", "kinds")}
    return frozenset(
        top
        | {f"tiers[].{k}" for k in TIER_KEYS}
        | {f"peers.{k}" for k in PEER_KEYS}
        | {f"access.{k}" for k in ACCESS_KEYS}
        | {f"kinds.{k}" for k in KIND_KEYS}
    )


# ---------------------------------------------------------------------------------------------
# Budgets


def resolve_budget(
    spec: str | int,
    path: Path,
    key: str,
    statvfs: Callable[[Path], os.statvfs_result] = os.statvfs,
) -> int:
    """A tier budget in bytes: a size, or "N%" of the filesystem that holds `path`.

    The filesystem is the one of `path` or, where it does not exist yet, of its nearest
    existing ancestor (the daemon creates tier directories after loading the config).
    """
    m = PERCENT_RE.fullmatch(spec) if isinstance(spec, str) else None
    if m is None:
        budget = parse_size(spec, key)
    else:
        share = Fraction(m.group(1))
        if not 0 < share <= 100:
            raise ConfigError(key, f"a share of the filesystem must be in (0%, 100%], got {spec!r}")
        budget = math.floor(_filesystem_size(path, key, statvfs) * share / 100)
    if budget <= 0:
        raise ConfigError(key, f"a tier budget must be at least 1 byte, got {spec!r}")
    return budget


def _filesystem_size(path: Path, key: str, statvfs: Callable[[Path], os.statvfs_result]) -> int:
    probe = path
    while True:
        try:
            st = statvfs(probe)
        except (FileNotFoundError, NotADirectoryError):
            if probe.parent == probe:
                raise ConfigError(key, f"no existing ancestor of {path} to measure") from None
            probe = probe.parent
        except OSError as e:
            raise ConfigError(key, f"cannot measure the filesystem of {probe}: {e}") from e
        else:
            return st.f_blocks * st.f_frsize


# ---------------------------------------------------------------------------------------------
# Loading


class ConfigUnreadable(ConfigError):
    """The config file cannot be read (missing, no permission): a failure (exit 1), not a
    usage error like a bad value in it (exit 2)."""

    exit_code = 1


def load_config(
    path: Path | None, env: Mapping[str, str] | None = None, *, euid: int | None = None
) -> Config:
    """Read and check the config file at `path`; None gives the embedded defaults.

    `env` (default os.environ) supplies HOME and the XDG variables of the default paths;
    `euid` (default os.geteuid()) is the daemon's effective uid, which some defaults follow.
    """
    env = os.environ if env is None else env
    euid = os.geteuid() if euid is None else euid
    if path is None:
        return _build({}, env, base=None, source=None, euid=euid)
    source = Path(os.path.abspath(path))
    try:
        with open(source, "rb") as f:
            raw = tomllib.load(f)
    except OSError as e:
        raise ConfigUnreadable(FILE, f"cannot read {source}: {e.strerror or e}") from e
    except ValueError as e:  # TOMLDecodeError, or bytes that are not UTF-8
        raise ConfigError(FILE, f"{source} is not valid TOML: {e}") from e
    return _build(raw, env, base=source.parent, source=source, euid=euid)


def _build(
    raw: dict[str, Any], env: Mapping[str, str], base: Path | None, source: Path | None, euid: int
) -> Config:
    _check_keys(raw, TOP_KEYS, "")
    defaults = functools.cache(lambda: default_paths(env))

    def get(key: str, default: Any) -> Any:
        return raw.get(key, default)

    if "origin" in raw:
        origin = _origin(raw["origin"])
    else:
        origin = (defaults().data_dir / "origin").as_uri()
    socket = _path(raw["socket"], "socket", base) if "socket" in raw else defaults().socket
    if len(os.fsencode(str(socket))) > MAX_SOCKET_PATH:
        raise ConfigError(
            "socket",
            f"{socket} is {len(os.fsencode(str(socket)))} bytes long; a Unix socket path must "
            f"be at most {MAX_SOCKET_PATH} bytes: set a shorter one",
        )
    tiers = _tiers(raw["tiers"], base) if "tiers" in raw else _default_tiers(defaults())
    if "index" in raw:
        index = _path(raw["index"], "index", base)
    else:
        index = defaults().cache_dir / "index.sqlite3"

    chunk_size = parse_size(_size_value(get("chunk_size", "4MiB"), "chunk_size"), "chunk_size")
    if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE or chunk_size & (chunk_size - 1):
        raise ConfigError("chunk_size", "must be a power of two from 64KiB to 256MiB")
    retry_base = _duration(get("retry_base", "200ms"), "retry_base", positive=True)
    retry_max = _duration(get("retry_max", "5s"), "retry_max", positive=True)
    if retry_max < retry_base:
        raise ConfigError("retry_max", f"must be at least retry_base ({retry_base}s)")
    fetch_memory = parse_size(
        _size_value(get("fetch_memory", "64MiB"), "fetch_memory"), "fetch_memory"
    )
    if fetch_memory < MIN_CHUNK_SIZE:
        raise ConfigError(
            "fetch_memory", "must be at least 64KiB (one chunk is let through anyway)"
        )
    fetch_range = parse_size(_size_value(get("fetch_range", "64MiB"), "fetch_range"), "fetch_range")
    if fetch_range > MAX_FETCH_RANGE:
        raise ConfigError("fetch_range", "must be at most 1GiB (0: one chunk a request)")
    pack_size = parse_size(_size_value(get("pack_size", "64MiB"), "pack_size"), "pack_size")
    if pack_size and not MIN_CHUNK_SIZE <= pack_size <= MAX_PACK_SIZE:
        raise ConfigError(
            "pack_size",
            "must be 0 (large files' chunks stay objects of their own) or 64KiB to 1GiB",
        )
    max_request_body = parse_size(
        _size_value(get("max_request_body", "1MiB"), "max_request_body"), "max_request_body"
    )
    if max_request_body < 1024:
        raise ConfigError("max_request_body", "must be at least 1KiB")
    compress_min_saving = parse_share(get("compress_min_saving", 0.10), "compress_min_saving")
    if compress_min_saving >= 1.0:
        raise ConfigError("compress_min_saving", "must be below 100%: no chunk can save all")
    level = _choice(get("log_level", "info"), "log_level", LOG_LEVELS, fold_case=True)
    kinds = _kinds(raw.get("kinds", {}), raw.get("compat_facts"))

    config = Config(
        origin=origin,
        origin_options=_origin_options(get("origin_options", {})),
        socket=socket,
        socket_mode=_mode(get("socket_mode", "0660"), "socket_mode"),
        metrics_address=_address(get("metrics_address", "127.0.0.1:0"), "metrics_address", True),
        compat_facts=kinds["compile-cache"],
        kinds=kinds,
        tiers=tiers,
        tiers_default="tiers" not in raw,
        index=index,
        chunk_size=chunk_size,
        fetch_concurrency=_int(get("fetch_concurrency", 16), "fetch_concurrency", 1, 1024),
        fetch_memory=fetch_memory,
        fetch_range=fetch_range,
        upload_concurrency=_int(get("upload_concurrency", 16), "upload_concurrency", 1, 1024),
        pack_size=pack_size,
        retries=_int(get("retries", 5), "retries", 1, 100),
        retry_base=retry_base,
        retry_max=retry_max,
        request_timeout=_duration(get("request_timeout", "30s"), "request_timeout", True),
        drain_timeout=_duration(get("drain_timeout", "30s"), "drain_timeout", False),
        idle_timeout=_duration(get("idle_timeout", "60s"), "idle_timeout", True),
        max_request_body=max_request_body,
        compress=_choice(get("compress", "auto"), "compress", COMPRESS_MODES),
        compress_min_saving=compress_min_saving,
        log_level=level,
        log_format=_choice(get("log_format", "logfmt"), "log_format", LOG_FORMATS),
        peers=_peers(raw["peers"], base) if "peers" in raw else None,
        access=_access(raw.get("access", {}), euid),
        source=source,
    )
    _check_not_in_tiers(config)
    return config


def _check_keys(table: dict[str, Any], known: tuple[str, ...], prefix: str) -> None:
    for key in table:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            if prefix and key in TOP_KEYS:
                # (TOML: a key written after a [table] or [[tiers]] header belongs to it)
                hint += (
                    f"; {key!r} is a top-level key: write it above the first [table] or "
                    "[[tiers]] header"
                )
            raise ConfigError(prefix + key, f"unknown key{hint}")


def _table(value: Any, key: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(key, f"expected a table, got {show(value)}")
    return value


def _string(value: Any, key: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(key, f"expected a string, got {show(value)}")
    return value


def _int(value: Any, key: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(key, f"expected an integer, got {show(value)}")
    if not lo <= value <= hi:
        raise ConfigError(key, f"must be from {lo} to {hi}, got {value}")
    return value


def _size_value(value: Any, key: str) -> str | int:
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ConfigError(key, f'expected a size like "4MiB" or a byte count, got {show(value)}')
    return value


def _duration(value: Any, key: str, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ConfigError(key, f'expected a duration like "30s" or seconds, got {show(value)}')
    seconds = parse_duration(value, key)
    if positive and seconds <= 0:
        raise ConfigError(key, f"must be more than 0, got {value!r}")
    return seconds


def _choice(value: Any, key: str, allowed: tuple[str, ...], fold_case: bool = False) -> str:
    text = _string(value, key)
    if fold_case:
        text = text.lower()
    if text not in allowed:
        raise ConfigError(key, f"must be one of {', '.join(allowed)}; got {value!r}")
    return text


def _path(value: Any, key: str, base: Path | None) -> Path:
    text = _string(value, key)
    if not text or "\0" in text:
        raise ConfigError(key, "expected a path, got an empty string or a NUL byte")
    if not os.path.isabs(text):
        # Only a file can hold a relative path; resolve it against the file's directory.
        text = os.path.join(base if base is not None else os.getcwd(), text)
    return Path(os.path.normpath(text))


def _origin(value: Any) -> str:
    text = _string(value, "origin")
    scheme, _, rest = text.partition("://")
    if scheme not in ORIGIN_SCHEMES or not rest:
        raise ConfigError(
            "origin",
            f"{text!r} is not an origin URL: use s3://, gs://, az://, http(s):// or file://",
        )
    if any(c.isspace() for c in text):
        raise ConfigError("origin", f"{text!r} contains white space")
    if scheme == "file":
        if not rest.startswith("/"):
            raise ConfigError(
                "origin",
                f"a file:// origin needs an absolute path, e.g. file:///srv/origin; got {text!r}",
            )
    elif not urlsplit(text).netloc:
        raise ConfigError("origin", f"{text!r} names no bucket or host")
    return text


def _origin_options(value: Any) -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in _table(value, "origin_options").items():
        if isinstance(v, bool):
            out[k] = "true" if v else "false"
        elif isinstance(v, str | int | float):
            out[k] = str(v)
        else:
            raise ConfigError(
                f"origin_options.{k}", f"expected a string, number or boolean, got {show(v)}"
            )
    return out


def _mode(value: Any, key: str) -> int:
    if not isinstance(value, str):
        raise ConfigError(key, f'expected an octal string like "0660", got {show(value)}')
    m = _MODE_RE.fullmatch(value)
    if m is None:
        raise ConfigError(key, f'{value!r} is not an octal file mode like "0660"')
    return int(m.group(1), 8)


def _address(value: Any, key: str, listen: bool) -> str:
    """A "host:port" (host a name, an IPv4 address or a [bracketed] IPv6 address).

    A listening address may be "" (off) and may use port 0 (any free port).
    """
    text = _string(value, key)
    if listen and text == "":
        return text
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            host = ""
    elif not _HOST_RE.fullmatch(host):
        host = ""
    lowest = 0 if listen else 1
    # (ASCII digits only: "²" is a digit int() refuses, "٧٤٦٠" one it reads as 7460, and a
    # member named so is not the name the other hosts list it by)
    if (
        not sep
        or not host
        or not (port.isascii() and port.isdigit())
        or not lowest <= int(port) <= 65535
    ):
        raise ConfigError(
            key, f'{text!r} is not "host:port" (an IPv6 host in brackets, port {lowest}-65535)'
        )
    return text


def _string_list(value: Any, key: str) -> list[str]:
    if not isinstance(value, list):
        raise ConfigError(key, f"expected an array of strings, got {show(value)}")
    for i, item in enumerate(value):
        _string(item, f"{key}[{i}]")
    return value


def _kinds(value: Any, compat_facts: Any) -> dict[str, tuple[str, ...]]:
    """Each snapshot kind's compat facts: `[kinds]`, where `compat_facts` (older) sets the
    compile-cache list; `process` defaults to that list plus the exact driver and kernel."""
    table = _table(value, "kinds")
    _check_keys(table, KIND_KEYS, "kinds.")
    cc: tuple[str, ...] = compat.COMPILE_CACHE_FACTS
    if compat_facts is not None:
        cc = _fact_list(compat_facts, "compat_facts")
    if "compile-cache" in table:
        listed = _fact_list(table["compile-cache"], "kinds.compile-cache")
        if compat_facts is not None and listed != cc:
            raise ConfigError(
                "kinds.compile-cache",
                f"compat_facts sets the same list, to {list(cc)}: keep one of the two",
            )
        cc = listed
    base = compat.default_kinds(cc)
    for kind in ("files", "process"):
        if kind in table:
            base[kind] = _fact_list(table[kind], f"kinds.{kind}")
    return base


def _fact_list(value: Any, key: str) -> tuple[str, ...]:
    facts = _string_list(value, key)
    if not facts:
        raise ConfigError(key, 'needs at least one fact (e.g. "format")')
    for i, fact in enumerate(facts):
        if not _FACT_RE.fullmatch(fact):
            raise ConfigError(f"{key}[{i}]", f"{fact!r} does not match [a-z][a-z0-9_]*")
        if fact in facts[:i]:
            raise ConfigError(f"{key}[{i}]", f"{fact!r} is listed twice")
    return compat.with_format(facts)  # every kind's facts include format


def _default_tiers(paths: DefaultPaths) -> tuple[TierConfig, ...]:
    places = [("mem", paths.shm_dir), ("disk", paths.cache_dir / "disk")]
    return tuple(
        TierConfig(
            name=name,
            path=path,
            budget=resolve_budget(DEFAULT_TIER_BUDGET, path, f"tiers[{i}].budget"),
            budget_spec=DEFAULT_TIER_BUDGET,
        )
        for i, (name, path) in enumerate((n, p) for n, p in places if p is not None)
    )


def _tiers(value: Any, base: Path | None) -> tuple[TierConfig, ...]:
    if not isinstance(value, list):
        raise ConfigError("tiers", f"expected an array of tables ([[tiers]]), got {show(value)}")
    if not value:
        raise ConfigError("tiers", "needs at least one tier")
    tiers: list[TierConfig] = []
    for i, item in enumerate(value):
        prefix = f"tiers[{i}]"
        table = _table(item, prefix)
        _check_keys(table, TIER_KEYS, prefix + ".")
        for key in TIER_KEYS:
            if key not in table:
                raise ConfigError(
                    f"{prefix}.{key}", "missing: every tier needs name, path and budget"
                )
        name = _string(table["name"], f"{prefix}.name")
        if not _TIER_NAME_RE.fullmatch(name):
            raise ConfigError(
                f"{prefix}.name", f"{name!r} does not match [a-z0-9][a-z0-9_-]* (64 at most)"
            )
        path = _path(table["path"], f"{prefix}.path", base)
        for other in tiers:
            if other.name == name:
                raise ConfigError(f"{prefix}.name", f"{name!r} names two tiers")
            if other.path == path:
                raise ConfigError(f"{prefix}.path", f"{path} is also tier {other.name!r}")
            if _inside(path, other.path) or _inside(other.path, path):
                raise ConfigError(
                    f"{prefix}.path", f"{path} nests with tier {other.name!r} at {other.path}"
                )
        budget_value = _size_value(table["budget"], f"{prefix}.budget")
        budget = resolve_budget(budget_value, path, f"{prefix}.budget")
        tiers.append(TierConfig(name=name, path=path, budget=budget, budget_spec=str(budget_value)))
    return tuple(tiers)


def _peers(value: Any, base: Path | None) -> PeersConfig:
    table = _table(value, "peers")
    _check_keys(table, PEER_KEYS, "peers.")

    def addresses(key: str) -> tuple[str, ...]:
        items = _string_list(table.get(key, []), f"peers.{key}")
        return tuple(_address(a, f"peers.{key}[{i}]", False) for i, a in enumerate(items))

    secret = table.get("secret_file")
    listen = _address(table.get("listen", "0.0.0.0:7460"), "peers.listen", True)
    if not listen:
        raise ConfigError(
            "peers.listen",
            "is empty: peers listen for each other; to turn them off, remove [peers]",
        )
    return PeersConfig(
        listen=listen,
        static=addresses("static"),
        dns=addresses("dns"),
        dns_refresh=_duration(table.get("dns_refresh", "10s"), "peers.dns_refresh", True),
        secret_file=None if secret is None else _path(secret, "peers.secret_file", base),
        hedge_after=_duration(table.get("hedge_after", "200ms"), "peers.hedge_after", False),
        timeout=_duration(table.get("timeout", "5s"), "peers.timeout", True),
        allow_unauthenticated=_bool(
            table.get("allow_unauthenticated", False), "peers.allow_unauthenticated"
        ),
        max_uploads=_int(
            table.get("max_uploads", DEFAULT_MAX_UPLOADS), "peers.max_uploads", 1, MAX_UPLOADS_LIMIT
        ),
        buffer=_size(table.get("buffer", "256MiB"), "peers.buffer"),
    )


def _bool(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(key, f"expected true or false, got {show(value)}")
    return value


def _size(value: Any, key: str) -> int:
    """A byte count, absolute ("256MiB" or bytes): not a share of a filesystem."""
    return parse_size(_size_value(value, key), key)


def _access(value: Any, euid: int) -> AccessConfig:
    table = _table(value, "access")
    _check_keys(table, ACCESS_KEYS, "access.")

    def callers(key: str, default: list[str]) -> tuple[str, ...]:
        items = _string_list(table.get(key, default), f"access.{key}")
        return tuple(_principal(x, f"access.{key}[{i}]") for i, x in enumerate(items))

    link = table.get("link_to_writers", euid != 0)
    if not isinstance(link, bool):
        raise ConfigError("access.link_to_writers", f"expected true or false, got {show(link)}")
    checks = table.get("link_checks", "lease")
    if checks not in LINK_CHECKS:
        raise ConfigError(
            "access.link_checks",
            f"expected one of {', '.join(map(repr, LINK_CHECKS))}, got {show(checks)}",
        )
    lim = MAX_OPERATIONS_LIMIT
    return AccessConfig(
        restore=callers("restore", ["*"]),
        publish=callers("publish", []),
        admin=callers("admin", []),
        link_to_writers=link,
        max_operations=_int(
            table.get("max_operations", DEFAULT_MAX_OPERATIONS), "access.max_operations", 1, lim
        ),
        max_operations_per_uid=_int(
            table.get("max_operations_per_uid", DEFAULT_MAX_OPERATIONS_PER_UID),
            "access.max_operations_per_uid",
            1,
            lim,
        ),
        link_checks=checks,
    )


def _principal(text: str, key: str) -> str:
    """One caller of an `[access]` list, as "uid:N", "gid:N" or "*" (names looked up here)."""
    if text == "*":
        return text
    m = _PRINCIPAL_RE.fullmatch(text)
    if m is None:
        raise ConfigError(
            key, f'{text!r} is not "user:NAME", "uid:N", "group:NAME", "gid:N" or "*"'
        )
    kind, name = m.groups()
    if kind in ("uid", "gid"):
        if not (name.isascii() and name.isdigit()) or len(name) > 10 or int(name) > MAX_ID:
            raise ConfigError(key, f"{text!r}: {kind} must be a number from 0 to {MAX_ID}")
        return f"{kind}:{int(name)}"
    try:
        if kind == "user":
            return f"uid:{pwd.getpwnam(name).pw_uid}"
        return f"gid:{grp.getgrnam(name).gr_gid}"
    except (KeyError, ValueError):  # ValueError: a NUL in the name
        raise ConfigError(
            key, f"{text!r}: no {kind} named {name!r} on this host (use {kind[0]}id:N for a number)"
        ) from None


def _check_not_in_tiers(config: Config) -> None:
    """A tier directory holds only blobs: the tier's start-up sweep would take anything else."""
    others: list[tuple[str, Path]] = [("index", config.index), ("socket", config.socket)]
    if config.origin.startswith("file://"):
        others.append(("origin", Path(os.path.normpath(unquote(urlsplit(config.origin).path)))))
    for key, path in others:
        for tier in config.tiers:
            if path == tier.path or _inside(path, tier.path):
                raise ConfigError(key, f"{path} lies inside tier {tier.name!r} ({tier.path})")


def _inside(path: Path, parent: Path) -> bool:
    return path != parent and path.is_relative_to(parent)


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    return value


def _redact_url(url: str) -> str:
    """Hide a password in the user part and any query string (a signed URL's token)."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:
        netloc = f"{parts.username}:***@{netloc.rpartition('@')[2]}"
    query = "***" if parts.query else ""
    if netloc == parts.netloc and query == parts.query:
        return url
    return urlunsplit(parts._replace(netloc=netloc, query=query))
