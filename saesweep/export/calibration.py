"""Inference thresholds for TopK transcoders and TopK cross-layer transcoders exported as
JumpReLU (circuit-tracer reads only ReLU and JumpReLU ones), calibrated on held-out
activations, and how close the export is to the trained model.

The rule, per latent (per feature of each layer for a CLT): on the first `tokens` held-out
tokens, the threshold above which the latent fires exactly as often as under TopK (its
(c + 1)-th largest activation, c the tokens on which TopK kept it), so that every latent keeps
its firing frequency and the export's L0 is k (per layer) on average over those tokens. The
next `tokens` tokens measure the trained model's and the export's FVU and L0 (export.py
circuit-tracer prints them and writes them to calibration.json).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from saesweep.data.reader import Reader
from saesweep.errors import UserError
from saesweep.sae.clt_export import ExportedCLT
from saesweep.sae.export import ExportedSAE

RULE = "per latent: fires on as many calibration tokens as under TopK"
"""The threshold rule, as calibration.json names it."""


@dataclass(frozen=True)
class HeldOut:
    """Where the calibration and measurement tokens come from."""

    collection: str
    """The collection holding the runs' hooks (a path, file://PATH or s3://BUCKET/PREFIX)."""
    shards: str
    """Python slice over its shards (held-out ones)."""
    tokens: int
    """Tokens to calibrate on; the next as many measure the export."""

    def read(self, inputs: list[str], targets: list[str]) -> tuple[Tensor, Tensor]:
        """([2 * tokens, L, d_in], [2 * tokens, L, d_out]) the first tokens of the input hooks
        and of the target hooks, float32, in stored order."""
        hooks = [*inputs, *targets]
        reader = Reader(
            self.collection,
            hook=hooks[0],
            extra_hooks=hooks[1:],
            shards=self.shards,
            batch_size=2 * self.tokens,
            shuffle=False,
            dtype=torch.float32,
        )
        batch = next(iter(reader))
        if len(batch[reader.hook]) < 2 * self.tokens:
            raise UserError(
                f"the shards {self.shards} of {self.collection} hold "
                f"{len(batch[reader.hook]):,} tokens; calibrating needs {2 * self.tokens:,}: "
                "give fewer --calibration-tokens or more shards"
            )
        return (
            torch.stack([batch[h] for h in inputs], dim=1),
            torch.stack([batch[h] for h in targets], dim=1),
        )


def frequency_thresholds(pre: Tensor, acts: Tensor) -> Tensor:
    """[d] per latent the (c + 1)-th largest of its activations pre [N, d] (c: the tokens on
    which acts [N, d], TopK's codes, keep it; 0 where c is N), so that pre > threshold holds on
    c tokens."""
    fired = (acts > 0).sum(0)
    ranked = pre.sort(dim=0, descending=True).values
    ranked = torch.cat([ranked, ranked.new_zeros(1, ranked.shape[1])])
    return ranked.gather(0, fired.view(1, -1)).squeeze(0)


def transcoder_threshold(cfg: dict, sd: dict[str, Tensor], held: HeldOut) -> tuple[Tensor, dict]:
    """(threshold [d_sae], closeness) of a TopK transcoder (cfg.json, float32 weights)."""
    x, y = (t[:, 0] for t in held.read([cfg["hook_name"]], [cfg["hook_name_out"]]))
    n = held.tokens
    trained = ExportedSAE(cfg, sd)
    relu = ExportedSAE(cfg | {"architecture": "standard"}, sd)
    threshold = frequency_thresholds(relu.encode(x[:n]), trained.encode(x[:n]))
    export = ExportedSAE(cfg | {"architecture": "jumprelu"}, sd | {"threshold": threshold})
    return threshold, closeness(trained, export, x[n:], y[n:])


def clt_thresholds(
    cfg: dict, sd: dict[str, Tensor], held: HeldOut
) -> tuple[dict[str, Tensor], dict]:
    """({threshold_<i>: [d_sae]}, closeness) of a TopK CLT (cfg.json, float32 weights)."""
    xs, ys = held.read(cfg["hook_names"], cfg["hook_names_out"])
    n = held.tokens
    trained = ExportedCLT(cfg, sd)
    pre = ExportedCLT(cfg | {"activation": "relu"}, sd).encode(xs[:n])
    acts = trained.encode(xs[:n])
    thresholds = {
        f"threshold_{i}": frequency_thresholds(pre[:, i], acts[:, i])
        for i in range(cfg["n_layers"])
    }
    export = ExportedCLT(cfg | {"activation": "jumprelu"}, sd | thresholds)
    return thresholds, closeness(trained, export, xs[n:], ys[n:])


@torch.no_grad()
def closeness(trained, export, x: Tensor, y: Tensor) -> dict:
    """The trained model's and the export's FVU (squared error over the target's variance,
    summed over layers) and L0 (summed over layers) on x -> y."""
    row: dict = {"rule": RULE, "tokens": len(x)}
    variance = (y - y.mean(0)).pow(2).sum()
    for name, model in (("trained", trained), ("export", export)):
        codes = model.encode(x)
        row[f"fvu_{name}"] = ((model(x) - y).pow(2).sum() / variance).item()
        row[f"l0_{name}"] = (codes > 0).flatten(1).sum(-1).double().mean().item()
    return row


def describe(name: str, row: dict) -> str:
    """One line on how close an export with calibrated thresholds is."""
    return (
        f"{name}: TopK exported as JumpReLU, thresholds calibrated on {row['tokens']:,} held-out "
        f"tokens; on the next {row['tokens']:,}: FVU {row['fvu_trained']:.4f} -> "
        f"{row['fvu_export']:.4f}, L0 {row['l0_trained']:.1f} -> {row['l0_export']:.1f} "
        "(trained -> export)"
    )
