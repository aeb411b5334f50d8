"""Whose caps a caller's operations count against, when the process that connected is gone.

A caller whose connecting process has exited counts under one shared key (caller.GONE): a
child that connected and handed its socket on could otherwise be any of its user's
subordinate uids, each with caps of its own. The process's pid is free from then on, and
another process may be given it (a user forks round the pid space in a second or so): the
daemon must not take that process's namespace for the caller's. The pid is given here on
purpose, through ns_last_pid; the daemon runs as root, the caller as nobody, and the caps
are filled with a prefetch held at the origin's gate (test_access.held_prefetch).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from harness import ROOT, Hostd
from test_access import NOBODY, api, daemon, held_prefetch, work
from test_faults import wait_for

__all__ = ["work"]  # the fixture

# As nobody: connect from a child that exits at once, keep the socket and print the child's
# pid; then, for the ref read from stdin, send a prefetch and print the status and the first
# line of the answer; hold the connection until stdin closes.
_GONE_CALLER = r"""
import json, os, socket, sys
s = socket.socket(socket.AF_UNIX)
pid = os.fork()
if pid == 0:
    s.connect(sys.argv[1])
    os._exit(0)
os.waitpid(pid, 0)
print(pid, flush=True)
body = json.dumps({"ref": sys.stdin.readline().strip()}).encode()
s.sendall(b"POST /v1/prefetch HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
          b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
f = s.makefile("rb")
status, length = f.readline().split()[1].decode(), None
while line := f.readline().strip():
    name, _, value = line.partition(b":")
    if name.lower() == b"content-length":
        length = int(value)
first = f.readline() if length is None else f.read(length)
print(status, first.decode().strip(), flush=True)
sys.stdin.read()
"""


class GoneCaller:
    """nobody, on a socket its child connected before exiting."""

    def __init__(self, sock: Path) -> None:
        argv = [f"--reuid={NOBODY.pw_uid}", f"--regid={NOBODY.pw_gid}", "--clear-groups"]
        self.proc = subprocess.Popen(
            ["setpriv", *argv, sys.executable, "-c", _GONE_CALLER, str(sock)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.stdin, self.stdout = self.proc.stdin, self.proc.stdout
        self.connected_pid = int(self.stdout.readline())

    def send(self, ref: str) -> None:
        self.stdin.write(ref + "\n")
        self.stdin.flush()

    def answer(self) -> tuple[int, str]:
        status, _, first = self.stdout.readline().partition(" ")
        return int(status), first

    def close(self) -> None:
        self.stdin.close()
        self.proc.kill()
        self.proc.wait()
        self.stdout.close()


@contextmanager
def gone_caller(sock: Path) -> Iterator[GoneCaller]:
    caller = GoneCaller(sock)
    try:
        yield caller
    finally:
        caller.close()


@contextmanager
def process_with_pid(pid: int) -> Iterator[None]:
    """A root process in our own namespaces given `pid` (a pid that is free): the next pid is
    set through ns_last_pid, again should another process be given it first."""
    for _ in range(100):
        Path("/proc/sys/kernel/ns_last_pid").write_text(str(pid - 1))
        proc = subprocess.Popen(["sleep", "1000"])
        if proc.pid == pid:
            break
        proc.kill()
        proc.wait()
    else:
        raise AssertionError(f"pid {pid} could not be given to a new process")
    try:
        yield
    finally:
        proc.kill()
        proc.wait()


def in_flight(d: Hostd) -> int:
    return int(d.api("GET", "/v1/status")[1]["in_flight"])


def test_a_caller_whose_pid_went_to_another_process_still_counts_as_gone(work: Path) -> None:
    with (
        held_prefetch(work, {"max_operations_per_uid": 1}) as (d, _),
        gone_caller(d.socket) as holder,
        gone_caller(d.socket) as plain,
        gone_caller(d.socket) as reused,
    ):
        # the gone callers' one place is taken by a prefetch held at the gate
        holder.send("demo/held")
        wait_for("the gone caller's prefetch in flight", lambda: in_flight(d) == 2)
        plain.send("demo/cached")
        status, body = plain.answer()
        assert status == 503, body
        assert "callers whose process has exited" in json.loads(body)["message"]
        # the same, where the connecting process's pid now names another process
        with process_with_pid(reused.connected_pid):
            reused.send("demo/cached")
            status, body = reused.answer()
        assert status == 503, body
        assert "callers whose process has exited" in json.loads(body)["message"]


def test_a_refusal_names_the_operation_among_its_class(work: Path) -> None:
    with daemon(work / "d") as d:
        for path, body, cls, named in [
            ("/v1/rm", {"names": ["x/y"]}, "admin", "rm"),
            ("/v1/prune", {}, "admin", "prune"),
            ("/v1/ref/set", {"ref": "x/y", "snapshot": "0" * 64}, "publish", "ref set"),
        ]:
            status, out = api(d, "POST", path, body)
            assert status == 403, (path, out)
            assert f"may not use {cls} operations" in out["message"], out
            assert named in out["message"].partition("(")[2].partition(")")[0], out
