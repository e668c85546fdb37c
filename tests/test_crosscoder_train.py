"""Acausal crosscoders trained by the group trainer from a real collection (the packaged
MiniLM's residual stream at layers 1-3, test_clt_train's collection), every hook read in
lockstep: FVU falls, per-layer FVU reported, a group equals its runs alone, saesweep.load's
forward gives the evaluated FVU, export formats of one-hook dictionaries refuse them."""

from __future__ import annotations

import dataclasses
import itertools
import json

import pytest
import torch
from test_clt_train import INPUTS, LAYERS, _fvus, coll  # noqa: F401 (the collection fixture)
from test_train import assert_group_equals_alone, train, weights
from test_train import cfg as train_cfg

import saesweep
from saesweep import Reader
from saesweep.evaluate.health import assess
from saesweep.export.cli import main as export_main
from saesweep.sae import CrosscoderConfig, ObjectiveConfig, SAEConfig
from saesweep.train.config import DataConfig


def _cfg(uri: str, activation: str = "topk", **kw):
    xc = CrosscoderConfig(layers=LAYERS, site="resid", activation=activation)
    base = dict(
        train_data=DataConfig(uri=uri, shards=":-1", collect=""),
        sae=SAEConfig(arch="crosscoder", d_sae=192, k=16, crosscoder=xc),
        lr=1e-2,
        n_train=4096,
        batch_size=256,
        log_every=2,
    )
    return train_cfg(uri, **(base | kw))


@pytest.fixture(scope="module")
def trained(coll, tmp_path_factory):  # noqa: F811
    """Two TopK crosscoders (lr) and a ReLU one, in one group and read."""
    root = tmp_path_factory.mktemp("xc-runs")
    relu = dict(
        sae=dataclasses.replace(_cfg(coll).sae, crosscoder=_cfg(coll, "relu").sae.crosscoder),
        objective=ObjectiveConfig(sparsity_coeff=1e-4),
    )
    cfgs = [_cfg(coll, seed=1), _cfg(coll, seed=2, lr=3e-3), _cfg(coll, seed=3, **relu)]
    return root, train(cfgs, root)


def test_crosscoders_train_from_a_collection_with_every_layer_in_lockstep(trained):
    root, results = trained
    for i, result in enumerate(results):
        run = root / f"run-{i}"
        fvus = _fvus(run)
        assert fvus[-1] < 0.8 * fvus[0], fvus
        assert result["fvu"] < 0.8, result
        layered = result["fvu_by_hook"]
        assert len(layered) == 3 and all(0 < v < 1 for v in layered.values()), layered
        logged = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
        assert all(0 < logged[f"fvu_layer_{layer}"] < 1 for layer in LAYERS), logged
        sae_cfg = json.loads((run / "cfg.json").read_text())
        assert sae_cfg["hook_names"] == sae_cfg["hook_names_out"]
        assert sae_cfg["hook_names"][0].endswith("layer.1")
        assert len(sae_cfg["input_scales"]) == 3 and sae_cfg["layers"] == list(LAYERS)
    assert 12 < results[0]["l0"] <= 16  # k over the one dictionary, of positive ones
    assert "k_layers" not in results[0], "one k for every layer: health compares L0 with k"
    assert not any(r.startswith("L0 ") and "layers" in r for r in assess(results[0]).reasons)
    sd = weights(root / "run-0")
    assert sd["W_enc"].shape == (3, 384, 192) and sd["W_dec"].shape == (192, 3, 384)
    assert sd["b_enc"].shape == (192,) and sd["b_dec"].shape == (3, 384)


def test_a_group_of_crosscoders_equals_each_alone(coll, tmp_path):  # noqa: F811
    cfgs = [_cfg(coll, seed=1, n_train=1024), _cfg(coll, seed=2, lr=1e-3, n_train=1024)]
    assert_group_equals_alone(cfgs, tmp_path)


@pytest.mark.parametrize("activation", ["topk", "jumprelu"])
def test_load_gives_the_evaluated_fvu_on_raw_activations(coll, tmp_path, activation):  # noqa: F811
    result = train([_cfg(coll, activation, n_train=1024)], tmp_path)[0]
    xc = saesweep.load(tmp_path / "run-0")
    reader = Reader(coll, hook=INPUTS[0], extra_hooks=INPUTS[1:], shards="-1:", batch_size=256,
                    shuffle=False)  # fmt: skip
    batches = list(itertools.islice(reader, 2))  # the tokens evaluation read (n_val 512)
    xs = torch.stack([torch.cat([b[h] for b in batches]) for h in xc.cfg["hook_names"]], dim=1)
    xs = xs.double()
    xc = dataclasses.replace(xc, weights={k: v.double() for k, v in xc.weights.items()})
    codes = xc.encode(xs)
    assert codes.shape == (result["val_tokens"], 192)
    assert (codes > 0).sum(-1).double().mean() == pytest.approx(result["l0"], rel=1e-4)
    sse = (xc.decode(codes) - xs).pow(2).sum()
    assert sse / (xs - xs.mean(0)).pow(2).sum() == pytest.approx(result["fvu"], rel=1e-4)


@pytest.mark.parametrize("fmt", ["sparsify", "circuit-tracer", "delphi"])
def test_formats_of_one_hook_refuse_a_crosscoder_in_one_sentence(
    trained,
    coll,  # noqa: F811
    tmp_path,
    capsys,
    fmt,
):
    root, _ = trained
    flags = ["--collection", coll] if fmt == "delphi" else []
    with pytest.raises(SystemExit) as stop:
        export_main([fmt, str(root / "run-0"), "--out", str(tmp_path / "out"), *flags])
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and err.count("\n") == 0, err
    assert "is a crosscoder over the hooks" in err and "of one hook" in err, err
    assert not (tmp_path / "out").exists()
