"""`hostd.loader.load_safetensors`: a snapshot of safetensors shards loaded as it arrives,
against a real daemon (tests/harness.py) fetching from an HTTP origin that holds chosen
chunks until the test lets them go. Arrays are compared with safetensors' own loader."""

from __future__ import annotations

import importlib.util
import os
import queue
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from harness import HeldOrigin, Hostd, rmtree, short_tmp

from hostd import loader
from hostd.client import Client
from hostd.core.ids import chunk_id
from hostd.errors import NotFound, UsageError

np = pytest.importorskip("numpy")
st_numpy = pytest.importorskip("safetensors.numpy")
ml_dtypes = pytest.importorskip("ml_dtypes")

DEADLINE = 60.0
CHUNK = 64 * 1024


@pytest.fixture
def work() -> Iterator[Path]:
    root = short_tmp("ls")
    try:
        yield root
    finally:
        rmtree(root)


def shard(path: Path, seed: int, names: list[str]) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    tensors = {
        n: rng.standard_normal((64, 300 + i)).astype(np.float16) for i, n in enumerate(names)
    }
    tensors[names[0] + ".bf16"] = rng.standard_normal(1000).astype(ml_dtypes.bfloat16)
    path.parent.mkdir(parents=True, exist_ok=True)
    st_numpy.save_file(tensors, str(path), metadata={"format": "np"})
    return tensors


@pytest.fixture
def model(work: Path) -> dict[str, Any]:
    src = work / "src"
    want: dict[str, Any] = {}
    for i in range(3):
        want |= shard(src / f"model-{i + 1:05d}-of-00003.safetensors", i, [f"l{i}.a", f"l{i}.b"])
    (src / "config.json").write_text('{"layers": 3}')
    # pack_size 0: each chunk an object of its own, whose GETs HeldOrigin holds one by one
    with Hostd(
        work / "pub", origin=f"file://{work}/origin", chunk_size="64KiB", pack_size=0
    ) as pub:
        pub.publish(src, "m/tiny")
    return want


def same(got: dict[str, Any], want: dict[str, Any]) -> None:
    assert set(got) == set(want)
    layers = [n.split(".")[0] for n in got]
    assert layers == sorted(layers)  # shard by shard, in path order
    for name, arr in want.items():
        assert got[name].dtype == arr.dtype, name
        assert got[name].shape == arr.shape, name
        assert got[name].tobytes() == arr.tobytes(), name


def test_a_snapshot_loads_into_a_state_dict(work: Path, model: dict[str, Any]) -> None:
    with Hostd(work / "d", origin=f"file://{work}/origin") as h:
        seen: list[str] = []
        got = loader.load_safetensors(
            "m/tiny", socket=h.socket, target=work / "out", on_file=lambda e: seen.append(e["path"])
        )
        same(got, model)
        assert sorted(seen) == sorted(os.listdir(work / "out"))
        # without a target, the files go to a temporary directory that is gone afterwards
        before = set(os.listdir("/dev/shm"))
        same(loader.load_safetensors("m/tiny", socket=h.socket), model)
        assert {n for n in os.listdir("/dev/shm") if n.startswith("hostd-load-")} <= before


def cuda_available() -> bool:
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return bool(torch.cuda.is_available())


@pytest.mark.skipif(not cuda_available(), reason="needs torch with a CUDA device")
def test_a_snapshot_loads_onto_a_cuda_device(work: Path, model: dict[str, Any]) -> None:
    import torch

    with Hostd(work / "d", origin=f"file://{work}/origin") as h:
        got = loader.load_safetensors("m/tiny", socket=h.socket, framework="torch", device="cuda")
    assert set(got) == set(model)
    for name, arr in model.items():
        t = got[name]
        assert t.device.type == "cuda", name
        assert tuple(t.shape) == arr.shape, name
        raw = t.reshape(-1).view(torch.uint8).cpu().numpy().tobytes()
        assert raw == arr.tobytes(), name


