"""Trainer state and checkpoint files: a damaged state or a full disk is one sentence."""

from __future__ import annotations

import json

import pytest
import torch
from test_collect import small_disk  # noqa: F401 (a fixture: a real 3 MiB tmpfs)

from saesweep.errors import UserError
from saesweep.train.checkpoint import (
    commit_state,
    load_state,
    saved_state,
    write_json,
    write_tensors,
)


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
