"""Shards fetched ahead of the reader, handed out in schedule order.

Two sources behind one interface (`next_shard`, `release`, `close`, `bytes_read`): local files
mapped by threads, S3 objects fetched by worker processes into a shared-memory arena. A
handed-out shard's bytes stay valid until the reader releases it.
"""

from __future__ import annotations

import contextlib
import mmap
import multiprocessing as mp
import queue
import sys
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from saesweep.data.fetch import S3Fetcher, map_file, verified, worker_main

MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22 if sys.platform == "linux" else None)
"""The reader process would otherwise take one page fault per 4 KiB the workers wrote, which
costs more than the copy itself."""


@dataclass(frozen=True)
class Fetched:
    """A shard handed to the reader: its whole file's bytes (None unless status is "ok")."""

    shard: int
    data: memoryview | mmap.mmap | None
    status: str
    slot: int = -1


class Pipeline:
    """Keeps up to n_slots shards fetched, in flight or held by the reader."""

    def __init__(self, keys: list[str], sizes: list[int], checksums: list[str], n_slots: int):
        self.keys, self.sizes, self.checksums, self.n_slots = keys, sizes, checksums, n_slots
        self.schedule: Iterator[int] = iter(())
        self.in_flight: deque = deque()
        self.held = 0
        self.bytes_read = 0

    def start(self, schedule: Iterator[int]) -> None:
        self.schedule = schedule
        self._fill()

    def _fill(self) -> None:
        while len(self.in_flight) + self.held < self.n_slots:
            shard = next(self.schedule, None)
            if shard is None:
                return
            self.in_flight.append((shard, self._submit(shard)))

    def next_shard(self) -> Fetched:
        """The next shard in schedule order; it counts as held until `release`."""
        shard, ticket = self.in_flight.popleft()
        fetched = self._result(shard, ticket)
        self.held += 1
        if fetched.status == "ok":
            self.bytes_read += self.sizes[shard]
        return fetched

    def release(self, shards: list[Fetched]) -> None:
        """Give shards back (their bytes may be reused) and fetch the next ones."""
        self.held -= len(shards)
        self._fill()

    def in_flight_count(self) -> int:
        return len(self.in_flight)

    def _submit(self, shard: int):
        raise NotImplementedError

    def _result(self, shard: int, ticket) -> Fetched:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class LocalPipeline(Pipeline):
    """Threads map and verify local shard files."""

    def __init__(self, root: str, keys, sizes, checksums, n_threads: int, n_slots: int):
        super().__init__(keys, sizes, checksums, n_slots)
        self.root = Path(root)
        self.pool = ThreadPoolExecutor(n_threads, thread_name_prefix="saesweep-map")

    def _submit(self, shard: int) -> Future:
        path, n_bytes = self.root / self.keys[shard], self.sizes[shard]
        return self.pool.submit(verified, lambda: map_file(path, n_bytes), self.checksums[shard])

    def _result(self, shard: int, ticket: Future) -> Fetched:
        data, status = ticket.result()
        return Fetched(shard, data if status == "ok" else None, status)

    def close(self) -> None:
        self.pool.shutdown(cancel_futures=True)


class S3Pipeline(Pipeline):
    """Worker processes write S3 shards into slots of one anonymous shared mapping, made before
    they fork so they write into it directly."""

    def __init__(self, source: dict, keys, sizes, checksums, n_workers: int, n_slots: int):
        super().__init__(keys, sizes, checksums, n_slots)
        self.slot_bytes = -(-max(sizes) // mmap.PAGESIZE) * mmap.PAGESIZE
        self.arena = mmap.mmap(-1, n_slots * self.slot_bytes, mmap.MAP_SHARED)
        fetcher = S3Fetcher(
            source["bucket"], source["prefix"], source["endpoint"], source["connections"]
        )
        ctx = mp.get_context("fork")
        self.tasks, self.results = ctx.Queue(), ctx.Queue()
        args = (fetcher, self.arena, self.slot_bytes, self.tasks, self.results)
        self.workers = [
            ctx.Process(target=worker_main, daemon=True, args=args) for _ in range(n_workers)
        ]
        for w in self.workers:
            w.start()
        self.free = list(range(n_slots))
        self.done: dict[int, tuple[int, str]] = {}
        self.next_ticket = 0

    def _submit(self, shard: int) -> int:
        ticket, slot = self.next_ticket, self.free.pop()
        self.next_ticket += 1
        self.tasks.put((ticket, slot, self.keys[shard], self.sizes[shard], self.checksums[shard]))
        return ticket

    def _result(self, shard: int, ticket: int) -> Fetched:
        while ticket not in self.done:
            try:
                t, slot, status = self.results.get(timeout=1.0)
            except queue.Empty:
                if not all(w.is_alive() for w in self.workers):
                    raise RuntimeError("a fetch worker process died") from None
                continue
            self.done[t] = (slot, status)
        slot, status = self.done.pop(ticket)
        start = slot * self.slot_bytes
        self._map_in(start)
        data = memoryview(self.arena)[start : start + self.sizes[shard]]
        return Fetched(shard, data if status == "ok" else None, status, slot)

    def _map_in(self, start: int) -> None:
        """Map a slot's pages into this process in one call where the kernel can (Linux >=
        5.14); elsewhere they fault in on first read."""
        if MADV_POPULATE_READ is None:
            return
        with contextlib.suppress(OSError):
            self.arena.madvise(MADV_POPULATE_READ, start, self.slot_bytes)

    def release(self, shards: list[Fetched]) -> None:
        self.free += [f.slot for f in shards]
        super().release(shards)

    def close(self) -> None:
        for _ in self.workers:
            self.tasks.put(None)
        for w in self.workers:
            w.join(timeout=5)
            if w.is_alive():
                w.kill()
