"""Benchmark: SAE quality against peer libraries, trained on the same cached activations.

    uv run benchmarks/bench_quality.py [--uri data/demo] [--val-uri URI] [--n-train 1000000]
        [--d-sae 1536] [--k 16] [--batch-size 4096] [--archs topk,batchtopk,jumprelu,matryoshka]
        [--l0-coefficient 1]
        [--tools saesweep,sparsify,dictionary_learning,sae_lens] [--lrs 2e-4,...]

The collection's training tokens (all shards but the last) are exported once, in the order
saesweep's Reader serves them to train.py (seed 0) and normalized as saesweep normalizes them
(E||x|| = sqrt(d_model), from the collection's statistics); every peer reads that file in
order, so every tool trains on the same batches (with saesweep the only tool nothing is
exported: train.py reads the collection). saesweep trains its lr grid as one group
(train.py); each peer runs benchmarks/quality_peer.py in its own virtual environment under
--peers-root, made here with uv when missing (never a project dependency). Every SAE is then
loaded from the weights its tool saved into one form (Dictionary) and evaluated by one
function on the collection's last shard (--val-uri's, where given: another collection of the
same tokens, e.g. the bfloat16 collection of an 8-bit one): FVU (saesweep's definition), L0
and dead %. The
same function on saesweep's weights must agree with saesweep's own metrics.json, and each
peer's loaded form must reconstruct probe tokens as the peer's own forward pass does.

tokens/s is training tokens x SAEs per second of training (saesweep: its group's rate; a peer:
its training calls, timed inside the peer process).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, replace
from importlib.metadata import version
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from saesweep.errors import exit_on_user_error
from saesweep.sae import SAEConfig
from saesweep.sae.matryoshka import prefix_widths
from saesweep.train.config import DataConfig, GroupConfig
from saesweep.train.sources import StoreSource

ROOT = Path(__file__).resolve().parents[1]
PEER_SCRIPT = ROOT / "benchmarks" / "quality_peer.py"
PROBE_TOKENS = 1024
"""Held-out tokens on which each peer's own forward pass checks the loaded form."""
WORK_MARKER = "bench-quality"
"""The file that marks --work as this benchmark's (emptied at each run)."""


@dataclass(frozen=True)
class Peer:
    """A peer library: what to install in its environment and the architectures it trains."""

    package: str
    archs: tuple[str, ...]


PEERS = {
    "sparsify": Peer("eai-sparsify==1.3.3", ("topk",)),
    "dictionary_learning": Peer(
        "dictionary-learning==0.1.0", ("topk", "batchtopk", "jumprelu", "matryoshka")
    ),
    "sae_lens": Peer("sae-lens==6.54.12", ("topk", "batchtopk", "jumprelu", "matryoshka")),
}
ADAM_LRS = [2e-4 * 24 ** (i / 7) for i in range(11)]
"""2e-4 ... 1.9e-2, geometric (ratio 24^(1/7)): the Adam tools' default grid, issue 18's eight
values 2e-4 ... 4.8e-3 and three above them, where saesweep's and dictionary_learning's best
lie at 1M tokens (dictionary_learning's default lr at 1,536 latents, 6.5e-4, is between the
3rd and 4th)."""
SIGNUM_LRS = [10 * lr for lr in ADAM_LRS[:8]]
"""2e-3 ... 4.8e-2: sparsify's signum grid (its default lr at 1,536 latents is 1.6e-2)."""


# ---------------------------------------------------------------- the common form


@dataclass(frozen=True)
class Dictionary:
    """One SAE as every tool's weights can be written: it reads x * input_scale, encodes
    relu((x - b_dec if subtract_b_dec else x) @ W_enc + b_enc), keeps each token's k largest
    (k set) or the values above threshold (a scalar or [d_sae]), and decodes codes @ W_dec +
    b_dec, in the space it read."""

    W_enc: torch.Tensor
    """[d_in, d_sae]"""
    b_enc: torch.Tensor
    W_dec: torch.Tensor
    """[d_sae, d_in]"""
    b_dec: torch.Tensor
    subtract_b_dec: bool
    k: int | None
    threshold: torch.Tensor | None
    input_scale: float

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """[B, d_sae] relu of the encoder's output for x (already times input_scale)."""
        x_in = x - self.b_dec if self.subtract_b_dec else x
        return (x_in @ self.W_enc + self.b_enc).relu()

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """Dense [B, d_sae] codes of x (already times input_scale)."""
        pre = self.pre_activations(x)
        if self.k is not None:
            values, indices = pre.topk(self.k, dim=-1)
            return torch.zeros_like(pre).scatter(-1, indices, values)
        return pre * (pre > self.threshold)


