"""Evaluation on held-out activations: mse, centered FVU, L0, dead %, densities, decoder overlap.

All sums are accumulated in float64. FVU = sum ||x - x_hat||^2 / sum ||x - mean(x)||^2, with the
variance centered on the evaluation data's own mean.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

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
    of them. A transcoder's FVU and mse are against its target."""
    saes = [sae for sae, _, _ in stacks]
    modes = [sae.training for sae in saes]
    for sae in saes:
        sae.eval()
    targets = sorted({target for _, _, target in stacks})
    sums = [{k: torch.zeros(sae.n, dtype=torch.float64) for k in ("sse", "l0")} for sae in saes]
    counts = [torch.zeros(sae.n, sae.d_sae, dtype=torch.float64) for sae in saes]
    moments = {t: [torch.zeros((), dtype=torch.float64)] * 2 for t in targets}
    tokens = 0
    for batch in batches:
        x = normalizer({h: acts[: n_val - tokens] for h, acts in batch.items()})
        for (sae, hook, target), acc, count in zip(stacks, sums, counts, strict=True):
            recon, codes = sae(x[hook].to(sae.W_enc.dtype))
            acc["sse"] += (recon.double() - x[target].double()).pow(2).sum((1, 2)).cpu()
            acc["l0"] += codes.l0().double().cpu() * len(x[hook])
            count += codes.fire_counts().cpu()
        for t in targets:
            y = x[t].double()
            moments[t] = [moments[t][0] + y.sum(0).cpu(), moments[t][1] + y.pow(2).sum(0).cpu()]
        tokens += len(next(iter(x.values())))
        if tokens >= n_val:
            break
    for sae, mode in zip(saes, modes, strict=True):
        sae.train(mode)
    total_var = {t: (sq - s.pow(2) / tokens).sum() for t, (s, sq) in moments.items()}
    results = []
    for (sae, _, target), acc, count in zip(stacks, sums, counts, strict=True):
        overlap = decoder_overlap(sae)
        results.append(
            [
                member_metrics(
                    i,
                    acc,
                    count[i],
                    total_var[target],
                    tokens,
                    sae.d_out,
                    normalizer.scales[target],
                    overlap[i],
                )
                for i in range(sae.n)
            ]
        )
    return results


def member_metrics(
    i: int,
    sums: dict,
    counts: torch.Tensor,
    total_var: torch.Tensor,
    tokens: int,
    d: int,
    scale: float,
    overlap: float,
) -> dict:
    density = counts / tokens
    log_density = density[density > 0].log10()
    hist = (
        torch.histogram(log_density.float(), bins=DENSITY_BINS)[0]
        if len(log_density)
        else torch.zeros(len(DENSITY_BINS) - 1)
    )
    return {
        "mse": float(sums["sse"][i] / (tokens * d)) / scale**2,
        "fvu": float(sums["sse"][i] / total_var),
        "l0": float(sums["l0"][i] / tokens),
        "dead_pct": float(100 * (counts == 0).double().mean()),
        "val_tokens": tokens,
        "density_hist": {"log10_edges": DENSITY_BINS.tolist(), "counts": hist.tolist()},
        "decoder_max_cos_mean": overlap,
    }


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
