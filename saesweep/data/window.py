"""A shuffle window: the tokens of a few fetched shards, served in a permuted order.

Shards stay where they were fetched (a file mapping or an arena slot); a batch is gathered
straight from them into a reused batch buffer, one numpy take per shard it draws from, split
over a few threads. Within a batch, tokens are grouped by shard (the batch's set of tokens is
what the permutation says; its inner order does not matter to a mean loss and keeps every copy
a contiguous write).
"""

from __future__ import annotations

import sys
from concurrent.futures import Executor

import numpy as np
import torch


class BatchBuffers:
    """Batch tensors [rows, d_model] whose memory is handed out again once nothing uses it.

    Fresh memory costs a page fault per 4 KiB: on the measured VM, gathering into fresh memory
    took 0.55 CPU s/GB, into reused memory 0.15. Each buffer is a numpy array; every tensor
    storage made from it by torch.frombuffer holds a reference to it, so its reference count
    says whether any batch (or view of one) still uses it. Pinned buffers (for a GPU) come from
    torch's caching host allocator, which reuses them safely around asynchronous copies.
    """

    def __init__(self, rows: int, d_model: int, dtype: torch.dtype, keep: int, pinned: bool):
        self.rows, self.d_model, self.dtype, self.keep, self.pinned = (
            rows,
            d_model,
            dtype,
            keep,
            pinned,
        )
        self.buffers: list[np.ndarray] = []
        self.idle_refs = 0

    def get(self, n: int) -> torch.Tensor:
        """An uninitialized [n, d_model] tensor."""
        if self.pinned or n != self.rows:
            return torch.empty(n, self.d_model, dtype=self.dtype, pin_memory=self.pinned)
        buf = next((b for b in self.buffers if self._refs(b) == self.idle_refs), None)
        if buf is None:
            buf = np.empty(n * self.d_model * self.dtype.itemsize, dtype=np.uint8)
            if len(self.buffers) < self.keep:
                self.buffers.append(buf)
                self.idle_refs = self._refs(buf)
        return torch.frombuffer(buf, dtype=self.dtype).view(n, self.d_model)

    def _refs(self, buf: np.ndarray) -> int:
        return sys.getrefcount(buf)


class Window:
    """Tokens of several shards (acts [n_i, d] and ids [n_i] each, and scales [n_i] for
    scaled 8-bit acts) in the order `order` of their concatenation (None: stored order).

    Batches are gathered with numpy's take, which copies on the calling thread with the GIL
    released: torch's index_select would use the intra-op thread pool, which the trainer (and,
    for S3, the fetch workers) needs; under that contention it ran 2-4x slower here.
    """

    def __init__(
        self,
        acts: list[torch.Tensor],
        ids: list[torch.Tensor],
        order=None,
        scales: list[torch.Tensor] | None = None,
    ):
        self.d_model, self.dtype = acts[0].shape[1], acts[0].dtype
        self.row = np.dtype((np.void, self.d_model * self.dtype.itemsize))
        self.acts = [as_rows(a, self.row) for a in acts]
        self.ids = [i.numpy() for i in ids]
        self.scales = None if scales is None else [s.numpy() for s in scales]
        self.offsets = np.cumsum([0] + [len(a) for a in acts])
        self.n_tokens = int(self.offsets[-1])
        self.order = np.arange(self.n_tokens) if order is None else np.asarray(order)

    def take(
        self,
        start: int,
        stop: int,
        buffers: BatchBuffers | None = None,
        helpers: tuple[Executor, int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(acts, token ids, scales or None) of tokens order[start:stop], grouped by shard.
        acts go into a buffer from `buffers`; `helpers` (an executor and its thread count)
        copy parts of the batch while the calling thread copies the first."""
        index = np.sort(self.order[start:stop])
        bounds = np.searchsorted(index, self.offsets)
        n = len(index)
        acts = buffers.get(n) if buffers else torch.empty(n, self.d_model, dtype=self.dtype)
        ids = torch.empty(n, dtype=torch.int32)
        scales = None if self.scales is None else torch.empty(n, dtype=torch.float32)
        outs = (as_rows(acts, self.row), ids.numpy(), None if scales is None else scales.numpy())
        n_parts = 1 + (helpers[1] if helpers and n >= 1024 else 0)
        cuts = [n * p // n_parts for p in range(n_parts + 1)]
        parts = list(zip(cuts[:-1], cuts[1:], strict=True))
        copies = [
            helpers[0].submit(self._copy, index, bounds, lo, hi, outs) for lo, hi in parts[1:]
        ]
        self._copy(index, bounds, *parts[0], outs)
        for copy in copies:
            copy.result()
        return acts, ids, scales

    def _copy(self, index, bounds, lo: int, hi: int, outs: tuple) -> None:
        """Rows lo:hi of the batch whose sorted window positions are `index`."""
        first = max(int(np.searchsorted(bounds, lo, side="right")) - 1, 0)
        for s in range(first, len(self.acts)):
            a, b = max(int(bounds[s]), lo), min(int(bounds[s + 1]), hi)
            if a >= hi:
                return
            if a < b:
                rows = index[a:b] - self.offsets[s]
                np.take(self.acts[s], rows, out=outs[0][a:b], mode="clip")
                np.take(self.ids[s], rows, out=outs[1][a:b], mode="clip")
                if self.scales is not None:
                    np.take(self.scales[s], rows, out=outs[2][a:b], mode="clip")


def as_rows(acts: torch.Tensor, row: np.dtype) -> np.ndarray:
    """[n] numpy rows of `row` bytes sharing memory with acts [n, d]."""
    return acts.view(torch.uint8).numpy().view(row).reshape(len(acts))
