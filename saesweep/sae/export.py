"""Plain single-SAE forward of an exported member (SAELens layout, raw activations).

The reference semantics of a checkpoint: evaluation code can run it without building a
stacked module, and tests check the stacked module's export against it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from beartype import beartype
from jaxtyping import Float, jaxtyped
from torch import Tensor

from saesweep.sae.base import sae_architecture
from saesweep.sae.registry import exported_forward


@jaxtyped(typechecker=beartype)
def apply_exported(
    cfg: dict, sd: dict[str, Tensor], x: Float[Tensor, "B d_in"]
) -> Float[Tensor, "B d_out"]:
    """Reconstruct x with one exported SAE, or predict the target from x with a transcoder
    (plus x @ W_skip.T for a skip transcoder); cfg is StackedSAE.sae_lens_cfg()."""
    out = exported_acts(cfg, sd, x) @ sd["W_dec"] + sd["b_dec"]
    return out + x @ sd["W_skip"].T if "W_skip" in sd else out


@jaxtyped(typechecker=beartype)
def exported_acts(
    cfg: dict, sd: dict[str, Tensor], x: Float[Tensor, "B d_in"]
) -> Float[Tensor, "B d_sae"]:
    """Dense latent activations of one exported SAE: the exported forward
    (StackedSAE.exported_acts) of the architecture registered for its SAELens architecture."""
    x_in = x - sd["b_dec"] if cfg["apply_b_dec_to_input"] else x
    pre = (x_in @ sd["W_enc"] + sd["b_enc"]).relu()
    return exported_forward(sae_architecture(cfg["architecture"]))(cfg, sd, x_in, pre)


@dataclass(frozen=True)
class ExportedSAE:
    """A trained SAE (or transcoder) as its run directory holds it, acting on raw
    activations: `sae(x)` reconstructs x (predicts the target), `sae.encode(x)` gives the dense
    latent activations [B, d_sae], `sae.decode(codes)` maps them back (a skip transcoder's
    x @ W_skip.T is added by `sae(x)` only). Made by `saesweep.load(run_dir)`."""

    cfg: dict
    """The run's cfg.json (SAELens fields: architecture, d_in, d_sae, k, hook_name, ...)."""
    weights: dict[str, Tensor]

    def encode(self, x: Float[Tensor, "B d_in"]) -> Float[Tensor, "B d_sae"]:
        return exported_acts(self.cfg, self.weights, x)

    def decode(self, codes: Float[Tensor, "B d_sae"]) -> Float[Tensor, "B d_out"]:
        return codes @ self.weights["W_dec"] + self.weights["b_dec"]

    def __call__(self, x: Float[Tensor, "B d_in"]) -> Float[Tensor, "B d_out"]:
        return apply_exported(self.cfg, self.weights, x)

    def to(self, device: str | torch.device) -> ExportedSAE:
        """The same SAE with its weights on `device`."""
        return ExportedSAE(self.cfg, {k: v.to(device) for k, v in self.weights.items()})
