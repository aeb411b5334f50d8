# ruff: noqa: F811  (the `work` fixture, imported)
"""Names a publisher chose, as the command line prints them: control characters (C0, C1 and
bidi overrides) shown as "?", never sent to the caller's terminal (a real daemon and CLI)."""

from __future__ import annotations

import os
from pathlib import Path

from harness import Hostd
from test_e2e import cli
from test_faults import work  # noqa: F401  (a fixture)


def at(h: Hostd) -> dict[str, str]:
    """The CLI's environment for daemon `h`."""
    return {"HOSTD_SOCKET": str(h.socket)}


def test_a_progressive_restore_prints_landed_paths_without_control_characters(
    work: Path,
) -> None:
    """A name is the publisher's: ESC, BEL or a newline in it must not reach the restoring
    caller's terminal raw (inspect already shows each as "?")."""
    src = work / "src"
    src.mkdir()
    (src / "\x1b[31mred").write_bytes(b"a")
    (src / "new\nline").write_bytes(b"b")
    with Hostd(work / "d") as h:
        h.publish(src, "t/esc")
        got = cli("restore", "t/esc", str(work / "out"), "--progressive", env=at(h))
    assert got.returncode == 0, got.stderr
    assert "\x1b" not in got.stdout
    lines = got.stdout.splitlines()
    assert "?[31mred" in lines
    assert "new?line" in lines
    assert sorted(os.listdir(work / "out")) == ["\x1b[31mred", "new\nline"]


def test_inspect_shows_c1_and_bidi_controls_in_a_name_as_question_marks(work: Path) -> None:
    """U+009B is a one-character CSI to some terminals; U+202E makes `txt.exe` read backwards."""
    src = work / "src"
    src.mkdir()
    (src / "a\u009b2Jb").write_bytes(b"a")
    (src / "x\u202etxt.exe").write_bytes(b"b")
    with Hostd(work / "d") as h:
        h.publish(src, "t/bidi")
        got = cli("inspect", "t/bidi", env=at(h))
    assert got.returncode == 0, got.stderr
    text = got.stdout
    assert "\u009b" not in text
    assert "\u202e" not in text
    assert "a?2Jb" in text
    assert "x?txt.exe" in text
