"""Publish then restore through a real daemon process over its real socket."""

from __future__ import annotations

import os
from pathlib import Path

from harness import Hostd, make_tree, short_tmp, tree_digest

from hostd.core.codec import ZSTD_MAGIC


def test_publish_then_restore_gives_the_same_tree() -> None:
    work = short_tmp()
    src = make_tree(work / "src")
    # a fleet that trusts its root clients with the cache's own inodes (test_trust.py has the
    # default, where root gets copies)
    with Hostd(work / "d", access={"link_to_writers": True}) as d:
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


def test_compressible_files_are_stored_zstd_and_weights_raw() -> None:
    work = short_tmp()
    src = work / "src"
    src.mkdir()
    text = b"".join(
        b'{"layer": %d, "dtype": "bf16", "shape": [4096, 4096]}\n' % i for i in range(60000)
    )
    (src / "config.jsonl").write_bytes(text)  # ~3.4 MiB of text: three 1 MiB chunks and a tail
    (src / "weights.bin").write_bytes(os.urandom(3 * 1024 * 1024))
    cs = 1024 * 1024
    with Hostd(work / "d", pack_size=0) as d:  # each chunk an object of its own, read below
        pub = d.publish(src, "demo/zstd", chunk_size=cs)
        text_chunks = -(-len(text) // cs)
        assert pub["compressed_chunks"] == text_chunks
        assert pub["stored_bytes"] < pub["bytes"] - len(text) // 2
        stored = sorted((work / "d" / "origin" / "chunks").rglob("*"))
        objects = [p.read_bytes() for p in stored if p.is_file()]
        assert sum(o.startswith(ZSTD_MAGIC) for o in objects) == text_chunks
        out = d.restore("demo/zstd", work / "out", mode="copy")
        assert out["event"] == "result", out
        assert tree_digest(work / "out") == tree_digest(src)
    # a cold daemon decodes them from the origin
    with Hostd(work / "cold", origin=f"file://{work}/d/origin") as cold:
        out = cold.restore("demo/zstd", work / "out-cold")
        assert out["bytes_by_source"]["origin"] == out["bytes"]
        assert tree_digest(work / "out-cold") == tree_digest(src)
