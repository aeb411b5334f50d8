"""The namespace cluster harness (tests/netns.py) does what benches and fault tests rely on.

Every test builds a real cluster (root, iproute2): it is skipped with the reason where
namespaces cannot be used, and fails instead under CI=true. Waits poll against deadlines.
"""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from netns import Cluster, require_netns, serve_dir, wait_listening

pytestmark = pytest.mark.root

ECHO = """
import socket, sys
s = socket.create_server((sys.argv[1], int(sys.argv[2])))
while True:  # one connection at a time; wait_listening's probe is the first
    c, _ = s.accept()
    while data := c.recv(65536):
        c.sendall(data)
    c.close()
"""

ECHO_CLIENT = """
import socket, sys
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5) as c:
    c.sendall(b"hello from " + sys.argv[3].encode())
    c.shutdown(socket.SHUT_WR)
    print(c.recv(1024).decode())
"""


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    require_netns()
    with Cluster(hosts=2, host_rate="1gbit", origin_rate="400mbit") as c:
        yield c


def listener(cluster: Cluster, name: str, port: int) -> socket.socket:
    """A listening socket in `name`'s namespace (the kernel completes handshakes on its own)."""
    s = cluster.socket(name)
    s.bind((cluster.addr(name), port))
    s.listen(16)
    return s


def connect(cluster: Cluster, name: str, other: str, port: int, timeout: float) -> None:
    """Connect from `name` to other:port and close; raises what connect raises."""
    with cluster.socket(name) as s:
        s.settimeout(timeout)
        s.connect((cluster.addr(other), port))


def test_hosts_reach_each_other_and_the_origin_by_address(cluster: Cluster) -> None:
    assert cluster.hosts == ["h0", "h1"]
    addrs = {cluster.addr(n) for n in [*cluster.hosts, "origin"]}
    assert len(addrs) == 3
    assert len({cluster.ns(n) for n in [*cluster.hosts, "origin"]}) == 3

    echo = cluster.popen("h1", [sys.executable, "-c", ECHO, cluster.addr("h1"), "7000"])
    wait_listening(cluster, "h1", 7000, via="h0", proc=echo)
    out = cluster.run(
        "h0", [sys.executable, "-c", ECHO_CLIENT, cluster.addr("h1"), "7000", "h0"], text=True
    )
    assert out.stdout.strip() == "hello from h0"
    assert echo.poll() is None  # still serving; close() kills and reaps it

    with listener(cluster, "origin", 7001):
        for host in cluster.hosts:
            connect(cluster, host, "origin", 7001, timeout=5)


def test_links_are_shaped_and_counted(cluster: Cluster) -> None:
    for name, rate in [("h0", "1Gbit"), ("h1", "1Gbit"), ("origin", "400Mbit")]:
        shown = cluster.run(name, ["tc", "qdisc", "show", "dev", "eth0"], text=True).stdout
        assert "tbf" in shown, shown
        assert f"rate {rate}" in shown, shown
        sw = subprocess.run(
            ["tc", "-n", cluster.ns("sw"), "qdisc", "show", "dev", f"p-{name}"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert f"rate {rate}" in sw, sw  # the download direction too

    n = 4 * 1024 * 1024
    tx0, rx0 = cluster.tx_bytes("h0"), cluster.rx_bytes("h1")
    received = 0
    with listener(cluster, "h1", 7002) as srv:
        srv.settimeout(10)

        def drain() -> None:
            nonlocal received
            c, _ = srv.accept()
            with c:
                while data := c.recv(1 << 20):
                    received += len(data)

        reader = threading.Thread(target=drain)
        reader.start()
        with cluster.socket("h0") as s:
            s.settimeout(10)
            s.connect((cluster.addr("h1"), 7002))
            s.sendall(b"\0" * n)
        reader.join(timeout=10)
    assert received == n
    assert cluster.tx_bytes("h0") - tx0 >= n
    assert cluster.rx_bytes("h1") - rx0 >= n


def test_partition_hangs_connects_and_heal_restores_them(cluster: Cluster) -> None:
    with listener(cluster, "h1", 7003):
        connect(cluster, "h0", "h1", 7003, timeout=5)
        cluster.partition("h1")
        with pytest.raises(TimeoutError):  # dropped silently: no RST, no EHOSTUNREACH
            connect(cluster, "h0", "h1", 7003, timeout=1)
        with pytest.raises(TimeoutError):  # cut off entirely: the origin cannot reach it either
            connect(cluster, "origin", "h1", 7003, timeout=0.5)
        cluster.heal("h1")
        wait_listening(cluster, "h1", 7003, via="h0", timeout=10)


def test_block_fails_fast_for_that_pair_only(cluster: Cluster) -> None:
    with listener(cluster, "origin", 7005):
        cluster.block("h0", "origin")
        start = time.monotonic()
        with pytest.raises(OSError, match="No route to host") as e:
            connect(cluster, "h0", "origin", 7005, timeout=5)
        assert e.value.errno == errno.EHOSTUNREACH, e.value
        assert time.monotonic() - start < 1.0  # fails fast, does not wait for a timeout
        connect(cluster, "h1", "origin", 7005, timeout=5)
        cluster.unblock("h0", "origin")
        connect(cluster, "h0", "origin", 7005, timeout=5)


def test_serve_dir_serves_a_file_to_a_host(cluster: Cluster, tmp_path: Path) -> None:
    blob = os.urandom(1 << 20)
    (tmp_path / "blob.bin").write_bytes(blob)
    tx0 = cluster.tx_bytes("origin")
    server = serve_dir(cluster, "origin", tmp_path, 8000)
    url = f"http://{cluster.addr('origin')}:8000/blob.bin"
    fetch = (
        "import sys, urllib.request\n"
        "sys.stdout.buffer.write(urllib.request.urlopen(sys.argv[1], timeout=10).read())"
    )
    got = cluster.run("h0", [sys.executable, "-c", fetch, url], timeout=30).stdout
    assert got == blob
    assert cluster.tx_bytes("origin") - tx0 >= len(blob)  # counted at the origin's link
    assert server.poll() is None


def test_close_removes_every_namespace_and_process() -> None:
    require_netns()
    # Debris of a crashed run: a namespace named for a pid that no longer exists.
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = f"hd{dead.pid}x0-h0"
    subprocess.run(["ip", "netns", "add", stale], check=True, capture_output=True)

    c = Cluster(hosts=3, host_rate=None, origin_rate="400mbit")
    names = {c.ns(n) for n in [*c.hosts, "origin", "sw"]}
    proc = c.popen("h2", ["sleep", "60"])
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    present = {line.split()[0] for line in listed.stdout.splitlines() if line.strip()}
    assert names <= present
    assert stale not in present  # swept when the cluster was built

    c.close()
    c.close()  # idempotent
    assert proc.returncode is not None  # killed and reaped
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    present = {line.split()[0] for line in listed.stdout.splitlines() if line.strip()}
    assert not names & present
    assert "closed" in repr(c)
