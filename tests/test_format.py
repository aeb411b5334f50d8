"""Golden vectors: the byte-exact formats of docs/FORMAT.md, checked against the code.

The values below are hard-coded on purpose. If one of these tests fails, an encoding has
changed and every snapshot id with it: that needs a new format version, not a new vector.
The last tests check that docs/FORMAT.md states the same vectors, so doc and code cannot drift.
"""

from __future__ import annotations

import dataclasses
import random
import re
from pathlib import Path

import blake3
import pytest

from hostd.core import ids, refentry
from hostd.core import manifest as mf
from hostd.core.retry import RetryPolicy
from hostd.errors import UsageError
from hostd.origin import Origin

FORMAT_MD = Path(__file__).resolve().parent.parent / "docs" / "FORMAT.md"

# -- inputs (FORMAT.md section 8) -------------------------------------------------------------

EMPTY = b""
HELLO = b"hello"
PATTERN = bytes(i % 251 for i in range(1 << 20))
FACTS_F = {"format": "1", "arch": "x86_64", "gpu_model": "NVIDIA H100 80GB HBM3"}
GOLDEN_COMPAT = {"arch": "x86_64", "format": "1"}
GOLDEN_REF = "llama-3-8b/vllm"

# -- expected values, computed once and checked by hand against the spec ----------------------

CHUNK_ID_EMPTY = "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
CHUNK_ID_HELLO = "ea8f163db38682925e4491c5e58d4bb3506ef8c14eb78a86e908c5624a67200f"
CHUNK_ID_PATTERN = "74cb441fd087764ca9c3694da742ebe30cbeb3060a17009ca81825c7a8d10343"
FILE_DIGEST_EMPTY = "4fa281452a08e8796c72f5e13215f3b21324db816cb52e6a4a06ee5c77ed3dba"
FILE_DIGEST_HELLO = "195923a739ef74fa2cd93a20b2bac785640db0a9f6b3423c7b265bfc540055ab"
FILE_DIGEST_PATTERN_HELLO = "fb8fae32d7618e7ccd452f42ac725dd1f5596f7c6f202a993ffa98e8d5560fab"
COMPAT_DIGEST_EMPTY = "a040fbb94f92e436da67a20ae651136bbe8b5437330a8a584a303821e87ae8f7"
COMPAT_DIGEST_F = "a250d4ee4b0c9bc4ea772f2a83796c966e35294a4fc207e87424e794aedbd308"
COMPAT_BODY_F = (
    "83a461726368a67838365f3634a6666f726d6174a131a96770755f6d6f64656c"
    "b54e5649444941204831303020383047422048424d33"
)
COMPAT_DIGEST_GOLDEN = "6d344035ce9aea211ac9bec481752e6ec2fbe281e9a4fb077eed3e9a76ddf37f"
SNAPSHOT_ID = "a97fe72fe132dbe3fa56fbf7fca6a57d7aa474fbcf63574685511f63e63761f1"
FILE_DIGEST_INPUT_HELLO = (
    "686f7374642e66696c652e763100"
    "ea8f163db38682925e4491c5e58d4bb3506ef8c14eb78a86e908c5624a67200f"
    "0500000000000000"
)
GOLDEN_MANIFEST_HEX = (
    "87aa6368756e6b5f73697a65ce00100000a6636f6d70617482a461726368a67838365f3634a6666f726d6174"
    "a131a46469727391a56361636865a566696c65739284a66368756e6b739193c420ea8f163db38682925e4491"
    "c5e58d4bb3506ef8c14eb78a86e908c5624a67200f0500a46d6f6465cd01a4a470617468a6524541444d45a4"
    "73697a650584a66368756e6b739293c42074cb441fd087764ca9c3694da742ebe30cbeb3060a17009ca81825"
    "c7a8d10343ce001000000093c420ea8f163db38682925e4491c5e58d4bb3506ef8c14eb78a86e908c5624a67"
    "200f0501a46d6f6465cd0180a470617468b16d6f64656c2f776569676874732e62696ea473697a65ce001000"
    "05a6666f726d617401a46d65746182aa637265617465645f6279a5686f737464a6736f75726365a6676f6c64"
    "656ea873796d6c696e6b739182a470617468ac6d6f64656c2f726561646d65a6746172676574a92e2e2f5245"
    "41444d45"
)

