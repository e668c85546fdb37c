"""Plain forward of an exported cross-layer transcoder (a CLT run directory's weights, in
circuit-tracer's layout per source layer, acting on raw activations): the reference semantics
of a CLT checkpoint, made by saesweep.load for a run whose cfg.json architecture is 'clt'."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from beartype import beartype
from jaxtyping import Float, jaxtyped
from torch import Tensor

from saesweep.sae.layered import exported_activation


@dataclass(frozen=True)
class ExportedCLT:
    """A trained CLT: `clt.encode(xs)` gives each layer's features from the input site's
    activations xs [B, L, d_in] (cfg['hook_names'], in order), `clt.decode(codes)` the
    target site's [B, L, d_out] (cfg['hook_names_out']), `clt(xs)` both."""

    cfg: dict
    """The run's cfg.json: layers, activation, k, d_in, d_sae (per layer), d_out, hooks."""
    weights: dict[str, Tensor]
    """W_enc_<i> [d_in, d_sae], b_enc_<i>, W_dec_<i> [d_sae, L - i, d_out], b_dec_<i>
    [d_out], threshold_<i> (jumprelu, batchtopk) per source layer i."""

    architecture = "clt"

    @jaxtyped(typechecker=beartype)
    def encode(self, xs: Float[Tensor, "B L d_in"]) -> Float[Tensor, "B L d_sae"]:
        w, codes = self.weights, []
        for i in range(self.cfg["n_layers"]):
            pre = (xs[:, i] @ w[f"W_enc_{i}"] + w[f"b_enc_{i}"]).relu()
            codes.append(exported_activation(pre, self.cfg, w.get(f"threshold_{i}")))
        return torch.stack(codes, dim=1)

    @jaxtyped(typechecker=beartype)
    def decode(self, codes: Float[Tensor, "B L d_sae"]) -> Float[Tensor, "B L d_out"]:
        w, n_layers = self.weights, self.cfg["n_layers"]
        out = []
        for j in range(n_layers):
            layer = w[f"b_dec_{j}"].expand(len(codes), -1)
            for i in range(j + 1):
                layer = layer + codes[:, i] @ w[f"W_dec_{i}"][:, j - i]
            out.append(layer)
        return torch.stack(out, dim=1)

    def __call__(self, xs: Float[Tensor, "B L d_in"]) -> Float[Tensor, "B L d_out"]:
        return self.decode(self.encode(xs))
