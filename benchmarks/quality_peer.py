"""Peer side of bench_quality.py: train SAEs with one peer library on exported activations.

    PEER_PYTHON benchmarks/quality_peer.py TOOL --data train.safetensors --out DIR --arch topk \
        --lrs 1e-3,2e-3 --d-sae 1536 --k 16 --batch-size 4096 [...]

Runs in the peer's own virtual environment (bench_quality.py makes it), so it imports only
that peer, torch and safetensors, never saesweep. `--data` holds one tensor, `acts` [N, d],
already normalized: every tool trains on the same batches, rows [i * batch, (i + 1) * batch)
at step i. Each lr's SAE is saved in the peer's own format under DIR/lr-<i>/, with
probe.safetensors: the peer's own forward pass (loaded back the peer's way) on the tokens of
`--probe`, which bench_quality.py checks its loader against. DIR/result.json records the
training seconds, the peer's version and torch's.

TOOL is one of sparsify, dictionary_learning, sae_lens.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from importlib.metadata import version
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

PACKAGES = {
    "sparsify": "eai-sparsify",
    "dictionary_learning": "dictionary-learning",
    "sae_lens": "sae-lens",
}
"""The PyPI name of each tool, for its version."""


def batches(acts: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """The training batches in order (views of `acts`; a last partial batch is dropped)."""
    steps = len(acts) // batch_size
    return list(acts[: steps * batch_size].split(batch_size))


def decay_start(steps: int, decay_frac: float) -> int:
    """The step at which the lr starts its linear decay to 0 (saesweep's LRSchedule)."""
    return math.floor((1 - decay_frac) * steps)


def timed(train) -> float:
    """Wall seconds of train()."""
    start = time.perf_counter()
    train()
    return time.perf_counter() - start


# ---------------------------------------------------------------- sparsify


class CachedActivations(torch.nn.Module):
    """A stand-in for sparsify's language model: the "token ids" are row indices into the
    exported activations, and the hooked module `acts` is an embedding lookup of them."""

    def __init__(self, acts: torch.Tensor):
        super().__init__()
        self.base_model = torch.nn.Module()
        self.base_model.acts = torch.nn.Embedding.from_pretrained(acts, freeze=True)
        self.dummy_inputs = {"input_ids": torch.zeros(1, 1, dtype=torch.long)}

    @property
    def device(self) -> torch.device:
        return self.base_model.acts.weight.device

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.base_model.acts(input_ids)


class RowSequences(torch.utils.data.Dataset):
    """Sequence i is the rows [i * length, (i + 1) * length): one sequence per batch."""

    def __init__(self, n_rows: int, length: int):
        self.n, self.length = n_rows // length, length

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": torch.arange(i * self.length, (i + 1) * self.length)}


def train_sparsify(acts: torch.Tensor, args: argparse.Namespace) -> list[float]:
    """sparsify's own Trainer, one run per lr (its lr is per Trainer), fed the activations
    through CachedActivations; its defaults except width, k, the optimizer and AuxK flags."""
    from sparsify import SaeConfig, TrainConfig, Trainer

    if args.arch != "topk":
        raise SystemExit("sparsify trains TopK only (activation topk or groupmax)")
    model = CachedActivations(acts.to(args.device))
    seconds = []
    for i, lr in enumerate(args.lrs):
        cfg = TrainConfig(
            SaeConfig(num_latents=args.d_sae, k=args.k),
            batch_size=1,
            optimizer=args.sparsify_optimizer,
            lr=lr,
            lr_warmup_steps=args.warmup_steps,
            auxk_alpha=args.sparsify_auxk_alpha,
            hookpoints=["acts"],
            init_seeds=[args.seed + i],
            log_to_wandb=False,
            save_dir=str(args.out),
            run_name=f"lr-{i}",
            save_every=1 << 30,
        )
        trainer = Trainer(cfg, RowSequences(len(acts), args.batch_size), model)
        seconds.append(timed(trainer.fit))
    return seconds


# ---------------------------------------------------------------- dictionary_learning


def train_dictionary_learning(acts: torch.Tensor, args: argparse.Namespace) -> list[float]:
    """dictionary_learning's trainSAE with one trainer per lr, all stepped on each batch (its
    way of training several SAEs on one data stream); its defaults except the schedule
    (JumpReLU: and its L0 target, k; Matryoshka: the prefix widths, its groups weighted
    equally as by default)."""
    from dictionary_learning.trainers.batch_top_k import BatchTopKTrainer
    from dictionary_learning.trainers.jumprelu import JumpReluTrainer
    from dictionary_learning.trainers.matryoshka_batch_top_k import MatryoshkaBatchTopKTrainer
    from dictionary_learning.trainers.top_k import TopKTrainer
    from dictionary_learning.training import trainSAE

    data = batches(acts, args.batch_size)
    steps = len(data)
    trainer = {
        "topk": TopKTrainer,
        "batchtopk": BatchTopKTrainer,
        "jumprelu": JumpReluTrainer,
        "matryoshka": MatryoshkaBatchTopKTrainer,
    }
    if args.arch == "jumprelu":  # L0 target k; sparsity warmup as long as the lr's
        arch = {"target_l0": float(args.k), "sparsity_warmup_steps": args.warmup_steps}
    else:
        arch = {"k": args.k, "threshold_start_step": args.warmup_steps}
    if args.arch == "matryoshka":  # its groups are the prefixes' differences, as fractions
        ends = [*args.matryoshka_widths, args.d_sae]
        arch["group_fractions"] = [
            (b - a) / args.d_sae for a, b in zip([0, *ends[:-1]], ends, strict=True)
        ]
    configs = [
        {
            "trainer": trainer[args.arch],
            "steps": steps,
            "activation_dim": acts.shape[1],
            "dict_size": args.d_sae,
            "layer": 0,
            "lm_name": "cached",
            "lr": lr,
            "warmup_steps": args.warmup_steps,
            "decay_start": decay_start(steps, args.decay_frac),
            "seed": args.seed + i,
            "device": args.device,
        }
        | arch
        for i, lr in enumerate(args.lrs)
    ]
    out = str(args.out / "trainers")
    seconds = timed(lambda: trainSAE(data, configs, steps, save_dir=out, device=args.device))
    for i in range(len(args.lrs)):
        (args.out / "trainers" / f"trainer_{i}").rename(args.out / f"lr-{i}")
    return [seconds]


# ---------------------------------------------------------------- SAELens


def train_sae_lens(acts: torch.Tensor, args: argparse.Namespace) -> list[float]:
    """SAELens's SAETrainer (which takes any iterator of activation batches), one run per
    lr; its defaults except the schedule (JumpReLU: its quadratic loss around L0 k, with
    --l0-coefficient; Matryoshka: the prefix widths); saved with save_inference_model (BatchTopK
    and Matryoshka as JumpReLU)."""
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
    from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig
    from sae_lens.saes.matryoshka_batchtopk_sae import (
        MatryoshkaBatchTopKTrainingSAE,
        MatryoshkaBatchTopKTrainingSAEConfig,
    )
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    data = batches(acts, args.batch_size)
    steps = len(data)
    seconds = []
    for i, lr in enumerate(args.lrs):
        torch.manual_seed(args.seed + i)
        shape = {"d_in": acts.shape[1], "d_sae": args.d_sae, "device": args.device}
        if args.arch == "topk":
            sae = TopKTrainingSAE(TopKTrainingSAEConfig(k=args.k, **shape))
        elif args.arch == "batchtopk":
            sae = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(k=float(args.k), **shape))
        elif args.arch == "matryoshka":
            widths = [*args.matryoshka_widths, args.d_sae]
            sae = MatryoshkaBatchTopKTrainingSAE(
                MatryoshkaBatchTopKTrainingSAEConfig(
                    k=float(args.k), matryoshka_widths=widths, **shape
                )
            )
        else:
            quadratic = {"jumprelu_sparsity_loss_mode": "quadratic", "target_l0": float(args.k)}
            sae = JumpReLUTrainingSAE(
                JumpReLUTrainingSAEConfig(l0_coefficient=args.l0_coefficient, **quadratic, **shape)
            )
        cfg = SAETrainerConfig(
            total_training_samples=steps * args.batch_size,
            train_batch_size_samples=args.batch_size,
            lr=lr,
            lr_end=lr,
            lr_warm_up_steps=args.warmup_steps,
            lr_decay_steps=steps - decay_start(steps, args.decay_frac),
            device=args.device,
        )
        trainer = SAETrainer(cfg, sae, data_provider=iter(data))
        seconds.append(timed(trainer.fit))
        sae.save_inference_model(args.out / f"lr-{i}")
    return seconds


