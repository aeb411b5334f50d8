"""sd_notify client: tells systemd that hostd is ready, reloading or stopping; pets the watchdog.

Built from the environment systemd gives a `Type=notify` service: `NOTIFY_SOCKET` (a path,
or `@name` for the abstract namespace), `WATCHDOG_USEC` and `WATCHDOG_PID`. Each message is
one datagram on a fresh non-blocking AF_UNIX socket, so a send never blocks the event loop.

It must never raise and never fail the daemon: a supervisor that went away or a full queue
is logged at debug and the call returns False. Without `NOTIFY_SOCKET` every method is a
no-op. It does not schedule anything itself: the daemon's supervisor task calls `watchdog()`
every `watchdog_interval` seconds, and `ready()` again after a reload.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

log = logging.getLogger(__name__)


class Notifier:
    """Sends sd_notify messages to one address (None: disabled)."""

    def __init__(self, address: str | None, watchdog_usec: int | None = None) -> None:
        # `address` is a filesystem path, or starts with NUL for the abstract namespace.
        self._address = address
        self._watchdog_usec = watchdog_usec

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, *, pid: int | None = None) -> Notifier:
        """The notifier systemd's environment asks for; `pid` (default: ours) for WATCHDOG_PID."""
        env = os.environ if env is None else env
        raw = env.get("NOTIFY_SOCKET", "")
        address: str | None
        if raw.startswith("@") and len(raw) > 1:
            address = "\0" + raw[1:]
        elif raw.startswith("/"):
            address = raw
        else:
            if raw:  # vsock: and relative paths are not for us
                log.debug("sd_notify off: NOTIFY_SOCKET=%r is not a path or @name", raw)
            address = None
        return cls(address, _watchdog_usec(env, os.getpid() if pid is None else pid))

    @property
    def enabled(self) -> bool:
        return self._address is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between `watchdog()` calls: half of WatchdogSec, None when there is none."""
        if self._address is None or self._watchdog_usec is None:
            return None
        return self._watchdog_usec / 2_000_000

    def ready(self, status: str | None = None) -> bool:
        """Startup (or a reload) is finished: the socket accepts requests."""
        return self._send("READY=1", *_status(status))

    def status(self, text: str) -> bool:
        """A one-line status that `systemctl status` shows."""
        return self._send(*_status(text))

    def reloading(self, status: str | None = None) -> bool:
        """A reload started; `ready()` ends it. systemd wants the monotonic time with it."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self._send("RELOADING=1", f"MONOTONIC_USEC={usec}", *_status(status))

    def stopping(self, status: str | None = None) -> bool:
        """Shutdown started (draining in-flight work)."""
        return self._send("STOPPING=1", *_status(status))

    def watchdog(self) -> bool:
        """The daemon is alive: the loop got here."""
        return self._send("WATCHDOG=1")

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for `seconds` more before systemd's start, stop or reload timeout fires."""
        return self._send(f"EXTEND_TIMEOUT_USEC={max(0, int(seconds * 1_000_000))}")

    def _send(self, *assignments: str) -> bool:
        if self._address is None or not assignments:
            return False
        payload = "\n".join(assignments).encode("utf-8", "replace")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.setblocking(False)
                sock.sendto(payload, self._address)
        except OSError as e:
            log.debug("sd_notify to %r failed: %s", self._address, e)
            return False
        return True

    def __repr__(self) -> str:
        if self._address is None:
            return "Notifier(disabled)"
        shown = "@" + self._address[1:] if self._address.startswith("\0") else self._address
        return f"Notifier({shown!r}, watchdog_interval={self.watchdog_interval})"


def _status(text: str | None) -> tuple[str, ...]:
    # A newline would start another assignment (STATUS="x\nREADY=1"): keep it one line.
    if text is None:
        return ()
    return ("STATUS=" + " ".join(text.splitlines()),)


def _watchdog_usec(env: Mapping[str, str], pid: int) -> int | None:
    raw_usec = env.get("WATCHDOG_USEC", "")
    raw_pid = env.get("WATCHDOG_PID", "")
    try:
        usec = int(raw_usec)
        if raw_pid and int(raw_pid) != pid:
            return None  # the watchdog is meant for another process of ours (a parent)
    except ValueError:
        if raw_usec:
            log.debug("watchdog off: WATCHDOG_USEC=%r WATCHDOG_PID=%r", raw_usec, raw_pid)
        return None
    return usec if usec > 0 else None
