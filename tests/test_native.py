"""hostd.fastcopy: the compiled create_files and write_blobs (native/fastcopy.c) and their
pure-Python twins give the same files and the same errors.

Each case runs the same jobs through both into two fresh directories and compares what came
out: bytes, permission bits, mtime and atime to the nanosecond (negative ones included), and
the exception (type, errno, message, filename) or, for write_blobs, each job's outcome. The
native half is skipped where the extension was not built (no gcc or no Python headers);
under CI=true that fails instead. Then fill's and publish's use of write_blobs under both;
then the daemon's batches (lstat_paths, link_files on threads, open_paths, fstat_fds,
close_fds), each against what the os module gives, and the choice of threads.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import random
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from hostd import fastcopy

KiB = 1024
MiB = 1024 * KiB
ROOT = Path(__file__).resolve().parent.parent

Create = Callable[[Sequence[fastcopy.Job], Sequence[str] | None], None]


def _native_or_skip() -> None:
    if fastcopy.WHY_NOT_NATIVE:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true: {fastcopy.WHY_NOT_NATIVE}; CI has gcc, so it must build")
        pytest.skip(fastcopy.WHY_NOT_NATIVE)


def _twin(threads: int) -> Create:
    return lambda jobs, paths: fastcopy.twin_create_files(jobs, paths, threads=threads)


def _native(threads: int) -> Create:
    return lambda jobs, paths: fastcopy.native_create_files(jobs, paths, threads=threads)


@dataclass(frozen=True)
class Spec:
    """One file to create: its bytes (None: an "empty" job, no source), mode and mtime."""

    path: str
    data: bytes | None
    mode: int
    mtime: int | None


@dataclass(frozen=True)
class Result:
    files: dict[str, tuple[int, int, int | None, int | None, bytes]]
    error: tuple[type[BaseException], int | None, str | None, str | None] | None


def _run(root: Path, name: str, specs: Sequence[Spec], create: Create, **over: int) -> Result:
    """Write the sources, create the files with `create` under root/name, read them back.
    `over` replaces a job's size (`size:PATH`) or source (`src:PATH`, a descriptor)."""
    src_dir = root / f"src-{name}"
    out = root / name
    src_dir.mkdir()
    out.mkdir()
    dirs: dict[str, int] = {}
    fds: list[int] = []
    jobs: list[fastcopy.Job] = []
    try:
        for i, s in enumerate(specs):
            up, _, leaf = s.path.rpartition("/")
            if up not in dirs:
                (out / up).mkdir(parents=True, exist_ok=True)
                dirs[up] = os.open(out / up, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            src = -1
            if s.data is not None:
                (src_dir / str(i)).write_bytes(s.data)
                src = os.open(src_dir / str(i), os.O_RDONLY | os.O_CLOEXEC)
                fds.append(src)
            src = over.get(f"src:{s.path}", src)
            size = over.get(f"size:{s.path}", len(s.data or b""))
            jobs.append((dirs[up], leaf, s.mode, size, src, s.mtime))
        error = None
        try:
            create(jobs, [s.path for s in specs])
        except OSError as e:
            error = (type(e), e.errno, e.strerror, e.filename)
        return Result(_read_tree(out, {s.path for s in specs}), error)
    finally:
        for fd in [*fds, *dirs.values()]:
            os.close(fd)


def _read_tree(
    out: Path, known: set[str]
) -> dict[str, tuple[int, int, int | None, int | None, bytes]]:
    """path -> (mode, size, mtime_ns, atime_ns, bytes); times None for files created without
    an mtime (they get the time of creation). Stat before reading: reading moves the atime."""
    got: dict[str, tuple[int, int, int | None, int | None, bytes]] = {}
    for p in sorted(out.rglob("*")):
        if p.is_dir():
            continue
        rel = p.relative_to(out).as_posix()
        st = p.stat()
        got[rel] = (
            stat.S_IMODE(st.st_mode),
            st.st_size,
            st.st_mtime_ns,
            st.st_atime_ns,
            p.read_bytes(),
        )
    return got


def _expect(specs: Sequence[Spec], result: Result) -> None:
    """Every spec came out as asked (an mtime of None: no check of the times)."""
    assert result.error is None
    assert sorted(result.files) == sorted(s.path for s in specs)
    for s in specs:
        mode, size, mtime, atime, data = result.files[s.path]
        assert (mode, size, data) == (s.mode, len(s.data or b""), s.data or b""), s.path
        if s.mtime is not None:
            assert (mtime, atime) == (s.mtime, s.mtime), s.path


def _untimed(result: Result, specs: Sequence[Spec]) -> Result:
    """The result without the times of files created with no mtime, or by the job that
    failed (they differ by run)."""
    none = {s.path for s in specs if s.mtime is None}
    if result.error is not None and result.error[3] is not None:
        none.add(result.error[3])
    files = {k: (v[0], v[1], None, None, v[4]) if k in none else v for k, v in result.files.items()}
    return Result(files, result.error)


@pytest.fixture
def both(tmp_path: Path) -> Callable[..., tuple[Result, Result]]:
    """Run specs through the twin and the native loop; both results."""

    def run(specs: Sequence[Spec], threads: int = 4, **over: int) -> tuple[Result, Result]:
        _native_or_skip()
        root = Path(tempfile.mkdtemp(dir=tmp_path))
        py = _run(root, "python", specs, _twin(threads), **over)
        c = _run(root, "native", specs, _native(threads), **over)
        return _untimed(py, specs), _untimed(c, specs)

    return run


def _small(n: int, seed: int = 5) -> list[Spec]:
    rng = random.Random(seed)
    modes = (0o644, 0o755, 0o444, 0o600, 0o640, 0o700, 0o4755, 0o1777)
    return [
        Spec(
            f"d{i % 13}/f{i:05d}",
            rng.randbytes(rng.randint(KiB, 16 * KiB)),
            rng.choice(modes),
            1_500_000_000 * 10**9 + rng.randrange(10**17),
        )
        for i in range(n)
    ]


def test_two_thousand_small_files_are_the_same(both: Callable[..., tuple[Result, Result]]) -> None:
    specs = _small(2000)
    py, c = both(specs)
    _expect(specs, py)
    assert c == py


@pytest.mark.parametrize("threads", [1, 2, 4])
def test_odd_times_empty_files_and_a_big_one_are_the_same(
    both: Callable[..., tuple[Result, Result]], threads: int
) -> None:
    rng = random.Random(9)
    specs = [
        Spec("big.bin", rng.randbytes(3 * MiB + 17), 0o644, 1_600_000_000_999_999_999),
        Spec("before-1970", b"old", 0o444, -86_400_000_000_123),
        Spec("one-ns-before-1970", b"x", 0o444, -1),
        Spec("epoch", b"e", 0o600, 0),
        Spec("far/future", b"f", 0o755, 4_102_444_800_000_000_001),  # 2100
        Spec("empty-job", None, 0o640, 1_234_567_890_123_456_789),
        Spec("empty-copy", b"", 0o755, 1_234_567_890_000_000_000),
        Spec("no-mtime", b"now", 0o644, None),
        Spec("empty-no-mtime", None, 0o600, None),
        Spec("d/\u00e9t\u00e9 \u6f22\u5b57", b"utf-8 name", 0o644, 7),
    ]
    py, c = both(specs, threads=threads)
    _expect(specs, py)
    assert c == py


def test_an_existing_name_is_eexist_in_both(tmp_path: Path) -> None:
    _native_or_skip()
    for name, create in (("python", _twin(1)), ("native", _native(1))):
        out = tmp_path / name
        out.mkdir()
        (out / "taken").write_bytes(b"already here")
        (out / "link").symlink_to("nowhere")  # O_NOFOLLOW|O_EXCL: a symlink is taken too
        dfd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for leaf in ("taken", "link"):
                with pytest.raises(FileExistsError) as got:
                    create(
                        [(dfd, "new", 0o644, 0, -1, None), (dfd, leaf, 0o644, 0, -1, 5)],
                        ["sub/new", f"sub/{leaf}"],
                    )
                assert (got.value.errno, got.value.filename) == (errno.EEXIST, f"sub/{leaf}")
                assert got.value.strerror == os.strerror(errno.EEXIST)
                os.unlink(out / "new")
        finally:
            os.close(dfd)
        assert (out / "taken").read_bytes() == b"already here"
        assert os.readlink(out / "link") == "nowhere"


def test_a_short_source_is_eio_in_both(both: Callable[..., tuple[Result, Result]]) -> None:
    specs = [Spec("short", b"0123456789", 0o644, 1)]
    py, c = both(specs, threads=1, **{"size:short": 4096})
    assert py.error == (
        OSError,
        errno.EIO,
        "source shrank while copying (4086 bytes short)",
        "short",
    )
    assert c == py


def test_a_source_that_cannot_be_read_is_the_same_error(
    both: Callable[..., tuple[Result, Result]], tmp_path: Path
) -> None:
    wronly = os.open(tmp_path / "wronly", os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    rd, wr = os.pipe()
    try:
        specs = [Spec("a", b"abc", 0o644, 1)]
        py, c = both(specs, threads=1, **{"src:a": wronly})
        assert py.error is not None
        assert py.error[1] == errno.EBADF
        assert c == py
        os.write(wr, b"abc")  # a pipe: copy_file_range refuses it, sendfile cannot seek it
        py, c = both(specs, threads=1, **{"src:a": rd})
        assert py.error is not None
        assert py.error[3] == "a"
        assert c == py
    finally:
        for fd in (wronly, rd, wr):
            os.close(fd)


def test_a_source_on_another_filesystem_is_copied_the_same(tmp_path: Path) -> None:
    """A blob on tmpfs copied into a target elsewhere: copy_file_range may refuse (EXDEV),
    and sendfile does it."""
    _native_or_skip()
    shm = Path("/dev/shm")
    if not shm.is_dir():
        pytest.skip("no /dev/shm")
    rng = random.Random(3)
    data = rng.randbytes(300 * KiB + 1)
    blob = shm / f"hostd-test-native-{os.getpid()}"
    blob.write_bytes(data)
    fd = os.open(blob, os.O_RDONLY)
    try:
        tmp = tmp_path / "t"
        tmp.mkdir()
        dfd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for i, create in enumerate((_twin(1), _native(1))):
                os.lseek(fd, 0, os.SEEK_SET)
                create([(dfd, f"y{i}", 0o644, len(data), fd, 42)], None)
                assert (tmp / f"y{i}").read_bytes() == data
        finally:
            os.close(dfd)
    finally:
        os.close(fd)
        blob.unlink()


def test_the_first_failure_stops_the_batch(tmp_path: Path) -> None:
    """One thread: nothing after the failing job is made, in either."""
    _native_or_skip()
    for name, create in (("python", _twin(1)), ("native", _native(1))):
        out = tmp_path / name
        out.mkdir()
        (out / "f3").write_bytes(b"")
        dfd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
        try:
            with pytest.raises(FileExistsError) as got:
                create([(dfd, f"f{i}", 0o644, 0, -1, None) for i in range(10)], None)
            assert got.value.filename == "f3"  # no paths: the leaf
        finally:
            os.close(dfd)
        assert sorted(p.name for p in out.iterdir()) == ["f0", "f1", "f2", "f3"]


def test_no_jobs_is_nothing() -> None:
    fastcopy.twin_create_files([])
    fastcopy.create_files([])
    if not fastcopy.WHY_NOT_NATIVE:
        fastcopy.native_create_files([])


def _imported(env: dict[str, str], code: str) -> str:
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


def test_hostd_native_0_forces_the_twin() -> None:
    code = "from hostd import fastcopy; print(fastcopy.IMPLEMENTATION)"
    assert _imported({"HOSTD_NATIVE": "0"}, code) == "python"
    expected = "python" if fastcopy.WHY_NOT_NATIVE else "native"
    assert _imported({"HOSTD_NATIVE": "1"}, code) == expected


def test_the_helper_still_imports_only_the_standard_library() -> None:
    """fsops starts once per operation: the native module adds nothing beyond the stdlib."""
    code = (
        "import sys; before = set(sys.modules); import hostd.fsops; "
        "print(' '.join(sorted({m.split('.')[0] for m in set(sys.modules) - before} "
        "- set(sys.stdlib_module_names) - {'hostd'})))"
    )
    for native in ("0", "1"):
        assert _imported({"HOSTD_NATIVE": native}, code) == ""


@pytest.mark.parametrize("impl", ["python", "native"])
def test_the_helper_answers_a_taken_name_as_changed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, impl: str
) -> None:
    """fsops.op_files maps the O_EXCL collision to Refused("changed"), naming the path."""
    from hostd import fsops

    if impl == "native":
        _native_or_skip()
    create = fastcopy.native_create_files if impl == "native" else fastcopy.twin_create_files
    monkeypatch.setattr(fsops, "create_files", create)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "taken").write_bytes(b"")
    (tmp_path / "blob").write_bytes(b"abc")
    a, b = socket.socketpair()
    helper = fsops.Helper(a)
    helper.dirs = {
        "": os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY),
        "d": os.open(tmp_path / "d", os.O_RDONLY | os.O_DIRECTORY),
    }
    blob = os.open(tmp_path / "blob", os.O_RDONLY)
    try:
        items = [["new", 0o644, 3, "copy", 5], ["d/taken", 0o644, 0, "empty", None]]
        with pytest.raises(fsops.Refused) as got:
            helper.op_files({"op": "files", "items": items}, [blob])
        assert (got.value.kind, got.value.message) == (
            "changed",
            "'d/taken' appeared in the tree being built",
        )
        assert (tmp_path / "new").read_bytes() == b"abc"
        assert os.stat(tmp_path / "new").st_mtime_ns == 5
    finally:
        os.close(blob)
        helper._close_dirs()
        a.close()
        b.close()


