"""Shared pytest fixtures."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from s3server import MotoS3, S3Bucket


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--run-slow",
        action="store_true",
        help="also run the tests marked slow (they are skipped otherwise, unless -m names slow)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `slow` (e.g. the 10,000-case fuzz) are opt-in: `--run-slow` or `-m slow`."""
    if config.getoption("--run-slow") or "slow" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="slow: run with --run-slow or -m slow")
    for item in items:
        if item.get_closest_marker("slow") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def moto_s3() -> Iterator[MotoS3]:
    """One moto S3 server for the whole session (starting one costs about a second)."""
    with MotoS3() as server:
        yield server


@pytest.fixture
def s3_server(moto_s3: MotoS3) -> S3Bucket:
    """A fresh bucket on the session's moto S3 server: endpoint, bucket, options, env."""
    return moto_s3.new_bucket()


@pytest.fixture(scope="session")
def fake_nvml(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding the fake libnvidia-ml.so.1; `old/` under it holds one built without
    nvmlSystemGetCudaDriverVersion_v2, as drivers before CUDA 10.1 were."""
    gcc = shutil.which("gcc")
    if gcc is None:
        if os.environ.get("CI") == "true":
            pytest.fail("gcc is missing; CI must have it")
        pytest.skip("gcc is not installed")
    root = tmp_path_factory.mktemp("fakenvml")
    (root / "old").mkdir()
    source = str(Path(__file__).with_name("fakenvml.c"))
    for out, flags in ((root, []), (root / "old", ["-DFAKE_NVML_NO_CUDA_V2"])):
        subprocess.run(
            [gcc, "-shared", "-fPIC", "-O1", "-Wall", "-Wextra", "-Werror", *flags,
             "-o", str(out / "libnvidia-ml.so.1"), source],
            check=True,
            timeout=60,
        )  # fmt: skip
    return root
