"""Publish in process: cancellation half way through, with uploads held at the origin."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from hostd.asuser import Spawner, Storage
from hostd.cache import Cache
from hostd.caller import daemon_caller
from hostd.core.retry import RetryPolicy
from hostd.index import Index
from hostd.origin import Origin
from hostd.publish import Publisher, PublishRequest
from hostd.restore import Progress
from hostd.tier import Tier

DEADLINE = 10.0


class HeldOrigin(Origin):
    """A real file:// origin whose chunk uploads wait for a gate (a stalled upload)."""

    def __init__(self, url: str) -> None:
        super().__init__(url, {}, retry=RetryPolicy(2, 0.01, 0.02))
        self.gate = asyncio.Event()
        self.waiting = asyncio.Event()

    async def put_chunk(self, cid: bytes, data: bytes) -> None:
        self.waiting.set()
        await self.gate.wait()
        await super().put_chunk(cid, data)


async def test_cancelled_publish_stops_its_ingest_and_leaves_nothing(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    cs = 64 * 1024
    (src / "big.bin").write_bytes(os.urandom(300 * cs))  # far more chunks than the queue holds
    tier = Tier("mem", tmp_path / "mem", 1 << 30)
    cache = Cache(
        [tier], Index(tmp_path / "idx" / "i.db"), manifests_dir=tmp_path / "m", clock=time.time
    )
    cache.load()
    origin = HeldOrigin(f"file://{tmp_path}/origin")
    spawner = Spawner()
    pub = Publisher(
        cache,
        origin,
        chunk_size=cs,
        compress="never",
        min_saving=0.1,
        upload_concurrency=2,
        compat_facts=["format"],
        storage=Storage(
            [
                ("tier 'mem'", tmp_path / "mem"),
                ("index directory", tmp_path / "idx"),
                ("origin", tmp_path / "origin"),
            ]
        ),
        spawner=spawner,
    )
    try:
        job = asyncio.create_task(
            pub.publish(PublishRequest(src, "x/y", caller=daemon_caller()), Progress())
        )
        async with asyncio.timeout(DEADLINE):
            await origin.waiting.wait()  # uploads are held; ingest fills the queue and waits
        job.cancel()
        async with asyncio.timeout(DEADLINE):
            with pytest.raises(asyncio.CancelledError):
                await job
        # the ingest thread gives up its wait and removes its scratch blob
        await asyncio.wait_for(asyncio.to_thread(pub.close), DEADLINE)
        assert list(tier.tmp_dir.iterdir()) == []
        assert [u.used for u in cache.usage()] == [0]
        assert not (tmp_path / "origin" / "manifests").exists()
    finally:
        origin.gate.set()
        cache.index.close()
        spawner.close()
