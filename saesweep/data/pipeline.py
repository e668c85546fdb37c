"""Fetch worker processes and the shared-memory slots they fill, in schedule order."""

from __future__ import annotations

import json
import multiprocessing as mp
import queue
import struct
import time
from collections.abc import Iterator
from multiprocessing.shared_memory import SharedMemory

import torch

from saesweep.data.fetch import worker_main

SAFETENSORS_DTYPES = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "I32": torch.int32,
    "I64": torch.int64,
}


def parse_safetensors(buf: memoryview, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Copies of the named tensors of a safetensors file held in `buf`."""
    (header_len,) = struct.unpack("<Q", buf[:8])
    header = json.loads(bytes(buf[8 : 8 + header_len]))
    base = 8 + header_len
    out = {}
    for name in names:
        info = header[name]
        dtype = SAFETENSORS_DTYPES[info["dtype"]]
        start, end = info["data_offsets"]
        flat = torch.frombuffer(buf, dtype=torch.uint8, count=end - start, offset=base + start)
        out[name] = flat.view(dtype).reshape(info["shape"]).clone()
    return out


class FetchPipeline:
    """Keeps up to len(slots) shards in flight, handing them back in schedule order."""

    def __init__(
        self,
        source: dict,
        keys: list[str],
        sizes: list[int],
        checksums: list[str],
        schedule: Iterator[int],
        n_workers: int,
        n_slots: int,
    ):
        self.keys, self.sizes, self.checksums = keys, sizes, checksums
        self.schedule = schedule
        slot_bytes = max(sizes)
        self.slots = [SharedMemory(create=True, size=slot_bytes) for _ in range(n_slots)]
        ctx = mp.get_context("fork")
        self.tasks, self.results = ctx.Queue(), ctx.Queue()
        names = [s.name for s in self.slots]
        self.workers = [
            ctx.Process(
                target=worker_main, daemon=True, args=(source, names, self.tasks, self.results)
            )
            for _ in range(n_workers)
        ]
        for w in self.workers:
            w.start()
        self.free = list(range(n_slots))
        self.in_flight: list[tuple[int, int]] = []
        self.done: dict[int, tuple[int, str]] = {}
        self.next_ticket = 0
        self.bytes_read = 0
        self.busy_s = 0.0
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

    def next_shard(self, names: tuple[str, ...]) -> tuple[int, dict[str, torch.Tensor] | str]:
        """(shard index, its tensors) for the next shard in schedule order, or (index, status)
        when it could not be read correctly."""
        ticket, shard = self.in_flight.pop(0)
        while ticket not in self.done:
            try:
                t, slot, status = self.results.get(timeout=1.0)
            except queue.Empty:
                if not all(w.is_alive() for w in self.workers):
                    raise RuntimeError("a fetch worker process died") from None
                continue
            self.done[t] = (slot, status)
        slot, status = self.done.pop(ticket)
        result: dict[str, torch.Tensor] | str = status
        if status == "ok":
            start = time.perf_counter()
            result = parse_safetensors(self.slots[slot].buf[: self.sizes[shard]], names)
            self.busy_s += time.perf_counter() - start
            self.bytes_read += self.sizes[shard]
        self.free.append(slot)
        self._fill()
        return shard, result

    def in_flight_count(self) -> int:
        return len(self.in_flight)

    def close(self) -> None:
        for _ in self.workers:
            self.tasks.put(None)
        for w in self.workers:
            w.join(timeout=5)
            if w.is_alive():
                w.kill()
        for shm in self.slots:
            shm.close()
            shm.unlink()
