"""Config loading: defaults, per-user paths, value parsing, errors that name the key, and the
documented config/hostd.toml kept in step with the loader."""

from __future__ import annotations

import dataclasses
import grp
import json
import math
import os
import pwd
import re
import socket
import tempfile
import tomllib
from collections.abc import Iterator
from pathlib import Path

import blake3
import pytest
from hypothesis import given
from hypothesis import strategies as st

from hostd.config import (
    ACCESS_KEYS,
    MAX_SOCKET_PATH,
    PEER_KEYS,
    TIER_KEYS,
    TOP_KEYS,
    AccessConfig,
    Config,
    PeersConfig,
    TierConfig,
    known_keys,
    load_config,
    resolve_budget,
)
from hostd.core.units import parse_duration, parse_share, parse_size
from hostd.errors import ConfigError
from hostd.paths import default_paths, default_socket

CONFIG_FILE = Path(__file__).resolve().parents[1] / "config" / "hostd.toml"
UNITS = {
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KiB": 2**10,
    "MiB": 2**20,
    "GiB": 2**30,
    "TiB": 2**40,
}


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A directory with a short path, for Unix sockets (107 bytes at most)."""
    with tempfile.TemporaryDirectory(prefix="hc", dir="/tmp") as d:
        yield Path(d)


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return {"HOME": str(tmp_path / "home")}


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "hostd.toml"
    path.write_text(text)
    return path


def fs_size(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_blocks * st.f_frsize


def tier(name: str, path: str, budget: str = "1GiB") -> str:
    return f'[[tiers]]\nname = "{name}"\npath = "{path}"\nbudget = "{budget}"\n'


# ---------------------------------------------------------------------------------------------
# Defaults and per-user paths


def test_every_default(tmp_path: Path, env: dict[str, str]) -> None:
    home = tmp_path / "home"
    config = load_config(None, env)
    tag = blake3.blake3(str(home / ".cache/hostd").encode()).hexdigest()[:12]
    uid = os.getuid()

    assert config.origin == "file://" + str(home / ".local/share/hostd/origin")
    assert config.origin_options == {}
    assert config.socket == Path(f"/tmp/hostd-{uid}-{tag}/hostd.sock")
    assert config.socket_mode == 0o660
    assert config.metrics_address == "127.0.0.1:0"
    assert config.compat_facts == ("gpu_model", "driver_major", "cuda", "arch", "format")
    assert config.kinds == {
        "files": ("format",),
        "compile-cache": config.compat_facts,
        "process": ("gpu_model", "driver_major", "cuda", "arch", "driver", "kernel", "format"),
    }
    expected_tiers = [TierConfig("disk", home / ".cache/hostd/disk", fs_size(tmp_path) // 2, "50%")]
    if Path("/dev/shm").is_dir():
        shm = Path(f"/dev/shm/hostd-{uid}-{tag}")
        expected_tiers.insert(0, TierConfig("mem", shm, fs_size(Path("/dev/shm")) // 2, "50%"))
    assert list(config.tiers) == expected_tiers
    assert config.index == home / ".cache/hostd/index.sqlite3"
    assert config.chunk_size == 4 * 2**20
    assert config.fetch_concurrency == 16
    assert config.fetch_memory == 64 * 2**20
    assert config.fetch_range == 64 * 2**20
    assert config.upload_concurrency == 16
    assert config.pack_size == 64 * 2**20
    assert config.retries == 5
    assert config.retry_base == 0.2
    assert config.retry_max == 5.0
    assert config.request_timeout == 30.0
    assert config.drain_timeout == 30.0
    assert config.idle_timeout == 60.0
    assert config.max_request_body == 2**20
    assert config.compress == "auto"
    assert config.compress_min_saving == pytest.approx(0.10)
    assert config.log_level == "info"
    assert config.log_format == "logfmt"
    assert config.peers is None
    assert config.source is None


def test_an_empty_file_gives_the_defaults(tmp_path: Path, env: dict[str, str]) -> None:
    config = load_config(write(tmp_path, ""), env)
    assert dataclasses.replace(config, source=None) == load_config(None, env)
    assert config.source == tmp_path / "hostd.toml"


def test_peers_defaults_when_the_table_is_empty(tmp_path: Path, env: dict[str, str]) -> None:
    assert load_config(write(tmp_path, "[peers]\n"), env).peers == PeersConfig(
        listen="0.0.0.0:7460",
        static=(),
        dns=(),
        dns_refresh=10.0,
        secret_file=None,
        hedge_after=0.2,
        timeout=5.0,
        allow_unauthenticated=False,
        max_uploads=4,
        buffer=256 * 2**20,
    )


def test_xdg_variables_are_honoured(tmp_path: Path) -> None:
    env = {
        "HOME": str(tmp_path / "home"),
        "XDG_CACHE_HOME": str(tmp_path / "cache"),
        "XDG_DATA_HOME": str(tmp_path / "data"),
        "XDG_RUNTIME_DIR": str(tmp_path / "run"),
    }
    config = load_config(None, env)
    assert config.index == tmp_path / "cache/hostd/index.sqlite3"
    assert config.tiers[-1].path == tmp_path / "cache/hostd/disk"
    assert config.origin == "file://" + str(tmp_path / "data/hostd/origin")
    assert config.socket.parent == tmp_path / "run/hostd"
    assert config.socket.name.startswith("hostd-")
    assert config.socket.suffix == ".sock"


def test_two_homes_sharing_a_runtime_dir_get_two_sockets(tmp_path: Path) -> None:
    run = str(tmp_path / "run")
    a = load_config(None, {"HOME": str(tmp_path / "a"), "XDG_RUNTIME_DIR": run})
    b = load_config(None, {"HOME": str(tmp_path / "b"), "XDG_RUNTIME_DIR": run})
    assert a.socket != b.socket
    assert a.socket.parent == b.socket.parent == tmp_path / "run/hostd"


def test_relative_xdg_variables_are_ignored(tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = {"HOME": str(home), "XDG_CACHE_HOME": "rel", "XDG_DATA_HOME": "", "XDG_RUNTIME_DIR": "r"}
    paths = default_paths(env)
    assert paths.cache_dir == home / ".cache/hostd"
    assert paths.data_dir == home / ".local/share/hostd"
    assert str(paths.socket).startswith("/tmp/hostd-")


def test_home_falls_back_to_the_passwd_entry() -> None:
    uid = os.getuid()
    home = Path(pwd.getpwuid(uid).pw_dir)
    assert default_paths({}, uid=uid).cache_dir == home / ".cache/hostd"
    assert default_paths({"HOME": "relative"}, uid=uid).data_dir == home / ".local/share/hostd"


def test_no_home_at_all_is_named(tmp_path: Path) -> None:
    uid = next(u for u in range(2**31 - 2, 0, -1) if not _has_passwd_entry(u))
    with pytest.raises(ConfigError) as e:
        default_paths({}, uid=uid)
    assert e.value.key == "HOME"
    # Nothing needs HOME when the XDG variables give every directory.
    env = {"XDG_CACHE_HOME": str(tmp_path / "c"), "XDG_DATA_HOME": str(tmp_path / "d")}
    assert default_paths(env, uid=uid).cache_dir == tmp_path / "c/hostd"


def _has_passwd_entry(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
    except KeyError:
        return False
    return True


def test_two_homes_share_no_path(tmp_path: Path) -> None:
    def paths_of(home: str) -> list[Path]:
        config = load_config(None, {"HOME": str(tmp_path / home)})
        origin = Path(config.origin.removeprefix("file://"))
        return [config.socket.parent, config.index, origin, *(t.path for t in config.tiers)]

    a, b = paths_of("a"), paths_of("b")
    for pa in a:
        for pb in b:
            assert not pa.is_relative_to(pb), (pa, pb)
            assert not pb.is_relative_to(pa), (pa, pb)


def test_two_users_share_no_path(tmp_path: Path) -> None:
    env = {"HOME": str(tmp_path)}
    a, b = default_paths(env, uid=1000), default_paths(env, uid=1001)
    assert a.socket != b.socket
    assert a.shm_dir != b.shm_dir


def test_no_mem_tier_without_dev_shm(tmp_path: Path) -> None:
    assert default_paths({"HOME": str(tmp_path)}, shm_root=tmp_path / "absent").shm_dir is None
    shm = tmp_path / "shm"
    shm.mkdir()
    got = default_paths({"HOME": str(tmp_path)}, shm_root=shm).shm_dir
    assert got is not None
    assert got.parent == shm


def test_loading_creates_nothing(tmp_path: Path, env: dict[str, str]) -> None:
    config = load_config(None, env)
    path = write(tmp_path, tier("a", "tiers/a", "50%") + '\n[peers]\nsecret_file = "k/key"\n')
    load_config(path, env)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hostd.toml"]
    assert not config.socket.parent.exists()
    assert all(not t.path.exists() for t in config.tiers)


def test_default_socket_finds_the_system_daemon(short_tmp: Path) -> None:
    env = {"HOME": str(short_tmp), "XDG_RUNTIME_DIR": str(short_tmp / "run")}
    own = default_paths(env).socket
    assert own.parent == short_tmp / "run/hostd"
    system = short_tmp / "sys.sock"
    assert default_socket(env, system_socket=system) == str(own)  # neither exists

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(system))
        assert default_socket(env, system_socket=system) == str(system)
        own.parent.mkdir(parents=True)
        own.touch()
        assert default_socket(env, system_socket=system) == str(own)


def test_default_socket_ignores_a_plain_file(short_tmp: Path) -> None:
    env = {"HOME": str(short_tmp), "XDG_RUNTIME_DIR": str(short_tmp)}
    (short_tmp / "sys.sock").touch()
    own = default_socket(env, system_socket=short_tmp / "sys.sock")
    assert own == str(default_paths(env).socket)
    assert Path(own).parent == short_tmp / "hostd"


# ---------------------------------------------------------------------------------------------
# Sizes, durations, shares


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("4MiB", 4 * 2**20),
        ("64GiB", 64 * 2**30),
        ("500MB", 500 * 10**6),
        ("1024", 1024),
        (1024, 1024),
        (0, 0),
        ("1 KiB", 1024),
        ("1.5GiB", 3 * 2**29),
        ("2tb", 2 * 10**12),
        ("8Gi", 8 * 2**30),
        ("3B", 3),
        ("1.5B", 1),
    ],
)
def test_parse_size(text: str | int, expected: int) -> None:
    assert parse_size(text, "k") == expected


@pytest.mark.parametrize(
    "text", ["", "MiB", "-1", -1, "4 MiBs", "4K", "1e3", "0x10", "4MiB4", True]
)
def test_parse_size_rejects(text: str | int) -> None:
    with pytest.raises(ConfigError, match=r"'some\.key'") as e:
        parse_size(text, "some.key")
    assert e.value.key == "some.key"


@given(n=st.integers(0, 2**20), unit=st.sampled_from(sorted(UNITS)), gap=st.sampled_from(["", " "]))
def test_parse_size_round_trips(n: int, unit: str, gap: str) -> None:
    assert parse_size(f"{n}{gap}{unit}", "k") == n * UNITS[unit]
    assert parse_size(f"{n}{gap}{unit.lower()}", "k") == n * UNITS[unit]


@given(size=st.integers(0, 2**62))
def test_parse_size_of_the_largest_exact_unit_round_trips(size: int) -> None:
    unit = max((u for u, m in UNITS.items() if size % m == 0), key=UNITS.__getitem__)
    assert parse_size(f"{size // UNITS[unit]}{unit}", "k") == size


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("200ms", 0.2),
        ("30s", 30.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("1d", 86400.0),  # (the units prune --unused-for takes)
        ("2w", 1209600.0),
        ("1.5s", 1.5),
        ("30", 30.0),
        (30, 30.0),
        (0.25, 0.25),
        ("0s", 0.0),
        (" 10 s ", 10.0),
    ],
)
def test_parse_duration(text: str | int | float, expected: float) -> None:
    assert parse_duration(text, "k") == pytest.approx(expected)


@pytest.mark.parametrize(
    "text", ["", "s", "-1s", -1, "5y", "1m30s", "30S", "fast", float("nan"), float("inf"), False]
)
def test_parse_duration_rejects(text: str | int | float) -> None:
    with pytest.raises(ConfigError) as e:
        parse_duration(text, "some.key")
    assert e.value.key == "some.key"


@given(n=st.integers(0, 10**8), unit=st.sampled_from([("ms", 1000), ("s", 1)]))
def test_parse_duration_round_trips(n: int, unit: tuple[str, int]) -> None:
    assert parse_duration(f"{n}{unit[0]}", "k") == n / unit[1]


@pytest.mark.parametrize(
    ("text", "expected"), [("10%", 0.1), ("0%", 0.0), ("12.5%", 0.125), (0.1, 0.1), (0, 0.0)]
)
def test_parse_share(text: str | float, expected: float) -> None:
    assert parse_share(text, "k") == pytest.approx(expected)


def test_percent_budget_uses_the_nearest_existing_ancestor(tmp_path: Path) -> None:
    missing = tmp_path / "a" / "b" / "c"
    assert resolve_budget("50%", missing, "k") == fs_size(tmp_path) // 2
    assert resolve_budget("12.5%", missing, "k") == math.floor(fs_size(tmp_path) * 0.125)
    assert resolve_budget("100%", tmp_path, "k") == fs_size(tmp_path)
    assert not (tmp_path / "a").exists()


def test_percent_budget_below_a_file(tmp_path: Path) -> None:
    (tmp_path / "f").touch()
    assert resolve_budget("50%", tmp_path / "f" / "x", "k") == fs_size(tmp_path) // 2


def test_tier_budgets_resolve_at_load(tmp_path: Path, env: dict[str, str]) -> None:
    text = tier("mem", "m", "25%") + tier("disk", "d", "64GiB") + tier("n", "n", "1000")
    config = load_config(write(tmp_path, text), env)
    assert [(t.budget, t.budget_spec) for t in config.tiers] == [
        (fs_size(tmp_path) // 4, "25%"),
        (64 * 2**30, "64GiB"),
        (1000, "1000"),
    ]


def test_integer_budget_keeps_its_spec(tmp_path: Path, env: dict[str, str]) -> None:
    text = '[[tiers]]\nname = "a"\npath = "a"\nbudget = 4096\n'
    (only,) = load_config(write(tmp_path, text), env).tiers
    assert (only.budget, only.budget_spec) == (4096, "4096")


# ---------------------------------------------------------------------------------------------
# Values


def test_every_key_set(tmp_path: Path, env: dict[str, str]) -> None:
    text = """
