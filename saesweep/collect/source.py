"""The model as a data source: activations computed while training reads them.

The collection's own pipeline and config (text -> sequences -> truncated forward pass with
hooks) without a store. Forward passes fill a window of at least `window_tokens` stored
tokens from consecutive sequences; the window is served in a seeded random order as batches,
every hook in lockstep (row i of each hook's batch is the same token), then the next window is
computed. Tokens of a window that do not fill a last whole batch are dropped. Documents with
index i % VAL_EVERY == VAL_EVERY - 1 are held out: the train split never sees them, the val
split sees only them.

The position (sequences consumed before the current window, the window's index, batches
served from it, epoch) is all a resume needs: the window is computed again from its first
sequence, deterministically, and its served batches are skipped.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch

from saesweep.collect.config import CollectConfig
from saesweep.collect.model import HookedModel, load_model, resolve_hook
from saesweep.collect.sequences import Sequence, batched, make_batch, sequences
from saesweep.collect.text import iter_documents
from saesweep.errors import UserError
from saesweep.format.shards import ACT_DTYPES, SEQ_CHUNK_BITS
from saesweep.memory import resolve_device

VAL_EVERY = 50
"""Every VAL_EVERY-th document (index % VAL_EVERY == VAL_EVERY - 1) is held out for
validation: 2 % of the text."""

Split = Literal["train", "val"]


@dataclass(frozen=True)
class LiveBatch:
    """One batch of every hook's activations, row i the same token in each."""

    acts: dict[str, torch.Tensor]
    """Module path -> [batch, d] in the collection config's act dtype."""
    token_ids: torch.Tensor
    """[batch] int32"""
    seq_ids: torch.Tensor
    """[batch] int64, document index << SEQ_CHUNK_BITS | chunk, as in a collection."""
    positions: torch.Tensor
    """[batch] int32, the token's position in its sequence."""


@dataclass(frozen=True)
class SourcePosition:
    """Where a ModelSource is: enough to continue it exactly."""

    epoch: int = 0
    seq_done: int = 0
    """Sequences of this split consumed before the current window."""
    window: int = 0
    """Index of the current window since the start (all epochs)."""
    batches_done: int = 0
    """Batches already served from the current window."""


@dataclass
class Window:
    acts: dict[str, torch.Tensor]
    token_ids: torch.Tensor
    seq_ids: torch.Tensor
    positions: torch.Tensor
    n_seqs: int

    @property
    def n_tokens(self) -> int:
        return len(self.token_ids)


