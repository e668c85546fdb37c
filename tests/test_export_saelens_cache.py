"""export.py saelens-cache: SAELens's own ActivationsStore reads the export (its cached
activations path) and yields the collection's activations and token ids, in order."""

from __future__ import annotations

import pytest
import torch
from sae_lens.training.activations_store import ActivationsStore
from synthetic import HOOK, make_collection

from saesweep.export.cli import main as export_main
from saesweep.format.collection import read_collection

D, SHARDS, CONTEXT = 16, [50, 70, 3], 8
STORE_OPTIONS = {
    "model": None,
    "dataset": None,
    "streaming": False,
    "hook_head_index": None,
    "context_size": CONTEXT,
    "d_in": D,
    "n_batches_in_buffer": 1,
    "total_training_tokens": 0,
    "store_batch_size_prompts": 2,
    "train_batch_size_tokens": 16,
    "prepend_bos": False,
    "normalize_activations": "none",
    "device": torch.device("cpu"),
}
"""SAELens's ActivationsStore reading cached activations, two context windows at a time."""


@pytest.fixture(scope="module")
def collection(tmp_path_factory) -> str:
    uri = str(tmp_path_factory.mktemp("saelens") / "coll")
    make_collection(uri, SHARDS, d=D, dtype=torch.bfloat16)
    return uri


def saelens_rows(path, dtype: str, column: str = HOOK) -> tuple[torch.Tensor, torch.Tensor]:
    """Every (activation, token id) SAELens's ActivationsStore reads from the cache at
    `path`, two context windows at a time, until its epoch ends."""
    store = ActivationsStore(
        **STORE_OPTIONS, hook_name=column, dtype=dtype, cached_activations_path=str(path)
    )
    acts, ids = [], []
    while True:
        try:
            a, t = store.get_raw_llm_batch(raise_on_epoch_end=True)
        except StopIteration:
            return torch.cat(acts), torch.cat(ids)
        acts.append(a)
        ids.append(t)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_saelens_reads_the_collections_activations(collection, tmp_path, dtype):
    out = tmp_path / "cache"
    argv = ["saelens-cache", collection, "--out", str(out), "--context-size", str(CONTEXT)]
    export_main([*argv, "--dtype", dtype, "--no-progress"])
    acts, ids = saelens_rows(out, dtype)
    stored = read_collection(collection, None, names=("acts",)).tensors
    n = sum(SHARDS) // CONTEXT // 2 * 2 * CONTEXT  # whole windows, read two at a time
    assert acts.shape == (n, D) and acts.dtype == getattr(torch, dtype)
    expected = stored["acts"][:n].float()
    if dtype == "float32":
        assert torch.equal(acts, expected)
    else:
        torch.testing.assert_close(acts.float(), expected, rtol=2**-10, atol=2**-14)
    assert torch.equal(ids.long(), stored["token_ids"][:n].long())


def test_column_names_the_hook_column_saelens_reads(collection, tmp_path):
    out = tmp_path / "cache"
    argv = ["saelens-cache", collection, "--out", str(out), "--context-size", str(CONTEXT)]
    export_main([*argv, "--column", "blocks.1.hook_resid_post", "--no-progress"])
    acts, _ = saelens_rows(out, "float32", column="blocks.1.hook_resid_post")
    assert acts[:, 0].tolist() == list(range(len(acts)))


def test_a_context_longer_than_the_collection_is_refused(collection, tmp_path):
    out = tmp_path / "cache"
    with pytest.raises(SystemExit) as exit_:
        export_main(["saelens-cache", collection, "--out", str(out), "--context-size", "1000"])
    assert exit_.value.code == 2
    assert not out.exists()


def test_float16_overflow_is_refused_and_leaves_nothing(tmp_path, capsys):
    uri = str(tmp_path / "coll")
    make_collection(uri, [70_000], d=2, dtype=torch.float32)  # acts[:, 0] up to 69,999
    out = tmp_path / "cache"
    argv = ["saelens-cache", uri, "--out", str(out), "--context-size", "1000"]
    with pytest.raises(SystemExit) as exit_:
        export_main([*argv, "--dtype", "float16", "--no-progress"])
    assert exit_.value.code == 2
    assert "--dtype float32" in capsys.readouterr().err
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["coll"]
