"""Cross-layer transcoder (CLT; Ameisen et al. 2025): per layer l an encoder from the input
site at layer l, and from layer l's features a decoder to the target site at every layer
l' >= l.

A stack of CLTs is a transcoder whose input is the input site's layers side by side
(x [B, L * d_model], layer-major) and whose target is the target site's layers the same way;
the trainer gathers both from the group's hooks (data/hooksets.py). Its latents are the
layers' features side by side (d_sae = L * d_tc, d_tc = sae.d_sae or exp_factor * d_model
per layer), so codes, L0 (summed over layers), dead-latent counters and evaluation are the
base's. The loss's reconstruction term is the FVU over all layers: the squared error summed
over every target layer over the variance summed over every target layer (the base's FVU of
the concatenation); each layer's own FVU is logged as fvu_layer_<layer>.

Activations (sae.clt.activation): topk keeps the k largest pre-activations of every layer
separately (k per layer, so L0 = L * k: every layer's encoder gets the same budget, as
per-layer transcoders would, and no layer with large pre-activations starves the others);
batchtopk keeps, per layer, the k * B largest of that layer's pre-activations over the batch
(k per layer on average, for the same reason; sae/sparse.batch_topk_codes) and at inference
each layer's running threshold (the smallest activation the batch top-k kept, moved as the
BatchTopK SAE's: sae/batchtopk.moved_threshold), which the export writes as JumpReLU
thresholds;
relu penalizes sum f * ||W_dec row|| (the row over all its target layers) with
objective.sparsity_coeff; jumprelu learns a threshold per feature through JumpReLU's
straight-through estimator and penalizes the L0 with objective.sparsity_coeff. Decoder rows
are free (no unit norm). Each layer's codes decode through its own decoder block: a TopK
CLT's k entries per layer by sparse.sparse_decode where k is a small part of d_tc
(sparse.is_dense, the other architectures' rule), else, and for relu and jumprelu, the dense
[B, d_tc] codes by a batched matmul. TopK has no AuxK.

Parameters per member: W_enc [L, d_model, d_tc], b_enc [L * d_tc], W_dec_<i> [d_tc, L - i,
d_out] for source layer i (0-based among the CLT's layers), b_dec [L * d_out], and for
jumprelu threshold [L * d_tc] (batchtopk: the running thresholds, a buffer [L]). The
export (member_state_dict) is circuit-tracer's layout per source layer: W_enc_<i>
[d_model, d_tc], b_enc_<i>, W_dec_<i> [d_tc, L - i, d_out], b_dec_<i> [d_out],
threshold_<i>; docs/storage-format.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from saesweep.configtools import PLAIN_NAME
from saesweep.sae.base import LossResult, StackedSAE, check, squared_error
from saesweep.sae.batchtopk import moved_threshold
from saesweep.sae.codes import Codes, DenseCodes, SparseCodes
from saesweep.sae.jumprelu import JumpReLUFn
from saesweep.sae.layered import check_layers, layer_fvu_terms, layered_cfg, per_layer
from saesweep.sae.registry import register
from saesweep.sae.sparse import (
    AUXK_PATH,
    Path,
    batch_topk_codes,
    dead_latent_codes,
    is_dense,
    with_encoder_grad,
)

if TYPE_CHECKING:
    from saesweep.sae.config import SAEConfig

K_ACTIVATIONS = ("topk", "batchtopk")
"""The activations that keep k (sae.k) features per layer."""


@dataclass(frozen=True)
class CLTConfig:
    """The cross-layer transcoder's options: `sae.clt.*` (with sae.arch clt)."""

    layers: tuple[int, ...] = ()
    """The model layers it spans, ascending, e.g. 1 2 3: it reads <input_site>.<layer> and
    predicts <target_site>.<layer> of each."""
    input_site: str = field(default="resid", metadata=PLAIN_NAME)
    """The hook site its encoders read at every layer (a short form's site: resid, mlp, attn,
    ...)."""
    target_site: str = field(default="mlp", metadata=PLAIN_NAME)
    """The hook site its decoders write at every layer."""
    activation: Literal["topk", "batchtopk", "relu", "jumprelu"] = "topk"
    """topk: the k (sae.k) largest pre-activations of each layer; batchtopk: the k * batch
    size largest of each layer over the batch, a running threshold per layer at inference
    (sae.batchtopk.threshold_momentum); relu: ReLU with the L1
    penalty weighted by decoder norms (objective.sparsity_coeff); jumprelu: learned thresholds
    with the L0 penalty (objective.sparsity_coeff; sae.jumprelu's bandwidth and
    init_threshold)."""

    def hook_specs(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(input hooks, target hooks) as short forms, one per layer."""
        inputs = tuple(f"{self.input_site}.{layer}" for layer in self.layers)
        return inputs, tuple(f"{self.target_site}.{layer}" for layer in self.layers)


@register
class CrossLayerTranscoder(StackedSAE):
    """n CLTs over the same layers; x and target are the layers' activations side by side."""

    arch = "clt"
    sae_lens_architecture = "clt"
    subtract_b_dec = False
    default_decoder_norm = "free"
    default_b_dec_init = "mean"
    layered = True
    reads_sections = ("jumprelu",)
    fvu_objective = True

    @classmethod
    def hook_specs(cls, cfg: SAEConfig) -> tuple[tuple[str, ...], tuple[str, ...]]:
        return cfg.clt.hook_specs()

    @classmethod
    def check_shape(cls, cfg: SAEConfig, d_in: int) -> None:
        clt = cfg.clt
        check_layers(clt.layers, "clt")
        check(clt.input_site != clt.target_site, "sae.clt.input_site must differ from target_site")
        check(cfg.decoder_norm != "unit", "sae.decoder_norm unit is not supported by clt")
        check(not cfg.skip, "sae.skip is not supported by clt")
        d_tc = cfg.width(d_in)
        k_fits = clt.activation not in K_ACTIVATIONS or cfg.k <= d_tc
        check(k_fits, f"k={cfg.k} must be <= d_sae={d_tc}")

    @classmethod
    def sizes(cls, cfg: SAEConfig, d_in: int) -> tuple[int, int, int]:
        """Per layer an encoder and bias, per pair of layers l <= l' a decoder block (the
        decoder grows with L (L + 1) / 2); the target taken as wide as the input."""
        L, d_tc = len(cfg.clt.layers), cfg.width(d_in)
        params = L * (d_in * d_tc + d_tc + d_in) + L * (L + 1) // 2 * d_tc * d_in
        return params, L * d_tc, 2 * L * d_in

    def _set_shape(self) -> None:
        """Per layer: d_model, d_tc and the target's width; the base's d_in, d_out and d_sae
        become the concatenations' widths."""
        check(self.transcoder, "a clt predicts its target site (d_out)")
        self.layers, self.n_layers = self.cfg.clt.layers, len(self.cfg.clt.layers)
        self.activation, self.k = self.cfg.clt.activation, self.cfg.k
        self.d_model, self.d_tc, self.d_target = self.d_in, self.d_sae, self.d_out
        self.aux_k = self.cfg.resolved_aux_k(self.d_model)  # per layer
        self.d_in, self.d_out = self.n_layers * self.d_model, self.n_layers * self.d_target
        self.d_sae = self.n_layers * self.d_tc

    def register_member_buffers(self) -> None:
        """Also, for batchtopk, each layer's running inference threshold [n, L] (-1 until the
        first estimate)."""
        super().register_member_buffers()
        if self.activation == "batchtopk":
            self.register_buffer("threshold", torch.full((self.n, self.n_layers), -1.0))

    @property
    def k_layers(self) -> int:
        """Each layer keeps its own k: a token has one k-budget per layer."""
        return self.n_layers

    def init_member(self, gen: torch.Generator, cfg: SAEConfig) -> dict[str, Tensor]:
        """Each decoder row (a feature's writes to all its target layers) of norm
        init_dec_norm, each encoder column of that norm times init_encoder_scale."""
        norm = self.init_dec_norm(cfg)
        scale = cfg.init_encoder_scale or self.default_init_encoder_scale
        L, d, t = self.n_layers, self.d_model, self.d_tc
        W_enc = torch.randn(L, d, t, generator=gen)
        member = {"W_enc": W_enc / W_enc.norm(dim=1, keepdim=True) * (norm * scale)}
        member["b_enc"] = torch.zeros(L * t)
        for i in range(L):
            W = torch.randn(t, L - i, self.d_target, generator=gen)
            member[f"W_dec_{i}"] = W / W.flatten(1).norm(dim=1).view(-1, 1, 1) * norm
        member["b_dec"] = torch.zeros(L * self.d_target)
        if self.activation == "jumprelu":
            member["threshold"] = torch.full((L * t,), cfg.jumprelu.init_threshold)
        return member

    def init_dec_norm(self, cfg: SAEConfig) -> float:
        return cfg.relu.init_norm if self.activation == "relu" else 1.0

    # ----- forward --------------------------------------------------------------------------

    def decoders(self) -> list[Tensor]:
        """W_dec_<i> [n, d_tc, L - i, d_out] of every source layer i."""
        return [getattr(self, f"W_dec_{i}") for i in range(self.n_layers)]

    def pre_activations(self, x: Tensor) -> Tensor:
        """[n, B, L, d_tc] each layer's x_l @ W_enc[l] + b_enc[l]."""
        xs = self.per_member(x).unflatten(-1, (self.n_layers, self.d_model))
        pre = torch.matmul(xs.transpose(1, 2), self.W_enc).transpose(1, 2)
        return pre + self.b_enc.view(self.n, 1, self.n_layers, self.d_tc)

    def encode(self, x: Tensor) -> Codes:
        if self.activation == "topk":
            return self.topk_codes(x)
        pre = self.pre_activations(x)
        if self.activation == "relu":
            return DenseCLTCodes(pre.relu().flatten(2), n_layers=self.n_layers)
        if self.activation == "batchtopk":
            kept = pre.relu()
            acts = self.batch_topk(kept).flatten(2)
            return DenseCLTCodes(acts, pre=kept.detach().flatten(2), n_layers=self.n_layers)
        threshold = self.threshold.view(self.n, 1, self.n_layers, self.d_tc)
        acts, token_l0 = JumpReLUFn.apply(pre, threshold, self.cfg.jumprelu.bandwidth)
        return JumpReLUCLTCodes(acts.flatten(2), n_layers=self.n_layers, token_l0=token_l0.sum(-1))

    def topk_codes(self, x: Tensor) -> SparseCLTCodes | DenseCLTCodes:
        """Each layer's k largest ReLU pre-activations. The pre-activations are computed
        without autograd and the encoder's gradient reaches the selected entries only
        (sparse.with_encoder_grad, each layer's encoder a member of its own there)."""
        with torch.no_grad():
            pre = self.pre_activations(x).relu_()
            values, indices = pre.topk(self.k, dim=-1, sorted=False)
        values, d_tc = self.with_layer_encoder_grad(x, values, indices), self.d_tc
        if not is_dense(self.k, d_tc):
            return SparseCLTCodes.of_layers(values, indices, d_tc, pre=pre)
        acts = values.new_zeros(*indices.shape[:-1], d_tc).scatter(-1, indices, values)
        return DenseCLTCodes(acts.flatten(2), pre=pre.flatten(2), n_layers=self.n_layers)

    def with_layer_encoder_grad(
        self, x: Tensor, values: Tensor, indices: Tensor, path: Path | None = None
    ) -> Tensor:
        """[n, B, L, k] `values` (pre-activations at `indices`, each layer's, computed without
        autograd) made differentiable in the encoders through those entries only (`path`: as
        for sparse.with_encoder_grad)."""
        n, L = self.n, self.n_layers
        xs = self.per_member(x).unflatten(-1, (L, self.d_model)).transpose(1, 2).flatten(0, 1)
        values = with_encoder_grad(
            values.transpose(1, 2).flatten(0, 1),  # [n * L, B, k]
            indices.transpose(1, 2).flatten(0, 1),
            xs,
            self.W_enc.flatten(0, 1),
            self.b_enc.view(n * L, self.d_tc),
            path=path,
        )
        return values.unflatten(0, (n, L)).transpose(1, 2)

    def batch_topk(self, pre: Tensor) -> Tensor:
        """[n, B, L, d_tc] of the ReLU'd pre-activations `pre`, training: each layer's k * B
        largest over the batch; inference: those above the layer's running threshold."""
        if not self.training:
            return pre * (pre > self.threshold.clamp_min(0).view(self.n, 1, self.n_layers, 1))
        layers = pre.transpose(1, 2).flatten(0, 1)  # [n * L, B, d_tc]
        values, indices = batch_topk_codes(layers, self.k)
        acts = torch.zeros_like(layers).scatter(-1, indices, values)
        return acts.unflatten(0, (self.n, self.n_layers)).transpose(1, 2)

    def threshold_sample(self, codes: Codes) -> Tensor | None:
        """batchtopk, training: [n, L] each layer's smallest activation the batch top-k kept."""
        if self.activation != "batchtopk" or not self.training:
            return None
        acts = codes.acts.detach().unflatten(-1, (self.n_layers, self.d_tc))
        kept = acts.where(acts > 0, torch.inf).amin(dim=(1, 3))
        return kept.to(self.threshold.dtype)

    def decode(self, codes: DenseCLTCodes | SparseCLTCodes) -> Tensor:
        """[n, B, L * d_out]: target layer l' gets sum over l <= l' of layer l's codes @
        W_dec_l[:, l' - l], plus b_dec."""
        out = self.b_dec.view(self.n, 1, -1)
        for i, W in enumerate(self.decoders()):
            part = codes.layer(i).decode(W.flatten(2))
            out = out + F.pad(part, (i * self.d_target, 0))
        return out

    @property
    def W_dec(self) -> Tensor:
        """[n, L * d_tc, L * d_out] the whole decoder, zero where a feature does not write
        (target layers before its own): decoder_overlap compares these rows."""
        rows = [F.pad(W.flatten(2), (i * self.d_target, 0)) for i, W in enumerate(self.decoders())]
        return torch.cat(rows, dim=1)

    # ----- objective ------------------------------------------------------------------------

    def penalties(
        self, x: Tensor, target: Tensor, recon: Tensor, codes: Codes, step: int, variance: Tensor
    ) -> dict:
        """The sparsity penalty (relu, jumprelu), and each layer's FVU with coefficient 0
        (logged, not optimized)."""
        terms = {}
        if self.activation == "relu":
            norms = torch.cat([W.flatten(2).norm(dim=-1) for W in self.decoders()], dim=1)
            value = (codes.acts * norms.unsqueeze(1)).sum(-1).mean(-1)
            terms["sparsity_loss"] = (self.sparsity_at(step), value)
        elif self.activation == "jumprelu":
            terms["sparsity_loss"] = (self.sparsity_at(step), codes.token_l0.mean(-1))
        else:
            terms["aux_loss"] = (self.aux_coeff, self.auxk_loss(x, target, recon, codes, variance))
        zero = torch.zeros_like(self.sparsity_coeff)
        return terms | layer_fvu_terms(self.per_member(target), recon, self.layers, zero)

    def auxk_loss(
        self, x: Tensor, target: Tensor, recon: Tensor, codes: Codes, variance: Tensor
    ) -> Tensor:
        """[n] AuxK (TopK, BatchTopK), TopK SAEs' loss per layer: each layer's top aux_k dead
        latents by pre-activation reconstruct the residual target - recon through their
        decoder blocks (every later target layer), over the target's total variance, scaled
        by min(n_dead / (L * aux_k), 1). Zero when no member has dead latents."""
        dead = self.dead_mask()
        if not bool(dead.any()):
            return recon.new_zeros(self.n)
        n, L, d_tc = self.n, self.n_layers, self.d_tc
        residual = (self.per_member(target) - recon).detach()
        pre = codes.pre.view(n, -1, L, d_tc)
        values, indices = dead_latent_codes(pre, dead.view(n, L, d_tc), self.aux_k)
        values = self.with_layer_encoder_grad(x, values, indices, AUXK_PATH)
        aux = SparseCLTCodes.of_layers(values, indices, d_tc, path=AUXK_PATH)
        aux_recon = self.decode(aux) - self.b_dec.view(n, 1, -1)
        scale = (dead.sum(-1).to(recon.dtype) / (L * self.aux_k)).clamp(max=1.0)
        return scale * squared_error(aux_recon, residual) / variance

    @torch.no_grad()
    def after_optimizer_step(self, result: LossResult, update_mask: Tensor | None = None) -> None:
        """The base's step, then JumpReLU's thresholds projected onto >= 0."""
        super().after_optimizer_step(result, update_mask)
        if self.activation == "jumprelu":
            self.threshold.clamp_(min=0.0)

    def update_running_stats(self, result: LossResult, mask: Tensor) -> None:
        """Also, for batchtopk, move each layer's threshold toward its sample."""
        super().update_running_stats(result, mask)
        if result.threshold_sample is not None:
            mom = self.cfg.batchtopk.threshold_momentum
            sample, member = result.threshold_sample, mask.view(-1, 1)
            self.threshold.copy_(moved_threshold(self.threshold, sample, member, mom))

    # ----- export ---------------------------------------------------------------------------

    @torch.no_grad()
    def member_state_dict(
        self,
        i: int,
        input_scale: float | Sequence[float] = 1.0,
        target_scale: float | Sequence[float] | None = None,
    ) -> dict[str, Tensor]:
        """Member i in circuit-tracer's layout per source layer, acting on raw activations:
        each layer's input scale folded into its encoder, each target layer's scale into the
        decoder blocks writing it and its b_dec."""
        L = self.n_layers
        s = per_layer(input_scale, L)
        t = per_layer(input_scale if target_scale is None else target_scale, L)
        t_inv = 1 / torch.tensor(t, dtype=self.b_dec.dtype, device=self.b_dec.device)
        b_enc = self.b_enc[i].view(L, self.d_tc)
        b_dec = self.b_dec[i].view(L, self.d_target)
        sd = {}
        for j, W in enumerate(self.decoders()):
            sd[f"W_enc_{j}"] = self.W_enc[i, j] * s[j]
            sd[f"b_enc_{j}"] = b_enc[j]
            sd[f"W_dec_{j}"] = W[i] * t_inv[j:].view(1, -1, 1)
            sd[f"b_dec_{j}"] = b_dec[j] * t_inv[j]
            if self.activation == "jumprelu":
                sd[f"threshold_{j}"] = self.threshold[i].view(L, self.d_tc)[j]
            elif self.activation == "batchtopk":
                sd[f"threshold_{j}"] = self.threshold[i, j].clamp_min(0).expand(self.d_tc)
        return {k: v.detach().clone().contiguous() for k, v in sd.items()}

    def sae_lens_cfg(self) -> dict:
        """cfg.json's fields of a CLT: its shape per layer, activation and layers (the
        trainer adds the hooks)."""
        widths = {"d_in": self.d_model, "d_out": self.d_target, "d_sae": self.d_tc}
        return layered_cfg(self) | widths


@dataclass(frozen=True)
class DenseCLTCodes(DenseCodes):
    """A CLT's dense codes [n, B, L * d_tc], its layers' features side by side."""

    n_layers: int = 1

    def layer(self, i: int) -> DenseCodes:
        """Layer i's codes [n, B, d_tc]."""
        return DenseCodes(self.acts.unflatten(-1, (self.n_layers, -1))[:, :, i])


@dataclass(frozen=True)
class SparseCLTCodes(SparseCodes):
    """A TopK CLT's sparse codes: k entries per layer, layer-major ([n, B, L * k], indices
    into the L * d_tc latents), so counts, L0 and dead latents are SparseCodes'."""

    n_layers: int = 1

    @classmethod
    def of_layers(
        cls,
        values: Tensor,
        indices: Tensor,
        d_tc: int,
        pre: Tensor | None = None,
        path: Path | None = None,
    ) -> SparseCLTCodes:
        """From each layer's entries, values and indices [n, B, L, k] into that layer's d_tc
        (`pre`: the pre-activations [n, B, L, d_tc] after the ReLU, for AuxK; `path`: the
        backward's, as SparseCodes')."""
        L = values.shape[2]
        offsets = torch.arange(L, device=indices.device).view(1, 1, L, 1) * d_tc
        flat = (indices + offsets).flatten(2)
        pre = None if pre is None else pre.flatten(2)
        return cls(values.flatten(2), flat, L * d_tc, pre=pre, path=path, n_layers=L)

    def layer(self, i: int) -> SparseCodes:
        """Layer i's k entries, indices into its d_tc latents."""
        k, d_tc = self.values.shape[-1] // self.n_layers, self.d_sae // self.n_layers
        cols = slice(i * k, (i + 1) * k)
        indices = self.indices[..., cols] - i * d_tc
        return SparseCodes(self.values[..., cols], indices, d_tc, path=self.path)


@dataclass(frozen=True)
class JumpReLUCLTCodes(DenseCLTCodes):
    """A JumpReLU CLT's codes with each token's L0 over all layers."""

    token_l0: Tensor | None = None
    """[n, B] each token's L0, differentiable in the thresholds (JumpReLUFn)."""
