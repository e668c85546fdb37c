"""export.py sparsify: sparsify's own SparseCoder (eai-sparsify, in its own venv) loads the
export, and its forward matches saesweep.load's on the same inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from consumers import run_json
from safetensors.torch import save_file

import saesweep
from saesweep.export.cli import main as export_main
from saesweep.format.rundir import save_sae
from saesweep.sae import SAEConfig, make_sae

D_IN, D_SAE, K = 16, 64, 5
SPARSIFY = ["eai-sparsify==1.3.3"]

FORWARD = """
import json, os, sys
import torch
from safetensors.torch import load_file
os.environ["SPARSIFY_DISABLE_TRITON"] = "1"  # its Triton decoder needs a GPU
from sparsify import SparseCoder

x = load_file(sys.argv[1])["x"]
out = {}
for run in sys.argv[2:]:
    for hookpoint, coder in SparseCoder.load_many(run, local=True).items():
        acts, indices, _ = coder.encode(x)
        dense = torch.zeros(len(x), coder.num_latents).scatter(-1, indices, acts)
        y = coder(x).sae_out
        out[run] = {"hookpoint": hookpoint, "acts": dense.tolist(), "y": y.tolist(),
                    "k": coder.cfg.k, "transcode": coder.cfg.transcode}
print(json.dumps(out))
"""


def save_run(
    run_dir: Path, arch: str, hook: str, d_out: int | None = None, skip=False, **cfg_fields
) -> None:
    """A finished run of a randomly drawn SAE (biases drawn too), input scale 0.5 folded,
    `cfg_fields` set in its cfg.json."""
    sae = make_sae(SAEConfig(arch=arch, d_sae=D_SAE, k=K, skip=skip), D_IN, [3], d_out=d_out)
    with torch.no_grad():
        for p in (sae.b_enc, sae.b_dec, *([sae.W_skip] if skip else [])):
            p.copy_(torch.randn_like(p) * 0.3)
    cfg = sae.sae_lens_cfg() | {"hook_name": hook, **cfg_fields}
    cfg |= {"hook_name_out": "model.layers.1.mlp"} if d_out else {}
    run_dir.mkdir(parents=True)
    save_sae(run_dir, sae.member_state_dict(0, input_scale=0.5), cfg, {"fvu": 0.1})


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """A sweep directory with a TopK SAE, a TopK skip transcoder, a TopK transcoder and a
    TopK SAE whose encoder reads x itself (SAELens's apply_b_dec_to_input false)."""
    root = tmp_path_factory.mktemp("sparsify") / "sweep"
    save_run(root / "runs" / "run-000", "topk", "model.layers.1")
    save_run(root / "runs" / "run-001", "topk", "model.layers.1.ln", d_out=D_IN, skip=True)
    save_run(root / "runs" / "run-002", "topk", "model.layers.1.ln", d_out=D_IN)
    save_run(root / "runs" / "run-003", "topk", "model.layers.2", apply_b_dec_to_input=False)
    return root


def test_sparsify_loads_the_export_and_its_forward_is_saesweeps(sweep, tmp_path, consumers):
    out = tmp_path / "out"
    export_main(["sparsify", str(sweep), "--out", str(out)])
    x = torch.randn(40, D_IN) * 3
    save_file({"x": x}, tmp_path / "x.safetensors")
    runs = {
        "run-000": ("model.layers.1", False),
        "run-001": ("model.layers.1.mlp", True),
        "run-002": ("model.layers.1.mlp", True),
        "run-003": ("model.layers.2", False),
    }
    python = consumers("sparsify", SPARSIFY)
    found = run_json(
        python, FORWARD, str(tmp_path / "x.safetensors"), *(str(out / r) for r in runs)
    )
    assert sorted(p.name for p in out.iterdir()) == sorted(runs)
    for run, (hookpoint, transcode) in runs.items():
        got = found[str(out / run)]
        assert got["hookpoint"] == hookpoint
        sae = saesweep.load(sweep / "runs" / run)
        want = sae.encode(x)
        assert got["k"] == K and got["transcode"] is transcode
        assert int((want > 0).sum(-1).max()) == K
        torch.testing.assert_close(torch.tensor(got["acts"]), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(torch.tensor(got["y"]), sae(x), rtol=1e-5, atol=1e-5)


def test_only_topk_runs_of_the_same_width_are_exported(tmp_path, capsys):
    save_run(tmp_path / "relu", "relu", "model.layers.1")
    save_run(tmp_path / "wide", "topk", "model.layers.1.ln", d_out=2 * D_IN)
    for run, reason in [("relu", "sparsify holds only TopK"), ("wide", "keep the width")]:
        with pytest.raises(SystemExit) as stop:
            export_main(["sparsify", str(tmp_path / run), "--out", str(tmp_path / "out")])
        assert stop.value.code == 2 and reason in capsys.readouterr().err
        assert not (tmp_path / "out").exists()


def test_an_existing_output_is_refused_and_kept(sweep, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("mine")
    with pytest.raises(SystemExit) as stop:
        export_main(["sparsify", str(sweep), "--out", str(out)])
    assert stop.value.code == 2 and "already exists" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep"]
    assert json.loads(json.dumps((out / "keep").read_text())) == "mine"
