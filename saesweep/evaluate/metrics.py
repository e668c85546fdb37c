"""Evaluation on held-out activations: mse, centered FVU, L0, dead %, densities, decoder overlap.

All sums are accumulated in float64. FVU = sum ||x - x_hat||^2 / sum ||x - mean(x)||^2, with the
variance centered on the evaluation data's own mean.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from saesweep.data.hooksets import gather, parts
from saesweep.data.normalizer import Normalizer
from saesweep.sae import StackedSAE

DENSITY_BINS = torch.arange(-8.0, 0.5, 0.5)
"""log10 firing-frequency bin edges of the density histogram."""


@torch.no_grad()
def evaluate_stacks(
    stacks: list[tuple[StackedSAE, str, str]],
    batches: Iterable[dict[str, Tensor]],
    normalizer: Normalizer,
    n_val: int,
) -> list[list[dict]]:
    """Metrics of every member of every stack (sae, input hook, target hook: the input hook
    for an SAE) on up to n_val tokens of `batches` ({hook: raw activations}, every hook the
    same tokens; each hook scaled by `normalizer`), reading the evaluation data once for all
    of them. A transcoder's FVU and mse are against its target. A key of several hooks
    (data/hooksets.py) reads them side by side; its target's FVU is over all of them in raw
    units (the squared error over all of them over their variance, unscaled: the training
    loss weighs each hook by its input scale instead), and fvu_by_hook gives each target
    hook's own."""
    saes = [sae for sae, _, _ in stacks]
    modes = [sae.training for sae in saes]
    for sae in saes:
        sae.eval()
    hooks = sorted({h for _, _, target in stacks for h in parts(target)})
    sse = [torch.zeros(sae.n, len(parts(t)), dtype=torch.float64) for sae, _, t in stacks]
    l0s = [torch.zeros(sae.n, dtype=torch.float64) for sae in saes]
    counts = [torch.zeros(sae.n, sae.d_sae, dtype=torch.float64) for sae in saes]
    moments = {h: [torch.zeros((), dtype=torch.float64)] * 2 for h in hooks}
    tokens = 0
    for batch in batches:
        x = normalizer({h: acts[: n_val - tokens] for h, acts in batch.items()})
        for (sae, hook, target), acc, l0, count in zip(stacks, sse, l0s, counts, strict=True):
            recon, codes = sae(gather(x, hook).to(sae.W_enc.dtype))
            y = [x[h].double() for h in parts(target)]
            for p, r in enumerate(recon.double().split([len(t[0]) for t in y], dim=-1)):
                acc[:, p] += (r - y[p]).pow(2).sum((1, 2)).cpu()
            l0 += codes.l0().double().cpu() * len(y[0])
            count += codes.fire_counts().cpu()
        for h in hooks:
            y = x[h].double()
            moments[h] = [moments[h][0] + y.sum(0).cpu(), moments[h][1] + y.pow(2).sum(0).cpu()]
        tokens += len(next(iter(x.values())))
        if tokens >= n_val:
            break
    for sae, mode in zip(saes, modes, strict=True):
        sae.train(mode)
    total_var = {h: (sq - s.pow(2) / tokens).sum() for h, (s, sq) in moments.items()}
    results = []
    for (sae, _, target), acc, l0, count in zip(stacks, sse, l0s, counts, strict=True):
        overlap = decoder_overlap(sae)
        targets = TargetParts(parts(target), normalizer, total_var)
        results.append(
            [
                member_metrics(acc[i], l0[i], count[i], targets, tokens, sae.d_out, overlap[i])
                for i in range(sae.n)
            ]
        )
    return results


class TargetParts:
    """The hooks of a target (one, or a key's several) with their scales and variances."""

    def __init__(self, hooks: list[str], normalizer: Normalizer, total_var: dict[str, Tensor]):
        self.hooks = hooks
        self.scales = torch.tensor([normalizer.scales[h] for h in hooks], dtype=torch.float64)
        self.variances = torch.stack([total_var[h] for h in hooks])


def member_metrics(
    sse: Tensor,
    l0: Tensor,
    counts: Tensor,
    targets: TargetParts,
    tokens: int,
    d: int,
    overlap: float,
) -> dict:
    """One member's metrics from its squared error per target hook `sse` [hooks], its summed
    L0 and its latents' firing counts."""
    density = counts / tokens
    log_density = density[density > 0].log10()
    hist = (
        torch.histogram(log_density.float(), bins=DENSITY_BINS)[0]
        if len(log_density)
        else torch.zeros(len(DENSITY_BINS) - 1)
    )
    raw_sse, raw_variance = sse / targets.scales**2, targets.variances / targets.scales**2
    metrics = {
        "mse": float(raw_sse.sum() / (tokens * d)),
        "fvu": float(raw_sse.sum() / raw_variance.sum()),
        "l0": float(l0 / tokens),
        "dead_pct": float(100 * (counts == 0).double().mean()),
        "val_tokens": tokens,
        "density_hist": {"log10_edges": DENSITY_BINS.tolist(), "counts": hist.tolist()},
        "decoder_max_cos_mean": overlap,
    }
    if len(targets.hooks) > 1:
        by_hook = (sse / targets.variances).tolist()
        metrics["fvu_by_hook"] = dict(zip(targets.hooks, by_hook, strict=True))
    return metrics


@torch.no_grad()
def decoder_overlap(sae: StackedSAE, chunk: int = 4096) -> list[float]:
    """Per member: mean over latents of the largest |cosine| with any other decoder row."""
    out = []
    for i in range(sae.n):
        w = torch.nn.functional.normalize(sae.W_dec[i].float(), dim=-1)
        best = torch.empty(len(w))
        for start in range(0, len(w), chunk):
            cos = (w[start : start + chunk] @ w.T).abs()
            cos[torch.arange(len(cos)), torch.arange(start, start + len(cos))] = 0
            best[start : start + chunk] = cos.max(1).values
        out.append(float(best.mean()))
    return out
