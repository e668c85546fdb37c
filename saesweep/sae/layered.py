"""What the layered architectures (a CLT, a crosscoder: several layers' hooks side by side,
layer-major, data/hooksets.py) share: their layers' check, each layer's FVU, scales per
layer, and the activation of their exported forward."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from saesweep.sae.base import StackedSAE, check, total_variance
from saesweep.sae.topk import keep_topk


def check_layers(layers: Sequence[int], arch: str) -> None:
    """Raise ValueError unless `layers` (sae.<arch>.layers) name layers, ascending, once."""
    check(len(layers) > 0, f"sae.{arch}.layers must name the layers of a {arch}, e.g. 1 2 3")
    check(list(layers) == sorted(set(layers)), f"sae.{arch}.layers must ascend without repeats")


@torch.no_grad()
def layer_fvu_terms(target: Tensor, recon: Tensor, layers: Sequence[int], zero: Tensor) -> dict:
    """penalties' entries fvu_layer_<layer> -> (zero, [n] that layer's squared error over its
    variance): logged with coefficient `zero`, not optimized. target and recon [n, B, L * d],
    layer-major."""
    y = target.unflatten(-1, (len(layers), -1))
    err = (recon.unflatten(-1, (len(layers), -1)) - y).pow(2).sum((1, 3))
    return {
        f"fvu_layer_{layer}": (zero, err[:, i] / total_variance(y[:, :, i]))
        for i, layer in enumerate(layers)
    }


def per_layer(scale: float | Sequence[float], n_layers: int) -> list[float]:
    """One scale per layer: a sequence as it is, a number for every layer."""
    return list(scale) if isinstance(scale, Sequence) else [float(scale)] * n_layers


def exported_activation(pre: Tensor, cfg: dict, threshold: Tensor | None) -> Tensor:
    """Codes from pre = relu(x @ W_enc + b_enc) of an exported layered dictionary whose
    cfg.json names its `activation`: pre itself (relu), its cfg['k'] largest per row (topk),
    or pre above `threshold` (jumprelu, batchtopk)."""
    if cfg["activation"] == "topk":
        return keep_topk(pre, cfg["k"])
    if cfg["activation"] in ("jumprelu", "batchtopk"):
        return pre * (pre > threshold)
    return pre


def layered_cfg(sae: StackedSAE) -> dict:
    """cfg.json's fields every layered architecture writes: architecture, activation (and k),
    layers, dtype (the architecture adds its widths, the trainer the hooks)."""
    return {
        "architecture": sae.sae_lens_architecture,
        "saesweep_arch": sae.arch,
        "activation": sae.activation,
        "layers": list(sae.layers),
        "n_layers": sae.n_layers,
        "dtype": str(sae.W_enc.dtype).removeprefix("torch."),
        "apply_b_dec_to_input": False,
        "normalize_activations": "none",
    } | ({"k": sae.k} if sae.activation in ("topk", "batchtopk") else {})
