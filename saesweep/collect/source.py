"""The model as a data source: activations computed while training reads them.

The collection's own pipeline and config (text -> sequences -> truncated forward pass with
hooks) without a store. Forward passes fill a window of at least `shuffle_tokens` stored tokens
from consecutive sequences; the window is served in a seeded random order as batches, every
hook in lockstep (row i of each hook's batch is the same token), then the next window is
computed. Tokens of a window that do not fill a last whole batch are dropped (under batch_size
/ shuffle_tokens of the text). A source that serves a set number of batches computes its last
window only as large as they need. Documents with index i % VAL_EVERY == VAL_EVERY - 1
(collect.sequences) are held out: the train split never sees them, the val split sees only
them.

The position (sequences consumed before the current window, the window's index, batches
served from it, epoch) is all a resume needs: the window is computed again from its first
sequence, deterministically, and its served batches are skipped.

With a cache (train.py --train-data.cache-to), the first epoch's sequences are also written,
in sequence order as they are computed, as an ordinary collection of the train split.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch

from saesweep.collect.config import CollectConfig
from saesweep.collect.model import HookedModel, load_model, resolve_hook
from saesweep.collect.run import (
    PartWriter,
    machine_lock,
    merge_parts,
    open_collection,
    start_part,
)
from saesweep.collect.sequences import Sequence, batched, make_batch, sequences
from saesweep.collect.text import iter_documents
from saesweep.errors import UserError
from saesweep.memory import resolve_device

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
class StoredTokens:
    """The stored tokens of consecutive sequences (n_seqs of them): every hook's activations
    by module path, and each token's id, sequence id and position."""

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
        shuffle_tokens: int,
        seed: int,
        split: Split = "train",
        cache_to: str = "",
    ):
        if shuffle_tokens < batch_size:
            raise UserError(
                f"shuffle_tokens {shuffle_tokens} is smaller than one batch ({batch_size})"
            )
        self.cfg = dataclasses.replace(cfg, device=resolve_device(cfg.device))
        self.batch_size, self.shuffle_tokens, self.seed, self.split = (
            batch_size,
            shuffle_tokens,
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
        self.cache = Cache(cache_config(self.cfg, hooks, cache_to), model) if cache_to else None
        """Where the first epoch's sequences are written (train split only), or None."""

    def batches(
        self, start: SourcePosition = SourcePosition(), limit: int | None = None
    ) -> Iterator[tuple[LiveBatch, SourcePosition]]:
        """Batches from `start` on, each with the position after it: forever (the text
        repeats by epochs), or `limit` of them, the last window computed only as large as
        the batches left need."""
        if limit == 0:
            return
        pos = start
        left = None if limit is None else limit + start.batches_done  # from the window's start
        if self.cache is not None and start.epoch > 0:
            self.cache.check_complete()
        while True:
            seqs = itertools.islice(self._sequences(), pos.seq_done, None)
            seq_batches = batched(seqs, self.cfg.batch_size)
            cache = self.cache if pos.epoch == 0 else None
            whole_batches = 0
            while (window := self._window(seq_batches, pos.seq_done, cache, left)) is not None:
                order = self._order(pos.window, window.n_tokens)
                n_batches = window.n_tokens // self.batch_size
                if left is not None:
                    n_batches = min(n_batches, left)
                    left -= n_batches
                whole_batches += n_batches
                for b in range(pos.batches_done, n_batches):
                    rows = order[b * self.batch_size : (b + 1) * self.batch_size]
                    after = dataclasses.replace(pos, batches_done=b + 1)
                    yield self._take(window, rows), after
                if left == 0:
                    return
                pos = SourcePosition(pos.epoch, pos.seq_done + window.n_seqs, pos.window + 1)
            if cache is not None:
                cache.finish()
            if whole_batches == 0 and pos.epoch == start.epoch and start.seq_done == 0:
                raise UserError(
                    f"the {self.split} split of {self.cfg.dataset} holds no whole batch of "
                    f"{self.batch_size} tokens; use more text or a smaller batch_size"
                )
            pos = SourcePosition(pos.epoch + 1, 0, pos.window)

    def first_tokens(self, n_tokens: int) -> dict[str, torch.Tensor]:
        """The first n_tokens stored tokens of the split (fewer if it holds fewer), in text
        order: a sample for estimating statistics."""
        window = self.first_window(n_tokens)
        return {spec: window.acts[path] for spec, path in self.hooks.items()}

    def first_window(self, n_tokens: int) -> StoredTokens:
        """The split's first n_tokens stored tokens (fewer if it holds fewer) in text order,
        every hook's activations (by module path) with their token ids and places."""
        parts, total = [], 0
        for seq_batch in batched(self._sequences(), self.cfg.batch_size):
            parts.append(self._forward(seq_batch))
            total += parts[-1].n_tokens
            if total >= n_tokens:
                break
        window = _concat(parts)
        return StoredTokens(
            {path: acts[:n_tokens] for path, acts in window.acts.items()},
            window.token_ids[:n_tokens],
            window.seq_ids[:n_tokens],
            window.positions[:n_tokens],
            window.n_seqs,
        )

    def _sequences(self) -> Iterator[Sequence]:
        return split_sequences(self.cfg, self.tokenizer, self.split)

    def _window(
        self,
        seq_batches: Iterator[list[Sequence]],
        first: int,
        cache: Cache | None,
        left: int | None,
    ) -> StoredTokens | None:
        """The next window from consecutive sequences (`first`: the first one's ordinal),
        each forward pass also written to `cache`: at least shuffle_tokens stored tokens, or
        only as many as `left` batches need (None: no limit); fewer at the end of the text,
        None past it."""
        wanted = self.shuffle_tokens
        if left is not None:
            wanted = min(wanted, left * self.batch_size)
        parts: list[StoredTokens] = []
        n_tokens = 0
        for seq_batch in seq_batches:
            part = self._forward(seq_batch)
            if cache is not None:
                cache.add(first, part)
            first += part.n_seqs
            parts.append(part)
            n_tokens += part.n_tokens
            if n_tokens >= wanted:
                break
        return _concat(parts) if parts else None

    def _forward(self, seqs: list[Sequence]) -> StoredTokens:
        batch = make_batch(seqs, self.tokenizer.pad_token_id or 0)
        stored = self.hooked.stored(batch, self.cfg.device, self.cfg.act_dtype)
        return StoredTokens(*stored, len(seqs))

    def _order(self, window: int, n_tokens: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + window)
        return torch.randperm(n_tokens, generator=generator)

    def _take(self, window: StoredTokens, rows: torch.Tensor) -> LiveBatch:
        on_device = rows.to(next(iter(window.acts.values())).device)
        return LiveBatch(
            {spec: window.acts[path][on_device] for spec, path in self.hooks.items()},
            window.token_ids[rows],
            window.seq_ids[rows],
            window.positions[rows],
        )


def split_sequences(cfg: CollectConfig, tokenizer, split: Split) -> Iterator[Sequence]:
    """The model inputs of one split of the config's text, in text order (one epoch)."""
    docs = iter_documents(
        cfg.dataset, cfg.text_column, cfg.dataset_config, cfg.split, cfg.streaming
    )
    return sequences(docs, tokenizer, cfg.ctx_len, cfg.exclude_special, doc_split=split)


def _concat(parts: list[StoredTokens]) -> StoredTokens:
    return StoredTokens(
        {path: torch.cat([p.acts[path] for p in parts]) for path in parts[0].acts},
        torch.cat([p.token_ids for p in parts]),
        torch.cat([p.seq_ids for p in parts]),
        torch.cat([p.positions for p in parts]),
        sum(p.n_seqs for p in parts),
    )


def cache_config(cfg: CollectConfig, hooks: list[str], uri: str) -> CollectConfig:
    """The collection a live source of `cfg` caches into `uri`: the train split of the text,
    the source's hooks, one machine, no token budget."""
    return dataclasses.replace(
        cfg,
        hooks=tuple(hooks),
        out=uri,
        doc_split="train",
        max_tokens=None,
        machine=0,
        n_machines=1,
        progress=False,
    )


class Cache:
    """A live source's training sequences written, in sequence order, as an ordinary
    collection of `cfg` (collect.py's writer and commits). Sequences already committed (by
    an earlier run that was killed) are not written again; a cache that is complete is left
    as it is."""

    def __init__(self, cfg: CollectConfig, model):
        self.uri = cfg.out
        store, stored = open_collection(cfg)
        self.lock = contextlib.ExitStack()
        self.lock.enter_context(machine_lock(store, 0, 1))
        part, self.hook_info = start_part(cfg, store, model, stored)
        self.store = store
        self.out = None if part.complete else PartWriter(cfg, store, part, self.hook_info)
        """None once the cache is complete."""

    def add(self, first: int, part: StoredTokens) -> None:
        """Forward pass `part` of the sequences from ordinal `first` on."""
        if self.out is None or first + part.n_seqs <= self.out.seq_done:
            return
        if first != self.out.seq_done:
            raise self._gap(f"sequence {first}")
        self.out.add((part.acts, part.token_ids, part.seq_ids, part.positions), part.n_seqs)

    def check_complete(self) -> None:
        """A source that continues after the first epoch needs a complete cache."""
        if self.out is not None:
            raise self._gap("the second epoch or later")

    def _gap(self, where: str) -> UserError:
        return UserError(
            f"the cache {self.uri} holds the first {self.out.seq_done} sequences of the "
            f"training text, but this run continues at {where}; delete it or give "
            "--train-data.cache-to a new location"
        )

    def flush(self) -> None:
        """Commit every sequence computed so far (a last shard may be short)."""
        if self.out is not None:
            self.out.flush()

    def finish(self) -> None:
        """Commit everything and mark the cache complete: a collection readers accept."""
        if self.out is None:
            return
        try:
            self.out.flush()
        finally:
            self.out.close()
        self.out.complete()
        merge_parts(self.store, 1, self.hook_info)
        self.out = None
        self.lock.close()
