"""Plain forward of an exported acausal crosscoder (a crosscoder run directory's weights,
acting on raw activations): the reference semantics of a crosscoder checkpoint, made by
saesweep.load for a run whose cfg.json architecture is 'crosscoder'."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from beartype import beartype
from jaxtyping import Float, jaxtyped
from torch import Tensor

from saesweep.sae.layered import exported_activation


@dataclass(frozen=True)
class ExportedCrosscoder:
    """A trained crosscoder: `xc.encode(xs)` gives the one dictionary's codes from every
    layer's activations xs [B, L, d_in] (cfg['hook_names'], in order), `xc.decode(codes)` every
    layer's reconstruction [B, L, d_in], `xc(xs)` both."""

    cfg: dict
    """The run's cfg.json: layers, activation, k, d_in (per layer), d_sae, hook_names."""
    weights: dict[str, Tensor]
    """W_enc [L, d_in, d_sae], b_enc [d_sae], W_dec [d_sae, L, d_in], b_dec [L, d_in],
    threshold [d_sae] (jumprelu, batchtopk)."""

    architecture = "crosscoder"

    @jaxtyped(typechecker=beartype)
    def encode(self, xs: Float[Tensor, "B L d_in"]) -> Float[Tensor, "B d_sae"]:
        """act(sum over layers l of xs[:, l] @ W_enc[l] + b_enc)."""
        w = self.weights
        pre = w["b_enc"] + sum(xs[:, i] @ w["W_enc"][i] for i in range(self.cfg["n_layers"]))
        return exported_activation(pre.relu(), self.cfg, w.get("threshold"))

    @jaxtyped(typechecker=beartype)
    def decode(self, codes: Float[Tensor, "B d_sae"]) -> Float[Tensor, "B L d_in"]:
        """codes @ W_dec[:, l] + b_dec[l] for every layer l."""
        w = self.weights
        layers = [codes @ w["W_dec"][:, i] + w["b_dec"][i] for i in range(self.cfg["n_layers"])]
        return torch.stack(layers, dim=1)

    def __call__(self, xs: Float[Tensor, "B L d_in"]) -> Float[Tensor, "B L d_in"]:
        return self.decode(self.encode(xs))