# Format 2 (FORMAT.md "Format 2 golden vectors").
WORLD = b"world"
PACK_P = HELLO + WORLD
CHUNK_ID_WORLD = "d7894ae9716d38d2dfad0ec55424ca321ee12453d51f1b3adeb77d0475ed988c"
PACK_ID_P = "7bb205244d808356318ec65d0ae54f32ee3a7bab5dfaf431b01e567e03baab4f"
SNAPSHOT_ID_V2 = "48d7dbf713ae7c867e7bfc2010c840129fa6e5ed5ff6143ac124deca28ca7246"
COMPAT_DIGEST_GOLDEN_V2 = "a3652d95360bf7ad8750ec012837f099e4d11a7e3c367b157e3b1ad5a3c5dd05"
MTIME = 1_700_000_000_123_456_789
GOLDEN_MANIFEST_V2_HEX = (
    "88aa6368756e6b5f73697a65ce00100000a6636f6d70617482a461726368a67838365f3634a6666f726d6174"
    "a132a46469727391a56361636865a566696c65739385a66368756e6b739196c420ea8f163db38682925e4491"
    "c5e58d4bb3506ef8c14eb78a86e908c5624a67200f0500000005a46d6f6465cd01a4a56d74696d65cf17979c"
    "fe3d85cd15a470617468a6524541444d45a473697a650585a66368756e6b739293c42074cb441fd087764ca9"
    "c3694da742ebe30cbeb3060a17009ca81825c7a8d10343ce001000000093c420ea8f163db38682925e4491c5"
    "e58d4bb3506ef8c14eb78a86e908c5624a67200f0501a46d6f6465cd0180a56d74696d65cf17979cfe3d85cd"
    "15a470617468b16d6f64656c2f776569676874732e62696ea473697a65ce0010000585a66368756e6b739196"
    "c420d7894ae9716d38d2dfad0ec55424ca321ee12453d51f1b3adeb77d0475ed988c0500000505a46d6f6465"
    "cd0124a56d74696d65d2c4653600a470617468a76f6c642e747874a473697a6505a6666f726d617402a46d65"
    "746182aa637265617465645f6279a5686f737464a6736f75726365a6676f6c64656ea57061636b739192c420"
    "7bb205244d808356318ec65d0ae54f32ee3a7bab5dfaf431b01e567e03baab4f0aa873796d6c696e6b739182"
    "a470617468ac6d6f64656c2f726561646d65a6746172676574a92e2e2f524541444d45"
)

# The doc's vectors tables: their left column, mapped to the values above.
DOC_TABLE = {
    "chunk_id(empty)": CHUNK_ID_EMPTY,
    "chunk_id(hello)": CHUNK_ID_HELLO,
    "chunk_id(pattern)": CHUNK_ID_PATTERN,
    "file_digest(no chunks)": FILE_DIGEST_EMPTY,
    "file_digest(hello)": FILE_DIGEST_HELLO,
    "file_digest(pattern, hello)": FILE_DIGEST_PATTERN_HELLO,
    "compat_digest({})": COMPAT_DIGEST_EMPTY,
    "compat_digest(F)": COMPAT_DIGEST_F,
    "msgpack(F)": COMPAT_BODY_F,
    "snapshot_id(golden manifest)": SNAPSHOT_ID,
    "chunk_id(world)": CHUNK_ID_WORLD,
    "pack_id(P)": PACK_ID_P,
    "snapshot_id(golden manifest v2)": SNAPSHOT_ID_V2,
}


def golden_manifest() -> mf.Manifest:
    hello = bytes.fromhex(CHUNK_ID_HELLO)
    pattern = bytes.fromhex(CHUNK_ID_PATTERN)
    return mf.build(
        chunk_size=1 << 20,
        files=[
            # Given out of order on purpose: build sorts.
            mf.FileEntry(
                "model/weights.bin",
                0o600,
                (1 << 20) + 5,
                (mf.Chunk(pattern, 1 << 20, mf.CODEC_RAW), mf.Chunk(hello, 5, mf.CODEC_ZSTD)),
            ),
            mf.FileEntry("README", 0o644, 5, (mf.Chunk(hello, 5, mf.CODEC_RAW),)),
        ],
        symlinks=[mf.Symlink("model/readme", "../README")],
        dirs=["cache"],
        compat={"format": "1", "arch": "x86_64"},
        meta={"source": "golden", "created_by": "hostd"},
        format=1,
    )


