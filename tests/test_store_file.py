"""The Store contract, checked on the local FileStore (test_store_s3 reuses it on S3)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from saesweep.errors import UserError
from saesweep.store import FileStore, Store, open_store


def exercise_store(store: Store, tmp_path: Path) -> None:
    """Round-trip every Store method and assert on the values it returns."""
    data = os.urandom(1000)
    store.put("acts/shard-0.bin", data)
    store.put("acts/shard-1.bin", b"one")
    store.put("actsx/other.bin", b"other")
    store.put_json("acts/metadata.json", {"d_model": 4, "shards": ["shard-0"]})
    assert store.get("acts/shard-0.bin") == data
    assert store.get_range("acts/shard-0.bin", 10, 25) == data[10:25]
    assert store.get_range("acts/shard-0.bin", 990, 1000) == data[990:]
    assert store.get_range("acts/shard-0.bin", 7, 7) == b""
    assert store.get_json("acts/metadata.json") == {"d_model": 4, "shards": ["shard-0"]}
    assert store.exists("acts/shard-1.bin") and not store.exists("acts/shard-9.bin")
    assert store.size("acts/shard-0.bin") == 1000
    assert store.list("acts") == ["acts/metadata.json", "acts/shard-0.bin", "acts/shard-1.bin"]
    assert store.list() == store.list("acts") + ["actsx/other.bin"]
    assert store.list("nothing-here") == []
    sizes = {"acts/metadata.json": store.size("acts/metadata.json"), "acts/shard-0.bin": 1000}
    assert store.list_sizes("acts") == sizes | {"acts/shard-1.bin": 3}
    assert store.list_sizes("actsx") == {"actsx/other.bin": 5}
    store.put("acts/shard-1.bin", b"replaced")
    assert store.get("acts/shard-1.bin") == b"replaced"
    src = tmp_path / "upload.bin"
    src.write_bytes(data[::-1])
    store.put_file("acts/from-file.bin", src)
    assert store.get("acts/from-file.bin") == data[::-1]
    store.delete("acts/shard-1.bin")
    store.delete("acts/never-written.bin")
    assert not store.exists("acts/shard-1.bin")
    assert "acts/shard-1.bin" not in store.list()
    with pytest.raises(FileNotFoundError):
        store.get("acts/shard-1.bin")
    with pytest.raises(FileNotFoundError):
        store.size("acts/shard-1.bin")
    assert store.child("acts/x") == store.uri.rstrip("/") + "/acts/x"
    exercise_object_reader(store, "acts/shard-0.bin", data)


def exercise_object_reader(store: Store, key: str, data: bytes) -> None:
    """Whole objects through store.object_reader(): mapped, or received into the buffer."""
    objects = store.object_reader(n_loops=2, connections=4)
    buffer = memoryview(bytearray(len(data) + 100))
    for _ in range(3):  # every event loop (taken in turn) or mapping thread alike
        into = None if store.maps_objects else buffer
        assert bytes(objects.read(key, len(data), into)) == data
        if into is not None:
            assert bytes(buffer[: len(data)]) == data
    objects.close()


def test_file_store_contract(tmp_path):
    exercise_store(FileStore(tmp_path / "root"), tmp_path)


def test_open_store_paths(tmp_path):
    assert open_store(str(tmp_path)).uri == f"file://{tmp_path.resolve()}"
    assert open_store(f"file://{tmp_path}").uri == f"file://{tmp_path.resolve()}"


def test_failed_put_file_leaves_previous_object_and_no_temp_files(tmp_path):
    store = FileStore(tmp_path / "root")
    store.put("a/b.bin", b"old")
    with pytest.raises(FileNotFoundError):
        store.put_file("a/b.bin", tmp_path / "missing-source.bin")
    assert store.get("a/b.bin") == b"old"
    assert sorted(p.name for p in (tmp_path / "root" / "a").iterdir()) == ["b.bin"]


def test_unwritable_path_is_a_user_error():
    with pytest.raises(UserError, match="cannot write /proc/saesweep-test/a/k"):
        FileStore(Path("/proc/saesweep-test/a")).put("k", b"x")
