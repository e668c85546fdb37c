"""Cross-layer transcoders trained by the group trainer from a real collection (the packaged
MiniLM, residual stream to MLP output over layers 1-3), every hook read in lockstep:
FVU falls, per-layer FVU reported, a group equals its runs alone, saesweep.load's forward
equals the trained module's."""

from __future__ import annotations

import dataclasses
import itertools
import json

import pytest
import torch
from test_collect import small
from test_distributed import assert_data_mode_matches, assert_same_runs, finished, mixed_args
from test_train import assert_group_equals_alone, only_dir, run_train, train, weights
from test_train import cfg as train_cfg

import saesweep
from saesweep import Reader
from saesweep.collect.run import collect
from saesweep.evaluate.health import assess
from saesweep.memory import group_bytes
from saesweep.sae import CLTConfig, ObjectiveConfig, SAEConfig
from saesweep.sae.batchtopk import BatchTopKConfig
from saesweep.train.config import DataConfig

LAYERS = (1, 2, 3)
INPUTS = [f"resid.{layer}" for layer in LAYERS]
TARGETS = [f"mlp.{layer}" for layer in LAYERS]


@pytest.fixture(scope="module")
def coll(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("clt") / "coll"
    hooks = (*INPUTS, *TARGETS, "resid.0")
    collect(small(out, hooks=hooks, act_dtype="float32", max_tokens=6000, shard_tokens=1500))
    return str(out)


def _cfg(coll: str, activation: str = "topk", **kw):
    clt = CLTConfig(layers=LAYERS, input_site="resid", target_site="mlp", activation=activation)
    quick = BatchTopKConfig(threshold_momentum=0.5)  # batchtopk's threshold within few steps
    sae = SAEConfig(arch="clt", d_sae=96, k=8, clt=clt, batchtopk=quick)
    base = dict(
        train_data=DataConfig(uri=coll, shards=":-1", collect=""),
        sae=sae,
        lr=1e-2,
        n_train=4096,
        batch_size=256,
        log_every=2,
    )
    return train_cfg(coll, **(base | kw))


def _fvus(run_dir) -> list[float]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").open()]
    return [x["fvu"] for x in lines if "fvu" in x]


def test_clts_train_from_a_collection_with_every_layer_in_lockstep(coll, tmp_path):
    relu = dict(
        sae=dataclasses.replace(_cfg(coll).sae, clt=_cfg(coll, "relu").sae.clt),
        objective=ObjectiveConfig(sparsity_coeff=1e-4),
    )
    cfgs = [_cfg(coll, seed=1), _cfg(coll, seed=2, lr=3e-3), _cfg(coll, seed=3, **relu)]
    # an SAE on one of the CLTs' hooks (named by its module path) in the same group and read
    data = DataConfig(uri=coll, hook="encoder.layer.2", shards=":-1", collect="")
    sae = _cfg(coll, seed=4, sae=SAEConfig(d_sae=96, k=8), train_data=data)
    cfgs = [dataclasses.replace(c, train_data=data) for c in cfgs] + [sae]
    *results, sae_result = train(cfgs, tmp_path)
    assert sae_result["fvu"] < 0.9 and "fvu_by_hook" not in sae_result, sae_result
    for i, result in enumerate(results):
        run = tmp_path / f"run-{i}"
        fvus = _fvus(run)
        assert fvus[-1] < 0.9 * fvus[0], fvus  # measured 0.8 x (3e-3) after 16 steps
        assert result["fvu"] < 0.9, result
        layered = result["fvu_by_hook"]
        assert len(layered) == 3 and all(0 < v < 1 for v in layered.values()), layered
        logged = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
        assert all(f"fvu_layer_{layer}" in logged for layer in LAYERS), logged
        sae_cfg = json.loads((run / "cfg.json").read_text())
        assert sae_cfg["hook_names"][0].endswith("layer.1")
        assert len(sae_cfg["input_scales"]) == 3 and sae_cfg["layers"] == list(LAYERS)
    assert 8 < results[0]["l0"] <= 8 * 3  # k per layer, of the positive pre-activations
    assert results[0]["k_layers"] == 3
    assert not any(r.startswith("L0") for r in assess(results[0]).reasons), "budget L x k"
    sd = weights(tmp_path / "run-0")
    assert sd["W_enc_0"].shape == (384, 96) and sd["W_dec_0"].shape == (96, 3, 384)
    assert sd["W_dec_2"].shape == (96, 1, 384) and sd["b_dec_1"].shape == (384,)


def test_a_group_of_clts_equals_each_alone(coll, tmp_path):
    cfgs = [_cfg(coll, seed=1, n_train=1024), _cfg(coll, seed=2, lr=1e-3, n_train=1024)]
    assert_group_equals_alone(cfgs, tmp_path)


def test_clts_in_two_stacks_share_one_joined_batch_and_equal_each_alone(coll, tmp_path):
    """A TopK and a ReLU CLT (two stacks) read the same layers side by side, joined once a
    step for both."""
    cfgs = [_cfg(coll, "topk", seed=1, n_train=1024), _cfg(coll, "relu", seed=2, n_train=1024)]
    assert_group_equals_alone(cfgs, tmp_path)


@pytest.mark.parametrize("activation", ["topk", "batchtopk", "jumprelu"])
def test_load_gives_the_trained_clts_forward_on_raw_activations(coll, tmp_path, activation):
    result = train([_cfg(coll, activation, n_train=1024)], tmp_path)[0]
    clt = saesweep.load(tmp_path / "run-0")
    reader = Reader(coll, hook=INPUTS[0], extra_hooks=[*INPUTS[1:], *TARGETS], shards="-1:",
                    batch_size=256, shuffle=False)  # fmt: skip
    batches = list(itertools.islice(reader, 2))  # the tokens evaluation read (n_val 512)
    batch = {h: torch.cat([b[h] for b in batches]).double() for h in batches[0]}
    xs = torch.stack([batch[h] for h in clt.cfg["hook_names"]], dim=1)
    ys = torch.stack([batch[h] for h in clt.cfg["hook_names_out"]], dim=1)
    clt = dataclasses.replace(clt, weights={k: v.double() for k, v in clt.weights.items()})
    codes = clt.encode(xs)
    assert codes.shape == (result["val_tokens"], 3, 96)
    assert (codes > 0).sum(-1).double().mean() > 2
    sse = (clt.decode(codes) - ys).pow(2).sum()
    assert sse / (ys - ys.mean(0)).pow(2).sum() == pytest.approx(result["fvu"], rel=1e-4)


def test_the_memory_estimate_counts_every_decoder_block():
    one = SAEConfig(arch="clt", d_sae=64, clt=CLTConfig(layers=(1,)))
    three = dataclasses.replace(one, clt=CLTConfig(layers=LAYERS))
    params = [
        group_bytes([c], 32, 1) - 4 * 4 * c.width(32) * len(c.clt.layers) for c in (one, three)
    ]
    # decoder blocks: 1 with one layer, 6 with three; each 64 x 32 floats with Adam (16 bytes)
    assert params[1] - 3 * params[0] == (6 - 3) * 64 * 32 * 16


CLT_SWEEP = """
def make_cfgs():
    clt = {"arch": "clt", "d_sae": 64, "k": 4,
           "clt": {"layers": [1, 2, 3], "input_site": "resid", "target_site": "mlp"}}
    penalty = {"sparsity_coeff": 1e-4}
    relu, jumprelu = ({"clt": clt["clt"] | {"activation": a}} for a in ("relu", "jumprelu"))
    return [
        {"lr": 1e-2, "sae": clt},
        {"lr": 3e-3, "sae": clt | {"d_sae": 32}},
        {"lr": 3e-3, "sae": clt | relu, "objective": penalty},
        {"lr": 1e-2, "sae": clt | jumprelu, "objective": penalty},
        {"lr": 1e-2, "sae": {"arch": "crosscoder", "d_sae": 96, "k": 8,
                             "crosscoder": {"layers": [1, 2, 3], "site": "resid"}}},
    ]
"""
"""Four CLTs: TopK with sparse codes (k 4 of 64 per layer) and with dense ones (of 32), ReLU,
JumpReLU; and a TopK crosscoder over the same layers' inputs."""

ONE_THREAD = {"OMP_NUM_THREADS": "1", "SAESWEEP_CPUS": "1"}
"""One thread in the one process and in each of two: the same products, the same sums."""


def clt_args(coll: str, tmp_path, root: str, *extra: str) -> list[str]:
    steps = ["--n-train", "3840", "--log-every", "10"]  # 30 steps of 128
    return mixed_args(coll, tmp_path, root, *steps, *extra, sweep_text=CLT_SWEEP)


@pytest.fixture(scope="module")
def clts_one_process(coll, tmp_path_factory):
    """The four CLTs trained in one process: the reference of both modes."""
    root = tmp_path_factory.mktemp("clt-one")
    with pytest.MonkeyPatch.context() as env:
        for name, value in ONE_THREAD.items():
            env.setenv(name, value)
        finished(run_train(*clt_args(coll, root, "one", "--executor", "debug")))
    return only_dir(root / "one")


def test_clts_split_over_processes_are_bit_identical_to_one(
    coll, clts_one_process, tmp_path, monkeypatch
):
    for name, value in ONE_THREAD.items():
        monkeypatch.setenv(name, value)
    two = ["--executor", "local", "--procs-per-group", "2"]
    finished(run_train(*clt_args(coll, tmp_path, "two", *two)))
    sweep_dir = only_dir(tmp_path / "two")
    assert_same_runs(clts_one_process, sweep_dir, exact=True, n_runs=5)
    for run in (clts_one_process / "runs").iterdir():
        want = json.loads((run / "metrics.json").read_text())
        got = json.loads((sweep_dir / "runs" / run.name / "metrics.json").read_text())
        assert got["fvu"] == want["fvu"] and got["fvu_by_hook"] == want["fvu_by_hook"]


def test_data_parallel_clts_match_one_process(coll, clts_one_process, tmp_path):
    """The first logged loss to float rounding, the weights to a near-tie flip's size."""
    two = ["--executor", "local", "--procs-per-group", "2", "--parallel", "data"]
    finished(run_train(*clt_args(coll, tmp_path, "two", *two)))
    assert_data_mode_matches(clts_one_process, only_dir(tmp_path / "two"), 10, 3840, n_runs=5)
