"""Training configs: frozen dataclasses whose field docstrings are train.py's --help."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

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