class ModelSource:
    """Batches of activations of `hooks` (module paths or short forms such as 'resid.3')
    computed by the model of `cfg`, for one split of its text."""

    def __init__(
        self,
        cfg: CollectConfig,
        hooks: list[str],
        batch_size: int,
        window_tokens: int,
        seed: int,
        split: Split = "train",
    ):
        if window_tokens < batch_size:
            raise UserError(
                f"window_tokens {window_tokens} is smaller than one batch ({batch_size})"
            )
        self.cfg = dataclasses.replace(cfg, device=resolve_device(cfg.device))
        self.batch_size, self.window_tokens, self.seed, self.split = (
            batch_size,
            window_tokens,
            seed,
            split,
        )
        model, self.tokenizer = load_model(
            cfg.model,
            cfg.revision,
            cfg.model_dtype,
            self.cfg.device,
            trust_remote_code=cfg.trust_remote_code,
        )
        self.hooks = {spec: resolve_hook(model, spec)[0] for spec in hooks}
        self.hooked = HookedModel(model, sorted(set(self.hooks.values())))
        self.d_model = int(model.config.hidden_size)
        """Width of every hook's activations (as a collection records it)."""

    def batches(
        self, start: SourcePosition = SourcePosition()
    ) -> Iterator[tuple[LiveBatch, SourcePosition]]:
        """Batches from `start` on, forever (the text repeats by epochs), each with the
        position after it."""
        pos = start
        while True:
            seqs = itertools.islice(self._sequences(), pos.seq_done, None)
            whole_batches = 0
            for window in self._windows(seqs):
                order = self._order(pos.window, window.n_tokens)
                n_batches = window.n_tokens // self.batch_size
                whole_batches += n_batches
                for b in range(pos.batches_done, n_batches):
                    rows = order[b * self.batch_size : (b + 1) * self.batch_size]
                    after = dataclasses.replace(pos, batches_done=b + 1)
                    yield self._take(window, rows), after
                pos = SourcePosition(pos.epoch, pos.seq_done + window.n_seqs, pos.window + 1)
            if whole_batches == 0 and pos.epoch == start.epoch and start.seq_done == 0:
                raise UserError(
                    f"the {self.split} split of {self.cfg.dataset} holds no whole batch of "
                    f"{self.batch_size} tokens; use more text or a smaller batch_size"
                )
            pos = SourcePosition(pos.epoch + 1, 0, pos.window)

    def first_tokens(self, n_tokens: int) -> dict[str, torch.Tensor]:
        """The first n_tokens stored tokens of the split (fewer if it holds fewer), in text
        order: a sample for estimating statistics."""
        parts, total = [], 0
        for seq_batch in batched(self._sequences(), self.cfg.batch_size):
            parts.append(self._forward(seq_batch))
            total += parts[-1].n_tokens
            if total >= n_tokens:
                break
        window = _concat(parts)
        return {spec: window.acts[path][:n_tokens] for spec, path in self.hooks.items()}

    def _sequences(self) -> Iterator[Sequence]:
        cfg = self.cfg
        docs = iter_documents(
            cfg.dataset, cfg.text_column, cfg.dataset_config, cfg.split, cfg.streaming
        )
        held_out = VAL_EVERY - 1
        for seq in sequences(docs, self.tokenizer, cfg.ctx_len, cfg.exclude_special):
            is_val = (seq.seq_id >> SEQ_CHUNK_BITS) % VAL_EVERY == held_out
            if is_val == (self.split == "val"):
                yield seq

    def _windows(self, seqs: Iterator[Sequence]) -> Iterator[Window]:
        """Windows of at least window_tokens stored tokens (the last one of an epoch may hold
        fewer), from consecutive sequences."""
        pending: list[Window] = []
        n_tokens = 0
        for seq_batch in batched(seqs, self.cfg.batch_size):
            part = self._forward(seq_batch)
            pending.append(part)
            n_tokens += part.n_tokens
            if n_tokens >= self.window_tokens:
                yield _concat(pending)
                pending, n_tokens = [], 0
        if pending:
            yield _concat(pending)

    def _forward(self, seqs: list[Sequence]) -> Window:
        batch = make_batch(seqs, self.tokenizer.pad_token_id or 0)
        device = torch.device(self.cfg.device)
        outputs = self.hooked.run(batch.input_ids.to(device), batch.attention_mask.to(device))
        keep = batch.stored.to(device)
        dtype = ACT_DTYPES[self.cfg.act_dtype]
        acts = {path: out[keep].to(dtype) for path, out in outputs.items()}
        n_rows, width = batch.stored.shape
        return Window(
            acts,
            batch.input_ids[batch.stored].to(torch.int32),
            batch.seq_ids[:, None].expand(n_rows, width)[batch.stored],
            torch.arange(width, dtype=torch.int32).expand(n_rows, width)[batch.stored],
            len(seqs),
        )

    def _order(self, window: int, n_tokens: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + window)
        return torch.randperm(n_tokens, generator=generator)

    def _take(self, window: Window, rows: torch.Tensor) -> LiveBatch:
        on_device = rows.to(next(iter(window.acts.values())).device)
        return LiveBatch(
            {spec: window.acts[path][on_device] for spec, path in self.hooks.items()},
            window.token_ids[rows],
            window.seq_ids[rows],
            window.positions[rows],
        )


def _concat(parts: list[Window]) -> Window:
    return Window(
        {path: torch.cat([p.acts[path] for p in parts]) for path in parts[0].acts},
        torch.cat([p.token_ids for p in parts]),
        torch.cat([p.seq_ids for p in parts]),
        torch.cat([p.positions for p in parts]),
        sum(p.n_seqs for p in parts),
    )
