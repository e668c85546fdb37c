"""Shard writing: background serialization and upload, in-order commits to the manifest.

Shards are cut at batch boundaries for all hooks at once, serialized and written by a thread
pool, and committed to this machine's part manifest strictly in order, only once every hook's
file of that shard is whole in the store. At most `max_inflight` shards are held in memory;
beyond that `submit` waits for the oldest (backpressure).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from saesweep.errors import UserError
from saesweep.format.quant import QuantError, is_scaled, quantize
from saesweep.format.shards import RunningStats, checksum, encode_shard, shard_name
from saesweep.store import Store


@dataclass
class PendingShard:
    """One shard's tensors for every hook, gathered on the host."""

    index: int
    seq_end: int
    """Machine-local ordinal of the first sequence after this shard."""
    acts: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    token_ids: list[torch.Tensor] = field(default_factory=list)
    seq_ids: list[torch.Tensor] = field(default_factory=list)
    positions: list[torch.Tensor] = field(default_factory=list)
    copy_done: list = field(default_factory=list)
    """CUDA events to wait for before the host copies may be read."""
    first_batch: int = 0
    """Number of this shard's first batch in this collection run (for messages)."""

    @property
    def n_tokens(self) -> int:
        return sum(len(t) for t in self.token_ids)

    def add(
        self,
        acts: dict[str, torch.Tensor],
        token_ids: torch.Tensor,
        seq_ids: torch.Tensor,
        positions: torch.Tensor,
    ) -> None:
        """One batch's stored tokens (acts: hook -> [n, d] in the stored dtype, on any
        device). Acts on a GPU are copied to pinned host memory without blocking it."""
        on_gpu = False
        for hook, batch_acts in acts.items():
            on_gpu = batch_acts.device.type == "cuda"
            host = torch.empty(batch_acts.shape, dtype=batch_acts.dtype, pin_memory=on_gpu)
            host.copy_(batch_acts, non_blocking=on_gpu)
            self.acts.setdefault(hook, []).append(host)
        if on_gpu:
            event = torch.cuda.Event()
            event.record()
            self.copy_done.append(event)
        self.token_ids.append(token_ids.cpu())
        self.seq_ids.append(seq_ids.cpu())
        self.positions.append(positions.cpu())


@dataclass
class WrittenShard:
    index: int
    seq_end: int
    records: dict[str, dict]
    """hook -> {name, n_tokens, n_bytes, checksum}"""
    stats: dict[str, RunningStats]
    quant: dict[str, QuantError] = field(default_factory=dict)
    """hook -> quantization error of sampled tokens (scaled 8-bit collections only)."""


class ShardWriter:
    def __init__(
        self,
        store: Store,
        hook_dirs: dict[str, str],
        machine: int,
        threads: int,
        max_inflight: int,
        commit: Callable[[WrittenShard], None],
        act_dtype: torch.dtype,
    ):
        self.store = store
        self.act_dtype = act_dtype
        """The stored dtype; scaled 8-bit dtypes are quantized here, from what was added."""
        self.hook_dirs = hook_dirs
        self.machine = machine
        self.max_inflight = max_inflight
        self.commit = commit
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="shard-writer")
        self.pending: deque[Future[WrittenShard]] = deque()
        self.bytes_written = 0

    def submit(self, shard: PendingShard) -> None:
        self._commit_finished()
        while len(self.pending) >= self.max_inflight:
            self._commit_oldest()
        self.pending.append(self.pool.submit(self._write, shard))

    def flush(self) -> None:
        """Commit everything submitted so far, in order; the first write error is raised
        after the shards before it are committed, and no later shard is."""
        while self.pending:
            self._commit_oldest()

    def close(self) -> None:
        """flush(), then stop the threads (also when flush raises)."""
        try:
            self.flush()
        finally:
            self.pool.shutdown(wait=True, cancel_futures=True)

    def _commit_finished(self) -> None:
        while self.pending and self.pending[0].done():
            self._commit_oldest()

    def _commit_oldest(self) -> None:
        """Commit the oldest shard once written. A failed (or interrupted) wait leaves it
        first, so close() raises its error again and commits nothing after it."""
        written = self.pending[0].result()
        self.pending.popleft()
        self.commit(written)
        self.bytes_written += sum(r["n_bytes"] for r in written.records.values())

    def _write(self, shard: PendingShard) -> WrittenShard:
        for event in shard.copy_done:
            event.synchronize()
        token_ids = torch.cat(shard.token_ids)
        seq_ids = torch.cat(shard.seq_ids)
        positions = torch.cat(shard.positions)
        for hook, parts in shard.acts.items():
            check_finite(hook, parts, shard.first_batch)
        records, stats, quant = {}, {}, {}
        for hook, parts in shard.acts.items():
            acts = torch.cat(parts)
            if is_scaled(self.act_dtype):
                values, scales = quantize(acts, self.act_dtype)
                quant[hook] = QuantError.of(acts, values, scales)
                data = encode_shard(values, token_ids, seq_ids, positions, scales)
            else:
                data = encode_shard(acts, token_ids, seq_ids, positions)
            name = shard_name(self.machine, shard.index)
            self.store.put(f"{self.hook_dirs[hook]}/{name}", data)
            records[hook] = {
                "name": name,
                "n_tokens": len(acts),
                "n_bytes": len(data),
                "checksum": checksum(data),
            }
            stats[hook] = RunningStats.of(acts)
        return WrittenShard(shard.index, shard.seq_end, records, stats, quant)


def check_finite(hook: str, batches: list[torch.Tensor], first_batch: int) -> None:
    """Refuse activations that hold inf or NaN (before any file of the shard is written)."""
    for n, acts in enumerate(batches, first_batch):
        if not bool(torch.isfinite(acts).all()):
            raise UserError(
                f"hook {hook} produced non-finite activations (inf or NaN) in batch {n} of this "
                f"run, stored as {str(acts.dtype).removeprefix('torch.')}: float16 overflows "
                "beyond 65,504; collect with --act-dtype bfloat16 or float32 (if those also "
                "fail, the model itself produces NaN)"
            )
