"""The collection config: a frozen dataclass whose field docstrings are the CLI help."""

from __future__ import annotations

import dataclasses
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from saesweep.configtools import (
    at_least,
    check_values,
    deep_merge,
    parse_command_line,
    replace_from_dict,
    section,
)
from saesweep.errors import UserError
from saesweep.executors import RayConfig, SlurmConfig
from saesweep.memory import DEVICE_SPEC


@dataclass(frozen=True)
class CollectConfig:
    """Run a transformers model over text and store the activations of chosen modules."""

    model: str = "demo"
    """HF model name or local directory; 'demo' is the packaged all-MiniLM-L6-v2."""
    revision: str | None = None
    """Model revision (branch, tag or commit) for hub models."""
    trust_remote_code: bool = False
    """Run the code a hub model ships with it (only for a model you trust)."""
    model_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype the model runs in."""
    device: str = field(default="auto", metadata=DEVICE_SPEC)
    """Torch device for the forward pass: 'auto' (CUDA where it runs sees a GPU, else the
    CPU), 'cpu', 'cuda', 'cuda:1', ..."""
    hooks: tuple[str, ...] = ("resid.3",)
    """Where activations are read: module paths ('transformer.h.6', 'model.layers.12.mlp';
    PATH:in for a module's input) or short forms SITE.LAYER with SITE in resid, resid_mid,
    mlp_in, mlp, attn ('resid.3', 'mlp_in.3'; docs/collection.md)."""
    dataset: str = "demo"
    """'demo' (docstrings of the Python standard library), an HF dataset name, or local
    .txt/.jsonl/.parquet files (a path, a directory or a glob)."""
    dataset_config: str | None = None
    """HF dataset config name."""
    split: str = "train"
    """HF dataset split."""
    doc_split: Literal["all", "train", "val"] = "all"
    """Documents to collect: 'all', 'train' (all but every 50th: the text a live source
    trains on) or 'val' (every 50th, index % 50 == 49: the held-out text)."""
    text_column: str = "text"
    """Column holding the text (HF datasets, .jsonl and .parquet files)."""
    streaming: bool = True
    """Stream the HF dataset instead of downloading it whole."""
    ctx_len: int = field(default=128, metadata=at_least(1))
    """Tokens per sequence, special tokens included; longer documents are split."""
    batch_size: int = field(default=32, metadata=at_least(1))
    """Sequences per forward pass."""
    exclude_special: bool = True
    """Do not store activations of special tokens (CLS, SEP, BOS, ...)."""
    act_dtype: Literal["bfloat16", "float16", "float32", "float8_e4m3fn"] = "bfloat16"
    """Dtype of stored activations; float8_e4m3fn stores 8-bit floats with one float32 scale
    per token (half the bytes of bfloat16; statistics stay those of the bfloat16 values)."""
    out: str = "data/demo"
    """Where to write: a path, file:// URI or s3://bucket/prefix."""
    max_tokens: int | None = field(default=None, metadata=at_least(1, optional=True))
    """Stop after this many stored tokens in total (each machine takes an equal share)."""
    shard_tokens: int = field(default=65536, metadata=at_least(1))
    """Tokens per shard (shards end on batch boundaries, so they hold a little more)."""
    machine: int = field(default=0, metadata=at_least(0))
    """This machine's index in 0..n_machines-1; it takes every n_machines-th document."""
    n_machines: int = field(default=1, metadata=at_least(1))
    """Number of machines sharing the collection."""
    executor: Literal["here", "slurm", "ray"] | None = None
    """Where to collect: here (this machine's share, --machine), or n_machines Slurm tasks or
    Ray tasks; default slurm with --slurm-acct, else here."""
    slurm: SlurmConfig = section(lambda: SlurmConfig(n_hours=4.0), short=True)
    """Slurm settings: with --slurm-acct, n_machines tasks are submitted instead of running
    here (each also as --slurm-FIELD or --n-hours)."""
    ray: RayConfig = section(RayConfig, short=True)
    """Ray settings for --executor ray (each also as --ray-FIELD, e.g. --ray-address auto)."""
    slurm_log_dir: str = "logs/collect"
    """Local directory for the Slurm or Ray tasks' logs."""
    upload_threads: int = field(default=2, metadata=at_least(1))
    """Background threads that serialize and write shards."""
    max_inflight_shards: int = field(default=4, metadata=at_least(1))
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
    "doc_split",
    "text_column",
    "ctx_len",
    "exclude_special",
    "act_dtype",
    "max_tokens",
    "shard_tokens",
    "n_machines",
)
"""Fields that define what a collection holds; resuming with any of them changed is refused."""


USAGE = """usage: collect.py [--config FILE.toml] [--FIELD VALUE ...]

Flags override the TOML file, which overrides the defaults. Fields:
"""


@dataclass(frozen=True)
class CollectCommand:
    """collect.py's own flags."""

    config: str | None = None
    """TOML file of config values; flags override it, it overrides the defaults."""


def parse_cli(argv: list[str] | None = None) -> CollectConfig:
    """`--config FILE.toml` gives the file's values; every other flag overrides a field."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command, flags = parse_command_line(argv, CollectCommand, CollectConfig, "collect.py", USAGE)
    values = _toml_values(Path(command.config)) if command.config else {}
    where = command.config or "collect.py"
    cfg = replace_from_dict(CollectConfig(), deep_merge(values, flags), where)
    validate(cfg, where)
    return cfg


def _toml_values(path: Path) -> dict:
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as err:
        raise UserError(f"config file {path} is not valid TOML: {err}") from None


def load_toml(path: Path) -> CollectConfig:
    cfg = replace_from_dict(CollectConfig(), _toml_values(path), str(path))
    validate(cfg, str(path))
    return cfg


def validate(cfg: CollectConfig, where: str) -> None:
    check_values(cfg, where)
    if not cfg.machine < cfg.n_machines:
        raise UserError(
            f"--machine {cfg.machine} must be in 0..{cfg.n_machines - 1} "
            "(--n-machines is the count)"
        )
    if not cfg.hooks:
        raise UserError("give at least one hook (--hooks resid.3)")


def stored_data_fields(stored: dict) -> dict:
    """The data fields of a cfg.json's config; a field it lacks (written before the field
    existed) has its default."""
    defaults = data_fields(CollectConfig())
    return {k: stored.get(k, defaults[k]) for k in DATA_FIELDS}


def data_fields(cfg: CollectConfig) -> dict:
    values = dataclasses.asdict(cfg)
    return {
        k: list(v) if isinstance(v, tuple) else v for k, v in values.items() if k in DATA_FIELDS
    }