# -- write_blobs -------------------------------------------------------------------------------

WriteBlobs = Callable[..., list[fastcopy.Written | fastcopy.Failed]]
IMPLEMENTATIONS: list[tuple[str, WriteBlobs]] = [
    ("python", fastcopy.twin_write_blobs),
    ("native", fastcopy.native_write_blobs),
    ("native x2", lambda jobs, **kw: fastcopy.native_write_blobs(jobs, 2, **kw)),
]


@dataclass(frozen=True)
class BlobSpec:
    """One blob to write: paths relative to the run's directory (scratch None: tmp/s<i>)."""

    dest: str
    data: bytes | bytearray | memoryview
    mtime: int | None
    mode: int = 0o444
    scratch: str | None = None


@dataclass(frozen=True)
class Wrote:
    """Each job's outcome (a Written as (size, mtime or None where the job gave none)), and
    every directory and file under the run's directory."""

    outcomes: list[tuple[int, int | None] | tuple[int, int]]
    dirs: list[str]
    files: dict[str, tuple[int, int, int | None, int | None, bytes]]


def _write_blobs(
    out: Path, specs: Sequence[BlobSpec], write: WriteBlobs, prepare: Callable[[Path], None]
) -> Wrote:
    """Lay out tmp/ and blobs/ under `out`, `prepare` it, write the blobs, read it back."""
    (out / "tmp").mkdir(parents=True)
    (out / "blobs").mkdir()
    prepare(out)
    jobs: list[fastcopy.BlobJob] = [
        (str(out / (s.scratch or f"tmp/s{i}")), str(out / s.dest), s.data, s.mtime, s.mode)
        for i, s in enumerate(specs)
    ]
    got = write(jobs)
    assert len(got) == len(jobs)
    outcomes: list[tuple[int, int | None] | tuple[int, int]] = []
    timed = set()  # the files given a time: others have the time they were made at
    for s, job, r in zip(specs, jobs, got, strict=True):
        if len(r) == 3:
            st = os.stat(job[1])  # the stat it answered is the file's now
            assert r == (st.st_size, st.st_mtime_ns, st.st_ctime_ns), s.dest
            assert not os.path.lexists(job[0])
            outcomes.append((r[0], r[1] if s.mtime is not None else None))
            if s.mtime is not None:
                timed.add(s.dest)
        else:
            _err, stage = r
            if stage > fastcopy.OPEN:  # it made a scratch file: none is left
                assert not os.path.lexists(job[0]), s.dest
            outcomes.append(r)
    files = {
        k: v if k in timed else (v[0], v[1], None, None, v[4])
        for k, v in _read_tree(out, set()).items()
    }
    dirs = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_dir())
    return Wrote(outcomes, dirs, files)


