"""The peers a host knows and what it thinks of each: pure state, every change given `now`.

A member is named as the membership lists it ("10.0.0.12:7460"); that name is also its key
for rendezvous hashing, so hosts that list the same peers agree on owners. States:

- live: usable (a new member is live until a request or probe says otherwise);
- dead: a request or probe could not reach it (or the probe's answer was no health
  answer); probed again after a backoff that doubles from 1 s to 60 s, live again at the
  first answer;
- rejecting: it answered 401 to our proof (another secret, or clocks apart); probed again
  with the same backoff;
- struck: it sent bytes that did not verify, or stalled, or took pull-throughs and sent
  nothing; skipped until the strike ends (30 s, doubling per strike within 10 minutes, at
  most 10 minutes), then live again;
- self: this host itself, under the name the others use for it; never asked.

Only live members (and self) take part in placement. No state is shared with other hosts.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

BACKOFF_MIN = 1.0
BACKOFF_MAX = 60.0
STRIKE_BASE = 30.0
STRIKE_MAX = 600.0
# Chunk requests in a row that a member took (200) and then did not serve (nothing sent for
# the pull wait, or hung up on after the timeout), with no chunk served between, before it
# is struck: one is a slow origin's; two in a row, a member that says yes to everything and
# delivers nothing.
SILENT_STRIKE = 2
# A member that answers 409 "self" (which our own server answers a request from us) is
# probed again, at most this often: only a probe that reaches our own server makes it self.
SELF_REPROBE = 10.0


class State(enum.Enum):
    LIVE = "live"
    DEAD = "dead"
    REJECTING = "rejecting"
    STRUCK = "struck"
    SELF = "self"


@dataclass(slots=True)
class Member:
    name: str
    found_by: str  # "static" or "dns"
    since: float
    state: State = State.LIVE
    failures: int = 0  # in a row, for the backoff
    retry_at: float = 0.0
    strikes: int = 0
    struck_at: float = 0.0
    struck_until: float = 0.0
    last_error: str = ""
    silent: int = 0  # chunk requests in a row taken (200) and then not served (SILENT_STRIKE)
    node: str = ""  # its node id, once a probe has answered
    probed: bool = False
    probed_at: float = float("-inf")  # when a probe of it last began
    served_at: float = float("-inf")  # when it last served us a chunk

    def to_json(self, now: float) -> dict[str, Any]:
        out: dict[str, Any] = {
            "address": self.name,
            "state": self.state.value,
            "for_s": round(max(0.0, now - self.since), 3),  # seconds in this state
            "found_by": self.found_by,
            "strikes": self.strikes,
        }
        if self.node:
            out["node"] = self.node
        if self.last_error:
            out["last_error"] = self.last_error
        if self.state in (State.DEAD, State.REJECTING):
            out["retry_in"] = round(max(0.0, self.retry_at - now), 3)
        if self.state is State.STRUCK:
            out["struck_for"] = round(max(0.0, self.struck_until - now), 3)
        return out


def _backoff(n: int, base: float, cap: float) -> float:
    return float(min(cap, base * 2.0 ** min(max(n - 1, 0), 30)))


class Roster:
    """Every member by name, and the transitions between states."""

    def __init__(self) -> None:
        self.members: dict[str, Member] = {}
        # Bumped whenever the set of usable members may have changed: placement is
        # recomputed only then.
        self.version = 0
        self._next_expiry = float("inf")  # the earliest end of a strike

    def __repr__(self) -> str:
        counts: dict[str, int] = {}
        for m in self.members.values():
            counts[m.state.value] = counts.get(m.state.value, 0) + 1
        return f"Roster({counts})"

    @property
    def self_name(self) -> str | None:
        for m in self.members.values():
            if m.state is State.SELF:
                return m.name
        return None

    def update(self, listed: Mapping[str, str], now: float) -> tuple[list[str], list[str]]:
        """Take the names now listed (name -> "static" or "dns"); return (added, removed).
        Members that stay keep their state."""
        added = [n for n in listed if n not in self.members]
        removed = [n for n in self.members if n not in listed]
        for n in removed:
            del self.members[n]
        for n in added:
            self.members[n] = Member(n, listed[n], now)
        if added or removed:
            self.version += 1
        return added, removed

    def get(self, name: str) -> Member | None:
        return self.members.get(name)

    def _expire(self, m: Member, now: float) -> None:
        if m.state is State.STRUCK and now >= m.struck_until:
            self._set(m, State.LIVE, now)

    def _set(self, m: Member, state: State, now: float) -> None:
        if m.state is not state:
            m.state, m.since = state, now
            self.version += 1

    def tick(self, now: float) -> None:
        """End the strikes that ran out by `now` (cheap when none has)."""
        if now < self._next_expiry:
            return
        self._next_expiry = float("inf")
        for m in self.members.values():
            self._expire(m, now)
            if m.state is State.STRUCK:
                self._next_expiry = min(self._next_expiry, m.struck_until)

    def usable(self, now: float) -> list[Member]:
        """Members that may be asked for chunks now: live ones (a strike that ran out ends)."""
        self.tick(now)
        return [m for m in self.members.values() if m.state is State.LIVE]

    def placement(self, now: float) -> list[str]:
        """The names chunks are placed over: the usable members plus self, when known."""
        names = [m.name for m in self.usable(now)]
        me = self.self_name
        if me is not None:
            names.append(me)
        return names

    def due(self, now: float) -> list[Member]:
        """Members to probe now: never probed yet, or dead/rejecting with the backoff run out."""
        return [
            m
            for m in self.members.values()
            if m.state is not State.SELF
            and (not m.probed or (m.state in (State.DEAD, State.REJECTING) and m.retry_at <= now))
        ]

    def next_due(self) -> float | None:
        times = [
            m.retry_at for m in self.members.values() if m.state in (State.DEAD, State.REJECTING)
        ]
        return min(times) if times else None

    # transitions ----------------------------------------------------------------------------
    def answered(self, name: str, now: float, node: str = "", *, served: bool = False) -> None:
        """A probe or request got a proper answer: dead and rejecting members are live again.
        `served`: the answer was a chunk, verified: only that forgives silent pull-throughs
        (a member that answers probes, or says "missing" to some chunks, while it takes the
        others and hangs up, is counted all the same)."""
        m = self.members.get(name)
        if m is None:
            return
        m.probed = True
        if node:
            m.node = node
        m.failures = 0
        if served:
            m.silent = 0
            m.served_at = now
        if m.state in (State.DEAD, State.REJECTING):
            self._set(m, State.LIVE, now)
            m.last_error = ""

    def failed(self, name: str, now: float, why: str) -> None:
        """It could not be reached (refused, reset, unreachable, no answer to a probe)."""
        self._back_off(name, now, why, State.DEAD)

    def rejected(self, name: str, now: float, why: str) -> None:
        """It answered 401 to our proof."""
        self._back_off(name, now, why, State.REJECTING)

    def _back_off(self, name: str, now: float, why: str, state: State) -> None:
        m = self.members.get(name)
        if m is None or m.state is State.SELF:
            return
        m.probed = True
        m.failures += 1
        m.retry_at = now + _backoff(m.failures, BACKOFF_MIN, BACKOFF_MAX)
        m.last_error = why
        self._set(m, state, now)

    def reprobe(self, name: str, now: float) -> bool:
        """Probe it again soon (it said something only a probe can settle), unless one began
        within SELF_REPROBE: whether it will be."""
        m = self.members.get(name)
        if m is None or m.state is State.SELF or now - m.probed_at < SELF_REPROBE:
            return False
        m.probed = False
        return True

    def probe_soon(self, name: str) -> bool:
        """Probe a dead or rejecting member in the prober's next round, its backoff aside
        (it asked us something: it may be back). Whether it will be."""
        m = self.members.get(name)
        if m is None or m.state not in (State.DEAD, State.REJECTING) or not m.probed:
            return False
        m.probed = False
        return True

    def silent_pull(self, name: str, now: float, why: str) -> bool:
        """It took a chunk request and did not serve it (nothing for the pull wait, or hung
        up after the timeout). Whether that struck it (SILENT_STRIKE in a row)."""
        m = self.members.get(name)
        if m is None or m.state is State.SELF:
            return False
        m.last_error = why
        if m.state is State.STRUCK and now < m.struck_until:
            return False  # the requests in flight when it went bad: one strike, not one each
        m.silent += 1
        if m.silent < SILENT_STRIKE:
            return False
        m.silent = 0
        return self.strike(name, now, why)

    def strike(self, name: str, now: float, why: str) -> bool:
        """It sent bytes that did not verify, or stalled: skip it for a while. Whether that
        was a new strike."""
        m = self.members.get(name)
        if m is None or m.state is State.SELF:
            return False
        m.probed = True
        if m.state is State.STRUCK and now < m.struck_until:
            m.last_error = why  # the requests in flight when it went bad: one strike, not one each
            return False
        if now - m.struck_at > STRIKE_MAX:
            m.strikes = 0  # an old strike is forgiven
        m.strikes += 1
        m.struck_at = now
        m.struck_until = now + _backoff(m.strikes, STRIKE_BASE, STRIKE_MAX)
        self._next_expiry = min(self._next_expiry, m.struck_until)
        m.last_error = why
        self._set(m, State.STRUCK, now)
        return True

    def mark_self(self, name: str, now: float) -> None:
        m = self.members.get(name)
        if m is not None and m.state is not State.SELF:
            self._set(m, State.SELF, now)
            m.probed, m.last_error = True, ""

    def counts(self) -> dict[str, int]:
        out = {s.value: 0 for s in State}
        for m in self.members.values():
            out[m.state.value] += 1
        return out

    def to_json(self, now: float, names: Iterable[str] | None = None) -> list[dict[str, Any]]:
        chosen = self.members.values() if names is None else (self.members[n] for n in names)
        return [m.to_json(now) for m in sorted(chosen, key=lambda m: m.name)]
