"""A collection someone else wrote is untrusted input: names stay inside the root, reads are
bounded by what the manifest declares, printed names cannot drive the terminal."""

from __future__ import annotations

import json
import os
import shutil
import struct
import threading
from pathlib import Path

import pytest
import torch
from synthetic import HOOK, make_collection

from saesweep import Reader
from saesweep.errors import UserError
from saesweep.evaluate.downstream import rebuild_sequences
from saesweep.format.collection import read_collection
from saesweep.format.shards import decode_shard, encode_shard
from saesweep.shell import main as shell_main
from saesweep.store import FileStore

SIZES = [50, 60]


def collection(tmp_path: Path) -> tuple[Path, dict]:
    root = tmp_path / "coll"
    make_collection(str(root), SIZES)
    return root, json.loads((root / HOOK / "metadata.json").read_text())


def rewrite(root: Path, meta: dict) -> None:
    (root / HOOK / "metadata.json").write_text(json.dumps(meta))


def test_shard_name_leaving_the_root_is_refused(tmp_path):
    root, meta = collection(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(root / HOOK / meta["shards"][0]["name"], outside / "x.safetensors")
    meta["shards"][0]["name"] = "../../outside/x.safetensors"
    rewrite(root, meta)
    for read in (lambda: list(Reader(str(root))), lambda: read_collection(str(root), None)):
        with pytest.raises(UserError, match=r"metadata.json has shards\[0\].name '../../outside"):
            read()


def test_hook_field_must_be_its_directory(tmp_path):
    root, meta = collection(tmp_path)
    other = tmp_path / "abs"
    shutil.copytree(root / HOOK, other)
    rewrite(root, meta | {"hook": str(other)})
    with pytest.raises(UserError, match=f"names hook '{other}', not the directory '{HOOK}'"):
        Reader(str(root))


def test_part_file_names_are_checked(tmp_path):
    root, _ = collection(tmp_path)
    (root / HOOK / "metadata.json").unlink()
    part_path = root / "parts" / "machine-0000-of-0001.json"
    part = json.loads(part_path.read_text())
    part["hooks"]["../.."] = part["hooks"].pop(HOOK)
    part_path.write_text(json.dumps(part))
    assert shell_main([str(root), "sizecheck"]) == 2


def test_file_store_keys_stay_inside_the_root(tmp_path):
    root, meta = collection(tmp_path)
    (tmp_path / "secret").write_bytes(b"secret")
    (root / HOOK / "link.safetensors").symlink_to(tmp_path / "secret")
    store = FileStore(root)
    for key in ("../secret", f"{HOOK}/../../secret", str(tmp_path / "secret")):
        with pytest.raises(UserError, match="leads outside the store"):
            store.get(key)
    with pytest.raises(UserError, match="symlink out of it"):
        store.get(f"{HOOK}/link.safetensors")
    assert store.get(f"{HOOK}/{meta['shards'][0]['name']}")[:8]


def test_a_fifo_in_the_collection_is_refused_without_hanging(tmp_path):
    root, _ = collection(tmp_path)
    os.mkfifo(root / HOOK / "pipe")
    got = []
    reader = threading.Thread(
        target=lambda: got.append(_error(lambda: FileStore(root).get(f"{HOOK}/pipe"))),
        daemon=True,
    )
    reader.start()
    reader.join(10)
    assert not reader.is_alive()
    assert isinstance(got[0], OSError) and "not a regular file" in str(got[0])


def _error(call) -> BaseException | None:
    try:
        call()
    except BaseException as err:
        return err
    return None


def test_safetensors_header_over_100_mb_is_refused():
    acts = encode_shard(torch.zeros(2, 4), torch.zeros(2), torch.zeros(2), torch.zeros(2))
    (length,) = struct.unpack("<Q", acts[:8])
    header = json.loads(acts[8 : 8 + length])
    header["__metadata__"]["pad"] = "x" * 100_000_000
    big = json.dumps(header).encode()
    data = struct.pack("<Q", len(big)) + big + acts[8 + length :]
    with pytest.raises(ValueError, match="is not a safetensors file"):
        decode_shard(data, ("acts",))
    assert decode_shard(acts, ("acts",))["acts"].shape == (2, 4)


def test_rebuilt_sequences_are_at_most_ctx_len(tmp_path):
    n = 100
    tensors = {
        "seq_ids": torch.cat([torch.zeros(n), torch.ones(10)]).long(),
        "positions": torch.cat([torch.arange(n), torch.arange(10)]).int(),
        "token_ids": torch.arange(n + 10).int(),
    }
    seqs = rebuild_sequences(tensors, None, False, ctx_len=64)
    assert [(s.seq_id, len(s.input_ids)) for s in seqs] == [(1, 10)]


def test_printed_names_cannot_drive_the_terminal(tmp_path, capsys):
    root, meta = collection(tmp_path)
    fake = "x\x1b[2K\rverified 2 shards in 1 hook(s): all ok"
    (root / HOOK / f"{fake}.safetensors").write_bytes(b"0")
    assert shell_main([str(root), f"ls {HOOK}"]) == 0
    meta["shards"][1]["name"] = fake
    rewrite(root, meta)
    assert shell_main([str(root), "verify"]) == 2
    out, err = capsys.readouterr()
    assert "\x1b" not in out + err and "\r" not in out + err
    assert "x\\x1b[2K\\rverified" in out and "x\\x1b[2K\\rverified" in err


def crafted_shard(root: Path, meta: dict, change) -> None:
    """Shard 0 with its safetensors header changed by `change` (a function of the parsed
    header), listed in the manifest with its new size and checksum, as a crafted collection
    would be."""
    from saesweep.format.shards import checksum

    path = root / HOOK / meta["shards"][0]["name"]
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.dumps(change(json.loads(data[8 : 8 + length]))).encode()
    crafted = struct.pack("<Q", len(header)) + header + data[8 + length :]
    path.write_bytes(crafted)
    meta["shards"][0] |= {"n_bytes": len(crafted), "checksum": checksum(crafted)}
    rewrite(root, meta)


SHAPE = r"('acts' are not lists of integers|acts has shape \[.*\], but the manifest says 50 rows)"
"""The Reader checks the header's shape itself; the other readers check the rows first."""


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda h: [h], "its safetensors header is not a JSON object"),
        (lambda h: h | {"acts": h["acts"] | {"shape": [-50, -4]}}, SHAPE),
        (lambda h: h | {"acts": h["acts"] | {"shape": [50.0, 4]}}, SHAPE),
        (lambda h: h | {"acts": h["acts"] | {"data_offsets": ["0", "9"]}}, "'acts' are not"),
        (lambda h: h | {"acts": h["acts"] | {"data_offsets": [0]}}, "'acts' are not lists of"),
    ],
)
def test_a_crafted_shard_header_is_one_sentence_naming_the_shard(tmp_path, change, message):
    root, meta = collection(tmp_path)
    crafted_shard(root, meta, change)
    name = meta["shards"][0]["name"]
    for read in (
        lambda: list(Reader(str(root))),
        lambda: read_collection(str(root), None, ":", names=("acts",)),
    ):
        with pytest.raises(UserError, match=f"{name}.*{message}.*; recollect it") as err:
            read()
        assert "\n" not in str(err.value)
    assert shell_main([str(root), f"inspect {HOOK}/{name}"]) == 1