origin = "s3://bucket/prefix"
origin_options = { region = "us-east-1", allow_http = true, retries = 3 }
socket = "run/hostd.sock"
socket_mode = "0600"
metrics_address = "[::1]:9464"
compat_facts = ["format", "gpu_model"]
index = "/var/lib/x/index.sqlite3"
chunk_size = "1MiB"
fetch_concurrency = 64
fetch_memory = "48MiB"
fetch_range = 0
upload_concurrency = 8
pack_size = "16MiB"
retries = 3
retry_base = "100ms"
retry_max = "2s"
request_timeout = "10s"
drain_timeout = 0
idle_timeout = "2m"
max_request_body = "64KiB"
compress = "never"
compress_min_saving = "25%"
log_level = "DEBUG"
log_format = "json"

[[tiers]]
name = "mem"
path = "/dev/shm/x"
budget = "1GiB"

[peers]
listen = "10.0.0.1:7460"
static = ["10.0.0.12:7460", "[fd00::1]:7460", "host-b.example:1"]
dns = ["hostd-peers.gpu.svc.cluster.local:7460"]
dns_refresh = "1m"
secret_file = "cluster.key"
hedge_after = 0.05
timeout = "5s"

[kinds]
files = ["format", "arch"]
"""
    c = load_config(write(tmp_path, text), env)
    assert c.origin == "s3://bucket/prefix"
    assert c.origin_options == {"region": "us-east-1", "allow_http": "true", "retries": "3"}
    assert c.socket == tmp_path / "run/hostd.sock"
    assert c.socket_mode == 0o600
    assert c.metrics_address == "[::1]:9464"
    assert c.compat_facts == ("format", "gpu_model")
    # compat_facts is the compile-cache list, and what process adds to
    assert c.kinds == {
        "files": ("format", "arch"),
        "compile-cache": ("format", "gpu_model"),
        "process": ("gpu_model", "driver", "kernel", "format"),
    }
    assert c.index == Path("/var/lib/x/index.sqlite3")
    assert c.tiers == (TierConfig("mem", Path("/dev/shm/x"), 2**30, "1GiB"),)
    assert (c.chunk_size, c.fetch_concurrency, c.upload_concurrency) == (2**20, 64, 8)
    assert c.fetch_memory == 48 * 2**20
    assert (c.fetch_range, c.pack_size) == (0, 16 * 2**20)
    assert (c.retries, c.retry_base, c.retry_max) == (3, 0.1, 2.0)
    assert (c.request_timeout, c.drain_timeout, c.idle_timeout) == (10.0, 0.0, 120.0)
    assert c.max_request_body == 64 * 1024
    assert (c.compress, c.compress_min_saving) == ("never", 0.25)
    assert (c.log_level, c.log_format) == ("debug", "json")
    assert c.peers == PeersConfig(
        listen="10.0.0.1:7460",
        static=("10.0.0.12:7460", "[fd00::1]:7460", "host-b.example:1"),
        dns=("hostd-peers.gpu.svc.cluster.local:7460",),
        dns_refresh=60.0,
        secret_file=tmp_path / "cluster.key",
        hedge_after=0.05,
        timeout=5.0,
    )


def test_relative_paths_resolve_against_the_file(tmp_path: Path, env: dict[str, str]) -> None:
    (tmp_path / "etc").mkdir()
    path = tmp_path / "etc" / "hostd.toml"
    path.write_text('socket = "s.sock"\nindex = "../var/index"\n' + tier("a", "./t/../tier"))
    config = load_config(path, env)
    assert config.socket == tmp_path / "etc/s.sock"
    assert config.index == tmp_path / "var/index"
    assert config.tiers[0].path == tmp_path / "etc/tier"


def test_metrics_off(tmp_path: Path, env: dict[str, str]) -> None:
    assert load_config(write(tmp_path, 'metrics_address = ""'), env).metrics_address == ""


@pytest.mark.parametrize("mode", ["0660", "660", "0o660"])
def test_socket_mode_spellings(tmp_path: Path, env: dict[str, str], mode: str) -> None:
    assert load_config(write(tmp_path, f'socket_mode = "{mode}"'), env).socket_mode == 0o660


BAD_VALUES = [
    ('origin = "ftp://host/x"', "origin"),
    ('origin = "file://relative/x"', "origin"),
    ('origin = "s3://"', "origin"),
    ('origin = "http:///path"', "origin"),
    ('origin = "s3://bucket/a b"', "origin"),
    ("origin = 3", "origin"),
    ('origin_options = "region=x"', "origin_options"),
    ("origin_options = { region = [1] }", "origin_options.region"),
    ('socket = ""', "socket"),
    ("socket = 1", "socket"),
    ("socket_mode = 660", "socket_mode"),
    ('socket_mode = "0999"', "socket_mode"),
    ('socket_mode = "rw-rw----"', "socket_mode"),
    ('metrics_address = "localhost"', "metrics_address"),
    ('metrics_address = "localhost:70000"', "metrics_address"),
    ('metrics_address = "::1:9464"', "metrics_address"),
    ('metrics_address = "[nope]:9464"', "metrics_address"),
    ('metrics_address = ":9464"', "metrics_address"),
    ("metrics_address = 9464", "metrics_address"),
    ("compat_facts = []", "compat_facts"),
    ('compat_facts = "format"', "compat_facts"),
    ('compat_facts = ["GPU"]', "compat_facts[0]"),
    ('compat_facts = ["format", "format"]', "compat_facts[1]"),
    ('compat_facts = ["format", 1]', "compat_facts[1]"),
    ('[kinds]\nfiles = "format"', "kinds.files"),
    ("[kinds]\nfiles = []", "kinds.files"),
    ('[kinds]\nprocess = ["Driver"]', "kinds.process[0]"),
    ('[kinds]\ncompile-cache = ["cuda", "cuda"]', "kinds.compile-cache[1]"),
    ('compat_facts = ["cuda"]\n[kinds]\ncompile-cache = ["arch"]', "kinds.compile-cache"),
    ('[kinds]\nweights = ["format"]', "kinds.weights"),
    ('kinds = ["files"]', "kinds"),
    ("index = 5", "index"),
    ('index = ""', "index"),
    ('chunk_size = "3MiB"', "chunk_size"),
    ('chunk_size = "32KiB"', "chunk_size"),
    ('chunk_size = "512MiB"', "chunk_size"),
    ('chunk_size = "4 parsecs"', "chunk_size"),
    ("chunk_size = -1", "chunk_size"),
    ("chunk_size = true", "chunk_size"),
    ("chunk_size = 4.5", "chunk_size"),
    ("fetch_concurrency = 0", "fetch_concurrency"),
    ("fetch_concurrency = 1025", "fetch_concurrency"),
    ('fetch_concurrency = "16"', "fetch_concurrency"),
    ("fetch_concurrency = true", "fetch_concurrency"),
    ('fetch_memory = "1KiB"', "fetch_memory"),
    ('fetch_memory = "lots"', "fetch_memory"),
    ("fetch_memory = -5", "fetch_memory"),
    ('fetch_range = "2GiB"', "fetch_range"),
    ('fetch_range = "wide"', "fetch_range"),
    ('pack_size = "1KiB"', "pack_size"),
    ('pack_size = "2GiB"', "pack_size"),
    ("pack_size = -1", "pack_size"),
    ("upload_concurrency = 0", "upload_concurrency"),
    ("upload_concurrency = 2.0", "upload_concurrency"),
    ("retries = 0", "retries"),
    ("retries = 101", "retries"),
    ('retry_base = "0s"', "retry_base"),
    ('retry_base = "-1s"', "retry_base"),
    ('retry_base = "fast"', "retry_base"),
    ('retry_max = "100ms"', "retry_max"),
    ("retry_max = [1]", "retry_max"),
    ("request_timeout = 0", "request_timeout"),
    ('request_timeout = "1 fortnight"', "request_timeout"),
    ('drain_timeout = "soon"', "drain_timeout"),
    ("drain_timeout = -1", "drain_timeout"),
    ('idle_timeout = "0ms"', "idle_timeout"),
    ('max_request_body = "1B"', "max_request_body"),
    ('max_request_body = "lots"', "max_request_body"),
    ('compress = "gzip"', "compress"),
    ("compress = false", "compress"),
    ('compress_min_saving = "150%"', "compress_min_saving"),
    ("compress_min_saving = 1.0", "compress_min_saving"),
    ("compress_min_saving = -0.1", "compress_min_saving"),
    ('compress_min_saving = "ten"', "compress_min_saving"),
    ('log_level = "trace"', "log_level"),
    ('log_format = "xml"', "log_format"),
    ("tiers = []", "tiers"),
    ('tiers = "mem"', "tiers"),
    ("tiers = [1]", "tiers[0]"),
    ('[[tiers]]\nname = "a"\npath = "a"', "tiers[0].budget"),
    ('[[tiers]]\npath = "a"\nbudget = "1GiB"', "tiers[0].name"),
    ('[[tiers]]\nname = "a"\nbudget = "1GiB"', "tiers[0].path"),
    (tier("Mem", "a"), "tiers[0].name"),
    (tier("-a", "a"), "tiers[0].name"),
    (tier("a" * 65, "a"), "tiers[0].name"),
    ('[[tiers]]\nname = 1\npath = "a"\nbudget = "1GiB"', "tiers[0].name"),
    ('[[tiers]]\nname = "a"\npath = ["a"]\nbudget = "1GiB"', "tiers[0].path"),
    (tier("a", "a") + tier("a", "b"), "tiers[1].name"),
    (tier("a", "a") + tier("b", "./a"), "tiers[1].path"),
    (tier("a", "a") + tier("b", "a/b"), "tiers[1].path"),
    (tier("a", "a/b") + tier("b", "a"), "tiers[1].path"),
    (tier("a", "a", "0%"), "tiers[0].budget"),
    (tier("a", "a", "101%"), "tiers[0].budget"),
    (tier("a", "a", "0"), "tiers[0].budget"),
    (tier("a", "a", "lots"), "tiers[0].budget"),
    ('[[tiers]]\nname = "a"\npath = "a"\nbudget = true', "tiers[0].budget"),
    ('index = "t/index.sqlite3"\n' + tier("a", "t"), "index"),
    ('socket = "t/s.sock"\n' + tier("a", "t"), "socket"),
    ('origin = "file:///srv/t/origin"\n' + tier("a", "/srv/t"), "origin"),
    ("peers = 1", "peers"),
    ('[peers]\nlisten = "7460"', "peers.listen"),
    ('[peers]\nlisten = ""', "peers.listen"),  # (no [peers] table: peers off)
    ('[peers]\nstatic = "10.0.0.1:7460"', "peers.static"),
    ('[peers]\nstatic = ["10.0.0.1"]', "peers.static[0]"),
    ('[peers]\nstatic = ["10.0.0.1:1", "10.0.0.2:0"]', "peers.static[1]"),
    ('[peers]\nstatic = ["10.0.0.1:\u00b2"]', "peers.static[0]"),  # a digit int() refuses
    ('[peers]\nstatic = ["10.0.0.1:\u0667\u0664\u0666\u0660"]', "peers.static[0]"),  # 7460
    ('[peers]\nlisten = "0.0.0.0:\u0667\u0664\u0666\u0660"', "peers.listen"),
    ('[peers]\ndns = ["a b:1"]', "peers.dns[0]"),
    ('[peers]\ndns_refresh = "0s"', "peers.dns_refresh"),
    ("[peers]\nsecret_file = 1", "peers.secret_file"),
    ('[peers]\nhedge_after = "x"', "peers.hedge_after"),
    ("[peers]\ntimeout = 0", "peers.timeout"),
    ('[peers]\nallow_unauthenticated = "yes"', "peers.allow_unauthenticated"),
    ("[peers]\nmax_uploads = 0", "peers.max_uploads"),
    ('[peers]\nbuffer = "lots"', "peers.buffer"),
    ("access = 1", "access"),
    ('[access]\nrestore = "*"', "access.restore"),
    ('[access]\npublish = ["uid:0", "someone"]', "access.publish[1]"),
    ('[access]\npublish = ["uid:-1"]', "access.publish[0]"),
    ('[access]\npublish = ["uid:4294967295"]', "access.publish[0]"),
    ('[access]\npublish = ["uid:' + "9" * 5000 + '"]', "access.publish[0]"),
    ('[access]\npublish = ["user:a\\u0000b"]', "access.publish[0]"),
    ("[access]\npublish = [0]", "access.publish[0]"),
    ('[access]\nadmin = ["user:no-such-user-here"]', "access.admin[0]"),
    ('[access]\nadmin = ["*", "group:no-such-group-here"]', "access.admin[1]"),
    ('[access]\nadmin = ["gid: 5"]', "access.admin[0]"),
    ('[access]\nlink_to_writers = "yes"', "access.link_to_writers"),
    ('[access]\nlink_checks = "none"', "access.link_checks"),
    ("[access]\nlink_checks = true", "access.link_checks"),
    ("[access]\nmax_operations = 0", "access.max_operations"),
    ("[access]\nmax_operations_per_uid = 65537", "access.max_operations_per_uid"),
]


@pytest.mark.parametrize(("text", "key"), BAD_VALUES)
def test_bad_value_names_its_key(tmp_path: Path, env: dict[str, str], text: str, key: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, text), env)
    assert e.value.key == key
    assert f"'{key}'" in str(e.value)


def test_bad_values_cover_every_key() -> None:
    named = {re.sub(r"\[\d+\]", "[]", key) for _, key in BAD_VALUES}
    leaves = {k for k in known_keys()} | {"tiers", "peers", "access", "kinds"}
    # a bad value of a key inside an array or a table may be named by its element
    named |= {k.removesuffix("[]") for k in named}
    assert leaves - named == set()


def test_kinds_table_sets_each_list(tmp_path: Path, env: dict[str, str]) -> None:
    text = """