@pytest.fixture
def blobs_both(tmp_path: Path) -> Callable[..., Wrote]:
    """Write specs with each implementation into a directory of its own; all results equal
    (each also checked against what it answered); the twin's."""

    def run(specs: Sequence[BlobSpec], prepare: Callable[[Path], None] = lambda _: None) -> Wrote:
        _native_or_skip()
        root = Path(tempfile.mkdtemp(dir=tmp_path))
        results = [
            _write_blobs(root / name.replace(" ", ""), specs, write, prepare)
            for name, write in IMPLEMENTATIONS
        ]
        for (name, _), r in zip(IMPLEMENTATIONS[1:], results[1:], strict=True):
            assert r == results[0], name
        return results[0]

    return run


def test_two_thousand_small_blobs_are_the_same(blobs_both: Callable[..., Wrote]) -> None:
    rng = random.Random(21)
    specs = []
    for _ in range(2000):
        h = rng.randbytes(32).hex()
        data = rng.randbytes(rng.randint(KiB, 16 * KiB))
        specs.append(
            BlobSpec(f"blobs/{h[:2]}/{h}", data, 1_500_000_000 * 10**9 + rng.randrange(10**17))
        )
    got = blobs_both(specs)
    assert got.outcomes == [(len(s.data), s.mtime) for s in specs]
    for s in specs:
        assert got.files[s.dest] == (0o444, len(s.data), s.mtime, s.mtime, s.data)
    assert not [f for f in got.files if f.startswith("tmp/")]
    # the prefix directories were made on the way
    assert {d for d in got.dirs if d.startswith("blobs/")} == {s.dest[:8] for s in specs}


def test_odd_times_empty_blobs_views_and_modes_are_the_same(
    blobs_both: Callable[..., Wrote],
) -> None:
    big = bytearray(random.Random(4).randbytes(64 * KiB))
    specs = [
        BlobSpec("blobs/aa/before-1970", b"old", -86_400_000_000_123),
        BlobSpec("blobs/aa/one-ns-before-1970", b"x", -1),
        BlobSpec("blobs/aa/epoch", b"e", 0),
        BlobSpec("blobs/bb/2100", b"f", 4_102_444_800_000_000_001),
        BlobSpec("blobs/bb/no-mtime", b"now", None),
        BlobSpec("blobs/bb/empty", b"", 1_234_567_890_123_456_789),
        BlobSpec("blobs/cc/view", memoryview(big)[100 : 40 * KiB], 7),
        BlobSpec("blobs/cc/bytearray", big, 8),
        BlobSpec("blobs/cc/ints", memoryview(bytes(big[:4000])).cast("I"), 9),
        BlobSpec("blobs/cc/mode-600", b"m", 10, mode=0o600),
        BlobSpec("blobs/cc/\u00e9t\u00e9", b"utf-8 name", 11),
    ]
    got = blobs_both(specs)
    for s in specs:
        data = bytes(s.data)
        assert got.files[s.dest][:2] == (s.mode, len(data)), s.dest
        assert got.files[s.dest][4] == data, s.dest
        if s.mtime is not None:
            assert got.files[s.dest][2:4] == (s.mtime, s.mtime), s.dest


def test_a_blob_replaces_what_sits_at_its_name_and_a_leftover_scratch(
    blobs_both: Callable[..., Wrote],
) -> None:
    """A file at a blob's name (a leftover no record vouches for) makes that blob go the
    scratch way, which replaces it, and a leftover at its scratch name too."""

    def prepare(out: Path) -> None:
        (out / "blobs" / "aa").mkdir()
        (out / "blobs" / "aa" / "old").write_bytes(b"a leftover no record vouches for")
        (out / "blobs" / "aa" / "old").chmod(0o444)
        (out / "tmp" / "s0").write_bytes(b"scratch of a batch that died half way")

    specs = [BlobSpec("blobs/aa/old", b"new bytes", 5), BlobSpec("blobs/aa/other", b"o", 6)]
    got = blobs_both(specs, prepare)
    assert got.outcomes == [(9, 5), (1, 6)]
    assert got.files == {
        "blobs/aa/old": (0o444, 9, 5, 5, b"new bytes"),
        "blobs/aa/other": (0o444, 1, 6, 6, b"o"),
    }


@pytest.mark.parametrize("way", ["unnamed", "scratch"])
def test_without_replace_a_file_at_a_blobs_name_stays(
    monkeypatch: pytest.MonkeyPatch, way: str
) -> None:
    """replace=False (a publish's): a file at a blob's name stays as it was, whichever way
    the blob was written (an unnamed file, or where that cannot be, a scratch file linked
    in, never renamed over it), and that job fails (EEXIST, RENAME) leaving no scratch; the
    others are written. A restore may have checked that inode, and links it by name."""
    _native_or_skip()
    if way == "scratch":
        monkeypatch.setattr(fastcopy, "_no_unnamed", True)  # (the twin's switch)
        impls: list[tuple[str, WriteBlobs]] = [("python", fastcopy.twin_write_blobs)]
    else:
        impls = IMPLEMENTATIONS
    for name, write in impls:
        out = Path(tempfile.mkdtemp(prefix=name.replace(" ", "")))
        try:
            (out / "tmp").mkdir()
            (out / "blobs" / "aa").mkdir(parents=True)
            (out / "blobs" / "aa" / "old").write_bytes(b"the blob a restore checked")
            (out / "blobs" / "aa" / "old").chmod(0o444)
            before = os.stat(out / "blobs" / "aa" / "old")
            jobs: list[fastcopy.BlobJob] = [
                (str(out / "tmp/s0"), str(out / "blobs/aa/old"), b"same digest", 5, 0o555),
                (str(out / "tmp/s1"), str(out / "blobs/aa/new"), b"n", 6, 0o444),
            ]
            got = write(jobs, replace=False)
            assert got[0] == (errno.EEXIST, fastcopy.RENAME), name
            assert len(got[1]) == 3, name
            after = os.stat(out / "blobs" / "aa" / "old")
            assert (after.st_ino, after.st_mode & 0o777, after.st_mtime_ns) == (
                before.st_ino,
                0o444,
                before.st_mtime_ns,
            ), name
            assert (out / "blobs" / "aa" / "old").read_bytes() == b"the blob a restore checked"
            assert os.listdir(out / "tmp") == [], name
        finally:
            shutil.rmtree(out, ignore_errors=True)


