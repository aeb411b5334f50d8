"""Origin: one contract suite run against a file:// origin and a real S3 server (moto), plus
fault tests against real sockets: a closed port, a stalling server, 5xx/429/403 answers,
credentials moto rejects, and a plain http:// origin that cannot list."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import random
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp import web
from obstore.exceptions import GenericError, PermissionDeniedError, UnauthenticatedError
from s3server import MotoS3, S3Bucket

from hostd.core.ids import chunk_id, compat_digest
from hostd.core.retry import RetryPolicy
from hostd.errors import ChunkCorrupt, ChunkMissing, ConfigError, NotFound, OriginError, UsageError
from hostd.origin import Failure, Origin, classify, display_url, validate_ref

PREFIX = "pre/fix"
FAST = RetryPolicy(attempts=4, base=0.01, cap=0.05)
SID_A = "a" * 64
SID_B = "b" * 64
DIGEST_1 = compat_digest({"format": "1"})
DIGEST_2 = compat_digest({"format": "1", "gpu_model": "H100"})
DEADLINE = 10.0  # every fault test must end well inside this


class SleepRecorder:
    """The injected sleep: records each backoff delay and returns at once."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)


@dataclass
class Backend:
    name: str
    url: str
    options: dict[str, str]
    keys: Callable[[], set[str]]  # every stored key, from the store's root (prefix included)
    put_raw: Callable[[str, bytes], None]  # write behind the origin's back, key under root

    def origin(self, **kwargs: object) -> Origin:
        return _origin(self.url, self.options, **kwargs)


def _origin(url: str, options: dict[str, str] | None = None, **kwargs: object) -> Origin:
    args: dict[str, object] = {"retry": FAST, "sleep": SleepRecorder(), "rng": random.Random(7)}
    args.update(kwargs)
    return Origin(url, options or {}, **args)  # type: ignore[arg-type]


def _file_backend(root: Path) -> Backend:
    def keys() -> set[str]:
        return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}

    def put_raw(key: str, data: bytes) -> None:
        path = root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    return Backend("file", (root / PREFIX).as_uri(), {}, keys, put_raw)


def _s3_backend(bucket: S3Bucket) -> Backend:
    return Backend("s3", bucket.url(PREFIX), bucket.options, bucket.keys, bucket.put_raw)


