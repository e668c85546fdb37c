"""export.py neuronpedia: every row has the fields, and their types, of SAEDashboard's
Neuronpedia exporter, and reading the files back gives the top contexts, densities and
activation histograms saesweep's feature pages and a direct encoding give."""

from __future__ import annotations

import gzip
import json
import math
from datetime import datetime
from pathlib import Path

import pytest
import torch
from tiny_models import build
from transformers import AutoModelForCausalLM

import saesweep
from saesweep.collect.config import CollectConfig
from saesweep.collect.model import load_tokenizer
from saesweep.collect.run import collect
from saesweep.evaluate.features import inspect_features
from saesweep.export.cli import main as export_main
from saesweep.export.feature_stats import N_BINS
from saesweep.export.logit_effects import N_LOGIT_BINS, N_LOGITS
from saesweep.format.collection import read_collection
from saesweep.format.rundir import save_sae

# Field names and types of the rows, from jbloomAus/SAEDashboard
# sae_dashboard/neuronpedia/neuronpedia_export.py (its dataclasses SourceRelease, Model,
# SourceSet, Source, Feature, Activation; "?" marks Optional, "time" a datetime, which orjson
# writes in ISO format).
RELEASE = {
    "name": "str", "description": "str", "creatorName": "str", "creatorId": "str",
    "visibility": "str", "isNewUi": "bool", "featured": "bool", "descriptionShort": "str?",
    "urls": "[str]", "creatorEmail": "str?", "creatorNameShort": "str?",
    "defaultSourceSetName": "str?", "defaultSourceId": "str?", "defaultUmapSourceIds": "[str]",
    "createdAt": "time",
}  # fmt: skip
MODEL = {
    "id": "str", "instruct": "bool", "creatorId": "str", "displayNameShort": "str",
    "displayName": "str", "tlensId": "str?", "dimension": "int?", "visibility": "str",
    "defaultSourceSetName": "str?", "defaultSourceId": "str?", "inferenceEnabled": "bool",
    "layers": "int", "neuronsPerLayer": "int", "createdAt": "time", "owner": "str",
    "updatedAt": "time", "website": "str?",
}  # fmt: skip
SOURCESET = {
    "modelId": "str", "name": "str", "creatorId": "str", "hasDashboards": "bool",
    "visibility": "str", "description": "str", "type": "str", "creatorName": "str",
    "urls": "[str]", "creatorEmail": "str?", "releaseName": "str?", "defaultOfModelId": "str?",
    "defaultRange": "int", "defaultShowBreaks": "bool", "showDfa": "bool",
    "showCorrelated": "bool", "showHeadAttribution": "bool", "showUmap": "bool",
    "createdAt": "time",
}  # fmt: skip
SOURCE = {
    "id": "str", "modelId": "str", "setName": "str", "creatorId": "str",
    "hasDashboards": "bool", "inferenceEnabled": "bool", "inferenceHosts": "[str]",
    "saelensConfig": "str?", "saelensRelease": "str?", "saelensSaeId": "str?",
    "hfRepoId": "str?", "hfFolderId": "str?", "visibility": "str", "defaultOfModelId": "str?",
    "hasUmap": "bool", "hasUmapLogSparsity": "bool", "hasUmapClusters": "bool",
    "num_prompts": "int?", "num_tokens_in_prompt": "int?", "dataset": "str?", "notes": "str?",
    "createdAt": "time",
}  # fmt: skip
FEATURE = {
    "modelId": "str", "layer": "str", "index": "str", "creatorId": "str?", "createdAt": "time",
    "maxActApprox": "float?", "hasVector": "bool", "vector": "[float]", "vectorLabel": "str?",
    "vectorDefaultSteerStrength": "float?", "hookName": "str?", "topkCosSimIndices": "[int]",
    "topkCosSimValues": "[float]", "neuron_alignment_indices": "[int]",
    "neuron_alignment_values": "[float]", "neuron_alignment_l1": "[float]",
    "correlated_neurons_indices": "[int]", "correlated_neurons_pearson": "[float]",
    "correlated_neurons_l1": "[float]", "correlated_features_indices": "[int]",
    "correlated_features_pearson": "[float]", "correlated_features_l1": "[float]",
    "neg_str": "[str]", "neg_values": "[float]", "pos_str": "[str]", "pos_values": "[float]",
    "frac_nonzero": "float", "freq_hist_data_bar_heights": "[float]",
    "freq_hist_data_bar_values": "[float]", "logits_hist_data_bar_heights": "[float]",
    "logits_hist_data_bar_values": "[float]", "decoder_weights_dist": "[float]",
    "sourceSetName": "str?",
}  # fmt: skip
ACTIVATION = {
    "id": "str", "tokens": "[str]", "index": "str", "layer": "str", "modelId": "str",
    "maxValue": "float", "maxValueTokenIndex": "int", "minValue": "float", "values": "[float]",
    "creatorId": "str", "dataSource": "str?", "dataIndex": "str?", "dfaValues": "[float]",
    "dfaTargetIndex": "int?", "dfaMaxValue": "float?", "createdAt": "time",
    "lossValues": "[float]", "logitContributions": "str?", "binMin": "float?",
    "binMax": "float?", "binContains": "float?", "qualifyingTokenIndex": "int?",
    "zIndices": "[[int]]?", "zValues": "[float]?",
}  # fmt: skip
SCALARS = {"str": (str,), "bool": (bool,), "int": (int,), "float": (float, int)}


