"""Configuration of one SAE (architecture, width) and of its training objective."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from saesweep.configtools import above, at_least, fraction

Arch = Literal["topk", "batchtopk", "switch", "relu", "jumprelu", "matryoshka"]


@dataclass(frozen=True)
class SAEConfig:
    """Architecture and shape of one sparse autoencoder."""

    arch: Arch = "topk"
    """Architecture: topk, batchtopk, switch (mixture of TopK experts), relu (L1), jumprelu (L0),
    matryoshka (BatchTopK with nested dictionaries)."""
    d_model: int | None = field(default=None, metadata=at_least(1, optional=True))
    """Width of the activations (d_in); optional, checked against the data when given."""
    d_vit: int | None = field(default=None, metadata=at_least(1, optional=True))
    """Another name for d_model (saev's sweep documents use it); taken as d_model."""
    exp_factor: int = field(default=8, metadata=at_least(1))
    """Latent width as a multiple of the activation width d_in (d_sae = exp_factor * d_in)."""
    d_sae: int | None = field(default=None, metadata=at_least(1, optional=True))
    """Explicit latent width; overrides exp_factor when set."""
    k: int = field(default=32, metadata=at_least(1))
    """Active latents per token (topk, switch: per token inside its expert; batchtopk: mean)."""
    n_experts: int = field(default=8, metadata=at_least(1))
    """Switch: number of experts; each expert is a TopK SAE of width d_sae / n_experts."""
    switch_capacity_factor: float = field(default=2.0, metadata=above(0))
    """Switch: each expert takes at most ceil(factor * batch / n_experts) tokens per batch;
    tokens past an expert's capacity get no latents. n_experts or more means no token is dropped."""
    aux_k: int | None = field(default=None, metadata=at_least(1, optional=True))
    """AuxK (topk, batchtopk): dead latents used to model the residual; default d_in // 2."""
    aux_coeff: float = field(default=1 / 32, metadata=at_least(0))
    """AuxK loss coefficient (0 turns AuxK off). May differ between members of a stack."""
    dead_tokens: int = field(default=10_000_000, metadata=at_least(1))
    """A latent is dead when it has not fired for this many tokens. May differ inside a stack."""
    jumprelu_bandwidth: float = field(default=0.001, metadata=above(0))
    """JumpReLU: width of the rectangle kernel of the straight-through threshold gradient."""
    jumprelu_init_threshold: float = field(default=0.001, metadata=above(0))
    """JumpReLU: initial threshold of every latent, on the pre-activations' scale, which
    init_encoder_scale sets (0.1 by default for jumprelu: a threshold chosen with the encoder
    at the decoder's transpose needs init_encoder_scale 1). May differ inside a stack."""
    batchtopk_threshold_momentum: float = field(default=0.99, metadata=fraction(open_top=True))
    """BatchTopK: momentum of the running estimate of the inference threshold (the smallest
    positive activation that batch top-k kept)."""
    matryoshka_widths: tuple[int, ...] = ()
    """Matryoshka: the nested dictionary sizes below d_sae, increasing (e.g. 1024,4096);
    () means d_sae/16 and d_sae/4. The full d_sae is always the last one."""
    relu_init_norm: float = field(default=0.1, metadata=above(0))
    """ReLU with free decoder norms: initial L2 norm of every decoder row (April-2024
    Anthropic recipe)."""
    init_encoder_scale: float | None = field(default=None, metadata=above(0, optional=True))
    """W_enc's initial columns: the decoder rows' transpose times this. None: the
    architecture's, 0.1 for jumprelu (SAELens's init in effect: its decoder rows start at norm
    0.1 and the encoder is their transpose), 1 for the others (OpenAI's, sparsify's and
    dictionary_learning's); the quality benchmark chose both (docs/benchmarks.md). May differ
    inside a stack."""
    decoder_norm: Literal["auto", "unit", "free"] = "auto"
    """unit: decoder rows renormalized to unit norm after every optimizer step, the gradient
    parallel to them removed before it (OpenAI, dictionary_learning; sparsify renormalizes
    before each step, the same sequence); free: unconstrained (SAELens's JumpReLU). auto: free
    for relu, whose penalty weighs each latent by its row norm, unit for the others (the
    quality benchmark chose it, docs/benchmarks.md)."""
    skip: bool = False
    """Skip transcoder (needs train_data.target_hook or target_layer): a learned linear map
    W_skip [d_in, d_out] from input to target, initialized to zeros, added to the prediction;
    exported as SAELens's W_skip [d_out, d_in]."""
    b_dec_init: Literal["auto", "geometric_median", "mean", "zeros"] = "auto"
    """How init_b_dec sets the decoder bias from a data sample. auto: zeros for jumprelu (as
    SAELens and dictionary_learning; it left far fewer dead latents on the quality benchmark,
    docs/benchmarks.md), the geometric median for the others."""

    def width(self, d_in: int) -> int:
        """The latent width d_sae for activations of width d_in."""
        return self.d_sae if self.d_sae is not None else self.exp_factor * d_in

    def resolved_aux_k(self, d_in: int) -> int:
        """AuxK width: aux_k, or d_in // 2 as in OpenAI's recipe, at most d_sae."""
        aux_k = self.aux_k if self.aux_k is not None else d_in // 2
        return max(1, min(aux_k, self.width(d_in)))


PER_MEMBER_FIELDS = ("aux_coeff", "dead_tokens", "jumprelu_init_threshold", "init_encoder_scale")
"""SAEConfig fields that may differ between members of one stack."""


def stack_key(cfg: SAEConfig) -> SAEConfig:
    """The config with per-member fields reset: configs with equal keys can share a stack."""
    defaults = {name: getattr(SAEConfig, name) for name in PER_MEMBER_FIELDS}
    return dataclasses.replace(cfg, **defaults)


@dataclass(frozen=True)
class ObjectiveConfig:
    """Training objective weights; every field may differ between members of a stack.

    The reconstruction term is the mean squared error per element (mean over batch and d_in) for
    relu, jumprelu and switch, and the FVU for topk and batchtopk (see SAEConfig.aux_coeff).
    """

    sparsity_coeff: float = field(default=4e-4, metadata=at_least(0))
    """Sparsity penalty per element: L1 weighted by decoder row norms (relu), L0 (jumprelu);
    ignored else. The papers' and SAELens's lambda (l1_coefficient, l0_coefficient), weighed
    against the squared error summed over d_in, is d_in x sparsity_coeff: pass lambda / d_in."""
    sparsity_warmup_steps: int = field(default=0, metadata=at_least(0))
    """Steps over which the sparsity coefficient rises linearly from 0 (0: no warmup)."""
    target_l0: float = field(default=0.0, metadata=at_least(0))
    """JumpReLU: 0 penalizes each token's L0 (sparsity_coeff x L0); > 0 penalizes its distance
    from this target instead, sparsity_coeff x 2 / target_l0 x (L0 - target_l0)^2 per token
    (Gemma Scope 2's quadratic loss, SAELens's 'quadratic' mode): L0 settles near the target
    without a search over sparsity_coeff. Ignored by the other architectures."""
    load_balance_coeff: float = field(default=0.01, metadata=at_least(0))
    """Switch: coefficient of the router load-balancing loss E * sum_e f_e * P_e."""
