"""export.py circuit-tracer: per-layer transcoders of a tiny random Llama (mlp_in -> mlp, trained
from a collection of both hooks) as circuit-tracer's transcoder set, loaded and run by
circuit-tracer's own code in its own venv (it pins transformers <= 4.57.3)."""

from __future__ import annotations

import json

import pytest
import torch
from consumers import run_json
from groups import group_trainer
from safetensors.torch import load_file, save_file
from test_collect import small
from test_train import cfg as train_cfg
from tiny_models import build

import saesweep
from saesweep import Reader
from saesweep.collect.model import HookedModel, load_model, resolve_hook
from saesweep.collect.run import collect
from saesweep.export.cli import main as export_main
from saesweep.sae import CLTConfig, SAEConfig
from saesweep.train.config import DataConfig

CIRCUIT_TRACER = ["circuit-tracer==0.5.0", "nnsight<0.7"]
"""nnsight 0.7 and later moved the tracer module circuit-tracer 0.5.0's nnsight backend imports."""
LAYERS = range(3)
SETS = {"relu_skip": dict(arch="relu", skip=True), "batchtopk": dict(arch="batchtopk")}
"""Two transcoder sets trained side by side: ReLU with skip connections, and BatchTopK
(exported as JumpReLU with its inference threshold)."""
TRAINED = {**SETS, "topk": dict(arch="topk")}
"""The sets and TopK transcoders (exported as JumpReLU with calibrated thresholds)."""
N_VAL = 512
CALIBRATION_TOKENS = 192
"""Held-out tokens the TopK exports calibrate on; the next as many measure them (the
held-out shard holds 496)."""


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(model dir, collection, {set: [run dir per layer]}): both sets trained from one
    collection of every layer's mlp_in and mlp, one group per layer."""
    root = tmp_path_factory.mktemp("circuit-tracer")
    model = build("llama", root)
    uri = str(root / "coll")
    hooks = tuple(f"{site}.{layer}" for layer in LAYERS for site in ("mlp_in", "mlp"))
    collect(small(uri, model=str(model), hooks=hooks, act_dtype="float32"))
    dirs = {name: [root / name / f"layer-{layer}" for layer in LAYERS] for name in TRAINED}
    for layer in LAYERS:
        data = DataConfig(
            uri=uri, hook=f"mlp_in.{layer}", target_hook=f"mlp.{layer}", shards=":-1", collect=""
        )
        cfgs = [
            train_cfg(
                uri,
                seed=i,
                train_data=data,
                sae=SAEConfig(d_sae=64, k=4, **sae),
                lr=1e-2,
                n_val=N_VAL,
                tag=name,
            )
            for i, (name, sae) in enumerate(TRAINED.items())
        ]
        runs = [dirs[name][layer] for name in TRAINED]
        group_trainer(cfgs, runs, root / f"state-{layer}").train()
    return model, uri, dirs


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    root = tmp_path_factory.mktemp("exports")
    _, uri, dirs = trained
    for name in SETS:
        runs = dirs[name]
        export_main(["circuit-tracer", *map(str, runs), "--out", str(root / name)])
    export_main(["circuit-tracer", *map(str, dirs["topk"]), "--out", str(root / "topk"),
                 *calibrated(uri)])  # fmt: skip
    return root


def calibrated(uri: str) -> list[str]:
    """The export flags of a TopK run: its collection's held-out shard, CALIBRATION_TOKENS."""
    return ["--collection", uri, "--calibration-tokens", str(CALIBRATION_TOKENS)]


