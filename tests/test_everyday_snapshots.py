"""Managing snapshots and refs, as a user does it: rm, prune, refs, inspect, ref history and
rollback, id prefixes and the publish guard, through the real `hostd` CLI (`hostd.cli.main`
in-process, and the README's commands in a shell) against a real daemon (tests/harness.py)
with a file:// origin. Nothing sleeps; nothing is mocked."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import ROOT, Cli, Hostd, rmtree, short_tmp

from hostd.core import refentry
from hostd.core.select import Candidate, match_id, prune_plan, shrink_refusal
from hostd.errors import NotFound, UsageError

JSON = dict[str, Any]


@pytest.fixture
def work() -> Iterator[Path]:
    root = short_tmp("es")
    try:
        yield root
    finally:
        rmtree(root)


@pytest.fixture
def hostd(work: Path) -> Iterator[Hostd]:
    with Hostd(work / "d") as h:
        yield h


def write_tree(root: Path, files: dict[str, bytes]) -> Path:
    rmtree(root)
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    root.mkdir(parents=True, exist_ok=True)
    return root


def tree(n: int, tag: bytes) -> dict[str, bytes]:
    return {f"part/{i:02d}.bin": tag * (1000 + i) for i in range(n)}


@pytest.fixture
def cli(hostd: Hostd, capsys: pytest.CaptureFixture[str]) -> Cli:
    return Cli(hostd, capsys)


def publish(cli: Cli, src: Path, ref: str, *extra: str) -> str:
    sid: str = cli.json("publish", str(src), "--ref", ref, *extra)["snapshot"]
    return sid


def ls_ids(cli: Cli) -> set[str]:
    return {s["id"] for s in cli.json("ls")["snapshots"]}


# -- pure decisions ---------------------------------------------------------------------------


def test_id_prefix_rules() -> None:
    known = ["abcd" + "0" * 60, "abcd" + "1" * 60, "ffff" + "2" * 60]
    assert match_id("abcd0", known) == known[0]
    assert match_id("ffff", known) == known[2]
    assert match_id("9" * 64, known) == "9" * 64  # a full id stands for itself
    with pytest.raises(UsageError, match=r"'abcd' is ambiguous: it matches abcd0+, abcd1+"):
        match_id("abcd", known)
    with pytest.raises(UsageError, match="too short: give at least 4"):
        match_id("fff", known)
    with pytest.raises(UsageError, match="not lowercase hex"):
        match_id("ABCD", known)
    with pytest.raises(NotFound, match="no snapshot id starting with '1234'"):
        match_id("1234", known)


def test_prune_policy() -> None:
    day = 86400.0
    now = 100 * day
    snaps = [
        Candidate("a" * 64, now - 1 * day, False, 10, {"m": now - 1 * day}),
        Candidate("b" * 64, now - 2 * day, False, 10, {"m": now - 2 * day}),
        Candidate("c" * 64, now - 40 * day, False, 10, {"m": now - 40 * day}),
        Candidate("d" * 64, now - 50 * day, True, 10, {"m": now - 50 * day}),
        Candidate("e" * 64, now - 60 * day, False, 10, {}),
    ]
    drop = {v.id[0] for v in prune_plan(snaps, keep=1, unused_for=None, now=now) if v.drop}
    assert drop == {"b", "c"}  # d is pinned, e no ref names
    drop = {v.id[0] for v in prune_plan(snaps, keep=None, unused_for=30 * day, now=now) if v.drop}
    assert drop == {"c", "e"}
    drop = {v.id[0] for v in prune_plan(snaps, keep=1, unused_for=30 * day, now=now) if v.drop}
    assert drop == {"c", "e"}  # b: beyond the newest 1, but used 2 days ago
    pinned = next(v for v in prune_plan(snaps, keep=0, unused_for=None, now=now) if v.id[0] == "d")
    assert not pinned.drop
    assert "pinned" in pinned.why
    with pytest.raises(UsageError, match="fields 'keep', 'unused_for', or both"):
        prune_plan(snaps, keep=None, unused_for=None, now=now)


def test_shrink_rule() -> None:
    assert shrink_refusal(files=0, symlinks=0, size=0, before=None) is not None
    assert shrink_refusal(files=3, symlinks=0, size=30, before=None) is None
    assert shrink_refusal(files=5, symlinks=0, size=500, before=(10, 1000)) is None  # half
    assert "fewer than half" in str(
        shrink_refusal(files=4, symlinks=0, size=900, before=(10, 1000))
    )
    assert "less than half" in str(shrink_refusal(files=9, symlinks=0, size=499, before=(10, 1000)))


# -- rm and prune -----------------------------------------------------------------------------


def test_rm_by_ref_and_by_prefix_frees_the_blobs_only_they_use(cli: Cli, work: Path) -> None:
    v1 = publish(cli, write_tree(work / "src", tree(4, b"a")), "demo/m")
    v2 = publish(cli, write_tree(work / "src", tree(4, b"b")), "demo/m")
    other = publish(cli, write_tree(work / "o", tree(2, b"a")), "demo/other")  # shares 2 blobs
    assert ls_ids(cli) == {v1, v2, other}

    out = cli.json("rm", v1[:8])
    assert [r["snapshot"] for r in out["removed"]] == [v1]
    assert out["removed_blobs"] == 2
    assert out["freed_bytes"] == 1002 + 1003
    assert ls_ids(cli) == {v2, other}

    human = cli.ok("rm", "demo/m")
    assert v2[:12] in human
    assert "forgotten snapshots  1" in human
    assert ls_ids(cli) == {other}
    # what the other snapshot needs is still there: its restore fetches nothing
    got = cli.json("restore", "demo/other", str(work / "out"))
    assert got["bytes_by_source"].get("origin", 0) == 0
    assert (work / "out/part/01.bin").read_bytes() == b"a" * 1001

    # a forgotten snapshot comes back from the origin on its next restore
    got = cli.json("restore", "demo/m", str(work / "out2"))
    assert got["snapshot"] == v2
    assert got["bytes_by_source"]["origin"] > 0

    err = cli.fails(3, "rm", "no/such")
    assert "no snapshot of ref 'no/such' is cached" in err
    assert "too short" in cli.fails(2, "rm", "abc")
    cli.fails(2, "rm")  # argparse: REF|ID is required


def test_rm_refuses_a_pinned_snapshot_and_changes_nothing(cli: Cli, work: Path) -> None:
    sid = publish(cli, write_tree(work / "src", tree(2, b"p")), "demo/pinned")
    other = publish(cli, write_tree(work / "o", tree(2, b"q")), "demo/other")
    assert cli.json("pin", "--snapshot", sid[:6])["snapshot"] == sid  # prefix accepted
    err = cli.fails(1, "rm", "demo/other", "demo/pinned")
    assert f"snapshot {sid} is pinned; nothing was removed" in err
    assert f"hostd unpin --snapshot {sid[:12]}" in err
    assert ls_ids(cli) == {sid, other}
    cli.ok("unpin", "--snapshot", sid[:6])
    assert {r["snapshot"] for r in cli.json("rm", "demo/pinned")["removed"]} == {sid}


def test_prune_keep_unused_for_and_dry_run(cli: Cli, hostd: Hostd, work: Path) -> None:
    src = work / "src"
    ids = [publish(cli, write_tree(src, tree(3, bytes([65 + i]))), "demo/m") for i in range(3)]
    pinned = publish(cli, write_tree(work / "p", tree(1, b"z")), "demo/pinned")
    cli.ok("pin", "demo/pinned")

    dry = cli.json("prune", "--keep", "1", "--dry-run")
    assert dry["dry_run"] is True
    assert {r["snapshot"] for r in dry["removed"]} == set(ids[:2])
    assert dry["freed_bytes"] == 2 * (1000 + 1001 + 1002)
    assert ls_ids(cli) == {*ids, pinned}  # nothing changed
    human = cli.ok("prune", "--keep", "1", "--dry-run")
    assert "would remove:" in human
    assert "dry run       nothing was changed" in human
    assert "pinned (unpin it" in human

    done = cli.json("prune", "--keep", "1")
    assert {r["snapshot"] for r in done["removed"]} == set(ids[:2])
    kept = {r["snapshot"]: r["why"] for r in done["kept"]}
    assert kept[ids[2]] == "newest 1 of ref demo/m"
    assert kept[pinned].startswith("pinned")
    assert ls_ids(cli) == {ids[2], pinned}

    # nothing here is unused for a day; with 0 seconds everything unpinned is
    assert cli.json("prune", "--unused-for", "1d")["removed"] == []
    gone = cli.json("prune", "--unused-for", "0s")
    assert {r["snapshot"] for r in gone["removed"]} == {ids[2]}
    assert ls_ids(cli) == {pinned}

    assert "--keep N, --unused-for" in cli.fails(2, "prune")
    assert "--unused-for" in cli.fails(2, "prune", "--unused-for", "soon")
    cli.fails(2, "prune", "--keep", "-1")


# -- refs, inspect ----------------------------------------------------------------------------


def test_refs_lists_the_origin_and_inspect_shows_a_manifest(
    cli: Cli, hostd: Hostd, work: Path
) -> None:
    files = {"config.json": b"{}", "weights/model.bin": b"w" * 5000}
    a = publish(cli, write_tree(work / "a", files), "models/llama", "--meta", "source=test")
    b = publish(cli, write_tree(work / "b", tree(2, b"x")), "models/mistral", "--facts", "format")
    publish(cli, write_tree(work / "c", tree(1, b"c")), "other/thing")

    listed = cli.json("refs", "models/")
    rows = {r["ref"]: r for r in listed["refs"]}
    assert set(rows) == {"models/llama", "models/mistral"}
    assert rows["models/llama"]["snapshot"] == a
    assert rows["models/llama"]["files"] == 2
    assert rows["models/llama"]["bytes"] == 5002
    assert rows["models/mistral"]["compat"] == {"format": "2"}
    assert rows["models/mistral"]["snapshot"] == b
    assert all(len(r["compat_digest"]) == 64 and r["updated"] > 0 for r in rows.values())
    assert {r["ref"] for r in cli.json("refs")["refs"]} == {*rows, "other/thing"}
    assert {r["ref"] for r in cli.json("refs", "models/l")["refs"]} == {"models/llama"}
    human = cli.ok("refs", "models")
    assert re.search(rf"models/llama\s+\S{{12}}\s+.*format=2.*{a[:12]}\s+2\s+4\.9 KiB", human)
    assert "bad ref prefix" in cli.fails(2, "refs", "a b")
    for outside in ("../../", "models/../x", "a//b"):  # a usage error, not the origin's
        assert "no empty, '.' or '..' segment" in cli.fails(2, "refs", outside)
    # the API's query: a parameter misspelt or given twice is named, not ignored (a listing of
    # every ref for `?prefx=models/` read as the models' alone)
    assert hostd.api("GET", "/v1/refs?prefx=models/") == (
        400,
        {"error": "bad_request", "message": "unknown query parameter(s) 'prefx'; allowed: prefix"},
    )
    assert hostd.api("GET", "/v1/refs?prefix=models/&prefix=other/") == (
        400,
        {"error": "bad_request", "message": "query parameter 'prefix' given twice"},
    )
    status, body = hostd.api("GET", "/v1/refs?prefix=models/m")
    assert (status, [r["ref"] for r in body["refs"]]) == (200, ["models/mistral"])

    info = cli.json("inspect", "models/llama")
    assert info["snapshot"] == a
    assert info["ref"] == "models/llama"
    assert (info["files"], info["bytes"], info["format"]) == (2, 5002, 2)
    assert info["chunk_size"] == 4 * 1024 * 1024
    assert info["meta"] == {"source": "test"}
    assert info["compat"]["format"] == "2"
    assert info["created"] > 0
    assert [f["path"] for f in info["file_list"]] == ["config.json", "weights/model.bin"]
    assert info["file_list"][1]["size"] == 5000
    assert cli.json("inspect", a[:7])["snapshot"] == a  # by prefix
    human = cli.ok("inspect", a[:7])
    assert "chunk size   4.0 MiB" in human
    assert "weights/model.bin" in human
    cli.fails(3, "inspect", "models/none")


# -- ref history and rollback -----------------------------------------------------------------


def test_history_rollback_and_old_readers(cli: Cli, hostd: Hostd, work: Path) -> None:
    src = work / "src"
    v1 = publish(cli, write_tree(src, tree(3, b"1")), "demo/llama")
    v2 = publish(cli, write_tree(src, tree(3, b"2")), "demo/llama")
    assert publish(cli, src, "demo/llama") == v2  # the same tree again: no new entry

    hist = cli.json("ref", "history", "demo/llama")
    [key] = hist["keys"]
    assert [(e["seq"], e["snapshot"], e["current"]) for e in key["entries"]] == [
        (2, v2, True),
        (1, v1, False),
    ]

    rolled = cli.json("ref", "set", "demo/llama", v1[:8])
    assert (rolled["snapshot"], rolled["previous"], rolled["seq"]) == (v1, v2, 3)
    hist = cli.json("ref", "history", "demo/llama")
    assert [(e["seq"], e["snapshot"]) for e in hist["keys"][0]["entries"]] == [
        (3, v1),
        (2, v2),
        (1, v1),
    ]
    human = cli.ok("ref", "history", "demo/llama")
    assert re.search(rf"^3\s+{v1[:12]}\s+.*current$", human, re.M)

    # what an older reader sees: the ref object alone, now naming v1; a restore gets v1
    origin = hostd.root / "origin"
    digest = key["compat_digest"]
    assert (origin / "refs/demo/llama" / digest).read_text() == v1
    entry = origin / "history/demo/llama" / digest / "00000000000000000003"
    assert (
        refentry.decode(entry.read_bytes(), ref="demo/llama", compat=digest, seq=3).snapshot == v1
    )
    got = cli.json("restore", "demo/llama", str(work / "out"))
    assert got["snapshot"] == v1
    assert (work / "out/part/00.bin").read_bytes() == b"1" * 1000

    assert "too short" in cli.fails(2, "ref", "set", "demo/llama", v1[:3])
    err = cli.fails(3, "ref", "set", "demo/llama", "0" * 64)
    assert "has no manifest at origin" in err
    cli.fails(2, "ref", "set", "demo/llama")  # no ID
    cli.fails(3, "ref", "history", "no/such")
    assert cli.json("ref", "history", "demo/llama", "--limit", "1")["keys"][0]["older"] == 2

    # who moved the ref, and to what: the daemon's log says (and of each publish)
    uid = os.getuid()
    lines = hostd.log().splitlines()
    [moved] = [ln for ln in lines if f"ref set by uid {uid} (pid " in ln]
    assert "ref=demo/llama " in moved, moved
    assert f"snapshot={v1} " in moved, moved
    assert f"previous={v2} " in moved, moved
    published = [ln for ln in lines if f"publish by uid {uid} (pid " in ln]
    assert len(published) == 3, published
    assert f"snapshot={v2} " in published[1], published


def test_a_ref_from_before_history_keeps_its_old_target(cli: Cli, hostd: Hostd, work: Path) -> None:
    v1 = publish(cli, write_tree(work / "src", tree(2, b"o")), "demo/old")
    rmtree(hostd.root / "origin" / "history")  # as an older hostd left it: the ref object only
    [key] = cli.json("ref", "history", "demo/old")["keys"]
    assert key["entries"][0]["snapshot"] == v1
    assert key["entries"][0]["seq"] is None
    v2 = publish(cli, write_tree(work / "src", tree(2, b"n")), "demo/old")
    [key] = cli.json("ref", "history", "demo/old")["keys"]
    assert [(e["seq"], e["snapshot"]) for e in key["entries"]] == [(2, v2), (1, v1)]


# -- the publish guard ------------------------------------------------------------------------


def test_publish_refuses_an_empty_or_much_smaller_tree_unless_forced(cli: Cli, work: Path) -> None:
    src = write_tree(work / "src", tree(10, b"f"))
    v1 = publish(cli, src, "prod/model")
    empty = work / "empty"
    empty.mkdir()
    err = cli.fails(2, "publish", str(empty), "--ref", "prod/model")
    assert "refusing to move ref 'prod/model'" in err
    assert "is empty" in err
    assert "--force" in err
    err = cli.fails(2, "publish", str(empty), "--ref", "brand/new")  # a new ref too
    assert "is empty" in err
    small = write_tree(work / "small", tree(4, b"f"))
    err = cli.fails(2, "publish", str(small), "--ref", "prod/model")
    assert "4 files, fewer than half of the 10" in err
    assert cli.json("inspect", "prod/model")["snapshot"] == v1  # the ref did not move
    forced = publish(cli, small, "prod/model", "--force")
    assert cli.json("inspect", "prod/model")["snapshot"] == forced != v1
    assert publish(cli, write_tree(work / "s5", tree(5, b"f")), "prod/model")  # not a shrink


# -- the README's commands --------------------------------------------------------------------


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(
        r"<!-- everyday:snapshots -->\n```sh\n(.*?)```\n<!-- /everyday:snapshots -->", text, re.S
    )
    assert block, "README.md lacks the everyday:snapshots block"
    return [line.split("  #", 1)[0].strip() for line in block.group(1).splitlines() if line]


def test_readme_everyday_commands_run_verbatim(cli: Cli, hostd: Hostd, work: Path) -> None:
    src = work / "src"
    old = publish(cli, write_tree(src, tree(3, b"r")), "demo/llama")
    publish(cli, write_tree(src, tree(3, b"s")), "demo/llama")
    commands = readme_commands()
    assert [c.split()[1] for c in commands] == [
        "refs", "inspect", "ref", "ref", "prune", "prune", "rm",
    ]  # fmt: skip
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "HOSTD_SOCKET": str(hostd.socket),
        "PYTHONPATH": str(ROOT),
        "OLD": old[:8],
    }
    outputs = []
    for command in commands:
        proc = subprocess.run(
            ["sh", "-c", command], env=env, cwd=work, capture_output=True, text=True, timeout=60
        )
        assert proc.returncode == 0, (command, proc.stdout, proc.stderr)
        outputs.append(proc.stdout)
    assert "demo/llama" in outputs[0]
    assert old[:12] in outputs[3]
    assert ls_ids(cli) == set()


# -- who may ----------------------------------------------------------------------------------

NOBODY = 65534


@pytest.mark.skipif(os.geteuid() != 0, reason="acts as another user: needs root")
def test_rm_prune_need_admin_and_ref_set_needs_publish(work: Path, capsys: Any) -> None:
    """A caller `[access]` lets restore only may list and inspect, but not forget snapshots
    (admin, like gc) nor move a ref (publish)."""
    work.chmod(0o755)
    with Hostd(work / "d", socket_mode="0666", access={"publish": [], "admin": []}) as h:
        cli = Cli(h, capsys)
        sid = publish(cli, write_tree(work / "src", tree(2, b"n")), "demo/nobody")

        def as_nobody(*argv: str) -> subprocess.CompletedProcess[str]:
            cmd = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
            return subprocess.run(
                [*cmd, sys.executable, "-m", "hostd", *argv, "--socket", str(h.socket)],
                capture_output=True,
                text=True,
                timeout=60,
                cwd="/",
                env={**os.environ, "PYTHONPATH": str(ROOT), "HOME": "/"},
                check=False,
            )

        for argv in (
            ["rm", sid[:8]],
            ["prune", "--keep", "0"],
            ["ref", "set", "demo/nobody", sid],
        ):
            proc = as_nobody(*argv)
            assert proc.returncode == 5, (argv, proc.stdout, proc.stderr)
            assert "forbidden" in proc.stderr
        assert as_nobody("refs").returncode == 0
        assert as_nobody("inspect", "demo/nobody").returncode == 0
        assert ls_ids(cli) == {sid}


async def test_two_hosts_moving_one_ref_at_once_leave_its_history_naming_it(
    tmp_path: Path,
) -> None:
    """Host A writes its entry; host B moves the ref whole (its own entry on top, the ref
    object to its snapshot); then A's ref object lands last. The ref names A's snapshot and
    the newest entry B's: a rollback could no longer find A's. A, whose snapshot the ref
    still names, appends an entry that names it."""
    from hostd.core.ids import compat_digest
    from hostd.core.retry import RetryPolicy
    from hostd.origin import Origin
    from hostd.refs import RefLog

    url = f"file://{tmp_path}/origin"
    key = compat_digest({"format": "2"})
    old, a_sid, b_sid = "c" * 64, "a" * 64, "b" * 64
    origin = Origin(url, {}, retry=RetryPolicy(1, 0.0, 0.0))
    b_origin = Origin(url, {}, retry=RetryPolicy(1, 0.0, 0.0))
    b = RefLog(b_origin)

    class Racing(Origin):
        """A's origin: B's whole move comes between A's entry and A's ref object."""

        raced = False

        async def put_ref(self, ref: str, digest: str, snapshot_id: str) -> None:
            if not self.raced:
                self.raced = True
                await b.move(ref, digest, b_sid)
            await super().put_ref(ref, digest, snapshot_id)

    racing = Racing(url, {}, retry=RetryPolicy(1, 0.0, 0.0))
    try:
        await RefLog(origin).move("m/r", key, old)
        moved = await RefLog(racing).move("m/r", key, a_sid)
        assert await origin.get_ref("m/r", key) == a_sid
        seqs = await origin.list_history("m/r", key)
        assert seqs is not None
        raw = await origin.get_history("m/r", key, seqs[-1])
        assert raw is not None
        newest = refentry.decode(raw, ref="m/r", compat=key, seq=seqs[-1])
        assert newest.snapshot == a_sid
        assert moved.seq == seqs[-1]
        # B's entry is there too, below it: what the ref was set to, in the order it was
        names = [refentry.decode(r, ref="m/r", compat=key, seq=s).snapshot
                 for s in seqs if (r := await origin.get_history("m/r", key, s))]  # fmt: skip
        assert names == [old, a_sid, b_sid, a_sid]
    finally:
        for o in (origin, b_origin, racing):
            await o.close()
