"""Connections that hold a place without asking anything: a deadline for each connection's
first request head, and caps on the connections open at once, per client and in all.

Both servers are open to parties we do not trust with our memory: the peer port to any host
that can reach it (the secret is checked per request, once a head has come), the local
socket to any local user `socket_mode` lets in. aiohttp serves a connection that sends
nothing, or a head a byte at a time, until its keep-alive timeout (before aiohttp 3.14, for
ever), and as many such connections as the process has descriptors (the unit gives it a
million): each one a descriptor, a protocol, a task and buffers.

`Guard.wrap` puts a thin protocol in front of aiohttp's, at the transport:

- a client (`client(transport)`: an address, a uid; None for one that is never capped) with
  `per_client` connections open has its next one closed at once, as has anyone while `total`
  are open: counted in `refused`;
- a connection whose first request head (up to its blank line) has not come whole within
  `head_timeout` is closed: counted in `timed_out`. Later heads on a kept-alive connection
  are aiohttp's (its keep-alive timeout; the caps bound them).

Everything runs on the event loop: no locks.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections import Counter
from collections.abc import Callable, Hashable
from typing import Any, cast

log = logging.getLogger(__name__)

HEAD_TIMEOUT = 10.0  # a request head is a few hundred bytes: a client has this long to send it
_BLANK = (b"\r\n\r\n", b"\n\n")  # a head's end (aiohttp takes bare LFs too)


class Guard:
    """The caps and deadline of one server's connections (see the module's doc)."""

    def __init__(
        self, name: str, *, per_client: int, total: int, head_timeout: float = HEAD_TIMEOUT
    ) -> None:
        self.name = name
        self.per_client = per_client
        self.total = total
        self.head_timeout = head_timeout
        self.open: Counter[Hashable] = Counter()  # connections open, by client
        self.connections = 0  # all open
        self.refused = 0
        self.timed_out = 0

    def __repr__(self) -> str:
        return (
            f"Guard({self.name}: {self.connections} open, refused {self.refused}, "
            f"timed out {self.timed_out})"
        )

    def wrap(
        self,
        factory: Callable[[], asyncio.Protocol],
        client: Callable[[asyncio.BaseTransport], Hashable | None],
    ) -> Callable[[], asyncio.Protocol]:
        """A protocol factory for the server: `factory`'s protocols, behind the guard."""
        return lambda: _Guarded(self, factory(), client)

    def _admit(self, key: Hashable | None) -> bool:
        if self.connections >= self.total:
            return False
        if key is not None and self.open[key] >= self.per_client:
            return False
        self.connections += 1
        if key is not None:
            self.open[key] += 1
        return True

    def _release(self, key: Hashable | None) -> None:
        self.connections -= 1
        if key is not None:
            self.open[key] -= 1
            if self.open[key] <= 0:
                del self.open[key]


class _Guarded(asyncio.Protocol):
    """aiohttp's protocol `inner`, told of everything once the guard let the connection in."""

    def __init__(
        self,
        guard: Guard,
        inner: asyncio.Protocol,
        client: Callable[[asyncio.BaseTransport], Hashable | None],
    ) -> None:
        self._guard = guard
        self._inner = inner
        self._client = client
        self._admitted = False
        self._key: Hashable | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._tail = b""  # the last bytes of the first head so far (its end may straddle)
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # a stream's: it can abort
        try:
            self._key = self._client(transport)
        except OSError:
            self._key = None
        if not self._guard._admit(self._key):
            self._guard.refused += 1
            if self._guard.refused & (self._guard.refused - 1) == 0:  # 1, 2, 4, 8...
                log.warning(
                    "%s: refused a connection from %s (%d open from it, %d in all; %d refused)",
                    self._guard.name,
                    self._key,
                    self._guard.open[self._key] if self._key is not None else 0,
                    self._guard.connections,
                    self._guard.refused,
                )
            self._transport.abort()  # (connection_lost still comes: it must not reach aiohttp)
            return
        self._admitted = True
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self._guard.head_timeout, self._late)
        self._inner.connection_made(transport)

    def _late(self) -> None:
        self._timer = None
        self._guard.timed_out += 1
        assert self._transport is not None
        self._transport.abort()

    def data_received(self, data: bytes) -> None:
        if self._timer is not None:
            seen = self._tail + data
            if any(end in seen for end in _BLANK):
                self._timer.cancel()
                self._timer = None
                self._tail = b""
            else:
                self._tail = seen[-3:]
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._admitted else None

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._admitted:
            return
        self._admitted = False
        self._guard._release(self._key)
        self._inner.connection_lost(exc)


def address_of(transport: asyncio.BaseTransport) -> Hashable | None:
    """A TCP client's key: its IPv4 address, or its IPv6 address's /64 (one host is given a
    whole /64 to pick addresses from)."""
    peer: Any = transport.get_extra_info("peername")
    if not peer:
        return None
    try:
        ip = ipaddress.ip_address(str(peer[0]).split("%")[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)
