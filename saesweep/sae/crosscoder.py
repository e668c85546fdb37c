"""Acausal crosscoder across layers (Lindsey et al. 2024): one dictionary whose encoder reads
the site at every chosen layer and whose decoder writes every one,
f = act(sum_l x_l @ W_enc_l + b_enc), x_hat_l = f @ W_dec_l + b_dec_l.

A stack of crosscoders is an SAE of the layers' activations side by side (x [B, L * d_model],
layer-major; the trainer gathers them from the group's hooks, data/hooksets.py): W_enc [L *
d_model, d_sae] is the layers' encoders stacked, W_dec [d_sae, L * d_model] their decoders
side by side, so the sum over layers is one matmul and every activation's mechanism (TopK's
sparse encoder backward, sparse decode and AuxK; JumpReLU's thresholds and sparse path;
ReLU) is its single-hook architecture's own. The encoder reads x itself (no b_dec subtracted).

The loss's reconstruction term is the FVU over all layers: the squared error summed over every
layer over the variance summed over every layer (the base's FVU of the concatenation); each
layer's own FVU is logged as fvu_layer_<layer>. ReLU's L1 weighs each latent by the sum over
layers of its decoder norms, sum_l |W_dec_l[i]| (Anthropic's crosscoder note). Decoder norms:
free for relu, else each latent's whole row (all layers) kept at unit norm, as sae.decoder_norm
says for the single-hook architectures.

sae.arch crosscoder builds the class of its activation (sae.crosscoder.activation): TopK-,
ReLU- or JumpReLUCrosscoder, each the crosscoder in front of that architecture's class.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

from saesweep.configtools import PLAIN_NAME
from saesweep.sae.base import StackedSAE, check
from saesweep.sae.batchtopk import BatchTopKSAE
from saesweep.sae.codes import Codes
from saesweep.sae.jumprelu import JumpReLUSAE
from saesweep.sae.layered import check_layers, layer_fvu_terms, layered_cfg, per_layer
from saesweep.sae.registry import register
from saesweep.sae.relu import ReLUSAE
from saesweep.sae.topk import TopKSAE

if TYPE_CHECKING:
    from saesweep.sae.config import SAEConfig


@dataclass(frozen=True)
class CrosscoderConfig:
    """The acausal crosscoder's options: `sae.crosscoder.*` (with sae.arch crosscoder)."""

    layers: tuple[int, ...] = ()
    """The model layers it reads and writes, ascending, e.g. 1 2 3: <site>.<layer> of each."""
    site: str = field(default="resid", metadata=PLAIN_NAME)
    """The hook site it reads and reconstructs at every layer (a short form's site: resid,
    mlp, attn, ...)."""
    activation: Literal["topk", "batchtopk", "relu", "jumprelu"] = "topk"
    """topk: the k (sae.k) largest pre-activations of the one dictionary; batchtopk: the
    k * batch largest of the batch in training, a running threshold in inference
    (sae.batchtopk's options); relu: ReLU with the
    L1 penalty weighted by the sum over layers of decoder norms (objective.sparsity_coeff);
    jumprelu: learned thresholds with the L0 penalty (objective.sparsity_coeff,
    objective.target_l0; sae.jumprelu's bandwidth and init_threshold)."""

    def hook_specs(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(input hooks, target hooks) as short forms, one per layer: the same hooks."""
        hooks = tuple(f"{self.site}.{layer}" for layer in self.layers)
        return hooks, hooks


@register
class Crosscoder(StackedSAE):
    """n crosscoders over the same layers; x is the layers' activations side by side.
    Constructing it builds the class of the members' activation (ACTIVATIONS)."""

    arch = "crosscoder"
    sae_lens_architecture = "crosscoder"
    subtract_b_dec = False
    layered = True
    reads_sections = ("jumprelu",)
    fvu_objective = True

    def __new__(cls, cfgs: Sequence[SAEConfig], *args, **kwargs):
        return super().__new__(activation_class(cfgs[0]) if cls is Crosscoder else cls)

    @classmethod
    def hook_specs(cls, cfg: SAEConfig) -> tuple[tuple[str, ...], tuple[str, ...]]:
        return cfg.crosscoder.hook_specs()

    @classmethod
    def check_shape(cls, cfg: SAEConfig, d_in: int) -> None:
        """The layers, then the activation's architecture's own checks (k) on d_in, the
        width of one layer."""
        check_layers(cfg.crosscoder.layers, "crosscoder")
        check(not cfg.skip, "sae.skip is not supported by crosscoder")
        super(Crosscoder, activation_class(cfg)).check_shape(cfg, d_in)

    @classmethod
    def sizes(cls, cfg: SAEConfig, d_in: int) -> tuple[int, int, int]:
        """An encoder and a decoder of L x d_in by d_sae: the dictionary of d_sae latents over
        the layers side by side."""
        width, d_sae = len(cfg.crosscoder.layers) * d_in, cfg.width(d_in)
        return 2 * width * d_sae + d_sae + width, d_sae, width

    def _set_shape(self) -> None:
        """The activation's shape (k, AuxK's width from one layer's d_model), then d_in and
        d_out become the layers' side by side; d_sae stays the one dictionary's width."""
        check(not self.transcoder, "a crosscoder reconstructs its own layers (no d_out)")
        super()._set_shape()
        self.layers, self.n_layers = self.cfg.crosscoder.layers, len(self.cfg.crosscoder.layers)
        self.activation, self.d_model = self.cfg.crosscoder.activation, self.d_in
        self.d_in = self.d_out = self.n_layers * self.d_model

    def layer_decoders(self) -> Tensor:
        """[n, d_sae, L, d_model] W_dec_l of every layer l."""
        return self.W_dec.unflatten(-1, (self.n_layers, self.d_model))

    def penalties(
        self, x: Tensor, target: Tensor, recon: Tensor, codes: Codes, step: int, variance: Tensor
    ) -> dict:
        """The activation's penalties, and each layer's FVU with coefficient 0 (logged, not
        optimized)."""
        terms = super().penalties(x, target, recon, codes, step, variance)
        zero = torch.zeros_like(self.sparsity_coeff)
        return terms | layer_fvu_terms(self.per_member(target), recon, self.layers, zero)

    # ----- export ---------------------------------------------------------------------------

    @torch.no_grad()
    def member_state_dict(
        self,
        i: int,
        input_scale: float | Sequence[float] = 1.0,
        target_scale: float | Sequence[float] | None = None,
    ) -> dict[str, Tensor]:
        """Member i acting on raw activations, per layer: W_enc [L, d_model, d_sae] (each
        layer's input scale folded in), b_enc [d_sae], W_dec [d_sae, L, d_model] and b_dec [L,
        d_model] (each layer's scale divided out), and the activation's own (threshold)."""
        L, d = self.n_layers, self.d_model
        scales = per_layer(input_scale, L)
        s = torch.tensor(scales, dtype=self.W_enc.dtype, device=self.W_enc.device)
        sd = {
            "W_enc": self.W_enc[i].view(L, d, -1) * s.view(L, 1, 1),
            "b_enc": self.b_enc[i],
            "W_dec": self.W_dec[i].view(-1, L, d) / s.view(1, L, 1),
            "b_dec": self.b_dec[i].view(L, d) / s.view(L, 1),
        }
        sd |= self._export_extra(i, 1.0)
        return {k: v.detach().clone().contiguous() for k, v in sd.items()}

    def sae_lens_cfg(self) -> dict:
        """cfg.json's fields of a crosscoder: its widths (d_in per layer), activation and
        layers (the trainer adds the hooks)."""
        return layered_cfg(self) | {"d_in": self.d_model, "d_sae": self.d_sae}


class TopKCrosscoder(Crosscoder, TopKSAE):
    """A crosscoder keeping the k largest pre-activations of its one dictionary (TopK's
    sparse encoder backward and decode, AuxK)."""


class BatchTopKCrosscoder(Crosscoder, BatchTopKSAE):
    """A crosscoder keeping the k * B largest pre-activations of the batch (BatchTopK's
    running inference threshold)."""


class ReLUCrosscoder(Crosscoder, ReLUSAE):
    """A ReLU crosscoder: L1 weighted by the sum over layers of decoder norms."""

    def decoder_norms(self) -> Tensor:
        """[n, d_sae] sum over layers l of |W_dec_l[i]|."""
        return self.layer_decoders().norm(dim=-1).sum(-1)


class JumpReLUCrosscoder(Crosscoder, JumpReLUSAE):
    """A JumpReLU crosscoder: a learned threshold per latent, the L0 penalty."""


ACTIVATIONS: dict[str, type[Crosscoder]] = {
    "topk": TopKCrosscoder,
    "batchtopk": BatchTopKCrosscoder,
    "relu": ReLUCrosscoder,
    "jumprelu": JumpReLUCrosscoder,
}
"""sae.crosscoder.activation -> the crosscoder class of that activation."""


def activation_class(cfg: SAEConfig) -> type[Crosscoder]:
    """The crosscoder class of `cfg`'s activation."""
    return ACTIVATIONS[cfg.crosscoder.activation]
