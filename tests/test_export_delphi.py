"""export.py delphi: delphi's own LatentDataset (eai-delphi, in its own venv) reads the cache
of a sweep and yields, for a latent, the top-activating contexts saesweep's feature pages show;
delphi's sparsify loader encodes with export.py sparsify's output as saesweep does."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from consumers import run_json
from safetensors.numpy import load_file
from safetensors.torch import save_file

import saesweep
from saesweep.collect.model import model_path
from saesweep.evaluate.features import inspect_features
from saesweep.export.cli import main as export_main
from saesweep.format.collection import read_collection
from saesweep.format.rundir import METRICS

DELPHI = ["eai-delphi==0.1.3"]
EXAMPLE_CTX = 16

TOP_WINDOWS = """
import json, sys
import torch
from delphi.config import ConstructorConfig, SamplerConfig
from delphi.latents import LatentDataset
from delphi.sparse_coders.load_sparsify import load_sparsify_sparse_coders, sae_dense_latents
from safetensors.torch import load_file

raw_dir, module, ctx, sparsify_dir, inputs = sys.argv[1:6]
latents = [int(a) for a in sys.argv[6:]]
dataset = LatentDataset(
    raw_dir,
    SamplerConfig(n_examples_train=10, n_examples_test=0, train_type="top"),
    ConstructorConfig(example_ctx_len=int(ctx), min_examples=1, n_non_activating=0),
    modules=[module],
    latents={module: torch.tensor(latents)},
)
out = {"records": {}}
for record in dataset:
    out["records"][record.latent.latent_index] = [
        {"max": float(e.activations.max()), "at": int(e.activations.argmax()),
         "tokens": e.tokens.tolist()}
        for e in record.examples
    ]
coder = load_sparsify_sparse_coders(sparsify_dir, [module], "cpu")[module]
out["dense"] = sae_dense_latents(load_file(inputs)["x"], coder).tolist()
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def sweep(demo_sweep) -> tuple[str, Path]:
    """(collection uri, sweep dir) of two tiny topk SAEs on a 3000-token demo collection."""
    uri, sweep_dir = demo_sweep
    assert all((run / METRICS).is_file() for run in (sweep_dir / "runs").iterdir())
    return uri, sweep_dir


def split_files(out: Path) -> dict[str, dict]:
    return {str(p.relative_to(out)): load_file(p) for p in sorted(out.rglob("*.safetensors"))}


