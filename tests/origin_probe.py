"""A child process for tests/test_origin_bounds.py: one origin read, and how much it grew.

    python -m origin_probe MODE URL OPTIONS_JSON KEY_OR_CHUNK_HEX SIZE

Prints one JSON line: `grew` (how far the peak RSS rose over the RSS before the read),
`error` (the error's type and message, "" if none) and `bytes_in` (the origin's counter).
Peak RSS is per process, so the read runs here, apart from pytest and the S3 server's
threads.

Modes:
- `source`: OriginSource.get of a raw chunk of SIZE bytes whose id is the given hex;
- `stream`: origin._read_capped at cap SIZE on the object at KEY of a file:// URL, without
  the stated-size shortcut, to show the stream alone holds the cap;
- `unbounded`: obstore's whole-object read of KEY at a file:// URL, the old way: the
  control that shows this measure sees an object read whole.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys

import obstore
from obstore.store import LocalStore

from hostd.core.manifest import CODEC_RAW, Chunk
from hostd.core.retry import RetryPolicy
from hostd.errors import ChunkMissing
from hostd.origin import Origin, _read_capped
from hostd.sources import OriginSource


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # kB
    raise LookupError(field)


def peak_rss() -> int:
    """The peak RSS of this process image. Not getrusage's ru_maxrss: Linux carries that
    across exec, so a child of a large pytest process starts with pytest's peak."""
    return _status("VmHWM")


def reset_peak_rss() -> int:
    """Start the peak over from the present RSS (clear_refs "5", Linux 4.0+); the RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status("VmRSS")


async def main(mode: str, url: str, options: dict[str, str], name: str, size: int) -> str:
    origin = Origin(url, options, retry=RetryPolicy(1, 0.0, 0.0))
    source = OriginSource(origin)
    store = LocalStore.from_url(url) if mode != "source" else None
    # Warm the client up first (imports, connection pool) on a chunk that is not there.
    with contextlib.suppress(ChunkMissing):
        await source.get(Chunk(bytes(32), size, CODEC_RAW))
    error = ""
    before = reset_peak_rss()
    try:
        if store is None:
            await source.get(Chunk(bytes.fromhex(name), size, CODEC_RAW))
        else:
            result = await obstore.get_async(store, name)
            if mode == "stream":
                await _read_capped(result, size)
            else:
                data = await result.bytes_async()
                print(f"read {len(data)} bytes", file=sys.stderr)
    except Exception as e:
        error = f"{type(e).__name__}: {getattr(e, 'message', e)}"
    grew = peak_rss() - before
    return json.dumps({"grew": grew, "error": error, "bytes_in": origin.stats.bytes_in})


if __name__ == "__main__":
    mode, url, options, name, size = sys.argv[1:]
    print(asyncio.run(main(mode, url, json.loads(options), name, int(size))), flush=True)
    # obstore's runtime threads sometimes abort at interpreter teardown (SIGABRT after
    # the answer is out): the answer is all that matters here.
    os._exit(0)
