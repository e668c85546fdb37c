"""The group trainer: one Reader feeds every SAE of a group the same batch.

SAEs of equal architecture and shape are stacked and stepped with batched matrix products;
each keeps its own seed, learning rate, schedule and optimizer state. Trainer state is saved
atomically every ckpt_every steps so a killed or requeued job continues bit-identically.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from saesweep.data.hooksets import gather, parts
from saesweep.data.normalizer import Normalizer
from saesweep.errors import UserError
from saesweep.evaluate.absorption import absorption_of, not_measured
from saesweep.evaluate.downstream import HeldOutText, load_run, measure
from saesweep.evaluate.metrics import evaluate_stacks
from saesweep.format.rundir import (
    METRICS,
    WEIGHTS_CHECKSUM,
    commit_metrics,
    export_sae,
    write_tensors,
)
from saesweep.interrupt import Deferred, Interrupted, deferred, stop_signals
from saesweep.memory import check_fits, resolve_device, reuse_freed_memory
from saesweep.sae import SAEConfig, StackedSAE, make_sae, stack_key
from saesweep.sae.optim import (
    LRSchedule,
    Optimizer,
    StackedAdam,
    StackedOptimizer,
    default_lr,
)
from saesweep.sae.registry import architecture
from saesweep.sae.schedulefree import StackedSignumScheduleFree
from saesweep.sae.step import train_step
from saesweep.train.checkpoint import commit_state, load_state, saved_state
from saesweep.train.config import GroupConfig, RunConfig, SweepConfig, TrainConfig
from saesweep.train.distributed import (
    DataParallelSync,
    SharedSource,
    World,
    assign_runs,
    data_slice,
)
from saesweep.train.progress import ProgressWriter
from saesweep.train.runlog import RunLog
from saesweep.train.sources import TrainingSource, open_source

SUMMARY_SKIPS = ("density_hist", WEIGHTS_CHECKSUM)
"""metrics.json keys left out of the wandb summary."""


@dataclass
class Stack:
    """SAEs stepped together: their sweep indices, module, optimizer and schedule."""

    members: list[int]
    hook: str
    """The module path whose activations the stack reads (a layered stack's: the key of its
    input hooks, data/hooksets.py)."""
    target: str
    """The module path it reconstructs: its hook (SAEs), or a transcoder's target hook (or
    hooks' key)."""
    sae: StackedSAE
    opt: StackedOptimizer
    schedule: LRSchedule
    max_grad_norm: torch.Tensor
    normalize_grad: torch.Tensor
    failed: torch.Tensor


