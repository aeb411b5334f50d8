"""Who may ask for what, and how many operations run at once: decisions, no I/O.

Every local API route belongs to one class of operation (docs/ARCHITECTURE.md, "Invariants"):
`restore` (restore, prefetch, snapshots, status, refs, inspect, ref history), `publish`
(publish, ref set), or `admin` (pin, unpin, gc, verify, rm, prune). `[access]` lists, per
class, the callers allowed: "uid:N", "gid:N" or "*" (config.py has already turned `user:NAME`
and `group:NAME` into ids). A caller matches a "gid:N" entry through its primary gid or any
supplementary group, as SO_PEERCRED and SO_PEERGROUPS gave them at connect. Root and the
daemon's own effective uid may always use every class: the daemon cannot be locked out of
itself by its config.

`Operations` counts the operations that do work, in total and per caller uid, against
`max_operations` and `max_operations_per_uid`. It is plain state changed only in synchronous
calls: the API takes a slot before the request body is read and gives it back in `finally`.

This module must not look anything up, read a file or a socket, or know about HTTP.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from hostd.caller import GONE, Caller
from hostd.config import ACCESS_CLASSES, AccessConfig
from hostd.errors import Busy, Forbidden

CLASSES = ACCESS_CLASSES
_WHAT = {
    "restore": "restore, prefetch, snapshots, status, refs, inspect and ref history",
    "publish": "publish and ref set",
    "admin": "pin, unpin, gc, verify, rm and prune",
}


def always_allowed(caller: Caller, euid: int) -> bool:
    """Root and the daemon's own user may use every class, whatever `[access]` says."""
    return caller.uid in (0, euid)


def matches(entry: str, caller: Caller) -> bool:
    """Whether one `[access]` entry ("*", "uid:N" or "gid:N") names this caller."""
    if entry == "*":
        return True
    kind, _, number = entry.partition(":")
    if kind == "uid":
        return caller.uid == int(number)
    if kind == "gid":
        return int(number) == caller.gid or int(number) in caller.groups
    raise ValueError(f"not a resolved [access] entry: {entry!r}")


def entries(access: AccessConfig, cls: str) -> tuple[str, ...]:
    if cls == "restore":
        return access.restore
    if cls == "publish":
        return access.publish
    if cls == "admin":
        return access.admin
    raise ValueError(f"no class of operation named {cls!r}")


def lists(access: AccessConfig, cls: str) -> tuple[bool, tuple[int, ...], tuple[int, ...]]:
    """Class `cls`'s entries as (whether "*" is one, the uids, the gids): what the native
    desk (native/desk.c) matches callers against, as `matches` does."""
    listed = entries(access, cls)
    ids: dict[str, list[int]] = {"uid": [], "gid": []}
    for e in listed:
        kind, _, number = e.partition(":")
        if e != "*" and kind not in ids:
            raise ValueError(f"not a resolved [access] entry: {e!r}")
        if e != "*":
            ids[kind].append(int(number))
    return "*" in listed, tuple(ids["uid"]), tuple(ids["gid"])


def allowed(access: AccessConfig, euid: int, caller: Caller, cls: str) -> bool:
    """Whether `caller` may use class `cls` under `access`, in a daemon running as `euid`."""
    listed = entries(access, cls)
    return always_allowed(caller, euid) or any(matches(e, caller) for e in listed)


def classes(access: AccessConfig, euid: int, caller: Caller) -> tuple[str, ...]:
    """Every class `caller` may use, in CLASSES order."""
    return tuple(c for c in CLASSES if allowed(access, euid, caller, c))


def check(access: AccessConfig, euid: int, caller: Caller, cls: str) -> None:
    """Raise Forbidden, naming the caller's uid and the class, unless the caller may use it."""
    if not allowed(access, euid, caller, cls):
        raise Forbidden(
            f"uid {caller.uid} may not use {cls} operations ({_WHAT[cls]}): "
            f"[access] {cls} in hostd's config does not list it"
        )


@dataclass(slots=True)
class Slot:
    """One operation's place under the caps, until it is released (once)."""

    uid: int
    released: bool = False


class Operations:
    """Operations that do work, counted in total and per caller uid, under the two caps."""

    def __init__(self) -> None:
        self.total = 0
        self.by_uid: Counter[int] = Counter()

    def __repr__(self) -> str:
        return f"Operations(total={self.total}, by_uid={dict(self.by_uid)})"

    def take(self, access: AccessConfig, uid: int) -> Slot:
        """A slot for one more operation of `uid`, or Busy naming the cap it would pass."""
        if self.total >= access.max_operations:
            raise Busy(
                f"{self.total} operations are running, the most hostd runs at once "
                f"([access] max_operations = {access.max_operations}); try again later"
            )
        if self.by_uid[uid] >= access.max_operations_per_uid:
            who = "callers whose process has exited have" if uid == GONE else f"uid {uid} has"
            raise Busy(
                f"{who} {self.by_uid[uid]} operations running, the most one caller "
                f"may ([access] max_operations_per_uid = {access.max_operations_per_uid}); "
                "try again when one has finished"
            )
        self.total += 1
        self.by_uid[uid] += 1
        return Slot(uid)

    def release(self, slot: Slot) -> None:
        if slot.released:
            return
        slot.released = True
        self.total -= 1
        self.by_uid[slot.uid] -= 1
        if self.by_uid[slot.uid] <= 0:
            del self.by_uid[slot.uid]
