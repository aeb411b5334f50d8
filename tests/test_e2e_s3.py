"""End-to-end against S3: real daemon processes and moto's S3 server (tests/s3server.py).

The origin is `s3://<bucket>/<prefix>`; one daemon gets the endpoint and keys from its
config's origin_options, another from the standard AWS_* variables only. What lands in the
bucket is listed with the server's own API, not through hostd.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import blake3
import pytest
from harness import Hostd, make_tree, rmtree, short_tmp, tree_digest
from s3server import S3Bucket

PREFIX = "fleet/snapshots"
DAMAGED_PREFIX = "damaged"  # an origin damaged behind hostd's back
CS = 256 << 10  # a small chunk size, for several chunks a small file

# root clients trusted with the cache's own inodes (test_trust.py has the default: copies)
TRUSTING = {"link_to_writers": True}


@pytest.fixture
def work() -> Iterator[Path]:
    """A short scratch directory under /tmp (socket paths must stay short), removed after."""
    root = short_tmp("e3")
    try:
        yield root
    finally:
        rmtree(root)


def source_tree(work: Path) -> tuple[Path, dict[str, Any]]:
    """make_tree plus a symlink leaving the tree; returns (tree, what a restore gives)."""
    src = make_tree(work / "src", seed=5)
    outside = work / "outside.bin"
    outside.write_bytes(random.Random(6).randbytes(50_000))
    os.symlink(outside, src / "outside-link")
    expected = tree_digest(src)
    expected["outside-link"] = ("file", outside.read_bytes(), False, outside.stat().st_mtime_ns)
    return src, expected


def unique_bytes(expected: dict[str, Any]) -> int:
    return sum(len(data) for data in {e[1] for e in expected.values() if e[0] == "file"})


def test_s3_origin_publish_and_restore(s3_server: S3Bucket, work: Path) -> None:
    src, expected = source_tree(work)
    origin = s3_server.url(PREFIX)
    # pack_size 0: the large file's chunks as objects of their own, as checked below
    with Hostd(
        work / "a",
        origin=origin,
        origin_options=s3_server.options,
        access=TRUSTING,
        pack_size=0,
    ) as a:
        status, st = a.api("GET", "/v1/status")
        assert status == 200
        assert st["origin"].startswith(f"s3://{s3_server.bucket}/{PREFIX}")
        assert s3_server.access_key_id not in str(st)
        assert s3_server.secret_access_key not in str(st)

        # 1 MiB chunks: the 3 MiB file is 4 chunk objects, the small files one pack
        pub = a.publish(src, "s3/tree", chunk_size=1 << 20)
        sid = pub["snapshot"]
        keys = s3_server.keys()
        assert keys, "nothing reached the bucket"
        assert all(k.startswith(PREFIX + "/") for k in keys), sorted(keys)
        chunk_keys = {k for k in keys if k.startswith(f"{PREFIX}/chunks/")}
        pack_keys = {k for k in keys if k.startswith(f"{PREFIX}/packs/")}
        assert chunk_keys, "the large file's chunks are objects of their own"
        assert len(pack_keys) == pub["packs"] > 0, "the small files are packed"
        assert len(chunk_keys) < pub["new_chunks"]
        objects = chunk_keys | pack_keys
        assert all(k.split("/")[-2] == k.split("/")[-1][:2] for k in objects), objects
        assert f"{PREFIX}/manifests/{sid}" in keys
        assert any(k.startswith(f"{PREFIX}/refs/s3/tree/") for k in keys), sorted(keys)
        # publishing again uploads nothing new
        assert a.publish(src, "s3/tree", chunk_size=1 << 20)["new_chunks"] == 0
        assert s3_server.keys() == keys

        for mode in ("link", "copy", "auto"):
            out = a.restore("s3/tree", work / f"out-{mode}", mode=mode)
            assert out["event"] == "result", out
            assert out["snapshot"] == sid
            assert tree_digest(work / f"out-{mode}") == expected, mode

    # Another host, keys from the standard AWS variables only, restores cold from S3.
    with Hostd(work / "b", origin=origin, env=s3_server.env, access=TRUSTING) as b:
        cold = b.restore("s3/tree", work / "cold")
        assert cold["event"] == "result", cold
        assert cold["snapshot"] == sid
        assert cold["bytes_by_source"]["origin"] == unique_bytes(expected)
        assert tree_digest(work / "cold") == expected
        # the chunks and packs came through hostd's own client, none handed back
        fast = {r: fast_reads(b, r) for r in ("taken", "fallback")}
        assert fast["taken"] >= 5, fast  # 4 chunk objects and a pack, at least
        assert fast["fallback"] == 0, fast
        warm = b.restore("s3/tree", work / "warm", mode="link")
        assert warm["bytes_by_source"]["origin"] == 0
        assert warm["bytes_by_source"]["mem"] == unique_bytes(expected)
        assert tree_digest(work / "warm") == expected
        missing = b.restore("s3/no-such", work / "none")
        assert missing["event"] == "error", missing
        assert missing["error"] == "not_found", missing
        assert not (work / "none").exists()

    # Told not to (HOSTD_FAST_GET=0), every read is obstore's, and the metric is absent.
    env = {**s3_server.env, "HOSTD_FAST_GET": "0"}
    with Hostd(work / "c", origin=origin, env=env, access=TRUSTING) as c:
        assert c.restore("s3/tree", work / "plain")["event"] == "result"
        assert tree_digest(work / "plain") == expected
        assert "hostd_origin_fast_reads" not in c.metrics()


def fast_reads(h: Hostd, result: str) -> float:
    for line in h.metrics().splitlines():
        if line.startswith(f'hostd_origin_fast_reads_total{{result="{result}"}}'):
            return float(line.split()[-1])
    raise AssertionError(f"no hostd_origin_fast_reads_total{{result={result!r}}} in /metrics")


def test_s3_large_files_in_packs_restore_with_ranged_gets(s3_server: S3Bucket, work: Path) -> None:
    """The default layout on a real S3 API: a large file's chunks in packs, restored cold
    through signed, ranged GETs received a chunk at a time; each span is one request."""
    data = random.Random(7).randbytes(6 << 20)
    src = work / "src"
    src.mkdir()
    (src / "weights.bin").write_bytes(data)
    origin = s3_server.url(PREFIX)
    with Hostd(work / "a", origin=origin, origin_options=s3_server.options, pack_size="2MiB") as a:
        pub = a.publish(src, "s3/weights", chunk_size=256 << 10)
        keys = s3_server.keys()
        assert not {k for k in keys if k.startswith(f"{PREFIX}/chunks/")}
        assert len({k for k in keys if k.startswith(f"{PREFIX}/packs/")}) == pub["packs"] == 3
    # fetch_range 1 MiB, 2 workers: spans of 1 MiB (4 chunks; the file's share per worker
    # is more), each one ranged GET through hostd's own client, signed by obstore
    with Hostd(
        work / "b", origin=origin, env=s3_server.env, fetch_range="1MiB", fetch_concurrency=2
    ) as b:
        cold = b.restore("s3/weights", work / "cold", mode="copy")
        assert cold["event"] == "result", cold
        assert (work / "cold" / "weights.bin").read_bytes() == data
        assert cold["bytes_by_source"]["origin"] == len(data)
        assert fast_reads(b, "taken") == 6
        assert fast_reads(b, "fallback") == 0


def _chunk_key(data: bytes) -> str:
    h = blake3.blake3(data).hexdigest()
    return f"{DAMAGED_PREFIX}/chunks/{h[:2]}/{h}"


@pytest.mark.parametrize("bad", [b"", b"truncated"], ids=["zero-byte", "short"])
def test_publish_does_not_trust_a_damaged_chunk_object(
    s3_server: S3Bucket, work: Path, bad: bytes
) -> None:
    """A chunk object under its name with bytes of a size the chunk cannot have (zero bytes,
    a truncated upload by another writer, a damaged bucket) was taken by publish as already
    there, on a HEAD: the snapshot it made restored nowhere, and publishing again did not
    mend it. Publish writes over it, and the snapshot restores."""
    data = random.Random(1).randbytes(3 * CS)
    src = work / "src"
    src.mkdir()
    (src / "big.bin").write_bytes(data)
    # the damaged object, under the right name, before any publish
    s3_server.put_raw(_chunk_key(data[CS : 2 * CS]), bad)
    origin = s3_server.url(DAMAGED_PREFIX)
    with Hostd(work / "a", origin=origin, origin_options=s3_server.options, pack_size=0) as a:
        a.publish(src, "dmg/chunk", chunk_size=CS)
    with Hostd(work / "b", origin=origin, origin_options=s3_server.options) as b:
        out = b.restore("dmg/chunk", work / "out", mode="copy")
        assert out["event"] == "result", out
        assert (work / "out" / "big.bin").read_bytes() == data


def test_republish_does_not_reuse_a_damaged_pack(s3_server: S3Bucket, work: Path) -> None:
    """A republish points the tree's unchanged chunks at the previous snapshot's packs. One
    truncated at the origin since (a damaged bucket, a bad lifecycle rule) was reused with no
    look at it, so every later publish pointed at it again. Each previous pack gets a HEAD:
    one missing or of another size than its manifest states is not reused."""
    src = work / "src"
    src.mkdir()
    rng = random.Random(2)
    for i in range(20):
        (src / f"f{i:02}.bin").write_bytes(rng.randbytes(10_000))
    origin = s3_server.url(DAMAGED_PREFIX)
    with Hostd(work / "a", origin=origin, origin_options=s3_server.options) as a:
        a.publish(src, "dmg/pack", chunk_size=CS)
        packs = sorted(k for k in s3_server.keys() if k.startswith(f"{DAMAGED_PREFIX}/packs/"))  # noqa: SIM118
        assert packs
        for key in packs:
            s3_server.overwrite(key, b"")  # behind hostd's back
        (src / "new.bin").write_bytes(rng.randbytes(5000))  # a changed tree, published again
        a.publish(src, "dmg/pack", chunk_size=CS)
    with Hostd(work / "b", origin=origin, origin_options=s3_server.options) as b:
        out = b.restore("dmg/pack", work / "out", mode="copy")
        assert out["event"] == "result", out
        assert (work / "out" / "f07.bin").read_bytes() == (src / "f07.bin").read_bytes()
