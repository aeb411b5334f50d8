"""Snapshot kinds and compat misses, as a user meets them: `hostd publish --kind`, a restore
that finds the snapshot its host fits, and one that explains why none fits. Real daemons
(tests/harness.py) sharing one file:// origin, driven through the real CLI in-process."""

from __future__ import annotations

import platform
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import Cli, HeldOrigin, Hostd, nvml_env, request, rmtree, short_tmp

JSON = dict[str, Any]


@pytest.fixture
def work() -> Iterator[Path]:
    root = short_tmp("ki")
    try:
        yield root
    finally:
        rmtree(root)


def gpuless(lib: Path) -> dict[str, str]:
    """The environment of a host without a GPU, whatever this machine has: its NVML (the
    fake) finds no driver, as nvmlInit on a machine without one (NVML_ERROR_DRIVER_NOT_LOADED).
    On a GPU host, the daemon would otherwise read the real GPU's facts."""
    return nvml_env(lib, init_error="9")


@pytest.fixture
def hostd(work: Path, fake_nvml: Path) -> Iterator[Hostd]:
    with Hostd(work / "d", env=gpuless(fake_nvml)) as h:
        yield h


@pytest.fixture
def cli(hostd: Hostd, capsys: pytest.CaptureFixture[str]) -> Cli:
    return Cli(hostd, capsys)


def source(work: Path, name: str = "src") -> Path:
    root = work / name
    (root / "sub").mkdir(parents=True, exist_ok=True)
    (root / "sub" / "kernel.cubin").write_bytes(b"k" * 3000)
    (root / "meta.json").write_text("{}")
    return root


def test_each_kind_keys_the_snapshot_on_its_facts(cli: Cli, work: Path) -> None:
    src = source(work)
    plain = cli.json("publish", str(src), "--ref", "w/plain")
    assert plain["kind"] == "files"  # the default
    assert plain["compat"] == {"format": "2"}
    assert plain["warnings"] == []

    code, _, err = cli("publish", str(src), "--ref", "c/triton", "--kind", "compile-cache")
    assert code == 0, err
    got = cli.json("publish", str(src), "--ref", "c/triton", "--kind", "compile-cache")
    assert got["kind"] == "compile-cache"
    assert set(got["compat"]) == {"arch", "cuda", "driver_major", "format", "gpu_model"}
    # This host has no NVIDIA driver: the GPU facts are none, and the publish says what
    # that means, on stderr and in the result.
    assert got["compat"]["gpu_model"] == "none"
    assert "warning: this host cannot tell its GPU facts" in err
    assert "makes no GPU claim" in got["warnings"][0]

    process = cli.json(
        "publish", str(src), "--ref", "p/img", "--kind", "process", "--compat", "image=sha256:1"
    )
    assert process["kind"] == "process"
    assert process["compat"]["kernel"] == platform.release()
    assert process["compat"]["image"] == "sha256:1"  # --compat adds a fact
    assert {"driver", "driver_major", "cuda", "gpu_model", "arch"} <= set(process["compat"])

    picked = cli.json("publish", str(src), "--ref", "own", "--facts", "arch")
    assert picked["compat"] == {"arch": process["compat"]["arch"], "format": "2"}
    assert picked["kind"] == "files"  # the kind whose facts it holds; arch its own

    for ref in ("w/plain", "c/triton", "p/img", "own"):
        rmtree(work / "out")
        cli.json(
            "restore", ref, str(work / "out"), *(["--compat", "image=sha256:1"] * (ref == "p/img"))
        )
        assert (work / "out" / "sub" / "kernel.cubin").read_bytes() == b"k" * 3000


def test_a_fact_hostd_knows_nothing_of_is_refused_unless_given(
    cli: Cli, hostd: Hostd, work: Path
) -> None:
    """`--facts gpu_modle` (a typo) would be published as `gpu_modle = none`, which every
    host fits: the compile cache of one GPU handed to all. Refused before the tree is read,
    naming the fact and how to give it; a fact of the client's own, given a value, is
    taken, as is one hostd detects (none here, with a warning)."""
    src = source(work)
    err = cli.fails(2, "publish", str(src), "--ref", "c/typo", "--facts", "gpu_modle,arch")
    assert "--facts gpu_modle arch: 'gpu_modle' is no fact hostd knows" in err, err
    assert "gpu_model" in err  # the known ones, listed
    assert "gpu_modle=VALUE in compat, --compat on the command line" in err, err
    assert "no such ref 'c/typo'" in cli.fails(3, "restore", "c/typo", str(work / "t"))
    own = cli.json(
        "publish", str(src), "--ref", "c/own", "--facts", "triton,arch", "--compat", "triton=3.1"
    )
    assert own["compat"]["triton"] == "3.1"
    gpu = cli.json("publish", str(src), "--ref", "c/gpu", "--facts", "gpu_model,arch")
    assert gpu["compat"]["gpu_model"] == "none"


