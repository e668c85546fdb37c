"""Transcoders trained by the group trainer: from a two-hook store and live from a model,
checkpoints that SAELens loads as Transcoder / SkipTranscoder, refusals of bad targets."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from groups import group_trainer
from synthetic import HOOK, TARGET, make_collection
from test_live_source import config  # noqa: F401 (a fixture)
from test_train import cfg as train_cfg

from saesweep import Reader
from saesweep.errors import UserError
from saesweep.format.rundir import load_sae
from saesweep.sae import JumpReLUConfig, SAEConfig
from saesweep.sae.export import apply_exported
from saesweep.train.config import DataConfig
from saesweep.train.preflight import check_data
from saesweep.train.sweep import make_config, split_groups

D, D_OUT = 16, 12
RUNS = {
    "sae": dict(arch="topk"),
    "topk": dict(arch="topk"),
    "relu": dict(arch="relu"),
    "relu_skip": dict(arch="relu", skip=True),
    "jumprelu": dict(arch="jumprelu", jumprelu=JumpReLUConfig(init_threshold=0.05)),
    "batchtopk_skip": dict(arch="batchtopk", skip=True),
}
SAELENS = {
    "relu": "Transcoder",
    "relu_skip": "SkipTranscoder",
    "jumprelu": "JumpReLUTranscoder",
    "batchtopk_skip": "JumpReLUSkipTranscoder",
}


def _cfgs(uri: str) -> list:
    out = []
    for i, (name, sae) in enumerate(RUNS.items()):
        target = {} if name == "sae" else {"target_hook": TARGET}
        out.append(
            train_cfg(
                uri,
                seed=i,
                train_data=DataConfig(uri=uri, hook=HOOK, shards=":-1", collect="", **target),
                sae=SAEConfig(d_sae=64, k=4, **sae),
                lr=1e-2,
                n_train=12288,
                tag=name,
            )
        )
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("transcoders")
    uri = str(root / "coll")
    make_collection(uri, [1024] * 4, d=D, sparse=True, target_d=D_OUT)
    cfgs = _cfgs(uri)
    sae_group, transcoders = split_groups(cfgs)  # from a store the target is a group field
    assert check_data(transcoders) == D and len(transcoders.runs) == len(RUNS) - 1
    dirs = {name: root / name for name in RUNS}
    results = []
    for group in (sae_group, transcoders):
        names = [r.tag for r in group.runs]
        state = root / f"state-{group.index}"
        members = [cfgs[i] for i in group.run_ids]
        results += group_trainer(members, [dirs[n] for n in names], state).train()
    return uri, dirs, dict(zip(RUNS, results, strict=True))


def _val(uri: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The first n_val (512) tokens of the held-out shard, raw, both hooks."""
    reader = Reader(
        uri, hook=HOOK, extra_hooks=[TARGET], shards=slice(-1, None), batch_size=512, shuffle=False
    )
    batch = next(iter(reader))
    return batch[HOOK], batch[TARGET]


def test_checkpoints_record_both_hooks_and_predict_the_target(trained):
    uri, dirs, metrics = trained
    x, y = _val(uri)
    for name, run_dir in dirs.items():
        cfg, sd = load_sae(run_dir)
        assert cfg["hook_name"] == HOOK
        pred = apply_exported(cfg, sd, x)
        want = y if name != "sae" else x
        if name != "sae":
            assert cfg["hook_name_out"] == TARGET and cfg["d_out"] == D_OUT
            assert cfg["apply_b_dec_to_input"] is False and pred.shape == (512, D_OUT)
        else:
            assert "hook_name_out" not in cfg and pred.shape == (512, D)
        # the reported FVU is against the target, from raw weights on raw activations
        fvu = (pred - want).pow(2).sum() / (want - want.mean(0)).pow(2).sum()
        assert metrics[name]["fvu"] == pytest.approx(fvu.item(), rel=1e-4), name
    assert metrics["topk"]["fvu"] < 0.9, metrics["topk"]  # 96 steps on the planted map: 0.73
    assert ("W_skip" in load_sae(dirs["relu_skip"])[1]) and "W_skip" not in load_sae(dirs["relu"])[
        1
    ]
    assert load_sae(dirs["relu_skip"])[1]["W_skip"].abs().sum() > 0


@pytest.mark.parametrize("name", sorted(SAELENS))
def test_sae_lens_loads_transcoders_and_skip_transcoders(trained, name):
    from sae_lens import SAE

    _, dirs, _ = trained
    lens = SAE.load_from_disk(str(dirs[name]), device="cpu")
    assert type(lens).__name__ == SAELENS[name]
    assert (lens.cfg.d_in, lens.cfg.d_out) == (D, D_OUT)
    cfg, sd = load_sae(dirs[name])
    x = torch.randn(64, D, generator=torch.Generator().manual_seed(0)) * 2
    with torch.no_grad():
        torch.testing.assert_close(lens(x), apply_exported(cfg, sd, x), rtol=1e-5, atol=1e-5)