def test_verify_checks_each_shards_rows_against_the_manifest(tmp_path, capsys):
    root, meta = collection(tmp_path)
    meta["shards"][1]["n_tokens"] = 10**15
    meta["n_tokens"] = SIZES[0] + 10**15
    rewrite(root, meta)
    assert shell_main([str(root), "verify"]) == 1
    out = capsys.readouterr().out
    name = meta["shards"][1]["name"]
    assert f"BAD {HOOK}/{name}: acts has shape [{SIZES[1]}, 16], but the manifest says " in out
    assert "1,000,000,000,000,000 rows" in out and "verified 2 shards in 1 hook(s): 1 BAD" in out


def test_crafted_token_ids_and_a_deep_header_are_one_sentence(tmp_path):
    root, meta = collection(tmp_path)
    name = meta["shards"][0]["name"]

    def five_ids(header: dict) -> dict:  # 5 ids, offsets to match, where 50 tokens are listed
        start = header["token_ids"]["data_offsets"][0]
        return header | {
            "token_ids": {"dtype": "I32", "shape": [5], "data_offsets": [start, start + 20]}
        }

    crafted_shard(root, meta, five_ids)
    with pytest.raises(UserError, match=f"{name} holds token_ids \\[5\\] torch.int32, but"):
        list(Reader(str(root)))
    deep = b"[" * 100_000
    with pytest.raises(ValueError, match="is not a safetensors file"):
        decode_shard(struct.pack("<Q", len(deep)) + deep, ("acts",))
