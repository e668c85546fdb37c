"""Each latent's direct effect on the model's logits, as SAEDashboard's Neuronpedia export
shows it: its decoder row times the unembedding W_U (the LM head's weight, transposed, without
the final norm), the N_LOGITS most promoted and most suppressed tokens and a histogram of the
effect over the whole vocabulary (sae_dashboard's get_logits_table_data and
LogitsHistogramData at their default sizes)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from saesweep.collect.model import load_model, model_modules

N_LOGITS = 10
"""Top and bottom tokens kept per latent (SAEDashboard's LogitsTableConfig.n_rows)."""
N_LOGIT_BINS = 50
"""Bins of the logit histogram (SAEDashboard's LogitsHistogramConfig.n_bins)."""


@dataclass(frozen=True)
class LogitEffects:
    """One latent's Feature-row logit fields; empty where the model has no unembedding."""

    pos_str: list[str] = field(default_factory=list)
    pos_values: list[float] = field(default_factory=list)
    neg_str: list[str] = field(default_factory=list)
    neg_values: list[float] = field(default_factory=list)
    hist_heights: list[int] = field(default_factory=list)
    hist_values: list[float] = field(default_factory=list)


def unembedding(config: dict, override: str | None) -> Tensor | None:
    """W_U [d_model, d_vocab] (float32) of `override`, else of the model the collection's
    cfg.json names, loaded from local files as the collection ran it; None for a model without
    an LM head (an encoder such as the demo's MiniLM)."""
    name = override or config["model"]
    if model_modules(name, config.get("revision")).get_output_embeddings() is None:
        return None
    dtype = config.get("model_dtype", "float32")
    model, _ = load_model(name, config.get("revision"), dtype, "cpu", download=False)
    return model.get_output_embeddings().weight.detach().float().T.contiguous()


def histogram(logits: Tensor) -> tuple[list[int], list[float]]:
    """(heights, bin midpoints) of N_LOGIT_BINS equal bins from the smallest to the largest
    value, as SAEDashboard's HistogramData.from_data."""
    low, high = logits.min().item(), logits.max().item()
    edges = torch.linspace(low, high, N_LOGIT_BINS + 1)
    midpoints = edges[:-1] + (high - low) / N_LOGIT_BINS / 2
    heights = torch.histc(logits, bins=N_LOGIT_BINS).int().tolist()
    return heights, [round(v, 5) for v in midpoints.tolist()]


def logit_effects(
    w_dec: Tensor, w_u: Tensor | None, decode: Callable[[int], str]
) -> list[LogitEffects]:
    """The effects of the latents whose decoder rows are `w_dec` [n, d_out]; empty without
    an unembedding or when the rows are not d_model wide (a hook outside the residual
    stream's width)."""
    if w_u is None or w_dec.shape[1] != w_u.shape[0]:
        return [LogitEffects() for _ in range(len(w_dec))]
    logits = w_dec.float() @ w_u
    k = min(N_LOGITS, logits.shape[1])
    top, bottom = logits.topk(k, dim=1), logits.topk(k, dim=1, largest=False)
    effects = []
    for i, row in enumerate(logits):
        heights, values = histogram(row)
        effects.append(
            LogitEffects(
                pos_str=[decode(t) for t in top.indices[i].tolist()],
                pos_values=[round(v, 5) for v in top.values[i].tolist()],
                neg_str=[decode(t) for t in bottom.indices[i].tolist()],
                neg_values=[round(v, 5) for v in bottom.values[i].tolist()],
                hist_heights=heights,
                hist_values=values,
            )
        )
    return effects