@pytest.fixture(params=["file", "s3"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "file":
        return _file_backend(tmp_path / "origin")
    bucket: S3Bucket = request.getfixturevalue("s3_server")
    return _s3_backend(bucket)


async def _keys(backend: Backend) -> set[str]:
    return await asyncio.to_thread(backend.keys)


# -- the contract: every store behaves the same ---------------------------------------------


async def test_chunk_round_trip_lands_under_the_prefix(backend: Backend) -> None:
    origin = backend.origin()
    data = b"chunk bytes " * 1000
    cid = chunk_id(data)
    assert not await origin.has_chunk(cid)
    await origin.put_chunk(cid, data)
    assert await origin.has_chunk(cid)
    assert await origin.get_chunk(cid) == data
    hexid = cid.hex()
    assert await _keys(backend) == {f"{PREFIX}/chunks/{hexid[:2]}/{hexid}"}
    stats = origin.stats
    assert (stats.requests_ok, stats.requests_missing, stats.requests_failed) == (3, 1, 0)
    assert (stats.bytes_in, stats.bytes_out) == (len(data), len(data))


async def test_put_chunk_twice_is_harmless(backend: Backend) -> None:
    origin = backend.origin()
    cid = chunk_id(b"x")
    await origin.put_chunk(cid, b"x")
    await origin.put_chunk(cid, b"x")
    assert bytes(await origin.get_chunk(cid)) == b"x"


async def test_missing_chunk_names_the_chunk(backend: Backend) -> None:
    origin = backend.origin()
    cid = chunk_id(b"never stored")
    with pytest.raises(ChunkMissing, match=cid.hex()):
        await origin.get_chunk(cid)
    assert origin.stats.requests_missing == 1
    assert origin.stats.requests_failed == 0


async def test_manifest_round_trip_and_missing(backend: Backend) -> None:
    origin = backend.origin()
    await origin.put_manifest(SID_A, b"\x81\xa6format\x01")
    assert await origin.get_manifest(SID_A) == b"\x81\xa6format\x01"
    assert f"{PREFIX}/manifests/{SID_A}" in await _keys(backend)
    with pytest.raises(NotFound, match=f"no manifest {SID_B} at origin {origin.url}"):
        await origin.get_manifest(SID_B)


async def test_refs_put_get_list(backend: Backend) -> None:
    origin = backend.origin()
    assert await origin.get_ref("llama/vllm", DIGEST_1) is None
    assert await origin.list_ref("llama/vllm") == []
    await origin.put_ref("llama/vllm", DIGEST_1, SID_A)
    await origin.put_ref("llama/vllm", DIGEST_2, SID_B)
    await origin.put_ref("llama/vllm/longer", DIGEST_1, SID_B)  # a deeper ref, not listed
    await origin.put_ref("llama", DIGEST_1, SID_B)  # a shallower ref, not listed either
    assert await origin.get_ref("llama/vllm", DIGEST_1) == SID_A
    assert await origin.get_ref("llama/vllm", DIGEST_2) == SID_B
    assert await origin.list_ref("llama/vllm") == sorted([DIGEST_1, DIGEST_2])
    await origin.put_ref("llama/vllm", DIGEST_1, SID_B)  # refs are mutable
    assert await origin.get_ref("llama/vllm", DIGEST_1) == SID_B
    assert f"{PREFIX}/refs/llama/vllm/{DIGEST_1}" in await _keys(backend)


async def test_ref_content_tolerates_whitespace_but_not_garbage(backend: Backend) -> None:
    origin = backend.origin()
    await asyncio.to_thread(backend.put_raw, f"{PREFIX}/refs/r/{DIGEST_1}", f" {SID_A}\n".encode())
    assert await origin.get_ref("r", DIGEST_1) == SID_A
    await asyncio.to_thread(backend.put_raw, f"{PREFIX}/refs/r/{DIGEST_2}", b"not an id\n")
    with pytest.raises(OriginError, match="not a 64-hex snapshot id"):
        await origin.get_ref("r", DIGEST_2)


async def test_many_chunks_concurrently(backend: Backend) -> None:
    origin = backend.origin(concurrency=4)
    blobs = [f"chunk {i}".encode() * 100 for i in range(24)]
    await asyncio.gather(*(origin.put_chunk(chunk_id(b), b) for b in blobs))
    got = await asyncio.gather(*(origin.get_chunk(chunk_id(b)) for b in blobs))
    assert got == blobs
    assert origin.stats.requests_ok == 48


async def test_bad_names_and_ids_are_refused_before_any_request(backend: Backend) -> None:
    origin = backend.origin()
    with pytest.raises(UsageError, match="ref"):
        await origin.put_ref("../escape", DIGEST_1, SID_A)
    with pytest.raises(UsageError, match="compat digest"):
        await origin.get_ref("r", "ABC")
    with pytest.raises(UsageError, match="snapshot id"):
        await origin.put_ref("r", DIGEST_1, SID_A.upper())
    with pytest.raises(UsageError, match="snapshot id"):
        await origin.get_manifest("../../etc/passwd")
    with pytest.raises(UsageError, match="chunk id"):
        await origin.get_chunk(b"short")
    with pytest.raises(UsageError, match="ref"):
        await origin.list_ref("a//b")
    assert origin.stats.requests_ok == origin.stats.requests_failed == 0
    assert await _keys(backend) == set()


async def test_closed_origin_refuses_requests(backend: Backend) -> None:
    origin = backend.origin()
    await origin.close()
    with pytest.raises(OriginError, match="closed"):
        await origin.get_manifest(SID_A)
    assert "closed" in repr(origin)


# -- ref names ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ref", ["llama-3-8b/vllm", "a", "A.b_c-D/9/x.y", "x" * 256, "..a/b..", "v1.0"]
)
def test_good_ref_names(ref: str) -> None:
    assert validate_ref(ref) == ref


@pytest.mark.parametrize(
    "ref",
    ["", "/a", "a/", "a//b", ".", "..", "a/../b", "a/./b", "a b", "a\\b", "é", "a:b", "x" * 257],
)
def test_bad_ref_names(ref: str) -> None:
    with pytest.raises(UsageError, match="ref"):
        validate_ref(ref)


# -- configuration --------------------------------------------------------------------------


async def test_file_origin_creates_its_directory(tmp_path: Path) -> None:
    where = tmp_path / "not" / "yet"
    origin = _origin(where.as_uri())
    assert where.is_dir()
    await origin.put_manifest(SID_A, b"m")
    assert (where / "manifests" / SID_A).read_bytes() == b"m"
    assert not list(where.rglob("*#*"))  # no staging file left beside the object


async def test_s3_origin_from_environment_alone(
    s3_server: S3Bucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    origin = _origin(s3_server.url("env"))
    await origin.put_manifest(SID_A, b"m")
    assert await origin.get_manifest(SID_A) == b"m"
    assert f"env/manifests/{SID_A}" in await asyncio.to_thread(s3_server.keys)


async def test_client_options_under_provider_names(s3_server: S3Bucket) -> None:
    # obstore 0.12 panics on a client option inside the S3 config; Origin routes it.
    options = dict(s3_server.options)
    del options["allow_http"]
    options["aws_allow_http"] = "true"
    origin = _origin(s3_server.url(), options)
    await origin.put_manifest(SID_A, b"m")


@pytest.mark.parametrize(
    ("url", "options", "key"),
    [
        ("s3://bucket/p", {"no_such_option": "1"}, "origin_options"),
        ("ftp://host/p", {}, "origin"),
        ("file:///tmp/x", {"region": "us-east-1"}, "origin_options"),
        ("https://example.invalid/p", {"region": "us-east-1"}, "origin_options"),
        ("http://example.invalid/p", {"allow_http": "maybe"}, "origin_options"),
    ],
)
def test_bad_configuration_names_the_key(url: str, options: dict[str, str], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        Origin(url, options, retry=FAST)
    assert info.value.key == key


def test_url_never_shows_credentials() -> None:
    origin = _origin("https://user:secret@example.invalid/base?sig=abc#frag")
    assert origin.url == "https://example.invalid/base"
    assert "secret" not in repr(origin)
    assert display_url("s3://bucket/pre/fix") == "s3://bucket/pre/fix"


# -- faults ---------------------------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port  # closed again: connecting is refused at once


@pytest.mark.parametrize("op", ["get", "put", "list"])
async def test_origin_down_retries_then_fails(op: str) -> None:
    port = _closed_port()
    sleep = SleepRecorder()
    options = {
        "endpoint": f"http://127.0.0.1:{port}",
        "region": "us-east-1",
        "access_key_id": "k",
        "secret_access_key": "s",
    }
    origin = _origin("s3://bucket/p", options, sleep=sleep, rng=random.Random(3))
    cid = chunk_id(b"x")
    calls: dict[str, Callable[[], Awaitable[object]]] = {
        "get": lambda: origin.get_chunk(cid),
        "put": lambda: origin.put_chunk(cid, b"x"),
        "list": lambda: origin.list_ref("r"),
    }
    async with asyncio.timeout(DEADLINE):
        with pytest.raises(OriginError, match="failed after 4 attempts") as info:
            await calls[op]()
    assert f"127.0.0.1:{port}" in str(info.value)
    # The backoff is exactly the policy's, drawn from the injected rng.
    replay = random.Random(3)
    assert sleep.delays == [FAST.delay(a, replay) for a in range(3)]
    assert origin.stats.requests_retried == 3
    assert origin.stats.requests_failed == 1


async def test_missing_bucket_is_an_error_not_a_missing_chunk(moto_s3: MotoS3) -> None:
    bucket = S3Bucket(endpoint=moto_s3.endpoint, bucket="no-such-bucket")
    sleep = SleepRecorder()
    origin = _origin(bucket.url("p"), bucket.options, sleep=sleep)
    with pytest.raises(OriginError, match="does not exist"):
        await origin.get_chunk(chunk_id(b"x"))
    with pytest.raises(OriginError, match="does not exist"):
        await origin.put_chunk(chunk_id(b"x"), b"x")
    assert sleep.delays == []


async def test_credentials_rejected_fail_at_once(moto_s3: MotoS3, s3_server: S3Bucket) -> None:
    sleep = SleepRecorder()
    origin = _origin(s3_server.url("p"), s3_server.options, sleep=sleep)
    with moto_s3.enforce_auth():
        with pytest.raises(OriginError, match="credentials rejected by origin s3://"):
            await origin.get_chunk(chunk_id(b"x"))
        with pytest.raises(OriginError, match="credentials rejected"):
            await origin.put_chunk(chunk_id(b"x"), b"x")
        with pytest.raises(OriginError, match="credentials rejected"):
            await origin.list_ref("r")
    assert sleep.delays == []
    assert origin.stats.requests_failed == 3
    assert s3_server.secret_access_key not in repr(origin)


@contextlib.asynccontextmanager
async def _http_server(app: web.Application) -> AsyncIterator[str]:
    """Serve `app` on a loopback port; yields the base URL."""
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


async def test_http_origin_reads_and_cannot_list(tmp_path: Path) -> None:
    publisher = _origin((tmp_path / "pub").as_uri())
    data = b"served over plain http"
    cid = chunk_id(data)
    await publisher.put_chunk(cid, data)
    await publisher.put_manifest(SID_A, b"manifest")
    await publisher.put_ref("model/vllm", DIGEST_1, SID_A)
    app = web.Application()
    app.router.add_static("/base", tmp_path / "pub")
    async with _http_server(app) as base:
        origin = _origin(f"{base}/base")
        assert await origin.get_chunk(cid) == data
        assert await origin.has_chunk(cid)
        assert not await origin.has_chunk(chunk_id(b"other"))
        with pytest.raises(ChunkMissing):
            await origin.get_chunk(chunk_id(b"other"))
        assert await origin.get_manifest(SID_A) == b"manifest"
        assert await origin.get_ref("model/vllm", DIGEST_1) == SID_A
        assert await origin.get_ref("model/vllm", DIGEST_2) is None
        assert await origin.list_ref("model/vllm") is None


async def test_a_web_server_that_compresses_what_it_sends_is_named(tmp_path: Path) -> None:
    """A web server that compresses its answers (nginx's gzip or gzip_static, a proxy) does
    not send the objects' bytes: each read failed on their size or hash, blamed on the
    object (a pack 'more than its manifest says', a ref that held no snapshot id). The
    encoding is named at once, without retries."""
    publisher = _origin((tmp_path / "pub").as_uri())
    data = random.Random(1).randbytes(3000)
    cid = pack = chunk_id(data)
    await publisher.put_chunk(cid, data)
    await publisher.put_pack(pack, data)
    await publisher.put_manifest(SID_A, b"manifest")
    await publisher.put_ref("model/vllm", DIGEST_1, SID_A)

    async def gzipped(request: web.Request) -> web.Response:
        path = tmp_path / "pub" / request.match_info["tail"]
        if not path.is_file():
            return web.Response(status=404)
        body = gzip.compress(path.read_bytes())
        return web.Response(body=body, headers={"Content-Encoding": "gzip"})

    app = web.Application()
    app.router.add_get("/{tail:.*}", gzipped)
    sleep = SleepRecorder()
    async with _http_server(app) as base:
        origin = _origin(base, sleep=sleep)
        reads: list[Callable[[], Awaitable[object]]] = [
            lambda: origin.get_ref("model/vllm", DIGEST_1),
            lambda: origin.get_manifest(SID_A),
            lambda: origin.get_chunk(cid),
            lambda: origin.get_pack_range(pack, 0, len(data), len(data)),
            lambda: origin.get_pack_range(pack, 100, 1000, len(data)),
        ]
        for read in reads:
            with pytest.raises(OriginError, match="sent it with Content-Encoding: gzip"):
                await read()
        await origin.close()
    assert sleep.delays == []


async def test_a_pack_shorter_than_its_manifest_says_is_corrupt(tmp_path: Path) -> None:
    """A range past a pack's end: a web server answers 416 and a local file has no such
    range. Either said an origin error ('416 Range Not Satisfiable'), not the pack's fault."""
    publisher = _origin((tmp_path / "pub").as_uri())
    data = random.Random(2).randbytes(3000)
    pack = chunk_id(data)
    await publisher.put_pack(pack, data)
    app = web.Application()
    app.router.add_static("/base", tmp_path / "pub")
    async with _http_server(app) as base:
        for origin in (publisher, _origin(f"{base}/base")):
            with pytest.raises(ChunkCorrupt, match="shorter than the 5000 bytes its manifest"):
                await origin.get_pack_range(pack, 4000, 1000, 5000)
            # (a range that starts inside it comes back short: corrupt as before)
            with pytest.raises(ChunkCorrupt, match="asked for 1000 bytes at 2500, got 500"):
                await origin.get_pack_range(pack, 2500, 1000, 5000)
            await origin.close()


@pytest.mark.parametrize("encoding", ["aws-chunked", "identity, identity", "none", "IDENTITY"])
async def test_an_encoding_that_leaves_the_bytes_as_they_are_is_read(
    tmp_path: Path, encoding: str
) -> None:
    """S3-compatible servers store `aws-chunked` (objects copied with newer aws-cli) and send
    it back, from a public URL too, with the bytes as stored: read, as they were before the
    check for compressed answers."""
    publisher = _origin((tmp_path / "pub").as_uri())
    data = random.Random(3).randbytes(3000)
    cid = chunk_id(data)
    await publisher.put_chunk(cid, data)
    await publisher.put_manifest(SID_A, b"manifest")

    async def tagged(request: web.Request) -> web.Response:
        path = tmp_path / "pub" / request.match_info["tail"]
        return web.Response(body=path.read_bytes(), headers={"Content-Encoding": encoding})

    app = web.Application()
    app.router.add_get("/{tail:.*}", tagged)
    async with _http_server(app) as base:
        origin = _origin(base)
        assert await origin.get_manifest(SID_A) == b"manifest"
        assert bytes(await origin.get_chunk(cid)) == data
        await origin.close()


async def test_a_web_server_that_streams_its_answers_is_named(tmp_path: Path) -> None:
    """No Content-Length (chunked: nginx's gunzip, on-the-fly compression): obstore's web
    store cannot read it, and each retry met the same answer. Told at once, and why."""

    async def chunked(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        await resp.write(b"manifest")
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_get("/{tail:.*}", chunked)
    sleep = SleepRecorder()
    async with _http_server(app) as base:
        origin = _origin(base, sleep=sleep)
        with pytest.raises(OriginError, match="must send each object with its Content-Length"):
            await origin.get_manifest(SID_A)
        await origin.close()
    assert sleep.delays == []


@pytest.mark.parametrize("status", [503, 429, 500])
async def test_transient_answers_are_retried(status: int) -> None:
    seen: list[str] = []

    async def flaky(request: web.Request) -> web.Response:
        seen.append(request.method)
        if len(seen) <= 2:
            return web.Response(status=status, text="slow down")
        return web.Response(body=b"finally")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", flaky)
    sleep = SleepRecorder()
    async with _http_server(app) as base:
        origin = _origin(base, sleep=sleep)
        assert await origin.get_manifest(SID_A) == b"finally"
    assert len(sleep.delays) == 2
    assert (origin.stats.requests_retried, origin.stats.requests_ok) == (2, 1)


@pytest.mark.parametrize(
    ("status", "message"),
    [(403, "access refused .* permissions"), (401, "access refused"), (400, "failed: .*400")],
)
async def test_permanent_answers_fail_at_once(status: int, message: str) -> None:
    async def refuse(request: web.Request) -> web.Response:
        return web.Response(status=status, text="no")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", refuse)
    sleep = SleepRecorder()
    async with _http_server(app) as base:
        origin = _origin(base, sleep=sleep)
        with pytest.raises(OriginError, match=message):
            await origin.get_manifest(SID_A)
    assert sleep.delays == []


class _Stall:
    """An HTTP handler that holds every request until released, counting them."""

    def __init__(self, body: bytes = b"released") -> None:
        self.body = body
        self.arrived = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.release = asyncio.Event()
        self._changed = asyncio.Condition()

    async def handler(self, request: web.Request) -> web.Response:
        async with self._changed:
            self.arrived += 1
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            self._changed.notify_all()
        try:
            await self.release.wait()
            return web.Response(body=self.body)
        finally:
            self.in_flight -= 1

    async def wait_arrived(self, n: int) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: self.arrived >= n)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handler)
        return app


async def test_a_stalled_request_times_out_and_is_retried() -> None:
    stall = _Stall()
    sleep = SleepRecorder()
    async with _http_server(stall.app()) as base:
        origin = _origin(
            base, retry=RetryPolicy(attempts=2, base=0.0, cap=0.0), timeout=0.2, sleep=sleep
        )
        try:
            async with asyncio.timeout(DEADLINE):
                with pytest.raises(OriginError, match=r"after 2 attempts: not done within 0.2s"):
                    await origin.get_manifest(SID_A)
        finally:
            stall.release.set()
    assert stall.arrived == 2
    assert sleep.delays == [0.0]


async def test_requests_share_one_concurrency_limit() -> None:
    stall = _Stall()
    async with _http_server(stall.app()) as base:
        origin = _origin(base, concurrency=2)
        gets = [asyncio.create_task(origin.get_manifest(SID_A)) for _ in range(5)]
        try:
            async with asyncio.timeout(DEADLINE):
                await stall.wait_arrived(2)
                stall.release.set()
                assert await asyncio.gather(*gets) == [b"released"] * 5
        finally:
            stall.release.set()
            for task in gets:
                task.cancel()
    assert stall.max_in_flight <= 2
    assert stall.arrived == 5


async def test_cancelling_a_request_frees_its_slot_and_counts_nothing() -> None:
    stall = _Stall()
    async with _http_server(stall.app()) as base:
        origin = _origin(base, concurrency=1)
        first = asyncio.create_task(origin.get_manifest(SID_A))
        try:
            async with asyncio.timeout(DEADLINE):
                await stall.wait_arrived(1)
                first.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await first
                stats = origin.stats
                assert stats.requests_ok == stats.requests_failed == stats.requests_retried == 0
                stall.release.set()
                # The only slot was given back: the next request gets through.
                assert await origin.get_manifest(SID_A) == b"released"
        finally:
            stall.release.set()


async def test_messages_do_not_leak_url_credentials() -> None:
    port = _closed_port()
    origin = _origin(f"http://user:hunter2@127.0.0.1:{port}/base?sig=abc")
    with pytest.raises(OriginError) as info:
        await origin.get_manifest(SID_A)
    assert "hunter2" not in str(info.value)
    assert "sig=abc" not in str(info.value)


# -- classification (pure) ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "failure"),
    [
        (FileNotFoundError("Object at location p not found"), Failure.MISSING),
        (FileNotFoundError("404 Not Found: <Code>NoSuchBucket</Code>"), Failure.PERMANENT),
        (TimeoutError(), Failure.TRANSIENT),
        (ConnectionResetError(), Failure.TRANSIENT),
        (PermissionDeniedError("403"), Failure.AUTH),
        (UnauthenticatedError("401"), Failure.AUTH),
        (GenericError("GET x - Server returned non-2xx status code: 503 Slow"), Failure.TRANSIENT),
        (GenericError("GET x - Server returned non-2xx status code: 429 Too"), Failure.TRANSIENT),
        (GenericError("GET x - Server returned non-2xx status code: 400 Bad"), Failure.PERMANENT),
        (GenericError("list - Server returned non-2xx status code: 403 Forb"), Failure.AUTH),
        (GenericError("GET x - HTTP error: error sending request"), Failure.TRANSIENT),
        (GenericError("GET x - HTTP error: builder error"), Failure.PERMANENT),
        (GenericError("Unable to open file x: Permission denied (os error 13)"), Failure.PERMANENT),
        (ValueError("bad argument"), Failure.PERMANENT),
    ],
)
def test_classify(exc: BaseException, failure: Failure) -> None:
    assert classify(exc) is failure


@contextlib.asynccontextmanager
async def _slow_link(upstream: str, rate: int) -> AsyncIterator[str]:
    """A TCP proxy to `upstream` (host:port) that every connection through it shares, at
    `rate` bytes a second each way (a slow link, or a fast one split many ways); yields
    its host:port."""
    host, _, port = upstream.rpartition(":")
    free = {"up": 0.0, "down": 0.0}  # when the link is next free, each way
    loop = asyncio.get_running_loop()
    open_ends: set[asyncio.StreamWriter] = set()

    async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter, way: str) -> None:
        try:
            while data := await r.read(4096):
                start = max(loop.time(), free[way])
                free[way] = start + len(data) / rate
                await asyncio.sleep(free[way] - loop.time())
                w.write(data)
                await w.drain()
        except ConnectionError:
            pass
        finally:
            w.close()

    async def handle(cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        try:
            ur, uw = await asyncio.open_connection(host, int(port))
        except OSError:
            cw.close()
            return
        open_ends.update((cw, uw))
        try:
            await asyncio.gather(pipe(cr, uw, "up"), pipe(ur, cw, "down"))
        finally:
            open_ends.difference_update((cw, uw))

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()
        for w in list(open_ends):
            w.transport.abort()
        await server.wait_closed()


async def test_reads_that_share_a_slow_link_are_not_cut_off_while_they_move() -> None:
    """Eight chunks of 160 KB at once over a 320 KB/s link: each takes ~4 s, four times the
    request timeout, and keeps moving all the while. A deadline of the request timeout a
    read failed every one of them, on every attempt, however long the link would carry
    them; now each may take its size at origin.MIN_RATE, and only a stall (no byte for the
    timeout) ends it."""
    datas = [random.Random(i).randbytes(160_000) for i in range(8)]
    objects = {f"/o/chunks/{chunk_id(d).hex()[:2]}/{chunk_id(d).hex()}": d for d in datas}

    async def serve(request: web.Request) -> web.StreamResponse:
        body = objects.get(request.path)
        return web.Response(body=body) if body is not None else web.Response(status=404)

    app = web.Application()
    app.router.add_get("/{tail:.*}", serve)
    async with _http_server(app) as base, _slow_link(base.removeprefix("http://"), 320_000) as via:
        origin = _origin(f"http://{via}/o", timeout=1.0, concurrency=8)
        try:
            async with asyncio.timeout(60):
                got = await asyncio.gather(*(origin.get_chunk(chunk_id(d)) for d in datas))
        finally:
            await origin.close()
    assert [bytes(g) for g in got] == datas
    assert origin.stats.requests_retried == 0


async def test_an_upload_slower_than_the_timeout_that_keeps_moving_goes_through(
    s3_server: S3Bucket,
) -> None:
    """A 1 MB pack over a 400 KB/s uplink takes 2.5 s, past a 1 s request timeout: the
    whole PUT had to fit in the timeout (the client's and ours), so a pack larger than
    rate x timeout could never be published. Its answer starts only once its body is sent,
    so no read timeout may apply to it either."""
    data = random.Random(3).randbytes(1_000_000)
    pack = chunk_id(data)
    endpoint = s3_server.endpoint.removeprefix("http://")
    async with _slow_link(endpoint, 400_000) as via:
        options = {**s3_server.options, "endpoint": f"http://{via}"}
        origin = _origin(s3_server.url(PREFIX), options, timeout=1.0)
        try:
            async with asyncio.timeout(60):
                await origin.put_pack(pack, data)
        finally:
            await origin.close()
    assert origin.stats.requests_retried == 0
    reader = _origin(s3_server.url(PREFIX), s3_server.options)
    assert bytes(await reader.get_pack_range(pack, 0, len(data), len(data))) == data
