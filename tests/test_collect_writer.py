"""The shard writer commits whole shards strictly in order, none after a failed one, and a
part whose shards have a gap is refused on resume."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from saesweep.collect.writer import PendingShard, ShardWriter
from saesweep.errors import UserError
from saesweep.format.manifest import HookPart, Part, load_part, part_key
from saesweep.format.shards import shard_name
from saesweep.store.file import FileStore


class OneFailingPut(FileStore):
    """A real local store whose write of one shard fails, but only after the next shard's
    write is whole (as when one S3 PUT exhausts its retries while the next one succeeds)."""

    def __init__(self, root: Path, failing: str, after: str):
        super().__init__(root)
        self.failing, self.after = failing, after
        self.after_written = threading.Event()

    def put(self, key: str, data: bytes) -> None:
        if key.endswith(self.failing):
            assert self.after_written.wait(timeout=60)
            raise UserError(f"writing {key} failed")
        super().put(key, data)
        if key.endswith(self.after):
            self.after_written.set()


def shard(index: int, n: int = 10) -> PendingShard:
    return PendingShard(
        index,
        seq_end=index + 1,
        acts={"h": [torch.full((n, 4), float(index))]},
        token_ids=[torch.zeros(n, dtype=torch.int64)],
        seq_ids=[torch.full((n,), index, dtype=torch.int64)],
        positions=[torch.arange(n)],
    )


def test_no_shard_after_a_failed_one_is_committed(tmp_path):
    store = OneFailingPut(tmp_path, "shard-m0000-000002.safetensors", "000003.safetensors")
    committed = []
    writer = ShardWriter(
        store, {"h": "h"}, 0, 2, 2, lambda w: committed.append(w.index), torch.float32
    )
    with pytest.raises(UserError, match="shard-m0000-000002.safetensors failed"):
        try:  # the collection loop's shape: submit until an error, then close in `finally`
            for i in range(6):
                writer.submit(shard(i))
        finally:
            writer.close()
    assert committed == [0, 1]
    assert (tmp_path / "h/shard-m0000-000003.safetensors").exists()  # written, not committed


def test_a_part_with_a_gap_in_its_shards_is_refused(tmp_path):
    store = FileStore(tmp_path)
    names = [shard_name(0, i) for i in (0, 1, 3)]
    hook = HookPart([{"name": n, "n_tokens": 10} for n in names])
    store.put_json(part_key(0, 1), Part(0, 1, hooks={"h": hook}).to_json())
    with pytest.raises(UserError, match="lists h shards out of sequence"):
        load_part(store, 0, 1)
