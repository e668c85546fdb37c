"""Which models load, and how: a model's own code never runs unasked, and a model named by a
collection loads only from local files or the cache (no download, no interactive prompt)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_models import build

from saesweep.collect.model import load_model, load_tokenizer
from saesweep.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_CODE = """from transformers import GPT2Config, GPT2LMHeadModel


class ShippedConfig(GPT2Config):
    model_type = "shipped"


class ShippedLMHeadModel(GPT2LMHeadModel):
    config_class = ShippedConfig
"""


@pytest.fixture(scope="module")
def custom_model(tmp_path_factory) -> Path:
    """A tiny GPT-2 whose config class is code shipped beside its weights."""
    path = build("gpt2", tmp_path_factory.mktemp("custom"))
    config = json.loads((path / "config.json").read_text())
    config["model_type"] = "shipped"
    config["architectures"] = ["ShippedLMHeadModel"]
    config["auto_map"] = {
        "AutoConfig": "shipped.ShippedConfig",
        "AutoModelForCausalLM": "shipped.ShippedLMHeadModel",
    }
    (path / "config.json").write_text(json.dumps(config))
    (path / "shipped.py").write_text(SHIPPED_CODE)
    return path


def test_shipped_code_runs_only_with_trust_remote_code(custom_model, tmp_path):
    with pytest.raises(UserError, match="ships its own code, which runs only with --trust-remote"):
        load_model(str(custom_model), None, "float32", "cpu")
    model, _ = load_model(str(custom_model), None, "float32", "cpu", trust_remote_code=True)
    assert type(model).__name__ == "ShippedLMHeadModel"
    args = ["--model", str(custom_model), "--out", str(tmp_path / "c"), "--max-tokens", "64"]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "collect.py"), *args, "--device", "cpu"],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        cwd=ROOT,
    )
    assert proc.returncode == 2 and "--trust-remote-code" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "c" / "cfg.json").exists()


def test_a_model_named_by_a_collection_is_not_downloaded():
    name = "saesweep-tests/no-such-model"
    with pytest.raises(UserError, match="in the local cache \\(downloads are off here\\)"):
        load_model(name, None, "float32", "cpu", download=False)
    with pytest.raises(UserError, match="downloads are off here"):
        load_tokenizer(name, None)