def golden_manifest_v2() -> mf.Manifest:
    hello = bytes.fromhex(CHUNK_ID_HELLO)
    world = bytes.fromhex(CHUNK_ID_WORLD)
    pattern = bytes.fromhex(CHUNK_ID_PATTERN)
    pack = bytes.fromhex(PACK_ID_P)
    return mf.build(
        chunk_size=1 << 20,
        files=[
            mf.FileEntry(
                "model/weights.bin",
                0o600,
                (1 << 20) + 5,
                (mf.Chunk(pattern, 1 << 20, mf.CODEC_RAW), mf.Chunk(hello, 5, mf.CODEC_ZSTD)),
                MTIME,
            ),
            mf.FileEntry(
                "README", 0o644, 5, (mf.Chunk(hello, 5, 0, mf.Packed(pack, 0, 5, 10)),), MTIME
            ),
            mf.FileEntry(
                "old.txt",
                0o444,
                5,
                (mf.Chunk(world, 5, 0, mf.Packed(pack, 5, 5, 10)),),
                -1_000_000_000,
            ),
        ],
        symlinks=[mf.Symlink("model/readme", "../README")],
        dirs=["cache"],
        compat={"format": "2", "arch": "x86_64"},
        meta={"source": "golden", "created_by": "hostd"},
    )


# -- the code produces the vectors ------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "expected"),
    [(EMPTY, CHUNK_ID_EMPTY), (HELLO, CHUNK_ID_HELLO), (PATTERN, CHUNK_ID_PATTERN)],
    ids=["empty", "hello", "pattern"],
)
def test_chunk_id_is_blake3_of_the_raw_bytes(data: bytes, expected: str) -> None:
    assert ids.chunk_id(data).hex() == expected
    assert ids.chunk_id(memoryview(data)) == bytes.fromhex(expected)
    assert ids.verify_chunk(bytes.fromhex(expected), data)
    assert not ids.verify_chunk(bytes.fromhex(expected), data + b"\x00")


def test_file_digests() -> None:
    hello = bytes.fromhex(CHUNK_ID_HELLO)
    pattern = bytes.fromhex(CHUNK_ID_PATTERN)
    assert ids.file_digest([]).hex() == FILE_DIGEST_EMPTY
    assert ids.file_digest([(hello, 5)]).hex() == FILE_DIGEST_HELLO
    assert ids.file_digest([(pattern, 1 << 20), (hello, 5)]).hex() == FILE_DIGEST_PATTERN_HELLO
    # Order and sizes are part of the digest.
    assert ids.file_digest([(hello, 5), (pattern, 1 << 20)]).hex() != FILE_DIGEST_PATTERN_HELLO
    assert ids.file_digest([(hello, 6)]).hex() != FILE_DIGEST_HELLO


def test_file_digest_hashes_exactly_the_documented_bytes() -> None:
    tag = b"hostd.file.v1\x00"
    hello = bytes.fromhex(CHUNK_ID_HELLO)
    spelled = tag + hello + (5).to_bytes(8, "little")
    assert spelled.hex() == FILE_DIGEST_INPUT_HELLO
    assert blake3.blake3(spelled).hexdigest() == FILE_DIGEST_HELLO
    assert blake3.blake3(tag).hexdigest() == FILE_DIGEST_EMPTY
    two = tag + bytes.fromhex(CHUNK_ID_PATTERN) + (1 << 20).to_bytes(8, "little")
    two += hello + (5).to_bytes(8, "little")
    assert blake3.blake3(two).hexdigest() == FILE_DIGEST_PATTERN_HELLO


