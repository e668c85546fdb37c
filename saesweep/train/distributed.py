"""A group over N processes (torch.distributed): who reads, which SAEs each rank trains, and
how data-parallel replicas stay equal.

`--parallel sae`: rank 0 reads every batch and broadcasts it; each rank trains its share of
the group's SAEs (balanced by d_in * d_sae), with unchanged arithmetic. `--parallel data`:
every rank holds every SAE, trains on its slice of each broadcast batch, and gradients, dead
latents, thresholds and metrics are averaged or combined across ranks before each update.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist

from saesweep.data.hooksets import parts
from saesweep.data.normalizer import Normalizer
from saesweep.evaluate.absorption import HeldOutTokens
from saesweep.evaluate.downstream import HeldOutText
from saesweep.ray_jobs import CPUS_ENV, RENDEZVOUS_ENV
from saesweep.sae.base import LossResult, total_variance
from saesweep.train.config import GroupConfig, RunConfig
from saesweep.train.sources import TrainingSource, source_class

Mode = Literal["sae", "data"]


@dataclass(frozen=True)
class World:
    """This process's place in its group: rank of size, the split mode, its device."""

    rank: int = 0
    size: int = 1
    mode: Mode = "sae"
    device: str = "cpu"

    @property
    def leader(self) -> bool:
        """Rank 0: reads the data, commits checkpoints, runs the group's final evaluation."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    def share(self, value):
        """Rank 0's `value` (any picklable object), on every rank."""
        if self.size == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0, device=self._comm_device())
        return box[0]

    def broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        """Rank 0's `tensor` into `tensor` on every rank (in place; returned)."""
        if self.size > 1:
            dist.broadcast(tensor, src=0)
        return tensor

    def _comm_device(self) -> torch.device:
        return torch.device(self.device if dist.get_backend() == "nccl" else "cpu")


@dataclass(frozen=True)
class ProcessPlace:
    """Where a process of a group stands: its rank among world_size, its place on its node,
    and how the group's processes meet (a torch.distributed init method)."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    init_method: str


def process_place() -> ProcessPlace:
    """This process's place: from the Ray executor's variables, else submitit's task
    environment (Slurm or local), exported as MASTER_ADDR/MASTER_PORT for env://."""
    if RENDEZVOUS_ENV in os.environ:
        names = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
        return ProcessPlace(*(int(os.environ[k]) for k in names), os.environ[RENDEZVOUS_ENV])
    import submitit

    env = submitit.helpers.TorchDistributedEnvironment().export(
        set_cuda_visible_devices=False, overwrite=True
    )
    return ProcessPlace(env.rank, env.world_size, env.local_rank, env.local_world_size, "env://")


def start_world(cfg: GroupConfig, device: str) -> World:
    """Join the group's process group when it runs as procs_per_group processes (one GPU per
    process with NCCL, gloo on CPU); else a world of one."""
    if cfg.procs_per_group == 1:
        return World(device=device)
    place = process_place()
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        # the node's GPUs by local rank (CUDA may already be initialized: not by env var)
        device = f"cuda:{place.local_rank}"
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(cpu_threads(place.local_world_size))
    dist.init_process_group(
        backend,
        timeout=datetime.timedelta(seconds=cfg.dist_timeout_s),
        init_method=place.init_method,
        rank=place.rank,
        world_size=place.world_size,
    )
    if place.world_size != cfg.procs_per_group:
        raise RuntimeError(f"{place.world_size} tasks started for {cfg.procs_per_group} processes")
    return World(place.rank, place.world_size, cfg.parallel, device)


