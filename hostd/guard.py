"""Connections that hold a place without asking anything: a deadline for each connection's
first request head, and caps on the connections open at once, per client and in all.

Both servers are open to parties we do not trust with our memory: the peer port to any host
that can reach it (the secret is checked per request, once a head has come), the local
socket to any local user `socket_mode` lets in. aiohttp serves a connection that sends
nothing, or a head a byte at a time, until its keep-alive timeout (before aiohttp 3.14, for
ever), and as many such connections as the process has descriptors (the unit gives it a
million): each one a descriptor, a protocol, a task and buffers.

`Guard.wrap` puts a thin protocol in front of aiohttp's, at the transport:

- a client (`client(transport)`: an address, a uid) with `per_client` connections open has
  its next one closed at once: counted in `refused`. A client None (root, the daemon's own
  uid) is never capped nor counted: others filling the total cannot lock it out;
- while `total` are open, a new connection displaces one of the client that has the most
  open, if that is more than one more than the newcomer's client has (its oldest that has
  not sent a head yet, else its oldest): counted in `displaced`. Otherwise (everyone holds
  about as many) it is closed, counted in `refused`. A flood from many addresses, each under
  its cap, then costs the flooders their own places, not a peer's first one: with plain
  refusal, 16 addresses at the per-host cap filled the peer port for every host;
- a connection whose first request head (up to its blank line; blank lines before it, which
  HTTP lets a client send, do not count) has not come whole within `head_timeout` is closed:
  counted in `timed_out`. Later heads on a kept-alive connection are aiohttp's (its
  keep-alive timeout; the caps bound them), as are those of a connection whose first
  request was answered before it came to aiohttp (`deadline=False`: the socket's desk).

Everything runs on the event loop: no locks.
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import logging
import time
from collections.abc import Callable, Hashable
from typing import Any, cast

log = logging.getLogger(__name__)

HEAD_TIMEOUT = 10.0  # a request head is a few hundred bytes: a client has this long to send it
_BLANK = b"\r\n\r\n"  # a head's end (aiohttp refuses bare LFs)
LOG_EVERY = 10.0  # seconds between warnings of refused connections
DISPLACE_SCAN = 16  # of a client's oldest connections, those looked at for one with no head


class Guard:
    """The caps and deadline of one server's connections (see the module's doc)."""

    def __init__(
        self, name: str, *, per_client: int, total: int, head_timeout: float = HEAD_TIMEOUT
    ) -> None:
        self.name = name
        self.per_client = per_client
        self.total = total
        self.head_timeout = head_timeout
        self.connections = 0  # all open
        self.refused = 0
        self.timed_out = 0
        self.displaced = 0
        # The connections open, by client, oldest first; the clients by how many they hold,
        # and the most any holds: the largest is found in O(1), a flood's every connection.
        self._conns: dict[Hashable, dict[_Guarded, None]] = {}
        self._holding: dict[int, dict[Hashable, None]] = {}
        self._most = 0
        self._warned = -LOG_EVERY  # when refusals were last logged

    def __repr__(self) -> str:
        return (
            f"Guard({self.name}: {self.connections} open, refused {self.refused}, "
            f"displaced {self.displaced}, timed out {self.timed_out})"
        )

    def wrap(
        self,
        factory: Callable[[], asyncio.Protocol],
        client: Callable[[asyncio.BaseTransport], Hashable | None],
        *,
        deadline: bool = True,
    ) -> Callable[[], asyncio.Protocol]:
        """A protocol factory for the server: `factory`'s protocols, behind the guard.
        `deadline`: whether the first head must come within `head_timeout`."""
        return lambda: _Guarded(self, factory(), client, deadline)

    @property
    def open(self) -> dict[Hashable, int]:
        """The connections open, by client."""
        return {key: len(conns) for key, conns in self._conns.items()}

    def _admit(self, conn: _Guarded, key: Hashable | None) -> bool:
        if key is None:
            return True
        mine = len(self._conns.get(key, ()))
        if mine >= self.per_client or (self.connections >= self.total and not self._displace(mine)):
            self.refused += 1
            self._warn("refused a connection from %s (%d open from it, %d in all)", key, mine)
            return False
        self.connections += 1
        self._conns.setdefault(key, {})[conn] = None
        self._move(key, mine, mine + 1)
        return True

    def _displace(self, mine: int) -> bool:
        """Close a connection of the client holding the most, if it holds more than one more
        than `mine`. Whether a place came free."""
        if self._most <= mine + 1:
            return False
        key = next(iter(self._holding[self._most]))
        conns = self._conns[key]
        first = itertools.islice(conns, DISPLACE_SCAN)
        victim = next((c for c in first if c.waiting), None) or next(iter(conns))
        self.displaced += 1
        self._warn("closed a connection of %s (%d open from it, %d in all)", key, len(conns))
        victim.close_displaced()
        return True

    def _warn(self, what: str, key: Hashable, held: int) -> None:
        now = time.monotonic()
        if now - self._warned >= LOG_EVERY:
            self._warned = now
            log.warning(
                "%s: " + what + " (%d refused, %d displaced so far)",
                self.name, key, held, self.connections, self.refused, self.displaced,
            )  # fmt: skip

    def _release(self, conn: _Guarded, key: Hashable | None) -> None:
        if key is None:
            return
        conns = self._conns[key]
        del conns[conn]
        self.connections -= 1
        self._move(key, len(conns) + 1, len(conns))
        if not conns:
            del self._conns[key]

    def _move(self, key: Hashable, held: int, holds: int) -> None:
        """`key` went from holding `held` connections to `holds` (one more or one fewer)."""
        if held:
            was = self._holding[held]
            del was[key]
            if not was:
                del self._holding[held]
                if self._most == held:
                    self._most = holds  # (it alone held the most: now it holds one fewer)
        if holds:
            self._holding.setdefault(holds, {})[key] = None
            self._most = max(self._most, holds)


class _Guarded(asyncio.Protocol):
    """aiohttp's protocol `inner`, told of everything once the guard let the connection in."""

    def __init__(
        self,
        guard: Guard,
        inner: asyncio.Protocol,
        client: Callable[[asyncio.BaseTransport], Hashable | None],
        deadline: bool,
    ) -> None:
        self._guard = guard
        self._inner = inner
        self._client = client
        self._deadline = deadline
        self._admitted = False  # aiohttp's protocol was told of the connection
        self._counted = False  # the guard counts it among its client's
        self._key: Hashable | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._began = False  # a byte of the first head came (blank lines before it aside)
        self._tail = b""  # the last bytes of the first head so far (its end may straddle)
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # a stream's: it can abort
        try:
            self._key = self._client(transport)
        except OSError:
            self._key = None
        if not self._guard._admit(self, self._key):
            self._transport.abort()  # (connection_lost still comes: it must not reach aiohttp)
            return
        self._counted = self._key is not None
        self._admitted = True
        if self._deadline:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(self._guard.head_timeout, self._late)
        self._inner.connection_made(transport)

    @property
    def waiting(self) -> bool:
        """Whether its first head is still awaited."""
        return self._timer is not None

    def close_displaced(self) -> None:
        """Closed to make room (Guard._displace): its place is free from now."""
        self._uncount()
        assert self._transport is not None
        self._transport.abort()

    def _uncount(self) -> None:
        if self._counted:
            self._counted = False
            self._guard._release(self, self._key)

    def _late(self) -> None:
        self._timer = None
        self._guard.timed_out += 1
        assert self._transport is not None
        self._transport.abort()

    def data_received(self, data: bytes) -> None:
        if self._timer is not None:
            head = data
            if not self._began:
                head = data.lstrip(b"\r\n")
                self._began = bool(head)
            seen = self._tail + head
            if _BLANK in seen:
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
        self._uncount()
        if not self._admitted:
            return
        self._admitted = False
        self._inner.connection_lost(exc)


def address_of(transport: asyncio.BaseTransport) -> Hashable | None:
    """A TCP client's key: its address (an IPv4-mapped IPv6 one as IPv4). Not an IPv6 /64:
    many hosts of a data centre share one."""
    peer: Any = transport.get_extra_info("peername")
    if not peer:
        return None
    try:
        ip = ipaddress.ip_address(str(peer[0]).split("%")[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)
