"""Trainer state and checkpoint files: a damaged state or a full disk is one sentence."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from test_collect import small_disk  # noqa: F401 (a fixture: a real 3 MiB tmpfs)

from saesweep.errors import UserError
from saesweep.evaluate.report import load_results
from saesweep.format.rundir import (
    WEIGHTS_CHECKSUM,
    load_sae,
    save_sae,
    write_json,
    write_tensors,
)
from saesweep.train.checkpoint import commit_state, load_state, saved_state


def test_truncated_trainer_state_is_one_sentence(tmp_path):
    path = tmp_path / "state-00000003.rank-0.safetensors"
    write_tensors(path, {"w": torch.arange(1000.0)})
    commit = {"step": 3, "reader": {}, "wall_s": 1.0, "procs": 1, "parallel": "sae"}
    commit_state(tmp_path, commit | {"files": [path.name]})
    assert saved_state(tmp_path)["step"] == 3
    assert torch.equal(load_state(path)["w"], torch.arange(1000.0))
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(UserError, match=f"the trainer state {path} is damaged"):
        load_state(path)
    (tmp_path / "state.json").write_text('{"step": 3, "fil')
    with pytest.raises(UserError, match="the trainer state .*state.json is damaged"):
        saved_state(tmp_path)


def test_a_commit_removes_older_states_and_names_missing_ones(tmp_path):
    commit = {"step": 1, "reader": {}, "wall_s": 1.0, "procs": 2, "parallel": "sae"}
    old = [f"state-00000001.rank-{r}.safetensors" for r in range(2)]
    new = [f"state-00000002.rank-{r}.safetensors" for r in range(2)]
    for name in old:
        write_tensors(tmp_path / name, {"w": torch.zeros(1)})
    commit_state(tmp_path, commit | {"files": old})
    for name in new:
        write_tensors(tmp_path / name, {"w": torch.zeros(1)})
    assert saved_state(tmp_path)["files"] == old
    commit_state(tmp_path, commit | {"step": 2, "files": new})
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == new
    (tmp_path / new[1]).unlink()
    with pytest.raises(UserError, match="names missing files"):
        saved_state(tmp_path)


def test_a_state_saved_before_commits_still_resumes(tmp_path):
    position = {"step": 7, "reader": {"epoch": 1}}
    write_tensors(
        tmp_path / "state.safetensors", {"w": torch.ones(2)}, {"position": json.dumps(position)}
    )
    commit = saved_state(tmp_path)
    assert commit == position | {
        "wall_s": 0.0,
        "procs": 1,
        "parallel": "sae",
        "files": ["state.safetensors"],
    }


def test_full_disk_is_one_sentence_and_leaves_no_file(small_disk):  # noqa: F811
    run_dir = small_disk / "run-000"
    write_json(run_dir / "cfg.json", {"d_in": 4})
    path = run_dir / "sae_weights.safetensors"
    with pytest.raises(UserError, match=f"cannot write {path}: the disk holding it is full"):
        write_tensors(path, {"W_enc": torch.zeros(1 << 20)})  # 4 MiB on a 3 MiB disk
    assert [p.name for p in run_dir.iterdir()] == ["cfg.json"]


def checkpoint(run_dir, value: float, lr: float) -> None:
    weights = {"W_enc": torch.full((4, 8), value), "b_dec": torch.zeros(4)}
    save_sae(run_dir, weights, {"d_in": 4, "d_sae": 8}, {"lr": lr, "fvu": value})


def test_a_checkpoint_is_committed_as_one_unit(tmp_path):
    """Weights, cfg.json and metrics.json are bound by the weights' checksum; metrics.json,
    the commit point, goes first and comes last: whatever write was cut short, no reader takes
    one checkpoint's weights with another's cfg or metrics."""
    run_dir = tmp_path / "runs" / "run-000"
    checkpoint(run_dir, 1.0, 1e-3)
    cfg, sd = load_sae(run_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert cfg[WEIGHTS_CHECKSUM] == metrics[WEIGHTS_CHECKSUM] and torch.equal(
        sd["W_enc"], torch.ones(4, 8)
    )
    assert load_results([tmp_path])[0]["lr"] == 1e-3
    assert sorted(p.name for p in run_dir.iterdir()) == [
        "cfg.json", "metrics.json", "sae_weights.safetensors"
    ]  # fmt: skip

    old = {name: (run_dir / name).read_bytes() for name in ("cfg.json", "metrics.json")}
    other = tmp_path / "other" / "run-000"
    checkpoint(other, 2.0, 3e-5)
    # a write of the second checkpoint cut short after its weights: metrics.json is gone (the
    # run reads as unfinished) and its weights do not pass for the first one's
    (run_dir / "metrics.json").unlink()
    shutil.copy(other / "sae_weights.safetensors", run_dir / "sae_weights.safetensors")
    assert load_results([tmp_path]) == []
    with pytest.raises(UserError, match="sae_weights.safetensors is not the one .*cfg.json"):
        load_sae(run_dir)
    # files mixed between runs (copied, or written by two runs): refused by name
    (run_dir / "metrics.json").write_bytes((other / "metrics.json").read_bytes())
    shutil.copy(other / "sae_weights.safetensors", run_dir / "sae_weights.safetensors")
    (run_dir / "cfg.json").write_bytes(old["cfg.json"])
    with pytest.raises(UserError, match="metrics.json is not the one .*cfg.json"):
        load_results([tmp_path])
    # rewritten as a whole: one unit again
    checkpoint(run_dir, 2.0, 3e-5)
    assert load_sae(run_dir)[1]["W_enc"][0, 0] == 2.0
    assert [r["lr"] for r in load_results([tmp_path])] == [3e-5]


def test_checkpoints_without_the_checksum_still_load(tmp_path):
    """SAELens's own directories and older saesweep checkpoints have no checksum."""
    run_dir = tmp_path / "runs" / "run-000"
    write_tensors(run_dir / "sae_weights.safetensors", {"W_enc": torch.ones(4, 8)})
    write_json(run_dir / "cfg.json", {"d_in": 4, "d_sae": 8})
    write_json(run_dir / "metrics.json", {"lr": 1e-3})
    assert torch.equal(load_sae(run_dir)[1]["W_enc"], torch.ones(4, 8))
    assert load_results([tmp_path])[0]["lr"] == 1e-3
