"""The client's HTTP/1.1 framing (hostd/unixhttp.py), and the client's edge against responses
written byte by byte: chunked bodies split anywhere, Content-Length and close-delimited bodies,
and what is not HTTP. test_cli.py covers the same client against aiohttp's server."""

from __future__ import annotations

import json
import shutil
import socket
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hostd.client import Client
from hostd.errors import DaemonUnreachable, HostdError, NotFound
from hostd.unixhttp import BodyDecoder, ConnectionClosed, Head, ProtocolError, parse_head

DEADLINE = 20.0


def head(status: int = 200, /, **headers: str) -> Head:
    return Head(status, "OK", {k.replace("_", "-").lower(): v for k, v in headers.items()})


def chunked(pieces: list[bytes], extension: bytes = b"") -> bytes:
    framed = b"".join(b"%x%s\r\n%s\r\n" % (len(p), extension, p) for p in pieces if p)
    return framed + b"0\r\n\r\n"


def feed_split(decoder: BodyDecoder, data: bytes, cuts: list[int]) -> bytes:
    out = b""
    start = 0
    for cut in [*sorted(c % (len(data) + 1) for c in cuts), len(data)]:
        out += decoder.feed(data[start:cut])
        start = max(start, cut)
    return out


# -- the pure core --------------------------------------------------------------------------


@given(
    st.lists(st.binary(max_size=50), max_size=8),
    st.lists(st.integers(min_value=0, max_value=1000), max_size=10),
    st.sampled_from([b"", b";name=value", b" ; x"]),
)
def test_chunked_body_split_anywhere_decodes_to_its_payload(
    pieces: list[bytes], cuts: list[int], extension: bytes
) -> None:
    decoder = BodyDecoder(head(transfer_encoding="chunked"))
    data = chunked(pieces, extension) + b"HTTP/1.1 200 after the body"
    assert feed_split(decoder, data, cuts) == b"".join(pieces)
    assert decoder.done
    decoder.end()


def test_chunked_trailer_fields_are_read_past() -> None:
    decoder = BodyDecoder(head(transfer_encoding="chunked"))
    assert decoder.feed(b"3\r\nabc\r\n0\r\nX-Checksum: 1\r\n") == b"abc"
    assert not decoder.done
    assert decoder.feed(b"\r\n") == b""
    assert decoder.done


def test_chunked_wins_over_content_length() -> None:
    decoder = BodyDecoder(head(transfer_encoding="chunked", content_length="99"))
    assert decoder.feed(chunked([b"hi"])) == b"hi"
    assert decoder.done