def test_each_failure_is_its_own_and_leaves_no_scratch(blobs_both: Callable[..., Wrote]) -> None:
    """Every job is tried: a failure between good ones is answered (errno, stage), the same
    in both, and the good ones are written."""

    def prepare(out: Path) -> None:
        (out / "a-file").write_bytes(b"not a directory")
        (out / "blobs" / "ff").write_bytes(b"a file where a prefix directory goes")
        (out / "blobs" / "dd" / "a-dir").mkdir(parents=True)
        (out / "tmp" / "a-dir").mkdir()
        (out / "tmp" / "a-dir" / "inside").write_bytes(b"")
        (out / "blobs" / "00").mkdir()
        for leftover in ("x", "y"):  # a file at the name: the blob goes the scratch way
            (out / "blobs" / "00" / leftover).write_bytes(b"left over")

    specs = [
        BlobSpec("blobs/00/ok0", b"0", 1),
        BlobSpec("gone/11/x", b"1", 1),  # its prefix's parent is missing: mkdir fails
        BlobSpec("a-file/22/x", b"2", 1),  # through a regular file
        BlobSpec("blobs/ff/x", b"3", 1),  # the prefix is a regular file
        BlobSpec("blobs/dd/a-dir", b"4", 1),  # a directory where the blob goes
        BlobSpec("blobs/00/x", b"5", 1, scratch="no-tmp/s"),  # no scratch directory
        BlobSpec("blobs/00/y", b"6", 1, scratch="tmp/a-dir"),  # a directory at the scratch
        BlobSpec("blobs/00/ok1", b"7", 2),
        # Named only once whole (O_TMPFILE), a blob makes no scratch: this one is written...
        BlobSpec("blobs/01/y", b"9", 4, scratch="tmp/a-dir/inside/s"),  # through a file
        # ... but with no scratch directory, the tier's filesystem is unknown: scratch way
        BlobSpec("blobs/01/x", b"8", 3, scratch="no-tmp/s"),
    ]
    got = blobs_both(specs, prepare)
    assert got.outcomes == [
        (1, 1),
        (errno.ENOENT, fastcopy.MKDIR),
        (errno.ENOTDIR, fastcopy.RENAME),
        (errno.ENOTDIR, fastcopy.RENAME),
        (errno.EISDIR, fastcopy.RENAME),
        (errno.ENOENT, fastcopy.OPEN),
        (errno.EISDIR, fastcopy.OPEN),  # a leftover is unlinked: a directory is not
        (1, 2),
        (1, 4),
        (errno.ENOENT, fastcopy.OPEN),
    ]
    assert sorted(got.files) == [
        "a-file",
        "blobs/00/ok0",
        "blobs/00/ok1",
        "blobs/00/x",
        "blobs/00/y",
        "blobs/01/y",
        "blobs/ff",
        "tmp/a-dir/inside",
    ]
    assert got.files["blobs/00/x"][4] == b"left over"  # what failed left what was there


def test_a_prefix_directory_leading_off_the_tier_fails_as_a_rename_across_filesystems(
    blobs_both: Callable[..., Wrote], tmp_path: Path
) -> None:
    """blobs/aa a symlink to another filesystem: the blob is not written there (the batch's
    syncfs, of the tier's filesystem, would not cover it), EXDEV, as the rename always said."""
    elsewhere: list[Path] = []

    def prepare(out: Path) -> None:
        away = Path(tempfile.mkdtemp(dir="/dev/shm"))
        elsewhere.append(away)
        (out / "blobs" / "aa").symlink_to(away)

    if os.stat(tmp_path).st_dev == os.stat("/dev/shm").st_dev:
        pytest.skip("needs the test's directory and /dev/shm on two filesystems")
    try:
        got = blobs_both([BlobSpec("blobs/aa/x", b"away", 1)], prepare)
        assert got.outcomes == [(errno.EXDEV, fastcopy.RENAME)]
        assert all(list(d.iterdir()) == [] for d in elsewhere)
    finally:
        for d in elsewhere:
            shutil.rmtree(d, ignore_errors=True)


def test_the_error_names_the_path_and_the_stage() -> None:
    job: fastcopy.BlobJob = ("/t/tmp/s0", "/t/blobs/ab/abc", b"", None, 0o444)
    e = fastcopy.blob_error(job, (errno.ENOSPC, fastcopy.WRITE))
    assert (e.errno, e.filename, e.strerror) == (
        errno.ENOSPC,
        "/t/tmp/s0",
        f"{os.strerror(errno.ENOSPC)}, writing it",
    )
    assert fastcopy.blob_error(job, (errno.EROFS, fastcopy.MKDIR)).filename == "/t/blobs/ab"
    assert fastcopy.blob_error(job, (errno.EXDEV, fastcopy.RENAME)).filename == "/t/blobs/ab/abc"
    assert isinstance(fastcopy.blob_error(job, (errno.ENOENT, fastcopy.OPEN)), FileNotFoundError)


def test_no_blobs_is_nothing() -> None:
    assert fastcopy.twin_write_blobs([]) == []
    assert fastcopy.write_blobs([]) == []
    if not fastcopy.WHY_NOT_NATIVE:
        assert fastcopy.native_write_blobs([]) == []


_IN_NAMESPACE = """
import json, sys
from hostd import fastcopy
jobs = json.loads(sys.argv[1])
print(json.dumps([
    write([(s.format(impl=impl), d.format(impl=impl), b"x" * n, 5, 0o444) for s, d, n in jobs])
    for impl, write in (("python", fastcopy.twin_write_blobs),
                        ("native", fastcopy.native_write_blobs))
]))
"""