def sparsify_forward(run_dir: Path, arch: str, x: torch.Tensor) -> torch.Tensor:
    """sparsify's reconstruction of x by the SAE it saved in run_dir."""
    from sparsify import SparseCoder

    return SparseCoder.load_from_disk(run_dir / "acts")(x).sae_out


def dictionary_learning_forward(run_dir: Path, arch: str, x: torch.Tensor) -> torch.Tensor:
    """dictionary_learning's reconstruction of x (BatchTopK, Matryoshka: the inference
    threshold)."""
    from dictionary_learning.dictionary import JumpReluAutoEncoder
    from dictionary_learning.trainers.batch_top_k import BatchTopKSAE
    from dictionary_learning.trainers.matryoshka_batch_top_k import MatryoshkaBatchTopKSAE
    from dictionary_learning.trainers.top_k import AutoEncoderTopK

    cls = {
        "topk": AutoEncoderTopK,
        "batchtopk": BatchTopKSAE,
        "jumprelu": JumpReluAutoEncoder,
        "matryoshka": MatryoshkaBatchTopKSAE,
    }
    return cls[arch].from_pretrained(run_dir / "ae.pt")(x)


def sae_lens_forward(run_dir: Path, arch: str, x: torch.Tensor) -> torch.Tensor:
    """SAELens's reconstruction of x by the inference SAE it saved (BatchTopK as JumpReLU)."""
    from sae_lens import SAE

    return SAE.load_from_disk(run_dir)(x)


