"""The hook sites circuit tracing reads, mlp_in (the MLP's input) and resid_mid (the residual
stream between attention and MLP), against the tensors taken by hand from each model family,
in a collection and from the live source."""

from __future__ import annotations

import pytest
import torch
from test_collect import by_token, read_hook, small
from test_live_source import keys
from tiny_models import build

from saesweep.collect.model import HookedModel, load_model, model_modules, resolve_hook
from saesweep.collect.run import collect
from saesweep.collect.source import ModelSource

BLOCKS = {"gpt2": "transformer.h", "llama": "model.layers", "bert": "encoder.layer"}
SITE_PATHS = {
    "gpt2": {"mlp_in": "mlp:in", "resid_mid": "ln_2:in"},
    "llama": {"mlp_in": "mlp:in", "resid_mid": "post_attention_layernorm:in"},
    "bert": {"mlp_in": "intermediate:in", "resid_mid": "attention"},
}


def model_of(family: str, root):
    path = "demo" if family == "demo" else str(build(family, root))
    return load_model(path, None, "float32", "cpu")[0]


def by_hand(model, family: str, layer: int, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """mlp_in: the MLP module's input; resid_mid: the block's input plus its attention's
    output (pre-norm), or the attention block's output sublayer (BERT's post-norm residual)."""
    block = dict(model.named_modules())[f"{BLOCKS['bert' if family == 'demo' else family]}.{layer}"]
    seen: dict[str, torch.Tensor] = {}
    bert = family in ("bert", "demo")
    mlp = block.intermediate if bert else block.mlp
    attn = block.attention.output if bert else (block.attn if family == "gpt2" else block.self_attn)

    def keep(name: str, value) -> None:
        seen.setdefault(name, value)

    handles = [
        mlp.register_forward_pre_hook(lambda m, args: keep("mlp_in", args[0])),
        attn.register_forward_hook(lambda m, args, out: keep("attn", out)),
        block.register_forward_pre_hook(
            lambda m, args, kw: keep("block_in", args[0] if args else kw["hidden_states"]),
            with_kwargs=True,
        ),
    ]
    with torch.inference_mode():
        model(input_ids=ids, attention_mask=torch.ones_like(ids))
    for handle in handles:
        handle.remove()
    attn_out = seen["attn"][0] if isinstance(seen["attn"], tuple) else seen["attn"]
    resid_mid = attn_out if bert else seen["block_in"] + attn_out
    return {"mlp_in": seen["mlp_in"], "resid_mid": resid_mid}


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert", "demo"])
def test_sites_are_the_tensors_taken_by_hand(tmp_path_factory, family):
    model = model_of(family, tmp_path_factory.getbasetemp())
    ids = torch.tensor([[101, 2023, 2003, 1037, 3231, 102]])
    want = by_hand(model, family, 1, ids)
    paths = {site: resolve_hook(model, f"{site}.1") for site in want}
    for site, (path, got_site, layer) in paths.items():
        assert (got_site, layer) == (site, 1)
        if family in SITE_PATHS:
            block = BLOCKS[family]
            assert path == f"{block}.1.{SITE_PATHS[family][site]}"
        assert resolve_hook(model, path) == (path, site, 1), "a path given directly keeps its site"
    hooked = HookedModel(model, [p for p, _, _ in paths.values()])
    got = hooked.run(ids, torch.ones_like(ids))
    for site, (path, _, _) in paths.items():
        torch.testing.assert_close(got[path], want[site], rtol=1e-6, atol=1e-6)
        assert not torch.equal(want["mlp_in"], want["resid_mid"]) or family in ("bert", "demo")


def test_model_modules_resolve_as_the_loaded_model(tmp_path_factory):
    path = str(build("llama", tmp_path_factory.getbasetemp()))
    loaded, meta = load_model(path, None, "float32", "cpu")[0], model_modules(path)
    for spec in ("mlp_in.2", "resid_mid.0", "mlp.1", "attn.0", "resid.2"):
        assert resolve_hook(meta, spec) == resolve_hook(loaded, spec)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_collection_and_live_source_store_the_new_sites(tmp_path, family):
    """Collected mlp_in and resid_mid rows are the live source's, and metadata names the
    site; a first live batch equals the stored tokens."""
    model = str(build(family, tmp_path))
    hooks = ("mlp_in.1", "resid_mid.2", "mlp.1")
    cfg = small(tmp_path / "out", model=model, hooks=hooks, max_tokens=1200, act_dtype="float32")
    collect(cfg)
    source = ModelSource(cfg, list(hooks), batch_size=128, shuffle_tokens=256, seed=1)
    batch, _ = next(source.batches())
    for spec, path in source.hooks.items():
        stored = by_token(read_hook(cfg.out, path))
        index = torch.searchsorted(keys(stored), keys(vars(batch)))
        assert torch.equal(keys(stored)[index], keys(vars(batch)))
        torch.testing.assert_close(batch.acts[spec], stored["acts"][index], rtol=1e-5, atol=1e-5)
    from saesweep.store import open_store

    meta = open_store(cfg.out).get_json(f"{source.hooks['mlp_in.1']}/metadata.json")
    assert (meta["site"], meta["layer"], meta["short_name"]) == ("mlp_in", 1, "mlp_in.1")