class GroupTrainer:
    """Trains one group: `cfg` is the group's config, `runs` each SAE's (with `run_dirs`),
    `sweep_cfg` the sweep's (wandb, and the flat config each run's cfg.json records)."""

    def __init__(
        self,
        cfg: GroupConfig,
        runs: list[RunConfig],
        run_dirs: list[Path],
        state_dir: Path,
        sweep_cfg: SweepConfig,
        sweep_name: str = "sweep",
        group_index: int = 0,
        world: World | None = None,
    ):
        self.world = world or World(device=resolve_device(cfg.device))
        self.cfg = cfg = dataclasses.replace(cfg, device=self.world.device)
        self.runs, self.run_dirs, self.state_dir = runs, run_dirs, state_dir
        self.sweep_cfg, self.sweep_name, self.group_index = sweep_cfg, sweep_name, group_index
        self.source = self._open_source()
        self.total_steps = cfg.total_steps
        self.d_in = self.source.d_model
        self.normalizer = self.source.normalizer
        self._check_d_model()
        self.trained = self._runs_of_this_rank()
        """Indices of the runs this process trains."""
        self.reported = self.trained if self.world.mode == "sae" or self.world.leader else []
        """Indices of the runs this process logs and exports (data mode: rank 0, all)."""
        check_fits([runs[i].sae for i in self.trained], self.d_in, cfg.batch_size, cfg.device)
        reuse_freed_memory()
        self.stacks = self._build_stacks()
        self.sync = DataParallelSync(self.world) if self.world.mode == "data" else None
        self.step = self.first_step = 0
        self.progress = ProgressWriter(state_dir, self.total_steps)
        self.held_out_batches: dict[str, list[torch.Tensor]] | None = None
        self.held_out_text: HeldOutText | None = None
        """The model and sequences of downstream fidelity (prepared on first use)."""
        self.earlier_wall_s = 0.0  # wall time of the processes before this one (resumes)
        self.started = self.last_save = time.perf_counter()

    def _open_source(self) -> TrainingSource:
        """The group's source; with several processes, rank 0's shared with every rank."""
        if self.world.size == 1:
            return open_source(self.cfg, self.runs)
        inner = open_source(self.cfg, self.runs) if self.world.leader else None
        return SharedSource(self.world, inner, self.cfg, self.runs)

    def _runs_of_this_rank(self) -> list[int]:
        if self.world.mode == "data" or self.world.size == 1:
            return list(range(len(self.runs)))
        costs = [architecture(r.sae.arch).sizes(r.sae, self.d_in)[0] for r in self.runs]
        return assign_runs(costs, self.world.size)[self.world.rank]

    def _check_d_model(self) -> None:
        for run in self.runs:
            if run.sae.d_model is not None and run.sae.d_model != self.d_in:
                raise UserError(
                    f"sae.d_model={run.sae.d_model} but {self.cfg.train_data.uri} holds "
                    f"activations of width {self.d_in}"
                )

    def _build_stacks(self) -> list[Stack]:
        buckets: dict = {}
        for i in self.trained:
            run = self.runs[i]
            source = self.source
            key = (source.hook_of(run), source.target_of(run), stack_key(run.sae), run.optimizer)
            buckets.setdefault(key, []).append(i)
        stacks = []
        device = torch.device(self.cfg.device)
        for (hook, target, _, optimizer), members in buckets.items():
            runs = [self.runs[i] for i in members]
            sae = make_sae(
                [_with_dead_window(r.sae, self.cfg.n_train) for r in runs],
                self.source.width(hook),
                [r.seed for r in runs],
                [r.objective for r in runs],
                device=device,
                d_out=self.source.width(target) if target != hook else None,
            )
            lrs = [r.lr if r.lr is not None else default_lr(sae.d_sae, optimizer) for r in runs]
            schedule = LRSchedule(
                self.total_steps,
                [r.warmup_steps for r in runs],
                [r.lr_decay for r in runs],
                [1 - r.decay_frac for r in runs],
            )
            stacks.append(
                Stack(
                    members,
                    hook,
                    target,
                    sae,
                    _optimizer(optimizer, sae, lrs),
                    schedule,
                    torch.tensor([r.max_grad_norm for r in runs], device=device),
                    torch.tensor([r.normalize_grad for r in runs], device=device),
                    torch.zeros(len(members), dtype=torch.bool, device=device),
                )
            )
        return stacks

    def train(self) -> list[dict]:
        """Train to n_train tokens (resuming from saved state), evaluate, save checkpoints.
        A stop signal (interrupt.stop_signals) takes effect after a whole step: the state is
        committed at that step and Interrupted raised."""
        fresh = not self._load_state()
        logs = {i: self._run_log(i) for i in self.reported}
        with deferred(stop_signals()) as stop:
            for acts in self.source:
                if self.step >= self.total_steps:
                    break
                x = self.normalizer(acts)
                if fresh:
                    for stack in self.stacks:
                        stack.sae.init_b_dec(gather(x, stack.target))
                    fresh = False
                metrics = self._step(x)
                self.step += 1
                if self.step % self.cfg.log_every == 0 or self.step == self.total_steps:
                    self._log(logs, metrics)
                elif self.world.leader:
                    self.progress.training(self.step, self._tokens_per_s(), self.cfg.batch_size)
                every = self.cfg.eval_every
                if every and self.step % every == 0 and self.reported:
                    self._evaluate_while_training(logs)
                self._stop_if_asked(stop)
                if self.step < self.total_steps and self._checkpoint_due():
                    self.save_state()  # the last step's state is committed by _finish
        return self._finish(logs)

    def _stop_if_asked(self, stop: Deferred) -> None:
        """Commit the state and raise Interrupted when a stop signal came; with several
        processes rank 0's signal decides, at log steps, so that every rank stops together."""
        signum = stop.signum
        if self.world.size > 1:
            if self.step % self.cfg.log_every:
                return
            signum = self.world.share(signum if self.world.leader else None)
        if signum is not None:
            self.save_state()
            raise Interrupted(signum)

    def _checkpoint_due(self) -> bool:
        """Every ckpt_every steps, and at a log step once ckpt_every_s seconds have passed
        since the last commit (rank 0's clock, shared, so every rank commits together)."""
        cfg = self.cfg
        if self.step % cfg.ckpt_every == 0:
            return True
        if not cfg.ckpt_every_s or self.step % cfg.log_every:
            return False
        late = time.perf_counter() - self.last_save >= cfg.ckpt_every_s
        return bool(self.world.share(late if self.world.leader else None))

    def _run_log(self, i: int) -> RunLog:
        run_dir, sweep_cfg = self.run_dirs[i], self.sweep_cfg
        return RunLog(
            run_dir,
            run_dir.name,
            self._record(i),
            self.sweep_name,
            self.group_index,
            sweep_cfg.wandb_mode,
            sweep_cfg.wandb_project,
            resumed_at=self.step,
        )

    def _step(self, batch: dict[str, torch.Tensor]) -> list[dict]:
        cfg = self.cfg
        out = []
        joined: dict[str, torch.Tensor] = {}  # each key's hooks side by side, once a step

        def side_by_side(key: str) -> torch.Tensor:
            if key not in joined:
                joined[key] = gather(batch, key)
            return joined[key]

        for stack in self.stacks:
            x, variance = side_by_side(stack.hook), None
            target = side_by_side(stack.target) if stack.sae.transcoder else None
            if self.sync is not None:
                x, target, variance = data_slice(self.world, x, target)
            stack.opt.set_lr_factor(stack.schedule.factor(self.step, stack.sae.n))
            with torch.autocast(x.device.type, torch.bfloat16, enabled=cfg.autocast == "bfloat16"):
                m = train_step(
                    stack.sae,
                    stack.opt,
                    x,
                    self.step,
                    stack.max_grad_norm,
                    stack.normalize_grad,
                    active=~stack.failed,
                    target=target,
                    sync=self.sync,
                    variance=variance,
                )
            stack.failed |= ~m["updated"]
            m["lr"] = stack.opt.lr
            out.append(m)
        return out

    def _tokens_per_s(self) -> float:
        """Training tokens per second since this process started (or resumed)."""
        elapsed = time.perf_counter() - self.started
        return (self.step - self.first_step) * self.cfg.batch_size / elapsed

    def _log(self, logs: dict[int, RunLog], metrics: list[dict]) -> None:
        batch = self.cfg.batch_size
        rate = self._tokens_per_s()
        shared = {"tokens": self.step * batch, "tokens_per_s": rate, "wall_s": self.wall_s()}
        shared |= self.source.figures()
        if self.world.leader:
            fvus = [float(v) for m in metrics for v in m["fvu"]]
            self.progress.training(self.step, rate, batch, fvus)
        for stack, m in zip(self.stacks, metrics, strict=True):
            for j, i in enumerate(stack.members):
                if i not in logs:
                    continue
                values = {k: float(v[j]) for k, v in m.items() if v.dim() == 1}
                logs[i].log(self.step, values | shared | {"failed": bool(stack.failed[j])})

    def _evaluate_while_training(self, logs: dict[int, RunLog]) -> None:
        """FVU, L0 and dead % of every SAE on the held-out tokens (read once, then kept in
        memory: n_val tokens per hook), logged as eval/* with the seconds it took."""
        started = time.perf_counter()
        with self._at_evaluation_point():
            evals = self._evaluate(self._held_out())
            fidelity = self._downstream_now()
        seconds = time.perf_counter() - started
        for i, metrics in evals.items():
            values = {f"eval/{k}": metrics[k] for k in ("fvu", "l0", "dead_pct", "mse")}
            values |= {f"eval/{k}": v for k, v in fidelity.get(i, {}).items()}
            logs[i].log(self.step, values | {"eval/seconds": seconds})

    @contextmanager
    def _at_evaluation_point(self) -> Iterator[None]:
        """Inside: every stack's parameters as evaluation and export see them (its
        optimizer's evaluation_point); after: as training left them."""
        with ExitStack() as points:
            for stack in self.stacks:
                points.enter_context(stack.opt.evaluation_point())
            yield

    def _downstream_now(self) -> dict[int, dict[str, float]]:
        """Downstream fidelity of this process's SAEs as they are, on the first
        eval_downstream_sequences held-out sequences (by run index)."""
        n = self.cfg.eval_downstream_sequences
        members = [
            (stack, j, i)
            for stack in self.stacks
            if not stack.sae.layered
            for j, i in enumerate(stack.members)
        ]
        saes = [self._checkpoint(stack, j, i) for stack, j, i in members] if n > 0 else []
        results = self._measure_downstream(saes, n, "while training")
        if results is None:
            return {}
        return {
            i: {k: v for k, v in r.items() if isinstance(v, float)}
            for (_, _, i), r in zip(members, results, strict=True)
        }

    def _measure_downstream(self, saes: list, n_sequences: int, when: str) -> list[dict] | None:
        """downstream.measure of (cfg, weights) pairs on the group's held-out text, which is
        prepared once; None (with a warning) when it cannot be measured."""
        if n_sequences <= 0 or not saes:
            return None
        try:
            if self.held_out_text is None:
                cfg = self.cfg
                runs = [self.runs[i] for i in self._single_hook_runs()]
                hooks = sorted({self.source.hook_of(r) for r in runs})
                n = max(cfg.downstream_sequences, cfg.eval_downstream_sequences)
                self.held_out_text = self.source.held_out_text(hooks, n)
            return measure(self.held_out_text, saes, n_sequences)
        except UserError as err:
            print(f"warning: downstream fidelity {when} skipped: {err}")
            return None

    def _held_out(self) -> list[dict[str, torch.Tensor]]:
        """Up to n_val held-out tokens ({hook: acts} batches, every hook's rows the same
        tokens), in memory (read on first use)."""
        if self.held_out_batches is None:
            cfg = self.cfg
            batch = min(cfg.batch_size, cfg.n_val)
            self.held_out_batches = self.source.held_out_activations(cfg.n_val, batch)
        return self.held_out_batches

    def _evaluate(self, held_out) -> dict[int, dict]:
        """Every run's metrics on held-out data (batches of {hook: acts}), by run index."""
        stacks = [(s.sae, s.hook, s.target) for s in self.stacks]
        evals = evaluate_stacks(stacks, held_out, self.normalizer, self.cfg.n_val)
        return {
            i: stack_evals[j]
            for stack, stack_evals in zip(self.stacks, evals, strict=True)
            for j, i in enumerate(stack.members)
        }

    def _finish(self, logs: dict[int, RunLog]) -> list[dict]:
        """Commit the trained state, evaluate and export every run, then (rank 0) measure
        downstream fidelity and absorption of the whole group and commit each run's metrics.json
        once, last; the group's metrics on rank 0, this rank's on the others. A stop before a
        run's metrics.json leaves it unfinished: a resume evaluates it again from the state."""
        self.save_state()
        if self.world.leader:
            self.progress.evaluating(self.step, "held-out FVU and L0")
        if self.reported:
            with self._at_evaluation_point():
                evals = self._evaluate(self._held_out())
                for stack in self.stacks:
                    for j, i in enumerate(stack.members):
                        self._export(stack, j, i, evals[i])
        self.world.barrier()
        if self.world.leader:
            self.progress.evaluating(self.step, "loss recovered")
            downstream = self._downstream()
            self.progress.evaluating(self.step, "absorption")
            absorption = self._absorption()
            for run_dir, d, a in zip(self.run_dirs, downstream, absorption, strict=True):
                commit_metrics(run_dir, d | a)
        self.world.barrier()
        dirs = self.run_dirs
        results = {i: json.loads((d / METRICS).read_text()) for i, d in enumerate(dirs)}
        for i, log in logs.items():
            metrics = results[i]
            summary = {k: v for k, v in metrics.items() if k not in SUMMARY_SKIPS}
            log.finish(summary, metrics["failed"])
        return list(results.values()) if self.world.leader else [results[i] for i in self.reported]

    def _downstream(self) -> list[dict]:
        """Every run's loss recovered / KL (or the encoder score); {} each when not measured."""
        n, single = self.cfg.downstream_sequences, self._single_hook_runs()
        saes = [load_run(self.run_dirs[i]) for i in single] if n > 0 else []
        results = self._measure_downstream(saes, n, "after training")
        by_run = dict(zip(single, results, strict=True)) if results is not None else {}
        return [by_run.get(i, {}) for i in range(len(self.run_dirs))]

    def _single_hook_runs(self) -> list[int]:
        """The runs whose SAE reads one hook: downstream fidelity and absorption measure
        these only (not a layered one, a CLT)."""
        return [i for i, r in enumerate(self.runs) if not architecture(r.sae.arch).layered]

    def _absorption(self) -> list[dict]:
        """Every run's feature absorption (why, each, when not measured): on the held-out
        documents of a live source, the held-out shards of a store."""
        cfg = self.cfg
        if cfg.absorption.n_tokens <= 0:
            return [not_measured("turned off: absorption.n_tokens is 0")] * len(self.run_dirs)
        single = self._single_hook_runs()
        results = [not_measured("not measured for a layered dictionary (clt)")] * len(self.runs)
        if not single:
            return results
        tokens, recorded = self.source.held_out_tokens()
        try:
            dirs = [self.run_dirs[i] for i in single]
            measured = absorption_of(dirs, tokens, cfg.absorption, recorded)
        except UserError as err:
            print(f"warning: absorption skipped: {err}")
            measured = [not_measured(f"skipped: {err}")] * len(single)
        for i, result in zip(single, measured, strict=True):
            results[i] = result
        return results

    def _export(self, stack: Stack, j: int, i: int, evals: dict) -> None:
        run, run_dir = self.runs[i], self.run_dirs[i]
        failed, lens_cfg = bool(stack.failed[j]), stack.sae.sae_lens_cfg()
        metrics = {
            **evals,
            "failed": failed,
            "tokens_seen": self.step * self.cfg.batch_size,
            "steps": self.step,
            "wall_s": self.wall_s(),
            "arch": run.sae.arch,
            "d_sae": stack.sae.d_sae,
            "k": lens_cfg.get("k"),
            **({"k_layers": stack.sae.k_layers} if stack.sae.k_layers > 1 else {}),
            "lr": float(stack.opt.base_lr[j]),
            "seed": run.seed,
            "tag": run.tag,
            "run": run_dir.name,
            "slurm_job_id": os.environ.get("SLURM_JOB_ID", ""),
        }
        sae_cfg, weights = self._checkpoint(stack, j, i)
        export_sae(run_dir, weights, sae_cfg, metrics)

    def _checkpoint(self, stack: Stack, j: int, i: int) -> tuple[dict, dict[str, torch.Tensor]]:
        """(cfg.json, weights) of member j of `stack` (run i) as it is now, acting on raw
        activations."""
        scales = self.normalizer.folded(stack.hook, stack.target)
        sae_cfg = {
            **stack.sae.sae_lens_cfg(),
            **self._hook_fields(stack, scales),
            "model_name": self.source.model_name,
            "seed": self.runs[i].seed,
            "saesweep_config": dataclasses.asdict(self._record(i)),
        }
        return sae_cfg, stack.sae.member_state_dict(j, *scales)

    @staticmethod
    def _hook_fields(stack: Stack, scales: tuple) -> dict:
        """cfg.json's hooks and folded scales: hook_name, input_scale (and a transcoder's
        hook_name_out, target_scale); a layered stack's as lists, one per layer
        (hook_names, hook_names_out, input_scales, target_scales)."""
        if stack.sae.layered:
            return {
                "hook_names": parts(stack.hook),
                "hook_names_out": parts(stack.target),
                "input_scales": scales[0],
                "target_scales": scales[1],
            }
        fields = {"hook_name": stack.hook, "input_scale": scales[0]}
        if stack.sae.transcoder:
            fields |= {"hook_name_out": stack.target, "target_scale": scales[1]}
        return fields

    def _record(self, i: int) -> TrainConfig:
        """Run i's flat config (its device resolved), as cfg.json and wandb record it."""
        return TrainConfig.joined(self.sweep_cfg, self.cfg, self.runs[i])

    def save_state(self) -> None:
        """Each rank's tensors in its own file named by step, then one commit (rank 0's
        atomic state.json: step, reader position, files), so a kill at any moment leaves the
        last commit whole and no mix of ranks from different steps. In data mode rank 0's
        replica stands for all."""
        self.last_save = time.perf_counter()
        name = f"state-{self.step:08d}.rank-{self.world.rank}.safetensors"
        if self.world.mode == "sae" or self.world.leader:
            tensors = {"rng": torch.get_rng_state()}
            for s, stack in enumerate(self.stacks):
                tensors |= {f"{s}.sae.{k}": v for k, v in stack.sae.state_dict().items()}
                tensors |= {f"{s}.opt.{k}": v for k, v in stack.opt.state_dict().items()}
                tensors[f"{s}.failed"] = stack.failed
            write_tensors(self.state_dir / name, tensors)
        self.world.barrier()
        if self.world.leader:
            n_files = self.world.size if self.world.mode == "sae" else 1
            commit_state(
                self.state_dir,
                {
                    "step": self.step,
                    "reader": self.source.state_dict(),
                    "normalizer": self.normalizer.state_dict(),
                    "wall_s": self.wall_s(),
                    "procs": self.world.size,
                    "parallel": self.world.mode,
                    "files": [name.replace(".rank-0.", f".rank-{r}.") for r in range(n_files)],
                },
            )

    def _load_state(self) -> bool:
        commit = self.world.share(saved_state(self.state_dir) if self.world.leader else None)
        if commit is None:
            return False
        if (commit["procs"], commit["parallel"]) != (self.world.size, self.world.mode):
            raise UserError(
                f"the state in {self.state_dir} was saved by {commit['procs']} processes in "
                f"parallel mode {commit['parallel']!r}; resume it the same way"
            )
        files = commit["files"]
        tensors = load_state(self.state_dir / files[self.world.rank if len(files) > 1 else 0])
        torch.set_rng_state(tensors["rng"])
        for s, stack in enumerate(self.stacks):
            stack.sae.load_state_dict(_prefixed(tensors, f"{s}.sae."))
            stack.opt.load_state_dict(_prefixed(tensors, f"{s}.opt."))
            stack.failed.copy_(tensors[f"{s}.failed"])
        self.step = self.first_step = commit["step"]
        self.earlier_wall_s = commit["wall_s"]
        self.source.load_state_dict(commit["reader"])
        if "normalizer" in commit:  # the scales the SAEs trained with, not estimated again
            self.normalizer = Normalizer(commit["normalizer"])
        return True

    def wall_s(self) -> float:
        """Training wall time so far, over every process of this group (resumes included)."""
        return self.earlier_wall_s + time.perf_counter() - self.started


def _with_dead_window(sae_cfg: SAEConfig, n_train: int) -> SAEConfig:
    """sae_cfg with its dead-latent window resolved for a run of n_train tokens."""
    return dataclasses.replace(sae_cfg, dead_tokens=sae_cfg.dead_window(n_train))


def _optimizer(name: Optimizer, sae: StackedSAE, lrs: list[float]) -> StackedOptimizer:
    """The stack's optimizer `name` (RunFields.optimizer) with a base lr per member."""
    if name == "signum_schedulefree":
        return StackedSignumScheduleFree(sae.parameters(), lrs)
    return StackedAdam(sae.parameters(), lrs, betas=sae.adam_betas)


def _prefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
