"""What hostile safetensors headers cost the loader's checks (hostd.loader.parse_header).

    .venv/bin/python bench/header_bombs.py [--mb 100] [CASE ...]

Each case runs in a process of its own (its peak RSS, from getrusage, is the figure; it
includes building the header, about twice its size): a header of --mb megabytes that is
  esc     one metadata value of escaped backslashes (valid JSON: accepted),
  list    `[],` repeated in a field the loader ignores (refused: too many arrays),
  quotes  `"",` repeated there (accepted, as the reference loader accepts it).
Prints one line a case: accepted or refused (and why), seconds, peak RSS. Not a test.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENTRY = b'"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]'
CASES = ("esc", "list", "quotes")


def header(case: str, size: int) -> bytes:
    if case == "esc":
        return b'{"__metadata__": {"k": "' + b"\\\\" * (size // 2) + b'"}, ' + ENTRY + b"}}"
    piece = b"[]," if case == "list" else b'"",'
    return b"{" + ENTRY + b', "junk": [' + piece * (size // 3) + piece[:2] + b"]}}"


def one(case: str, size: int) -> None:
    sys.path.insert(0, str(ROOT))
    from hostd import loader

    raw = header(case, size)
    started = time.perf_counter()
    try:
        loader.parse_header(raw, 8 + len(raw), 8, case)
        said = "accepted"
    except loader.LoaderError as e:
        said = f"refused ({str(e).split(': ', 1)[1][:70]})"
    took = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{case:7} {len(raw) / 1e6:.0f} MB: {said}, {took:.1f} s, peak RSS {peak:.0f} MB")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("cases", nargs="*", help=f"of {', '.join(CASES)} (default: all)")
    ap.add_argument("--mb", type=int, default=100, help="header size in MB (100: the limit)")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        one(args.one, args.mb * 1_000_000)
        return 0
    for case in args.cases or CASES:
        if case not in CASES:
            ap.error(f"no case {case!r}: {', '.join(CASES)}")
        cmd = [sys.executable, __file__, "--one", case, "--mb", str(args.mb)]
        subprocess.run(cmd, check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
