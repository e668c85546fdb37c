"""The stacked SAE base: n SAEs of one architecture and shape, stepped with batched matmuls.

Every parameter carries a leading member dimension n. Member i's slice is an ordinary SAE:
W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_out], b_dec [d_out]. All members see the
same batch x [B, d_in]; their losses are independent, so the objective is loss.sum().

An SAE reconstructs its input (d_out = d_in). A transcoder (built with d_out, which may equal
d_in) predicts a target y [B, d_out], another hook's activations of the same tokens, from x:
its b_dec lives in the target's space, so it is never subtracted from the encoder's input
(SAELens's transcoders refuse apply_b_dec_to_input too), and its encoder is drawn apart from
its decoder instead of as the decoder's transpose. With SAEConfig.skip a learned linear map
W_skip [d_in, d_out], initialized to zeros, adds x @ W_skip to the prediction (skip
transcoders, Paulo et al. 2025).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from beartype import beartype
from jaxtyping import Bool, Float, jaxtyped
from torch import Tensor, nn

from saesweep.sae.codes import Codes
from saesweep.sae.matmul import member_bmm
from saesweep.sae.stacking import stack_key

if TYPE_CHECKING:
    from saesweep.sae.config import ObjectiveConfig, SAEConfig

__all__ = ["LossResult", "StackedSAE", "geometric_median"]

MOVED_BUFFERS = ("target_l0", "load_balance_coeff")
"""Coefficient buffers that group checkpoints of every architecture hold when written before
JumpReLU and Switch registered them as their own; a stack without them ignores them on load."""


@dataclass(frozen=True)
class LossResult:
    """What one loss() call hands the optimizer step and the dead-latent bookkeeping (nothing
    is kept on the module between the two)."""

    loss: Tensor
    """[n] loss per member; optimize loss.sum()."""
    metrics: dict[str, Tensor]
    """Detached per-member metrics [n]."""
    fired: Tensor
    """[n, d_sae] bool: latents that fired anywhere in the batch."""
    tokens: int
    """Tokens in the batch."""
    threshold_sample: Tensor | None = None
    """[n] a new sample of a running inference threshold (BatchTopK: the smallest positive
    activation the batch top-k kept); None for architectures without one."""


class StackedSAE(nn.Module):
    """n SAEs of one architecture and shape; subclasses define encode and penalties, and
    register themselves (registry.register)."""

    arch: ClassVar[str]
    """The architecture's name: the value of sae.arch, and its section's name in SAEConfig."""
    sae_lens_architecture: ClassVar[str]
    """SAELens's name of the exported SAE (cfg.json architecture), read back by
    exported_acts."""
    subtract_b_dec: ClassVar[bool] = True
    """The architecture subtracts b_dec from the encoder's input (SAEs only; the instance's
    apply_b_dec_to_input says whether this stack does)."""
    default_decoder_norm: ClassVar[str] = "unit"
    """What SAEConfig.decoder_norm 'auto' means for this architecture."""
    default_init_encoder_scale: ClassVar[float] = 1.0
    """What SAEConfig.init_encoder_scale None means for this architecture."""
    default_b_dec_init: ClassVar[str] = "geometric_median"
    """What SAEConfig.b_dec_init 'auto' means for this architecture."""
    adam_betas: ClassVar[tuple[float, float]] = (0.9, 0.999)
    """Adam's (beta1, beta2) for this architecture's optimizer."""
    layered: ClassVar[bool] = False
    """The architecture reads several hooks side by side, which it names itself (hook_specs:
    a CLT's layers); it is a transcoder of their concatenations, and the single-hook tests
    of every architecture leave it out."""
    k_layers: int = 1
    """How many k-budgets a token has: a TopK CLT keeps k latents in each of its layers."""
    reads_sections: ClassVar[tuple[str, ...]] = ()
    """Other architectures' option sections it reads (a layered architecture's activation:
    sae.jumprelu for a JumpReLU CLT), beside its own."""
    fvu_objective: ClassVar[bool] = False
    """The loss's reconstruction term: FVU (squared error over the batch's total variance,
    the denominator of AuxK too) when True, else the mean squared error per element."""

    def __init__(
        self,
        cfgs: Sequence[SAEConfig],
        d_in: int,
        seeds: Sequence[int],
        objectives: Sequence[ObjectiveConfig],
        d_out: int | None = None,
    ):
        """d_out: the target's width for a transcoder; None builds SAEs."""
        super().__init__()
        self._check_members(cfgs, seeds, objectives)
        self.cfg = stack_key(cfgs[0])
        self.cfgs, self.seeds, self.objectives = tuple(cfgs), tuple(seeds), tuple(objectives)
        self.n, self.d_in, self.d_sae = len(seeds), d_in, self.cfg.width(d_in)
        self.transcoder = d_out is not None
        self.d_out = d_out if d_out is not None else d_in
        self.apply_b_dec_to_input = self.subtract_b_dec and not self.transcoder
        norm = self.cfg.decoder_norm
        self.unit_norm_decoder = (self.default_decoder_norm if norm == "auto" else norm) == "unit"
        check(self.transcoder or not self.cfg.skip, "sae.skip needs a target hook (a transcoder)")
        self.check_shape(self.cfg, d_in)
        self._set_shape()
        members = [
            self.init_member(torch.Generator().manual_seed(s), c)
            for s, c in zip(seeds, cfgs, strict=True)
        ]
        for name in members[0]:
            self.register_parameter(name, nn.Parameter(torch.stack([m[name] for m in members])))
        self.register_member_buffers()
        self.register_load_state_dict_pre_hook(_ignore_moved_buffers)

    def _check_members(self, cfgs, seeds, objectives) -> None:
        if not (len(cfgs) == len(seeds) == len(objectives) > 0):
            raise ValueError("cfgs, seeds and objectives need one entry per member")
        keys = {stack_key(c) for c in cfgs}
        if len(keys) != 1:
            raise ValueError(f"members of one stack differ in shape-defining fields: {keys}")
        if cfgs[0].arch != self.arch:
            raise ValueError(f"{type(self).__name__} cannot build arch {cfgs[0].arch!r}")

    @classmethod
    def check_shape(cls, cfg: SAEConfig, d_in: int) -> None:
        """Raise ValueError unless `cfg` can be built on inputs of width d_in (k, experts)."""

    @classmethod
    def hook_specs(cls, cfg: SAEConfig) -> tuple[tuple[str, ...], tuple[str, ...]] | None:
        """(input hooks, target hooks) of an architecture that reads several hooks side by
        side and names them itself (a CLT's layers, data/hooksets.py); None: the data
        config's hook and target, one each."""
        return None

    @classmethod
    def sizes(cls, cfg: SAEConfig, d_in: int) -> tuple[int, int, int]:
        """(parameters, latents per token, activation width per token) of one member on
        inputs of width d_in, for the memory estimate (memory.group_bytes)."""
        d_sae = cfg.width(d_in)
        return 2 * d_in * d_sae + d_sae + d_in, d_sae, d_in

    def _set_shape(self) -> None:
        """Subclass hook: shape attributes (k, experts) from self.cfg, once checked."""

    def register_member_buffers(self) -> None:
        """The buffers every architecture has: per-member coefficients and dead-latent
        counters. An architecture adds its own (super() first)."""
        objectives = self.objectives
        self.member_buffer("sparsity_coeff", [o.sparsity_coeff for o in objectives])
        self.member_buffer("sparsity_warmup_steps", [o.sparsity_warmup_steps for o in objectives])
        self.member_buffer("aux_coeff", [c.aux_coeff for c in self.cfgs])
        windows = [c.dead_window(None) for c in self.cfgs]
        self.member_buffer("dead_tokens", windows, torch.int64)
        counts = torch.zeros(self.n, self.d_sae, dtype=torch.int64)
        self.register_buffer("tokens_since_fired", counts)

    def member_buffer(self, name: str, values: list, dtype: torch.dtype = torch.float32) -> None:
        """Register buffer `name` [n] holding one value per member (a coefficient of the
        loss, read on the device inside the step)."""
        self.register_buffer(name, torch.tensor(values, dtype=dtype))

    # ----- initialization -------------------------------------------------------------------

    def init_dec_norm(self, cfg: SAEConfig) -> float:
        """Initial L2 norm of decoder rows (1 where they are kept at unit norm)."""
        return 1.0

    def init_member(self, gen: torch.Generator, cfg: SAEConfig) -> dict[str, Tensor]:
        """One member's initial parameters from its own generator (float32, CPU): decoder rows
        of norm init_dec_norm, the encoder their transpose (a transcoder's: its own draw of
        columns of that norm) times the init_encoder_scale, W_skip zeros."""
        norm = self.init_dec_norm(cfg)
        scale = cfg.init_encoder_scale or self.default_init_encoder_scale
        W_dec = torch.randn(self.d_sae, self.d_out, generator=gen)
        W_dec = W_dec / W_dec.norm(dim=1, keepdim=True) * norm
        W_enc = W_dec.T * scale
        if self.transcoder:
            W_enc = torch.randn(self.d_in, self.d_sae, generator=gen)
            W_enc = W_enc / W_enc.norm(dim=0, keepdim=True) * (norm * scale)
        member = {
            "W_enc": W_enc,
            "b_enc": torch.zeros(self.d_sae),
            "W_dec": W_dec,
            "b_dec": torch.zeros(self.d_out),
        }
        return member | ({"W_skip": torch.zeros(self.d_in, self.d_out)} if cfg.skip else {})

    @torch.no_grad()
    @jaxtyped(typechecker=beartype)
    def init_b_dec(self, sample: Float[Tensor, "m d_out"]) -> None:
        """Set every member's b_dec from a data sample of what it reconstructs (the input of an
        SAE, the target of a transcoder), in the normalized space it trains in."""
        kind = self.cfg.b_dec_init
        if kind == "auto":
            kind = self.default_b_dec_init
        if kind == "zeros":
            center = torch.zeros_like(sample[0])
        elif kind == "mean":
            center = sample.double().mean(0)
        else:
            center = geometric_median(sample)
        self.b_dec.copy_(center.to(self.b_dec).expand_as(self.b_dec))

    # ----- forward --------------------------------------------------------------------------

    def per_member(self, x: Tensor) -> Tensor:
        """[n, B, d] x as it is, or a batch x [B, d] shared by every member expanded to it."""
        return x.expand(self.n, *x.shape[-2:]) if x.dim() == 2 else x

    def encoder_input(self, x: Tensor) -> Tensor:
        """[n, B, d_in]: x minus b_dec (when the architecture subtracts it), per member."""
        x = self.per_member(x)
        return x - self.b_dec.unsqueeze(1) if self.apply_b_dec_to_input else x

    def encoder_grad_inputs(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(x_in [n, B, d_in], bias [n, d_sae]) for an encoder whose pre-activations were
        computed without autograd (sparse.with_encoder_grad): encoder_input(x) with b_dec held
        constant, and the bias of the same pre-activations written on the raw input, b_enc -
        b_dec @ W_enc with W_enc held constant. Its gradient, the pre-activations' summed over
        tokens, reaches b_enc and, as -(that sum) @ W_enc^T, b_dec: one vector-matrix product
        where a gradient through x_in would cost a [B, d_sae] x [d_sae, d_in] one."""
        x = self.per_member(x)
        if not self.apply_b_dec_to_input:
            return x, self.b_enc
        b_dec = self.b_dec.unsqueeze(1)
        with torch.autocast(x.device.type, enabled=False):  # b_dec's gradient in float32
            shift = member_bmm(b_dec, self.W_enc.detach()).squeeze(1)
        return x - b_dec.detach(), self.b_enc - shift

    def linear(self, x: Tensor) -> Tensor:
        """[n, B, d_sae] encoder_input(x) @ W_enc + b_enc (the raw pre-activations)."""
        return member_bmm(self.encoder_input(x), self.W_enc, self.b_enc.unsqueeze(1))

    def linear_pre(self, x: Tensor) -> Tensor:
        """[n, B, d_sae] relu(encoder_input(x) @ W_enc + b_enc)."""
        return self.linear(x).relu()

    def encode(self, x: Tensor) -> Codes:
        raise NotImplementedError

    def decode(self, codes: Codes) -> Tensor:
        """[n, B, d_out] codes @ W_dec + b_dec (sparse decode when the codes are sparse)."""
        return codes.decode(self.W_dec) + self.b_dec.unsqueeze(1)

    def predict(self, x: Tensor, codes: Codes) -> Tensor:
        """[n, B, d_out] decode(codes), plus the skip path x @ W_skip of a skip transcoder."""
        out = self.decode(codes)
        if not self.cfg.skip:
            return out
        return out + member_bmm(self.per_member(x), self.W_skip)

    @jaxtyped(typechecker=beartype)
    def forward(
        self, x: Float[Tensor, "B d_in"] | Float[Tensor, "n B d_in"]
    ) -> tuple[Float[Tensor, "n B d_out"], Codes]:
        """Reconstruct x (an SAE) or predict the target from x (a transcoder), for every
        member: (recon [n, B, d_out], codes)."""
        codes = self.encode(x)
        return self.predict(x, codes), codes

    # ----- objective ------------------------------------------------------------------------

    def sparsity_at(self, step: int) -> Tensor:
        """[n] sparsity coefficient at `step` after each member's linear warmup."""
        warm = self.sparsity_warmup_steps
        ramp = (step / warm.clamp_min(1)).clamp(max=1.0)
        return self.sparsity_coeff * torch.where(warm > 0, ramp, torch.ones_like(ramp))

    def penalties(
        self, x: Tensor, target: Tensor, recon: Tensor, codes: Codes, step: int, variance: Tensor
    ) -> dict:
        """name -> (coeff [n], value [n]); the loss adds coeff * value. x is the input, target
        what recon approximates (x itself for an SAE), `variance` the FVU denominator
        (loss())."""
        return {}

    def code_metrics(self, codes: Codes) -> dict[str, Tensor]:
        """Architecture-specific per-member metrics [n] of the codes (e.g. Switch's dropped
        tokens)."""
        return {}

    def threshold_sample(self, codes: Codes) -> Tensor | None:
        """[n] sample for a running inference threshold (LossResult.threshold_sample)."""
        return None

    @jaxtyped(typechecker=beartype)
    def loss(
        self,
        x: Float[Tensor, "B d_in"] | Float[Tensor, "n B d_in"],
        step: int = 0,
        target: Float[Tensor, "B d_out"] | None = None,
        variance: Tensor | None = None,
    ) -> LossResult:
        """Loss per member, metrics, and what after_optimizer_step needs. Optimize
        result.loss.sum(). A transcoder needs `target`, the same tokens at its target hook;
        an SAE takes none (it reconstructs x). `variance`: the FVU denominator, default
        total_variance(target); a slice of a batch split over data-parallel ranks passes its
        share of the whole batch's, so that the ranks' mean loss is the whole batch's."""
        if (target is not None) != self.transcoder:
            raise ValueError("a transcoder's loss needs a target, an SAE's takes none")
        target = x if target is None else target
        variance = total_variance(target) if variance is None else variance
        recon, codes = self(x)
        sq_err = squared_error(recon, target)
        mse, fvu = sq_err / recon[0].numel(), sq_err / variance
        terms = self.penalties(x, target, recon, codes, step, variance)
        weighted = (torch.where(c != 0, c * v, 0) for c, v in terms.values())  # 0 * inf: 0
        main = fvu if self.fvu_objective else mse
        loss = main + sum(weighted, torch.zeros_like(mse))
        metrics = {"loss": loss, "mse": mse, "fvu": fvu, "l0": codes.l0()}
        metrics["dead_pct"] = 100 * self.dead_mask().to(mse.dtype).mean(-1)
        metrics |= {name: v for name, (_, v) in terms.items()} | self.code_metrics(codes)
        return LossResult(
            loss=loss,
            metrics={k: v.detach() for k, v in metrics.items()},
            fired=codes.fired().detach(),
            tokens=x.shape[-2],
            threshold_sample=self.threshold_sample(codes),
        )

    @staticmethod
    def finite_members(loss: Tensor) -> Tensor:
        """[n] bool: members whose loss is finite (others must not be updated)."""
        return torch.isfinite(loss.detach())

    # ----- optimizer hooks ------------------------------------------------------------------

    @torch.no_grad()
    def before_optimizer_step(self) -> None:
        """Remove the decoder-gradient component parallel to the unit-norm decoder rows."""
        if not self.unit_norm_decoder or self.W_dec.grad is None:
            return
        W, g = self.W_dec, self.W_dec.grad
        g.sub_((g * W).sum(-1, keepdim=True) * W)

    @torch.no_grad()
    def after_optimizer_step(self, result: LossResult, update_mask: Tensor | None = None) -> None:
        """Renormalize decoder rows and update dead-latent counters and running statistics
        from `result` (this step's loss), for members in update_mask ([n] bool, default all)."""
        mask = self._mask(update_mask)
        if self.unit_norm_decoder:
            norms = self.W_dec.norm(dim=-1, keepdim=True)
            self.W_dec.div_(norms.masked_fill_(~mask.view(-1, 1, 1), 1.0))  # others / 1
        self.update_running_stats(result, mask)

    def update_running_stats(self, result: LossResult, mask: Tensor) -> None:
        """Dead-latent counters; subclasses add their own running estimates."""
        counts = torch.where(result.fired, 0, self.tokens_since_fired + result.tokens)
        old = self.tokens_since_fired
        self.tokens_since_fired.copy_(torch.where(mask.unsqueeze(1), counts, old))

    def _mask(self, mask: Tensor | None) -> Tensor:
        if mask is None:
            return torch.ones(self.n, dtype=torch.bool, device=self.b_dec.device)
        return mask.to(self.b_dec.device)

    def dead_mask(self) -> Bool[Tensor, "n d_sae"]:
        """[n, d_sae] bool: latents that have not fired for dead_tokens tokens."""
        return self.tokens_since_fired >= self.dead_tokens.unsqueeze(1)

    # ----- export ---------------------------------------------------------------------------

    @torch.no_grad()
    def member_state_dict(
        self, i: int, input_scale: float = 1.0, target_scale: float | None = None
    ) -> dict[str, Tensor]:
        """Member i in SAELens layout, acting on RAW activations.

        The SAE was trained on x * input_scale (a transcoder to predict y * target_scale; an
        SAE's target is its input, default target_scale = input_scale); both scales are folded
        into the weights so the exported SAE maps raw x to a raw reconstruction or prediction.
        W_skip is exported as SAELens has it, [d_out, d_in].
        """
        s, t = input_scale, input_scale if target_scale is None else target_scale
        sd = {
            "W_enc": self.W_enc[i] * s,
            "b_enc": self.b_enc[i],
            "W_dec": self.W_dec[i] / t,
            "b_dec": self.b_dec[i] / t,
        }
        if self.cfg.skip:
            sd["W_skip"] = (self.W_skip[i] * (s / t)).T
        sd |= self._export_extra(i, s)
        return {k: v.detach().clone().contiguous() for k, v in sd.items()}

    def _export_extra(self, i: int, s: float) -> dict[str, Tensor]:
        """The architecture's own tensors of member i (input scale s folded in)."""
        return {}

    @staticmethod
    def exported_acts(cfg: dict, sd: dict[str, Tensor], x_in: Tensor, pre: Tensor) -> Tensor:
        """[B, d_sae] latent activations of one exported SAE (cfg.json `cfg`, weights `sd`)
        from its encoder input x_in [B, d_in] and pre = relu(x_in @ W_enc + b_enc): pre itself
        (SAELens's 'standard'). sae/export.py runs the one of cfg's SAELens architecture."""
        return pre

    def sae_lens_cfg(self) -> dict:
        """The SAELens fields of a member's cfg.json (architecture, shape, activation). A
        transcoder's architecture is transcoder_architecture(); it adds d_out (the trainer adds
        hook_name_out)."""
        cfg = {
            "architecture": self.sae_lens_architecture,
            "d_in": self.d_in,
            "d_sae": self.d_sae,
            "dtype": str(self.W_enc.dtype).removeprefix("torch."),
            "apply_b_dec_to_input": self.apply_b_dec_to_input,
            "normalize_activations": "none",
            "saesweep_arch": self.arch,
        }
        if self.transcoder:
            architecture = transcoder_architecture(self.sae_lens_architecture, self.cfg.skip)
            cfg |= {"architecture": architecture, "d_out": self.d_out}
        return cfg | self._sae_lens_extra()

    def _sae_lens_extra(self) -> dict:
        """The architecture's own SAELens fields of cfg.json (k, n_experts, ...)."""
        return {}


def _ignore_moved_buffers(module: StackedSAE, state_dict: dict, prefix: str, *_) -> None:
    """load_state_dict's pre-hook: drop the MOVED_BUFFERS `module` does not have."""
    for name in MOVED_BUFFERS:
        if name not in module._buffers:
            state_dict.pop(prefix + name, None)


def transcoder_architecture(sae_architecture: str, skip: bool) -> str:
    """SAELens's name of a transcoder whose SAE has `sae_architecture`: 'transcoder' or
    'skip_transcoder' for 'standard' (ReLU), else '<arch>_transcoder' or
    '<arch>_skip_transcoder' (SAELens has 'jumprelu_...'; 'topk_...' and 'switch_...' it
    cannot load)."""
    parts = [sae_architecture] if sae_architecture != "standard" else []
    return "_".join([*parts, *(["skip"] if skip else []), "transcoder"])


def sae_architecture(architecture: str) -> str:
    """Inverse of transcoder_architecture (an SAE's architecture is returned unchanged)."""
    if not architecture.endswith("transcoder"):
        return architecture
    base = architecture.removesuffix("transcoder").removesuffix("skip_").removesuffix("_")
    return base or "standard"


@jaxtyped(typechecker=beartype)
def fvu(
    x: Float[Tensor, "B d_in"] | Float[Tensor, "n B d_in"],
    recon: Float[Tensor, "n B d_in"],
    variance: Tensor | None = None,
) -> Float[Tensor, " n"]:
    """[n] fraction of variance unexplained: sum |recon - x|^2 / sum |x - mean(x)|^2 (or
    over `variance`, loss()'s denominator)."""
    variance = total_variance(x) if variance is None else variance
    return (recon - x).pow(2).sum(dim=(1, 2)) / variance


@jaxtyped(typechecker=beartype)
def total_variance(
    x: Float[Tensor, "B d_in"] | Float[Tensor, "n B d_in"],
) -> Float[Tensor, ""] | Float[Tensor, " n"]:
    """sum |x - mean(x)|^2 over the batch (per member for [n, B, d_in]), at least 1e-6 of the
    batch's energy sum |x|^2 (and tiny): a batch of identical tokens gives large finite ratios,
    not inf."""
    centered = x - x.mean(dim=-2, keepdim=True)
    total = (centered * centered).sum(dim=(-2, -1))  # x * x: pow(2)'s bits, 4x as fast on CPU
    floor = 1e-6 * (x * x).sum(dim=(-2, -1))
    return torch.maximum(total, floor).clamp_min(torch.finfo(x.dtype).tiny)


def squared_error(recon: Tensor, target: Tensor) -> Tensor:
    """[n] sum over (B, d) of (recon - target)^2, recon [n, B, d] and target [n, B, d] or
    [B, d]: the same bits, forward and backward, as (recon - target).pow(2).sum(dim=(1, 2)),
    in fewer passes over [n, B, d] (pow(2) is x * x, 4x slower on CPU; its backward copies
    x, doubles it and multiplies by the gradient, allocating each)."""
    return _SquaredError.apply(recon, target)


class _SquaredError(torch.autograd.Function):
    @staticmethod
    def forward(ctx, recon, target):
        diff = recon - target
        ctx.save_for_backward(diff)
        ctx.target_shape = target.shape
        return (diff * diff).sum(dim=(1, 2))

    @staticmethod
    def backward(ctx, g):
        (diff,) = ctx.saved_tensors
        grad = torch.mul(diff, 2).mul_(g.view(-1, 1, 1))  # g * (2 * diff), pow's backward
        grad_target = None
        if ctx.needs_input_grad[1]:
            grad_target = (-grad).sum_to_size(ctx.target_shape)
        return grad if ctx.needs_input_grad[0] else None, grad_target


@jaxtyped(typechecker=beartype)
def geometric_median(
    points: Float[Tensor, "m d"], iters: int = 32, eps: float = 1e-8
) -> Float[Tensor, " d"]:
    """Geometric median by Weiszfeld iterations (float64), started from the mean."""
    p = points.double()
    y = p.mean(0)
    for _ in range(iters):
        w = 1 / (p - y).norm(dim=1).clamp_min(eps)
        y_new = (w.unsqueeze(1) * p).sum(0) / w.sum()
        if (y_new - y).norm() <= eps * max(1.0, y.norm().item()):
            return y_new
        y = y_new
    return y


def check(cond: bool, msg: str) -> None:
    """Raise ValueError(msg) unless cond."""
    if not cond:
        raise ValueError(msg)
