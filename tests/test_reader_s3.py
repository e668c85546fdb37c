"""The Reader on a real SeaweedFS S3 server: exactly once, same order as local, resume,
a server restart mid-epoch, corrupt shards (no mocks)."""

from __future__ import annotations

import threading

import pytest
import torch
from synthetic import HOOK, make_collection, read_index

from saesweep import Reader
from saesweep.errors import UserError
from saesweep.format.shards import shard_name
from saesweep.store import open_store

SIZES = [300, 250, 310, 90, 400, 120, 280, 330]
TOTAL = sum(SIZES)
SMALL = {"batch_size": 64, "shuffle_tokens": 500, "prefetch_shards": 2, "prefetch_batches": 2}
DTYPES = [torch.float32, torch.float8_e4m3fn]
"""Stored dtypes the fault tests run on: plain floats, and scaled 8-bit floats."""


def token_index(batches) -> list[int]:
    return [int(v) for b in batches for v in b[:, 0].tolist()]


def read(uri: str, **kw) -> list[int]:
    return token_index(Reader(uri, **{**SMALL, **kw}))


@pytest.fixture
def s3_coll(s3_env) -> str:
    make_collection(s3_env, SIZES)
    return s3_env


def test_s3_every_token_once_in_the_local_order(s3_coll, tmp_path):
    make_collection(str(tmp_path), SIZES)
    for kw in ({"seed": 4}, {"seed": 4, "epochs": 2}, {"shuffle": False}):
        from_s3 = read(s3_coll, **kw)
        assert sorted(from_s3[:TOTAL]) == list(range(TOTAL))
        assert from_s3 == read(str(tmp_path), **kw)


@pytest.mark.parametrize("stop_after", [2, 17])
def test_s3_resume_continues_exactly(s3_coll, stop_after):
    full = read(s3_coll, seed=9, epochs=2)
    reader = Reader(s3_coll, seed=9, epochs=2, **SMALL)
    head = []
    for i, batch in enumerate(reader):
        head.append(batch)
        if i + 1 == stop_after:
            break
    resumed = Reader(s3_coll, seed=9, epochs=2, **SMALL)
    resumed.load_state_dict(reader.state_dict())
    assert token_index(head) + token_index(resumed) == full


@pytest.mark.parametrize("dtype", DTYPES)
def test_s3_server_restart_mid_epoch(s3_env, s3_server, dtype):
    sizes = [200] * 24
    make_collection(s3_env, sizes, dtype=dtype)
    kw = {"seed": 2, **SMALL, "shuffle_tokens": 200}
    expected = read_index(s3_env, **kw)
    restart = threading.Timer(1.5, s3_server.start)
    got = []
    try:
        for i, (_, ids) in enumerate(Reader(s3_env, with_token_ids=True, **kw)):
            got += ids.tolist()
            if i == 2:
                s3_server.stop()
                restart.start()
    finally:
        if restart.is_alive():
            restart.join()
        if s3_server.proc.poll() is not None:
            s3_server.start()
    assert restart.finished.is_set()
    assert got == expected
    assert sorted(expected) == list(range(sum(sizes)))


def corrupt_on_s3(uri: str, shard: int) -> str:
    store = open_store(uri)
    key = f"{HOOK}/{shard_name(0, shard)}"
    data = bytearray(store.get(key))
    data[-10:] = b"\xff" * 10
    store.put(key, bytes(data))
    return shard_name(0, shard)


@pytest.mark.parametrize("dtype", DTYPES)
def test_s3_corrupt_shard_raises_or_skips(s3_env, dtype):
    make_collection(s3_env, SIZES, dtype=dtype)
    s3_coll = s3_env
    name = corrupt_on_s3(s3_coll, 2)
    with pytest.raises(UserError, match=name):
        read_index(s3_coll)
    reader = Reader(s3_coll, on_corrupt="skip", with_token_ids=True, **SMALL)
    seen = sorted(i for _, ids in reader for i in ids.tolist())
    start = SIZES[0] + SIZES[1]
    assert seen == [t for t in range(TOTAL) if not start <= t < start + SIZES[2]]
    assert reader.figures()["reader/corrupt_skipped"] == 1
    assert reader.corrupt_skipped == [f"{s3_coll}/{HOOK}/{name}"]


def test_s3_read_ahead_that_cannot_fit_in_memory_is_refused(s3_coll):
    with pytest.raises(UserError, match=r"holds \d+ shards in memory .* lower shuffle_tokens"):
        Reader(s3_coll, batch_size=64, prefetch_shards=10**9, epochs=10**9)


def test_an_outage_longer_than_ten_retries_is_waited_out(s3_env, s3_server):
    """30 s without the server: past the old fixed 10 attempts (at most ~24 s of backoff),
    inside the retry budget; the epoch then continues exactly."""
    sizes = [200] * 12
    make_collection(s3_env, sizes)
    kw = {"seed": 3, **SMALL, "shuffle_tokens": 200}
    expected = read(s3_env, **kw)
    restart = threading.Timer(30, s3_server.start)
    got = []
    try:
        for i, batch in enumerate(Reader(s3_env, **kw)):
            got.append(batch)
            if i == 1:
                s3_server.stop()
                restart.start()
    finally:
        restart.join()
        if s3_server.proc.poll() is not None:
            s3_server.start()
    assert token_index(got) == expected


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_store_away_past_the_retry_budget_is_named_unreachable(s3_env, s3_server, dtype):
    make_collection(s3_env, [200] * 12, dtype=dtype)
    reader = Reader(s3_env, **{**SMALL, "shuffle_tokens": 200}, retry_s=2.0)
    batches = iter(reader)
    next(batches)
    s3_server.stop()
    try:
        with pytest.raises(UserError, match="has not answered reads of .* for 2 s") as err:
            for _ in batches:
                pass
        assert "--train-data.retry-s" in str(err.value) and "recollect" not in str(err.value)
    finally:
        s3_server.start()


def test_s3_two_hooks_in_lockstep_in_the_local_order(s3_env, tmp_path):
    from test_reader import lockstep_rows

    for uri in (s3_env, str(tmp_path)):
        make_collection(uri, SIZES, target_d=12)
    kw = {**SMALL, "seed": 4, "epochs": 2, "hook": HOOK, "extra_hooks": ["resid.2"]}
    kw["with_token_ids"] = True
    reader = Reader(s3_env, **kw)
    from_s3 = lockstep_rows(reader)
    assert sorted(from_s3[:TOTAL]) == list(range(TOTAL))
    assert from_s3 == lockstep_rows(Reader(str(tmp_path), **kw))
    sizes = sum(s["n_bytes"] for h in reader.hooks for s in h.shards)
    assert reader.figures()["reader/bytes_read"] == 2 * sizes  # two epochs, each shard once
