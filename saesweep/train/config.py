"""Training configs: frozen dataclasses whose field docstrings are train.py's --help.

Three levels: SweepConfig (one per sweep), GroupConfig (one per group: equal group configs
share a group) and RunConfig (one per SAE). TrainConfig holds all their fields flat, as sweep
files, flags and sweep.json spell them, and projects into the three.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Literal

from saesweep.configtools import PLAIN_NAME, above, at_least, fraction, section
from saesweep.evaluate.absorption import AbsorptionConfig
from saesweep.evaluate.health import HealthConfig
from saesweep.executors import RayConfig, SlurmConfig
from saesweep.memory import DEVICE_SPEC
from saesweep.sae.config import ObjectiveConfig, SAEConfig
from saesweep.sae.optim import Optimizer


@dataclass(frozen=True)
class DataConfig:
    """Which stored activations to read and how."""

    uri: str = "data/demo"
    """Collection root: a path, file:// URI or s3://bucket/prefix ('' for val: same as train)."""
    hook: str | None = None
    """Hook to read (module path or short form); optional when the collection has one hook."""
    layer: int | None = None
    """Layer to read, as an alternative to hook."""
    target_hook: str | None = None
    """Transcoders: the hook the decoder predicts from the input hook's activations (module
    path or short form); None with target_layer None: the input hook (an ordinary SAE). From a
    store it must hold the same tokens (collected in the same run); val_data's default is
    train_data's."""
    target_layer: int | None = None
    """Transcoders: the target's layer, as an alternative to target_hook."""
    shards: str = ":"
    """Python slice over the collection's shards, e.g. ':-1' (all but the last) or '-1:'."""
    n_threads: int = field(default=2, metadata=at_least(1))
    """The reader's fetch workers: threads mapping local shards, or event-loop threads
    receiving S3 range GETs."""
    shuffle_tokens: int = field(default=1 << 20, metadata=at_least(1))
    """Tokens shuffled together: the reader's shuffle window, or with source 'model' the
    window of consecutive sequences' tokens computed before it is served in random order."""
    seed: int = 0
    """Data order seed (shared by the whole group that reads this data)."""
    normalize: Literal["norm", "none"] = "norm"
    """'norm': scale inputs so E||x|| = sqrt(d_model) (folded back into saved weights)."""
    source: Literal["store", "model"] = "store"
    """'store': read the collection at uri. 'model': run the model of the collection config
    `collect` while training; hook and layer name what to hook, and configs that differ only
    in them share one group and one forward pass per batch (docs/training.md)."""
    collect: str = "configs/demo.toml"
    """Collection config (TOML, collect.py's keys). Source 'store': it makes the collection
    when uri is the default demo location or the config's `out` and holds none yet ('' never
    collects).
    Source 'model': the model, text, ctx_len, special tokens and dtypes to run."""
    cache_to: str = ""
    """Source 'model': also write the training text's activations, as they are computed, as
    a collection at this path, file:// URI or s3://bucket/prefix (read it later with --uri);
    a resumed run continues it ('' writes none)."""
    on_corrupt: Literal["raise", "skip"] = "raise"
    """A shard that fails its checksum: 'raise' stops the group, 'skip' leaves it out."""
    retry_s: float = field(default=300.0, metadata=above(0))
    """How long an S3 store may fail transiently (down, restarting) before training stops
    with 'unreachable'; reads are retried with backoff and continue exactly."""
    anonymous: bool = False
    """S3 uri: send unsigned requests (a public bucket) even when AWS credentials are
    configured; without credentials reads are unsigned anyway. Ignored for local paths."""


@dataclass(frozen=True)
class HookChoice:
    """The hooks one run reads: a DataConfig's hook, layer, target_hook and target_layer."""

    hook: str | None = None
    layer: int | None = None
    target_hook: str | None = None
    target_layer: int | None = None

    @classmethod
    def of(cls, data: DataConfig) -> HookChoice:
        return cls(**_values(data, cls))


@dataclass(frozen=True)
class SweepConfig:
    """Where and how a sweep launches: one value for the whole sweep."""

    runs_root: str = "runs"
    """Directory that receives the sweep directory."""
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"
    """wandb: offline runs (sync later with `wandb sync`), online, or disabled."""
    wandb_project: str = "saesweep"
    """wandb project."""
    health: HealthConfig = section(HealthConfig)
    """Thresholds of the health verdict in the report."""
    slurm: SlurmConfig = section(SlurmConfig, short=True)
    """Slurm settings (each also as --slurm-FIELD, e.g. --slurm-acct A, or --n-hours 24)."""
    ray: RayConfig = section(RayConfig, short=True)
    """Ray settings for --executor ray (each also as --ray-FIELD, e.g. --ray-address auto)."""