@torch.no_grad()
def evaluate(sae: Dictionary, acts: torch.Tensor, batch_size: int = 4096) -> dict[str, float]:
    """FVU, L0 and dead % of `sae` on raw activations `acts`, as saesweep.evaluate.metrics
    defines them: FVU = sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 (float64 sums, the mean of
    these tokens), L0 the mean number of positive codes per token, dead % the latents positive
    on none of these tokens."""
    sse, active = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
    total = torch.zeros(acts.shape[1], dtype=torch.float64)
    squares = torch.zeros(acts.shape[1], dtype=torch.float64)
    fired = torch.zeros(sae.W_enc.shape[1], dtype=torch.bool)
    for raw in acts.split(batch_size):
        x = raw * sae.input_scale
        codes = sae.codes(x)
        sse += ((codes @ sae.W_dec + sae.b_dec).double() - x.double()).pow(2).sum()
        active += (codes > 0).sum()
        fired |= (codes > 0).any(0)
        total += x.double().sum(0)
        squares += x.double().pow(2).sum(0)
    variance = (squares - total.pow(2) / len(acts)).sum()
    return {
        "fvu": float(sse / variance),
        "l0": float(active / len(acts)),
        "dead_pct": float(100 * (~fired).double().mean()),
    }


def load_sae_lens_layout(run_dir: Path, input_scale: float) -> Dictionary:
    """saesweep's and SAELens's checkpoints (cfg.json, sae_weights.safetensors; topk, or
    jumprelu for BatchTopK); decoder norms folded in where the cfg rescales by them."""
    cfg = json.loads((run_dir / "cfg.json").read_text())
    sd = load_file(str(run_dir / "sae_weights.safetensors"))
    W_enc, b_enc, W_dec = sd["W_enc"], sd["b_enc"], sd["W_dec"]
    if cfg.get("rescale_acts_by_decoder_norm"):
        norms = W_dec.norm(dim=1).clamp_min(1e-8)
        W_enc, b_enc, W_dec = W_enc * norms, b_enc * norms, W_dec / norms[:, None]
    arch = cfg["architecture"]
    if arch not in ("topk", "jumprelu"):
        raise ValueError(f"{run_dir}: architecture {arch!r} is not compared here")
    return Dictionary(
        W_enc,
        b_enc,
        W_dec,
        sd["b_dec"],
        cfg["apply_b_dec_to_input"],
        cfg["k"] if arch == "topk" else None,
        sd["threshold"] if arch == "jumprelu" else None,
        input_scale,
    )


def load_sparsify(run_dir: Path, input_scale: float) -> Dictionary:
    """sparsify's save_to_disk (acts/cfg.json, acts/sae.safetensors): relu, then top-k of
    (x - b_dec) @ encoder.weight.T + encoder.bias."""
    cfg = json.loads((run_dir / "acts" / "cfg.json").read_text())
    sd = load_file(str(run_dir / "acts" / "sae.safetensors"))
    return Dictionary(
        sd["encoder.weight"].T,
        sd["encoder.bias"],
        sd["W_dec"],
        sd["b_dec"],
        True,
        cfg["k"],
        None,
        input_scale,
    )


