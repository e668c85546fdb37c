"""Fetch worker processes: whole shards read straight into slots of one shared-memory arena.

A worker takes (ticket, slot, key, n_bytes, checksum) tasks and answers
(ticket, slot, offset, status): the shard's bytes lie at `offset` in the arena, placed so that
its "acts" rows start on a multiple of the row size (the whole arena is then one [rows, d]
array the reader gathers batches from without copying shards). status is "ok", "corrupt"
(checksum still wrong after one refetch) or an error sentence. Only these small tuples cross
process boundaries; shard bytes never do.
"""

from __future__ import annotations

import asyncio
import json
import mmap
import os
import signal
import struct
from pathlib import Path

import xxhash

CHUNK_BYTES = 8 << 20
HEAD_BYTES = 64 << 10
"""First read of a shard: enough for any safetensors header of a few tensors."""


def xxh3_128(buf: memoryview) -> str:
    return "xxh3_128:" + xxhash.xxh3_128_hexdigest(buf)


def header_length(head: bytes) -> int:
    """Bytes before the tensor data of a safetensors file starting with `head`."""
    return 8 + struct.unpack("<Q", head[:8])[0]


def placement(head: bytes, row_bytes: int) -> int:
    """Where in its slot a shard goes so that its acts rows are aligned (0 when the header is
    unreadable: the checksum then calls the shard corrupt)."""
    try:
        n = header_length(head)
        start = n + json.loads(head[8:n])["acts"]["data_offsets"][0]
    except (ValueError, KeyError, TypeError, IndexError, struct.error):
        return 0
    return -start % row_bytes


class LocalFetcher:
    """Large sequential reads of local files."""

    def __init__(self, root: str):
        self.root = Path(root)

    def fetch(self, key: str, slot: memoryview, n_bytes: int, row_bytes: int) -> int:
        with open(self.root / key, "rb", buffering=0) as f:
            head = os.pread(f.fileno(), HEAD_BYTES, 0)
            if len(head) >= 8 and header_length(head) > len(head):
                head = os.pread(f.fileno(), min(header_length(head), n_bytes), 0)
            pad = placement(head, row_bytes)
            buf, filled = slot[pad : pad + n_bytes], 0
            while filled < n_bytes:
                n = f.readinto(buf[filled : filled + (64 << 20)])
                if not n:
                    raise OSError(f"{self.root / key} is shorter than its manifest says")
                filled += n
        return pad

    def close(self) -> None:
        pass


class S3Fetcher:
    """The header first, then concurrent signed range GETs of the rest, written into the slot.

    Made in the reader process (imports and credentials once), used in the forked workers:
    each makes its own event loop on first use.
    """

    def __init__(self, bucket: str, prefix: str, endpoint: str | None, connections: int):
        from saesweep.store.s3_async import AsyncRangeReader

        self.loop: asyncio.AbstractEventLoop | None = None
        self.reader = AsyncRangeReader(
            bucket, endpoint=endpoint, prefix=prefix, max_connections=connections
        )

    def fetch(self, key: str, slot: memoryview, n_bytes: int, row_bytes: int) -> int:
        self.loop = self.loop or asyncio.new_event_loop()
        return self.loop.run_until_complete(self._fetch(key, slot, n_bytes, row_bytes))

    async def _fetch(self, key: str, slot: memoryview, n_bytes: int, row_bytes: int) -> int:
        head = await self.reader.get_range(key, 0, min(HEAD_BYTES, n_bytes))
        if len(head) >= 8 and len(head) < header_length(head) <= n_bytes:
            head = await self.reader.get_range(key, 0, header_length(head))
        pad = placement(head, row_bytes)
        slot[pad : pad + len(head)] = head
        buf = slot[pad : pad + n_bytes]
        starts = range(len(head), n_bytes, CHUNK_BYTES)
        await asyncio.gather(
            *(
                self.reader.get_range_into(
                    key, s, min(s + CHUNK_BYTES, n_bytes), buf[s : s + CHUNK_BYTES]
                )
                for s in starts
            )
        )
        return pad

    def close(self) -> None:
        if self.loop is not None:
            self.loop.run_until_complete(self.reader.close())
            self.loop.close()


def make_fetcher(source: dict):
    if source["kind"] == "file":
        return LocalFetcher(source["root"])
    return S3Fetcher(source["bucket"], source["prefix"], source["endpoint"], source["connections"])


def ignore_job_signals() -> None:
    """Leave preemption signals to the trainer: Slurm sends SIGUSR2 to every process of the job,
    and a worker must not run the checkpoint-and-requeue handler it inherited through fork."""
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def worker_main(fetcher, arena: mmap.mmap, slot_bytes: int, row_bytes: int, tasks, results) -> None:
    """Serve fetch tasks until a None task; `fetcher` and `arena` (the reader's mapping) are
    inherited through fork."""
    ignore_job_signals()
    buf = memoryview(arena)
    try:
        while (task := tasks.get()) is not None:
            ticket, slot, key, n_bytes, expected = task
            start = slot * slot_bytes
            view = buf[start : start + slot_bytes]
            pad, status = fetch_verified(fetcher, key, view, n_bytes, row_bytes, expected)
            del view
            results.put((ticket, slot, start + pad, status))
    finally:
        fetcher.close()


def fetch_verified(
    fetcher, key: str, slot: memoryview, n_bytes: int, row_bytes: int, expected: str
) -> tuple[int, str]:
    """(placement, status); a checksum mismatch is fetched once more before calling it corrupt."""
    pad = 0
    for _ in range(2):
        try:
            pad = fetcher.fetch(key, slot, n_bytes, row_bytes)
        except Exception as err:  # reported to the reader, which names the shard
            return pad, f"cannot read {key}: {err}"
        if xxh3_128(slot[pad : pad + n_bytes]) == expected:
            return pad, "ok"
    return pad, "corrupt"