def test_kind_and_facts_are_one_choice(cli: Cli, hostd: Hostd, work: Path) -> None:
    src = source(work)
    err = cli.fails(2, "publish", str(src), "--ref", "r", "--kind", "files", "--facts", "arch")
    assert "not allowed with argument" in err
    assert "invalid choice: 'weights'" in cli.fails(
        2, "publish", str(src), "--ref", "r", "--kind", "weights"
    )
    status, body = request(
        hostd.socket,
        "POST",
        "/v1/publish",
        {"path": str(src), "ref": "r", "kind": "files", "facts": ["arch"]},
    )
    assert status == 400
    assert "'kind' and 'facts'" in body["message"]
    status, body = request(
        hostd.socket, "POST", "/v1/publish", {"path": str(src), "ref": "r", "kind": "weights"}
    )
    assert status == 400
    assert body["message"] == (
        "field 'kind' must be one of files, compile-cache, process, got 'weights'"
    )


def test_a_miss_names_the_facts_that_differ_and_how_to_publish(cli: Cli, work: Path) -> None:
    src = source(work)
    cli.json(
        "publish", str(src), "--ref", "c/inductor", "--kind", "compile-cache",
        "--compat", "torch=2.5.1",
    )  # fmt: skip
    out = str(work / "out")
    err = cli.fails(3, "restore", "c/inductor", out, "--compat", "torch=2.6.0")
    assert err.count("\n") == 1  # one line, as every CLI error
    assert "ref 'c/inductor' has no snapshot for this host. Nearest published: " in err
    assert "(compile-cache) torch: published 2.5.1, this host 2.6.0" in err
    assert (
        "Boot from scratch, then publish one for this host: hostd publish DIR --ref c/inductor "
        "--kind compile-cache --compat torch=2.6.0"
    ) in err
    # A fact the client did not give is none on this host, and the hint asks for it.
    err = cli.fails(3, "restore", "c/inductor", out, "--compat", "gpu_model=H100")
    assert "torch: published 2.5.1, this host none" in err
    assert "gpu_model: published none, this host H100" not in err  # no GPU claim published
    assert "--kind compile-cache --compat torch=VALUE" in err
    assert not Path(out).exists()

    # The fact sets nearest first: the one differing in one fact before the one in two.
    cli.json(
        "publish", str(src), "--ref", "c/inductor", "--kind", "compile-cache",
        "--compat", "torch=2.4.0", "--compat", "triton=3.0",
    )  # fmt: skip
    err = cli.fails(3, "restore", "c/inductor", out, "--compat", "torch=2.6.0")
    first, second = err.index("torch: published 2.5.1"), err.index("torch: published 2.4.0")
    assert first < second
    assert "torch: published 2.4.0, this host 2.6.0, triton: published 3.0, this host none" in err
    # The API answers the same facts for scripts.
    status, body = request(
        cli.h.socket,
        "POST",
        "/v1/restore",
        {"ref": "c/inductor", "target": out, "compat": {"torch": "2.6.0"}},
    )
    assert status == 404
    assert body["error"] == "not_found"
    assert [n["differ"] for n in body["nearest"]] == [
        {"torch": {"published": "2.5.1", "host": "2.6.0"}},
        {
            "torch": {"published": "2.4.0", "host": "2.6.0"},
            "triton": {"published": "3.0", "host": "none"},
        },
    ]
    assert all(n["kind"] == "compile-cache" for n in body["nearest"])

    cli.json("restore", "c/inductor", out, "--compat", "torch=2.5.1")
    assert (Path(out) / "meta.json").read_text() == "{}"

    # A ref that does not exist at all says so, not "no snapshot for this host".
    err = cli.fails(3, "restore", "c/nothing", out + "2")
    assert "no such ref 'c/nothing'" in err


