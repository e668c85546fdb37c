"""Fetching whole shards, verified against their checksums.

Local files are mapped read-only straight from the page cache (MAP_POPULATE: mapped and read
in before they are handed out, so the trainer never waits on the disk). S3 shards are received
into arena slots (data.pipeline.S3Pipeline).

status is "ok", "corrupt" (checksum still wrong after one refetch) or an error sentence.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Callable
from pathlib import Path

from saesweep.errors import UserError
from saesweep.format.shards import shard_problem
from saesweep.store.file import open_regular

MAP_POPULATE = getattr(mmap, "MAP_POPULATE", 0)
"""Linux: read a mapping in when it is made (elsewhere pages are read on first use)."""


def verified(fetch: Callable[[], object], record: dict) -> tuple[object | None, str]:
    """(buffer, status) of `fetch()` for a shard's manifest record; a mismatch is fetched once
    more before calling it corrupt."""
    buf = None
    for _ in range(2):
        try:
            buf = fetch()
        except UserError:  # the store is away or refuses us: no shard's fault
            raise
        except Exception as err:  # reported to the reader, which names the shard
            return None, str(err) or type(err).__name__
        if shard_problem(buf, record) is None:
            return buf, "ok"
    return buf, "corrupt"


def map_file(path: Path, n_bytes: int) -> mmap.mmap:
    """A read-only, populated mapping of a local shard of `n_bytes` bytes."""
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        if size != n_bytes:  # checked before the mapping reads anything in
            raise OSError(f"{path} holds {size} bytes, its manifest says {n_bytes}")
        return mmap.mmap(f.fileno(), 0, flags=mmap.MAP_SHARED | MAP_POPULATE, prot=mmap.PROT_READ)
