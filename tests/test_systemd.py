"""sd_notify against a datagram socket the test owns, and the unit file against
systemd-analyze and config/hostd.toml."""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from hostd.config import load_config
from hostd.systemd import Notifier

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "systemd" / "hostd.service"
CONFIG_FILE = ROOT / "config" / "hostd.toml"


@pytest.fixture
def receiver() -> Iterator[tuple[socket.socket, str]]:
    """A bound datagram socket standing in for systemd, and its NOTIFY_SOCKET value."""
    with (
        tempfile.TemporaryDirectory(prefix="sd", dir="/tmp") as d,
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock,
    ):
        path = os.path.join(d, "notify")
        sock.bind(path)
        sock.settimeout(5)  # a bound on a failure, never reached when the datagram is there
        yield sock, path


def recv(sock: socket.socket) -> list[str]:
    return sock.recv(4096).decode().split("\n")


def test_messages_arrive(receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver
    notifier = Notifier.from_env({"NOTIFY_SOCKET": path})
    assert notifier.enabled

    assert notifier.ready("serving on /run/hostd/hostd.sock")
    assert recv(sock) == ["READY=1", "STATUS=serving on /run/hostd/hostd.sock"]
    assert notifier.ready()
    assert recv(sock) == ["READY=1"]
    assert notifier.status("restoring 2 snapshots")
    assert recv(sock) == ["STATUS=restoring 2 snapshots"]
    assert notifier.stopping("draining 3 restores")
    assert recv(sock) == ["STOPPING=1", "STATUS=draining 3 restores"]
    assert notifier.watchdog()
    assert recv(sock) == ["WATCHDOG=1"]
    assert notifier.extend_timeout(12.5)
    assert recv(sock) == ["EXTEND_TIMEOUT_USEC=12500000"]


def test_reloading_carries_the_monotonic_time(receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver
    notifier = Notifier.from_env({"NOTIFY_SOCKET": path})
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert notifier.reloading("reloading config")
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    first, second, third = recv(sock)
    assert first == "RELOADING=1"
    key, _, value = second.partition("=")
    assert key == "MONOTONIC_USEC"
    assert before <= int(value) <= after
    assert third == "STATUS=reloading config"


def test_status_stays_one_line(receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver
    assert Notifier.from_env({"NOTIFY_SOCKET": path}).status("bad\nREADY=1\r\nx")
    assert recv(sock) == ["STATUS=bad READY=1 x"]


def test_abstract_socket() -> None:
    name = f"hostd-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        notifier = Notifier.from_env({"NOTIFY_SOCKET": "@" + name})
        assert notifier.ready("up")
        assert recv(sock) == ["READY=1", "STATUS=up"]
        assert notifier.watchdog()
        assert recv(sock) == ["WATCHDOG=1"]
        assert repr(notifier).startswith(f"Notifier('@{name}'")


@pytest.mark.parametrize("value", [None, "", "relative/path", "vsock:2:1234", "@"])
def test_without_a_notify_socket_everything_is_a_no_op(value: str | None) -> None:
    env = {"WATCHDOG_USEC": "30000000"}
    if value is not None:
        env["NOTIFY_SOCKET"] = value
    notifier = Notifier.from_env(env)
    assert not notifier.enabled
    assert notifier.watchdog_interval is None
    assert not notifier.ready("x")
    assert not notifier.status("x")
    assert not notifier.reloading()
    assert not notifier.stopping()
    assert not notifier.watchdog()
    assert repr(notifier) == "Notifier(disabled)"


def test_a_gone_supervisor_is_logged_not_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    notifier = Notifier.from_env({"NOTIFY_SOCKET": str(tmp_path / "nobody")})
    with caplog.at_level(logging.DEBUG, logger="hostd.systemd"):
        assert not notifier.ready("x")
        assert not notifier.watchdog()
    assert "sd_notify" in caplog.text


def test_a_full_queue_does_not_block(receiver: tuple[socket.socket, str]) -> None:
    """The supervisor stops reading: sends fail at once instead of stalling the loop."""
    _, path = receiver
    notifier = Notifier.from_env({"NOTIFY_SOCKET": path})
    outcome: list[int] = []

    def fill() -> None:
        sent = 0
        while notifier.watchdog():
            sent += 1
            if sent > 1_000_000:
                break
        outcome.append(sent)

    thread = threading.Thread(target=fill, daemon=True)
    thread.start()
    thread.join(timeout=30)
    assert not thread.is_alive(), "a send blocked on the full queue"
    assert 0 < outcome[0] <= 1_000_000


@pytest.mark.parametrize(
    ("env", "interval"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "4242"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "4243"}, None),
        ({"WATCHDOG_USEC": "1000"}, 0.0005),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "me"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval(env: dict[str, str], interval: float | None) -> None:
    notifier = Notifier.from_env({"NOTIFY_SOCKET": "/run/systemd/notify", **env}, pid=4242)
    assert notifier.watchdog_interval == interval


def test_watchdog_pid_defaults_to_ours() -> None:
    env = {"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}
    assert Notifier.from_env(env).watchdog_interval == 1.0


# ---------------------------------------------------------------------------------------------
# The unit


def unit_directives() -> dict[str, list[str]]:
    """`Section.Key` -> values in file order (unit files repeat keys)."""
    out: dict[str, list[str]] = {}
    section = ""
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return out


def seconds(value: str) -> float:
    for suffix, factor in (("min", 60.0), ("ms", 0.001), ("s", 1.0)):
        if value.endswith(suffix):
            return float(value.removesuffix(suffix)) * factor
    return float(value)


def systemd_analyze() -> str:
    """The systemd-analyze binary; a skip without it, a failure in CI."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        if os.environ.get("CI") == "true":
            pytest.fail("systemd-analyze is missing (install the systemd package)")
        pytest.skip("systemd-analyze is not installed")
    return analyze


def unit_copy(tmp_path: Path) -> Path:
    """The unit, with an ExecStart whose binary exists (verify and security check that)."""
    text = UNIT.read_text()
    assert "ExecStart=/opt/hostd/bin/hostd " in text
    copy = tmp_path / "hostd.service"
    copy.write_text(text.replace("ExecStart=/opt/hostd/bin/hostd ", f"ExecStart={sys.executable} "))
    return copy


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = systemd_analyze()
    copy = unit_copy(tmp_path)
    result = subprocess.run(
        [analyze, "verify", str(copy)], capture_output=True, text=True, timeout=60, check=False
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    # verify exits 0 on an unknown key or a value it ignores; any line about the unit fails.
    assert [line for line in output.splitlines() if "hostd.service" in line] == []


def test_unit_directives() -> None:
    d = unit_directives()
    assert d["Service.Type"] == ["notify"]
    assert d["Service.NotifyAccess"] == ["main"]
    assert d["Service.ExecStart"] == ["/opt/hostd/bin/hostd serve --config /etc/hostd/hostd.toml"]
    assert d["Service.ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert d["Service.Restart"] == ["on-failure"]
    assert seconds(d["Service.WatchdogSec"][0]) == 30
    assert d["Service.ProtectSystem"] == ["strict"]
    assert d["Service.RestrictAddressFamilies"] == ["AF_UNIX AF_INET AF_INET6"]
    for key in ("NoNewPrivileges", "ProtectHome", "ProtectKernelTunables"):
        assert d[f"Service.{key}"] == ["yes"], key
    # a private /tmp would swallow restores into /tmp targets while reporting success
    assert "Service.PrivateTmp" not in d
    assert int(d["Service.LimitNOFILE"][0]) >= 65536
    assert d["Install.WantedBy"] == ["multi-user.target"]


def test_unit_matches_the_config_it_points_to() -> None:
    """The paths of config/hostd.toml are the ones the unit makes writable."""
    d = unit_directives()
    config = load_config(CONFIG_FILE, env={})
    runtime = Path("/run") / d["Service.RuntimeDirectory"][0]
    cache = Path("/var/cache") / d["Service.CacheDirectory"][0]
    state = Path("/var/lib") / d["Service.StateDirectory"][0]
    writable = [Path(p.lstrip("-")) for v in d["Service.ReadWritePaths"] for p in v.split()]

    assert config.socket.parent == runtime
    for tier in config.tiers:
        assert tier.path in writable, tier
    for path in (config.index, Path(config.origin.removeprefix("file://"))):
        assert any(path.is_relative_to(w) for w in (*writable, cache, state)), path
    assert seconds(d["Service.TimeoutStopSec"][0]) > config.drain_timeout


# The capabilities the caller-rights design uses, each argued for in the unit's comments:
# the helpers' drop to a client's credentials, links into clients' directories (also of blobs
# that aren't root's, under fs.protected_hardlinks), stopping a helper that runs under a
# client's uid, and pinned memory.
NEEDED_CAPS = {
    "CAP_SYS_PTRACE",
    "CAP_SETUID",
    "CAP_SETGID",
    "CAP_DAC_OVERRIDE",
    "CAP_FOWNER",
    "CAP_KILL",
    "CAP_IPC_LOCK",
}

# Directives that would score better and break hostd (the unit's comments say why).
FORBIDDEN = (
    "User",
    "DynamicUser",
    "PrivateUsers",  # SO_PEERCRED's uids
    "PrivateNetwork",  # origin, metrics, peers
    "PrivateDevices",  # /dev/nvidia*
    "MemoryDenyWriteExecute",  # the CUDA driver's JIT
    "ProcSubset",  # /proc/driver/nvidia
    "PrivateTmp",
)

# What hostd and its helpers call that a syscall filter could take away.
NEEDED_SYSCALLS = (
    "fork",  # the zygote forks helpers
    "capget",  # a root caller's helper keeps only the caller's capabilities
    "capset",
    "prctl",
    "setgroups",
    "setresgid",
    "setresuid",
    "openat2",
    "linkat",
    "renameat2",
    "copy_file_range",
    "sendfile",
    "pidfd_open",
    "pidfd_send_signal",
    "flock",
    "setrlimit",
    "mlock",
    "ioctl",
)


def test_unit_hardening_keeps_what_hostd_needs() -> None:
    d = unit_directives()
    assert set(" ".join(d["Service.CapabilityBoundingSet"]).split()) == NEEDED_CAPS
    for key in FORBIDDEN:
        assert f"Service.{key}" not in d, key
    assert not any("any" in v.split() for v in d.get("Service.IPAddressDeny", [])), d
    families = set(d["Service.RestrictAddressFamilies"][0].split())
    assert {"AF_UNIX", "AF_INET", "AF_INET6"} <= families
    assert not families & {"~AF_INET", "~AF_INET6", "~AF_UNIX"}
    # a private cache, a socket directory clients can reach
    assert d["Service.UMask"] == ["0077"]
    assert d["Service.StateDirectoryMode"] == ["0700"]
    assert d["Service.CacheDirectoryMode"] == ["0700"]
    assert d["Service.RuntimeDirectoryMode"] == ["0755"]
    assert d["Service.SystemCallFilter"] == ["@system-service"]
    assert d["Service.ProtectProc"] == ["invisible"]
    assert d["Service.DevicePolicy"] == ["closed"]
    assert any(v.startswith("char-nvidia") for v in d["Service.DeviceAllow"])
    # restores land in the caller's mount namespace, not in the daemon's view of the host
    assert "Service.BindPaths" not in d


def syscall_groups(analyze: str) -> dict[str, list[str]]:
    """`systemd-analyze syscall-filter`: group -> its members (syscalls and groups)."""
    out = subprocess.run(
        [analyze, "syscall-filter"], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    groups: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in out.splitlines():
        item = line.strip()
        if item.startswith("@") and not line.startswith(" "):
            current = groups.setdefault(item, [])
        elif item and not item.startswith("#") and current is not None:
            current.append(item)
    return groups


def test_unit_syscall_filter_allows_what_hostd_calls() -> None:
    groups = syscall_groups(systemd_analyze())

    def expand(name: str) -> set[str]:
        out: set[str] = set()
        for item in groups[name]:
            out |= expand(item) if item.startswith("@") else {item}
        return out

    allowed: set[str] = set()
    for name in unit_directives()["Service.SystemCallFilter"]:
        assert not name.startswith("~"), name
        for item in name.split():
            allowed |= expand(item) if item.startswith("@") else {item}
    assert [s for s in NEEDED_SYSCALLS if s not in allowed] == []


def test_unit_exposure_is_at_most_3(tmp_path: Path) -> None:
    analyze = systemd_analyze()
    copy = unit_copy(tmp_path)
    result = subprocess.run(
        [analyze, "security", "--offline=true", str(copy)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    found = re.search(r"Overall exposure level for hostd\.service: (\d+\.\d+)", output)
    assert found is not None, output
    assert float(found.group(1)) <= 3.0, output
