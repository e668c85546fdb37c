"""Fetch worker processes and the shared-memory arena they fill, shards handed out in
schedule order; batches are gathered from the arena in one copy."""

from __future__ import annotations

import json
import mmap
import multiprocessing as mp
import queue
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from saesweep.data.fetch import header_length, make_fetcher, worker_main


@dataclass(frozen=True)
class Fetched:
    """A shard handed back by the workers: its bytes lie at `offset` in the arena."""

    shard: int
    slot: int
    offset: int
    status: str


class FetchPipeline:
    """Keeps up to n_slots shards fetched or in flight; the reader releases their slots.

    The arena is one anonymous shared mapping of n_slots slots, made before the workers fork,
    so they write into it directly. Viewed as rows of `row_bytes` bytes,
    it holds every fetched shard's acts as whole rows (the workers align them), so a batch is
    one gather of row numbers.
    """

    def __init__(
        self,
        source: dict,
        keys: list[str],
        sizes: list[int],
        checksums: list[str],
        schedule: Iterator[int],
        n_workers: int,
        n_slots: int,
        row_bytes: int,
    ):
        self.keys, self.sizes, self.checksums = keys, sizes, checksums
        self.schedule, self.row_bytes = schedule, row_bytes
        self.slot_bytes = (max(sizes) // row_bytes + 2) * row_bytes
        self.arena = mmap.mmap(-1, n_slots * self.slot_bytes, mmap.MAP_SHARED)
        self.rows = np.frombuffer(self.arena, dtype=np.dtype((np.void, row_bytes)))
        ctx = mp.get_context("fork")
        self.tasks, self.results = ctx.Queue(), ctx.Queue()
        args = (
            make_fetcher(source),
            self.arena,
            self.slot_bytes,
            row_bytes,
            self.tasks,
            self.results,
        )
        self.workers = [
            ctx.Process(target=worker_main, daemon=True, args=args) for _ in range(n_workers)
        ]
        for w in self.workers:
            w.start()
        self.free = list(range(n_slots))
        self.in_flight: list[tuple[int, int]] = []
        self.done: dict[int, tuple[int, int, str]] = {}
        self.next_ticket = 0
        self.bytes_read = 0
        self._fill()

    def _fill(self) -> None:
        while self.free:
            shard = next(self.schedule, None)
            if shard is None:
                return
            slot = self.free.pop()
            ticket = self.next_ticket
            self.next_ticket += 1
            self.in_flight.append((ticket, shard))
            self.tasks.put(
                (ticket, slot, self.keys[shard], self.sizes[shard], self.checksums[shard])
            )

    def next_shard(self) -> Fetched:
        """The next shard in schedule order; its slot stays taken until `release`."""
        ticket, shard = self.in_flight.pop(0)
        while ticket not in self.done:
            try:
                t, slot, offset, status = self.results.get(timeout=1.0)
            except queue.Empty:
                if not all(w.is_alive() for w in self.workers):
                    raise RuntimeError("a fetch worker process died") from None
                continue
            self.done[t] = (slot, offset, status)
        slot, offset, status = self.done.pop(ticket)
        if status == "ok":
            self.bytes_read += self.sizes[shard]
        return Fetched(shard, slot, offset, status)

    def release(self, slots: list[int]) -> None:
        """Give slots back for the next shards of the schedule."""
        self.free += slots
        self._fill()

    def locate(self, fetched: Fetched, name: str) -> tuple[dict, int]:
        """The header entry of tensor `name` of a fetched shard, and where its data starts in
        the arena."""
        offset = fetched.offset
        end = offset + header_length(self.arena[offset : offset + 8])
        info = json.loads(self.arena[offset + 8 : end])[name]
        return info, end + info["data_offsets"][0]

    def copy(self, start: int, dtype: torch.dtype, count: int) -> torch.Tensor:
        """A copy of `count` elements of `dtype` at byte `start` of the arena."""
        view = torch.frombuffer(self.arena, dtype=dtype, count=count, offset=start)
        return view.clone()

    def gather(self, rows: torch.Tensor) -> torch.Tensor:
        """Rows of the arena, [len(rows), row_bytes] uint8, in one copy."""
        taken = np.take(self.rows, rows.numpy())
        return torch.from_numpy(taken.view(np.uint8).reshape(len(rows), self.row_bytes))

    def in_flight_count(self) -> int:
        return len(self.in_flight)

    def close(self) -> None:
        for _ in self.workers:
            self.tasks.put(None)
        for w in self.workers:
            w.join(timeout=5)
            if w.is_alive():
                w.kill()
        del self.rows
        self.arena.close()
