"""Architecture options live in SAEConfig's per-architecture sections; the flat spellings of
before the sections (`sae.n_experts`, `--sae.jumprelu-bandwidth`) name the same fields."""

from __future__ import annotations

import dataclasses
import json

import pytest

from saesweep.configtools import parse_flags
from saesweep.evaluate.report import readers, run_params
from saesweep.sae import PER_MEMBER_FIELDS, SAEConfig, stack_key
from saesweep.sae.jumprelu import JumpReLUConfig
from saesweep.train.cli import load_sweep_configs
from saesweep.train.config import TrainConfig
from saesweep.train.sweep import build_configs

FLAT = {
    "n_experts": 4,
    "switch_capacity_factor": 3.0,
    "jumprelu_bandwidth": 0.05,
    "jumprelu_init_threshold": 1.5,
    "batchtopk_threshold_momentum": 0.9,
    "matryoshka_widths": [8, 16],
    "relu_init_norm": 0.2,
}
"""Every flat spelling, with a value other than its default."""


def _sections(sae: SAEConfig) -> tuple:
    return (
        sae.switch.n_experts,
        sae.switch.capacity_factor,
        sae.jumprelu.bandwidth,
        sae.jumprelu.init_threshold,
        sae.batchtopk.threshold_momentum,
        sae.matryoshka.widths,
        sae.relu.init_norm,
    )


WANT = (4, 3.0, 0.05, 1.5, 0.9, (8, 16), 0.2)


def _flags(*args: str) -> dict:
    (overrides,) = parse_flags(list(args), (TrainConfig,), "train.py")
    return overrides


def test_flat_sweep_keys_set_the_sections():
    (cfg,) = build_configs([{"sae": FLAT}], {}, "sweep")
    assert _sections(cfg.sae) == WANT


def test_flat_and_section_flags_name_one_field():
    flat = _flags(*(a for k, v in FLAT.items() for a in (f"--sae.{k}", str(v).strip("[]"))))
    (cfg,) = build_configs([{}], flat, "sweep")
    assert _sections(cfg.sae) == WANT
    assert _flags("--sae.n-experts", "4") == {"sae": {"switch": {"n_experts": 4}}}
    assert _flags("--sae.switch.n-experts", "4") == {"sae": {"switch": {"n_experts": 4}}}


@pytest.mark.parametrize(
    "sweep",
    [
        {"n_experts": 4, "switch": {"capacity_factor": 3.0}},
        {"switch": {"capacity_factor": 3.0}, "n_experts": 4},
        {"switch": {"capacity_factor": 3.0, "n_experts": 4}},
    ],
)
@pytest.mark.parametrize("flag", ["--sae.n-experts", "--sae.switch.n-experts"])
def test_a_flag_beats_the_sweep_whichever_spelling_each_uses(sweep, flag):
    (cfg,) = build_configs([{"sae": sweep}], _flags(flag, "16"), "sweep")
    assert (cfg.sae.switch.n_experts, cfg.sae.switch.capacity_factor) == (16, 3.0)


def test_sweep_json_of_flat_configs_resumes(tmp_path):
    old = dataclasses.asdict(TrainConfig())
    sae = {k: v for k, v in old["sae"].items() if not isinstance(v, dict)}
    old["sae"] = sae | FLAT
    (tmp_path / "sweep.json").write_text(json.dumps({"configs": [old]}))
    (cfg,) = load_sweep_configs(tmp_path, _flags("--sae.relu-init-norm", "0.3"))
    assert _sections(cfg.sae) == (*WANT[:-1], 0.3)


def test_per_member_fields_of_a_section_share_a_stack():
    assert "jumprelu.init_threshold" in PER_MEMBER_FIELDS
    a = SAEConfig(arch="jumprelu", jumprelu=JumpReLUConfig(init_threshold=0.1), aux_coeff=0)
    b = SAEConfig(arch="jumprelu", jumprelu=JumpReLUConfig(init_threshold=2.0))
    c = SAEConfig(arch="jumprelu", jumprelu=JumpReLUConfig(bandwidth=0.1))
    assert stack_key(a) == stack_key(b) != stack_key(c)


def test_the_report_reads_flat_options_of_older_runs(tmp_path):
    old = {"sae": {"arch": "switch", "k": 8} | FLAT, "lr": 1e-3}
    (tmp_path / "cfg.json").write_text(json.dumps({"saesweep_config": old}))
    params = run_params(tmp_path, {"arch": "switch"})
    assert params["sae.switch.n_experts"] == 4 and params["sae.relu.init_norm"] == 0.2
    assert "sae.n_experts" not in params


def test_a_section_applies_to_its_architecture_and_those_built_on_or_reading_it():
    assert readers("sae.batchtopk.threshold_momentum") == ("batchtopk", "matryoshka")
    assert readers("sae.switch.n_experts") == ("switch",)
    assert readers("sae.k") is None
    assert set(readers("sae.jumprelu.bandwidth")) == {"jumprelu", "clt", "crosscoder"}
    assert "clt" in readers("objective.sparsity_coeff")
    assert "crosscoder" in readers("sae.aux_k") and "clt" not in readers("sae.aux_k")