@pytest.mark.parametrize(
    "data",
    [b"zz\r\n", b"-1\r\n", b"0x3\r\nabc\r\n", b"\r\n", b"3\r\nabcd\r\n", b"f" * 5000],
)
def test_bad_chunked_framing_is_a_protocol_error(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        BodyDecoder(head(transfer_encoding="chunked")).feed(data)


def test_content_length_body_stops_at_its_length() -> None:
    decoder = BodyDecoder(head(content_length="5"))
    assert decoder.feed(b"abc") == b"abc"
    assert decoder.feed(b"de, and then some") == b"de"
    assert decoder.done
    assert decoder.feed(b"more") == b""


@pytest.mark.parametrize("value", ["x", "-1", "1, 2", ""])
def test_bad_content_length_is_a_protocol_error(value: str) -> None:
    with pytest.raises(ProtocolError, match="Content-Length"):
        BodyDecoder(head(content_length=value))


@pytest.mark.parametrize("coding", ["gzip", "gzip, chunked"])
def test_unsupported_transfer_encoding_is_a_protocol_error(coding: str) -> None:
    with pytest.raises(ProtocolError, match="gzip"):
        BodyDecoder(head(transfer_encoding=coding))


def test_a_body_without_framing_runs_to_the_connection_end() -> None:
    decoder = BodyDecoder(head())
    assert decoder.feed(b"all") == b"all"
    assert not decoder.done
    decoder.end()
    assert decoder.done


@pytest.mark.parametrize(
    ("headers", "data"),
    [({"transfer_encoding": "chunked"}, b"5\r\nab"), ({"content_length": "5"}, b"ab")],
)
def test_a_connection_that_ends_mid_body_is_closed_early(
    headers: dict[str, str], data: bytes
) -> None:
    decoder = BodyDecoder(head(**headers))
    assert decoder.feed(data) == b"ab"
    with pytest.raises(ConnectionClosed, match="before the body ended"):
        decoder.end()


def test_bodiless_answers() -> None:
    assert BodyDecoder(head(204, content_length="10")).done
    assert BodyDecoder(head(304)).done
    assert BodyDecoder(head(200, content_length="10"), method="HEAD").done
    assert BodyDecoder(head(200, content_length="0")).done


def test_parse_head() -> None:
    parsed = parse_head(
        b"HTTP/1.1 404 Not Found\r\nContent-Type: Application/JSON; Charset=latin-1\r\n"
        b"Vary: a\r\nvary:  b \r\nX-Empty:"
    )
    assert (parsed.status, parsed.reason) == (404, "Not Found")
    assert parsed.headers == {
        "content-type": "Application/JSON; Charset=latin-1",
        "vary": "a,b",
        "x-empty": "",
    }
    assert (parsed.media_type, parsed.charset) == ("application/json", "iso8859-1")
    assert (head().media_type, head().charset) == ("application/octet-stream", "utf-8")
    assert head(content_type="text/plain; charset=klingon").charset == "utf-8"
    assert parse_head(b"HTTP/1.0 200").reason == ""


@pytest.mark.parametrize(
    "raw",
    [b"SSH-2.0-OpenSSH", b"HTTP/1.1 2000 OK", b"HTTP/2 200 OK", b"HTTP/1.1 200 OK\r\nno colon",
     b"HTTP/1.1 200 OK\r\n folded: value", b"HTTP/1.1 200 OK\r\n: empty name"],
)  # fmt: skip
def test_parse_head_refuses_what_is_not_http_1_1(raw: bytes) -> None:
    with pytest.raises(ProtocolError):
        parse_head(raw)


# -- the client against responses written by hand ---------------------------------------------


class Canned:
    """A Unix socket that answers one connection with fixed bytes, then closes it."""

    def __init__(self, path: Path, answer: bytes) -> None:
        self.path = path
        self.answer = answer
        self.request = b""
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(path))
        self._listener.listen(1)
        self._listener.settimeout(DEADLINE)
        self._thread = threading.Thread(target=self._serve, name="canned", daemon=True)

    def __repr__(self) -> str:
        return f"<Canned {self.path} answer={len(self.answer)} bytes>"

    def __enter__(self) -> Canned:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._thread.join(DEADLINE)
        self._listener.close()

    def _serve(self) -> None:
        conn, _ = self._listener.accept()
        with conn:
            conn.settimeout(DEADLINE)
            while b"\r\n\r\n" not in self.request:
                self.request += conn.recv(4096)
            head_bytes, _, body = self.request.partition(b"\r\n\r\n")
            length = parse_head(b"HTTP/1.1 200 OK" + head_bytes.partition(b"\r\n")[2]).headers
            while len(body) < int(length.get("content-length", "0")):
                body += conn.recv(4096)
            self.request = head_bytes + b"\r\n\r\n" + body
            conn.sendall(self.answer)


@pytest.fixture
def short_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="hostd-http-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


NDJSON_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n"
EVENTS = [
    b'{"event": "progress", "phase": "fetch", "done_bytes": 1}\n',
    b'{"event": "result", "snapshot": "abc", "files": 2}\n',
]


@pytest.mark.parametrize(
    "answer",
    [
        # chunks that cut lines in half, with an extension and a trailer
        NDJSON_HEAD + b"Transfer-Encoding: chunked\r\n\r\n"
        + chunked([EVENTS[0][:10], EVENTS[0][10:] + EVENTS[1][:3], EVENTS[1][3:]], b";x=y")[:-2]
        + b"X-Trailer: 1\r\n\r\n",
        NDJSON_HEAD + b"Content-Length: %d\r\n\r\n" % len(b"".join(EVENTS)) + b"".join(EVENTS),
        NDJSON_HEAD + b"\r\n" + b"".join(EVENTS).rstrip(b"\n"),  # to the end, no last newline
    ],
    ids=["chunked", "content-length", "until-close"],
)  # fmt: skip
def test_a_stream_in_any_framing(short_dir: Path, answer: bytes) -> None:
    seen: list[dict[str, object]] = []
    with Canned(short_dir / "s.sock", answer) as canned, Client(canned.path) as client:
        result = client.restore("models/tiny", "out", on_progress=seen.append)
    assert result == {"snapshot": "abc", "files": 2}
    assert seen == [{"event": "progress", "phase": "fetch", "done_bytes": 1}]
    head_bytes, _, body = canned.request.partition(b"\r\n\r\n")
    lines = head_bytes.decode().split("\r\n")
    assert lines[0] == "POST /v1/restore HTTP/1.1"
    assert {"Host: hostd", "Connection: close", "Content-Type: application/json"} <= set(lines)
    assert f"Content-Length: {len(body)}" in lines
    assert json.loads(body)["ref"] == "models/tiny"


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (b"SSH-2.0-OpenSSH_9.6\r\n\r\n", "daemon sent malformed HTTP: not an HTTP/1.1 status line"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n[1]", "JSON that is not an object"),
        (b"HTTP/1.1 200 OK\r\n\r\nnot json", "malformed JSON for /v1/status"),
        (b"HTTP/1.1 502 Bad Gateway\r\n\r\n<html>", "daemon answered HTTP 502 Bad Gateway: <html>"),
    ],
)
def test_a_plain_call_that_goes_wrong_exits_1(short_dir: Path, answer: bytes, message: str) -> None:
    with (
        Canned(short_dir / "s.sock", answer) as canned,
        Client(canned.path) as client,
        pytest.raises(HostdError) as caught,
    ):
        client.status()
    assert message in caught.value.message
    assert caught.value.exit_code == 1


