"""Training configs: frozen dataclasses whose field docstrings are train.py's --help."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Literal

from saesweep.errors import UserError
from saesweep.sae.config import ObjectiveConfig, SAEConfig


@dataclass(frozen=True)
class DataConfig:
    """Which stored activations to read and how."""

    uri: str = "data/demo"
    """Collection root: a path, file:// URI or s3://bucket/prefix ('' for val: same as train)."""
    hook: str | None = None
    """Hook to read (module path or short form); optional when the collection has one hook."""
    layer: int | None = None
    """Layer to read, as an alternative to hook."""
    shards: str = ":"
    """Python slice over the collection's shards, e.g. ':-1' (all but the last) or '-1:'."""
    n_threads: int = 2
    """The reader's fetch workers: threads mapping local shards, or event-loop threads
    receiving S3 range GETs."""
    shuffle_tokens: int = 1 << 20
    """Tokens shuffled together (the reader's shuffle window)."""
    seed: int = 0
    """Data order seed (shared by the whole group that reads this data)."""
    normalize: Literal["norm", "none"] = "norm"
    """'norm': scale inputs so E||x|| = sqrt(d_model) (folded back into saved weights)."""
    collect: str = "configs/demo.toml"
    """Collection config (TOML) to run first when uri holds no collection yet ('' to never)."""


@dataclass(frozen=True)
class TrainConfig:
    """One SAE's training run; a sweep file varies these fields."""

    lr: float | None = None
    """Peak learning rate; default 2e-4 / sqrt(d_sae / 2**14)."""
    seed: int = 42
    """Seed of the SAE's initial weights; a sweep gives config i the seed base + i."""
    tag: str = ""
    """Free-form label shown in the report and run names."""
    sae: SAEConfig = field(default_factory=SAEConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    train_data: DataConfig = field(default_factory=lambda: DataConfig(shards=":-1"))
    val_data: DataConfig = field(default_factory=lambda: DataConfig(uri="", shards="-1:"))
    n_train: int = 1_000_000
    """Training tokens (the data is repeated when it holds fewer)."""
    n_val: int = 100_000
    """Evaluation tokens at most."""
    downstream_sequences: int = 64
    """Held-out sequences for downstream fidelity (SAE spliced into the model); 0 skips it."""
    batch_size: int = 4096
    """Tokens per training step."""
    warmup_steps: int = 100
    """Linear learning-rate warmup steps."""
    lr_decay: Literal["none", "linear", "cosine"] = "linear"
    """Learning-rate decay to zero over the last decay_frac of training."""
    decay_frac: float = 0.2
    """Fraction of training over which the learning rate decays."""
    max_grad_norm: float = 1.0
    """Per-SAE gradient-norm clip."""
    log_every: int = 20
    """Steps between metric logs."""
    ckpt_every: int = 200
    """Steps between trainer-state checkpoints (for resume and requeue)."""
    device: str = "cpu"
    """Torch device of the group ('cpu', 'cuda')."""
    autocast: Literal["none", "bfloat16"] = "none"
    """bf16 autocast for the SAE forward/backward on GPUs."""
    runs_root: str = "runs"
    """Directory that receives the sweep directory."""
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"
    """wandb: offline runs (sync later with `wandb sync`), online, or disabled."""
    wandb_project: str = "saesweep"
    """wandb project."""
    slurm_acct: str | None = None
    """Slurm account: each parallel group runs as one Slurm job."""
    slurm_partition: str | None = None
    """Slurm partition."""
    n_hours: float = 1.0
    """Slurm time limit per group, in hours."""
    gpus_per_group: int = 0
    """GPUs per Slurm job."""
    cpus_per_group: int = 2
    """CPUs per Slurm job."""
    mem_gb: float | None = None
    """Memory per Slurm job in GB (default: the partition's)."""


GROUP_FIELDS = (
    "train_data",
    "val_data",
    "n_train",
    "n_val",
    "downstream_sequences",
    "batch_size",
    "device",
    "autocast",
    "log_every",
    "ckpt_every",
    "runs_root",
    "wandb_mode",
    "wandb_project",
    "slurm_acct",
    "slurm_partition",
    "n_hours",
    "gpus_per_group",
    "cpus_per_group",
    "mem_gb",
)
"""Fields that change data loading or where a job runs: configs that differ in any of them
run in separate parallel groups. Everything else (lr, seed, sae, objective, tag, schedules)
may differ inside a group."""


Rule = tuple[Callable[[float], bool], str]


def _above(low: float, optional: bool = False) -> Rule:
    return (lambda v: (optional and v is None) or v > low), f"greater than {low}" + (
        " or unset" if optional else ""
    )


def _at_least(low: int, optional: bool = False) -> Rule:
    return (lambda v: (optional and v is None) or v >= low), f"at least {low}" + (
        " or unset" if optional else ""
    )


def _fraction(open_top: bool = False) -> Rule:
    return (lambda v: 0 <= v < 1 if open_top else 0 <= v <= 1), (
        "in [0, 1)" if open_top else "in [0, 1]"
    )


VALUE_RULES: dict[str, Rule] = {
    "lr": _above(0, optional=True),
    "n_train": _at_least(1),
    "n_val": _at_least(1),
    "downstream_sequences": _at_least(0),
    "batch_size": _at_least(2),
    "warmup_steps": _at_least(0),
    "decay_frac": _fraction(),
    "max_grad_norm": _above(0),
    "log_every": _at_least(1),
    "ckpt_every": _at_least(1),
    "n_hours": _above(0),
    "gpus_per_group": _at_least(0),
    "cpus_per_group": _at_least(1),
    "mem_gb": _above(0, optional=True),
    "sae.d_model": _at_least(1, optional=True),
    "sae.d_vit": _at_least(1, optional=True),
    "sae.exp_factor": _at_least(1),
    "sae.d_sae": _at_least(1, optional=True),
    "sae.k": _at_least(1),
    "sae.n_experts": _at_least(1),
    "sae.switch_capacity_factor": _above(0),
    "sae.aux_k": _at_least(1, optional=True),
    "sae.aux_coeff": _at_least(0),
    "sae.dead_tokens": _at_least(1),
    "sae.jumprelu_bandwidth": _above(0),
    "sae.jumprelu_init_threshold": _above(0),
    "sae.batchtopk_threshold_momentum": _fraction(open_top=True),
    "sae.relu_init_norm": _above(0),
    "objective.sparsity_coeff": _at_least(0),
    "objective.sparsity_warmup_steps": _at_least(0),
    "objective.load_balance_coeff": _at_least(0),
    "train_data.n_threads": _at_least(1),
    "train_data.shuffle_tokens": _at_least(1),
    "val_data.n_threads": _at_least(1),
    "val_data.shuffle_tokens": _at_least(1),
}
"""Allowed values of numeric fields: (test, what it must be). batch_size is at least 2
because FVU and AuxK divide by the batch's variance."""


def check_values(cfg: TrainConfig, where: str) -> None:
    """Raise UserError naming the first field whose value is out of range (or not finite)."""
    for name, (ok, want) in VALUE_RULES.items():
        value = attrgetter(name)(cfg)
        finite = value is None or math.isfinite(value)
        if not (finite and ok(value)):
            flag = "--" + name.replace("_", "-")
            raise UserError(
                f"{where}: {name}={value!r}, but it must be {want}; "
                f"set it in the sweep or with {flag}"
            )
