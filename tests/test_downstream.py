"""Downstream fidelity (splicing), and steering, on tiny random GPT-2/Llama and the real MiniLM."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from groups import group_trainer
from safetensors.torch import load_file
from tiny_models import build
from transformers import AutoTokenizer

from saesweep.collect.config import CollectConfig
from saesweep.collect.model import HookedModel, load_model
from saesweep.collect.run import collect
from saesweep.errors import UserError
from saesweep.evaluate.downstream import add_downstream, downstream_metrics, rebuild_sequences
from saesweep.evaluate.steering import prompt_ids, steer, steering
from saesweep.format.collection import read_collection
from saesweep.format.rundir import load_sae, save_sae
from saesweep.sae.export import apply_exported, exported_acts


def collect_small(out: Path, model: str, max_tokens: int, **kw) -> str:
    cfg = CollectConfig(
        model=model,
        hooks=("resid.1",),
        out=str(out),
        max_tokens=max_tokens,
        shard_tokens=max_tokens // 3,
        ctx_len=32,
        batch_size=4,
        act_dtype="float32",
        progress=False,
        **kw,
    )
    collect(cfg)
    return str(out)


@pytest.fixture(scope="module")
def colls(tmp_path_factory) -> dict[str, tuple[str, str]]:
    """family -> (model dir, collection uri)."""
    root = tmp_path_factory.mktemp("downstream")
    out = {}
    for family in ("gpt2", "llama"):
        model = str(build(family, root / "models"))
        out[family] = (model, collect_small(root / family, model, 600))
    out["minilm"] = ("demo", collect_small(root / "minilm", "demo", 600))
    return out


def identity_sae(d: int, hook: str, model: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """A relu 'SAE' with d_sae = 2d that reconstructs exactly: relu(x) - relu(-x) = x."""
    eye = torch.eye(d)
    cfg = {
        "architecture": "standard",
        "d_in": d,
        "d_sae": 2 * d,
        "apply_b_dec_to_input": False,
        "hook_name": hook,
        "model_name": model,
    }
    sd = {
        "W_enc": torch.cat([eye, -eye], dim=1),
        "b_enc": torch.zeros(2 * d),
        "W_dec": torch.cat([eye, -eye], dim=0),
        "b_dec": torch.zeros(d),
    }
    return cfg, sd


def zero_sae(d: int, hook: str, model: str) -> tuple[dict, dict[str, torch.Tensor]]:
    cfg, sd = identity_sae(d, hook, model)
    return cfg, {k: torch.zeros_like(v) for k, v in sd.items()}


def meta_of(uri: str) -> dict:
    return read_collection(uri, None, ":").meta


def test_identity_sae_reconstructs_exactly():
    cfg, sd = identity_sae(8, "h", "m")
    x = torch.randn(5, 8)
    assert torch.equal(apply_exported(cfg, sd, x), x)


def test_rebuilt_sequences_equal_the_model_inputs(colls):
    """Re-running the model on the rebuilt inputs gives the stored activations back."""
    model_dir, uri = colls["gpt2"]
    coll = read_collection(uri, None, ":", names=("acts",))
    model, tok = load_model(model_dir, None, "float32", "cpu")
    seqs = rebuild_sequences(coll.tensors, tok, True, ctx_len=coll.meta["ctx_len"])
    assert len({s.seq_id for s in seqs}) == len(torch.unique(coll.tensors["seq_ids"]))
    hooked = HookedModel(model, [coll.meta["hook"]])
    t = coll.tensors
    for s in seqs[:4]:
        ids = torch.tensor([s.input_ids])
        assert s.input_ids[0] == tok.cls_token_id and s.input_ids[-1] == tok.sep_token_id
        out = hooked.run(ids, torch.ones_like(ids))[coll.meta["hook"]][0]
        rows = (t["seq_ids"] == s.seq_id).nonzero().flatten()
        pos = t["positions"][rows].long()
        assert torch.equal(t["token_ids"][rows].long(), ids[0, pos])
        torch.testing.assert_close(out[pos], t["acts"][rows], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_causal_identity_and_zero(colls, family):
    model_dir, uri = colls[family]
    meta = meta_of(uri)
    args = (meta["d_model"], meta["hook"], model_dir)
    ident = downstream_metrics(identity_sae(*args), uri, n_sequences=6, shards=":")
    assert ident["ce_zero"] != pytest.approx(ident["ce_clean"], abs=1e-4)
    assert ident["loss_recovered"] == pytest.approx(1.0, abs=1e-5)
    assert ident["kl"] == pytest.approx(0.0, abs=1e-6)
    assert ident["ce_sae"] == pytest.approx(ident["ce_clean"], abs=1e-6)
    zero = downstream_metrics(zero_sae(*args), uri, n_sequences=6, shards=":")
    assert zero["loss_recovered"] == pytest.approx(0.0, abs=1e-6)
    assert zero["kl"] == pytest.approx(zero["kl_zero"]) and zero["kl"] > 0
    assert zero["downstream_sequences"] == 6


def test_all_positions_differs_from_stored(colls):
    model_dir, uri = colls["gpt2"]
    meta = meta_of(uri)
    sae = zero_sae(meta["d_model"], meta["hook"], model_dir)
    stored = downstream_metrics(sae, uri, n_sequences=4, shards=":")
    everywhere = downstream_metrics(sae, uri, n_sequences=4, shards=":", positions="all")
    assert stored["ce_zero"] != everywhere["ce_zero"]
    assert everywhere["loss_recovered"] == pytest.approx(0.0, abs=1e-6)


def test_encoder_score_on_minilm(colls):
    _, uri = colls["minilm"]
    meta = meta_of(uri)
    args = (meta["d_model"], meta["hook"], "demo")
    ident = downstream_metrics(identity_sae(*args), uri, n_sequences=4)
    assert ident["final_mse_sae"] == pytest.approx(0.0, abs=1e-10)
    assert ident["final_recovered"] == pytest.approx(1.0, abs=1e-5)
    assert ident["final_mse_zero"] > 0
    zero = downstream_metrics(zero_sae(*args), uri, n_sequences=4)
    assert zero["final_recovered"] == pytest.approx(0.0, abs=1e-6)


def test_add_downstream_updates_metrics(colls, tmp_path):
    model_dir, uri = colls["gpt2"]
    meta = meta_of(uri)
    dirs = []
    for name, make in (("ident", identity_sae), ("zero", zero_sae)):
        cfg, sd = make(meta["d_model"], meta["hook"], model_dir)
        save_sae(tmp_path / name, sd, cfg, {"mse": 1.5})
        dirs.append(tmp_path / name)
    add_downstream(dirs, uri, n_sequences=4, shards=":")
    ident, zero = (json.loads((d / "metrics.json").read_text()) for d in dirs)
    assert ident["mse"] == 1.5 and ident["loss_recovered"] == pytest.approx(1.0, abs=1e-5)
    assert zero["loss_recovered"] == pytest.approx(0.0, abs=1e-6)
    assert ident["ce_clean"] == zero["ce_clean"]


def test_evaluating_an_unfinished_run_is_refused(colls, tmp_path):
    """A run exported but not committed (no metrics.json) gets no metrics.json from an
    evaluation, which would make --resume call it finished."""
    from saesweep.format.rundir import export_sae

    model_dir, uri = colls["gpt2"]
    meta = meta_of(uri)
    cfg, sd = identity_sae(meta["d_model"], meta["hook"], model_dir)
    export_sae(tmp_path / "run", sd, cfg, {"mse": 1.5})
    with pytest.raises(UserError, match="has no metrics.json: its training did not finish"):
        add_downstream([tmp_path / "run"], uri, n_sequences=4, shards=":")
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_wrong_width_is_a_user_error(colls):
    model_dir, uri = colls["gpt2"]
    meta = meta_of(uri)
    with pytest.raises(UserError, match="d_in=8"):
        downstream_metrics(identity_sae(8, meta["hook"], model_dir), uri, 2)


# ----- steering ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpt2_run(colls, tmp_path_factory) -> tuple[Path, Path]:
    """A random 'SAE' checkpoint at resid.1 of the tiny GPT-2: (model dir, run dir)."""
    model_dir, uri = colls["gpt2"]
    meta = meta_of(uri)
    d, d_sae = meta["d_model"], 16
    g = torch.Generator().manual_seed(0)
    sd = {
        "W_enc": torch.randn(d, d_sae, generator=g),
        "b_enc": torch.zeros(d_sae),
        "W_dec": torch.nn.functional.normalize(torch.randn(d_sae, d, generator=g), dim=1),
        "b_dec": torch.zeros(d),
    }
    cfg = {**identity_sae(d, meta["hook"], model_dir)[0], "d_sae": d_sae}
    run_dir = tmp_path_factory.mktemp("steer") / "run"
    save_sae(run_dir, sd, cfg, {})
    return Path(model_dir), run_dir


def plain_greedy(model, tok, prompt: str, n: int) -> list[int]:
    ids = torch.tensor([prompt_ids(tok, prompt)])
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False, pad_token_id=0
    )
    return out[0, ids.shape[1] :].tolist()


def test_steer_with_zero_coeff_is_plain_generation(gpt2_run):
    model_dir, run_dir = gpt2_run
    model, _ = load_model(str(model_dir), None, "float32", "cpu")
    tok = AutoTokenizer.from_pretrained(model_dir)
    prompt = "the quick brown fox"
    plain = plain_greedy(model, tok, prompt, 12)
    assert steer(model, tok, run_dir, 3, 0.0, prompt, 12) == tok.decode(
        plain, skip_special_tokens=True
    )
    with steering(model, run_dir, 3, 60.0):
        pushed = plain_greedy(model, tok, prompt, 12)
    assert pushed != plain
    assert steer(model, tok, run_dir, 3, 60.0, prompt, 12) == tok.decode(
        pushed, skip_special_tokens=True
    )


def test_steer_add_moves_the_hook_output_along_the_decoder_row(gpt2_run):
    model_dir, run_dir = gpt2_run
    model, _ = load_model(str(model_dir), None, "float32", "cpu")
    hook = json.loads((run_dir / "cfg.json").read_text())["hook_name"]
    w_dec = load_file(str(run_dir / "sae_weights.safetensors"))["W_dec"]
    ids = torch.randint(1000, 2000, (2, 7))
    hooked = HookedModel(model, [hook])
    clean = hooked.run(ids, torch.ones_like(ids))[hook].clone()
    with steering(model, run_dir, 5, 7.5, mode="add"):
        steered = hooked.run(ids, torch.ones_like(ids))[hook].clone()
    torch.testing.assert_close(steered - clean, (7.5 * w_dec[5]).expand_as(clean))
    after = hooked.run(ids, torch.ones_like(ids))[hook]
    assert torch.equal(after, clean)


def test_steer_clamp_sets_the_latent(gpt2_run):
    model_dir, run_dir = gpt2_run
    model, _ = load_model(str(model_dir), None, "float32", "cpu")

    cfg, sd = load_sae(run_dir)
    hook = cfg["hook_name"]
    ids = torch.randint(1000, 2000, (2, 7))
    hooked = HookedModel(model, [hook])
    with steering(model, run_dir, 5, 4.0, mode="clamp"):
        steered = hooked.run(ids, torch.ones_like(ids))[hook]
    clean = hooked.run(ids, torch.ones_like(ids))[hook]
    before = exported_acts(cfg, sd, clean.reshape(-1, clean.shape[-1]))[:, 5]
    diff = (steered - clean).reshape(-1, clean.shape[-1])
    torch.testing.assert_close(diff, (4.0 - before)[:, None] * sd["W_dec"][5])


def test_downstream_while_training_matches_the_final_evaluation(colls, tmp_path):
    from saesweep.evaluate.absorption import AbsorptionConfig
    from saesweep.sae import SAEConfig
    from saesweep.train.config import DataConfig, TrainConfig

    _, uri = colls["gpt2"]
    cfg = TrainConfig(
        train_data=DataConfig(uri=uri, shards=":-1", collect=""),
        val_data=DataConfig(uri="", shards="-1:", collect=""),
        n_train=1024, n_val=128, batch_size=64, warmup_steps=2, log_every=4, eval_every=8,
        eval_downstream_sequences=4, downstream_sequences=4, wandb_mode="disabled",
        absorption=AbsorptionConfig(n_tokens=0), sae=SAEConfig(arch="topk", d_sae=64, k=4),
    )  # fmt: skip
    (final,) = group_trainer([cfg], [tmp_path / "run"], tmp_path / "state").train()
    lines = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").open()]
    evals = [x for x in lines if "eval/loss_recovered" in x]
    assert [x["step"] for x in evals] == [8, 16]
    assert evals[-1]["eval/loss_recovered"] == pytest.approx(final["loss_recovered"], abs=1e-5)
    assert evals[-1]["eval/kl"] == pytest.approx(final["kl"], abs=1e-5)
    assert evals[0]["eval/kl"] != evals[-1]["eval/kl"]
    assert all(x["eval/seconds"] > 0 for x in evals)


@pytest.fixture(scope="module")
def evaluated_sweep(tmp_path_factory) -> tuple[list[str], Path]:
    """train.py's arguments of a small lr sweep on a demo collection, evaluated downstream,
    and the sweep directory of one uninterrupted run of it."""
    from test_train import only_dir, run_train

    root = tmp_path_factory.mktemp("evaluated")
    uri = collect_small(root / "coll", "demo", 6000)
    args = ["--sweep", "sweeps/lr_grid.py", "--executor", "debug", "--train-data.uri", uri,
            "--train-data.collect", "", "--n-train", "2048", "--batch-size", "128",
            "--n-val", "512", "--sae.d-sae", "64", "--sae.k", "4", "--wandb-mode", "disabled",
            "--downstream-sequences", "64"]  # fmt: skip
    ref = run_train(*args, "--runs-root", str(root / "ref"))
    assert ref.wait() == 0, ref.stderr.read()
    return args, only_dir(root / "ref")


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGINT], ids=["kill-9", "ctrl-c"])
def test_a_run_killed_before_its_metrics_resumes_to_the_same_metrics(
    evaluated_sweep, tmp_path, signum
):
    """Killed (or interrupted with Ctrl-C: one line with the step and the resume command,
    exit status 130) after every run is exported and before its metrics.json (the commit
    point) is written, a sweep is unfinished, and --resume evaluates it to the metrics of an
    uninterrupted run, downstream fidelity included."""
    from test_train import only_dir, run_train

    args, ref_dir = evaluated_sweep
    proc = run_train(*args, "--runs-root", str(tmp_path / "killed"))
    runs = tmp_path / "killed"
    for _ in range(6000):
        if proc.poll() is not None or len(list(runs.glob("*/runs/*/metrics.pending.json"))) == 6:
            break
        time.sleep(0.01)
    os.kill(proc.pid, signum)
    out, err = proc.communicate()
    killed = only_dir(runs)
    if signum == signal.SIGINT:
        assert proc.returncode == 130 and "Traceback" not in err, out + err
        resume = f"interrupted at step 16 of 16; resume with: uv run train.py --resume {killed}"
        assert out.splitlines()[-1] == resume, out
    assert len(list(killed.glob("runs/*/metrics.pending.json"))) == 6, "killed too late"
    assert not list(killed.glob("runs/*/metrics.json"))
    resumed = run_train("--resume", str(killed), "--executor", "debug")
    out, err = resumed.communicate()
    assert resumed.returncode == 0, err
    assert not list(killed.glob("runs/*/metrics.pending.json"))
    for run in sorted(p.name for p in (ref_dir / "runs").iterdir()):
        want, got = (json.loads((d / "runs" / run / "metrics.json").read_text())
                     for d in (ref_dir, killed))  # fmt: skip
        assert "final_mse_sae" in want, want
        assert {k: v for k, v in got.items() if k != "wall_s"} == {
            k: v for k, v in want.items() if k != "wall_s"
        }, run