def fits(value, kind: str) -> bool:
    """Whether a JSON value has the type `kind` of the schemas above."""
    if kind.endswith("?"):
        return value is None or fits(value, kind[:-1])
    if kind.startswith("["):
        return isinstance(value, list) and all(fits(v, kind[1:-1]) for v in value)
    if kind == "time":
        return isinstance(value, str) and datetime.fromisoformat(value) is not None
    is_bool = isinstance(value, bool)
    return isinstance(value, SCALARS[kind]) and (kind == "bool" or not is_bool)


def check_rows(rows: list[dict], schema: dict[str, str]) -> None:
    for row in rows:
        assert list(row) == list(schema)
        wrong = {k: row[k] for k, kind in schema.items() if not fits(row[k], kind)}
        assert wrong == {}


def read_jsonl(path: Path) -> list[dict]:
    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    return [json.loads(line) for line in data.decode().splitlines()]


def batches(source_dir: Path, kind: str) -> list[dict]:
    files = sorted(
        (source_dir / kind).glob("batch-*.jsonl.gz"), key=lambda p: int(p.name.split(".")[0][6:])
    )
    return [row for f in files for row in read_jsonl(f)]


@pytest.fixture(scope="module")
def export(demo_sweep, tmp_path_factory) -> tuple[str, Path, Path]:
    """(collection uri, sweep dir, export dir) of two tiny topk SAEs on the demo collection."""
    uri, sweep = demo_sweep
    out = tmp_path_factory.mktemp("neuronpedia") / "out"
    export_main(
        ["neuronpedia", str(sweep), "--collection", uri, "--out", str(out)]
        + ["--window", "10", "--after", "3", "--batch-size", "100", "--no-progress"]
    )  # fmt: skip
    return uri, sweep, out


def test_every_row_has_saedashboards_fields_and_types(export):
    _, _, out = export
    (model_dir,) = out.iterdir()
    assert model_dir.name == "demo"  # the collection's model name
    sources = sorted(p.name for p in model_dir.iterdir())
    layer = sources[0].split("-")[0]
    assert sources == [f"{layer}-saesweep__run-000", f"{layer}-saesweep__run-001"]
    for name in sources:
        source_dir = model_dir / name
        for file, schema in [
            ("release", RELEASE), ("model", MODEL), ("sourceset", SOURCESET), ("source", SOURCE)
        ]:  # fmt: skip
            check_rows(read_jsonl(source_dir / f"{file}.jsonl"), schema)
        assert read_jsonl(source_dir / "source.jsonl")[0]["id"] == name
        features = batches(source_dir, "features")
        assert [f["index"] for f in features] == [str(i) for i in range(256)]
        assert sorted(p.name for p in (source_dir / "features").iterdir()) == [
            "batch-0.jsonl.gz", "batch-1.jsonl.gz", "batch-2.jsonl.gz"
        ]  # fmt: skip
        check_rows(features, FEATURE)
        assert all(f["pos_str"] == f["neg_values"] == [] for f in features)  # MiniLM: no W_U
        activations = batches(source_dir, "activations")
        check_rows(activations, ACTIVATION)
        assert {a["layer"] for a in activations} == {name}


def test_the_files_give_the_feature_pages_contexts(export):
    uri, sweep_dir, out = export
    run = sweep_dir / "runs" / "run-000"
    found, _ = inspect_features(run, uri, None, top=20, n_default=4, window=10)
    (source_dir,) = out.glob("*/*__run-000")
    features = {int(f["index"]): f for f in batches(source_dir, "features")}
    by_latent: dict[int, list[dict]] = {}
    for a in batches(source_dir, "activations"):
        by_latent.setdefault(int(a["index"]), []).append(a)
    tokenizer = load_tokenizer("demo", None)
    for report in found:
        feature, examples = features[report.latent], by_latent[report.latent]
        assert feature["frac_nonzero"] == pytest.approx(report.density, rel=1e-9)
        assert feature["maxActApprox"] == pytest.approx(report.max_activation, abs=1e-5)
        assert len(examples) == len(report.hits) > 0
        for example, hit in zip(examples, report.hits, strict=True):
            at = example["qualifyingTokenIndex"]
            assert example["values"][at] == pytest.approx(hit.activation, abs=1e-5)
            assert example["tokens"][: at + 1] == [tokenizer.decode([t]) for t in hit.context]
            assert len(example["tokens"]) - at - 1 <= 3