@pytest.mark.parametrize(
    "answer", [b"", b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n{"], ids=["none", "cut"]
)
def test_a_plain_call_the_daemon_went_away_from_exits_4(short_dir: Path, answer: bytes) -> None:
    """The daemon killed or stopped while it had the call (nothing, or half an answer, then
    the connection closed): 'gone', as a stream cut so, not a failure of the call."""
    with (
        Canned(short_dir / "s.sock", answer) as canned,
        Client(canned.path) as client,
        pytest.raises(HostdError, match="lost the connection to the daemon at ") as caught,
    ):
        client.status()
    assert caught.value.exit_code == 4


def test_a_plain_call_cut_by_its_own_caller_is_not_the_daemon_gone(short_dir: Path) -> None:
    """`Client.close()` from another thread cuts a call the daemon has not answered: that
    end is this side's doing (exit 1), not the daemon's going away (exit 4)."""
    path = short_dir / "s.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))
        listener.listen(1)
        listener.settimeout(DEADLINE)
        with Client(path) as client:
            failed: list[BaseException] = []

            def call() -> None:
                try:
                    client.status()
                except BaseException as e:
                    failed.append(e)

            caller = threading.Thread(target=call)
            caller.start()
            conn, _ = listener.accept()  # the call is in flight: never answered
            with conn:
                conn.settimeout(DEADLINE)
                assert conn.recv(4096).startswith(b"GET /v1/status ")
                client.close()
                caller.join(DEADLINE)
    (e,) = failed
    assert isinstance(e, HostdError)
    assert "cut" in e.message, e.message
    assert e.exit_code == 1


def test_an_error_body_keeps_its_code(short_dir: Path) -> None:
    body = b'{"error": "not_found", "message": "no snapshot for ref \'a/b\'"}'
    answer = b"HTTP/1.1 404 Not Found\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    with (
        Canned(short_dir / "s.sock", answer) as canned,
        Client(canned.path) as client,
        pytest.raises(NotFound, match="no snapshot for ref 'a/b'") as caught,
    ):
        client.pin(ref="a/b")
    assert caught.value.exit_code == 3


def test_metrics_text_in_its_charset(short_dir: Path) -> None:
    text = "# HELP hostd_x caf\u00e9\nhostd_x 1\n"
    answer = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=latin-1\r\n\r\n"
    with Canned(short_dir / "s.sock", answer + text.encode("latin-1")) as canned:
        assert Client(canned.path).metrics() == text


def test_a_socket_path_that_is_not_a_socket_is_unreachable(short_dir: Path) -> None:
    (short_dir / "file").write_text("")
    with pytest.raises(DaemonUnreachable, match="Connection refused") as caught:
        Client(short_dir / "file").status()
    assert caught.value.exit_code == 4


def test_a_full_listen_backlog_is_unreachable_after_the_connect_timeout(short_dir: Path) -> None:
    path = short_dir / "busy.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))
        listener.listen(0)  # never accepts
        waiting: list[socket.socket] = []
        try:
            while True:  # fill the backlog
                filler = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                waiting.append(filler)
                filler.setblocking(False)
                filler.connect(str(path))
        except BlockingIOError:
            pass
        try:
            with pytest.raises(DaemonUnreachable, match=r"timed out after 0\.2s") as caught:
                Client(path, connect_timeout=0.2).status()
        finally:
            for filler in waiting:
                filler.close()
    assert caught.value.exit_code == 4


# The interrupt pipe (unixhttp._wakeup_fd), in a fresh interpreter: it is per process.
WAKEUP_SCRIPT = """if True:
    import os, signal, threading
    from hostd import unixhttp
    seen = []
    t = threading.Thread(target=lambda: seen.append(unixhttp._wakeup_fd()))
    t.start(); t.join()
    mine = unixhttp._wakeup_fd()
    print(seen[0], mine >= 0, signal.set_wakeup_fd(-1) >= 0, unixhttp._wakeup_fd() == mine)
"""

# Where a wakeup fd of someone else's is set (an event loop's), it is left as it was.
WAKEUP_TAKEN_SCRIPT = """if True:
    import os, signal
    from hostd import unixhttp
    r, w = os.pipe2(os.O_NONBLOCK)
    signal.set_wakeup_fd(w)
    print(unixhttp._wakeup_fd(), signal.set_wakeup_fd(-1) == w)
"""


@pytest.mark.parametrize(
    ("script", "said"),
    [(WAKEUP_SCRIPT, "-1 True True True"), (WAKEUP_TAKEN_SCRIPT, "-1 True")],
)
def test_the_interrupt_pipe_is_the_main_threads_and_leaves_anothers_alone(
    script: str, said: str
) -> None:
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert (done.stdout.strip(), done.stderr) == (said, "")