FORWARDS = {
    "sparsify": sparsify_forward,
    "dictionary_learning": dictionary_learning_forward,
    "sae_lens": sae_lens_forward,
}

TRAINERS = {
    "sparsify": train_sparsify,
    "dictionary_learning": train_dictionary_learning,
    "sae_lens": train_sae_lens,
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tool", choices=sorted(TRAINERS))
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--probe", type=Path, required=True, help="tokens x to reconstruct")
    parser.add_argument(
        "--arch", choices=["topk", "batchtopk", "jumprelu", "matryoshka"], default="topk"
    )
    parser.add_argument("--lrs", type=lambda s: [float(v) for v in s.split(",")], required=True)
    parser.add_argument("--d-sae", type=int, required=True)
    parser.add_argument("--k", type=int, required=True)
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--warmup-steps", type=int, default=100)
    parser.add_argument("--decay-frac", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sparsify-optimizer", choices=["signum", "adam"], default="signum")
    parser.add_argument("--sparsify-auxk-alpha", type=float, default=0.0)
    parser.add_argument("--l0-coefficient", type=float, default=1.0, help="SAELens JumpReLU")
    parser.add_argument(
        "--matryoshka-widths",
        type=lambda s: [int(v) for v in s.split(",")],
        default=[],
        help="Matryoshka: the inner prefixes' widths, increasing, below --d-sae",
    )
    args = parser.parse_args(argv)
    acts = load_file(str(args.data))["acts"]
    args.out.mkdir(parents=True, exist_ok=True)
    seconds = TRAINERS[args.tool](acts, args)
    probe = load_file(str(args.probe))["acts"]
    with torch.no_grad():
        for i in range(len(args.lrs)):
            run_dir = args.out / f"lr-{i}"
            recon = FORWARDS[args.tool](run_dir, args.arch, probe)
            save_file({"recon": recon.contiguous()}, str(run_dir / "probe.safetensors"))
    steps = len(acts) // args.batch_size
    result = {
        "train_s": seconds,
        "tokens": steps * args.batch_size,
        "lrs": args.lrs,
        "version": version(PACKAGES[args.tool]),
        "torch": torch.__version__,
    }
    (args.out / "result.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