def windows(hits) -> list[tuple[int, int]]:
    """The example windows (sequence, position // EXAMPLE_CTX) of the hits, each once, in
    order: the windows whose maxima delphi ranks first."""
    seen: list[tuple[int, int]] = []
    for h in hits:
        if (h.seq_id, h.position // EXAMPLE_CTX) not in seen:
            seen.append((h.seq_id, h.position // EXAMPLE_CTX))
    return seen


def test_delphi_reads_the_cache_and_finds_the_feature_pages_contexts(sweep, tmp_path, consumers):
    uri, sweep_dir = sweep
    out = tmp_path / "out"
    export_main(
        ["delphi", str(sweep_dir), "--collection", uri, "--out", str(out), "--n-splits", "3"]
    )
    assert sorted(p.name for p in out.iterdir()) == ["run-000", "run-001"]
    run = sweep_dir / "runs" / "run-000"
    hook = json.loads((run / "cfg.json").read_text())["hook_name"]
    module_dir = out / "run-000" / "latents" / hook
    found, n_tokens = inspect_features(run, uri, None, top=30, n_default=3, window=63)
    config = json.loads((module_dir / "config.json").read_text())
    assert config["model_name"] == model_path("demo")  # delphi loads its tokenizer
    assert config["n_tokens"] == n_tokens and config["ctx_len"] == 64 and config["n_splits"] == 3
    assert sorted(p.name for p in module_dir.glob("*.safetensors")) == [
        "0_84.safetensors", "170_255.safetensors", "85_169.safetensors"
    ]  # fmt: skip
    python = consumers("delphi", DELPHI, excludes=("vllm",))
    latents = [str(r.latent) for r in found]
    export_main(["sparsify", str(run), "--out", str(tmp_path / "sparsify")])
    x = read_collection(uri, hook, "-1:", names=("acts",)).tensors["acts"][:300].float()
    save_file({"x": x}, tmp_path / "x.safetensors")
    raw_dir, sparsify_dir = str(out / "run-000" / "latents"), str(tmp_path / "sparsify" / "run-000")
    args = (raw_dir, hook, str(EXAMPLE_CTX), sparsify_dir, str(tmp_path / "x.safetensors"))
    got = run_json(python, TOP_WINDOWS, *args, *latents)
    want = saesweep.load(run).encode(x)  # delphi encodes with the sparsify export unchanged
    torch.testing.assert_close(torch.tensor(got["dense"]), want, rtol=1e-5, atol=1e-5)
    assert sorted(map(int, got["records"])) == sorted(r.latent for r in found)
    for report in found:
        examples = got["records"][str(report.latent)]
        tops = windows(report.hits)
        assert len(examples) >= len(tops) > 0
        for example, (seq, window) in zip(examples, tops, strict=False):
            best = next(
                h for h in report.hits if (h.seq_id, h.position // EXAMPLE_CTX) == (seq, window)
            )
            assert example["max"] == pytest.approx(best.activation, rel=1e-3)
            assert example["at"] == best.position % EXAMPLE_CTX
            before = best.context[-(example["at"] + 1) :]
            assert example["tokens"][: example["at"] + 1][-len(before) :] == before


def sorted_rows(split: dict) -> tuple[np.ndarray, np.ndarray]:
    """A split's locations and activations, rows in (latent, sequence, position) order."""
    loc = split["locations"].astype(np.int64)
    order = np.lexsort((loc[:, 1], loc[:, 0], loc[:, 2]))
    return loc[order], split["activations"][order]


def test_spilling_to_part_files_writes_the_same_cache(sweep, tmp_path):
    uri, sweep_dir = sweep
    written = {}
    for memory in ("1024", "0"):
        out = tmp_path / f"out-{memory}"
        export_main(
            ["delphi", str(sweep_dir), "--collection", uri, "--out", str(out)]
            + ["--memory-mb", memory, "--no-progress"]
        )  # fmt: skip
        written[memory] = split_files(out)
        assert not (out / ".parts").exists()
    held, spilled = written["1024"], written["0"]
    assert sorted(held) == sorted(spilled) and len(held) == 10
    for name, split in held.items():
        assert (split["tokens"] == spilled[name]["tokens"]).all()
        for a, b in zip(sorted_rows(split), sorted_rows(spilled[name]), strict=True):
            assert a.dtype == b.dtype and (a == b).all()
    config = next((tmp_path / "out-0" / "run-000" / "latents").glob("*/config.json"))
    n_tokens = json.loads(config.read_text())["n_tokens"]
    fired = sum(len(f["activations"]) for n, f in held.items() if n.startswith("run-000"))
    assert n_tokens < fired <= 8 * n_tokens  # k = 8: most tokens fire 8 latents


def test_a_run_of_another_width_is_refused_and_nothing_written(sweep, tmp_path, capsys):
    uri, sweep_dir = sweep
    run = tmp_path / "narrow"
    shutil.copytree(sweep_dir / "runs" / "run-000", run)
    cfg = json.loads((run / "cfg.json").read_text())
    (run / "cfg.json").write_text(json.dumps(cfg | {"d_in": 7}))
    with pytest.raises(SystemExit) as stop:
        export_main(["delphi", str(run), "--collection", uri, "--out", str(tmp_path / "out")])
    assert stop.value.code == 2 and "has width" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and list(tmp_path.glob(".out*")) == []
