"""The Reader on local collections: exactly once, reproducible, resumable, corrupt shards."""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from synthetic import HOOK, TARGET, make_collection, read_index

from saesweep import Reader
from saesweep.data.window import BatchBuffers, Window
from saesweep.errors import UserError
from saesweep.format.shards import shard_name

SIZES = [300, 250, 310, 90, 400, 120]
TOTAL = sum(SIZES)
DTYPES = [torch.float32, torch.float8_e4m3fn]
"""Stored dtypes the fault tests run on: plain floats, and scaled 8-bit floats."""


@pytest.fixture(scope="module")
def coll(tmp_path_factory) -> str:
    uri = str(tmp_path_factory.mktemp("coll"))
    make_collection(uri, SIZES)
    return uri


def token_index(batches) -> list[int]:
    return [int(v) for b in batches for v in b[:, 0].tolist()]


def read(uri, **kw) -> list[torch.Tensor]:
    return list(Reader(uri, **{"batch_size": 64, "shuffle_tokens": 500, **kw}))


def test_every_token_exactly_once(coll):
    batches = read(coll, seed=3)
    assert sorted(token_index(batches)) == list(range(TOTAL))
    assert [len(b) for b in batches] == [64] * (TOTAL // 64) + [TOTAL % 64]
    assert len(Reader(coll, batch_size=64)) == math.ceil(TOTAL / 64)


def test_seed_reproduces_and_differs(coll):
    assert token_index(read(coll, seed=1)) == token_index(read(coll, seed=1))
    assert token_index(read(coll, seed=1)) != token_index(read(coll, seed=2))


def test_tokens_mix_across_shards(coll):
    first = token_index(read(coll, seed=0))[:64]
    shard_of = [
        next(i for i, end in enumerate(torch.tensor(SIZES).cumsum(0)) if t < end) for t in first
    ]
    assert len(set(shard_of)) >= 2


def test_no_shuffle_keeps_stored_order(coll):
    assert token_index(read(coll, shuffle=False)) == list(range(TOTAL))


def test_drop_last_and_epochs(coll):
    batches = read(coll, drop_last=True, epochs=2, seed=5)
    assert all(len(b) == 64 for b in batches)
    assert len(batches) == 2 * (TOTAL // 64)
    two = token_index(read(coll, epochs=2, seed=5))
    assert sorted(two[:TOTAL]) == sorted(two[TOTAL:]) == list(range(TOTAL))
    assert two[:TOTAL] != two[TOTAL:]


@pytest.mark.parametrize("stop_after", [1, 9, 23, 30])
def test_resume_continues_exactly(coll, stop_after):
    full = token_index(read(coll, seed=7, epochs=2))
    reader = Reader(coll, batch_size=64, shuffle_tokens=500, seed=7, epochs=2)
    head = []
    for i, batch in enumerate(reader):
        head.append(batch)
        if i + 1 == stop_after:
            break
    state = reader.state_dict()
    resumed = Reader(coll, batch_size=64, shuffle_tokens=500, seed=7, epochs=2)
    resumed.load_state_dict(state)
    assert token_index(head) + token_index(resumed) == full


def test_token_ids_and_dtype(coll):
    reader = Reader(coll, batch_size=100, with_token_ids=True, dtype=torch.float64)
    for acts, ids in reader:
        assert acts.dtype == torch.float64 and ids.dtype == torch.int32
        assert torch.equal(acts[:, 0].long() % 30000, ids.long())


def test_normalize_scales_mean_norm(coll):
    reader = Reader(coll, batch_size=TOTAL, normalize="norm")
    acts = next(iter(reader))
    assert acts.norm(dim=1).mean().item() == pytest.approx(math.sqrt(16), rel=1e-4)
    assert reader.normalizer.scales[HOOK] > 0


def test_hook_and_layer_selection(coll):
    assert Reader(coll, layer=1).hook == HOOK
    assert Reader(coll, hook="resid.1").hook == HOOK
    with pytest.raises(UserError, match="no hook matching"):
        Reader(coll, layer=5)


def corrupt(uri: str, shard: int) -> str:

    path = f"{uri}/{HOOK}/{shard_name(0, shard)}"
    with open(path, "r+b") as f:
        f.seek(-10, 2)
        f.write(b"\xff" * 10)
    return shard_name(0, shard)


@pytest.mark.parametrize("dtype", DTYPES)
def test_corrupt_shard_raises_or_skips(tmp_path, dtype):
    uri = str(tmp_path)
    make_collection(uri, SIZES, dtype=dtype)
    name = corrupt(uri, 2)
    with pytest.raises(UserError, match=name):
        read(uri)
    kw = {"batch_size": 64, "shuffle_tokens": 500, "with_token_ids": True}
    reader = Reader(uri, on_corrupt="skip", **kw)
    seen = sorted(i for _, ids in reader for i in ids.tolist())
    missing = set(range(SIZES[0] + SIZES[1], SIZES[0] + SIZES[1] + SIZES[2]))
    assert seen == [t for t in range(TOTAL) if t not in missing]
    assert reader.figures()["reader/corrupt_skipped"] == 1


def test_damaged_manifest_or_missing_statistics_is_one_sentence(tmp_path):
    uri = str(tmp_path)
    make_collection(uri, SIZES)
    (tmp_path / HOOK / "statistics.json").unlink()
    with pytest.raises(UserError, match="has no statistics.json, which normalize='norm' needs"):
        Reader(uri, normalize="norm")
    (tmp_path / HOOK / "metadata.json").write_text('{"shards": [')
    with pytest.raises(UserError, match=f"{HOOK}/metadata.json is not valid JSON"):
        Reader(uri)


def test_early_break_cleans_up(coll):
    for _ in range(3):
        for batch in Reader(coll, batch_size=64):
            assert len(batch) == 64
            break


@pytest.mark.parametrize("dtype", DTYPES)
def test_truncated_or_missing_shard_is_named(tmp_path, dtype):
    uri = str(tmp_path)
    make_collection(uri, SIZES, dtype=dtype)
    path = f"{uri}/{HOOK}/{shard_name(0, 1)}"
    with open(path, "r+b") as f:
        f.truncate(1000)
    with pytest.raises(UserError, match=f"{shard_name(0, 1)} could not be read .*holds 1000 bytes"):
        read_index(uri)
    os.remove(path)
    with pytest.raises(UserError, match=f"{shard_name(0, 1)} could not be read .*No such file"):
        read(uri)


@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("n_helpers", [0, 1, 3])
def test_window_take_matches_reference_gather(n_helpers, scaled):
    gen = torch.Generator().manual_seed(0)
    sizes = (500, 1700, 0, 900, 3)
    dtype = torch.float8_e4m3fn if scaled else torch.bfloat16
    acts = [torch.randn(n, 8, generator=gen).to(dtype) for n in sizes]
    ids = [torch.randint(0, 1000, (n,), generator=gen, dtype=torch.int32) for n in sizes]
    scales = [torch.rand(n, generator=gen) for n in sizes] if scaled else None
    order = torch.randperm(sum(sizes), generator=gen)
    window = Window(acts, ids, order.numpy(), scales)
    all_acts, all_ids = torch.cat(acts).view(torch.uint8), torch.cat(ids)
    buffers = BatchBuffers(1500, 8, dtype, keep=2, pinned=False)
    with ThreadPoolExecutor(max(n_helpers, 1)) as pool:
        helpers = (pool, n_helpers) if n_helpers else None
        for start, stop in [(0, 3103), (3, 1503), (3100, 3103), (7, 7), (1200, 2700)]:
            got_acts, got_ids, got_scales = window.take(start, stop, buffers, helpers)
            expected = order[start:stop].sort().values
            assert torch.equal(got_acts.view(torch.uint8), all_acts[expected])
            assert torch.equal(got_ids, all_ids[expected])
            if scaled:
                assert torch.equal(got_scales, torch.cat(scales)[expected])
            else:
                assert got_scales is None


def test_batch_buffers_reused_only_when_nothing_uses_them():
    buffers = BatchBuffers(16, 4, torch.float32, keep=2, pinned=False)
    first = buffers.get(16)
    view = first[:3]
    address = first.data_ptr()
    del first
    second = buffers.get(16)
    assert second.data_ptr() != address  # a view still uses the first buffer
    del view
    third = buffers.get(16)
    assert third.data_ptr() == address
    held = [buffers.get(16) for _ in range(3)]  # past `keep`: fresh memory, all distinct
    assert len({t.data_ptr() for t in [second, third, *held]}) == 5


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda_is_a_user_error(coll):
    with pytest.raises(UserError, match="sees no CUDA device; use device='cpu'"):
        Reader(coll, device="cuda")


# ----- several hooks in lockstep (a transcoder's input and target) -------------------------


@pytest.fixture(scope="module")
def coll2(tmp_path_factory) -> str:
    uri = str(tmp_path_factory.mktemp("coll2"))
    make_collection(uri, SIZES, target_d=12)
    return uri


def lockstep_rows(batches) -> list[int]:
    """Token indices of ({hook: acts}, ids) batches, checking that every hook's row i and the
    stored token id are the same token."""
    rows = []
    for acts, ids in batches:
        assert set(acts) == {HOOK, TARGET}
        assert acts[HOOK].shape[1] == 16 and acts[TARGET].shape[1] == 12
        index = acts[HOOK][:, 0].long()
        assert torch.equal(acts[TARGET][:, 0].long(), index)
        assert torch.equal(ids.long(), index % 30000)
        rows += index.tolist()
    return rows


@pytest.mark.parametrize("kw", [{"seed": 3}, {"seed": 3, "epochs": 2, "drop_last": True}])
def test_two_hooks_are_served_in_lockstep(coll2, kw):
    kw = {"batch_size": 64, "shuffle_tokens": 500, "hook": HOOK, **kw}
    reader = Reader(coll2, extra_hooks=["resid.2"], with_token_ids=True, **kw)
    rows = lockstep_rows(reader)
    assert rows == token_index(Reader(coll2, **kw))  # the single hook's order
    assert sorted(rows[:TOTAL]) == list(range(TOTAL)) or kw.get("drop_last")
    manifest_bytes = sum(s["n_bytes"] for h in reader.hooks for s in h.shards) * kw.get("epochs", 1)
    assert reader.figures()["reader/bytes_read"] == manifest_bytes  # each shard read once


def test_two_hooks_resume_in_lockstep(coll2):
    kw = {"batch_size": 64, "shuffle_tokens": 500, "seed": 7, "epochs": 2}
    kw |= {"hook": HOOK, "extra_hooks": [TARGET], "with_token_ids": True}
    full = lockstep_rows(Reader(coll2, **kw))
    reader, head = Reader(coll2, **kw), []
    for i, batch in enumerate(reader):
        head.append(batch)
        if i == 12:
            break
    resumed = Reader(coll2, **kw)
    resumed.load_state_dict(reader.state_dict())
    assert lockstep_rows(head) + lockstep_rows(resumed) == full


def test_each_hook_is_normalized_by_its_own_scale(coll2):
    reader = Reader(coll2, hook=HOOK, batch_size=TOTAL, normalize="norm", extra_hooks=[TARGET])
    (batch,) = list(reader)
    for hook, width in ((HOOK, 16), (TARGET, 12)):
        assert batch[hook].norm(dim=1).mean().item() == pytest.approx(width**0.5, rel=1e-4)
    assert reader.norm_scale(TARGET) != reader.norm_scale()


def test_a_target_with_other_tokens_is_refused(tmp_path):
    make_collection(str(tmp_path), SIZES, target_d=12, target_sizes=SIZES[:-1])
    with pytest.raises(UserError, match=r"store different tokens .* one collection run"):
        Reader(str(tmp_path), hook=HOOK, extra_hooks=[TARGET])
    with pytest.raises(UserError, match="has no hook matching hook='resid.7'"):
        Reader(str(tmp_path), hook=HOOK, extra_hooks=["resid.7"])