def test_the_histograms_count_every_activation(export):
    uri, sweep_dir, out = export
    run = sweep_dir / "runs" / "run-001"
    (source_dir,) = out.glob("*/*__run-001")
    features = {int(f["index"]): f for f in batches(source_dir, "features")}
    sae = saesweep.load(run)
    hook = json.loads((run / "cfg.json").read_text())["hook_name"]
    x = read_collection(uri, hook, ":", names=("acts",)).tensors["acts"].float()
    codes = sae.encode(x)
    fired = (codes > 0).sum(0)
    checked = 0
    for latent in fired.argsort(descending=True)[:20].tolist():
        f = features[latent]
        values = codes[:, latent][codes[:, latent] > 0].double()
        bars = f["freq_hist_data_bar_values"]
        top = 2.0 ** round(math.log2(bars[0] * 2 * N_BINS))  # a power of two: N_BINS bins
        assert values.max() < top <= 2 * values.max()
        want = torch.histc(values, bins=N_BINS, min=0, max=top).long()
        assert f["freq_hist_data_bar_heights"] == want[: len(bars)].tolist()
        assert sum(f["freq_hist_data_bar_heights"]) == int(fired[latent])
        assert f["frac_nonzero"] == pytest.approx(int(fired[latent]) / len(x))
        checked += 1
    assert checked == 20


@pytest.fixture(scope="module")
def llama_export(tmp_path_factory) -> tuple[Path, dict, Path]:
    """(model dir, weights, export dir) of a random ReLU SAE at resid.1 of a tiny random
    Llama (its LM head not tied to its embeddings) on a 600-token collection of it."""
    root = tmp_path_factory.mktemp("neuronpedia-llama")
    model = build("llama", root / "models")
    uri = str(root / "coll")
    collect(
        CollectConfig(
            model=str(model), hooks=("resid.1",), out=uri, max_tokens=600, shard_tokens=200,
            ctx_len=32, batch_size=4, act_dtype="float32", progress=False,
        )
    )  # fmt: skip
    g = torch.Generator().manual_seed(0)
    d, d_sae = 32, 24
    weights = {
        "W_enc": torch.randn(d, d_sae, generator=g), "b_enc": torch.zeros(d_sae),
        "W_dec": torch.randn(d_sae, d, generator=g), "b_dec": torch.zeros(d),
    }  # fmt: skip
    cfg = {
        "architecture": "standard", "d_in": d, "d_sae": d_sae, "apply_b_dec_to_input": False,
        "hook_name": "model.layers.1", "model_name": str(model),
    }  # fmt: skip
    save_sae(root / "run", weights, cfg, {})
    out = root / "out"
    export_main(
        ["neuronpedia", str(root / "run"), "--collection", uri, "--out", str(out)]
        + ["--batch-size", "10", "--no-progress"]
    )  # fmt: skip
    return model, weights, out


def test_the_logits_are_the_decoder_rows_through_the_unembedding(llama_export):
    model_dir, weights, out = llama_export
    (source_dir,) = out.glob("*/*__run")
    features = batches(source_dir, "features")
    check_rows(features, FEATURE)
    lm = AutoModelForCausalLM.from_pretrained(model_dir)
    w_u = lm.lm_head.weight.detach().T
    assert not torch.equal(w_u, lm.model.embed_tokens.weight.detach().T)
    logits = weights["W_dec"] @ w_u  # [d_sae, d_vocab]
    tokenizer = load_tokenizer(str(model_dir), None)
    assert [int(f["index"]) for f in features] == list(range(len(logits)))
    for f, row in zip(features, logits, strict=True):
        top, bottom = row.topk(N_LOGITS), row.topk(N_LOGITS, largest=False)
        assert f["pos_values"] == pytest.approx(top.values.tolist(), abs=2e-5)
        assert f["neg_values"] == pytest.approx(bottom.values.tolist(), abs=2e-5)
        assert f["pos_values"][0] > 0 > f["neg_values"][0]
        assert f["pos_str"] == [tokenizer.decode([t]) for t in top.indices.tolist()]
        assert f["neg_str"] == [tokenizer.decode([t]) for t in bottom.indices.tolist()]
        heights = torch.histc(row, bins=N_LOGIT_BINS, min=row.min(), max=row.max())
        assert f["logits_hist_data_bar_heights"] == heights.int().tolist()
        assert sum(f["logits_hist_data_bar_heights"]) == len(row)
        values = f["logits_hist_data_bar_values"]
        width = (row.max() - row.min()).item() / N_LOGIT_BINS
        assert values[0] == pytest.approx(row.min().item() + width / 2, abs=1e-4)
        assert values[-1] == pytest.approx(row.max().item() - width / 2, abs=1e-4)