def load_dictionary_learning(run_dir: Path, input_scale: float) -> Dictionary:
    """dictionary_learning's trainSAE output (ae.pt, config.json): TopK keeps each token's k
    largest, BatchTopK and Matryoshka their scalar inference threshold, JumpReLU its
    per-latent thresholds (what each one's forward does)."""
    cfg = json.loads((run_dir / "config.json").read_text())["trainer"]
    sd = torch.load(run_dir / "ae.pt", weights_only=True)
    if cfg["dict_class"] in ("JumpReluAutoEncoder", "MatryoshkaBatchTopKSAE"):
        W = sd["W_enc"], sd["b_enc"], sd["W_dec"], sd["b_dec"]
        subtract_b_dec = cfg["dict_class"] == "MatryoshkaBatchTopKSAE"  # JumpReLU's does not
        return Dictionary(*W, subtract_b_dec, None, sd["threshold"], input_scale)
    topk = cfg["dict_class"] == "AutoEncoderTopK"
    return Dictionary(
        sd["encoder.weight"].T,
        sd["encoder.bias"],
        sd["decoder.weight"].T,
        sd["b_dec"],
        True,
        int(sd["k"]) if topk else None,
        None if topk else sd["threshold"],
        input_scale,
    )


LOADERS = {
    "saesweep": load_sae_lens_layout,
    "sae_lens": load_sae_lens_layout,
    "sparsify": load_sparsify,
    "dictionary_learning": load_dictionary_learning,
}


# ---------------------------------------------------------------- data


def bench_config(args: argparse.Namespace) -> GroupConfig:
    """The group config train.py builds from the flags run_saesweep passes."""
    return GroupConfig(
        train_data=DataConfig(uri=args.uri, shards=":-1"),
        val_data=DataConfig(uri=args.val_uri, shards="-1:"),
        n_train=args.n_train,
        n_val=args.n_val,
        batch_size=args.batch_size,
        device=args.device,
    )


def held_out(args: argparse.Namespace) -> tuple[StoreSource, torch.Tensor, float]:
    """(the source train.py reads, the raw held-out activations the trainer evaluates on, the
    normalization scale it applies)."""
    cfg = bench_config(args)
    source = StoreSource(cfg)
    hook = source.reader.hook
    acts = source.held_out_activations(cfg.n_val, None)[0][hook]
    return source, acts, source.normalizer.scales[hook]


def export(args: argparse.Namespace, work: Path) -> tuple[Path, torch.Tensor, float]:
    """(the training file, the raw held-out activations, the normalization scale): the
    batches train.py's source serves, times the scale the trainer applies, written in order
    as one float32 tensor `acts`; the first PROBE_TOKENS held-out tokens, normalized, are
    also written as probe.safetensors."""
    source, held, scale = held_out(args)
    hook, batch_size = source.reader.hook, args.batch_size
    steps = math.ceil(args.n_train / batch_size)
    acts = torch.empty(steps * batch_size, source.d_model)
    for step, batch in zip(range(steps), source, strict=False):
        acts[step * batch_size : (step + 1) * batch_size] = batch[hook] * scale
    save_file({"acts": held[:PROBE_TOKENS] * scale}, str(work / "probe.safetensors"))
    path = work / "train.safetensors"
    save_file({"acts": acts}, str(path), metadata={"uri": args.uri, "scale": repr(scale)})
    return path, held, scale


# ---------------------------------------------------------------- training