def test_compat_digests() -> None:
    assert ids.compat_digest({}) == COMPAT_DIGEST_EMPTY
    assert ids.compat_digest(FACTS_F) == COMPAT_DIGEST_F
    # The facts' insertion order plays no part; their values and names do.
    assert ids.compat_digest(dict(reversed(list(FACTS_F.items())))) == COMPAT_DIGEST_F
    assert ids.compat_digest({**FACTS_F, "arch": "aarch64"}) != COMPAT_DIGEST_F
    assert ids.compat_digest(GOLDEN_COMPAT) == COMPAT_DIGEST_GOLDEN
    tag = b"hostd.compat.v1\x00"
    assert blake3.blake3(tag + bytes.fromhex(COMPAT_BODY_F)).hexdigest() == COMPAT_DIGEST_F
    assert blake3.blake3(tag + b"\x80").hexdigest() == COMPAT_DIGEST_EMPTY  # empty fixmap


def test_compat_body_is_sorted_shortest_msgpack() -> None:
    # Spelled out by hand: fixmap of 3, then fixstr key / fixstr value pairs in key order
    # (the 21-byte GPU name is still a fixstr, which holds up to 31 bytes).
    def fixstr(s: str) -> bytes:
        return bytes([0xA0 | len(s)]) + s.encode()

    body = bytes([0x83])
    for k in ("arch", "format", "gpu_model"):
        body += fixstr(k) + fixstr(FACTS_F[k])
    assert body.hex() == COMPAT_BODY_F


def test_golden_manifest_bytes_and_snapshot_id() -> None:
    m = golden_manifest()
    assert m.encoded.hex() == GOLDEN_MANIFEST_HEX
    assert len(m.encoded) == 356
    assert m.snapshot_id == SNAPSHOT_ID
    assert blake3.blake3(bytes.fromhex(GOLDEN_MANIFEST_HEX)).hexdigest() == SNAPSHOT_ID
    assert [f.digest.hex() for f in m.files] == [FILE_DIGEST_HELLO, FILE_DIGEST_PATTERN_HELLO]


def test_manifest_encoding_ignores_mapping_insertion_order() -> None:
    m = golden_manifest()
    shuffled = dataclasses.replace(
        m,
        compat=dict(reversed(list(m.compat.items()))),
        meta=dict(reversed(list(m.meta.items()))),
    )
    assert list(shuffled.meta) == ["source", "created_by"]
    assert mf.encode(shuffled).hex() == GOLDEN_MANIFEST_HEX


def test_golden_manifest_decodes_to_the_same_manifest() -> None:
    m = mf.decode(bytes.fromhex(GOLDEN_MANIFEST_HEX))
    assert m == golden_manifest()
    assert m.snapshot_id == SNAPSHOT_ID
    assert [f.path for f in m.files] == ["README", "model/weights.bin"]
    assert m.files[1].chunks[1] == mf.Chunk(bytes.fromhex(CHUNK_ID_HELLO), 5, mf.CODEC_ZSTD)
    assert m.symlinks == (mf.Symlink("model/readme", "../README"),)
    assert m.dirs == ("cache",)
    assert dict(m.compat) == GOLDEN_COMPAT
    assert dict(m.meta) == {"created_by": "hostd", "source": "golden"}
    assert m.format == 1


def test_ids_are_lowercase_hex_and_nothing_else() -> None:
    raw = bytes.fromhex(SNAPSHOT_ID)
    assert ids.to_hex(raw) == SNAPSHOT_ID
    assert ids.parse_hex(SNAPSHOT_ID) == raw
    assert ids.is_hex_id(SNAPSHOT_ID)
    for bad in (SNAPSHOT_ID.upper(), SNAPSHOT_ID[:-1], SNAPSHOT_ID + "0", f" {SNAPSHOT_ID}"):
        assert not ids.is_hex_id(bad)
        with pytest.raises(UsageError, match="snapshot id must be 64 lowercase hex digits"):
            ids.parse_hex(bad, "snapshot id")