def test_a_snapshot_without_a_gpu_claim_fits_a_gpu_host(cli: Cli, work: Path) -> None:
    """Published the way every hostd did before hosts knew their GPU (the old default facts,
    GPU facts none): a host that says it has a GPU still restores it."""
    src = source(work)
    old = cli.json(
        "publish",
        str(src),
        "--ref",
        "old/cache",
        "--facts",
        "gpu_model,driver_major,cuda,arch,format",
    )
    assert old["compat"]["gpu_model"] == "none"
    gpu = ["--compat", "gpu_model=NVIDIA H100 80GB HBM3", "--compat", "driver_major=550"]
    got = cli.json("restore", "old/cache", str(work / "out"), *gpu)
    assert got["snapshot"] == old["snapshot"]
    # A snapshot that does claim a GPU does not fit another one.
    cli.json(
        "publish", str(src), "--ref", "new/cache", "--kind", "compile-cache",
        "--compat", "gpu_model=NVIDIA A100-SXM4-80GB",
    )  # fmt: skip
    err = cli.fails(3, "restore", "new/cache", str(work / "out2"), *gpu)
    assert "gpu_model: published NVIDIA A100-SXM4-80GB, this host NVIDIA H100 80GB HBM3" in err


# -- hosts that know their GPU (a fake libnvidia-ml.so.1 under the real pynvml) --------------

H100 = "NVIDIA H100 80GB HBM3,81559,0"


def gpu_host(root: Path, origin: str, lib: Path, driver: str) -> Hostd:
    return Hostd(root, origin=origin, env=nvml_env(lib, H100, driver=driver, cuda="12040"))


def test_gpu_hosts_key_compile_caches_on_their_own_facts(
    work: Path, fake_nvml: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    origin = f"file://{work}/origin"
    src = source(work)
    with gpu_host(work / "a", origin, fake_nvml, "550.54.15") as a:
        pub = Cli(a, capsys).json("publish", str(src), "--ref", "c/k", "--kind", "compile-cache")
        assert pub["compat"] == {
            "arch": pub["compat"]["arch"],
            "cuda": "12.4",
            "driver_major": "550",
            "format": "2",
            "gpu_model": "NVIDIA H100 80GB HBM3",
        }
        assert pub["warnings"] == []  # this host knows its GPU
        weights = Cli(a, capsys).json("publish", str(src), "--ref", "w/k")
        assert weights["compat"] == {"format": "2"}
    # The same GPU with another driver: weights restore, the compile cache explains its miss.
    with gpu_host(work / "b", origin, fake_nvml, "560.35.03") as b:
        cli = Cli(b, capsys)
        cli.json("restore", "w/k", str(work / "w"))
        err = cli.fails(3, "restore", "c/k", str(work / "c"))
        assert "driver_major: published 550, this host 560" in err
        assert "hostd publish DIR --ref c/k --kind compile-cache" in err
        # A process snapshot is keyed on the exact driver and kernel too.
        proc = cli.json("publish", str(src), "--ref", "p/k", "--kind", "process")
        assert proc["compat"]["driver"] == "560.35.03"
        assert proc["compat"]["kernel"] == platform.release()
    # The first host's driver again: found by its exact key.
    with gpu_host(work / "a", origin, fake_nvml, "550.54.15") as a:
        got = Cli(a, capsys).json("restore", "c/k", str(work / "c"))
        assert got["snapshot"] == pub["snapshot"]


def test_a_gpu_host_restores_what_was_published_before_it_knew_its_gpu(
    work: Path, fake_nvml: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every snapshot before GPU facts was keyed on gpu_model, driver_major and cuda = none
    (the old default facts). Over an origin that cannot list (plain HTTP), a GPU host finds
    it by that key."""
    src = source(work)
    with Hostd(work / "old", origin=f"file://{work}/origin", env=gpuless(fake_nvml)) as old:
        facts = "gpu_model,driver_major,cuda,arch,format"
        before = Cli(old, capsys).json("publish", str(src), "--ref", "c/old", "--facts", facts)
    assert before["compat"]["gpu_model"] == "none"
    with (
        HeldOrigin(work / "origin") as http,
        gpu_host(work / "g", http.url, fake_nvml, "550.54.15") as g,
    ):
        got = Cli(g, capsys).json("restore", "c/old", str(work / "out"))
        assert got["snapshot"] == before["snapshot"]
        # and a ref that is not there says the origin cannot list the others
        err = Cli(g, capsys).fails(3, "restore", "c/none", str(work / "out2"))
        assert "the origin cannot list" in err
