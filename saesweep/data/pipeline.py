"""Shards fetched ahead of the reader, handed out in schedule order.

Pool threads read whole shards through the store's ObjectReader and verify their checksums
(Collection.fetch), all of which release the GIL. Local files are mapped where they lie; a
store that receives objects into buffers (S3) gets slots of one private arena. A handed-out
shard's bytes stay valid until the reader releases it.
"""

from __future__ import annotations

import contextlib
import mmap
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from saesweep.format.collection import Buffer, Collection, HookShards
from saesweep.store.base import ObjectReader


@dataclass(frozen=True)
class Fetched:
    """A shard handed to the reader: its whole file's bytes (None unless status is "ok")."""

    shard: int
    data: Buffer | None
    status: str
    slot: int = -1


class Pipeline:
    """Keeps up to n_slots shards of one hook fetched, in flight or held by the reader.

    Mapped objects are read by n_threads pool threads; received ones by one pool thread per
    slot into the slot's part of the arena (their reads wait on the network, not the CPU).
    The arena asks for transparent huge pages: fewer page faults when it is first written
    and fewer TLB misses when batches are gathered from it."""

    def __init__(
        self,
        collection: Collection,
        hook: HookShards,
        objects: ObjectReader,
        n_threads: int,
        n_slots: int,
    ):
        self.collection, self.hook, self.objects, self.n_slots = collection, hook, objects, n_slots
        self.sizes = [r["n_bytes"] for r in hook.shards]
        self.arena, self.slot_bytes = None, 0
        if not collection.store.maps_objects:
            self.slot_bytes = -(-max(self.sizes) // mmap.PAGESIZE) * mmap.PAGESIZE
            self.arena = mmap.mmap(-1, n_slots * self.slot_bytes, flags=mmap.MAP_PRIVATE)
            with contextlib.suppress(AttributeError, OSError):  # not Linux, or no THP
                self.arena.madvise(mmap.MADV_HUGEPAGE)
            n_threads = n_slots
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
            job = self.pool.submit(
                self.collection.fetch, self.objects, self.hook, shard, self._slot(slot)
            )
            self.in_flight.append((shard, slot, job))

    def _slot(self, slot: int) -> memoryview | None:
        """The arena's part for `slot` (None: objects are mapped)."""
        if self.arena is None:
            return None
        start = slot * self.slot_bytes
        return memoryview(self.arena)[start : start + self.slot_bytes]

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
        self.pool.shutdown(wait=False, cancel_futures=True)  # no new fetches start
        self.objects.close()  # running fetches end; nothing writes into the arena after this
        self.pool.shutdown()
