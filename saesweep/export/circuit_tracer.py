"""export.py circuit-tracer: transcoders as circuit-tracer (safety-research/circuit-tracer)
loads them for attribution graphs.

A sweep's per-layer transcoders (one per layer of the model, each from the layer's mlp_in or
resid_mid to its mlp) become a `transcoder_set`: layer_{i}.safetensors as circuit-tracer's
SingleLayerTranscoder keeps them (W_enc [d_sae, d_model], b_enc, W_dec [d_sae, d_model], b_dec,
W_skip [d_model, d_model] for skip transcoders, activation_function.threshold for JumpReLU)
and config.yaml (model_kind, feature_input_hook, feature_output_hook, model_name, scan).
A cross-layer transcoder run (`--sae.arch clt`, from every layer's mlp_in or resid_mid to the
mlps) becomes a `cross_layer_transcoder`: W_enc_{i}.safetensors (W_enc_{i} [d_tc, d_model],
b_enc_{i}, b_dec_{i}, threshold_{i} for JumpReLU) and W_dec_{i}.safetensors (W_dec_{i}
[d_tc, L - i, d_model]) per layer, as circuit-tracer's load_clt reads them.
Weights act on raw activations (the input scale is folded in by the run directory).
TopK transcoders and TopK CLTs export as JumpReLU with thresholds calibrated on --collection's
held-out activations (export/calibration.py), and calibration.json says how close each export
is to its trained model. `export_writer` picks the writer by the kind of run.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save

from saesweep.collect.model import layer_list, model_modules, resolve_hook
from saesweep.configtools import at_least, positional
from saesweep.errors import UserError
from saesweep.export import export_format
from saesweep.export.calibration import HeldOut, clt_thresholds, describe, transcoder_threshold
from saesweep.export.output import staged_output
from saesweep.export.runs import check_one_hook, finished_runs
from saesweep.format.rundir import load_sae
from saesweep.sae.base import sae_architecture
from saesweep.sae.clt_export import ExportedCLT

TL_HOOKS = {"resid_mid": "hook_resid_mid", "mlp_in": "mlp.hook_in", "mlp": "hook_mlp_out"}
"""circuit-tracer's (TransformerLens) hook names of saesweep's sites; its nnsight backend maps
them onto HF modules as collect.model resolves the sites (hook_resid_mid: the pre-MLP norm's
input, mlp.hook_in: its output, hook_mlp_out: the MLP's output)."""
INPUT_SITES = ("mlp_in", "resid_mid")
TARGET_SITE = "mlp"
ACTIVATIONS = {"standard": "relu", "jumprelu": "jump_relu", "topk": "jump_relu"}
"""The exported architectures circuit-tracer's transcoder loader reads (SAELens name ->
activation): ReLU, and JumpReLU (JumpReLU, BatchTopK and Matryoshka runs, whose inference
threshold is exact; TopK runs, with calibrated thresholds). Switch routes and is refused."""
CLT_ACTIVATIONS = {"relu": "relu", "jumprelu": "jump_relu", "batchtopk": "jump_relu",
                   "topk": "jump_relu"}  # fmt: skip
"""CLT activation -> circuit-tracer's (BatchTopK with its running thresholds, TopK with
calibrated ones)."""
CALIBRATED = "topk"
"""The activation (SAELens architecture, CLT activation) whose thresholds are calibrated."""


@dataclass(frozen=True)
class CircuitTracerCommand:
    """Per-layer transcoders as circuit-tracer's transcoder set (layer_{i}.safetensors and
    config.yaml), or one cross-layer transcoder run as its cross_layer_transcoder
    (W_enc_{i} and W_dec_{i}.safetensors, config.yaml), for attribution graphs."""

    runs: positional(tuple[str, ...], "RUN_OR_SWEEP_DIR")
    """Run directories, or sweep directories for each of their runs: one transcoder per layer
    of the model, all from mlp_in (or all from resid_mid) to the same layer's mlp; or one
    CLT run over every layer."""
    out: str
    """The directory to write (new or empty)."""
    collection: str = ""
    """The collection whose held-out activations calibrate TopK runs' JumpReLU thresholds and
    measure the export's FVU (needed for TopK transcoders and CLTs): a path, file://PATH or
    s3://BUCKET/PREFIX holding the runs' hooks."""
    shards: str = "-1:"
    """Python slice over the collection's shards to calibrate on (the trainer's held-out
    shards by default)."""
    calibration_tokens: int = field(default=16384, metadata=at_least(1))
    """Tokens to calibrate the thresholds on; the next as many measure the export."""

    def held_out(self) -> HeldOut | None:
        """The calibration tokens, or None without --collection."""
        if not self.collection:
            return None
        return HeldOut(self.collection, self.shards, self.calibration_tokens)


CALIBRATION = "calibration.json"
"""The export's file saying, per calibrated layer (or CLT), the threshold rule and the trained
model's and the export's FVU and L0 on held-out tokens."""


@dataclass(frozen=True)
class LayerRun:
    """One finished transcoder run with the sites its hooks resolve to."""

    run: Path
    cfg: dict
    weights: dict[str, torch.Tensor]
    layer: int
    input_site: str


@export_format("circuit-tracer", CircuitTracerCommand)
def write(cmd: CircuitTracerCommand) -> None:
    runs = [(run, *load_sae(run)) for run in finished_runs(cmd.runs)]
    files, config, calibrated = export_writer(runs)(runs, cmd.held_out())
    yaml = "".join(f"{key}: {json.dumps(value)}\n" for key, value in config.items())
    files["config.yaml"] = yaml.encode()
    if calibrated:
        files[CALIBRATION] = json.dumps(calibrated, indent=1).encode()
    with staged_output(Path(cmd.out)) as out:
        for name, data in files.items():
            (out / name).write_bytes(data)
    for name, row in calibrated.items():
        print(describe(name, row))
    print(f"wrote {config['model_kind']} of {len(runs)} runs to {cmd.out}")


def export_writer(runs: list[tuple[Path, dict, dict]]) -> Callable:
    """The writer of these runs' (run directory, cfg.json, weights) circuit-tracer model
    kind, (runs, held-out tokens or None) -> (files, config.yaml fields, {layer: closeness}
    of the calibrated exports): per-layer transcoders make a transcoder set,
    one cross-layer transcoder run a cross_layer_transcoder."""
    if any(cfg["architecture"] == ExportedCLT.architecture for _, cfg, _ in runs):
        if len(runs) > 1:
            raise UserError("give one cross-layer transcoder run; circuit-tracer reads one CLT")
        return cross_layer_transcoder
    for run, cfg, _ in runs:
        check_one_hook(run, cfg)
        if "hook_name_out" not in cfg:
            raise UserError(
                f"{run} is an SAE, not a transcoder; circuit-tracer needs transcoders from "
                "mlp_in (or resid_mid) to mlp"
            )
    models = sorted({cfg["model_name"] for _, cfg, _ in runs})
    if len(models) > 1:
        raise UserError(f"the runs are of different models ({', '.join(models)}); give one's")
    return transcoder_set


def transcoder_set(
    runs: list[tuple[Path, dict, dict]], held: HeldOut | None
) -> tuple[dict[str, bytes], dict, dict]:
    """layer_{i}.safetensors for each layer, the config of a transcoder set, and each
    calibrated layer's closeness."""
    model_name = runs[0][1]["model_name"]
    model = model_modules(model_name)
    layers = layer_runs(runs, model)
    check_set(layers, len(layer_list(model)[1]))
    files, calibrated = {}, {}
    for r in layers:
        tensors = layer_tensors(r)
        if _architecture(r.cfg) == CALIBRATED:
            weights = {k: v.float() for k, v in r.weights.items()}
            threshold, row = transcoder_threshold(r.cfg, weights, need(held, r.run))
            tensors["activation_function.threshold"] = threshold
            calibrated[f"layer {r.layer}"] = {"run": str(r.run)} | row
        files[f"layer_{r.layer}.safetensors"] = save(tensors)
    config = {
        "model_kind": "transcoder_set",
        "feature_input_hook": TL_HOOKS[layers[0].input_site],
        "feature_output_hook": TL_HOOKS[TARGET_SITE],
        "activation_function": ACTIVATIONS[_architecture(layers[0].cfg)],
        "model_name": model_name,
        "scan": f"saesweep/{runs[0][0].parent.parent.name}",
    }
    return files, config, calibrated


def cross_layer_transcoder(
    runs: list[tuple[Path, dict, dict]], held: HeldOut | None
) -> tuple[dict[str, bytes], dict, dict]:
    """W_enc_{i} and W_dec_{i}.safetensors for each layer, the config of one CLT run, and
    its closeness if calibrated."""
    run, cfg, weights = runs[0]
    site = clt_input_site(run, cfg)
    sd = {k: v.float() for k, v in weights.items()}
    files, calibrated = {}, {}
    if cfg["activation"] == CALIBRATED:
        thresholds, row = clt_thresholds(cfg, sd, need(held, run))
        sd |= thresholds
        calibrated["clt"] = {"run": str(run)} | row
    for i in range(cfg["n_layers"]):
        enc = {
            f"W_enc_{i}": sd[f"W_enc_{i}"].T,
            **{f"{k}_{i}": sd[f"{k}_{i}"] for k in ("b_enc", "b_dec")},
        }
        if f"threshold_{i}" in sd:
            enc[f"threshold_{i}"] = sd[f"threshold_{i}"].clamp_min(0)
        files[f"W_enc_{i}.safetensors"] = save({k: v.contiguous() for k, v in enc.items()})
        files[f"W_dec_{i}.safetensors"] = save({f"W_dec_{i}": sd[f"W_dec_{i}"].contiguous()})
    config = {
        "model_kind": "cross_layer_transcoder",
        "feature_input_hook": TL_HOOKS[site],
        "feature_output_hook": TL_HOOKS[TARGET_SITE],
        "activation_function": CLT_ACTIVATIONS[cfg["activation"]],
        "model_name": cfg["model_name"],
        "scan": f"saesweep/{run.parent.parent.name}",
    }
    return files, config, calibrated


def need(held: HeldOut | None, run: Path) -> HeldOut:
    """The calibration tokens of a TopK run; a UserError without --collection."""
    if held is None:
        raise UserError(
            f"{run} is a TopK transcoder, exported as JumpReLU with thresholds calibrated on "
            "held-out activations: give --collection (the collection it was trained on)"
        )
    return held


def clt_input_site(run: Path, cfg: dict) -> str:
    """The site a CLT run reads; a UserError unless it spans every layer of the model, from
    mlp_in (or resid_mid) to the same layer's mlp."""
    model = model_modules(cfg["model_name"])
    ins = [resolve_hook(model, h)[1:] for h in cfg["hook_names"]]
    outs = [resolve_hook(model, h)[1:] for h in cfg["hook_names_out"]]
    n_layers = len(layer_list(model)[1])
    site = ins[0][0]
    if (
        site not in INPUT_SITES
        or ins != [(site, i) for i in range(n_layers)]
        or outs != [(TARGET_SITE, i) for i in range(n_layers)]
    ):
        raise UserError(
            f"{run} maps {', '.join(cfg['hook_names'])} to {', '.join(cfg['hook_names_out'])}; "
            f"circuit-tracer replaces every MLP: train a CLT over all {n_layers} layers from "
            "mlp_in (or resid_mid) to mlp"
        )
    return site


def layer_runs(runs: list[tuple[Path, dict, dict]], model) -> list[LayerRun]:
    """Each run with its layer and input site, sorted by layer; a UserError for a run that
    is not a transcoder circuit-tracer can express."""
    out = []
    for run, cfg, weights in runs:
        _, site, layer = resolve_hook(model, cfg["hook_name"])
        _, target, target_layer = resolve_hook(model, cfg["hook_name_out"])
        if site not in INPUT_SITES or target != TARGET_SITE or layer != target_layer:
            raise UserError(
                f"{run} maps {cfg['hook_name']} to {cfg['hook_name_out']}; circuit-tracer "
                "replaces each MLP: train transcoders from mlp_in.L (or resid_mid.L) to mlp.L"
            )
        if _architecture(cfg) not in ACTIVATIONS:
            raise UserError(
                f"{run} is a {cfg['saesweep_arch']} transcoder, which circuit-tracer cannot "
                "express (it reads ReLU and JumpReLU ones); train relu, jumprelu, batchtopk "
                "or topk"
            )
        out.append(LayerRun(run, cfg, weights, layer, site))
    return sorted(out, key=lambda r: r.layer)


def check_set(layers: list[LayerRun], n_layers: int) -> None:
    """A UserError unless the runs are one transcoder per layer of the model with one input
    site, one activation, one width and skip connections in all or none."""
    by_layer: dict[int, LayerRun] = {}
    for r in layers:
        if r.layer in by_layer:
            raise UserError(
                f"{by_layer[r.layer].run} and {r.run} are both for layer {r.layer}; give one "
                "transcoder per layer"
            )
        by_layer[r.layer] = r
    missing = sorted(set(range(n_layers)) - set(by_layer))
    if missing:
        raise UserError(
            f"no transcoder for layers {missing}; circuit-tracer replaces every MLP of the "
            f"model's {n_layers} layers"
        )
    for what, values in (
        ("input sites", {r.input_site for r in layers}),
        ("activations", {ACTIVATIONS[_architecture(r.cfg)] for r in layers}),
        ("widths (d_sae)", {r.cfg["d_sae"] for r in layers}),
        ("skip connections", {"W_skip" in r.weights for r in layers}),
        ("input and output widths", {(r.cfg["d_in"], r.cfg["d_out"]) for r in layers}),
    ):
        if len(values) > 1:
            raise UserError(
                f"the transcoders differ in {what} ({values}); circuit-tracer's set needs one"
            )
    if layers[0].cfg["d_in"] != layers[0].cfg["d_out"]:
        raise UserError(
            "the transcoders' input and output widths differ; circuit-tracer needs d_model for both"
        )


def layer_tensors(r: LayerRun) -> dict[str, torch.Tensor]:
    """One transcoder in circuit-tracer's SingleLayerTranscoder layout, float32: W_enc
    transposed to [d_sae, d_model], b_dec taken off the input folded into b_enc, a JumpReLU
    threshold floored at 0 (the exported forward applies it after a ReLU, so a negative one
    keeps every positive activation, as 0 does)."""
    sd = {k: v.float() for k, v in r.weights.items()}
    b_enc = (
        sd["b_enc"] - sd["b_dec"] @ sd["W_enc"] if r.cfg["apply_b_dec_to_input"] else sd["b_enc"]
    )
    out = {"W_enc": sd["W_enc"].T, "b_enc": b_enc, "W_dec": sd["W_dec"], "b_dec": sd["b_dec"]}
    if "threshold" in sd:
        out["activation_function.threshold"] = sd["threshold"].clamp_min(0)
    if "W_skip" in sd:
        out["W_skip"] = sd["W_skip"]
    return {k: v.contiguous() for k, v in out.items()}


def _architecture(cfg: dict) -> str:
    """The SAELens architecture of a run's SAE (a transcoder's without its suffix)."""
    return sae_architecture(cfg["architecture"])
