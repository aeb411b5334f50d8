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
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import blake3

from hostd.errors import ConfigError

SYSTEM_SOCKET = Path("/run/hostd/hostd.sock")
DEFAULT_SHM_ROOT = Path("/dev/shm")


@dataclass(frozen=True)
class DefaultPaths:
    """Where a daemon with no config keeps things, for the user and environment given."""

    cache_dir: Path
    data_dir: Path
    socket: Path
    shm_dir: Path | None


def default_paths(
    env: Mapping[str, str], *, uid: int | None = None, shm_root: Path = DEFAULT_SHM_ROOT
) -> DefaultPaths:
    """The per-user paths of docs/ARCHITECTURE.md, "Config", named after the cache directory.

    cache_dir = $XDG_CACHE_HOME/hostd or $HOME/.cache/hostd; data_dir likewise with
    $XDG_DATA_HOME and .local/share; socket = $XDG_RUNTIME_DIR/hostd/hostd-<tag>.sock or
    /tmp/hostd-<uid>-<tag>/hostd.sock; shm_dir = <shm_root>/hostd-<uid>-<tag> where shm_root
    is a directory, else None. <tag> is the first 12 hex digits of BLAKE3 of the cache dir, so
    two HOMEs of one user differ too. XDG variables that are not absolute paths are ignored,
    as the XDG spec says.
    """
    uid = os.getuid() if uid is None else uid
    home = functools.cache(lambda: _home(env, uid))
    cache_dir = _xdg_dir(env, "XDG_CACHE_HOME", home, ".cache") / "hostd"
    data_dir = _xdg_dir(env, "XDG_DATA_HOME", home, ".local/share") / "hostd"
    tag = blake3.blake3(os.fsencode(str(cache_dir))).hexdigest()[:12]
    runtime = env.get("XDG_RUNTIME_DIR", "")
    if os.path.isabs(runtime):
        # tagged too: two HOMEs (two test runs) of one login share one XDG_RUNTIME_DIR
        socket = Path(os.path.normpath(runtime)) / "hostd" / f"hostd-{tag}.sock"
    else:
        socket = Path(f"/tmp/hostd-{uid}-{tag}/hostd.sock")
    shm_dir = shm_root / f"hostd-{uid}-{tag}" if shm_root.is_dir() else None
    return DefaultPaths(cache_dir=cache_dir, data_dir=data_dir, socket=socket, shm_dir=shm_dir)


def default_socket(env: Mapping[str, str], *, system_socket: Path = SYSTEM_SOCKET) -> Path:
    """The socket a client command uses when given no --socket and no $HOSTD_SOCKET.

    The per-user default, unless nothing is there and the systemd unit's socket exists: a
    user on a host whose daemon runs under systemd reaches it without flags.
    """
    own = default_paths(env).socket
    if not os.path.exists(own) and _is_socket(system_socket):
        return system_socket
    return own


def _is_socket(path: Path) -> bool:
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return False


def _home(env: Mapping[str, str], uid: int) -> Path:
    home = env.get("HOME", "")
    if os.path.isabs(home):
        return Path(os.path.normpath(home))
    try:
        return Path(pwd.getpwuid(uid).pw_dir)
    except KeyError:
        raise ConfigError("HOME", f"not set, and uid {uid} has no passwd entry") from None


def _xdg_dir(env: Mapping[str, str], var: str, home: Callable[[], Path], under_home: str) -> Path:
    value = env.get(var, "")
    if os.path.isabs(value):
        return Path(os.path.normpath(value))
    return home() / under_home