def held_out(uri: str, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first N_VAL held-out tokens of a layer's mlp_in and mlp, as metrics.json's FVU."""
    hook, target = f"mlp_in.{layer}", f"mlp.{layer}"
    reader = Reader(
        uri,
        hook=hook,
        extra_hooks=[target],
        shards=slice(-1, None),
        batch_size=N_VAL,
        shuffle=False,
    )
    batch = next(iter(reader))
    return batch[reader.hook], batch[reader.hooks[1].hook]


def test_transcoders_train_from_mlp_in_to_mlp(trained):
    _, _, dirs = trained
    for name, runs in dirs.items():
        for layer, run in enumerate(runs):
            cfg = json.loads((run / "cfg.json").read_text())
            assert cfg["hook_name"] == f"model.layers.{layer}.mlp:in"
            assert cfg["hook_name_out"] == f"model.layers.{layer}.mlp"
            fvu = json.loads((run / "metrics.json").read_text())["fvu"]
            assert fvu < 0.95, (name, layer, fvu)  # 32 steps: 0.66 to 0.85


def test_the_export_is_a_transcoder_set(exported):
    config = (exported / "batchtopk" / "config.yaml").read_text()
    assert 'model_kind: "transcoder_set"' in config
    assert 'feature_input_hook: "mlp.hook_in"' in config
    assert 'feature_output_hook: "hook_mlp_out"' in config
    assert 'activation_function: "jump_relu"' in config
    layer = load_file(str(exported / "relu_skip" / "layer_1.safetensors"))
    assert sorted(layer) == ["W_dec", "W_enc", "W_skip", "b_dec", "b_enc"]
    assert layer["W_enc"].shape == (64, 32) and layer["W_skip"].shape == (32, 32)
    jump = load_file(str(exported / "batchtopk" / "layer_0.safetensors"))
    assert jump["activation_function.threshold"].min() > 0


LOAD = """
import json, sys, torch, yaml
from safetensors.torch import load_file, save_file
from circuit_tracer.utils.hf_utils import load_transcoders

root, inputs, out = sys.argv[1], load_file(sys.argv[2]), sys.argv[3]
n = sum(k.startswith("x") for k in inputs)
info, result = {}, {}
for name in sys.argv[4:]:
    config = yaml.safe_load(open(f"{root}/{name}/config.yaml"))
    config["transcoders"] = [f"{root}/{name}/layer_{i}.safetensors" for i in range(n)]
    tc = load_transcoders(config, device=torch.device("cpu"), lazy_encoder=False,
                          lazy_decoder=False)
    act = tc[0].activation_function
    with torch.no_grad():
        for i, t in enumerate(tc):
            x = inputs[f"x{i}"]
            result[f"{name}.codes{i}"] = codes = t.encode(x)
            result[f"{name}.pred{i}"] = t.decode(codes, x)
    info[name] = {"n_layers": len(tc), "input": tc.feature_input_hook,
                  "output": tc.feature_output_hook, "skip": tc.skip_connection,
                  "activation": getattr(act, "__name__", type(act).__name__)}
save_file({k: v.contiguous() for k, v in result.items()}, out)
print(json.dumps(info))
"""


def test_circuit_tracer_loads_the_sets_and_reproduces_saesweep(
    trained, exported, consumers, tmp_path
):
    """circuit-tracer's loader reads each set from config.yaml; its encode and decode equal
    saesweep.load's on held-out activations, and its FVU is the one saesweep reported."""
    _, uri, dirs = trained
    data = {f"{k}{i}": t for i in LAYERS for k, t in zip("xy", held_out(uri, i), strict=True)}
    save_file(data, str(tmp_path / "inputs.safetensors"))
    python = consumers("circuit-tracer", CIRCUIT_TRACER)
    out = tmp_path / "out.safetensors"
    info = run_json(
        python, LOAD, str(exported), str(tmp_path / "inputs.safetensors"), str(out), *SETS
    )
    got = load_file(str(out))
    for name in SETS:
        assert info[name] == {
            "n_layers": 3,
            "input": "mlp.hook_in",
            "output": "hook_mlp_out",
            "skip": name == "relu_skip",
            "activation": "JumpReLU" if name == "batchtopk" else "relu",
        }
        for i in LAYERS:
            sae, x, y = saesweep.load(dirs[name][i]), data[f"x{i}"], data[f"y{i}"]
            codes, pred = got[f"{name}.codes{i}"], got[f"{name}.pred{i}"]
            torch.testing.assert_close(codes, sae.encode(x), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(pred, sae(x), rtol=1e-5, atol=1e-5)
            assert (codes > 0).any()
            fvu = (pred - y).pow(2).sum() / (y - y.mean(0)).pow(2).sum()
            reported = json.loads((dirs[name][i] / "metrics.json").read_text())["fvu"]
            assert fvu.item() == pytest.approx(reported, rel=1e-4), (name, i)


def test_circuit_tracer_reproduces_the_fvu_a_calibrated_topk_set_reports(
    trained, exported, consumers, tmp_path
):
    """TopK transcoders exported as JumpReLU: each latent fires on the calibration tokens as
    often as under TopK; circuit-tracer loads the set, and its FVU and L0 on the next held-out
    tokens are calibration.json's, its trained FVU saesweep.load's."""
    _, uri, dirs = trained
    report = json.loads((exported / "topk" / "calibration.json").read_text())
    data, n = {}, CALIBRATION_TOKENS
    for i in LAYERS:
        x, y = held_out(uri, i)
        sae = saesweep.load(dirs["topk"][i])
        threshold = load_file(str(exported / "topk" / f"layer_{i}.safetensors"))[
            "activation_function.threshold"
        ]
        codes = sae.encode(x[:n])
        pre = (x[:n] @ sae.weights["W_enc"] + sae.weights["b_enc"]).relu()
        assert torch.equal((pre > threshold).sum(0), (codes > 0).sum(0))
        l0 = (pre > threshold).sum(1).double().mean()
        assert l0 == pytest.approx(4, abs=0.1)  # k on average (TopK keeps a few zeros)
        row = report[f"layer {i}"]
        assert (row["run"], row["tokens"]) == (str(dirs["topk"][i]), n)
        x, y = x[n : 2 * n], y[n : 2 * n]
        assert row["fvu_trained"] == pytest.approx(fvu_of(sae(x), y), rel=1e-4)
        data[f"x{i}"], data[f"y{i}"] = x, y
    save_file(data, str(tmp_path / "inputs.safetensors"))
    python = consumers("circuit-tracer", CIRCUIT_TRACER)
    out = tmp_path / "out.safetensors"
    info = run_json(python, LOAD, str(exported), str(tmp_path / "inputs.safetensors"), str(out),
                    "topk")  # fmt: skip
    assert info["topk"]["activation"] == "JumpReLU"
    got = load_file(str(out))
    for i in LAYERS:
        row = report[f"layer {i}"]
        fvu = fvu_of(got[f"topk.pred{i}"], data[f"y{i}"])
        assert fvu == pytest.approx(row["fvu_export"], rel=1e-4)
        l0 = (got[f"topk.codes{i}"] > 0).sum(-1).double().mean().item()
        assert l0 == pytest.approx(row["l0_export"], rel=1e-6)
        assert row["fvu_export"] < 1.5 * row["fvu_trained"]


def fvu_of(pred: torch.Tensor, y: torch.Tensor) -> float:
    """Squared error over the variance of y [tokens, ...] about its mean over tokens."""
    return ((pred - y).pow(2).sum() / (y - y.mean(0)).pow(2).sum()).item()


GRAPH = """
import json, sys, torch, yaml
from circuit_tracer import ReplacementModel, attribute
from circuit_tracer.transcoder.cross_layer_transcoder import load_clt
from circuit_tracer.utils.hf_utils import load_transcoders

export, model_dir = sys.argv[1:]
config = yaml.safe_load(open(f"{export}/config.yaml"))
config["transcoders"] = [f"{export}/layer_{i}.safetensors" for i in range(3)]
cpu = torch.device("cpu")
if config["model_kind"] == "cross_layer_transcoder":
    tc = load_clt(export, feature_input_hook=config["feature_input_hook"],
                  feature_output_hook=config["feature_output_hook"], scan=config["scan"],
                  device=cpu, dtype=torch.float32, lazy_decoder=False)
else:
    tc = load_transcoders(config, device=cpu, lazy_encoder=False, lazy_decoder=False)
model = ReplacementModel.from_pretrained_and_transcoders(model_dir, tc, backend="nnsight",
                                                         device=cpu, dtype=torch.float32)
graph = attribute("the cat sat on the mat because", model, max_n_logits=3, batch_size=32,
                  max_feature_nodes=64, verbose=False)
print(json.dumps({"tokens": graph.input_tokens.tolist(),
                  "features": graph.active_features.tolist(),
                  "values": graph.activation_values.tolist(),
                  "adjacency": list(graph.adjacency_matrix.shape),
                  "finite": bool(torch.isfinite(graph.adjacency_matrix).all())}))
"""


def attribution_graph(consumers, export, model_dir) -> tuple[dict, torch.Tensor]:
    """(circuit-tracer's attribution graph with an export, the mlp_in activations
    [T, L, d] of its tokens as saesweep collects them)."""
    python = consumers("circuit-tracer", CIRCUIT_TRACER)
    graph = run_json(python, GRAPH, str(export), str(model_dir))
    assert graph["finite"] and graph["features"], graph
    model, _ = load_model(str(model_dir), None, "float32", "cpu")
    paths = [resolve_hook(model, f"mlp_in.{i}")[0] for i in LAYERS]
    ids = torch.tensor([graph["tokens"]])
    acts = HookedModel(model, paths).run(ids, torch.ones_like(ids))
    return graph, torch.stack([acts[p][0] for p in paths], dim=1)


def test_an_attribution_graph_runs_on_the_exported_set(trained, exported, consumers):
    """circuit-tracer's nnsight backend on the tiny Llama with the exported set: the graph's
    active features and their activations are saesweep's on the same tokens."""
    model_dir, _, dirs = trained
    graph, xs = attribution_graph(consumers, exported / "batchtopk", model_dir)
    for (layer, pos, feature), value in zip(graph["features"], graph["values"], strict=True):
        codes = saesweep.load(dirs["batchtopk"][layer]).encode(xs[pos : pos + 1, layer])
        assert value == pytest.approx(codes[0, feature].item(), rel=1e-4, abs=1e-5)


def test_what_circuit_tracer_cannot_read_is_refused(trained, tmp_path, capsys):
    _, _, dirs = trained
    for runs, says in (
        (dirs["batchtopk"][:2], "no transcoder for layers [2]"),
        ([*dirs["batchtopk"], dirs["batchtopk"][0]], "are both for layer 0"),
        ([*dirs["batchtopk"][:2], dirs["relu_skip"][2]], "differ in activations"),
        (dirs["topk"], "give --collection"),
    ):
        with pytest.raises(SystemExit) as stop:
            export_main(["circuit-tracer", *map(str, runs), "--out", str(tmp_path / "x")])
        assert stop.value.code == 2 and says in capsys.readouterr().err
        assert not (tmp_path / "x").exists()


CLTS = ("relu", "jumprelu", "batchtopk", "topk")
"""Cross-layer transcoders over the three layers (mlp_in -> mlp), trained side by side."""
EXPORTED_CLTS = ("relu", "jumprelu", "batchtopk")
"""The CLTs circuit-tracer expresses exactly (BatchTopK with its running thresholds)."""


@pytest.fixture(scope="module")
def clts(trained, tmp_path_factory):
    """{activation: CLT run dir}: one group of CLTs on the transcoders' collection."""
    _, uri, _ = trained
    root = tmp_path_factory.mktemp("clt")
    data = DataConfig(uri=uri, shards=":-1", collect="")
    cfgs = [
        train_cfg(
            uri,
            seed=i,
            train_data=data,
            sae=SAEConfig(
                arch="clt",
                d_sae=32,
                k=4,
                clt=CLTConfig(
                    layers=tuple(LAYERS),
                    input_site="mlp_in",
                    target_site="mlp",
                    activation=activation,
                ),  # fmt: skip
            ),
            lr=1e-2,
            n_train=2048,
            n_val=N_VAL,
            tag=activation,
        )
        for i, activation in enumerate(CLTS)
    ]
    runs = {activation: root / activation for activation in CLTS}
    group_trainer(cfgs, list(runs.values()), root / "state").train()
    return runs


@pytest.fixture(scope="module")
def clt_exported(trained, clts, tmp_path_factory):
    """Each CLT exported in its directory of the returned one (TopK's calibrated)."""
    root = tmp_path_factory.mktemp("clt-exports")
    for name in EXPORTED_CLTS:
        export_main(["circuit-tracer", str(clts[name]), "--out", str(root / name)])
    export_main(["circuit-tracer", str(clts["topk"]), "--out", str(root / "topk"),
                 *calibrated(trained[1])])  # fmt: skip
    return root


LOAD_CLT = """
import json, sys, torch, yaml
from safetensors.torch import load_file, save_file
from circuit_tracer.transcoder.cross_layer_transcoder import load_clt

root, xs, out = sys.argv[1], load_file(sys.argv[2])["xs"], sys.argv[3]
info, result = {}, {}
for name in sys.argv[4:]:
    config = yaml.safe_load(open(f"{root}/{name}/config.yaml"))
    clt = load_clt(f"{root}/{name}", feature_input_hook=config["feature_input_hook"],
                   feature_output_hook=config["feature_output_hook"], scan=config["scan"],
                   device=torch.device("cpu"), dtype=torch.float32, lazy_decoder=False)
    with torch.no_grad():
        result[f"{name}.codes"] = clt.encode(xs)
        for i in range(clt.n_layers):
            result[f"{name}.codes{i}"] = clt.encode_layer(xs[i], i)
        result[f"{name}.pred"] = clt(xs)
    act = clt.activation_function
    info[name] = {"kind": config["model_kind"], "n_layers": clt.n_layers,
                  "d_transcoder": clt.d_transcoder, "input": clt.feature_input_hook,
                  "output": clt.feature_output_hook,
                  "activation": getattr(act, "__name__", type(act).__name__)}
save_file({k: v.contiguous() for k, v in result.items()}, out)
print(json.dumps(info))
"""


def test_circuit_tracer_loads_the_clts_and_reproduces_saesweep(
    trained, clts, clt_exported, consumers, tmp_path
):
    """circuit-tracer's load_clt reads each exported CLT; its encode (all layers and per
    layer) and forward equal saesweep.load's ExportedCLT on held-out activations."""
    _, uri, _ = trained
    names = EXPORTED_CLTS
    xs = torch.stack([held_out(uri, i)[0] for i in LAYERS])  # [L, B, d]
    save_file({"xs": xs}, str(tmp_path / "inputs.safetensors"))
    python = consumers("circuit-tracer", CIRCUIT_TRACER)
    out = tmp_path / "out.safetensors"
    info = run_json(python, LOAD_CLT, str(clt_exported), str(tmp_path / "inputs.safetensors"),
                    str(out), *names)  # fmt: skip
    got = load_file(str(out))
    for name in names:
        assert info[name] == {
            "kind": "cross_layer_transcoder",
            "n_layers": 3,
            "d_transcoder": 32,
            "input": "mlp.hook_in",
            "output": "hook_mlp_out",
            "activation": "relu" if name == "relu" else "JumpReLU",
        }
        clt = saesweep.load(clts[name])
        codes = clt.encode(xs.transpose(0, 1)).transpose(0, 1)
        torch.testing.assert_close(got[f"{name}.codes"], codes, rtol=1e-5, atol=1e-5)
        for i in LAYERS:
            torch.testing.assert_close(got[f"{name}.codes{i}"], codes[i], rtol=1e-5, atol=1e-5)
        pred = clt.decode(codes.transpose(0, 1)).transpose(0, 1)
        torch.testing.assert_close(got[f"{name}.pred"], pred, rtol=1e-5, atol=1e-5)
        assert (codes > 0).any(dim=-1).float().mean() > 0.5


def test_what_circuit_tracer_cannot_read_of_clts_is_refused(clts, tmp_path, capsys):
    for runs, says in (
        ([clts["topk"]], "give --collection"),
        ([clts["relu"], clts["jumprelu"]], "give one cross-layer transcoder run"),
    ):
        with pytest.raises(SystemExit) as stop:
            export_main(["circuit-tracer", *map(str, runs), "--out", str(tmp_path / "x")])
        assert stop.value.code == 2 and says in capsys.readouterr().err
        assert not (tmp_path / "x").exists()


def test_circuit_tracer_reproduces_the_fvu_a_calibrated_topk_clt_reports(
    trained, clts, clt_exported, consumers, tmp_path
):
    """A TopK CLT exported as JumpReLU: circuit-tracer's load_clt reads it, and its FVU over
    all layers and L0 on the held-out tokens after the calibration ones are
    calibration.json's."""
    _, uri, _ = trained
    n = CALIBRATION_TOKENS
    held = [held_out(uri, i) for i in LAYERS]
    xs = torch.stack([x[n : 2 * n] for x, _ in held])  # [L, B, d]
    ys = torch.stack([y[n : 2 * n] for _, y in held])
    save_file({"xs": xs}, str(tmp_path / "inputs.safetensors"))
    python = consumers("circuit-tracer", CIRCUIT_TRACER)
    out = tmp_path / "out.safetensors"
    info = run_json(python, LOAD_CLT, str(clt_exported), str(tmp_path / "inputs.safetensors"),
                    str(out), "topk")  # fmt: skip
    assert info["topk"]["activation"] == "JumpReLU"
    got = load_file(str(out))
    row = json.loads((clt_exported / "topk" / "calibration.json").read_text())["clt"]
    assert (row["run"], row["tokens"]) == (str(clts["topk"]), n)
    fvu = fvu_of(got["topk.pred"].transpose(0, 1), ys.transpose(0, 1))
    assert fvu == pytest.approx(row["fvu_export"], rel=1e-4)
    trained_clt = saesweep.load(clts["topk"])
    want = fvu_of(trained_clt(xs.transpose(0, 1)), ys.transpose(0, 1))
    assert row["fvu_trained"] == pytest.approx(want, rel=1e-4)
    l0 = (got["topk.codes"] > 0).sum((0, 2)).double().mean().item()  # over all layers
    assert l0 == pytest.approx(row["l0_export"], rel=1e-6)
    for i, (x, _) in enumerate(held):  # on the calibration tokens each feature fires as often
        w = load_file(str(clt_exported / "topk" / f"W_enc_{i}.safetensors"))
        pre = (x[:n] @ w[f"W_enc_{i}"].T + w[f"b_enc_{i}"]).relu()
        codes = trained_clt.encode(torch.stack([x[:n] for x, _ in held], dim=1))[:, i]
        fires = pre > w[f"threshold_{i}"]
        assert torch.equal(fires.sum(0), (codes > 0).sum(0))
        assert fires.sum(1).double().mean() == pytest.approx(4, abs=0.1)  # k on average


def test_an_attribution_graph_runs_on_the_exported_clt(trained, clts, clt_exported, consumers):
    """circuit-tracer's nnsight backend on the tiny Llama with the exported JumpReLU CLT: the
    graph's active features and their activations are saesweep's on the same tokens."""
    model_dir, _, _ = trained
    graph, xs = attribution_graph(consumers, clt_exported / "jumprelu", model_dir)
    codes = saesweep.load(clts["jumprelu"]).encode(xs)
    for (layer, pos, feature), value in zip(graph["features"], graph["values"], strict=True):
        assert value == pytest.approx(codes[pos, layer, feature].item(), rel=1e-4, abs=1e-5)