def test_bad_targets_are_one_sentence(tmp_path):
    uri = str(tmp_path / "coll")
    make_collection(uri, [256] * 3, d=D, target_d=D_OUT, target_sizes=[256, 256, 200])
    (group,) = split_groups(_cfgs(uri)[1:2])
    with pytest.raises(UserError, match=r"store different tokens .* one collection run"):
        check_data(group)
    missing = dataclasses.replace(group.config.train_data, target_hook="resid.9")
    with pytest.raises(UserError, match="has no hook matching hook='resid.9'"):
        check_data(
            dataclasses.replace(group, config=dataclasses.replace(group.config, train_data=missing))
        )
    itself = dataclasses.replace(missing, target_hook=HOOK)
    with pytest.raises(UserError, match="is the input hook"):
        check_data(
            dataclasses.replace(group, config=dataclasses.replace(group.config, train_data=itself))
        )
    with pytest.raises(UserError, match="sae.skip needs a target hook"):
        make_config({"sae": {"skip": True}}, "here")


def test_a_live_group_feeds_the_target_from_the_same_forward_pass(config, tmp_path):  # noqa: F811
    toml = tmp_path / "live.toml"
    toml.write_text(f'dataset = "{config.dataset}"\nctx_len = 32\nbatch_size = 8\n')
    live = {"source": "model", "collect": str(toml), "layer": 1}
    cfgs = [
        train_cfg(
            "",
            seed=i,
            train_data=DataConfig(**live, shuffle_tokens=1024, **target),
            val_data=DataConfig(uri="", **live),
            n_train=2048,
            n_val=256,
            device="cpu",
            sae=SAEConfig(arch="topk", d_sae=128, k=8, skip=bool(target)),
        )
        for i, target in enumerate([{}, {"target_layer": 3}])
    ]
    (group,) = split_groups(cfgs)
    assert len(group.runs) == 2, "the target hook does not split a live group"
    dirs = [tmp_path / "sae", tmp_path / "tc"]
    trainer = group_trainer(cfgs, dirs, tmp_path / "state")
    assert sorted(trainer.source.hooks.values()) == ["encoder.layer.1", "encoder.layer.3"]
    sae, tc = trainer.train()
    saved = json.loads((dirs[1] / "cfg.json").read_text())
    assert (saved["hook_name"], saved["hook_name_out"]) == ("encoder.layer.1", "encoder.layer.3")
    assert saved["architecture"] == "topk_skip_transcoder"
    assert 0 < tc["fvu"] < 1 and tc["fvu"] != sae["fvu"]


def _transcoder(d: int, hook: str, target: str, skip: float) -> tuple[dict, dict]:
    """A relu skip transcoder whose latents never fire: it predicts skip * x."""
    cfg = {
        "architecture": "skip_transcoder",
        "d_in": d,
        "d_sae": 4,
        "d_out": d,
        "apply_b_dec_to_input": False,
        "hook_name": hook,
        "hook_name_out": target,
    }
    sd = {
        "W_enc": torch.zeros(d, 4),
        "b_enc": torch.zeros(4),
        "W_dec": torch.zeros(4, d),
        "b_dec": torch.zeros(d),
        "W_skip": skip * torch.eye(d),
    }
    return cfg, sd


def test_downstream_splices_the_prediction_from_the_input_hook(tmp_path):
    from tiny_models import build

    from saesweep.collect.config import CollectConfig
    from saesweep.collect.run import collect
    from saesweep.evaluate.downstream import downstream_metrics_many

    model = str(build("gpt2", tmp_path / "models"))
    uri = str(tmp_path / "coll")
    collect(
        CollectConfig(
            model=model, hooks=("resid.0", "resid.1"), out=uri, max_tokens=600,
            shard_tokens=200, ctx_len=32, batch_size=4, act_dtype="float32", progress=False,
        )
    )  # fmt: skip
    h0, h1 = "transformer.h.0", "transformer.h.1"
    zero, skip_block, backwards = (
        _transcoder(32, h0, h1, 0.0),
        _transcoder(32, h0, h1, 1.0),
        _transcoder(32, h1, h0, 1.0),
    )
    zero_m, skip_m = downstream_metrics_many([zero, skip_block], uri, 6, shards=":")
    # predicting 0 is zero ablation of the target; predicting h.0's output skips block 1
    assert zero_m["ce_sae"] == pytest.approx(zero_m["ce_zero"], abs=1e-9)
    assert zero_m["loss_recovered"] == pytest.approx(0.0, abs=1e-9)
    assert skip_m["ce_zero"] == zero_m["ce_zero"]
    assert skip_m["ce_sae"] not in (pytest.approx(skip_m["ce_clean"]), skip_m["ce_zero"])
    with pytest.raises(UserError, match="input hook transformer.h.1 does not run before"):
        downstream_metrics_many([backwards], uri, 2, shards=":")
