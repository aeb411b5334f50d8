# ruff: noqa: F811  (the `work` fixture, imported)
"""A caller's own rights refusing it, as an operator meets it: the README and the exit code
table say such a refusal is `forbidden` (403, exit 5) like one by `[access]`, and that the
message names the problem. A target under a directory the caller cannot search, or a publish
source it cannot read, was a 400 `bad_request` (exit 2) reading "Permission denied (x)", and
the CLI blamed `[access]` for refusals `[access]` had no part in."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import ROOT, Hostd, make_tree
from test_trust import work  # noqa: F401  (a fixture)

NOBODY = 65534
AS_NOBODY = ("setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups")
# root without the capabilities that pass over file modes: its own rights decide, as nobody's
WEAK_ROOT = ("setpriv", "--bounding-set=-dac_override,-dac_read_search", "--inh-caps=-all")

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="acts as other users: needs root")


def curl_as_nobody(sock: Path, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """POST as nobody; the HTTP status and the answer's first JSON line."""
    out = subprocess.run(
        [*AS_NOBODY, "curl", "-sS", "--unix-socket", str(sock), "-X", "POST",
         "-H", "Content-Type: application/json", "--data-binary", "@-",
         "-w", "\n%{http_code}", f"http://hostd{path}"],
        input=json.dumps(body), capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    *lines, code = out.stdout.splitlines()
    return int(code), json.loads(lines[0])


def test_a_target_the_caller_cannot_reach_is_forbidden_and_named(work: Path) -> None:
    private = work / "private"
    private.mkdir(mode=0o700)  # root's: nobody may not look inside
    with Hostd(work / "d", socket_mode="0666") as d:
        d.publish(make_tree(work / "src"), "m/tree")
        target = f"{private}/out"
        status, body = curl_as_nobody(d.socket, "/v1/restore", {"ref": "m/tree", "target": target})
        assert (status, body["error"]) == (403, "forbidden"), body
        assert target in body["message"], body
        assert "permission denied" in body["message"], body
        assert list(private.iterdir()) == []
        theirs = work / "theirs"  # nobody's, holding a tree of root's it may not move
        theirs.mkdir()
        os.chown(theirs, NOBODY, NOBODY)
        (theirs / "old").mkdir()
        (theirs / "old" / "kept").write_text("root's\n")
        ask = {"ref": "m/tree", "target": str(theirs / "old"), "replace": True}
        status, body = curl_as_nobody(d.socket, "/v1/restore", ask)
        assert (status, body["error"]) == (403, "forbidden"), body
        assert f"cannot replace '{theirs / 'old'}'" in body["message"], body
        assert sorted(os.listdir(theirs)) == ["old"]
        assert os.listdir(theirs / "old") == ["kept"]


def test_a_source_the_caller_cannot_read_is_forbidden_and_named(work: Path) -> None:
    src = make_tree(work / "src")
    for dirpath, _, files in os.walk(src):
        os.chmod(dirpath, 0o755)
        for n in files:
            os.chmod(os.path.join(dirpath, n), 0o644)
    (src / "closed").mkdir(mode=0o700)
    with Hostd(work / "d", socket_mode="0666", access={"publish": [f"uid:{NOBODY}"]}) as d:
        status, body = curl_as_nobody(d.socket, "/v1/publish", {"path": str(src), "ref": "m/p"})
        assert (status, body["error"]) == (403, "forbidden"), body
        assert "'closed'" in body["message"], body
        assert "permission denied" in body["message"], body


def test_the_cli_exits_5_and_does_not_blame_access_for_the_callers_rights(work: Path) -> None:
    theirs = work / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, NOBODY, NOBODY)  # root reaches in only through CAP_DAC_OVERRIDE
    with Hostd(work / "d") as d:
        d.publish(make_tree(work / "src"), "m/tree")
        p = subprocess.run(
            [*WEAK_ROOT, sys.executable, "-m", "hostd", "restore", "m/tree",
             str(theirs / "out"), "--socket", str(d.socket)],
            capture_output=True, text=True, timeout=120, check=False,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )  # fmt: skip
        assert p.returncode == 5, p.stderr
        assert p.stderr.startswith("hostd: forbidden: "), p.stderr
        assert "[access]" not in p.stderr, p.stderr
        assert str(theirs / "out") in p.stderr, p.stderr


@contextlib.contextmanager
def _immutable(path: Path) -> Iterator[None]:
    if shutil.which("chattr") is None:
        pytest.skip("needs chattr (e2fsprogs)")
    if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
        pytest.skip(f"{path}'s filesystem keeps no immutable flag")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


def test_an_immutable_parent_is_not_the_callers_rights(work: Path) -> None:
    """Root, every capability held, restores into an immutable directory: the filesystem
    refuses (EPERM), not root's rights nor [access]; hostd must not answer 403 `forbidden`
    (exit 5, "forbidden"), which sends an operator to its [access] table or its chmods."""
    src = make_tree(work / "src", big=70 * 1024)
    (work / "imm").mkdir()
    with Hostd(work / "d") as d:
        d.publish(src, "rv/imm")
        with _immutable(work / "imm"):
            out = d.restore("rv/imm", work / "imm" / "out", mode="copy")
        assert out["event"] == "error", out
        assert out["error"] != "forbidden", out
        assert "not permitted" in out["message"].lower(), out
