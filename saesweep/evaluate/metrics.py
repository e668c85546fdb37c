"""Evaluation on held-out activations: mse, centered FVU, L0, dead %, densities, decoder overlap.

All sums are accumulated in float64. FVU = sum ||x - x_hat||^2 / sum ||x - mean(x)||^2, with the
variance centered on the evaluation data's own mean.
"""

from __future__ import annotations

import torch

from saesweep.data.reader import Reader
from saesweep.sae import StackedSAE

DENSITY_BINS = torch.arange(-8.0, 0.5, 0.5)
"""log10 firing-frequency bin edges of the density histogram."""


@torch.no_grad()
def evaluate_stacks(
    saes: list[StackedSAE], reader: Reader, scale: float, n_val: int
) -> list[list[dict]]:
    """Metrics of every member of every stack on up to n_val tokens of `reader` (raw
    activations * scale), reading the evaluation data once for all of them."""
    modes = [sae.training for sae in saes]
    for sae in saes:
        sae.eval()
    d = saes[0].d_in
    sums = [{k: torch.zeros(sae.n, dtype=torch.float64) for k in ("sse", "l0")} for sae in saes]
    counts = [torch.zeros(sae.n, sae.d_sae, dtype=torch.float64) for sae in saes]
    x_sum, x_sq = torch.zeros(d, dtype=torch.float64), torch.zeros(d, dtype=torch.float64)
    tokens = 0
    for acts in reader:
        x = acts[: n_val - tokens] * scale
        x64 = x.double()
        for sae, acc, count in zip(saes, sums, counts, strict=True):
            recon, codes = sae(x.to(sae.W_enc.dtype))
            acc["sse"] += (recon.double() - x64).pow(2).sum((1, 2)).cpu()
            acc["l0"] += codes.l0().double().cpu() * len(x)
            count += codes.fire_counts().cpu()
        x_sum += x64.sum(0).cpu()
        x_sq += x64.pow(2).sum(0).cpu()
        tokens += len(x)
        if tokens >= n_val:
            break
    for sae, mode in zip(saes, modes, strict=True):
        sae.train(mode)
    total_var = (x_sq - x_sum.pow(2) / tokens).sum()
    results = []
    for sae, acc, count in zip(saes, sums, counts, strict=True):
        overlap = decoder_overlap(sae)
        results.append(
            [
                member_metrics(i, acc, count[i], total_var, tokens, d, scale, overlap[i])
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
