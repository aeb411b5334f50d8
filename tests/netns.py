"""Several real "hosts" on one machine, as Linux network namespaces, for tests and benches.

A `Cluster` builds one namespace per host (`h0`, `h1`, ...) and one for the `origin`, each with
`lo` and an `eth0` veth whose other end is a port of a Linux bridge in a "switch" namespace.
Every link is shaped with tc in both directions (egress of `eth0` is the node's upload, egress
of its switch port the node's download), so N hosts pulling from one origin really share the
origin's link. Faults are real too: `partition` disables a node's switch port, so every frame
to and from it is dropped silently (with static ARP entries everywhere, connections hang: no
RST, no EHOSTUNREACH), `block` adds an `unreachable` route in one node so that its connects
to another fail at once with EHOSTUNREACH.

What it must not do: create or change anything in the machine's own (root) namespace; kill a
process that does not live in one of its own namespaces; sleep for a fixed time (every wait
polls against a deadline). Stdlib only: bench scripts import it with tests/ on sys.path.

Names are `hd<pid>x<k>-<node>` (`-sw` for the switch); the pid makes the leftovers of a
crashed run recognisable (its pid is gone) and `k`, claimed atomically by creating the
switch namespace, picks the cluster's subnet 10.<200+k>.0.0/24. Clusters of different
processes may share a subnet: their namespaces never meet, so that is harmless.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any

ORIGIN = "origin"
_NETNS_DIR = Path("/run/netns")
_NAME = re.compile(r"^hd(?P<pid>\d+)x(?P<k>\d+|p)-(?P<node>sw|origin|h\d+|probe\d+)$")
_MAX_CLUSTERS = 55  # second octet 200..254
_CLONE_NEWNET = 0x40000000
# tbf per link direction. The burst holds a few 64 KiB GSO super-packets (veth passes them
# whole), so one TCP flow reaches the rate; the latency caps the queue at rate x 20 ms.
_BURST = "256k"
_LATENCY = "20ms"


class NetnsError(RuntimeError):
    """A namespace, link or qdisc could not be set up or changed; names the command."""


def _cmd(
    argv: list[str], *, check: bool = True, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(argv, input=stdin, capture_output=True, text=True, check=False)
    if check and p.returncode != 0:
        raise NetnsError(f"{' '.join(argv)}: exit {p.returncode}: {p.stderr.strip()}")
    return p


def _list_netns() -> list[str]:
    try:
        return sorted(os.listdir(_NETNS_DIR))
    except FileNotFoundError:
        return []


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _tbf(rate: str) -> list[str]:
    return ["tbf", "rate", rate, "burst", _BURST, "latency", _LATENCY]


def _kill_and_delete(ns: str) -> str | None:
    """SIGKILL every process whose network namespace is `ns`, delete `ns`; why not, or None."""
    pids = _cmd(["ip", "netns", "pids", ns], check=False).stdout.split()
    for pid in pids:
        if int(pid) == os.getpid():  # never, but never ourselves either
            continue
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)
    p = _cmd(["ip", "netns", "del", ns], check=False)
    return None if p.returncode == 0 else f"ip netns del {ns}: {p.stderr.strip()}"


def sweep_stale() -> list[str]:
    """Delete the namespaces left by dead processes (their pid is gone); returns their names."""
    swept = []
    names = _list_netns()
    # hosts before their switch, as close() does
    for ns in sorted(names, key=lambda n: n.endswith("-sw")):
        m = _NAME.match(ns)
        if m and not _pid_alive(int(m["pid"])):
            _kill_and_delete(ns)
            swept.append(ns)
    return swept


def netns_problem() -> str | None:
    """Why a Cluster cannot be built here (not root, no iproute2, no veth/bridge/tbf), or None."""
    if os.geteuid() != 0:
        return f"network namespaces need root (euid is {os.geteuid()})"
    for tool in ("ip", "tc", "bridge"):
        if shutil.which(tool) is None:
            return f"`{tool}` (iproute2) is not on PATH"
    probe = f"hd{os.getpid()}xp-probe{threading.get_native_id()}"
    p = _cmd(["ip", "netns", "add", probe], check=False)
    if p.returncode != 0:
        return f"`ip netns add` fails: {p.stderr.strip()}"
    ip, tc = ["ip", "-n", probe], ["tc", "-n", probe]
    try:
        for argv in [
            [*ip, "link", "add", "va", "type", "veth", "peer", "name", "vb"],
            [*ip, "link", "add", "br0", "type", "bridge"],
            [*ip, "link", "set", "va", "master", "br0", "up"],
            [*tc, "qdisc", "add", "dev", "va", "root", *_tbf("1gbit")],
            ["bridge", "-n", probe, "link", "set", "dev", "va", "state", "0"],
        ]:
            p = _cmd(argv, check=False)
            if p.returncode != 0:
                return f"`{' '.join(argv)}` fails: {p.stderr.strip()}"
    finally:
        _cmd(["ip", "netns", "del", probe], check=False)
    return None


def require_netns() -> None:
    """Skip the calling test where namespaces cannot be used; in CI (CI=true) fail instead."""
    import pytest

    problem = netns_problem()
    if problem is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"network namespaces unusable in CI: {problem}")
    pytest.skip(f"network namespaces unusable: {problem}")


def _socket_in(ns_path: str, family: int, kind: int) -> socket.socket:
    """A socket created inside the network namespace at `ns_path`.

    setns() moves only the calling thread, so a short-lived thread enters the namespace,
    makes the socket and exits; a socket stays in the namespace it was made in.
    """
    out: list[socket.socket] = []
    err: list[BaseException] = []

    def enter_and_make() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(ns_path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if int(libc.setns(fd, _CLONE_NEWNET)) != 0:
                    e = ctypes.get_errno()
                    raise OSError(e, f"setns({ns_path}): {os.strerror(e)}")
            finally:
                os.close(fd)
            out.append(socket.socket(family, kind))
        except BaseException as e:
            err.append(e)

    t = threading.Thread(target=enter_and_make, name="netns-socket")
    t.start()
    t.join()
    if err:
        raise err[0]
    return out[0]


class Cluster:
    """Hosts h0..h{n-1} and an origin on one bridge, each link shaped; see the module doc.

    `host_rate`/`origin_rate` are tc rates ("1gbit", "400mbit"), None for unshaped; `delay`
    ("1ms") adds netem delay to what every node sends, so a round trip between two nodes
    takes 2 x delay (needs sch_netem). Use as a context manager; `close()` also runs at exit.
    """

    def __init__(
        self,
        hosts: int = 4,
        *,
        host_rate: str | None = "1gbit",
        origin_rate: str | None = "400mbit",
        delay: str | None = None,
    ) -> None:
        if not 1 <= hosts <= 200:
            raise ValueError(f"hosts must be 1..200, not {hosts}")
        self._hosts = [f"h{i}" for i in range(hosts)]
        self.host_rate = host_rate
        self.origin_rate = origin_rate
        self.delay = delay
        self._procs: list[subprocess.Popen[Any]] = []
        self._partitioned: set[str] = set()
        self._blocked: set[tuple[str, str]] = set()
        self._made: list[str] = []
        self._closed = False
        self._owner = os.getpid()
        sweep_stale()
        self._k = self._claim()
        self.prefix = f"hd{os.getpid()}x{self._k}"
        self.subnet = f"10.{200 + self._k}.0.0/24"
        self._made.append(self.ns("sw"))
        atexit.register(self.close)
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    # -- building -------------------------------------------------------------------------

    def _claim(self) -> int:
        """Claim the first free k by creating its switch namespace (atomic: EEXIST if taken)."""
        pid = os.getpid()
        for k in range(_MAX_CLUSTERS):
            p = _cmd(["ip", "netns", "add", f"hd{pid}x{k}-sw"], check=False)
            if p.returncode == 0:
                # A host namespace of this k without its switch is debris of a close()
                # that failed half way (the switch goes last): nobody owns it.
                for ns in _list_netns():
                    m = _NAME.match(ns)
                    if m and int(m["pid"]) == pid and m["k"] == str(k) and m["node"] != "sw":
                        _kill_and_delete(ns)
                return k
            if "exists" not in p.stderr:
                raise NetnsError(f"ip netns add hd{pid}x{k}-sw: {p.stderr.strip()}")
        raise NetnsError(f"all {_MAX_CLUSTERS} cluster slots of pid {pid} are in use")

    def _build(self) -> None:
        sw = self.ns("sw")
        _cmd(["ip", "-n", sw, "link", "add", "br0", "type", "bridge"])
        _cmd(["ip", "-n", sw, "link", "set", "br0", "addrgenmode", "none", "up"])
        for node in self.names:
            ns, port = self.ns(node), self._port(node)
            _cmd(["ip", "netns", "add", ns])
            self._made.append(ns)
            veth = ["type", "veth", "peer", "name", "eth0", "address", self._mac(node)]
            _cmd(["ip", "-n", sw, "link", "add", port, *veth, "netns", ns])
            # addrgenmode none: no IPv6 link-local address, so no DAD/MLD chatter that
            # would show in the byte counters.
            _cmd(["ip", "-n", sw, "link", "set", port, "master", "br0", "addrgenmode", "none"])
            _cmd(["ip", "-n", sw, "link", "set", port, "up"])
            _cmd(["ip", "-n", ns, "link", "set", "lo", "up"])
            _cmd(["ip", "-n", ns, "addr", "add", f"{self.addr(node)}/24", "dev", "eth0"])
            _cmd(["ip", "-n", ns, "link", "set", "eth0", "addrgenmode", "none"])
            _cmd(["ip", "-n", ns, "link", "set", "eth0", "up"])
            rate = self.origin_rate if node == ORIGIN else self.host_rate
            self._shape(ns, "eth0", rate, self.delay)  # upload
            self._shape(sw, port, rate, None)  # download
        # Static ARP: a partitioned node must not turn into a failed neighbour (that makes
        # connects fail with EHOSTUNREACH after ~3 s instead of hanging); no ARP traffic.
        for node in self.names:
            batch = [
                f"neigh replace {self.addr(o)} lladdr {self._mac(o)} dev eth0 nud permanent"
                for o in self.names
                if o != node
            ]
            _cmd(["ip", "-n", self.ns(node), "-batch", "-"], stdin="\n".join(batch) + "\n")

    @staticmethod
    def _shape(ns: str, dev: str, rate: str | None, delay: str | None) -> None:
        """tbf at `rate` (None: unshaped) on dev's egress; netem `delay` under or instead of it."""
        tc = ["tc", "-n", ns, "qdisc", "add", "dev", dev]
        if rate is not None:
            _cmd([*tc, "root", "handle", "1:", *_tbf(rate)])
        if delay is not None:
            where = ["parent", "1:1", "handle", "10:"] if rate is not None else ["root"]
            p = _cmd([*tc, *where, "netem", "delay", delay, "limit", "100000"], check=False)
            if p.returncode != 0:
                raise NetnsError(f"delay={delay!r} needs netem (sch_netem): {p.stderr.strip()}")

    def _mac(self, name: str) -> str:
        """eth0's MAC: locally administered, from the address (02:00:0a:c8:00:0a = 10.200.0.10)."""
        return "02:00:" + ":".join(f"{int(b):02x}" for b in self.addr(name).split("."))

    @staticmethod
    def _port(node: str) -> str:
        return f"p-{node}"  # in the switch namespace; at most 15 chars for h0..h199

    # -- names and addresses --------------------------------------------------------------

    @property
    def hosts(self) -> list[str]:
        return list(self._hosts)

    @property
    def names(self) -> list[str]:
        """Every node: the hosts, then the origin."""
        return [*self._hosts, ORIGIN]

    def ns(self, name: str) -> str:
        """The namespace name of a node ("h0".., "origin"; "sw" for the switch)."""
        if name != "sw" and name not in self.names:
            raise KeyError(f"no node {name!r} in {self!r}")
        return f"{self.prefix}-{name}"

    def addr(self, name: str) -> str:
        """The IPv4 address of a node's eth0."""
        if name not in self.names:
            raise KeyError(f"no node {name!r} in {self!r}")
        last = 2 if name == ORIGIN else 10 + self._hosts.index(name)
        return f"10.{200 + self._k}.0.{last}"

    # -- processes and sockets ------------------------------------------------------------

    def popen(self, name: str, argv: list[str], **kw: Any) -> subprocess.Popen[Any]:
        """Start argv inside a node's namespace; close() kills and reaps it if still running."""
        p: subprocess.Popen[Any] = subprocess.Popen(
            ["ip", "netns", "exec", self.ns(name), *argv], **kw
        )
        self._procs.append(p)
        return p

    def run(self, name: str, argv: list[str], **kw: Any) -> subprocess.CompletedProcess[Any]:
        """Run argv inside a node's namespace: check=True and output captured by default."""
        kw.setdefault("check", True)
        if "stdout" not in kw and "stderr" not in kw:
            kw.setdefault("capture_output", True)
        return subprocess.run(["ip", "netns", "exec", self.ns(name), *argv], **kw)

    def socket(
        self, name: str, family: int = socket.AF_INET, kind: int = socket.SOCK_STREAM
    ) -> socket.socket:
        """A socket of this process that lives in a node's namespace (connect/bind from there)."""
        return _socket_in(str(_NETNS_DIR / self.ns(name)), family, kind)

    # -- counters -------------------------------------------------------------------------

    def _stats(self, name: str) -> dict[str, Any]:
        p = _cmd(["ip", "-n", self.ns(name), "-j", "-s", "link", "show", "dev", "eth0"])
        stats: dict[str, Any] = json.loads(p.stdout)[0]["stats64"]
        return stats

    def tx_bytes(self, name: str) -> int:
        """Bytes sent by the node's eth0 (its upload, as counted at its end of the link)."""
        return int(self._stats(name)["tx"]["bytes"])

    def rx_bytes(self, name: str) -> int:
        """Bytes received by the node's eth0."""
        return int(self._stats(name)["rx"]["bytes"])

    # -- faults ---------------------------------------------------------------------------

    def partition(self, name: str) -> None:
        """Cut a node off: its switch port stops forwarding, both ways.

        Frames are dropped silently in the switch; the node keeps its carrier and, with
        the static neighbour entries, nobody's ARP fails either, so connects and
        established connections hang (no RST, no EHOSTUNREACH) until heal().
        """
        if name in self._partitioned:
            return
        self._port_state(name, "0")  # disabled
        self._partitioned.add(name)

    def heal(self, name: str) -> None:
        """Undo partition(name)."""
        if name not in self._partitioned:
            return
        self._port_state(name, "3")  # forwarding
        self._partitioned.discard(name)

    def _port_state(self, name: str, state: str) -> None:
        # `bridge link set`, not `ip link set type bridge_slave state`: the latter is
        # accepted and ignored (iproute2 6.1). Blocking (4) would be undone by the bridge's
        # port state selection at once; disabled (0) stays.
        _cmd(
            ["bridge", "-n", self.ns("sw"), "link", "set", "dev", self._port(name), "state", state]
        )

    def set_rate(self, name: str, rate: str) -> None:
        """Change a shaped node's link rate, both directions (e.g. slow one host's link so a
        transfer to it lasts long enough to act in the middle of it)."""
        if (self.origin_rate if name == ORIGIN else self.host_rate) is None:
            raise ValueError(f"{name}'s link is not shaped: there is no rate to change")
        for ns, dev in ((self.ns(name), "eth0"), (self.ns("sw"), self._port(name))):
            _cmd(
                ["tc", "-n", ns, "qdisc", "change", "dev", dev, "root", "handle", "1:", *_tbf(rate)]
            )

    def block(self, name: str, other: str) -> None:
        """Make `name` unable to reach `other`: connects fail at once with EHOSTUNREACH.

        Only that direction and only new routing decisions: `other` can still send to
        `name`, and `name`'s established connections to it fail on their next send.
        """
        if (name, other) in self._blocked:
            return
        _cmd(["ip", "-n", self.ns(name), "route", "add", "unreachable", f"{self.addr(other)}/32"])
        self._blocked.add((name, other))

    def unblock(self, name: str, other: str) -> None:
        """Undo block(name, other)."""
        if (name, other) not in self._blocked:
            return
        _cmd(["ip", "-n", self.ns(name), "route", "del", "unreachable", f"{self.addr(other)}/32"])
        self._blocked.discard((name, other))

    # -- teardown -------------------------------------------------------------------------

    def close(self) -> None:
        """Kill what runs in the namespaces, reap what popen() started, delete them. Idempotent."""
        if self._closed or os.getpid() != self._owner:  # a forked child inherits atexit hooks
            return
        self._closed = True
        atexit.unregister(self.close)
        # hosts first, the switch (the claim on k) last
        made = [ns for ns in self._made if not ns.endswith("-sw")] + self._made[:1]
        failed = [why for ns in made if (why := _kill_and_delete(ns)) is not None]
        for p in self._procs:
            if p.poll() is None:  # not in a namespace any more, but still ours
                p.kill()
            p.wait()
            for f in (p.stdin, p.stdout, p.stderr):
                if f is not None:
                    f.close()
        if failed:
            raise NetnsError("; ".join(failed))

    def __enter__(self) -> Cluster:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self._procs)} procs"
        faults = [f"partitioned={sorted(self._partitioned)}"] if self._partitioned else []
        faults += [f"blocked={sorted(self._blocked)}"] if self._blocked else []
        return (
            f"Cluster({self.prefix}, {self.subnet}, hosts={len(self._hosts)}, "
            f"host_rate={self.host_rate}, origin_rate={self.origin_rate}, delay={self.delay}, "
            + ", ".join([*faults, state])
            + ")"
        )


