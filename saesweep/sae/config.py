"""Configuration of one SAE (architecture, width) and of its training objective."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Literal

from typing_extensions import Doc

from saesweep.configtools import above, at_least, one_of, section
from saesweep.sae import registry
from saesweep.sae.batchtopk import BatchTopKConfig
from saesweep.sae.clt import CLTConfig
from saesweep.sae.crosscoder import CrosscoderConfig
from saesweep.sae.jumprelu import JumpReLUConfig
from saesweep.sae.matryoshka import MatryoshkaConfig
from saesweep.sae.relu import ReLUConfig
from saesweep.sae.stacking import per_member, per_member_fields, stack_key
from saesweep.sae.switch import SwitchConfig

__all__ = ["PER_MEMBER_FIELDS", "ObjectiveConfig", "SAEConfig", "stack_key"]

DEAD_TOKENS_CAP = 10_000_000
"""The longest default dead-latent window: OpenAI's and sparsify's 10M tokens."""
DEAD_WINDOW_FRACTION = 0.05
"""The default dead-latent window as a fraction of the run's n_train (docs/benchmarks.md,
"AuxK's window and weight")."""


def arch_help() -> str:
    """--help's text of SAEConfig.arch: the registered architectures, read when it is shown."""
    return (
        f"Architecture, one of the registered: {', '.join(registry.names())}. Built in "
        "(docs/training.md): topk, batchtopk, switch (a mixture of TopK experts), relu (L1), "
        "jumprelu (L0), matryoshka (BatchTopK with nested dictionaries), clt (a cross-layer "
        "transcoder over sae.clt.layers), crosscoder (an acausal crosscoder over "
        "sae.crosscoder.layers); "
        "docs/adding-an-architecture.md adds one."
    )


@dataclass(frozen=True)
class SAEConfig:
    """Architecture and shape of one sparse autoencoder: the fields every architecture
    shares, and one section of options per architecture (`sae.switch.n_experts`), read by
    that architecture only."""

    arch: Annotated[str, Doc(arch_help())] = field(default="topk", metadata=one_of(registry.names))
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
    aux_k: int | None = field(default=None, metadata=at_least(1, optional=True))
    """AuxK (topk, batchtopk): dead latents used to model the residual; default d_in // 2."""
    aux_coeff: float = field(default=5 / 32, metadata=at_least(0) | per_member())
    """AuxK loss coefficient (0 turns AuxK off); 5/32, five times OpenAI's 1/32 in this
    normalization, left fewer dead latents at the same FVU (docs/benchmarks.md). May differ
    between members of a stack."""
    dead_tokens: int | None = field(
        default=None, metadata=at_least(1, optional=True) | per_member()
    )
    """A latent is dead (AuxK's input) when it has not fired for this many tokens. None: 5 %
    of the run's n_train, at most 10M (OpenAI's and sparsify's window), so AuxK acts in runs
    of every length (docs/training.md). May differ inside a stack."""
    init_encoder_scale: float | None = field(
        default=None, metadata=above(0, optional=True) | per_member()
    )
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

    batchtopk: BatchTopKConfig = section(BatchTopKConfig)
    """BatchTopK's options (Matryoshka reads them too)."""
    switch: SwitchConfig = section(SwitchConfig)
    """Switch's options."""
    relu: ReLUConfig = section(ReLUConfig)
    """ReLU's options."""
    jumprelu: JumpReLUConfig = section(JumpReLUConfig)
    """JumpReLU's options."""
    matryoshka: MatryoshkaConfig = section(MatryoshkaConfig)
    """Matryoshka's options."""
    clt: CLTConfig = section(CLTConfig)
    """The cross-layer transcoder's options (its layers, input and target sites)."""
    crosscoder: CrosscoderConfig = section(CrosscoderConfig)
    """The acausal crosscoder's options (its layers, site, activation)."""

    def width(self, d_in: int) -> int:
        """The latent width d_sae for activations of width d_in."""
        return self.d_sae if self.d_sae is not None else self.exp_factor * d_in

    def dead_window(self, n_train: int | None) -> int:
        """Tokens without firing after which a latent is dead: dead_tokens when set, else
        DEAD_WINDOW_FRACTION of a run of n_train tokens (at least 1), at most DEAD_TOKENS_CAP
        (the cap itself where the run's length is not known)."""
        if self.dead_tokens is not None:
            return self.dead_tokens
        if n_train is None:
            return DEAD_TOKENS_CAP
        return max(1, min(DEAD_TOKENS_CAP, round(DEAD_WINDOW_FRACTION * n_train)))

    def resolved_aux_k(self, d_in: int) -> int:
        """AuxK width: aux_k, or d_in // 2 as in OpenAI's recipe, at most d_sae."""
        aux_k = self.aux_k if self.aux_k is not None else d_in // 2
        return max(1, min(aux_k, self.width(d_in)))


PER_MEMBER_FIELDS = per_member_fields(SAEConfig)
"""SAEConfig fields (dotted in sections) that may differ between members of one stack."""


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
    """JumpReLU (its buffer target_l0): 0 penalizes each token's L0 (sparsity_coeff x L0);
    > 0 penalizes its distance from this target instead, sparsity_coeff x 2 / target_l0 x
    (L0 - target_l0)^2 per token
    (Gemma Scope 2's quadratic loss, SAELens's 'quadratic' mode): L0 settles near the target
    without a search over sparsity_coeff. Ignored by the other architectures."""
    load_balance_coeff: float = field(default=0.01, metadata=at_least(0))
    """Switch (its buffer load_balance_coeff): coefficient of the router load-balancing loss
    E * sum_e f_e * P_e."""