[kinds]
compile-cache = ["gpu_model", "cuda", "triton"]
process = ["driver", "kernel"]
"""
    assert load_config(write(tmp_path, text), env).kinds == {
        "files": ("format",),
        "compile-cache": ("gpu_model", "cuda", "triton", "format"),
        "process": ("driver", "kernel", "format"),
    }
    # compile-cache set: compat_facts reports the same list
    assert load_config(write(tmp_path, text), env).compat_facts == (
        "gpu_model",
        "cuda",
        "triton",
        "format",
    )


def test_access_defaults_follow_the_daemons_euid(env: dict[str, str]) -> None:
    as_root = load_config(None, env, euid=0).access
    assert as_root == AccessConfig(
        restore=("*",),
        publish=(),
        admin=(),
        link_to_writers=False,
        max_operations=64,
        max_operations_per_uid=16,
        link_checks="lease",
    )
    assert load_config(None, env, euid=1000).access.link_to_writers is True
    assert load_config(None, env).access.link_to_writers is (os.geteuid() != 0)


def test_access_names_become_ids(tmp_path: Path, env: dict[str, str]) -> None:
    nobody = pwd.getpwnam("nobody")
    group = grp.getgrgid(nobody.pw_gid).gr_name
    text = f"""
[access]
restore = ["user:nobody", "uid:007", "*"]
publish = ["group:{group}", "gid:0"]
admin = []
link_to_writers = true
link_checks = "all"
max_operations = 3
max_operations_per_uid = 1
"""
    access = load_config(write(tmp_path, text), env, euid=0).access
    assert access.restore == (f"uid:{nobody.pw_uid}", "uid:7", "*")
    assert access.publish == (f"gid:{nobody.pw_gid}", "gid:0")
    assert access.admin == ()
    assert access.link_to_writers is True
    assert access.link_checks == "all"
    assert (access.max_operations, access.max_operations_per_uid) == (3, 1)
    view = json.loads(json.dumps(load_config(write(tmp_path, text), env).to_json()))
    assert view["access"]["publish"] == [f"gid:{nobody.pw_gid}", "gid:0"]


def test_access_unknown_name_says_how_to_give_a_number(tmp_path: Path, env: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match=r"no user named '12345'.*uid:N") as e:
        load_config(write(tmp_path, '[access]\nrestore = ["user:12345"]'), env)
    assert e.value.key == "access.restore[0]"


@pytest.mark.parametrize(
    ("text", "key", "hint"),
    [
        ('origni = "s3://b"', "origni", "origin"),
        ("colour = 1", "colour", None),
        (
            tier("a", "a") + '[[tiers]]\nname = "b"\npath = "b"\nbudgt = "1GiB"',
            "tiers[1].budgt",
            "budget",
        ),
        ('[peers]\nlisten = "0.0.0.0:1"\nlisen = "x"', "peers.lisen", "listen"),
    ],
)
def test_unknown_key_is_named(
    tmp_path: Path, env: dict[str, str], text: str, key: str, hint: str | None
) -> None:
    with pytest.raises(ConfigError, match="unknown key") as e:
        load_config(write(tmp_path, text), env)
    assert e.value.key == key
    if hint is not None:
        assert f"did you mean {hint!r}" in str(e.value)


def test_a_top_level_key_written_under_a_table_says_where_it_belongs(
    tmp_path: Path, env: dict[str, str]
) -> None:
    """TOML gives a key written after a [[tiers]] header to that tier: the error says where
    a top-level key goes, not just that the tier knows no such key."""
    with pytest.raises(ConfigError, match="unknown key") as e:
        load_config(write(tmp_path, tier("a", "a") + 'log_level = "debug"'), env)
    assert e.value.key == "tiers[0].log_level"
    assert "'log_level' is a top-level key: write it above the first [table]" in str(e.value)


def test_origin_options_are_not_checked_for_names(tmp_path: Path, env: dict[str, str]) -> None:
    text = 'origin_options = { anything_obstore_takes = "x", float = 1.5 }'
    assert load_config(write(tmp_path, text), env).origin_options == {
        "anything_obstore_takes": "x",
        "float": "1.5",
    }


def test_socket_path_too_long_names_socket(tmp_path: Path, env: dict[str, str]) -> None:
    longest = "/" + "s" * (MAX_SOCKET_PATH - 1)
    assert load_config(write(tmp_path, f'socket = "{longest}"'), env).socket == Path(longest)
    with pytest.raises(ConfigError, match="'socket'") as e:
        load_config(write(tmp_path, f'socket = "{longest}x"'), env)
    assert e.value.key == "socket"


def test_default_socket_too_long_names_socket(tmp_path: Path) -> None:
    env = {"HOME": str(tmp_path), "XDG_RUNTIME_DIR": "/" + "r" * 100}
    with pytest.raises(ConfigError) as e:
        load_config(None, env)
    assert e.value.key == "socket"


def test_toml_syntax_error(tmp_path: Path, env: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match=r"not valid TOML.*line 2") as e:
        load_config(write(tmp_path, 'log_level = "info"\nchunk_size = \n'), env)
    assert e.value.key == "<file>"
    assert str(tmp_path / "hostd.toml") in str(e.value)


def test_unreadable_file(tmp_path: Path, env: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match="cannot read") as e:
        load_config(tmp_path / "absent.toml", env)
    assert e.value.key == "<file>"
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path, env)


def test_not_utf8(tmp_path: Path, env: dict[str, str]) -> None:
    path = tmp_path / "hostd.toml"
    path.write_bytes(b'log_level = "\xff"\n')
    with pytest.raises(ConfigError) as e:
        load_config(path, env)
    assert e.value.key == "<file>"


def test_to_json(tmp_path: Path, env: dict[str, str]) -> None:
    text = """
