"""Trainer state and checkpoint files: a damaged state or a full disk is one sentence."""

from __future__ import annotations

import json

import pytest
import torch
from test_collect import small_disk  # noqa: F401 (a fixture: a real 3 MiB tmpfs)

from saesweep.errors import UserError
from saesweep.train.checkpoint import load_state, write_json, write_tensors


def test_truncated_trainer_state_is_one_sentence(tmp_path):
    path = tmp_path / "state.safetensors"
    write_tensors(path, {"w": torch.arange(1000.0)}, {"position": json.dumps({"step": 3})})
    tensors, position = load_state(path)
    assert position == {"step": 3} and torch.equal(tensors["w"], torch.arange(1000.0))
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(UserError, match=f"the trainer state {path} is damaged"):
        load_state(path)


def test_full_disk_is_one_sentence_and_leaves_no_file(small_disk):  # noqa: F811
    run_dir = small_disk / "run-000"
    write_json(run_dir / "cfg.json", {"d_in": 4})
    path = run_dir / "sae_weights.safetensors"
    with pytest.raises(UserError, match=f"cannot write {path}: the disk holding it is full"):
        write_tensors(path, {"W_enc": torch.zeros(1 << 20)})  # 4 MiB on a 3 MiB disk
    assert [p.name for p in run_dir.iterdir()] == ["cfg.json"]
