"""Feature inspection on a real demo (MiniLM) collection and a small topk SAE trained on it."""

from __future__ import annotations

import html
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from saesweep.collect.model import model_path
from saesweep.errors import UserError
from saesweep.evaluate.downstream import downstream_metrics
from saesweep.evaluate.features import inspect_features, token_text, write_page
from saesweep.format.collection import read_collection
from saesweep.format.rundir import load_sae
from saesweep.sae.export import exported_acts

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(demo_sweep) -> tuple[str, Path]:
    """(collection uri, run dir) of a tiny topk SAE (k 8) on a 3000-token demo collection."""
    uri, sweep = demo_sweep
    return uri, sweep / "runs" / "run-000"


def all_acts(uri: str, run_dir: Path) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    cfg, sd = load_sae(run_dir)
    coll = read_collection(uri, None, ":", names=("acts",))
    return exported_acts(cfg, sd, coll.tensors["acts"].float()), coll.tensors


def test_top_contexts_are_the_max_activations(trained):
    uri, run_dir = trained
    acts, t = all_acts(uri, run_dir)
    fires = (acts > 0).sum(0)
    latents = [int(fires.argmax()), int((fires > 0).nonzero()[-1]), 3]
    found, n_tokens = inspect_features(run_dir, uri, latents, top=7)
    assert n_tokens == len(acts)
    for report, latent in zip(found, latents, strict=True):
        col = acts[:, latent]
        want = col.topk(7).values
        want = want[want > 0]
        got = torch.tensor([h.activation for h in report.hits])
        torch.testing.assert_close(got, want)
        assert report.density == pytest.approx(float((col > 0).double().mean()))
        assert report.max_activation == pytest.approx(float(col.max().clamp_min(0)))
        for h in report.hits:
            rows = ((t["seq_ids"] == h.seq_id) & (t["positions"] == h.position)).nonzero()
            assert len(rows) == 1
            row = int(rows[0])
            assert float(col[row]) == pytest.approx(h.activation)
            assert h.token_id == int(t["token_ids"][row]) == h.context[-1]
            same = (t["seq_ids"] == h.seq_id) & (t["positions"] <= h.position)
            same &= t["positions"] >= h.position - 10
            assert len(h.context) == int(same.sum()) <= 11


def test_default_latents_are_informative_ones(trained):
    """Without latents: those firing on 0.01 % to 1 % of the tokens, largest activation first,
    then the other latents that fired, the same way."""
    uri, run_dir = trained
    acts, _ = all_acts(uri, run_dir)
    density, peak = (acts > 0).double().mean(0), acts.max(0).values
    in_band = (density >= 1e-4) & (density <= 1e-2)
    assert 0 < int(in_band.sum()) < 12 and float(density.max()) > 0.05, "both kinds exist"
    fired = [i for i in range(acts.shape[1]) if density[i] > 0]
    want = sorted(fired, key=lambda i: (not bool(in_band[i]), -float(peak[i]), i))[:12]
    found, _ = inspect_features(run_dir, uri, None, top=3, n_default=12)
    assert [r.latent for r in found] == want
    assert all(1e-4 <= r.density <= 1e-2 for r in found[: int(in_band.sum())])


def test_html_page_holds_the_decoded_tokens(trained, tmp_path):
    uri, run_dir = trained
    out = tmp_path / "page.html"
    found = write_page(run_dir, uri, out, [1, 2], top=5)
    page = out.read_text()
    tok = AutoTokenizer.from_pretrained(model_path("demo"))
    assert 'id="latent-1"' in page and 'id="latent-2"' in page
    for r in found:
        for h in r.hits:
            assert f"<mark>{html.escape(token_text(tok, h.token_id))}</mark>" in page
            assert f"{h.activation:.4g}" in page


def test_cli(trained, tmp_path):
    uri, run_dir = trained
    out = tmp_path / "cli.html"
    args = [str(run_dir), "--data", uri, "--latents", "0", "5", "--top", "4", "--out", str(out)]
    proc = subprocess.run(
        [sys.executable, "-m", "saesweep.evaluate.features", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert 'id="latent-5"' in out.read_text()
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "saesweep.evaluate.features",
            str(run_dir),
            "--data",
            uri,
            "--latents",
            "999",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "out of range" in bad.stderr


def test_out_of_range_latent(trained):
    uri, run_dir = trained
    with pytest.raises(UserError, match="out of range"):
        inspect_features(run_dir, uri, [256])


def test_downstream_of_a_trained_sae_on_minilm(trained, tmp_path):
    """A trained SAE recovers part of the final hidden states that zero ablation destroys."""
    uri, run_dir = trained
    m = downstream_metrics(run_dir, uri, n_sequences=4)
    assert 0 < m["final_mse_sae"] < m["final_mse_zero"]
    assert 0 < m["final_recovered"] < 1