origin = "https://user:hunter2@host.example/bucket?sig=abc123"
origin_options = { region = "eu", aws_secret_access_key = "SECRET1", token = "SECRET2" }
[peers]
secret_file = "/etc/hostd/cluster.key"
"""
    config = load_config(write(tmp_path, text), env)
    view = json.loads(json.dumps(config.to_json()))
    dumped = json.dumps(view)
    for secret in ("hunter2", "abc123", "SECRET1", "SECRET2"):
        assert secret not in dumped
    assert view["origin"] == "https://user:***@host.example/bucket?***"
    assert view["origin_options"]["region"] == "eu"
    assert view["socket"] == str(config.socket)
    assert view["socket_mode"] == "0660"
    assert view["tiers"][0] == {
        "name": config.tiers[0].name,
        "path": str(config.tiers[0].path),
        "budget": config.tiers[0].budget,
        "budget_spec": "50%",
    }
    assert view["peers"]["secret_file"] == "/etc/hostd/cluster.key"
    assert view["source"] == str(tmp_path / "hostd.toml")
    assert set(view) == {f.name for f in dataclasses.fields(Config)}


def test_config_is_hashable_and_frozen(env: dict[str, str]) -> None:
    config = load_config(None, env)
    assert hash(config) == hash(load_config(None, env))
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.retries = 1  # type: ignore[misc]


# ---------------------------------------------------------------------------------------------
# config/hostd.toml documents every key, with its default


_OPTION = re.compile(r"#\s?(?=[a-z_-]+ = |\[)")


def uncomment(text: str) -> str:
    """config/hostd.toml with every commented-out option line turned on."""
    return "\n".join(
        _OPTION.sub("", line, count=1) if _OPTION.match(line) else line
        for line in text.splitlines()
    )


def documented_keys(doc: dict[str, object]) -> set[str]:
    keys: set[str] = set()
    for key, value in doc.items():
        if key == "tiers":
            assert isinstance(value, list)
            keys |= {f"tiers[].{k}" for table in value for k in table}
        elif key in ("peers", "access", "kinds"):
            assert isinstance(value, dict)
            keys |= {f"{key}.{k}" for k in value}
        else:
            keys.add(key)
    return keys


def test_loader_keys_match_the_dataclasses() -> None:
    derived = {"source", "tiers_default"}
    assert set(TOP_KEYS) == {f.name for f in dataclasses.fields(Config)} - derived
    assert set(TIER_KEYS) == {f.name for f in dataclasses.fields(TierConfig)} - {"budget_spec"}
    assert set(PEER_KEYS) == {f.name for f in dataclasses.fields(PeersConfig)}
    assert set(ACCESS_KEYS) == {f.name for f in dataclasses.fields(AccessConfig)}


def test_config_file_documents_every_key() -> None:
    doc = tomllib.loads(uncomment(CONFIG_FILE.read_text()))
    assert documented_keys(doc) == known_keys()


def test_config_file_comments_every_key() -> None:
    lines = CONFIG_FILE.read_text().splitlines()
    section = ""
    commented: dict[str, bool] = {}
    for i, line in enumerate(lines):
        option = _OPTION.sub("", line, count=1) if _OPTION.match(line) else line
        if option.startswith("["):
            section = {
                "[[tiers]]": "tiers[].",
                "[peers]": "peers.",
                "[access]": "access.",
                "[kinds]": "kinds.",
            }[option.strip()]
            continue
        m = re.match(r"([a-z_-]+) = ", option)
        if m is None:
            continue
        before = lines[i - 1]
        prose_before = before.startswith("#") and not _OPTION.match(before)
        inline = "#" in option.split("=", 1)[1].rsplit('"', 1)[-1]
        key = section + m.group(1)
        commented[key] = commented.get(key, False) or prose_before or inline
    assert set(commented) == known_keys()
    assert [k for k, ok in commented.items() if not ok] == []


def test_config_file_loads_without_home_or_existing_paths() -> None:
    config = load_config(CONFIG_FILE, env={})
    assert config.source == CONFIG_FILE
    assert config.socket == Path("/run/hostd/hostd.sock")
    assert [t.path for t in config.tiers] == [Path("/dev/shm/hostd"), Path("/var/cache/hostd")]
    assert config.index.parent in (Path("/var/cache/hostd"), Path("/var/lib/hostd"))


def test_config_file_comments_out_only_defaults(tmp_path: Path, env: dict[str, str]) -> None:
    """Turning on every commented-out line changes nothing: each shows the default value
    (of a daemon running as root, as the systemd unit's does: link_to_writers follows it)."""
    as_is = load_config(CONFIG_FILE, env={}, euid=0)
    full = load_config(write(tmp_path, uncomment(CONFIG_FILE.read_text())), env={}, euid=0)
    assert dataclasses.replace(full, source=None, peers=as_is.peers) == dataclasses.replace(
        as_is, source=None
    )
    assert full.peers is not None
    if as_is.peers is None:
        # The commented-out [peers] table shows the defaults; secret_file has none (absent:
        # no authentication), so the file shows an example path there.
        defaults = load_config(write(tmp_path, "[peers]\n"), env).peers
        assert defaults is not None
        assert defaults.secret_file is None
        assert full.peers == dataclasses.replace(defaults, secret_file=full.peers.secret_file)
    else:
        assert full.peers == as_is.peers
