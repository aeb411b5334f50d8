"""The per-user default paths of docs/ARCHITECTURE.md, "Config", and the socket a client
command talks to when given none.

Apart from config.py, which builds on it, a client command imports this module to find the
daemon: it is kept to what that needs (no TOML, no config checks), so a command that names
no socket starts as fast as one that does.
"""

from __future__ import annotations

import functools
import os
import pwd
import stat

import blake3

from hostd.errors import ConfigError

# Types for the checker alone: a client command that names no socket imports this module,
# and pathlib, typing and dataclasses would cost it ~12 ms. Paths are strings here until
# default_paths hands them out.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from pathlib import Path

SYSTEM_SOCKET = "/run/hostd/hostd.sock"
DEFAULT_SHM_ROOT = "/dev/shm"


class DefaultPaths:
    """Where a daemon with no config keeps things, for the user and environment given."""

    __slots__ = ("cache_dir", "data_dir", "shm_dir", "socket")

    def __init__(self, cache_dir: Path, data_dir: Path, socket: Path, shm_dir: Path | None):
        self.cache_dir = cache_dir
        self.data_dir = data_dir
        self.socket = socket
        self.shm_dir = shm_dir

    def __repr__(self) -> str:
        return (
            f"DefaultPaths(cache_dir={self.cache_dir!r}, data_dir={self.data_dir!r}, "
            f"socket={self.socket!r}, shm_dir={self.shm_dir!r})"
        )


def default_paths(
    env: Mapping[str, str],
    *,
    uid: int | None = None,
    shm_root: str | os.PathLike[str] = DEFAULT_SHM_ROOT,
) -> DefaultPaths:
    """The per-user paths of docs/ARCHITECTURE.md, "Config", named after the cache directory.

    cache_dir = $XDG_CACHE_HOME/hostd or $HOME/.cache/hostd; data_dir likewise with
    $XDG_DATA_HOME and .local/share; socket = $XDG_RUNTIME_DIR/hostd/hostd-<tag>.sock or
    /tmp/hostd-<uid>-<tag>/hostd.sock; shm_dir = <shm_root>/hostd-<uid>-<tag> where shm_root
    is a directory, else None. <tag> is the first 12 hex digits of BLAKE3 of the cache dir, so
    two HOMEs of one user differ too. XDG variables that are not absolute paths are ignored,
    as the XDG spec says.
    """
    from pathlib import Path

    uid = os.getuid() if uid is None else uid
    home = functools.cache(lambda: _home(env, uid))
    cache_dir = _cache_dir(env, home)
    data_dir = os.path.join(_xdg_dir(env, "XDG_DATA_HOME", home, ".local/share"), "hostd")
    tag = _tag(cache_dir)
    shm_dir = os.path.join(shm_root, f"hostd-{uid}-{tag}") if os.path.isdir(shm_root) else None
    return DefaultPaths(
        cache_dir=Path(cache_dir),
        data_dir=Path(data_dir),
        socket=Path(_socket(env, uid, tag)),
        shm_dir=None if shm_dir is None else Path(shm_dir),
    )


def default_socket(
    env: Mapping[str, str], *, system_socket: str | os.PathLike[str] = SYSTEM_SOCKET
) -> str:
    """The socket a client command uses when given no --socket and no $HOSTD_SOCKET.

    The per-user default, unless nothing is there and the systemd unit's socket exists: a
    user on a host whose daemon runs under systemd reaches it without flags.
    """
    uid = os.getuid()
    own = _socket(env, uid, _tag(_cache_dir(env, functools.cache(lambda: _home(env, uid)))))
    if not os.path.exists(own) and _is_socket(system_socket):
        return os.fspath(system_socket)
    return own


def _cache_dir(env: Mapping[str, str], home: Callable[[], str]) -> str:
    return os.path.join(_xdg_dir(env, "XDG_CACHE_HOME", home, ".cache"), "hostd")


def _tag(cache_dir: str) -> str:
    """12 hex digits of BLAKE3 of the cache directory: the name of everything per user."""
    return blake3.blake3(os.fsencode(cache_dir)).hexdigest()[:12]


def _socket(env: Mapping[str, str], uid: int, tag: str) -> str:
    runtime = env.get("XDG_RUNTIME_DIR", "")
    if os.path.isabs(runtime):
        # tagged too: two HOMEs (two test runs) of one login share one XDG_RUNTIME_DIR
        return os.path.join(os.path.normpath(runtime), "hostd", f"hostd-{tag}.sock")
    return f"/tmp/hostd-{uid}-{tag}/hostd.sock"


def _is_socket(path: str | os.PathLike[str]) -> bool:
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return False


def _home(env: Mapping[str, str], uid: int) -> str:
    """$HOME, else the passwd entry's, normalized as a path (no trailing or doubled slash)."""
    home = env.get("HOME", "")
    if os.path.isabs(home):
        return os.path.normpath(home)
    try:
        return os.path.normpath(pwd.getpwuid(uid).pw_dir)
    except KeyError:
        raise ConfigError("HOME", f"not set, and uid {uid} has no passwd entry") from None


def _xdg_dir(env: Mapping[str, str], var: str, home: Callable[[], str], under_home: str) -> str:
    value = env.get(var, "")
    if os.path.isabs(value):
        return os.path.normpath(value)
    return os.path.join(home(), under_home)