async def test_golden_snapshot_origin_layout(tmp_path: Path) -> None:
    root = tmp_path / "origin"
    origin = Origin(
        root.as_uri(),
        {},
        retry=RetryPolicy(attempts=1, base=0.0, cap=0.0),
        rng=random.Random(0),
    )
    m = golden_manifest()
    await origin.put_chunk(bytes.fromhex(CHUNK_ID_HELLO), HELLO)
    await origin.put_chunk(bytes.fromhex(CHUNK_ID_PATTERN), PATTERN)
    await origin.put_manifest(m.snapshot_id, m.encoded)
    await origin.put_ref(GOLDEN_REF, ids.compat_digest(m.compat), m.snapshot_id)
    await origin.close()
    keys = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
    assert keys == set(_doc_block("golden-origin"))
    ref_key = f"refs/{GOLDEN_REF}/{COMPAT_DIGEST_GOLDEN}"
    assert (root / ref_key).read_bytes() == SNAPSHOT_ID.encode("ascii")  # no newline
    assert (root / f"manifests/{SNAPSHOT_ID}").read_bytes().hex() == GOLDEN_MANIFEST_HEX


# -- docs/FORMAT.md states the same vectors ---------------------------------------------------


def _doc() -> str:
    return FORMAT_MD.read_text(encoding="utf-8")


def _doc_block(info: str) -> list[str]:
    """The lines of the fenced block tagged `info`, each without its `#` comment."""
    blocks = re.findall(rf"^```{re.escape(info)}\n(.*?)^```$", _doc(), re.M | re.S)
    assert len(blocks) == 1, f"FORMAT.md should have one ```{info} block"
    lines = (line.split("#", 1)[0].strip() for line in blocks[0].splitlines())
    return [line for line in lines if line]


def test_doc_vectors_table_matches() -> None:
    rows = dict(re.findall(r"^\| `([^`]+)` \| `([0-9a-f]+)` \|$", _doc(), re.M))
    assert rows == DOC_TABLE


def test_doc_golden_manifest_bytes_match() -> None:
    assert "".join(_doc_block("golden-manifest")) == GOLDEN_MANIFEST_HEX


def test_doc_file_digest_example_matches() -> None:
    assert "".join(_doc_block("golden-file-digest-input")) == FILE_DIGEST_INPUT_HELLO


def test_doc_origin_keys_match() -> None:
    assert _doc_block("golden-origin") == [
        f"chunks/{CHUNK_ID_HELLO[:2]}/{CHUNK_ID_HELLO}",
        f"chunks/{CHUNK_ID_PATTERN[:2]}/{CHUNK_ID_PATTERN}",
        f"manifests/{SNAPSHOT_ID}",
        f"refs/{GOLDEN_REF}/{COMPAT_DIGEST_GOLDEN}",
    ]


# -- format 2 -----------------------------------------------------------------------------------


def test_golden_manifest_v2_bytes_and_ids() -> None:
    assert chunk_id_hex(WORLD) == CHUNK_ID_WORLD
    assert blake3.blake3(PACK_P).hexdigest() == PACK_ID_P
    m = golden_manifest_v2()
    assert m.encoded.hex() == GOLDEN_MANIFEST_V2_HEX
    assert m.snapshot_id == SNAPSHOT_ID_V2
    assert ids.compat_digest(m.compat) == COMPAT_DIGEST_GOLDEN_V2
    back = mf.decode(bytes.fromhex(GOLDEN_MANIFEST_V2_HEX))
    assert back == m
    assert back.format == 2
    assert back.packs == ((bytes.fromhex(PACK_ID_P), 10),)
    assert [f.mtime for f in back.files] == [MTIME, MTIME, -1_000_000_000]
    # The packed chunks' bytes are where the manifest says, and verify on their own.
    for f in back.files:
        for c in f.chunks:
            if c.packed is not None:
                p = c.packed
                assert blake3.blake3(PACK_P[p.offset : p.offset + p.length]).digest() == c.id


def chunk_id_hex(data: bytes) -> str:
    return ids.chunk_id(data).hex()


async def test_golden_snapshot_v2_origin_layout(tmp_path: Path) -> None:
    root = tmp_path / "origin"
    origin = Origin(
        root.as_uri(), {}, retry=RetryPolicy(attempts=1, base=0.0, cap=0.0), rng=random.Random(0)
    )
    m = golden_manifest_v2()
    await origin.put_chunk(bytes.fromhex(CHUNK_ID_HELLO), HELLO)
    await origin.put_chunk(bytes.fromhex(CHUNK_ID_PATTERN), PATTERN)
    await origin.put_pack(bytes.fromhex(PACK_ID_P), PACK_P)
    await origin.put_manifest(m.snapshot_id, m.encoded)
    await origin.put_ref(GOLDEN_REF, ids.compat_digest(m.compat), m.snapshot_id)
    # a ranged read of the pack gives one chunk's stored bytes
    got = await origin.get_pack_range(bytes.fromhex(PACK_ID_P), 5, 5, 10)
    assert bytes(got) == WORLD
    await origin.close()
    keys = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
    assert keys == set(_doc_block("golden-origin-v2"))