@dataclass
class Trained:
    """The SAEs one tool trained for one architecture, and how fast."""

    tool: str
    arch: str
    runs: list[tuple[float, Path]]
    """(lr, run directory) of every SAE."""
    seconds: list[float]
    """Training seconds of each run (one entry for a whole group)."""
    saes_per_run: int
    tokens: int
    version: str
    metrics: list[dict | None] = dataclasses.field(default_factory=list)
    """The tool's own metrics of each run (saesweep's metrics.json), where it writes them."""

    @property
    def tokens_per_s(self) -> float:
        """Training tokens x SAEs per second of training, over all runs."""
        return self.tokens * len(self.runs) / sum(self.seconds)

    def run_tokens_per_s(self, i: int) -> float:
        """The rate of the job that trained run i."""
        seconds = self.seconds[i // self.saes_per_run]
        return self.tokens * self.saes_per_run / seconds


def run_saesweep(args: argparse.Namespace, arch: str, work: Path, d_in: int) -> Trained:
    """train.py with a sweep of the lr grid: one group, debug executor, wandb, downstream
    fidelity and absorption off; reads the collection itself (the export's order)."""
    runs_root = work / f"saesweep-{arch}"
    sweep = work / f"sweep-{arch}.py"
    sweep.write_text(f"def make_cfgs():\n    return [{{'lr': lr}} for lr in {args.lrs!r}]\n")
    cfg = bench_config(args)
    flags = {
        "--sweep": sweep,
        "--executor": "debug",
        "--runs-root": runs_root,
        "--train-data.uri": cfg.train_data.uri,
        "--val-data.uri": cfg.val_data.uri,
        "--n-train": cfg.n_train,
        "--n-val": cfg.n_val,
        "--batch-size": cfg.batch_size,
        "--device": cfg.device,
        "--sae.arch": arch,
        "--sae.d-sae": args.d_sae,
        "--sae.k": args.k,
        "--warmup-steps": args.warmup_steps,
        "--decay-frac": args.decay_frac,
        "--wandb-mode": "disabled",
        "--downstream-sequences": 0,
        "--absorption.n-tokens": 0,
        "--log-every": 1_000_000,
    }
    if arch == "jumprelu":  # SAELens's quadratic L0 loss around k, its coefficient per element
        flags |= {
            "--objective.target-l0": args.k,
            "--objective.sparsity-coeff": args.l0_coefficient / d_in,
        }
    cmd = [sys.executable, str(ROOT / "train.py"), *(str(v) for kv in flags.items() for v in kv)]
    cmd += shlex.split(args.saesweep_args)
    if not args.evaluate_only:
        logged(cmd, work / f"saesweep-{arch}.log")
    run_dirs = sorted(runs_root.glob("*/runs/*"))
    metrics = [json.loads((d / "metrics.json").read_text()) for d in run_dirs]
    last = json.loads((run_dirs[0] / "metrics.jsonl").read_text().splitlines()[-1])
    tokens = metrics[0]["tokens_seen"]
    return Trained(
        "saesweep",
        arch,
        [(m["lr"], d) for m, d in zip(metrics, run_dirs, strict=True)],
        [tokens / last["tokens_per_s"]],
        len(run_dirs),
        tokens,
        f"{version('saesweep')} (torch {torch.__version__})",
        metrics,
    )


def run_peer(args: argparse.Namespace, tool: str, arch: str, data: Path, work: Path) -> Trained:
    """quality_peer.py in the tool's environment on the exported training file."""
    out = work / f"{tool}-{arch}"
    signum = tool == "sparsify" and args.sparsify_optimizer == "signum"
    lrs = args.sparsify_lrs if signum else args.lrs
    # saesweep's default Matryoshka prefixes (d_in unused: d_sae is set), given to every tool
    inner_prefixes = prefix_widths(SAEConfig(arch="matryoshka", d_sae=args.d_sae), 0)
    cmd = [
        str(peer_python(args.peers_root, tool, args.torch)),
        str(PEER_SCRIPT),
        tool,
        "--data", str(data),
        "--out", str(out),
        "--probe", str(work / "probe.safetensors"),
        "--arch", arch,
        "--lrs", ",".join(repr(lr) for lr in lrs),
        "--d-sae", str(args.d_sae),
        "--k", str(args.k),
        "--batch-size", str(args.batch_size),
        "--warmup-steps", str(args.warmup_steps),
        "--decay-frac", str(args.decay_frac),
        "--device", args.device,
        "--sparsify-optimizer", args.sparsify_optimizer,
        "--sparsify-auxk-alpha", str(args.sparsify_auxk_alpha),
        "--l0-coefficient", str(args.l0_coefficient),
        "--matryoshka-widths", ",".join(str(w) for w in inner_prefixes[:-1]),
    ]  # fmt: skip
    if not args.evaluate_only:
        logged(cmd, work / f"{tool}-{arch}.log")
    result = json.loads((out / "result.json").read_text())
    return Trained(
        tool,
        arch,
        [(lr, out / f"lr-{i}") for i, lr in enumerate(lrs)],
        result["train_s"],
        len(lrs) // len(result["train_s"]),
        result["tokens"],
        f"{result['version']} (torch {result['torch']})",
        [None] * len(lrs),
    )


def logged(cmd: list[str], log: Path) -> None:
    """Run cmd with its output in `log`; on failure, exit naming the log and its tail."""
    with open(log, "w") as f:
        code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    if code != 0:
        tail = "\n".join(log.read_text().splitlines()[-20:])
        raise SystemExit(f"{cmd[0]} {cmd[1]} failed (exit {code}); {log} ends:\n{tail}")


def peer_python(root: Path, tool: str, torch_spec: str) -> Path:
    """The tool's environment (root/tool), made when missing or made for another spec: a uv
    venv, torch by pip (which takes a local wheel where pip's configuration names one), then
    the package by uv with torch pinned."""
    venv = root / tool
    python, marker = venv / "bin" / "python", venv / "bench-quality.json"
    spec = {"package": PEERS[tool].package, "torch": torch_spec}
    if marker.exists() and json.loads(marker.read_text()) == spec:
        return python
    print(f"making the {tool} environment in {venv} ({spec['package']}, {torch_spec})")
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    uv_pip = ["uv", "pip", "install", "-q", "--python", str(python)]
    steps = [
        ["uv", "venv", "-q", "--clear", "--seed", "--python", version, str(venv)],
        [str(python), "-m", "pip", "install", "-q", torch_spec],
        [*uv_pip, spec["package"], torch_spec],
    ]
    if tool == "dictionary_learning":
        # nnsight brings PyPI's torchvision, which fails to import beside another torch
        # build, and transformers imports it whenever it is installed
        steps.append(["uv", "pip", "uninstall", "-q", "--python", str(python), "torchvision"])
    for step in steps:
        subprocess.run(step, check=True)
    marker.write_text(json.dumps(spec))
    return python


# ---------------------------------------------------------------- results


def evaluate_all(trained: list[Trained], held: torch.Tensor, scale: float, k: int) -> list[dict]:
    """One row per SAE: the evaluation of its saved weights (peers read x * scale, saesweep's
    checkpoints raw activations); saesweep's rows checked against its metrics.json. An SAE
    with inference thresholds (BatchTopK, JumpReLU), whose L0 is not k exactly, also gets
    `fvu_at_k` and `dead_pct_at_k`: with its thresholds shifted to give L0 = k on the
    held-out tokens (threshold_for_l0), the comparison at one L0."""
    rows = []
    for t in trained:
        input_scale = 1.0 if t.tool == "saesweep" else scale
        for i, ((lr, run_dir), own) in enumerate(zip(t.runs, t.metrics, strict=True)):
            sae = LOADERS[t.tool](run_dir, input_scale)
            result = evaluate(sae, held)
            if own is not None:
                check_agrees(result, own, run_dir)
            else:
                check_forward(sae, held[:PROBE_TOKENS], run_dir)
            if sae.threshold is not None:
                at_k = evaluate(replace(sae, threshold=threshold_for_l0(sae, held, k)), held)
                if abs(at_k["l0"] - k) > 1e-3:  # float rounding of the shifted thresholds
                    raise SystemExit(f"{run_dir}: shifted to L0 {k}, it gives {at_k['l0']}")
                result |= {"fvu_at_k": at_k["fvu"], "dead_pct_at_k": at_k["dead_pct"]}
            rows.append(
                {"tool": t.tool, "arch": t.arch, "lr": lr}
                | result
                | {"tokens_per_s": t.run_tokens_per_s(i)}
            )
    return rows


@torch.no_grad()
def threshold_for_l0(sae: Dictionary, acts: torch.Tensor, l0: float) -> torch.Tensor:
    """`sae`'s thresholds, all shifted by one constant so that its L0 on `acts` is l0: the
    shift is the (N * l0 + 1)-th largest excess of a positive pre-activation over its
    latent's threshold, so exactly N * l0 of them exceed their shifted thresholds."""
    pre = sae.pre_activations(acts * sae.input_scale)
    excess = (pre - sae.threshold)[pre > 0]
    return sae.threshold + excess.topk(round(len(acts) * l0) + 1).values[-1]


def check_agrees(ours: dict, theirs: dict, run_dir: Path) -> None:
    """Exit unless the benchmark's evaluation matches saesweep's metrics.json: float32
    arithmetic in another order, so 1e-5 relative on FVU and L0 (a near tie at a BatchTopK
    threshold flips single activations: seen, one of 33,190 x 13), dead % within one latent."""
    close = all(
        math.isclose(ours[key], theirs[key], rel_tol=1e-5, abs_tol=1e-9) for key in ("fvu", "l0")
    )
    one_latent = 100 / theirs["d_sae"]
    if not close or abs(ours["dead_pct"] - theirs["dead_pct"]) > one_latent:
        keys = ("fvu", "l0", "dead_pct")
        raise SystemExit(
            f"the evaluation disagrees with {run_dir}/metrics.json: "
            f"{ {k: ours[k] for k in keys} } against { {k: theirs[k] for k in keys} }"
        )


@torch.no_grad()
def check_forward(sae: Dictionary, raw: torch.Tensor, run_dir: Path) -> None:
    """Exit unless `sae` reconstructs the probe tokens as the peer's own forward pass did
    (run_dir/probe.safetensors): 1e-4 relative error per token on 99 % of them (a near tie
    in the top-k or at a threshold may pick another latent on a few)."""
    x = raw * sae.input_scale
    theirs = load_file(str(run_dir / "probe.safetensors"))["recon"]
    ours = sae.codes(x) @ sae.W_dec + sae.b_dec
    error = (ours - theirs).norm(dim=1) / theirs.norm(dim=1).clamp_min(1e-12)
    agree = float((error < 1e-4).double().mean())
    if agree < 0.99:
        raise SystemExit(
            f"the loaded form of {run_dir} reconstructs only {100 * agree:.1f} % of the probe "
            f"tokens as the peer does (median relative error {float(error.median()):.2e})"
        )


def print_table(rows: list[dict], trained: list[Trained], k: int) -> None:
    """Every SAE, each tool's best per architecture (lowest `score`), and the ratios."""
    print(f"{'tool':20s}{'arch':10s}{'lr':>10s}{'FVU':>9s}{'L0':>8s}", end="")
    print(f"{'dead %':>8s}{'tokens/s':>11s}   at L0 = k: FVU, dead %")
    for r in rows:
        at_k = f"{r['fvu_at_k']:13.4f}{r['dead_pct_at_k']:8.2f}" if "fvu_at_k" in r else ""
        print(
            f"{r['tool']:20s}{r['arch']:10s}{r['lr']:10.2e}{r['fvu']:9.4f}{r['l0']:8.2f}"
            f"{r['dead_pct']:8.2f}{r['tokens_per_s']:11,.0f}{at_k}"
        )
    print("\nbest per tool (lowest FVU, at L0 = k where thresholds set L0; tokens/s of all):")
    best = {}
    for t in trained:
        mine = [r for r in rows if (r["tool"], r["arch"]) == (t.tool, t.arch)]
        b = best[t.tool, t.arch] = at_one_l0(min(mine, key=score), k) | {"rate": t.tokens_per_s}
        print(
            f"{t.tool:20s}{t.arch:10s}{b['lr']:10.2e}{b['fvu']:9.4f}{b['l0']:8.2f}"
            f"{b['dead_pct']:8.2f}{b['rate']:11,.0f}  {t.version}"
        )
    for arch in sorted({a for _, a in best}):
        ours = best.get(("saesweep", arch))
        peers = {tool: b for (tool, a), b in best.items() if a == arch and tool != "saesweep"}
        if ours is None or not peers:
            continue
        fvus = ", ".join(f"{ours['fvu'] / b['fvu']:.3f} vs {tool}" for tool, b in peers.items())
        fastest = max(peers, key=lambda tool: peers[tool]["rate"])
        print(
            f"{arch}: saesweep best FVU / peer best FVU: {fvus}; saesweep tokens/s / fastest "
            f"peer ({fastest}): {ours['rate'] / peers[fastest]['rate']:.2f}"
        )


def score(row: dict) -> float:
    """What a tool's best minimizes: FVU at L0 = k where the SAE has one, else its FVU."""
    return row.get("fvu_at_k", row["fvu"])


def at_one_l0(row: dict, k: int) -> dict:
    """The row with FVU, L0 and dead % at L0 = k where it has them."""
    if "fvu_at_k" not in row:
        return row
    return row | {"fvu": row["fvu_at_k"], "l0": float(k), "dead_pct": row["dead_pct_at_k"]}


def fresh_work_dir(work: Path) -> None:
    """Empty `work` (made by an earlier run of this benchmark: it holds WORK_MARKER), or make
    it; a directory of something else is refused."""
    marker = work / WORK_MARKER
    if work.exists() and any(work.iterdir()) and not marker.exists():
        raise SystemExit(f"{work} is not empty and not this benchmark's; choose another --work")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    marker.touch()


def parse_lrs(text: str) -> list[float]:
    return [float(v) for v in text.split(",")]


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--uri", default="data/demo")
    parser.add_argument(
        "--val-uri",
        default="",
        help="evaluate on this collection's last shard instead (the same tokens, e.g. the "
        "bfloat16 collection of an 8-bit one)",
    )
    parser.add_argument("--n-train", type=int, default=1_000_000)
    parser.add_argument("--n-val", type=int, default=100_000, help="held-out tokens at most")
    parser.add_argument("--d-sae", type=int, default=1536)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument(
        "--archs",
        type=lambda s: s.split(","),
        default=["topk", "batchtopk", "jumprelu", "matryoshka"],
    )
    parser.add_argument("--tools", type=lambda s: s.split(","), default=["saesweep", *PEERS])
    parser.add_argument("--lrs", type=parse_lrs, default=ADAM_LRS, help="the Adam tools' grid")
    parser.add_argument("--sparsify-lrs", type=parse_lrs, default=SIGNUM_LRS)
    parser.add_argument("--sparsify-optimizer", choices=["signum", "adam"], default="signum")
    parser.add_argument("--sparsify-auxk-alpha", type=float, default=0.0)
    parser.add_argument(
        "--l0-coefficient",
        type=float,
        default=1.0,
        help="JumpReLU: lambda of the quadratic L0 loss around k (SAELens's l0_coefficient; "
        "saesweep gets lambda / d_in, its per-element convention)",
    )
    parser.add_argument(
        "--saesweep-args", default="", help="more train.py flags, e.g. for an ablation"
    )
    parser.add_argument("--warmup-steps", type=int, default=100)
    parser.add_argument("--decay-frac", type=float, default=0.2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench-quality"))
    parser.add_argument("--peers-root", type=Path, default=Path("/tmp/bench-peers"))
    parser.add_argument("--torch", default="torch==2.13.0", help="the peers' torch (pip spec)")
    parser.add_argument(
        "--evaluate-only",
        action="store_true",
        help="evaluate the SAEs an earlier run with the same flags left in --work, train none",
    )
    args = parser.parse_args(argv)
    unknown = set(args.tools) - {"saesweep", *PEERS}
    if unknown:
        parser.error(f"unknown tools {sorted(unknown)}")
    if not args.evaluate_only:
        fresh_work_dir(args.work)
    if args.evaluate_only or args.tools == ["saesweep"]:  # train.py reads the collection itself
        data, (_, held, scale) = args.work / "train.safetensors", held_out(args)
    else:
        data, held, scale = export(args, args.work)
        print(f"exported {data} ({args.uri}, scale {scale:.4f}); {len(held):,} held-out tokens")
    trained = []
    for arch in args.archs:
        for tool in args.tools:
            if tool == "saesweep":
                trained.append(run_saesweep(args, arch, args.work, held.shape[1]))
            elif arch in PEERS[tool].archs:
                trained.append(run_peer(args, tool, arch, data, args.work))
            else:
                print(f"{tool} has no {arch}: skipped")
    rows = evaluate_all(trained, held, scale, args.k)
    (args.work / "results.json").write_text(json.dumps(rows, indent=1))
    print_table(rows, trained, args.k)


if __name__ == "__main__":
    main()
