"""Per-SAE metric logs: a metrics.jsonl in the run directory and a live wandb run."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from saesweep.store.file import write_atomic


class RunLog:
    """One SAE's log; wandb runs are live while training, offline unless credentials exist.

    A run that starts again at step `resumed_at` (0: from the start) keeps only the lines of
    its metrics.jsonl up to that step, so a resumed log goes on without repeating steps."""

    def __init__(
        self,
        run_dir: Path,
        name: str,
        cfg,
        sweep: str,
        group: int,
        mode: str,
        project: str,
        resumed_at: int = 0,
    ):
        self.path = run_dir / "metrics.jsonl"
        run_dir.mkdir(parents=True, exist_ok=True)
        self._keep_until(resumed_at)
        self.wandb_run = None
        if mode != "disabled":
            import wandb

            if mode == "online" and not (os.environ.get("WANDB_API_KEY") or _netrc_has_wandb()):
                mode = "offline"
            self.wandb_run = wandb.init(
                project=project,
                name=name,
                group=sweep,
                job_type=f"group-{group}",
                dir=str(run_dir),
                mode=mode,
                config=dataclasses.asdict(cfg),
                reinit="create_new",
                id=f"{sweep}-{name}".replace("/", "-")[-128:],
                resume="allow",
            )

    def _keep_until(self, step: int) -> None:
        """Drop the lines logged after `step` (and a line cut short by a kill), atomically."""
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines() if _step_of(line) <= step]
        write_atomic(self.path, lambda f: f.write("".join(f"{k}\n" for k in kept).encode()))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=step)

    def finish(self, summary: dict, failed: bool) -> None:
        if self.wandb_run is not None:
            self.wandb_run.summary.update(summary)
            self.wandb_run.finish(exit_code=1 if failed else 0)


def _step_of(line: str) -> float:
    """The step a metrics.jsonl line was logged at (infinite for a line that does not parse)."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")


def _netrc_has_wandb() -> bool:
    netrc = Path.home() / ".netrc"
    return netrc.exists() and "api.wandb.ai" in netrc.read_text()
