"""The collection config: a frozen dataclass whose field docstrings are the CLI help."""

from __future__ import annotations

import dataclasses
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import tyro

from saesweep.configtools import replace_from_dict
from saesweep.errors import UserError


@dataclass(frozen=True)
class CollectConfig:
    """Run a transformers model over text and store the activations of chosen modules."""

    model: str = "demo"
    """HF model name or local directory; 'demo' is the packaged all-MiniLM-L6-v2."""
    revision: str | None = None
    """Model revision (branch, tag or commit) for hub models."""
    model_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype the model runs in."""
    device: str = "cpu"
    """Torch device for the forward pass ('cpu', 'cuda', 'cuda:1', ...)."""
    hooks: tuple[str, ...] = ("resid.3",)
    """Modules whose outputs are stored: module paths ('transformer.h.6', 'model.layers.12.mlp')
    or short forms SITE.LAYER with SITE in resid, mlp, attn ('resid.3')."""
    dataset: str = "demo"
    """'demo' (docstrings of the Python standard library), an HF dataset name, or local
    .txt/.jsonl/.parquet files (a path, a directory or a glob)."""
    dataset_config: str | None = None
    """HF dataset config name."""
    split: str = "train"
    """HF dataset split."""
    text_column: str = "text"
    """Column holding the text (HF datasets, .jsonl and .parquet files)."""
    streaming: bool = True
    """Stream the HF dataset instead of downloading it whole."""
    ctx_len: int = 128
    """Tokens per sequence, special tokens included; longer documents are split."""
    batch_size: int = 32
    """Sequences per forward pass."""
    exclude_special: bool = True
    """Do not store activations of special tokens (CLS, SEP, BOS, ...)."""
    act_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    """Dtype of stored activations."""
    out: str = "data/demo"
    """Where to write: a path, file:// URI or s3://bucket/prefix."""
    max_tokens: int | None = None
    """Stop after this many stored tokens in total (each machine takes an equal share)."""
    shard_tokens: int = 65536
    """Tokens per shard (shards end on batch boundaries, so they hold a little more)."""
    machine: int = 0
    """This machine's index in 0..n_machines-1; it takes every n_machines-th document."""
    n_machines: int = 1
    """Number of machines sharing the collection."""
    slurm_acct: str | None = None
    """Slurm account: submit n_machines tasks through submitit instead of running here."""
    slurm_partition: str | None = None
    """Slurm partition for the collection tasks."""
    n_hours: float = 4.0
    """Slurm time limit per collection task, in hours."""
    slurm_log_dir: str = "logs/collect"
    """Local directory for the Slurm tasks' logs."""
    upload_threads: int = 2
    """Background threads that serialize and write shards."""
    max_inflight_shards: int = 4
    """Shards held in memory while being written; beyond this the forward pass waits."""
    progress: bool = True
    """Show a progress bar."""


DATA_FIELDS = (
    "model",
    "revision",
    "model_dtype",
    "hooks",
    "dataset",
    "dataset_config",
    "split",
    "text_column",
    "ctx_len",
    "exclude_special",
    "act_dtype",
    "max_tokens",
    "shard_tokens",
    "n_machines",
)
"""Fields that define what a collection holds; resuming with any of them changed is refused."""


def load_toml(path: Path) -> CollectConfig:
    try:
        values = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as err:
        raise UserError(f"config file {path} is not valid TOML: {err}") from None
    return replace_from_dict(CollectConfig(), values, str(path))


def parse_cli(argv: list[str] | None = None) -> CollectConfig:
    """`--config FILE.toml` gives the defaults; every other flag overrides a field."""
    argv = list(sys.argv[1:] if argv is None else argv)
    path = _pop_config_path(argv)
    default = load_toml(path) if path else CollectConfig()
    cfg = tyro.cli(
        CollectConfig,
        default=default,
        args=argv,
        description="Collect activations (use --config FILE.toml for file defaults).",
    )
    validate(cfg)
    return cfg


def _pop_config_path(argv: list[str]) -> Path | None:
    for i, arg in enumerate(argv):
        if arg == "--config":
            if i + 1 >= len(argv):
                raise UserError("--config needs a file path")
            path = argv[i + 1]
            del argv[i : i + 2]
            return Path(path)
        if arg.startswith("--config="):
            del argv[i]
            return Path(arg.split("=", 1)[1])
    return None


def validate(cfg: CollectConfig) -> None:
    if not 0 <= cfg.machine < cfg.n_machines:
        raise UserError(
            f"--machine {cfg.machine} must be in 0..{cfg.n_machines - 1} "
            "(--n-machines is the count)"
        )
    for name in ("ctx_len", "batch_size", "shard_tokens", "upload_threads", "max_inflight_shards"):
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")
    if not cfg.hooks:
        raise UserError("give at least one hook (--hooks resid.3)")


def data_fields(cfg: CollectConfig) -> dict:
    values = dataclasses.asdict(cfg)
    return {
        k: list(v) if isinstance(v, tuple) else v for k, v in values.items() if k in DATA_FIELDS
    }
