"""Publish then restore through a real daemon process over its real socket."""

from __future__ import annotations

from pathlib import Path

from harness import Hostd, make_tree, short_tmp, tree_digest


def test_publish_then_restore_gives_the_same_tree() -> None:
    work = short_tmp()
    src = make_tree(work / "src")
    with Hostd(work / "d") as d:
        pub = d.publish(src, "demo/tree")
        assert pub["files"] == 5
        assert pub["new_chunks"] >= 1
        for mode in ("link", "copy", "auto"):
            out = d.restore("demo/tree", work / f"out-{mode}", mode=mode)
            assert out["event"] == "result", out
            assert out["snapshot"] == pub["snapshot"]
            assert tree_digest(work / f"out-{mode}") == tree_digest(src)
            assert set(out["timings"]) >= {"resolve", "fetch", "materialize", "total"}


def test_restore_of_unknown_ref_is_not_found(tmp_path: Path) -> None:
    with Hostd() as d:
        out = d.restore("no/such-ref", tmp_path / "out")
        assert out["event"] == "error"
        assert out["error"] == "not_found"
        assert not (tmp_path / "out").exists()