def cpu_threads(tasks_on_node: int) -> int:
    """Torch threads of one CPU process: the cores Slurm or Ray gave it, else this process's
    cores shared by the group's processes on this node (local tasks share one CPU set)."""
    for granted in ("SLURM_CPUS_PER_TASK", CPUS_ENV):
        if granted in os.environ:
            return int(os.environ[granted])
    return max(1, len(os.sched_getaffinity(0)) // tasks_on_node)


def stop_world(world: World) -> None:
    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()


def assign_runs(costs: list[int], size: int) -> list[list[int]]:
    """Run indices per rank, balanced by `costs` (each run's parameter count: a step costs
    about as many FLOPs per token for every parameter, a CLT's decoder blocks included): the
    costliest first, each to the least loaded rank (ties: the lower rank); each rank's list
    in sweep order."""
    loads, ranks = [0] * size, [[] for _ in range(size)]
    for i in sorted(range(len(costs)), key=lambda i: -costs[i]):
        r = min(range(size), key=lambda r: (loads[r], r))
        loads[r] += costs[i]
        ranks[r].append(i)
    return [sorted(r) for r in ranks]


class SharedSource:
    """A group's data source read by rank 0 and seen by every rank (a TrainingSource): its
    description once, then each batch (all hooks stacked, [hooks, rows, d]) by broadcast.
    Held-out text and tokens need no source: each rank prepares its own."""

    def __init__(
        self, world: World, inner: TrainingSource | None, cfg: GroupConfig, runs: list[RunConfig]
    ):
        self.world, self.inner, self.cfg = world, inner, cfg
        described = None
        if world.leader:
            described = {
                "d_model": inner.d_model,
                "model_name": inner.model_name,
                "hooks": inner.hooks,
                "hook_by_run": [inner.hook_of(r) for r in runs],
                "target_by_run": [inner.target_of(r) for r in runs],
                "scales": inner.normalizer.scales,
                "widths": {h: inner.width(h) for h in inner.hooks.values()},
            }
        described = world.share(described)
        self.d_model, self.model_name = described["d_model"], described["model_name"]
        self.hooks, self.widths = described["hooks"], described["widths"]
        self.normalizer = Normalizer(described["scales"])
        self._hook_by_run = dict(zip(runs, described["hook_by_run"], strict=True))
        self._target_by_run = dict(zip(runs, described["target_by_run"], strict=True))
        self.paths = sorted(self.widths)

    def hook_of(self, run: RunConfig) -> str:
        return self._hook_by_run[run]

    def target_of(self, run: RunConfig) -> str:
        return self._target_by_run[run]

    def width(self, hook: str) -> int:
        return self.widths[parts(hook)[0]]

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        batches = iter(self.inner) if self.world.leader else None
        while True:
            acts = next(batches, None) if batches is not None else None
            stacked = None if acts is None else torch.stack([acts[p] for p in self.paths])
            stacked = self._broadcast_rows(stacked)
            if stacked is None:
                return
            yield dict(zip(self.paths, stacked, strict=True))

    def _broadcast_rows(self, stacked: torch.Tensor | None) -> torch.Tensor | None:
        """Rank 0's [hooks, rows, d] tensor on every rank; None (on all) when rank 0 has none."""
        device = torch.device(self.world.device)
        rows = torch.tensor([0 if stacked is None else stacked.shape[1]], device=device)
        n = int(self.world.broadcast(rows))
        if n == 0:
            return None
        if stacked is None:
            stacked = torch.empty(len(self.paths), n, self.d_model, device=device)
        return self.world.broadcast(stacked.contiguous())

    def state_dict(self) -> dict:
        return self.inner.state_dict() if self.world.leader else {}

    def load_state_dict(self, state: dict) -> None:
        if self.world.leader:
            self.inner.load_state_dict(state)

    def figures(self) -> dict[str, float]:
        return self.inner.figures() if self.world.leader else {}

    def held_out_activations(self, n_tokens: int, batch_size: int | None) -> list[dict]:
        """Read by rank 0, on every rank. In data mode only rank 0 evaluates, and nothing is
        broadcast."""
        if self.world.mode == "data":
            return self.inner.held_out_activations(n_tokens, batch_size)
        stacked = None
        if self.world.leader:
            (whole,) = self.inner.held_out_activations(n_tokens, None)
            stacked = torch.stack([whole[p] for p in self.paths])
        stacked = self._broadcast_rows(stacked)
        parts = stacked.split(batch_size, dim=1) if batch_size else [stacked]
        return [dict(zip(self.paths, part, strict=True)) for part in parts]

    def held_out_text(self, hooks: list[str], n_sequences: int) -> HeldOutText:
        return source_class(self.cfg).text_for(self.cfg, hooks, n_sequences)

    def held_out_tokens(self) -> tuple[HeldOutTokens, dict]:
        return source_class(self.cfg).tokens_for(self.cfg)


class DataParallelSync:
    """What train_step calls in data mode so that every rank's replica takes the same step."""

    def __init__(self, world: World):
        self.world = world

    def gradients(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Average every gradient over the ranks (each rank's loss is its slice's mean)."""
        for p in params:
            if p.grad is not None:
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
                p.grad.div_(self.world.size)

    def all_ok(self, ok: torch.Tensor) -> torch.Tensor:
        """[n] bool: members finite on every rank."""
        flags = ok.to(torch.int32)
        dist.all_reduce(flags, op=dist.ReduceOp.MIN)
        return flags.bool()

    def combine(self, result: LossResult) -> LossResult:
        """The whole batch's result: latents fired on any rank, every rank's tokens, metrics
        and threshold samples averaged."""
        fired = result.fired.to(torch.uint8)
        dist.all_reduce(fired, op=dist.ReduceOp.MAX)
        metrics = {k: self._mean(v) for k, v in result.metrics.items()}
        sample = result.threshold_sample
        return LossResult(
            loss=result.loss,
            metrics=metrics,
            fired=fired.bool(),
            tokens=result.tokens * self.world.size,
            threshold_sample=None if sample is None else self._mean(sample),
        )

    def _mean(self, value: torch.Tensor) -> torch.Tensor:
        value = value.float().clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value / self.world.size


def data_slice(
    world: World, x: torch.Tensor, target: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """This rank's rows of a batch in data mode (batch_size divides by the ranks): input,
    target (a transcoder's; else None), and its share of the batch's FVU denominator
    (StackedSAE.loss: the target's variance, or the input's)."""
    rows = slice(world.rank * len(x) // world.size, (world.rank + 1) * len(x) // world.size)
    variance = total_variance(x if target is None else target) / world.size
    return x[rows], None if target is None else target[rows], variance
