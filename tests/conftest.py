"""Shared pytest fixtures."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from s3server import MotoS3, S3Bucket


@pytest.fixture(scope="session")
def moto_s3() -> Iterator[MotoS3]:
    """One moto S3 server for the whole session (starting one costs about a second)."""
    with MotoS3() as server:
        yield server


@pytest.fixture
def s3_server(moto_s3: MotoS3) -> S3Bucket:
    """A fresh bucket on the session's moto S3 server: endpoint, bucket, options, env."""
    return moto_s3.new_bucket()
