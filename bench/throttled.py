"""A throttled origin for benchmarks: a directory (a `file://` origin's) served over plain
HTTP with every response body sharing one byte rate, as a shaped link to a bucket would.

    python bench/throttled.py DIR [--rate 400MiB] [--port 0] [--bind 127.0.0.1] [--ranges]
                              [--latency 30ms] [--conn-rate 50MiB]

prints `listening http://ADDRESS:PORT` once it accepts, then serves until killed. One token
bucket for all connections (a burst of at most 4 MiB; none without --rate), bodies sent 1
MiB at a time with sendfile(2); `requests` and `bytes_out` are logged on SIGTERM. Without
--ranges, ranges are not served (a plain web server's behaviour: hostd falls back to whole
objects). --latency holds each answer's head that long, and --conn-rate gives each
connection a bucket of its own too: an object store's first-byte latency and per-connection
throughput (S3's are tens of milliseconds and tens of MiB/s), what larger ranged GETs
amortize.
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
from typing import Any, ClassVar

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from hostd.core.units import parse_duration, parse_size

PIECE = 1 << 20
BURST = 4 << 20


class Bucket:
    """Tokens are bytes; `take` waits until `n` are there (one lock: the link is shared)."""

    def __init__(self, rate: float, burst: int = BURST) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self.at = time.monotonic()
        self.lock = threading.Lock()
        self.sent = 0

    def take(self, n: int) -> None:
        with self.lock:
            if self.rate == float("inf"):  # counted, not held back
                self.sent += n
                return
            now = time.monotonic()
            self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
            self.at = now
            self.tokens -= n
            self.sent += n
            wait = -self.tokens / self.rate if self.tokens < 0 else 0.0
        if wait > 0:
            time.sleep(wait)


class _Handler(SimpleHTTPRequestHandler):
    bucket: Bucket
    ranges = False
    latency = 0.0
    conn_rate = 0.0
    requests: ClassVar[list[int]] = [0]  # (shared by every handler: a list, not rebound)
    protocol_version = "HTTP/1.1"  # keep-alive, as an object store's

    def setup(self) -> None:
        super().setup()
        # (no burst to speak of: a connection idle through an answer's latency must not
        # save up the time of its next body)
        self.own = Bucket(self.conn_rate, 64 << 10) if self.conn_rate else None
        self.span: tuple[int, int] | None = None

    def send_head(self) -> Any:
        self.requests[0] += 1
        if self.latency:
            time.sleep(self.latency)
        rng = self.headers.get("Range")
        if not self.ranges or rng is None:
            self.span = None
            return super().send_head()
        path = Path(self.translate_path(self.path))
        try:
            f = path.open("rb")
        except OSError:
            self.send_error(404)
            return None
        size = os.fstat(f.fileno()).st_size
        a, _, b = rng.removeprefix("bytes=").partition("-")
        start, end = int(a), min(int(b) + 1, size) if b else size
        if not 0 <= start < end:
            f.close()
            self.send_error(416)
            return None
        self.send_response(206)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
        self.send_header("Content-Length", str(end - start))
        self.end_headers()
        self.span = (start, end)
        return f

    def copyfile(self, source: Any, outputfile: Any) -> None:
        """The body by sendfile(2), a piece at a time as the buckets allow: the origin's own
        CPU stays out of what the benchmark measures."""
        outputfile.flush()
        out, src = self.connection.fileno(), source.fileno()
        offset, end = self.span or (source.tell(), os.fstat(src).st_size)
        while offset < end:
            n = min(PIECE, end - offset)
            if self.own is not None:
                self.own.take(n)
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
    ap.add_argument("--rate", help="bytes per second of all bodies, e.g. 400MiB (default: none)")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--bind", default="127.0.0.1", help="address to listen on")
    ap.add_argument("--ranges", action="store_true", help="answer Range requests (206)")
    ap.add_argument("--latency", default="0s", help="held before each answer, e.g. 30ms")
    ap.add_argument("--conn-rate", help="bytes per second of each connection, e.g. 50MiB")
    args = ap.parse_args()
    bucket = Bucket(float(parse_size(args.rate, "--rate")) if args.rate else float("inf"))
    requests = [0]
    attrs = {
        "bucket": bucket,
        "ranges": args.ranges,
        "latency": parse_duration(args.latency, "--latency"),
        "conn_rate": float(parse_size(args.conn_rate, "--conn-rate")) if args.conn_rate else 0.0,
        "requests": requests,
    }
    handler = type("Handler", (_Handler,), attrs)
    server = _Server(
        (args.bind, args.port),
        lambda *a, **kw: handler(*a, directory=str(args.dir), **kw),
    )

    def stop(_sig: int, _frame: object) -> None:
        print(f"requests {requests[0]}", flush=True)
        print(f"bytes_out {bucket.sent}", flush=True)
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    print(f"listening http://{args.bind}:{server.server_address[1]}", flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
