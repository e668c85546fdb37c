"""A shuffle window: the tokens of a few fetched shards, served in a permuted order.

Shards stay where they were fetched (a file mapping or an arena slot); a batch is gathered
straight from them into one fresh tensor, one index_select per shard it draws from. Within a
batch, tokens are grouped by shard (the batch's set of tokens is what the permutation says;
its inner order does not matter to a mean loss and keeps every copy a contiguous write).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from saesweep.shards import safetensors_header

SAFETENSORS_DTYPES = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "I32": torch.int32,
}


def shard_tensors(data, names: tuple[str, ...], where: str) -> dict[str, tuple[list, torch.Tensor]]:
    """(shape, flat tensor viewing `data`) of tensors `names` of the safetensors bytes `data`."""
    header, data_start = safetensors_header(data, where)
    out = {}
    for name in names:
        info = header[name]
        start, end = info["data_offsets"]
        dtype = SAFETENSORS_DTYPES[info["dtype"]]
        count = (end - start) // dtype.itemsize
        with warnings.catch_warnings():  # read-only file mappings: the views are only read
            warnings.filterwarnings("ignore", "The given buffer is not writable")
            flat = torch.frombuffer(data, dtype=dtype, count=count, offset=data_start + start)
        out[name] = (info["shape"], flat)
    return out


class Window:
    """Tokens of several shards (acts [n_i, d] and ids [n_i] each) in the order `order` of
    their concatenation (None: stored order).

    Batches are gathered with numpy's single-threaded take: torch's index_select would use
    the intra-op thread pool, which the trainer (and, for S3, the fetch workers) needs; under
    that contention it ran 2-4x slower here.
    """

    def __init__(self, acts: list[torch.Tensor], ids: list[torch.Tensor], order):
        self.d_model, self.dtype = acts[0].shape[1], acts[0].dtype
        self.row = np.dtype((np.void, self.d_model * self.dtype.itemsize))
        self.acts = [as_rows(a, self.row) for a in acts]
        self.ids = [i.numpy() for i in ids]
        self.offsets = np.cumsum([0] + [len(a) for a in acts])
        self.n_tokens = int(self.offsets[-1])
        self.order = np.arange(self.n_tokens) if order is None else order.numpy()

    def take(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(acts, token ids) of tokens order[start:stop], grouped by shard."""
        index = np.sort(self.order[start:stop])
        bounds = np.searchsorted(index, self.offsets)
        acts = torch.empty(len(index), self.d_model, dtype=self.dtype)
        ids = torch.empty(len(index), dtype=torch.int32)
        acts_out, ids_out = as_rows(acts, self.row), ids.numpy()
        for s, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
            if a < b:
                rows = index[a:b] - self.offsets[s]
                np.take(self.acts[s], rows, out=acts_out[a:b], mode="clip")
                np.take(self.ids[s], rows, out=ids_out[a:b], mode="clip")
        return acts, ids


def as_rows(acts: torch.Tensor, row: np.dtype) -> np.ndarray:
    """[n] numpy rows of `row` bytes sharing memory with acts [n, d]."""
    return acts.view(torch.uint8).numpy().view(row).reshape(len(acts))
