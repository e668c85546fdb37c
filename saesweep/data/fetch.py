"""Fetching whole shards, verified against their checksums.

Local files are mapped read-only straight from the page cache (MAP_POPULATE: mapped and read
in before they are handed out, so the trainer never waits on the disk); threads do the mapping
and hashing, both of which release the GIL.

S3 shards are fetched by worker processes into slots of one shared-memory arena: a worker takes
(ticket, slot, key, n_bytes, checksum) tasks and answers (ticket, slot, status). Only these
small tuples cross process boundaries; shard bytes never do.

status is "ok", "corrupt" (checksum still wrong after one refetch) or an error sentence.
"""

from __future__ import annotations

import asyncio
import mmap
import signal
from collections.abc import Callable
from pathlib import Path

import xxhash

CHUNK_BYTES = 8 << 20
"""Size of one S3 range GET."""
MAP_POPULATE = getattr(mmap, "MAP_POPULATE", 0)
"""Linux: read a mapping in when it is made (elsewhere pages are read on first use)."""


def xxh3_128(buf) -> str:
    return "xxh3_128:" + xxhash.xxh3_128_hexdigest(buf)


def verified(fetch: Callable[[], object], expected: str) -> tuple[object | None, str]:
    """(buffer, status) of `fetch()`; a checksum mismatch is fetched once more before calling
    it corrupt."""
    buf = None
    for _ in range(2):
        try:
            buf = fetch()
        except Exception as err:  # reported to the reader, which names the shard
            return None, str(err) or type(err).__name__
        if xxh3_128(buf) == expected:
            return buf, "ok"
    return buf, "corrupt"


def map_file(path: Path, n_bytes: int) -> mmap.mmap:
    """A read-only, populated mapping of a local shard of `n_bytes` bytes."""
    with open(path, "rb") as f:
        m = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_SHARED | MAP_POPULATE, prot=mmap.PROT_READ)
    if len(m) != n_bytes:
        size = len(m)
        m.close()
        raise OSError(f"{path} holds {size} bytes, its manifest says {n_bytes}")
    return m


class S3Fetcher:
    """Concurrent signed range GETs of a whole object, written into an arena slot.

    Made in the reader process (imports and credentials once), used in the forked workers:
    each makes its own event loop on first use.
    """

    def __init__(self, bucket: str, prefix: str, endpoint: str | None, connections: int):
        from saesweep.store.s3_async import AsyncRangeReader

        self.loop: asyncio.AbstractEventLoop | None = None
        self.reader = AsyncRangeReader(
            bucket, endpoint=endpoint, prefix=prefix, max_connections=connections
        )

    def fetch(self, key: str, slot: memoryview) -> memoryview:
        self.loop = self.loop or asyncio.new_event_loop()
        self.loop.run_until_complete(self._fetch(key, slot))
        return slot

    async def _fetch(self, key: str, slot: memoryview) -> None:
        n_bytes = len(slot)
        await asyncio.gather(
            *(
                self.reader.get_range_into(
                    key, s, min(s + CHUNK_BYTES, n_bytes), slot[s : s + CHUNK_BYTES]
                )
                for s in range(0, n_bytes, CHUNK_BYTES)
            )
        )

    def close(self) -> None:
        if self.loop is not None:
            self.loop.run_until_complete(self.reader.close())
            self.loop.close()


def ignore_job_signals() -> None:
    """Leave preemption signals to the trainer: Slurm sends SIGUSR2 to every process of the job,
    and a worker must not run the checkpoint-and-requeue handler it inherited through fork."""
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def worker_main(fetcher: S3Fetcher, arena: mmap.mmap, slot_bytes: int, tasks, results) -> None:
    """Serve fetch tasks until a None task; `fetcher` and `arena` (the reader's mapping) are
    inherited through fork. A shard's bytes go to the start of its slot."""
    ignore_job_signals()
    buf = memoryview(arena)
    try:
        while (task := tasks.get()) is not None:
            ticket, slot, key, n_bytes, expected = task
            view = buf[slot * slot_bytes : slot * slot_bytes + n_bytes]
            _, status = verified(lambda v=view, k=key: fetcher.fetch(k, v), expected)
            del view
            results.put((ticket, slot, status))
    finally:
        fetcher.close()
