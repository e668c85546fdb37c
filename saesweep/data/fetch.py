"""Fetch worker processes: whole shards read straight into shared-memory slots, checksummed.

A worker takes (ticket, slot, key, n_bytes, checksum) tasks and answers (ticket, slot, status)
with status "ok", "corrupt" (checksum still wrong after one refetch) or an error sentence.
Only these small tuples cross process boundaries; shard bytes never do.
"""

from __future__ import annotations

import asyncio
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path

import xxhash

CHUNK_BYTES = 8 << 20


def xxh3_128(buf: memoryview) -> str:
    return "xxh3_128:" + xxhash.xxh3_128_hexdigest(buf)


class LocalFetcher:
    """Large sequential reads of local files."""

    def __init__(self, root: str):
        self.root = Path(root)

    def fetch(self, key: str, buf: memoryview) -> None:
        with open(self.root / key, "rb", buffering=0) as f:
            filled = 0
            while filled < len(buf):
                n = f.readinto(buf[filled : filled + (64 << 20)])
                if not n:
                    raise OSError(f"{self.root / key} is shorter than its manifest says")
                filled += n

    def close(self) -> None:
        pass


class S3Fetcher:
    """Concurrent signed range GETs of one object's chunks, written into the slot."""

    def __init__(self, bucket: str, prefix: str, endpoint: str | None, connections: int):
        from saesweep.store.s3_async import AsyncRangeReader

        self.loop = asyncio.new_event_loop()
        self.reader = AsyncRangeReader(
            bucket, endpoint=endpoint, prefix=prefix, max_connections=connections
        )

    def fetch(self, key: str, buf: memoryview) -> None:
        async def fetch_all():
            starts = range(0, len(buf), CHUNK_BYTES)
            await asyncio.gather(
                *(
                    self.reader.get_range_into(
                        key, s, min(s + CHUNK_BYTES, len(buf)), buf[s : s + CHUNK_BYTES]
                    )
                    for s in starts
                )
            )

        self.loop.run_until_complete(fetch_all())

    def close(self) -> None:
        self.loop.run_until_complete(self.reader.close())
        self.loop.close()


def make_fetcher(source: dict):
    if source["kind"] == "file":
        return LocalFetcher(source["root"])
    return S3Fetcher(source["bucket"], source["prefix"], source["endpoint"], source["connections"])


def worker_main(source: dict, slot_names: list[str], tasks, results) -> None:
    slots = [SharedMemory(name=name) for name in slot_names]
    fetcher = make_fetcher(source)
    try:
        while (task := tasks.get()) is not None:
            ticket, slot, key, n_bytes, expected = task
            buf = slots[slot].buf[:n_bytes]
            results.put((ticket, slot, fetch_verified(fetcher, key, buf, expected)))
            del buf
    finally:
        fetcher.close()
        for shm in slots:
            shm.close()


def fetch_verified(fetcher, key: str, buf: memoryview, expected: str) -> str:
    """Fetch and verify; a checksum mismatch is fetched once more before calling it corrupt."""
    for _ in range(2):
        try:
            fetcher.fetch(key, buf)
        except Exception as err:  # reported to the reader, which names the shard
            return f"cannot read {key}: {err}"
        if xxh3_128(buf) == expected:
            return "ok"
    return "corrupt"
