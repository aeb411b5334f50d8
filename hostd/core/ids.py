"""Content ids: chunk ids, file digests, snapshot ids and compat digests (docs/FORMAT.md).

Every id is a 32-byte BLAKE3 hash, written as 64 lowercase hex digits. These encodings are
part of the on-disk and on-origin format: changing one changes every snapshot id.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import blake3
import msgpack

from hostd.errors import UsageError

HASH_LEN = 32
FILE_DIGEST_DOMAIN = b"hostd.file.v1\x00"
COMPAT_DIGEST_DOMAIN = b"hostd.compat.v1\x00"
_HEX_RE = re.compile(r"[0-9a-f]{64}")


def chunk_id(data: bytes | bytearray | memoryview) -> bytes:
    """The id of a chunk: BLAKE3 of its raw bytes."""
    return blake3.blake3(data).digest()


def verify_chunk(expected: bytes, data: bytes | bytearray | memoryview) -> bool:
    return chunk_id(data) == expected


def file_digest(chunks: Iterable[tuple[bytes, int]]) -> bytes:
    """The digest of a whole file: BLAKE3 over a domain tag, then each chunk's id and size.

    Each chunk contributes its 32 id bytes followed by its raw size as an unsigned 64-bit
    little-endian integer, in file order. An empty file has no chunks.
    """
    h = blake3.blake3(FILE_DIGEST_DOMAIN)
    for cid, size in chunks:
        h.update(cid)
        h.update(size.to_bytes(8, "little"))
    return h.digest()


def compat_digest(facts: Mapping[str, str]) -> str:
    """The key a ref is stored under for one set of compat facts (hex)."""
    body = msgpack.packb(dict(sorted(facts.items())), use_bin_type=True)
    return blake3.blake3(COMPAT_DIGEST_DOMAIN + body).hexdigest()


def to_hex(raw: bytes) -> str:
    return raw.hex()


def parse_hex(text: str, what: str = "id") -> bytes:
    """Parse a 64-digit lowercase hex id; a bad one is a usage error that names `what`."""
    if not isinstance(text, str) or not _HEX_RE.fullmatch(text):
        raise UsageError(f"{what} must be 64 lowercase hex digits, got {text!r}")
    return bytes.fromhex(text)


def is_hex_id(text: str) -> bool:
    return bool(_HEX_RE.fullmatch(text))