def test_each_shard_is_loaded_while_the_next_is_fetched(
    work: Path, model: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    last = (work / "src" / "model-00003-of-00003.safetensors").read_bytes()
    loads: queue.Queue[str] = queue.Queue()
    real, real_whole = loader.load_file, loader._Arriving.landed_whole

    def observed(path: Any, **kwargs: Any) -> dict[str, Any]:
        loads.put(Path(path).name)
        return real(path, **kwargs)

    def observed_whole(self: loader._Arriving, size: int) -> dict[str, Any]:
        out = real_whole(self, size)  # (a shard read as its chunks landed)
        loads.put(Path(self.where).name)
        return out

    monkeypatch.setattr(loader, "load_file", observed)
    monkeypatch.setattr(loader._Arriving, "landed_whole", observed_whole)
    with HeldOrigin(work / "origin") as origin, Hostd(work / "d", origin=origin.url) as h:
        held = origin.hold(chunk_id(last[:CHUNK]))
        out: dict[str, Any] = {}
        worker = threading.Thread(
            target=lambda: out.update(loader.load_safetensors("m/tiny", socket=h.socket)),
            daemon=True,
        )
        worker.start()
        first = {loads.get(timeout=DEADLINE), loads.get(timeout=DEADLINE)}
        # two shards loaded while the third's bytes are still held at the origin
        assert first == {"model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors"}
        assert worker.is_alive()
        held.set()
        worker.join(DEADLINE)
        assert loads.get_nowait() == "model-00003-of-00003.safetensors"
    same(out, model)


def same_torch(got: dict[str, Any], want: dict[str, Any]) -> None:
    """Tensors on the CPU with the arrays' dtypes, shapes and bytes."""
    import torch

    assert set(got) == set(want)
    for name, arr in want.items():
        t = got[name]
        assert isinstance(t, torch.Tensor), name
        assert t.device.type == "cpu", name
        assert tuple(t.shape) == arr.shape, name
        assert t.reshape(-1).view(torch.uint8).numpy().tobytes() == arr.tobytes(), name
    assert got["l0.a.bf16"].dtype == torch.bfloat16


HAS_TORCH = importlib.util.find_spec("torch") is not None


@pytest.mark.parametrize(
    "framework",
    [
        "numpy",
        pytest.param(
            "torch",
            marks=pytest.mark.skipif(
                not HAS_TORCH, reason="torch is not installed (pip install 'hostd[torch]')"
            ),
        ),
    ],
)
def test_a_shard_is_read_as_its_chunks_land(
    work: Path, model: dict[str, Any], monkeypatch: pytest.MonkeyPatch, framework: str
) -> None:
    """With a shard's last chunk held at the origin, the tensors under its first chunk are
    read already, from the file hostd writes each verified chunk into before it lands: into
    numpy arrays, or torch tensors in host memory."""
    name = "model-00003-of-00003.safetensors"
    last = (work / "src" / name).read_bytes()
    monkeypatch.setattr(loader, "PIECE", 8 * 1024)  # runs of 8 KiB: several under a chunk
    reads: queue.Queue[tuple[str, int]] = queue.Queue()
    real = loader._read_run

    def observed(fd: int, offset: int, bufs: list[memoryview], where: str) -> None:
        reads.put((os.readlink(f"/proc/self/fd/{fd}"), offset))
        real(fd, offset, bufs, where)

    monkeypatch.setattr(loader, "_read_run", observed)
    target = work / "t"
    with HeldOrigin(work / "origin") as origin, Hostd(work / "d", origin=origin.url) as h:
        held = origin.hold(chunk_id(last[CHUNK : 2 * CHUNK]))
        out: dict[str, Any] = {}
        worker = threading.Thread(
            target=lambda: out.update(
                loader.load_safetensors(
                    "m/tiny", socket=h.socket, target=target, framework=framework
                )
            ),
            daemon=True,
        )
        worker.start()
        data_start = 8 + int.from_bytes(last[:8], "little")
        while True:
            path, offset = reads.get(timeout=DEADLINE)
            if Path(path).name.startswith(".hostd-part") and offset >= data_start:
                break
        assert offset + 8 * 1024 <= CHUNK  # under the first chunk
        assert not (target / name).exists()  # not landed: its second chunk is held
        assert worker.is_alive()
        held.set()
        worker.join(DEADLINE)
    (same_torch if framework == "torch" else same)(out, model)


def test_a_shard_that_landed_before_its_ranges_were_read_is_loaded_whole(
    work: Path, model: dict[str, Any]
) -> None:
    """The loader's thread is busy (here in on_file) while the next shard is fetched and
    lands: its scratch file is gone when its first range is read. It is read whole at its
    file event, as a shard told of no range is (this failed the whole load)."""
    target = work / "t"
    name = "model-00002-of-00003.safetensors"
    data = (work / "src" / name).read_bytes()

    with HeldOrigin(work / "origin") as origin, Hostd(work / "d", origin=origin.url) as h:
        held = [origin.hold(chunk_id(data[i : i + CHUNK])) for i in range(0, len(data), CHUNK)]

        def slow(event: Mapping[str, Any]) -> None:
            if event["path"] == "model-00001-of-00003.safetensors":
                for each in held:  # its chunks come, and it lands, while this thread waits
                    each.set()
                deadline = time.monotonic() + DEADLINE
                while not (target / name).exists():
                    assert time.monotonic() < deadline
                    time.sleep(0.005)

        out = loader.load_safetensors("m/tiny", socket=h.socket, target=target, on_file=slow)
    same(out, model)


def test_what_goes_wrong_is_said(work: Path, model: dict[str, Any]) -> None:
    with Hostd(work / "d", origin=f"file://{work}/origin") as h:
        with pytest.raises(NotFound, match="no such ref"):
            loader.load_safetensors("m/none", socket=h.socket)
        with pytest.raises(UsageError, match="numpy arrays live in host memory"):
            loader.load_safetensors("m/tiny", socket=h.socket, device="cuda")
        # a tensor name in two shards
        src = work / "dup"
        shard(src / "a.safetensors", 1, ["x"])
        shard(src / "b.safetensors", 2, ["x"])
        h.publish(src, "m/dup")
        with pytest.raises(loader.LoaderError, match=r"tensor 'x(\.bf16)?': also in a.safetensors"):
            loader.load_safetensors("m/dup", socket=h.socket)
        (work / "plain").mkdir()
        (work / "plain" / "readme").write_text("no weights")
        h.publish(work / "plain", "m/plain")
        with pytest.raises(loader.LoaderError, match=r"no \.safetensors file"):
            loader.load_safetensors("m/plain", socket=h.socket, target=work / "p")
        assert not (work / "p").exists()
        # a shard that is not safetensors: the restore is stopped and what landed removed
        (work / "bad").mkdir()
        (work / "bad" / "w.safetensors").write_bytes(b"\xff" * 64)
        h.publish(work / "bad", "m/bad")
        with pytest.raises(loader.LoaderError, match=r"w\.safetensors"):
            loader.load_safetensors("m/bad", socket=h.socket, target=work / "b")
        assert not (work / "b").exists()
        # a shard that is a link leading nowhere, or round in a loop: said as the shard's
        for name, links in (
            ("dangling", {"w.safetensors": "nowhere"}),
            ("loop", {"w.safetensors": "v.safetensors", "v.safetensors": "w.safetensors"}),
        ):
            (work / name).mkdir()
            for link, to in links.items():
                (work / name / link).symlink_to(to)
            h.publish(work / name, f"m/{name}")
            with pytest.raises(loader.LoaderError, match=r"[wv]\.safetensors: links to"):
                loader.load_safetensors(f"m/{name}", socket=h.socket, target=work / f"t-{name}")
            assert not (work / f"t-{name}").exists()


def test_a_bad_shard_read_after_the_restore_ended_is_taken_back_too(
    work: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The last shard is bad, and the restore has ended by the time it is read: nothing is
    left for the daemon to stop, so the loader removes what the restore placed itself (it
    left a whole tree in the target, which a retry then found not empty). A file of the
    caller's own in the target stays."""
    src = work / "late"
    shard(src / "a.safetensors", 1, ["x"])
    (src / "z.safetensors").write_bytes(b"\xff" * 64)
    (src / "sub").mkdir()
    (src / "sub" / "notes.txt").write_text("placed too")
    ended = threading.Event()
    real_restore, real_load = Client.restore, loader.load_file

    def restore(self: Client, *args: Any, **kwargs: Any) -> Any:
        try:
            return real_restore(self, *args, **kwargs)
        finally:
            ended.set()

    def load_file(path: Any, **kwargs: Any) -> dict[str, Any]:
        assert ended.wait(DEADLINE)  # read once the restore is over
        if Path(path).name == "z.safetensors" and keep.is_set():
            (work / "t" / "mine").write_text("the caller's, made meanwhile")
        return real_load(path, **kwargs)

    keep = threading.Event()

    with Hostd(work / "d", origin=f"file://{work}/origin") as h:
        h.publish(src, "m/late")
        monkeypatch.setattr(Client, "restore", restore)
        monkeypatch.setattr(loader, "load_file", load_file)
        with pytest.raises(loader.LoaderError, match=r"z\.safetensors"):
            loader.load_safetensors("m/late", socket=h.socket, target=work / "t")
        assert not (work / "t").exists()
        ended.clear()
        keep.set()
        with pytest.raises(loader.LoaderError, match=r"z\.safetensors"):
            loader.load_safetensors("m/late", socket=h.socket, target=work / "t")
        assert os.listdir(work / "t") == ["mine"]


def test_a_bad_first_shard_takes_back_a_tree_placed_whole_meanwhile(
    work: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first shard is bad, and by the time the loader has read it the daemon has placed
    every other file: whether or not its result was sent, what the restore placed goes (a
    cut call used to drop the events not read yet, and the daemon, done, took back
    nothing)."""
    src = work / "many"
    (src / "0bad.safetensors").parent.mkdir(parents=True)
    (src / "0bad.safetensors").write_bytes(b"\xff" * 64)
    (src / "z").mkdir()
    for i in range(300):
        (src / "z" / f"f{i:03d}.bin").write_bytes(os.urandom(100 + i))
    shard(src / "zz.safetensors", 1, ["x"])
    real_load = loader.load_file

    def load_file(path: Any, **kwargs: Any) -> dict[str, Any]:
        deadline = time.monotonic() + DEADLINE
        while not (work / "t" / "zz.safetensors").exists():  # everything is placed
            assert time.monotonic() < deadline
            time.sleep(0.005)
        return real_load(path, **kwargs)

    with Hostd(work / "d", origin=f"file://{work}/origin") as h:
        h.publish(src, "m/many")
        h.restore("m/many", work / "warm")  # warm: the rest lands within milliseconds
        monkeypatch.setattr(loader, "load_file", load_file)
        for _ in range(3):
            with pytest.raises(loader.LoaderError, match=r"0bad\.safetensors"):
                loader.load_safetensors("m/many", socket=h.socket, target=work / "t")
            assert not (work / "t").exists()


def test_a_hub_cache_layout_loads_through_its_links(work: Path) -> None:
    """A Hugging Face cache keeps the bytes in blobs/<hash> and names them with symlinks in
    snapshots/<rev>/: the shards are loaded through the links, each once."""
    src = work / "hub"
    want = shard(src / "blobs" / "3f2a9c", 7, ["h.a"])
    snap = src / "snapshots" / "main"
    snap.mkdir(parents=True)
    (snap / "model.safetensors").symlink_to("../../blobs/3f2a9c")
    (snap / "again.safetensors").symlink_to("model.safetensors")
    (snap / "config.json").write_text("{}")
    with Hostd(work / "d", origin=f"file://{work}/origin") as h:
        h.publish(src, "m/hub")
        events: list[Mapping[str, Any]] = []
        got = loader.load_safetensors("m/hub", socket=h.socket, on_file=events.append)
        same(got, want)
        links = {e["path"]: e["symlink"] for e in events if "symlink" in e}
        assert links == {
            "snapshots/main/model.safetensors": "../../blobs/3f2a9c",
            "snapshots/main/again.safetensors": "model.safetensors",
        }