@dataclass(frozen=True)
class GroupConfig:
    """What a group reads and where it runs: configs that differ here train in separate
    groups."""

    train_data: DataConfig = field(default_factory=lambda: DataConfig(shards=":-1"))
    val_data: DataConfig = field(default_factory=lambda: DataConfig(uri="", shards="-1:"))
    """Held-out data; uri '' reads the train collection (see held_out_data)."""
    n_train: int = field(default=1_000_000, metadata=at_least(1))
    """Training tokens (the data is repeated when it holds fewer)."""
    n_val: int = field(default=100_000, metadata=at_least(1))
    """Evaluation tokens at most."""
    downstream_sequences: int = field(default=64, metadata=at_least(0))
    """Held-out sequences for downstream fidelity (SAE spliced into the model); 0 skips it."""
    absorption: AbsorptionConfig = section(AbsorptionConfig)
    """Feature absorption at the end of training, for collections with a tokenizer
    (docs/evaluation.md)."""
    batch_size: int = field(default=4096, metadata=at_least(2))
    """Tokens per training step."""
    device: str = field(default="auto", metadata=DEVICE_SPEC)
    """Torch device of the group: 'auto' (CUDA where the job runs sees a GPU, else the CPU),
    'cpu', 'cuda' or 'cuda:N'."""
    procs_per_group: int = field(default=1, metadata=at_least(1))
    """Processes per group under torch.distributed: one per GPU (NCCL) with a CUDA device,
    or CPU processes (gloo) with device 'cpu' (docs/distributed.md)."""
    parallel: Literal["sae", "data"] = "sae"
    """With procs_per_group > 1: 'sae' spreads the group's SAEs over the processes (results
    bit-identical to one process); 'data' splits each batch and averages gradients."""
    dist_timeout_s: float = field(default=300.0, metadata=above(0))
    """Seconds a process waits in a collective before the group fails (a rank that hangs);
    a rank that dies ends the others at once."""
    autocast: Literal["none", "bfloat16"] = "none"
    """bf16 autocast for the SAE forward/backward on GPUs."""
    eval_every: int = field(default=0, metadata=at_least(0))
    """Steps between evaluations while training (FVU, L0, dead % on up to n_val held-out
    tokens, logged as eval/*); 0 evaluates only at the end."""
    eval_downstream_sequences: int = field(default=8, metadata=at_least(0))
    """Held-out sequences for downstream fidelity (loss recovered and KL, or the encoder
    score) at each evaluation while training; 0 leaves it to the end."""
    log_every: int = field(default=20, metadata=at_least(1))
    """Steps between metric logs."""
    ckpt_every: int = field(default=200, metadata=at_least(1))
    """Steps between trainer-state checkpoints (for resume and requeue)..."""
    ckpt_every_s: float = field(default=600.0, metadata=at_least(0))
    """... and at the first log step (log_every) this many seconds after the last one, so a
    slow group loses at most about this much work to a kill; 0: by steps only."""

    @property
    def total_steps(self) -> int:
        """Training steps: n_train tokens in batches of batch_size (the last one whole)."""
        return math.ceil(self.n_train / self.batch_size)

    @property
    def held_out_data(self) -> DataConfig:
        """val_data as it is read, what it leaves unset taken from train_data: uri '' is the
        train collection (read anonymously when train_data is), no hook or layer the input
        hook, no target (or a train_data without one) the training target."""
        val, train = self.val_data, self.train_data
        fields = {}
        if not val.uri:
            fields |= {"uri": train.uri, "anonymous": val.anonymous or train.anonymous}
        if val.hook is None and val.layer is None:
            fields |= {"hook": train.hook, "layer": train.layer}
        no_val_target = val.target_hook is None and val.target_layer is None
        if no_val_target or (train.target_hook is None and train.target_layer is None):
            fields |= {"target_hook": train.target_hook, "target_layer": train.target_layer}
        return dataclasses.replace(val, **fields)


