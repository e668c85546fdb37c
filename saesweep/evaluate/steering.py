"""Steering a causal LM with one SAE latent while it generates.

mode 'add':   h <- h + coeff * W_dec[latent] at every position the hooked module produces
              (the prompt in the first forward pass, then each new token).
mode 'clamp': h <- h + (coeff - a_latent(h)) * W_dec[latent], where a_latent is the latent's
              activation under the SAE (exported_acts): the latent's contribution to the
              reconstruction is set to coeff, and the SAE's error term is kept.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import torch
from beartype import beartype
from jaxtyping import Float, jaxtyped
from torch import Tensor, nn

from saesweep.collect.model import add_hook
from saesweep.collect.sequences import special_template
from saesweep.errors import UserError
from saesweep.evaluate.downstream import Run, load_run
from saesweep.sae.export import exported_acts

Mode = Literal["add", "clamp"]


@jaxtyped(typechecker=beartype)
def steered(
    cfg: dict,
    sd: dict[str, Tensor],
    h: Float[Tensor, "*batch d_in"],
    latent: int,
    coeff: float,
    mode: Mode,
) -> Float[Tensor, "*batch d_in"]:
    """The hook output h with the latent's decoder direction added (or clamped)."""
    direction = sd["W_dec"][latent].to(h.device, h.dtype)
    if mode == "add":
        return h + coeff * direction
    flat = h.reshape(-1, h.shape[-1])
    enc = {k: v.to(h.device) for k, v in sd.items()}
    act = exported_acts(cfg, enc, flat.to(sd["W_enc"].dtype))[:, latent].to(h.dtype)
    return (flat + (coeff - act)[:, None] * direction).reshape(h.shape)


@contextlib.contextmanager
def steering(
    model: nn.Module, run: Run, latent: int, coeff: float, mode: Mode = "add"
) -> Iterator[None]:
    """Within the block, the SAE's hook module of `model` outputs steered activations."""
    cfg, sd = load_run(run if isinstance(run, tuple) else Path(run))
    if not 0 <= latent < cfg["d_sae"]:
        raise UserError(f"latent {latent} is out of range: the SAE has {cfg['d_sae']} latents")
    if mode not in ("add", "clamp"):
        raise UserError(f"mode={mode!r}: use 'add' or 'clamp'")
    handle = add_hook(
        model, cfg["hook_name"], lambda h: steered(cfg, sd, h, latent, coeff, mode), prepend=True
    )
    try:
        yield
    finally:
        handle.remove()


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """The prompt's token ids after the tokenizer's leading special tokens (BOS, CLS), without
    the trailing ones, so that the model continues the text."""
    prefix, _ = special_template(tokenizer)
    return prefix + tokenizer(prompt, add_special_tokens=False)["input_ids"]


@torch.inference_mode()
def generate(model: nn.Module, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """Greedy continuation of `prompt`, decoded without special tokens."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids(tokenizer, prompt)], device=device)
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id or 0,
    )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def steer(
    model: nn.Module,
    tokenizer,
    run_dir: Run,
    latent: int,
    coeff: float,
    prompt: str,
    max_new_tokens: int = 20,
    mode: Mode = "add",
) -> str:
    """Greedy generation from `prompt` with the latent steered at the SAE's hook."""
    with steering(model, run_dir, latent, coeff, mode):
        return generate(model, tokenizer, prompt, max_new_tokens)
