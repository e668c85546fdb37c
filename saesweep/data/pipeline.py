"""Shards fetched ahead of the reader, handed out in schedule order.

Two sources behind one interface (`next_shard`, `release`, `close`, `bytes_read`): local files
mapped by threads, and S3 objects received by event-loop threads straight into slots of one
arena. Either way a pool thread fetches a shard and verifies its checksum, both of which release
the GIL. A handed-out shard's bytes stay valid until the reader releases it.
"""

from __future__ import annotations

import contextlib
import mmap
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from saesweep.data.fetch import map_file, verified

CHUNK_BYTES = 8 << 20
"""Size of one S3 range GET."""


@dataclass(frozen=True)
class Fetched:
    """A shard handed to the reader: its whole file's bytes (None unless status is "ok")."""

    shard: int
    data: memoryview | mmap.mmap | None
    status: str
    slot: int = -1


class Pipeline:
    """Keeps up to n_slots shards fetched, in flight or held by the reader; `fetch(shard,
    slot)` runs on one of n_threads pool threads and returns the bytes of the shard whose
    manifest record is records[shard]."""

    def __init__(
        self,
        records: list[dict],
        n_threads: int,
        n_slots: int,
        fetch: Callable[[int, int], object],
    ):
        self.records, self.n_slots, self.fetch = records, n_slots, fetch
        self.sizes = [r["n_bytes"] for r in records]
        self.pool = ThreadPoolExecutor(n_threads, thread_name_prefix="saesweep-fetch")
        self.schedule: Iterator[int] = iter(())
        self.in_flight: deque[tuple[int, int, Future]] = deque()
        self.free = list(range(n_slots))
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
            slot = self.free.pop()
            fetch = lambda s=shard, t=slot: self.fetch(s, t)  # noqa: E731
            job = self.pool.submit(verified, fetch, self.records[shard])
            self.in_flight.append((shard, slot, job))

    def next_shard(self) -> Fetched:
        """The next shard in schedule order; it counts as held until `release`."""
        shard, slot, job = self.in_flight.popleft()
        data, status = job.result()
        self.held += 1
        if status == "ok":
            self.bytes_read += self.sizes[shard]
        return Fetched(shard, data if status == "ok" else None, status, slot)

    def release(self, shards: list[Fetched]) -> None:
        """Give shards back (their bytes may be reused) and fetch the next ones."""
        self.held -= len(shards)
        self.free += [f.slot for f in shards]
        self._fill()

    def in_flight_count(self) -> int:
        return len(self.in_flight)

    def close(self) -> None:
        self.pool.shutdown(cancel_futures=True)


def local_pipeline(paths: list[Path], records, n_threads: int, n_slots: int) -> Pipeline:
    """Threads map local shard files (FileStore.local_path: inside the store) read-only from
    the page cache."""
    return Pipeline(
        records,
        n_threads,
        n_slots,
        lambda shard, _: map_file(paths[shard], records[shard]["n_bytes"]),
    )


class S3Pipeline(Pipeline):
    """S3 shards received into slots of one private arena by `n_loops` event-loop threads
    (signed range GETs of CHUNK_BYTES, the kernel copying each body straight into its slot).

    The arena asks for transparent huge pages: fewer page faults when it is first written and
    fewer TLB misses when batches are gathered from it.
    """

    def __init__(self, make_reader, keys, records, n_loops: int, n_slots: int):
        """`make_reader()` gives one BlockingRangeReader (S3Store.range_reader); `keys` are
        store keys."""
        largest = max(r["n_bytes"] for r in records)
        self.slot_bytes = -(-largest // mmap.PAGESIZE) * mmap.PAGESIZE
        self.arena = mmap.mmap(-1, n_slots * self.slot_bytes, flags=mmap.MAP_PRIVATE)
        with contextlib.suppress(AttributeError, OSError):  # not Linux, or no THP
            self.arena.madvise(mmap.MADV_HUGEPAGE)
        self.loops = [make_reader() for _ in range(max(1, n_loops))]
        self.keys = keys
        super().__init__(records, n_slots, n_slots, self._fetch)

    def _fetch(self, shard: int, slot: int) -> memoryview:
        start = slot * self.slot_bytes
        view = memoryview(self.arena)[start : start + self.sizes[shard]]
        self.loops[slot % len(self.loops)].fetch_into(self.keys[shard], view, CHUNK_BYTES)
        return view

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)  # no new fetches start
        for loop in self.loops:
            loop.close()  # running fetches end; nothing writes into the arena after this
        super().close()
