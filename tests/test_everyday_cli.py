"""Everyday use (issue 12): CLI conventions, tier budget defaults, the systemd unit's docs.

The CLI tests call `hostd.cli.main` in-process (or `python -m hostd`) against a real daemon
process (`harness.Hostd`) on its real socket. The budget tests run the daemon in a private
mount namespace that holds a tmpfs of known size (`unshare -m`, as root), so what the daemon
measures is known, and read the budget back from `hostd status --json` and the log.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
from harness import ROOT, Hostd, make_tree, rmtree, short_tmp

from hostd import __version__
from hostd.cli import COMMANDS, LS_WIDTH, _command_in, build_parser, main
from hostd.core.budget import Space, choose
from hostd.output import ProgressBar, width
from hostd.paths import SYSTEM_SOCKET, default_paths

MiB = 1024 * 1024
README = ROOT / "README.md"
UNIT = ROOT / "systemd" / "hostd.service"
CONFIG_FILE = ROOT / "config" / "hostd.toml"


@pytest.fixture(scope="module")
def daemon() -> Iterator[Hostd]:
    with Hostd() as d:
        yield d
    rmtree(d.root)


@pytest.fixture(autouse=True)
def _no_socket_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HOSTD_SOCKET", raising=False)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# -- global flags --------------------------------------------------------------------------


def test_socket_and_json_go_before_or_after_the_command(
    daemon: Hostd, capsys: pytest.CaptureFixture[str]
) -> None:
    sock = str(daemon.socket)
    for argv in (
        ["--socket", sock, "status", "--json"],
        ["status", "--socket", sock, "--json"],
        ["--json", "--socket", sock, "status"],
        ["--socket", sock, "--json", "status"],
        ["--json", "status", "--socket", sock],
    ):
        code, out, err = run(capsys, *argv)
        assert (code, err) == (0, ""), argv
        assert json.loads(out)["socket"] == sock, argv

    code, out, err = run(capsys, "--socket", sock, "ls")  # human output: --json not given
    assert (code, err) == (0, "")
    assert not out.startswith("{")


def test_given_before_and_after_the_command_the_one_after_wins(
    daemon: Hostd, capsys: pytest.CaptureFixture[str]
) -> None:
    sock, nowhere = str(daemon.socket), str(daemon.root / "nowhere.sock")
    code, out, err = run(capsys, "--socket", nowhere, "status", "--socket", sock, "--json")
    assert (code, err) == (0, "")
    assert json.loads(out)["socket"] == sock

    code, out, err = run(capsys, "--socket", sock, "status", "--socket", nowhere)
    assert (code, out) == (4, "")
    assert nowhere in err


def test_client_flags_are_refused_for_serve(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "--socket", "/x.sock", "serve")
    assert (code, out) == (2, "")
    assert err.startswith("hostd: --socket and --json are for the client commands")


# -- version and help ----------------------------------------------------------------------


def test_version_without_the_daemon_or_heavy_modules() -> None:
    code = """if True:
        import contextlib, io, json, sys
        from hostd.cli import main
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            codes = [main(["--version"]), main(["version"]), main(["version", "--json"])]
        heavy = ("hostd.daemon", "hostd.config", "asyncio", "aiohttp", "rich")
        loaded = [m for m in heavy if m in sys.modules]
        print(json.dumps({"codes": codes, "out": out.getvalue(), "loaded": loaded}))
    """
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["codes"] == [0, 0, 0]
    assert report["loaded"] == []
    first, second, third = report["out"].splitlines()
    assert first == second == f"hostd {__version__}"
    assert json.loads(third) == {"version": __version__}

    proc = subprocess.run(
        [sys.executable, "-m", "hostd", "--version"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, f"hostd {__version__}\n", "")


def parsers(parser: argparse.ArgumentParser) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    yield parser.prog, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from parsers(sub)


def test_every_argument_and_flag_has_help() -> None:
    missing = []
    seen = 0
    for prog, parser in parsers(build_parser()):
        for action in parser._actions:
            seen += 1
            name = "/".join(action.option_strings) or action.metavar or action.dest
            if not action.help or action.help == argparse.SUPPRESS:
                missing.append(f"{prog} {name}")
            if isinstance(action, argparse._SubParsersAction):
                for choice in action._choices_actions:
                    if not choice.help:
                        missing.append(f"{prog} {choice.dest}")
    assert seen > 30
    assert missing == []


def test_a_command_parses_the_same_with_only_its_own_options_built() -> None:
    """main() builds the command it is given alone (a client command starts faster):
    COMMANDS must name every command, and each must parse as in the whole CLI."""
    whole = build_parser()
    subs = next(a for a in whole._actions if isinstance(a, argparse._SubParsersAction))
    assert set(subs.choices) == COMMANDS
    for name, sub in subs.choices.items():
        one = build_parser(name)
        own = next(a for a in one._actions if isinstance(a, argparse._SubParsersAction))
        assert set(own.choices) == {name}
        assert own.choices[name].format_help() == sub.format_help()
    argv = ["--socket", "/run/x.sock", "--json", "ls", "--wide"]
    assert _command_in(argv) == "ls"
    assert vars(build_parser("ls").parse_args(argv)) == vars(whole.parse_args(argv))
    # the main parser's help, asked for before a command, is the whole CLI's
    assert _command_in(["--json", "--help", "ls"]) is None
    assert _command_in(["-h", "status"]) is None


def test_help_before_a_command_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    for flag in ("--help", "--he", "-h"):  # (argparse takes a unique prefix of a long flag)
        code, out, _ = run(capsys, flag, "status")
        assert code == 0
        assert all(f"\n    {name} " in out for name in COMMANDS), flag


def test_an_abbreviated_socket_flag_takes_its_value_before_the_command() -> None:
    """`--sock S` is argparse's `--socket S`: the word after it is the socket, not the
    command, and the command after that parses as in the whole CLI."""
    for argv in (["--sock", "status", "ls"], ["--so", "/run/x.sock", "--json", "ls"]):
        assert _command_in(argv) == "ls", argv
        assert vars(build_parser("ls").parse_args(argv)) == vars(build_parser().parse_args(argv))


def test_help_lists_the_global_flags(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--help")
    assert code == 0
    for flag in ("--socket PATH", "--json", "--version"):
        assert flag in out


# -- ls --------------------------------------------------------------------------------------

LONG_REFS = [
    "team-research/llm/llama-3.1-70b-instruct-awq-int4-v1",
    "team-research/llm/llama-3.1-70b-instruct-awq-int4-latest",
    "prod/serving/llama-70b",
]


@pytest.fixture(scope="module")
def published(daemon: Hostd) -> dict[str, str]:
    """Two snapshots: one under three long refs, one under a short one."""
    src = make_tree(daemon.root / "src-ls")
    ids = {ref: daemon.publish(src, ref)["snapshot"] for ref in LONG_REFS}
    assert len(set(ids.values())) == 1
    other = make_tree(daemon.root / "src-ls-2", seed=2, big=1000)
    ids["demo/tiny"] = daemon.publish(other, "demo/tiny")["snapshot"]
    return ids


def test_ls_fits_100_columns_with_short_ids(
    daemon: Hostd, published: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, "ls", "--socket", str(daemon.socket))
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0].split()[:2] == ["SNAPSHOT", "REFS"]
    assert max(width(line) for line in lines) <= LS_WIDTH, out
    rows = {line.split()[0]: line for line in lines[1:]}
    big, tiny = published[LONG_REFS[0]], published["demo/tiny"]
    assert set(rows) == {big[:12], tiny[:12]}
    assert big not in out  # no full ids
    assert " demo/tiny " in rows[tiny[:12]]
    # three long refs in the room left: those that fit (or the first, cut), then the count
    assert re.search(r" \S.* \+[12] ", rows[big[:12]]), rows[big[:12]]
    assert "complete" in rows[big[:12]]


def test_ls_wide_gives_full_ids_and_every_ref(
    daemon: Hostd, published: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, "ls", "--wide", "--socket", str(daemon.socket))
    assert (code, err) == (0, "")
    big = published[LONG_REFS[0]]
    row = next(line for line in out.splitlines() if line.startswith(big))
    for ref in LONG_REFS:
        assert ref in row


def test_ls_json_is_unchanged(
    daemon: Hostd, published: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, "--json", "ls", "--socket", str(daemon.socket))
    assert (code, err) == (0, "")
    snapshots = {s["id"]: s for s in json.loads(out)["snapshots"]}
    big = snapshots[published[LONG_REFS[0]]]
    assert sorted(big["refs"]) == sorted(LONG_REFS)
    assert set(big) >= {"id", "refs", "files", "bytes", "pinned", "last_used", "tiers"}
    assert all(re.fullmatch(r"[0-9a-f]{64}", i) for i in snapshots)


# -- progress --------------------------------------------------------------------------------


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def drawn(events: list[dict[str, Any]]) -> str:
    """What the bar shows last (its final frame, drawn as it stops), control codes removed."""
    terminal = FakeTerminal()
    with ProgressBar(terminal, "restore") as bar:
        for event in events:
            bar.update(event)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", terminal.getvalue())
    frames = [line for line in re.split(r"[\r\n]", text) if line.strip()]
    return frames[-1]


def event(phase: str, done: int, total: int, files: int, of: int) -> dict[str, Any]:
    return {
        "event": "progress",
        "phase": phase,
        "done_bytes": done,
        "total_bytes": total,
        "done_files": files,
        "total_files": of,
    }


def test_progress_counts_bytes_in_binary_units_then_files_as_they_complete() -> None:
    fetch = drawn([event("fetch", n * MiB, 64 * MiB, 0, 8887) for n in (0, 8, 16)])
    assert "16.0 MiB/64.0 MiB" in fetch
    assert re.search(r"[KMGTP]iB/s", fetch), fetch  # the speed in the amount's units
    assert not re.search(r"\d ?[kKMGT]B\b", fetch), fetch  # never MB beside MiB
    assert "files" not in fetch  # none complete while fetching

    done = event("fetch", 64 * MiB, 64 * MiB, 0, 8887)
    materialize = drawn([done, event("materialize", 64 * MiB, 64 * MiB, 120, 8887)])
    assert "120/8,887 files" in materialize
    assert "files/s" in materialize or "120/8,887 files" in materialize
    assert "MiB" not in materialize

    publish = drawn([event("hash", 0, 8 * MiB, 0, 40), event("hash", 2 * MiB, 8 * MiB, 10, 40)])
    assert "2.0 MiB/8.0 MiB" in publish
    assert "10/40 files" in publish


def test_progress_bar_of_a_real_restore_uses_one_unit_system(
    daemon: Hostd,
    published: dict[str, str],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    terminal = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    target = daemon.root / "progress-out"
    code = main(["restore", LONG_REFS[0], str(target), "--socket", str(daemon.socket), "--json"])
    assert code == 0
    assert json.loads(capsys.readouterr().out)["files"] == 5
    shown = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", terminal.getvalue())
    assert not re.search(r"\d ?[kKMGT]B\b", shown), shown


# -- tier budgets ----------------------------------------------------------------------------


def test_budget_choice() -> None:
    fs = Space(size=1000 * MiB, free=300 * MiB)
    half = choose("50%", 500 * MiB, fs, used=0)
    assert (half.bytes, half.capped) == (200 * MiB, True)  # 300 free, 100 kept free
    assert "kept free" in half.reason
    assert choose("50%", 500 * MiB, fs, used=250 * MiB).bytes == 450 * MiB  # its own is free
    assert choose("10%", 100 * MiB, fs, used=0) == choose("10%", 100 * MiB, fs, used=0)
    assert choose("10%", 100 * MiB, fs, used=0).bytes == 100 * MiB  # fits: as asked
    assert choose("50%", 500 * MiB, Space(1000 * MiB, 50 * MiB), used=0).bytes == 0
    full = choose("50%", 500 * MiB, Space(1000 * MiB, 0), used=150 * MiB)
    assert full.bytes == 50 * MiB
    assert full.warning is not None
    assert "below the 150.0 MiB the tier holds" in full.warning
    explicit = choose("800MiB", 800 * MiB, fs, used=0)
    assert (explicit.bytes, explicit.capped) == (800 * MiB, False)
    assert explicit.warning is not None
    assert "300.0 MiB free" in explicit.warning
    assert choose("200MiB", 200 * MiB, fs, used=0).warning is None
    assert choose("50%", 500 * MiB, fs, used=0, headroom=Fraction(0)).bytes == 300 * MiB


def needs_root_and_mounts() -> None:
    why = None
    if os.geteuid() != 0:
        why = "needs root: mounts a tmpfs in a private mount namespace (unshare -m)"
    elif missing := [t for t in ("unshare", "nsenter", "mount") if not shutil.which(t)]:
        why = f"needs {', '.join(missing)} (util-linux)"
    if why is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true: {why}")
        pytest.skip(why)


@pytest.fixture
def small_fs() -> Iterator[tuple[Path, list[str]]]:
    """A 100 MiB tmpfs, 60 MiB of it taken by a file that is not hostd's, mounted in a private
    mount namespace that a holder process keeps; and the `wrap` that runs a daemon there."""
    needs_root_and_mounts()
    root = short_tmp("hb")
    mnt = root / "fs"
    mnt.mkdir()
    script = (
        f"mount -t tmpfs -o size=100m,mode=0755 hostd-test {mnt} && "
        f"head -c {60 * MiB} /dev/zero > {mnt}/not-hostd && echo ready && exec cat"
    )
    holder = subprocess.Popen(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", script],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline() == "ready\n"
        yield mnt, ["nsenter", "-t", str(holder.pid), "-m"]
    finally:
        assert holder.stdin is not None
        holder.stdin.close()  # cat ends, and the namespace with its tmpfs goes
        holder.wait(30)
        if holder.stdout is not None:
            holder.stdout.close()
        rmtree(root)


def tier_budget(d: Hostd) -> tuple[int, int]:
    status, body = d.api("GET", "/v1/status")
    assert status == 200
    [tier] = body["tiers"]
    return tier["budget"], tier["used"]


def test_a_share_is_capped_by_free_space_counting_the_tier_own_bytes(
    small_fs: tuple[Path, list[str]],
) -> None:
    mnt, wrap = small_fs
    work = short_tmp()
    tiers = [{"name": "disk", "path": str(mnt / "tier"), "budget": "50%"}]
    d = Hostd(work / "d", tiers=tiers, wrap=wrap)
    with d:
        # 50% of 100 MiB is 50 MiB, but 40 MiB is free and 10 MiB (10%) stays free
        budget, used = tier_budget(d)
        assert 30 * MiB - 64 * 1024 <= budget <= 30 * MiB
        assert used == 0
        line = next(x for x in d.log().splitlines() if "tier disk budget" in x)
        assert "tier disk budget 30.0 MiB" in line
        assert "50% of the 100.0 MiB filesystem would be 50.0 MiB" in line
        assert "kept free" in line
        d.publish(make_tree(work / "src", big=8 * MiB), "demo/budget")
    # restarted with 8 MiB of its own in the tier: those count as free, the budget holds
    with d:
        again, used = tier_budget(d)
        assert used >= 8 * MiB
        assert abs(again - budget) <= 64 * 1024
    rmtree(work)


def test_a_share_that_fits_is_as_asked_and_an_explicit_size_is_honoured(
    small_fs: tuple[Path, list[str]],
) -> None:
    mnt, wrap = small_fs
    work = short_tmp()
    tiers = [{"name": "disk", "path": str(mnt / "tier"), "budget": "20%"}]
    with Hostd(work / "a", tiers=tiers, wrap=wrap) as d:
        assert tier_budget(d)[0] == 20 * MiB
        assert "tier disk budget 20.0 MiB (20971520 bytes): 20% of the 100.0 MiB" in d.log()
    tiers = [{"name": "disk", "path": str(mnt / "tier2"), "budget": "80MiB"}]
    with Hostd(work / "b", tiers=tiers, wrap=wrap) as d:
        assert tier_budget(d)[0] == 80 * MiB
        log = d.log()
        assert "tier disk budget 80.0 MiB (83886080 bytes): 80MiB as configured" in log
        warning = next(x for x in log.splitlines() if "level=warning" in x and "budget" in x)
        assert "more than its filesystem can give" in warning
    rmtree(work)


# -- deployment docs -------------------------------------------------------------------------


def unit_exec_start() -> str:
    [line] = [x for x in UNIT.read_text().splitlines() if x.startswith("ExecStart=")]
    return line.removeprefix("ExecStart=")


def test_readme_installs_the_binary_the_unit_runs(tmp_path: Path) -> None:
    binary = unit_exec_start().split()[0]
    venv = str(Path(binary).parent.parent)
    readme = README.read_text()
    assert f"python3 -m venv {venv}" in readme
    assert f"{venv}/bin/pip install" in readme
    assert binary in readme
    # `pip install` into a venv makes bin/hostd: this checkout's .venv is one such install
    installed = Path(sys.prefix) / "bin" / "hostd"
    assert installed.is_file(), "the dev venv has no hostd script: pip install -e ."
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        if os.environ.get("CI") == "true":
            pytest.fail("systemd-analyze is missing (install the systemd package)")
        pytest.skip("systemd-analyze is not installed")
    copy = tmp_path / "hostd.service"
    copy.write_text(UNIT.read_text().replace(f"ExecStart={binary} ", f"ExecStart={installed} "))
    result = subprocess.run(
        [analyze, "verify", str(copy)], capture_output=True, text=True, timeout=60, check=False
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert [line for line in output.splitlines() if "hostd.service" in line] == []


def test_readme_explains_protect_home() -> None:
    readme = README.read_text()
    assert "ProtectHome=yes" in UNIT.read_text()
    assert "ProtectHome=" in readme
    assert "ProtectHome=read-only" in readme  # how to let hostd use a path under /home


def test_documented_socket_names_are_the_real_ones() -> None:
    env = {"HOME": "/home/u", "XDG_RUNTIME_DIR": "/run/user/1000"}
    paths = default_paths(env, uid=1000)
    tag = paths.cache_dir.as_posix()
    assert paths.socket.name != "hostd.sock"
    template = paths.socket.as_posix().replace("/run/user/1000", "$XDG_RUNTIME_DIR")
    template = re.sub(r"[0-9a-f]{12}", "<tag>", template)
    assert template == "$XDG_RUNTIME_DIR/hostd/hostd-<tag>.sock", tag
    fallback = default_paths({"HOME": "/home/u"}, uid=1000).socket.as_posix()
    fallback = re.sub(r"[0-9a-f]{12}", "<tag>", fallback).replace("1000", "<uid>")
    for doc in (CONFIG_FILE.read_text(), README.read_text()):
        flat = " ".join(line.lstrip("# ") for line in doc.splitlines())
        assert template in flat
        assert fallback in flat
        assert "$XDG_RUNTIME_DIR/hostd/hostd.sock" not in flat
    # the unit's socket: the config it ships with, and the one a client finds without flags
    assert f'socket = "{SYSTEM_SOCKET}"' in CONFIG_FILE.read_text()
    assert str(SYSTEM_SOCKET) in README.read_text()


def test_a_refused_limit_names_the_flag_not_the_api_field() -> None:
    """`hostd ref history R --limit 0`: the daemon names its request field; a user reads the
    flag they typed, as for --tier and --mode."""
    from argparse import Namespace

    from hostd.cli import _explain
    from hostd.errors import UsageError

    refused = UsageError("field 'limit' must be a whole number from 1 to 10000")
    assert _explain(refused, Namespace(limit=0)) == (
        "--limit: must be a whole number from 1 to 10000"
    )
    assert _explain(refused, Namespace(limit=20000)) == (
        "--limit 20000: must be a whole number from 1 to 10000"
    )
