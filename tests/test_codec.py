"""Chunk codecs: round trip, either reading verifies, bounded decoding, the compression choice."""

from __future__ import annotations

import random
import struct
import tracemalloc

import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from hostd.core import codec
from hostd.core.ids import chunk_id
from hostd.core.manifest import CODEC_RAW, CODEC_ZSTD, Chunk
from hostd.errors import ChunkCorrupt

MIN_SAVING = 0.10  # the config default (compress_min_saving)
TEXT = b"".join(b"line %d: restored chunk from peer 10.0.0.%d\n" % (i, i % 7) for i in range(5000))
RANDOM = random.Random(1).randbytes(256 * 1024)


def fp16_weights(n: int, seed: int = 0) -> bytes:
    """Gaussian weights in fp16, like a model's: zstd saves about 8% on them."""
    rng = random.Random(seed)
    return struct.pack(f"<{n}e", *(rng.gauss(0.0, 0.02) for _ in range(n)))


def chunk_of(raw: bytes, codec_: int) -> Chunk:
    return Chunk(chunk_id(raw), len(raw), codec_)


# -- round trip -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw", [TEXT, RANDOM, bytes(100_000), b"x"], ids=["text", "random", "zeros", "1b"]
)
def test_round_trip_both_codecs(raw: bytes) -> None:
    packed = codec.compress(raw)
    assert packed.startswith(codec.ZSTD_MAGIC)
    assert zstandard.frame_content_size(packed) == len(raw)  # publish states the size
    assert codec.decode(chunk_of(raw, CODEC_ZSTD), packed) == raw
    assert codec.decode(chunk_of(raw, CODEC_RAW), raw) == raw


@settings(max_examples=60, deadline=None)
@given(st.binary(min_size=1, max_size=4096), st.sampled_from([CODEC_RAW, CODEC_ZSTD]))
def test_round_trip_any_bytes_any_stored_codec(raw: bytes, stored_codec: int) -> None:
    stored = codec.compress(raw) if stored_codec == CODEC_ZSTD else raw
    for said in (CODEC_RAW, CODEC_ZSTD):
        assert codec.decode(chunk_of(raw, said), stored) == raw


def test_stored_with_the_other_codec_still_verifies() -> None:
    # Another publish uploaded the same content under the other codec: the hash decides.
    assert codec.decode(chunk_of(TEXT, CODEC_RAW), codec.compress(TEXT)) == TEXT
    assert codec.decode(chunk_of(TEXT, CODEC_ZSTD), TEXT) == TEXT


def test_raw_content_that_is_itself_a_zstd_frame() -> None:
    # A .zst file stored raw: it looks like a frame, but its raw bytes are what hash to the id.
    inner = b"payload " * 1000
    frame = codec.compress(inner)
    for said in (CODEC_RAW, CODEC_ZSTD):
        assert codec.decode(chunk_of(frame, said), frame) == frame
    # And the compressed form of that .zst file decodes to the frame, not to the payload.
    assert codec.decode(chunk_of(frame, CODEC_ZSTD), codec.compress(frame)) == frame


def test_raw_content_that_starts_with_the_zstd_magic() -> None:
    raw = codec.ZSTD_MAGIC + b"not a frame at all"
    assert codec.decode(chunk_of(raw, CODEC_ZSTD), raw) == raw


# -- bounded decoding -------------------------------------------------------------------------


def _zeros_frame(size: int, *, state_size: bool) -> bytes:
    """A zstd frame of `size` zero bytes, built without holding them all (~32 KiB per GiB)."""
    cobj = zstandard.ZstdCompressor(level=1, write_content_size=state_size).compressobj(
        size=size if state_size else -1
    )
    block = bytes(1 << 20)
    parts = [cobj.compress(block) for _ in range(size // len(block))]
    parts.append(cobj.flush())
    return b"".join(parts)


@pytest.mark.parametrize("state_size", [True, False], ids=["size-in-header", "no-size"])
def test_zstd_bomb_is_corrupt_without_inflating(state_size: bool) -> None:
    # 4 KiB of zeros is the real chunk; the stored frame decodes to 1 GiB (or 64 MiB) of them.
    raw = bytes(4096)
    bomb = _zeros_frame(1 << 30 if state_size else 64 << 20, state_size=state_size)
    assert len(bomb) < 64 * 1024
    tracemalloc.start()
    try:
        with pytest.raises(ChunkCorrupt, match=chunk_id(raw).hex()):
            codec.decode(chunk_of(raw, CODEC_ZSTD), bomb)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, f"decoding allocated {peak} bytes for a 4 KiB chunk"


def test_frame_claiming_fewer_bytes_is_corrupt() -> None:
    raw = TEXT
    short = codec.compress(raw[:-1])
    with pytest.raises(ChunkCorrupt):
        codec.decode(chunk_of(raw, CODEC_ZSTD), short)


# -- wrong bytes ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "stored",
    [
        b"hellp",  # same size, other content
        b"hell",  # short
        b"hello!",  # long
        b"",
        codec.compress(b"hellp"),  # a valid frame of other content
        codec.compress(b"hello")[:-1],  # a truncated frame
        codec.ZSTD_MAGIC + b"\xff" * 8,  # a broken frame header
    ],
    ids=["other", "short", "long", "empty", "other-frame", "truncated-frame", "bad-header"],
)
@pytest.mark.parametrize("said", [CODEC_RAW, CODEC_ZSTD])
def test_wrong_bytes_are_corrupt_and_named(stored: bytes, said: int) -> None:
    chunk = chunk_of(b"hello", said)
    with pytest.raises(ChunkCorrupt, match=f"chunk {chunk.id.hex()} does not match its id") as e:
        codec.decode(chunk, stored)
    assert f"({len(stored)} bytes stored)" in e.value.message


def test_right_bytes_under_a_wrong_stated_size_are_corrupt() -> None:
    # The manifest's size is part of what is verified, whichever reading gives the bytes.
    wrong = Chunk(chunk_id(b"hello"), 6, CODEC_ZSTD)
    unsized = zstandard.ZstdCompressor(write_content_size=False).compress(b"hello")
    for stored in (b"hello", codec.compress(b"hello"), unsized):
        with pytest.raises(ChunkCorrupt, match=wrong.id.hex()):
            codec.decode(wrong, stored)


def test_verify_checks_raw_bytes_and_size() -> None:
    chunk = chunk_of(b"hello", CODEC_ZSTD)
    codec.verify(chunk, b"hello")
    codec.verify(chunk, memoryview(bytearray(b"hello")))
    for bad in (b"hellp", b"hello\x00", codec.compress(b"hello")):
        with pytest.raises(ChunkCorrupt, match=f"chunk {chunk.id.hex()} does not match its id"):
            codec.verify(chunk, bad)
    # The right bytes under a size the manifest does not state are refused too.
    with pytest.raises(ChunkCorrupt):
        codec.verify(Chunk(chunk.id, 6, CODEC_RAW), b"hello")


# -- the compression decision -----------------------------------------------------------------


def _trial(samples: list[bytes]) -> bool:
    raw = [len(s) for s in samples]
    packed = [len(codec.compress(s)) for s in samples]
    return codec.worth_compressing(raw, packed, MIN_SAVING)


def test_weights_are_not_worth_compressing() -> None:
    assert not _trial([RANDOM, random.Random(2).randbytes(64 * 1024)])
    weights = fp16_weights(256 * 1024)
    assert not _trial([weights])


def test_text_is_worth_compressing() -> None:
    assert _trial([TEXT])
    assert _trial([TEXT, RANDOM])  # the sample as a whole saves enough


def test_worth_compressing_threshold() -> None:
    assert codec.worth_compressing([1000], [900], 0.10)  # exactly 10% saved
    assert not codec.worth_compressing([1000], [901], 0.10)
    assert not codec.worth_compressing([], [], 0.10)  # nothing sampled: keep raw
    assert not codec.worth_compressing([0], [9], 0.0)


def test_choose_keeps_zstd_only_where_it_saves_enough() -> None:
    packed = codec.compress(TEXT)
    assert codec.choose(TEXT, packed, MIN_SAVING) == (CODEC_ZSTD, packed)
    packed_random = codec.compress(RANDOM)
    assert codec.choose(RANDOM, packed_random, MIN_SAVING) == (CODEC_RAW, RANDOM)
    assert codec.choose(TEXT, None, MIN_SAVING) == (CODEC_RAW, TEXT)


@pytest.mark.parametrize(
    ("n", "expected"),
    [(0, []), (1, [0]), (2, [0, 1]), (3, [0, 1, 2]), (4, [0, 2, 3]), (100, [0, 50, 99])],
)
def test_sample_is_first_middle_last(n: int, expected: list[int]) -> None:
    assert codec.sample_indexes(n) == expected
