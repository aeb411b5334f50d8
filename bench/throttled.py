"""A throttled origin for benchmarks: a directory (a `file://` origin's) served over plain
HTTP with every response body sharing one byte rate, as a shaped link to a bucket would.

    python bench/throttled.py DIR --rate 400MiB [--port 0]

prints `listening http://127.0.0.1:PORT` once it accepts, then serves until killed. One token
bucket for all connections (a burst of at most 4 MiB), bodies sent 1 MiB at a time with
sendfile(2);
`bytes_out` is logged on SIGTERM. Ranges are not served (a plain web server's behaviour:
hostd falls back to whole objects).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from hostd.core.units import parse_size

PIECE = 1 << 20
BURST = 4 << 20


class Bucket:
    """Tokens are bytes; `take` waits until `n` are there (one lock: the link is shared)."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.tokens = float(BURST)
        self.at = time.monotonic()
        self.lock = threading.Lock()
        self.sent = 0

    def take(self, n: int) -> None:
        with self.lock:
            now = time.monotonic()
            self.tokens = min(BURST, self.tokens + (now - self.at) * self.rate)
            self.at = now
            self.tokens -= n
            self.sent += n
            wait = -self.tokens / self.rate if self.tokens < 0 else 0.0
        if wait > 0:
            time.sleep(wait)


class _Handler(SimpleHTTPRequestHandler):
    bucket: Bucket

    def copyfile(self, source: Any, outputfile: Any) -> None:
        """The body by sendfile(2), a piece at a time as the bucket allows: the origin's own
        CPU stays out of what the benchmark measures."""
        outputfile.flush()
        offset = source.tell()
        out, src = self.connection.fileno(), source.fileno()
        end = os.fstat(src).st_size
        while offset < end:
            n = min(PIECE, end - offset)
            self.bucket.take(n)
            sent = os.sendfile(out, src, offset, n)
            if sent == 0:
                return
            offset += sent

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def handle(self) -> None:
        with contextlib.suppress(ConnectionError, TimeoutError):
            super().handle()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # not socketserver's 5: a daemon opens a connection per chunk GET in flight (16 by
    # default), and a connect the backlog drops is retried a second later
    request_queue_size = 1024


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dir", type=Path)
    ap.add_argument("--rate", required=True, help="bytes per second, e.g. 400MiB")
    ap.add_argument("--port", type=int, default=0)
    args = ap.parse_args()
    bucket = Bucket(float(parse_size(args.rate, "--rate")))
    handler = type("Handler", (_Handler,), {"bucket": bucket})
    server = _Server(
        ("127.0.0.1", args.port),
        lambda *a, **kw: handler(*a, directory=str(args.dir), **kw),
    )

    def stop(_sig: int, _frame: object) -> None:
        print(f"bytes_out {bucket.sent}", flush=True)
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    print(f"listening http://127.0.0.1:{server.server_address[1]}", flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