def _in_namespace(setup: str, top: Path, jobs: list[tuple[str, str, int]]) -> list[tuple[int, int]]:
    """Write blobs with each implementation in a private mount namespace that `setup` (sh,
    `$1` is `top`) prepared: jobs (scratch, dest, size), "{impl}" in a path standing for
    "python" or "native". The outcomes, each as (size, mtime) or (errno, stage), the same
    from both."""
    _native_or_skip()
    if os.geteuid() != 0 or not shutil.which("unshare"):
        why = "needs root and unshare (util-linux): mounts in a private mount namespace"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true: {why}")
        pytest.skip(why)
    script = f'{setup}; exec "$2" -c "$3" "$4"'
    argv = [sys.executable, _IN_NAMESPACE, json.dumps(jobs)]
    done = subprocess.run(
        ["unshare", "-m", "sh", "-ec", script, "sh", str(top), *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    py, c = ([(r[0], r[1]) for r in got] for got in json.loads(done.stdout))
    assert c == py
    return py


@pytest.mark.root
def test_a_read_only_tier_fails_each_blob_alike(tmp_path: Path) -> None:
    """A tier bind-mounted read-only: EROFS where a file or directory is made in it, EXDEV
    for a rename into it from elsewhere."""
    ro, rw = tmp_path / "ro", tmp_path / "rw"
    for d in (ro / "tmp", ro / "blobs" / "aa", rw / "tmp", rw / "blobs"):
        d.mkdir(parents=True)
    got = _in_namespace(
        'mount --bind "$1" "$1"; mount -o remount,bind,ro "$1"',
        ro,
        [
            (f"{ro}/tmp/s0", f"{ro}/blobs/aa/b0", 1),
            (f"{rw}/tmp/s1", f"{ro}/blobs/aa/b1", 1),
            (f"{rw}/tmp/s2", f"{ro}/blobs/bb/b2", 1),
            (f"{rw}/tmp/s3-{{impl}}", f"{rw}/blobs/cc/b3-{{impl}}", 1),
        ],
    )
    assert got == [
        (errno.EROFS, fastcopy.OPEN),
        (errno.EXDEV, fastcopy.RENAME),
        (errno.EROFS, fastcopy.MKDIR),
        (1, 5),
    ]
    assert list((rw / "tmp").iterdir()) == []  # no scratch left
    assert (rw / "blobs" / "cc" / "b3-native").read_bytes() == b"x"


@pytest.mark.root
@pytest.mark.parametrize("hide_proc", [False, True], ids=["with /proc", "no /proc"])
def test_a_blob_is_named_whichever_way_the_process_can(tmp_path: Path, hide_proc: bool) -> None:
    """An unnamed file is named by linkat(AT_EMPTY_PATH) where the kernel allows it, else
    through /proc/self/fd; with neither, each blob is written under a scratch name and
    renamed, as before. Every blob lands whole, with no scratch left, either way, and both
    implementations alike: the last blob's scratch name is taken by a directory, which only
    the scratch way trips on."""
    for impl in ("python", "native"):
        for d in ("tmp/a-dir", "blobs"):
            (tmp_path / impl / d).mkdir(parents=True)
    t = f"{tmp_path}/{{impl}}"
    setup = "mount -t tmpfs hostd-no-proc /proc" if hide_proc else "true"
    got = _in_namespace(
        setup,
        tmp_path,
        [(f"{t}/tmp/s{i}", f"{t}/blobs/a{i % 3}/b{i}", 100 + i) for i in range(5)]
        + [(f"{t}/tmp/a-dir", f"{t}/blobs/a2/b5", 105)],
    )
    assert got == [(100 + i, 5) for i in range(6)]
    for impl in ("python", "native"):
        assert [p.name for p in (tmp_path / impl / "tmp").iterdir()] == ["a-dir"]
        for i in range(6):
            assert (tmp_path / impl / "blobs" / f"a{i % 3}" / f"b{i}").read_bytes() == b"x" * (
                100 + i
            )


@pytest.mark.root
def test_a_full_tier_fails_the_blob_that_does_not_fit_and_gives_its_space_back(
    tmp_path: Path,
) -> None:
    """A 64 KiB tmpfs a tier: a blob that does not fit is ENOSPC while it is written; its
    scratch is unlinked, so the next blob, which fits, is written."""
    setup = (
        'for impl in python native; do mkdir "$1/$impl"; '
        'mount -t tmpfs -o size=64k,mode=0700 hostd-test "$1/$impl"; '
        'mkdir "$1/$impl/tmp" "$1/$impl/blobs"; done'
    )
    t = f"{tmp_path}/{{impl}}"
    got = _in_namespace(
        setup,
        tmp_path,
        [
            (f"{t}/tmp/s0", f"{t}/blobs/aa/b0", 40 * KiB),
            (f"{t}/tmp/s1", f"{t}/blobs/aa/b1", 40 * KiB),
            (f"{t}/tmp/s2", f"{t}/blobs/aa/b2", 20 * KiB),
        ],
    )
    assert got == [(40 * KiB, 5), (errno.ENOSPC, fastcopy.WRITE), (20 * KiB, 5)]


_TOO_BIG = """
import json, resource, signal, sys
from hostd import fastcopy
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (50, 50))
top = sys.argv[1]
print(json.dumps([
    write([(f"{top}/{impl}/tmp/s0", f"{top}/{impl}/blobs/cc/b0", b"x" * 100, 5, 0o444)])
    for impl, write in (("python", fastcopy.twin_write_blobs),
                        ("native", fastcopy.native_write_blobs))
]))
"""


def test_a_blob_that_fails_leaves_nothing_not_even_its_prefix_directory(tmp_path: Path) -> None:
    """A blob larger than the process may write (RLIMIT_FSIZE: EFBIG, a real refusal) fails
    while written, in both ways (the unnamed file, then the scratch one), and leaves neither
    file nor the prefix directory made for it."""
    _native_or_skip()
    for impl in ("python", "native"):
        for d in ("tmp", "blobs"):
            (tmp_path / impl / d).mkdir(parents=True)
    done = subprocess.run(
        [sys.executable, "-c", _TOO_BIG, str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    py, c = json.loads(done.stdout)
    assert py == c == [[errno.EFBIG, fastcopy.WRITE]]
    for impl in ("python", "native"):
        assert list((tmp_path / impl / "blobs").iterdir()) == []
        assert list((tmp_path / impl / "tmp").iterdir()) == []


def test_write_blobs_takes_the_implementation_chosen_at_import(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[str] = []

    def called(name: str) -> WriteBlobs:
        def write(
            jobs: Sequence[fastcopy.BlobJob], *, replace: bool = True
        ) -> list[fastcopy.Written | fastcopy.Failed]:
            calls.append(f"{name} replace={replace}")
            return []

        return write

    monkeypatch.setattr(fastcopy, "twin_write_blobs", called("python"))
    monkeypatch.setattr(fastcopy, "native_write_blobs", called("native"))
    for impl in ("python", "native"):
        monkeypatch.setattr(fastcopy, "IMPLEMENTATION", impl)
        fastcopy.write_blobs([])
        fastcopy.write_blobs([], replace=False)
    assert calls == [
        "python replace=True",
        "python replace=False",
        "native replace=True",
        "native replace=False",
    ]


# -- write_blobs in a fill and a publish ---------------------------------------------------------


@pytest.mark.parametrize("impl", ["python", "native"])
def test_a_fill_batch_gives_blob_stats_and_names_what_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, impl: str
) -> None:
    """fill._write_wholes: a BlobStat per blob written (its stat, its file's mtime), a
    TierError naming the tier, the path and the cause for one that could not be, in order;
    nothing left in tmp/."""
    from hostd.core.ids import chunk_id
    from hostd.core.manifest import Chunk, FileEntry
    from hostd.errors import TierError
    from hostd.fill import _Whole, _write_wholes
    from hostd.tier import BlobStat, Tier

    if impl == "native":
        _native_or_skip()
    monkeypatch.setattr(fastcopy, "IMPLEMENTATION", impl)
    tier = Tier("mem", tmp_path / "mem", 1 << 30)
    tier.prepare()
    batch = []
    for i, mtime in enumerate((-1, None, 1_700_000_000_123_456_789)):
        data = f"blob {i}".encode() * 100
        e = FileEntry(f"f{i}", 0o644, len(data), (Chunk(chunk_id(data), len(data)),), mtime)
        batch.append(_Whole(e, tier, memoryview(data), "origin", tier.failed_syncs))
    bad = batch[1].entry.digest.hex()
    (tier.blobs_dir / bad[:2]).write_bytes(b"a file where its prefix directory goes")
    # (the tier clears that out of the way and tries again, tests/test_tier.py: not here,
    # where the kernel's own failure is what is reported)
    monkeypatch.setattr(Tier, "_make_way", lambda _self, _dest: None)

    got = _write_wholes(batch)

    assert isinstance(got[1], TierError)
    assert "tier 'mem'" in got[1].message
    assert str(tier.blobs_dir / bad[:2]) in got[1].message
    assert "writing a blob failed" in got[1].message
    assert os.strerror(errno.ENOTDIR) in got[1].message
    for w, r in zip(batch, got, strict=True):
        if w is batch[1]:
            continue
        assert isinstance(r, BlobStat)
        assert r == tier.stat_blob(w.entry.digest)
        if w.entry.mtime is not None:
            assert r.mtime_ns == w.entry.mtime
        assert tier.blob_path(w.entry.digest).read_bytes() == bytes(w.data)
        assert stat.S_IMODE(os.stat(tier.blob_path(w.entry.digest)).st_mode) == 0o444
    assert list(tier.tmp_dir.iterdir()) == []


@pytest.mark.parametrize("impl", ["python", "native"])
def test_a_publish_batch_shares_a_blob_between_equal_files_and_raises_a_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, impl: str
) -> None:
    """read_small then store_small: files of a batch with equal bytes get one blob with the
    last one's mtime (as one write each would leave it); a blob that cannot be written is
    TierError."""
    from hostd.errors import TierError
    from hostd.publish import SourceFile, read_small, store_small
    from hostd.tier import Tier

    if impl == "native":
        _native_or_skip()
    monkeypatch.setattr(fastcopy, "IMPLEMENTATION", impl)
    tier = Tier("disk", tmp_path / "disk", 1 << 30)
    tier.prepare()
    src = tmp_path / "src"
    src.mkdir()
    contents = {"a": b"same bytes", "b": b"other", "c": b"same bytes"}
    for i, (name, data) in enumerate(contents.items()):
        (src / name).write_bytes(data)
        os.utime(src / name, ns=(1000 + i, 1000 + i))

    def batch() -> tuple[list[int], list[SourceFile]]:
        fds = [os.open(src / n, os.O_RDONLY | os.O_CLOEXEC) for n in contents]
        files = [SourceFile(n, 0o644, len(d), (0, 0)) for n, d in contents.items()]
        return fds, files

    fds, files = batch()
    got = store_small(read_small(fds, files, compress="never", min_saving=0.1), [0o644] * 3, tier)
    a, b, c = got
    assert a.blob is not None
    assert b.blob is not None
    assert a.blob == c.blob  # one blob for the two files
    assert a.blob.mtime_ns == 1002  # the last one's
    assert a.blob == tier.stat_blob(a.blob.digest)
    assert (a.mtime, c.mtime) == (1000, 1002)
    assert len(list(tier.blobs_dir.rglob("*.*"))) == 0
    assert sorted(p.name for p in tier.blobs_dir.rglob("*") if p.is_file()) == sorted(
        {a.blob.digest.hex(), b.blob.digest.hex()}
    )
    assert list(tier.tmp_dir.iterdir()) == []

    prefix = tier.blobs_dir / b.blob.digest.hex()[:2]
    shutil.rmtree(prefix)
    prefix.write_bytes(b"in the way")
    monkeypatch.setattr(Tier, "_make_way", lambda _self, _dest: None)  # (as above)
    fds, files = batch()
    with pytest.raises(TierError, match=r"tier 'disk' .*storing a published blob failed"):
        store_small(read_small(fds, files, compress="never", min_saving=0.1), [0o644] * 3, tier)
    assert list(tier.tmp_dir.iterdir()) == []


# -- lstat_paths, link_files ------------------------------------------------------------------


@pytest.mark.parametrize("lstat_paths", [fastcopy.twin_lstat_paths, fastcopy.native_lstat_paths])
def test_lstat_paths_gives_what_os_lstat_gives_and_each_errno(
    tmp_path: Path, lstat_paths: Callable[[Sequence[str]], list[fastcopy.Stat | int]]
) -> None:
    if lstat_paths is fastcopy.native_lstat_paths:
        _native_or_skip()
    (tmp_path / "a").write_bytes(b"x" * 1234)
    os.utime(tmp_path / "a", ns=(5, -1_500_000_001))  # before 1970, with nanoseconds
    (tmp_path / "d").mkdir()
    (tmp_path / "link").symlink_to("a")
    paths = [str(tmp_path / n) for n in ("a", "missing", "link", "a/under-a-file", "d")]
    got = lstat_paths(paths)
    st, d = os.stat(tmp_path / "a"), os.stat(tmp_path / "d")
    ln = os.lstat(tmp_path / "link")
    assert got == [
        (1234, -1_500_000_001, st.st_ctime_ns, st.st_mode),
        errno.ENOENT,
        (ln.st_size, ln.st_mtime_ns, ln.st_ctime_ns, ln.st_mode),  # the link: not followed
        errno.ENOTDIR,
        (d.st_size, d.st_mtime_ns, d.st_ctime_ns, d.st_mode),
    ]
    assert stat.S_ISLNK(got[2][3])  # type: ignore[index]
    assert lstat_paths([]) == []


def test_lstat_paths_on_two_threads_gives_each_outcome_in_order(tmp_path: Path) -> None:
    _native_or_skip()
    paths = []
    for i in range(fastcopy.STAT_SPLIT + 37):  # enough for two threads, not a multiple
        p = tmp_path / f"f{i}"
        if i % 7:
            p.write_bytes(b"x" * i)
            os.utime(p, ns=(i, -i * 1_000_003))
        paths.append(str(p))  # every seventh is missing
    want = fastcopy.twin_lstat_paths(paths)
    assert fastcopy.native_lstat_paths(paths, 2) == want
    assert fastcopy.native_lstat_paths(paths) == want  # two threads, by size
    assert want[0] == errno.ENOENT
    st = os.stat(paths[1])
    assert want[1] == (1, -1_000_003, st.st_ctime_ns, st.st_mode)


@pytest.mark.parametrize("link_files", [fastcopy.twin_link_files, fastcopy.native_link_files])
def test_link_files_links_each_job_and_gives_each_errno(
    tmp_path: Path, link_files: Callable[[Sequence[fastcopy.LinkJob]], list[int]]
) -> None:
    if link_files is fastcopy.native_link_files:
        _native_or_skip()
    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "ab").mkdir(parents=True)
    dst.mkdir()
    (src / "ab" / "blob").write_bytes(b"bytes")
    (src / "ab" / "sym").symlink_to("blob")
    (dst / "taken").write_bytes(b"")
    s, d = os.open(src, os.O_PATH | os.O_DIRECTORY), os.open(dst, os.O_PATH | os.O_DIRECTORY)
    try:
        got = link_files(
            [
                (s, "ab/blob", d, "one"),
                (s, "ab/gone", d, "two"),
                (s, "ab/blob", d, "taken"),
                (s, "ab/sym", d, "three"),  # the symlink itself, not what it points at
                (s, "ab/blob", d, "four"),
            ]
        )
    finally:
        os.close(s)
        os.close(d)
    assert got == [0, errno.ENOENT, errno.EEXIST, 0, 0]
    blob = os.stat(src / "ab" / "blob")
    assert blob.st_nlink == 3
    assert os.stat(dst / "one").st_ino == os.stat(dst / "four").st_ino == blob.st_ino
    assert (dst / "three").is_symlink()
    assert not (dst / "two").exists()
    assert (dst / "taken").read_bytes() == b""


@pytest.mark.parametrize("open_paths", [fastcopy.twin_open_paths, fastcopy.native_open_paths])
def test_open_paths_opens_each_for_reading_and_the_first_failure_leaks_nothing(
    tmp_path: Path, open_paths: Callable[[Sequence[str]], list[int]]
) -> None:
    if open_paths is fastcopy.native_open_paths:
        _native_or_skip()
    for name in ("a", "b"):
        (tmp_path / name).write_bytes(name.encode() * 3)
    (tmp_path / "link").symlink_to("b")
    fds = open_paths([str(tmp_path / n) for n in ("a", "link", "a")])
    try:
        assert [os.read(fd, 10) for fd in fds] == [b"aaa", b"bbb", b"aaa"]  # followed, as os.open
        assert len(set(fds)) == 3
        for fd in fds:
            assert os.get_inheritable(fd) is False  # O_CLOEXEC
            with pytest.raises(OSError, match="Bad file descriptor"):
                os.write(fd, b"x")  # O_RDONLY
    finally:
        for fd in fds:
            os.close(fd)
    assert open_paths([]) == []
    before = set(os.listdir("/proc/self/fd"))
    for bad, kind in (("missing", FileNotFoundError), ("a/under-a-file", NotADirectoryError)):
        paths = [str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / bad), str(tmp_path / "a")]
        with pytest.raises(kind) as got:
            open_paths(paths)
        assert got.value.errno is not None
        assert (got.value.filename, got.value.strerror) == (paths[2], os.strerror(got.value.errno))
    assert set(os.listdir("/proc/self/fd")) == before, "what was opened before it is closed"


def test_threads_go_by_bytes_or_to_small_files_spread_over_directories() -> None:
    def jobs(n: int, size: int, dirs: int) -> list[fastcopy.Job]:
        return [(3 + i % dirs, f"f{i}", 0o644, size, -1, None) for i in range(n)]

    spread = jobs(512, 16 * KiB, 100)  # largest first: one directory, then another
    assert fastcopy.threads_for(spread) == fastcopy.SMALL_THREADS
    assert fastcopy.threads_for(sorted(spread)) == 1  # a directory's files together
    assert fastcopy.threads_for(jobs(512, 16 * KiB, 1)) == 1
    assert fastcopy.threads_for(jobs(fastcopy.SMALL_FILES - 1, KiB, 100)) == 1
    assert fastcopy.threads_for(jobs(24, MiB, 1)) == 24 * MiB // fastcopy.SPLIT_BYTES
    assert fastcopy.threads_for(jobs(512, 16 * MiB, 1)) == fastcopy.NATIVE_THREADS
    assert fastcopy.threads_for([]) == 1


def test_small_files_in_tree_order_go_on_two_threads_in_two_directories() -> None:
    """A placer's batches come in tree order, a directory's files together: taken from two
    shares in turn, two threads work in two directories at once. A batch with too few
    directories for that stays on one thread, in its order."""
    tree = [(3 + i // 100, f"f{i}", 0o644, 8 * KiB, -1, None) for i in range(512)]
    threads, order = fastcopy.spread(tree)
    assert threads == fastcopy.SMALL_THREADS
    assert order is not None
    assert sorted(order) == list(range(512))
    assert order[:4] == [0, 256, 1, 257]  # (directory 3, directory 5, ...)
    one_dir = [(3, f"f{i}", 0o644, 8 * KiB, -1, None) for i in range(512)]
    assert fastcopy.spread(one_dir) == (1, None)
    largest_first = [(3 + i % 100, f"f{i}", 0o644, 8 * KiB, -1, None) for i in range(512)]
    assert fastcopy.spread(largest_first) == (fastcopy.SMALL_THREADS, None)  # as they are
    assert fastcopy.spread(tree[: fastcopy.SMALL_FILES - 1]) == (1, None)


def test_a_failure_in_a_spread_batch_names_its_own_path(tmp_path: Path) -> None:
    """The jobs go to the native loop in another order: a failure still names the path of
    the job that failed, not of the one at its place in the order given."""
    _native_or_skip()
    dirs = []
    for d in range(4):
        (tmp_path / f"d{d}").mkdir()
        dirs.append(os.open(tmp_path / f"d{d}", os.O_RDONLY | os.O_DIRECTORY))
    try:
        (tmp_path / "d3" / "f250").write_bytes(b"")  # taken: O_EXCL fails
        jobs = [(dirs[i // 80], f"f{i}", 0o644, 0, -1, None) for i in range(320)]
        paths = [f"d{i // 80}/f{i}" for i in range(320)]
        assert fastcopy.spread(jobs)[1] is not None  # (the batch is spread)
        with pytest.raises(FileExistsError) as got:
            fastcopy.native_create_files(jobs, paths)
        assert got.value.filename == "d3/f250"
    finally:
        for fd in dirs:
            os.close(fd)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_native_links_on_threads_give_each_job_its_own_errno(tmp_path: Path, threads: int) -> None:
    """Each thread links its share of the jobs; the answers stay in the jobs' order."""
    _native_or_skip()
    src = tmp_path / "src"
    src.mkdir()
    (src / "blob").write_bytes(b"x")
    dirs = [tmp_path / f"d{i}" for i in range(5)]
    for d in dirs:
        d.mkdir()
        (d / "taken-3").write_bytes(b"")
    s = os.open(src, os.O_PATH | os.O_DIRECTORY)
    fds = [os.open(d, os.O_PATH | os.O_DIRECTORY) for d in dirs]
    try:
        jobs = [
            (s, "blob" if k != 7 else "gone", fds[i], f"taken-{k}" if k == 3 else f"l{k}")
            for i in range(5)
            for k in range(10)
        ]
        got = fastcopy.native_link_files(jobs, threads)
    finally:
        os.close(s)
        for fd in fds:
            os.close(fd)
    want = [
        errno.EEXIST if k == 3 else errno.ENOENT if k == 7 else 0 for _ in dirs for k in range(10)
    ]
    assert got == want
    assert os.stat(src / "blob").st_nlink == 1 + 5 * 8
    assert fastcopy.twin_link_files([]) == fastcopy.native_link_files([], threads) == []


@pytest.mark.parametrize("take_leases", [fastcopy.twin_take_leases, fastcopy.native_take_leases])
def test_take_leases_holds_each_lease_or_says_where_it_failed(
    tmp_path: Path, take_leases: Callable[[Sequence[str], int], list[fastcopy.Taken]]
) -> None:
    """A lease taken (its descriptor and fstat), a file that is not there (ENOENT at the
    open), one held open for writing (EAGAIN at F_SETLEASE, its descriptor closed)."""
    if take_leases is fastcopy.native_take_leases:
        _native_or_skip()
    (tmp_path / "ok").write_bytes(b"x" * 7)
    (tmp_path / "busy").write_bytes(b"y")
    writing = os.open(tmp_path / "busy", os.O_WRONLY)
    try:
        got = take_leases([str(tmp_path / n) for n in ("ok", "gone", "busy")], signal.SIGRTMIN + 3)
        fd, st = got[0]
        try:
            assert isinstance(st, tuple)
            assert st == fastcopy.twin_fstat_fds([fd])[0]
            assert st[4] == 7
            assert fcntl.fcntl(fd, 1025) == fcntl.F_RDLCK  # F_GETLEASE
        finally:
            os.close(fd)
        assert got[1:] == [(errno.ENOENT, 0), (errno.EAGAIN, 2)]
        assert take_leases([], signal.SIGRTMIN + 3) == []
    finally:
        os.close(writing)


@pytest.mark.parametrize("lease_types", [fastcopy.twin_lease_types, fastcopy.native_lease_types])
def test_lease_types_answers_each_descriptors_lease_as_fcntl_does(
    tmp_path: Path, lease_types: Callable[[Sequence[int]], list[int]]
) -> None:
    """A read lease held, none, and a descriptor that is not one: F_RDLCK, F_UNLCK, and
    -EBADF, in order (the checks of a whole tree's leases in one call, Leases.holding)."""
    if lease_types is fastcopy.native_lease_types:
        _native_or_skip()
    (tmp_path / "leased").write_bytes(b"x")
    (tmp_path / "not").write_bytes(b"y")
    leased = os.open(tmp_path / "leased", os.O_RDONLY)
    other = os.open(tmp_path / "not", os.O_RDONLY)
    try:
        fcntl.fcntl(leased, 1024, fcntl.F_RDLCK)  # F_SETLEASE
        bad = os.dup(other)
        os.close(bad)
        assert lease_types([leased, other, bad]) == [fcntl.F_RDLCK, fcntl.F_UNLCK, -errno.EBADF]
        assert lease_types([]) == []
    finally:
        os.close(leased)
        os.close(other)


@pytest.mark.parametrize(
    ("fstat_fds", "close_fds"),
    [
        (fastcopy.twin_fstat_fds, fastcopy.twin_close_fds),
        (fastcopy.native_fstat_fds, fastcopy.native_close_fds),
    ],
)
def test_fstat_fds_and_close_fds_do_what_os_does_for_each(
    tmp_path: Path,
    fstat_fds: Callable[[Sequence[int]], list[fastcopy.FdStat]],
    close_fds: Callable[[Sequence[int]], None],
) -> None:
    if fstat_fds is fastcopy.native_fstat_fds:
        _native_or_skip()
    (tmp_path / "f").write_bytes(b"x" * 1234)
    os.utime(tmp_path / "f", ns=(5, -1_500_000_001))
    fds = [os.open(tmp_path / "f", os.O_RDONLY), os.open(tmp_path, os.O_PATH | os.O_DIRECTORY)]
    got = fstat_fds(fds)
    for fd, st in zip(fds, got, strict=True):
        want = os.fstat(fd)
        assert st == (
            want.st_mode,
            want.st_uid,
            want.st_dev,
            want.st_ino,
            want.st_size,
            want.st_mtime_ns,
            want.st_ctime_ns,
        )
    assert got[0][4:6] == (1234, -1_500_000_001)
    assert fstat_fds([]) == []
    close_fds([fds[1]])
    with pytest.raises(OSError, match="Bad file descriptor") as failed:
        fstat_fds(fds)
    assert failed.value.errno == errno.EBADF
    spare = os.dup(fds[0])
    with pytest.raises(OSError, match="Bad file descriptor") as failed:  # raised once all are
        close_fds([fds[1], fds[0], spare])
    assert failed.value.errno == errno.EBADF
    for fd in (fds[0], spare):
        with pytest.raises(OSError, match="Bad file descriptor"):
            os.fstat(fd)
    close_fds([])


def test_twin_take_leases_keeps_no_lease_where_it_raises(tmp_path: Path) -> None:
    """A path that is no path (the native loop raises before it opens any): the twin's
    leases taken on the paths before it are given up, not left on descriptors no one has."""
    (tmp_path / "a").write_bytes(b"x")
    before = sorted(os.listdir("/proc/self/fd"))
    for _ in range(3):
        with pytest.raises(TypeError):
            fastcopy.twin_take_leases([str(tmp_path / "a"), None], signal.SIGRTMIN + 3)  # type: ignore[list-item]
    assert sorted(os.listdir("/proc/self/fd")) == before


@pytest.mark.parametrize(
    "call",
    [
        "fastcopy.native_take_leases(paths, signal.SIGRTMIN + 3)",
        "fastcopy.native_lstat_paths(paths)",
        "fastcopy.native_open_paths(paths)",
    ],
)
def test_native_path_batches_survive_a_path_that_changes_the_list(
    tmp_path: Path, call: str
) -> None:
    """A path's __fspath__ that empties the list being converted: a copy of its own is
    converted (the list itself read past its end was a crash)."""
    _native_or_skip()
    (tmp_path / "a").write_bytes(b"x")
    code = (
        "import os, signal, sys\n"
        "from hostd import fastcopy\n"
        "paths = []\n"
        "class P:\n"
        "    def __fspath__(self):\n"
        "        paths.clear()\n"
        "        return sys.argv[1]\n"
        "paths.extend([P(), P(), P()])\n"
        f"got = {call}\n"
        "assert len(got) == 3, got\n"
        "print('ok')\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "a")], capture_output=True, text=True
    )
    assert r.returncode == 0, (r.returncode, r.stderr[-500:])
    assert r.stdout == "ok\n"


def test_a_publish_batch_whose_error_another_sync_was_told_is_tier_error(tmp_path: Path) -> None:
    """syncfs tells a write-back error once: another caller's sync of the tier that failed
    while a publish batch was written (a fill's batch, a re-hash's) may have been told the
    batch's own error, and the batch's sync then passes: its blobs must not be recorded."""
    from typing import Any

    from hostd.errors import TierError
    from hostd.publish import SourceFile, read_small, store_small
    from hostd.tier import Tier

    broken = [False]

    def syncfs(_path: Path) -> None:
        if broken[0]:
            raise OSError(errno.EIO, os.strerror(errno.EIO))

    class Shared(Tier):
        def write_new(self, *args: Any, **kwargs: Any) -> Any:
            out = super().write_new(*args, **kwargs)
            broken[0] = True  # another caller's sync of the tier meets the error first
            with pytest.raises(TierError, match="syncing its blobs to disk failed"):
                Tier.sync(self, [os.urandom(32)])
            broken[0] = False
            return out

    tier = Shared("disk", tmp_path / "disk", 1 << 30, syncfs=syncfs, fsync_each=0)
    tier.prepare()
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(b"some bytes")
    fds = [os.open(src / "a", os.O_RDONLY | os.O_CLOEXEC)]
    read = read_small(fds, [SourceFile("a", 0o644, 10, (0, 0))], compress="never", min_saving=0.1)
    with pytest.raises(TierError, match="another sync of it failed"):
        store_small(read, [0o644], tier)
