"""sparsify's layout (EleutherAI's sparsify, read by its SparseCoder.load_from_disk and
load_many, and by delphi): per run, a directory per hookpoint with cfg.json (SparseCoderConfig
fields and d_in) and sae.safetensors (encoder.weight [d_sae, d_in], encoder.bias, W_dec
[d_sae, d_out], b_dec, W_skip of a skip transcoder).

sparsify's forward is relu(encoder(x - b_dec)) (a transcoder's: of x), the k largest kept,
decoded by W_dec and b_dec: exactly a TopK SAE or transcoder of saesweep, whose encoder bias
is moved to match where sparsify does or does not subtract b_dec. Other architectures (a
threshold, an L1 penalty's ReLU, experts) it cannot express, and are refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import Tensor

from saesweep.configtools import positional
from saesweep.errors import UserError
from saesweep.export import export_format
from saesweep.export.output import staged_output
from saesweep.export.runs import check_one_hook, finished_runs, run_names
from saesweep.format.names import checked_name
from saesweep.format.rundir import load_sae, write_json, write_tensors
from saesweep.sae.base import sae_architecture


@dataclass(frozen=True)
class SparsifyCommand:
    """sparsify's layout (OUT/RUN/HOOKPOINT/cfg.json and sae.safetensors) of TopK SAEs and
    transcoders, which sparsify's SparseCoder and delphi load."""

    runs: positional(tuple[str, ...], "RUN_OR_SWEEP_DIR")
    """Finished run directories, or sweep directories (each stands for all its runs)."""
    out: str
    """The directory to write (new, or empty): one directory per run, named as the run."""


def hookpoint(cfg: dict, run: Path) -> str:
    """The run's sparsify hookpoint: the module whose output an SAE reads, or whose output a
    transcoder predicts (sparsify's transcoder reads that module's input)."""
    name = cfg["hook_name_out"] if "d_out" in cfg else cfg["hook_name"]
    return checked_name(name, str(run / "cfg.json"), "hook_name")


def sparsify_coder(cfg: dict, sd: dict[str, Tensor], run: Path) -> tuple[str, dict, dict]:
    """(hookpoint, cfg.json, sae.safetensors) of the sparsify SparseCoder whose forward is
    the run's."""
    check_one_hook(run, cfg)
    arch, transcoder = sae_architecture(cfg["architecture"]), "d_out" in cfg
    if arch != "topk":
        raise UserError(
            f"{run} is a {cfg['architecture']} SAE; sparsify holds only TopK SAEs and "
            "transcoders (the k largest ReLU latents per token), so export a topk run"
        )
    if transcoder and cfg["d_out"] != cfg["d_in"]:
        raise UserError(
            f"{run} is a transcoder from width {cfg['d_in']} to {cfg['d_out']}; sparsify's "
            "transcoders keep the width, so export one between hooks of the same width"
        )
    subtracts = int(not transcoder) - int(cfg["apply_b_dec_to_input"])
    bias = sd["b_enc"] + subtracts * (sd["b_dec"] @ sd["W_enc"]) if subtracts else sd["b_enc"]
    tensors = {"encoder.weight": sd["W_enc"].T, "encoder.bias": bias}
    tensors |= {name: sd[name] for name in ("W_dec", "b_dec", "W_skip") if name in sd}
    coder_cfg = {
        "activation": "topk",
        "expansion_factor": max(1, cfg["d_sae"] // cfg["d_in"]),
        "normalize_decoder": False,
        "num_latents": cfg["d_sae"],
        "k": cfg["k"],
        "multi_topk": False,
        "skip_connection": "W_skip" in sd,
        "transcode": transcoder,
        "d_in": cfg["d_in"],
    }
    return hookpoint(cfg, run), coder_cfg, tensors


@export_format("sparsify", SparsifyCommand)
def write_sparsify(command: SparsifyCommand) -> None:
    runs = finished_runs(command.runs)
    coders = [sparsify_coder(*load_sae(run), run) for run in runs]
    with staged_output(Path(command.out)) as staged:
        for name, (hook, coder_cfg, tensors) in zip(run_names(runs), coders, strict=True):
            where = staged / name / hook
            write_tensors(where / "sae.safetensors", tensors)
            write_json(where / "cfg.json", coder_cfg)
    print(f"wrote {command.out}: {len(runs)} runs in sparsify's layout")
