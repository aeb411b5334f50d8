# ruff: noqa: F811  (the `work` fixture, imported)
"""Names a publisher chose, as the command line prints them: control characters (C0, C1 and
bidi overrides) shown as "?", never sent to the caller's terminal (a real daemon and CLI)."""

from __future__ import annotations

import os
from pathlib import Path
from subprocess import CompletedProcess

from harness import Hostd
from test_e2e import cli
from test_faults import work  # noqa: F401  (a fixture)


def published_names(work: Path, names: list[str], ref: str, *args: str) -> CompletedProcess[str]:
    """Publish files named `names` as `ref` into a daemon, then run `hostd ARGS` against
    it."""
    src = work / "src"
    src.mkdir()
    for i, name in enumerate(names):
        (src / name).write_bytes(b"%d" % i)
    with Hostd(work / "d") as h:
        h.publish(src, ref)
        return cli(*args, env={"HOSTD_SOCKET": str(h.socket)})


def test_a_progressive_restore_prints_landed_paths_without_control_characters(
    work: Path,
) -> None:
    """A name is the publisher's: ESC, BEL or a newline in it must not reach the restoring
    caller's terminal raw (inspect already shows each as "?")."""
    names = ["\x1b[31mred", "new\nline"]
    got = published_names(
        work, names, "t/esc", "restore", "t/esc", str(work / "out"), "--progressive"
    )
    assert got.returncode == 0, got.stderr
    assert "\x1b" not in got.stdout
    lines = got.stdout.splitlines()
    assert "?[31mred" in lines
    assert "new?line" in lines
    assert sorted(os.listdir(work / "out")) == ["\x1b[31mred", "new\nline"]


def test_inspect_shows_c1_and_bidi_controls_in_a_name_as_question_marks(work: Path) -> None:
    """U+009B is a one-character CSI to some terminals; U+202E makes `txt.exe` read backwards."""
    got = published_names(work, ["a\u009b2Jb", "x\u202etxt.exe"], "t/bidi", "inspect", "t/bidi")
    assert got.returncode == 0, got.stderr
    text = got.stdout
    assert "\u009b" not in text
    assert "\u202e" not in text
    assert "a?2Jb" in text
    assert "x?txt.exe" in text