@dataclass(frozen=True)
class RunFields:
    """One SAE's own settings: they may differ inside a group."""

    lr: float | None = field(default=None, metadata=above(0, optional=True))
    """Peak learning rate; default 1e-3 / sqrt(d_sae / 2**14) for adam, 5e-3 / sqrt(d_sae /
    2**14) (sparsify's) for signum_schedulefree (docs/benchmarks.md)."""
    optimizer: Optimizer = "adam"
    """adam: Adam (the architecture's betas, 0.9 and 0.999 but for jumprelu's 0 and 0.999).
    signum_schedulefree: sparsify's default, the gradient's sign inside a schedule-free wrapper
    (momentum 0.95), evaluated and exported at its averaged weights; sparsify runs it with
    --warmup-steps 0 --lr-decay none. It left fewer dead latents at a higher FVU than adam
    (docs/benchmarks.md)."""
    seed: int = 42
    """Seed of the SAE's initial weights; a sweep gives config i the seed base + i."""
    tag: str = field(default="", metadata=PLAIN_NAME)
    """Free-form label shown in the report and run names."""
    sae: SAEConfig = field(default_factory=SAEConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    warmup_steps: int = field(default=100, metadata=at_least(0))
    """Linear learning-rate warmup steps."""
    lr_decay: Literal["none", "linear", "cosine"] = "linear"
    """Learning-rate decay to zero over the last decay_frac of training."""
    decay_frac: float = field(default=0.2, metadata=fraction())
    """Fraction of training over which the learning rate decays."""
    max_grad_norm: float = field(default=1.0, metadata=above(0))
    """Per-SAE gradient-norm clip. With normalize_grad it is the norm every step's gradient
    is scaled to, and does nothing: Adam's step does not depend on its gradient's scale
    (but through eps). signum_schedulefree uses only the gradient's sign: no clip matters."""
    normalize_grad: bool = True
    """Adam: scale each SAE's gradient to norm max_grad_norm at every step, as the references'
    clip of 1 does to their per-token squared error, which always exceeds it (Adam then sees
    steps of one size; lrs do not carry over to or from the papers; docs/training.md).
    False: clip only gradients above max_grad_norm. signum_schedulefree: no effect (the sign
    of a gradient does not depend on its scale)."""


@dataclass(frozen=True)
class RunConfig(RunFields):
    """One run of a group: its own settings and the hooks it reads. With train_data.source
    'model' each run names its hooks and the group's forward pass feeds them all (so they
    are not in the GroupConfig); from a store they are the group's, the same for every run."""

    train_hooks: HookChoice = HookChoice()
    """The hooks it trains on (train_data's)."""
    val_hooks: HookChoice = HookChoice()
    """The hooks it is evaluated on (val_data's; unset: the training hooks)."""


@dataclass(frozen=True)
class TrainConfig(SweepConfig, GroupConfig, RunFields):
    """One SAE's training run; a sweep file varies these fields. Run fields (lr, seed, tag,
    sae, objective, schedule) may differ inside a group; group fields (data, steps, device,
    processes, evaluation) split groups; sweep fields (runs_root, wandb, health, slurm, ray)
    are one per sweep (docs/sweeps.md)."""

    @property
    def sweep_level(self) -> SweepConfig:
        return SweepConfig(**_values(self, SweepConfig))

    @property
    def group_level(self) -> GroupConfig:
        """The group's fields; with source 'model' without the hooks, which each run names."""
        values = _values(self, GroupConfig)
        if self.train_data.source == "model":
            for name in ("train_data", "val_data"):
                values[name] = dataclasses.replace(values[name], **vars(HookChoice()))
        return GroupConfig(**values)

    @property
    def run_level(self) -> RunConfig:
        hooks = HookChoice.of(self.train_data), HookChoice.of(self.val_data)
        return RunConfig(**_values(self, RunFields), train_hooks=hooks[0], val_hooks=hooks[1])

    @classmethod
    def joined(cls, sweep: SweepConfig, group: GroupConfig, run: RunConfig) -> TrainConfig:
        """The flat config whose levels these are (what cfg.json and wandb record)."""
        data = {
            "train_data": dataclasses.replace(group.train_data, **vars(run.train_hooks)),
            "val_data": dataclasses.replace(group.val_data, **vars(run.val_hooks)),
        }
        values = _values(sweep, SweepConfig) | _values(group, GroupConfig) | data
        return cls(**values, **_values(run, RunFields))


def _values(config, level: type) -> dict:
    """The fields of `level` in `config`, by name."""
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(level)}
