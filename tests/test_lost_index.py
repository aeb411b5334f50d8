"""A daemon whose index and manifests are gone keeps its blobs and trusts none blindly."""

from __future__ import annotations

import shutil

from harness import Hostd, make_tree, short_tmp, tree_digest


def test_blobs_outlive_a_lost_index() -> None:
    work = short_tmp()
    src = make_tree(work / "src")
    d = Hostd(work / "d")
    with d:
        pub = d.publish(src, "demo/lost")
    state = work / "d" / "state"
    shutil.rmtree(state)  # index and manifests: gone; the tiers still hold the blobs
    with d:
        out = d.stream("/v1/verify", {})
        assert out["event"] == "result", out
        assert out["bad"] == [], "unreferenced blobs are not bad blobs"
        assert out["skipped_unreferenced"] >= 1
        # the snapshot comes back from the origin; its blobs are cache hits and verifiable
        res = d.restore("demo/lost", work / "out", mode="copy")
        assert res["event"] == "result", res
        assert res["snapshot"] == pub["snapshot"]
        assert res["bytes_by_source"]["origin"] == 0
        assert tree_digest(work / "out") == tree_digest(src)
        again = d.stream("/v1/verify", {})
        assert again["bad"] == []
        assert again["skipped_unreferenced"] == 0
        assert again["checked_blobs"] >= out["skipped_unreferenced"]