def test_doc_golden_manifest_v2_bytes_match() -> None:
    assert "".join(_doc_block("golden-manifest-v2")) == GOLDEN_MANIFEST_V2_HEX


# -- ref history entries (FORMAT.md section 6, "Ref history") ----------------------------------

GOLDEN_REF_ENTRY_HEX = (
    "85a26174ce6553f100a6636f6d706174c4206d344035ce9aea211ac9bec481752e6ec2fbe281e9a4fb077eed"
    "3e9a76ddf37fa3726566af6c6c616d612d332d38622f766c6c6da373657101a8736e617073686f74c420a97f"
    "e72fe132dbe3fa56fbf7fca6a57d7aa474fbcf63574685511f63e63761f1"
)
GOLDEN_REF_ENTRY_KEY = f"history/{GOLDEN_REF}/{COMPAT_DIGEST_GOLDEN}/00000000000000000001"


def golden_ref_entry() -> refentry.Entry:
    return refentry.Entry(GOLDEN_REF, COMPAT_DIGEST_GOLDEN, 1, SNAPSHOT_ID, 1_700_000_000)


def test_golden_ref_entry_bytes() -> None:
    data = refentry.encode(golden_ref_entry())
    assert data.hex() == GOLDEN_REF_ENTRY_HEX
    assert len(data) == 118
    decoded = refentry.decode(data, ref=GOLDEN_REF, compat=COMPAT_DIGEST_GOLDEN, seq=1)
    assert decoded == golden_ref_entry()


def test_ref_entry_is_refused_under_another_key_or_when_not_canonical() -> None:
    data = bytes.fromhex(GOLDEN_REF_ENTRY_HEX)
    with pytest.raises(refentry.EntryError, match="not its own key"):
        refentry.decode(data, ref=GOLDEN_REF, compat=COMPAT_DIGEST_GOLDEN, seq=2)
    with pytest.raises(refentry.EntryError, match="not its own key"):
        refentry.decode(data, ref="llama-3-8b/other", compat=COMPAT_DIGEST_GOLDEN, seq=1)
    # the same map with `seq` as a uint8 (cc01) instead of a positive fixint: not canonical
    longer = bytes.fromhex(GOLDEN_REF_ENTRY_HEX.replace("a373657101", "a3736571cc01"))
    with pytest.raises(refentry.EntryError, match="canonical"):
        refentry.decode(longer, ref=GOLDEN_REF, compat=COMPAT_DIGEST_GOLDEN, seq=1)
    with pytest.raises(refentry.EntryError):
        refentry.decode(data[:-1], ref=GOLDEN_REF, compat=COMPAT_DIGEST_GOLDEN, seq=1)
    assert refentry.seq_name(1) == "00000000000000000001"
    assert refentry.parse_seq_name("00000000000000000001") == 1
    assert refentry.parse_seq_name("1") is None
    assert refentry.parse_seq_name("00000000000000000000") is None


async def test_golden_ref_entry_origin_key(tmp_path: Path) -> None:
    root = tmp_path / "origin"
    origin = Origin(root.as_uri(), {}, retry=RetryPolicy(attempts=1, base=0.0, cap=0.0))
    await origin.put_history(
        GOLDEN_REF, COMPAT_DIGEST_GOLDEN, 1, bytes.fromhex(GOLDEN_REF_ENTRY_HEX)
    )
    assert await origin.list_history(GOLDEN_REF, COMPAT_DIGEST_GOLDEN) == [1]
    await origin.close()
    keys = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
    assert keys == {GOLDEN_REF_ENTRY_KEY}
    assert GOLDEN_REF_ENTRY_KEY in _doc()


def test_doc_golden_ref_entry_bytes_match() -> None:
    assert "".join(_doc_block("golden-ref-entry")) == GOLDEN_REF_ENTRY_HEX