def wait_listening(
    cluster: Cluster,
    name: str,
    port: int,
    *,
    via: str | None = None,
    timeout: float = 10.0,
    proc: subprocess.Popen[Any] | None = None,
) -> None:
    """Poll until a TCP connect from `via` (default: `name` itself) to name:port succeeds.

    Raises TimeoutError at the deadline, or RuntimeError at once if `proc` has exited.
    """
    deadline = time.monotonic() + timeout
    target = (cluster.addr(name), port)
    last: OSError | None = None
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited {proc.returncode} before {target} listened")
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"nothing listens on {target} after {timeout}s: {last}")
        with cluster.socket(via or name) as s:
            s.settimeout(min(left, 1.0))
            try:
                s.connect(target)
                return
            except OSError as e:
                last = e
        time.sleep(min(0.01, max(0.0, deadline - time.monotonic())))  # poll interval


def serve_dir(
    cluster: Cluster, name: str, directory: str | os.PathLike[str], port: int, **kw: Any
) -> subprocess.Popen[Any]:
    """Serve `directory` over HTTP at name:port (threading http.server); returns once listening.

    The server's request log goes to /dev/null unless `stderr=` says otherwise.
    """
    argv = [sys.executable, "-m", "http.server", "--bind", cluster.addr(name)]
    return serve(cluster, name, [*argv, "--directory", str(directory), str(port)], port, **kw)


def serve(
    cluster: Cluster, name: str, argv: list[str], port: int, **kw: Any
) -> subprocess.Popen[Any]:
    """Run the server `argv` in node `name`'s namespace; returns once it listens on
    name:port (killed if it does not). Its output goes to /dev/null unless `kw` says
    otherwise."""
    kw.setdefault("stdout", subprocess.DEVNULL)
    kw.setdefault("stderr", subprocess.DEVNULL)
    proc = cluster.popen(name, argv, **kw)
    try:
        wait_listening(cluster, name, port, proc=proc)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc
