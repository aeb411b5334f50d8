"""Chunk encodings: whether to store a chunk zstd-compressed, and decoding within bounds.

Pure functions over bytes; callers run them in a thread (zstd and blake3 release the GIL).
Compression is decided per file from a sample of its chunks, because weights barely
compress (about 1.09x) and zstd decodes slower than a tmpfs copy: it is kept only where it
saves a real share. A file smaller than a chunk is compressed whole where that saves the
share, but only once a sample of it showed zstd anything to squeeze (`choose_small`).
Decoding never produces more than the raw size the manifest states.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import zstandard

from hostd.core.ids import chunk_id
from hostd.core.manifest import (
    CODEC_RAW,
    CODEC_ZSTD,
    ZSTD_FRAME_MARGIN,
    Chunk,
    max_stored_size,
)

__all__ = ["ZSTD_FRAME_MARGIN", "max_stored_size"]
from hostd.errors import ChunkCorrupt

ZSTD_LEVEL = 3
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
SAMPLE_CHUNKS = 3
# The trial compresses a window of each sampled chunk, not the whole chunk: zstd runs at
# ~0.4 GB/s, and a compile cache of a thousand small files would spend longer on trials than
# on hashing.
SAMPLE_WINDOW = 64 * 1024


def sample_indexes(n_chunks: int) -> list[int]:
    """Which chunks of a file to trial-compress: first, middle and last."""
    if n_chunks <= SAMPLE_CHUNKS:
        return list(range(n_chunks))
    return sorted({0, n_chunks // 2, n_chunks - 1})


def worth_compressing(
    raw_sizes: Sequence[int], packed_sizes: Sequence[int], min_saving: float
) -> bool:
    """Whether a sample saved at least `min_saving` of its raw bytes."""
    raw = sum(raw_sizes)
    return raw > 0 and (raw - sum(packed_sizes)) >= raw * min_saving


def compress(data: bytes | memoryview) -> bytes:
    # One compressor per thread: making one costs three times compressing 8 KiB, which
    # is what a compile cache's files are.
    c = getattr(_local, "compressor", None)
    if c is None:
        c = _local.compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True)
    out: bytes = c.compress(data)
    return out


def _trial(sample: bytes) -> int:
    """The size of `sample` compressed at SAMPLE_LEVEL (a trial's: never stored)."""
    c = getattr(_local, "trial", None)
    if c is None:
        c = _local.trial = zstandard.ZstdCompressor(level=SAMPLE_LEVEL)
    return len(c.compress(sample))


_local = threading.local()


def choose(
    data: bytes | memoryview, packed: bytes | None, min_saving: float
) -> tuple[int, bytes | memoryview]:
    """The codec and the stored bytes of one chunk, given its compressed form (if tried)."""
    if packed is not None and len(data) - len(packed) >= len(data) * min_saving:
        return CODEC_ZSTD, packed
    return CODEC_RAW, data


# A small file's sample is this much of its start, middle and end (a 64th of it each, for a
# larger one): zstd compresses random bytes at only ~0.4 GB/s, and a tree of small random
# files would spend longer on whole-file trials than on hashing.
SMALL_WINDOW = 256
# The sample is tried at level 1, a third of level 3's cost on a few hundred random bytes.
# It codes literals as level 3 does (Huffman), so text, hex or base64 show; negative levels
# do not (raw literals: only repeats would show), and are not used.
SAMPLE_LEVEL = 1


def small_sample(data: bytes) -> bytes:
    """The start, middle and end of a small file: all of it where that is most of it."""
    n = len(data)
    w = min(max(SMALL_WINDOW, n >> 6), SAMPLE_WINDOW)
    if n <= 3 * w:
        return data
    mid = (n - w) // 2
    return b"".join((data[:w], data[mid : mid + w], data[n - w :]))


def choose_small(data: bytes, min_saving: float) -> tuple[int, bytes]:
    """The codec and the stored bytes of a file of one chunk: `choose` of the whole file
    compressed, tried only where zstd made its sample any smaller. Incompressible bytes
    (random, or compressed already) are stored raw after a trial of a few hundred bytes;
    anything zstd finds to squeeze in the sample sends the whole file to the trial."""
    sample = small_sample(data)
    if _trial(sample) >= len(sample):  # raw blocks: nothing zstd could use
        return CODEC_RAW, data
    return _bytes(choose(data, compress(data), min_saving))


def _bytes(chosen: tuple[int, bytes | memoryview]) -> tuple[int, bytes]:
    kind, stored = chosen
    return kind, stored if isinstance(stored, bytes) else bytes(stored)


def decode(chunk: Chunk, stored: bytes | memoryview) -> bytes | memoryview:
    """Raw bytes of a stored chunk, verified against its id.

    The manifest's codec is tried first. A chunk object may have been uploaded by another
    publish that chose the other codec for the same content, so the other reading is tried
    when the first does not verify; the hash decides, never the bytes' looks.
    """
    readings = (CODEC_RAW, CODEC_ZSTD) if chunk.codec == CODEC_RAW else (CODEC_ZSTD, CODEC_RAW)
    for codec in readings:
        raw = _read(codec, stored, chunk.size)
        if raw is not None and len(raw) == chunk.size and chunk_id(raw) == chunk.id:
            return raw
    raise ChunkCorrupt(f"chunk {chunk.id.hex()} does not match its id ({len(stored)} bytes stored)")


def _read(codec: int, stored: bytes | memoryview, raw_size: int) -> bytes | memoryview | None:
    if codec == CODEC_RAW:
        return stored if len(stored) == raw_size else None
    if bytes(stored[:4]) != ZSTD_MAGIC:
        return None
    try:
        # zstandard sizes its output buffer from the frame header's content size when there
        # is one, ignoring max_output_size: a frame claiming 1 GiB would allocate 1 GiB. So a
        # stated size other than the manifest's is refused before decompressing; without one
        # (-1), max_output_size bounds the output.
        claimed = zstandard.frame_content_size(stored)
        if claimed not in (-1, raw_size):
            return None
        out: bytes = zstandard.ZstdDecompressor().decompress(stored, max_output_size=raw_size)
    except zstandard.ZstdError:
        return None
    return out


def verify(chunk: Chunk, raw: bytes | bytearray | memoryview) -> None:
    if len(raw) != chunk.size or chunk_id(raw) != chunk.id:
        raise ChunkCorrupt(f"chunk {chunk.id.hex()} does not match its id")
