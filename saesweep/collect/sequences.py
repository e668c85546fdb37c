"""Documents to fixed-length token sequences, partitioned across machines."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Literal

import torch

from saesweep.errors import UserError
from saesweep.format.shards import SEQ_CHUNK_BITS

VAL_EVERY = 50
"""Every VAL_EVERY-th document (index % VAL_EVERY == VAL_EVERY - 1) is held out for
validation: 2 % of the text."""

DocSplit = Literal["all", "train", "val"]
"""Which documents: all, the training split (all but the held-out ones) or the held-out."""


def in_doc_split(doc_index: int, doc_split: DocSplit) -> bool:
    """Whether document `doc_index` belongs to `doc_split` (the one owner of the rule)."""
    if doc_split == "all":
        return True
    return (doc_index % VAL_EVERY == VAL_EVERY - 1) == (doc_split == "val")


@dataclass(frozen=True)
class Sequence:
    seq_id: int
    """document index << SEQ_CHUNK_BITS | chunk index."""
    input_ids: list[int]
    stored: list[bool]
    """Which positions are stored (False for special tokens when they are excluded)."""


def sequences(
    documents: Iterable[str],
    tokenizer,
    ctx_len: int,
    exclude_special: bool,
    machine: int = 0,
    n_machines: int = 1,
    doc_split: DocSplit = "all",
) -> Iterator[Sequence]:
    """This machine's sequences: documents i of `doc_split` with i % n_machines == machine,
    each split into chunks that fit ctx_len with the tokenizer's special tokens added. A
    sequence never spans two documents, so the machines' outputs together equal one
    machine's."""
    prefix, suffix = special_template(tokenizer)
    room = ctx_len - len(prefix) - len(suffix)
    if room < 1:
        raise UserError(f"ctx_len {ctx_len} leaves no room beside the tokenizer's special tokens")
    special = set(tokenizer.all_special_ids)
    for doc_index, text in enumerate(documents):
        if doc_index % n_machines != machine or not in_doc_split(doc_index, doc_split):
            continue
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        for chunk in range(min(-(-len(ids) // room), 1 << SEQ_CHUNK_BITS)):
            input_ids = prefix + ids[chunk * room :][:room] + suffix
            stored = [not (exclude_special and t in special) for t in input_ids]
            yield Sequence((doc_index << SEQ_CHUNK_BITS) | chunk, input_ids, stored)


def special_template(tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after a text's tokens."""
    core = tokenizer("hello", add_special_tokens=False)["input_ids"]
    full = tokenizer("hello", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(core) + 1):
        if full[start : start + len(core)] == core:
            return full[:start], full[start + len(core) :]
    return [], []


@dataclass
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    stored: torch.Tensor
    """[batch, seq] bool: positions whose activations are kept."""
    seq_ids: torch.Tensor
    """[batch] int64"""

    @property
    def n_stored(self) -> int:
        return int(self.stored.sum())


def make_batch(seqs: list[Sequence], pad_id: int) -> Batch:
    width = max(len(s.input_ids) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    stored = torch.zeros((len(seqs), width), dtype=torch.bool)
    for row, s in enumerate(seqs):
        input_ids[row, : len(s.input_ids)] = torch.tensor(s.input_ids)
        attention_mask[row, : len(s.input_ids)] = 1
        stored[row, : len(s.input_ids)] = torch.tensor(s.stored)
    seq_ids = torch.tensor([s.seq_id for s in seqs], dtype=torch.int64)
    return Batch(input_ids, attention_mask, stored, seq_ids)


def batched(seqs: Iterable[Sequence], batch_size: int) -> Iterator[list[Sequence]]:
    batch: list[Sequence] = []
    for s in seqs:
        batch.append(s)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch
