"""What a feature dashboard shows of every latent of one SAE, gathered shard by shard in one
pass over the collection: density, a histogram of the positive activations, and the top
activating tokens with their contexts (the latent's activation on every context token), taken
from the shard while it is in memory (a sequence never spans shards).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from saesweep.evaluate.features import TopK
from saesweep.sae.export import exported_acts

N_BINS = 64
"""Bins of an activation histogram over [0, R): R is the smallest power of two above the
latent's largest activation, so the bins up to the largest activation are 33 to 64."""
MIN_LOG_RANGE = -64
"""log2 of the smallest histogram range (a latent that has not fired yet)."""
CHUNK = 4096
"""Tokens encoded at once."""


def merged_bins(counts: Tensor, factor: int) -> Tensor:
    """Histogram rows [n, N_BINS] over a range `factor` (a power of two) times as wide: each
    `factor` adjacent bins summed into one, in the lower bins."""
    out = torch.zeros_like(counts)
    if factor >= N_BINS:
        out[:, 0] = counts.sum(1)
    else:
        out[:, : N_BINS // factor] = counts.view(len(counts), N_BINS // factor, factor).sum(2)
    return out


@dataclass
class Histogram:
    """Per-latent counts of positive activations in N_BINS equal bins over [0, 2**log_range);
    a range grows by doubling, merging bins exactly, when an activation reaches it."""

    d_sae: int
    counts: Tensor = field(init=False)
    log_range: Tensor = field(init=False)

    def __post_init__(self):
        self.counts = torch.zeros(self.d_sae, N_BINS, dtype=torch.int64)
        self.log_range = torch.full((self.d_sae,), MIN_LOG_RANGE, dtype=torch.int64)

    def add(self, acts: Tensor) -> None:
        """The positive entries of `acts` [rows, d_sae]."""
        peak = acts.max(0).values.double()
        need = torch.where(peak > 0, torch.floor(torch.log2(peak)).long() + 1, MIN_LOG_RANGE)
        grow = (need - self.log_range).clamp(min=0)
        for g in grow.unique().tolist():
            if g > 0:
                cols = grow == g
                self.counts[cols] = merged_bins(self.counts[cols], 2 ** min(g, 63))
        self.log_range += grow
        rows, cols = acts.nonzero(as_tuple=True)
        scaled = acts[rows, cols].double() * torch.exp2(-self.log_range[cols].double())
        bins = (scaled * N_BINS).floor().long().clamp(max=N_BINS - 1)
        self.counts.index_put_((cols, bins), torch.ones_like(bins), accumulate=True)

    def bars(self, latent: int) -> tuple[list[float], list[int]]:
        """(bin midpoints, counts) of a latent, up to its highest nonempty bin."""
        counts = self.counts[latent]
        nonempty = counts.nonzero().flatten()
        n = int(nonempty[-1]) + 1 if len(nonempty) else 0
        width = 2.0 ** int(self.log_range[latent]) / N_BINS
        return [round((i + 0.5) * width, 5) for i in range(n)], counts[:n].tolist()


@dataclass
class Example:
    """A top activating token in context: token ids and the latent's activation on each."""

    token_ids: list[int]
    values: list[float]
    at: int
    """Index of the top token in the context."""


@dataclass
class ShardTokens:
    """A shard's tokens as read: activations and where each row sits in its sequence."""

    acts: Tensor
    token_ids: Tensor
    seq_ids: Tensor
    positions: Tensor
    first_row: int
    """Index of the shard's first token among all tokens scanned."""


def context_rows(shard: ShardTokens, rows: Tensor, before: int, after: int) -> list[Tensor]:
    """Per row of the shard: the rows of its sequence `before` positions before it to `after`
    after it, in position order."""
    span = int(shard.positions.max()) + after + 2
    keys = shard.seq_ids.long() * span + shard.positions.long()
    sorted_keys, order = keys.sort()
    back = shard.positions[rows].long().clamp(max=before)
    low = torch.searchsorted(sorted_keys, keys[rows] - back)
    high = torch.searchsorted(sorted_keys, keys[rows] + after, right=True)
    return [order[a:b] for a, b in zip(low.tolist(), high.tolist(), strict=True)]


def chunked(contexts: list[Tensor]) -> list[list[int]]:
    """The contexts' indices in groups of about CHUNK rows, to encode a group at once."""
    groups: list[list[int]] = [[]]
    size = 0
    for i, context in enumerate(contexts):
        if size >= CHUNK:
            groups.append([])
            size = 0
        groups[-1].append(i)
        size += len(context)
    return groups if groups[0] else []


@dataclass
class FeatureStats:
    """One SAE's dashboard data, added to shard by shard (`add_shard`)."""

    cfg: dict
    weights: dict[str, Tensor]
    top_k: int
    before: int
    after: int
    n_tokens: int = 0
    fire_counts: Tensor = field(init=False)
    histogram: Histogram = field(init=False)
    top: TopK = field(init=False)
    examples: dict[tuple[int, int], Example] = field(default_factory=dict)
    """(latent, row) of each running top token: its example."""

    def __post_init__(self):
        d_sae = self.cfg["d_sae"]
        self.fire_counts = torch.zeros(d_sae, dtype=torch.int64)
        self.histogram = Histogram(d_sae)
        self.top = TopK(self.top_k, d_sae)

    def encode(self, x: Tensor) -> Tensor:
        return exported_acts(self.cfg, self.weights, x.to(self.weights["W_enc"].dtype))

    @torch.no_grad()
    def add_shard(self, shard: ShardTokens) -> None:
        for c in range(0, len(shard.acts), CHUNK):
            codes = self.encode(shard.acts[c : c + CHUNK])
            self.fire_counts += (codes > 0).sum(0)
            self.histogram.add(codes)
            self.top.update(codes, shard.first_row + c)
        self.n_tokens += len(shard.acts)
        self.add_examples(shard)

    def add_examples(self, shard: ShardTokens) -> None:
        """The examples of the top tokens this shard brought in; those no longer on top
        dropped."""
        new = (self.top.rows >= shard.first_row) & (self.top.values > 0)
        ranks, latents = new.nonzero(as_tuple=True)
        rows, which = (self.top.rows[ranks, latents] - shard.first_row).unique(return_inverse=True)
        latents_of = latents[which.argsort()].split(which.bincount(minlength=len(rows)).tolist())
        contexts = context_rows(shard, rows, self.before, self.after)
        for group in chunked(contexts):
            codes = self.encode(shard.acts[torch.cat([contexts[i] for i in group])])
            for i, block in zip(group, codes.split([len(contexts[i]) for i in group]), strict=True):
                ids = shard.token_ids[contexts[i]].tolist()
                at = int((shard.positions[contexts[i]] < shard.positions[rows[i]]).sum())
                values = block[:, latents_of[i]].T.tolist()
                for latent, v in zip(latents_of[i].tolist(), values, strict=True):
                    self.examples[latent, int(rows[i]) + shard.first_row] = Example(ids, v, at)
        kept = {(lat, int(r)) for lat, r in zip(*self.top_entries(), strict=True)}
        self.examples = {key: e for key, e in self.examples.items() if key in kept}

    def top_entries(self) -> tuple[list[int], Tensor]:
        """(latent, row) of every running top token with a positive activation."""
        ranks, latents = (self.top.values > 0).nonzero(as_tuple=True)
        return latents.tolist(), self.top.rows[ranks, latents]

    def top_examples(self, latent: int) -> list[Example]:
        """The latent's examples, largest activation first."""
        values, rows = self.top.values[:, latent], self.top.rows[:, latent]
        return [self.examples[latent, int(r)] for v, r in zip(values, rows, strict=True) if v > 0]
