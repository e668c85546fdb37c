"""An opened collection: its manifests read once, hook lookup, shard slices, verified reads.

Everything that reads a collection's shards goes through a Collection: the Reader (whole
shards fetched ahead through the store's ObjectReader: local files mapped, S3 objects received
by range GETs), evaluation (feature pages, absorption, downstream fidelity) and the collection
shell. A shard is used only after its size and checksum match its manifest record.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass
from functools import cached_property

import torch

from saesweep.configtools import parse_slice
from saesweep.errors import UserError
from saesweep.format.manifest import choose_hook, list_hooks, read_statistics
from saesweep.format.quant import is_scaled
from saesweep.format.shards import ACT_DTYPES, decode_shard, rows_problem, shard_problem
from saesweep.store import Store, open_store
from saesweep.store.base import ObjectReader

Buffer = bytes | memoryview | mmap.mmap
StoredRows = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]
"""A shard's acts [n_tokens, d_model] as stored, token ids, and (scaled acts) scales."""


@dataclass(frozen=True)
class HookShards:
    """One hook of a collection (its metadata.json) and the shards chosen from its manifest."""

    meta: dict
    shards: list[dict]

    @property
    def hook(self) -> str:
        return self.meta["hook"]

    @property
    def d_model(self) -> int:
        return self.meta["d_model"]

    @property
    def stored_dtype(self) -> torch.dtype:
        return ACT_DTYPES[self.meta["dtype"]]

    @property
    def scaled(self) -> bool:
        """Whether the acts are 8-bit with a scale per token (a `scales` tensor per shard)."""
        return is_scaled(self.stored_dtype)

    def key(self, shard: int) -> str:
        """The store key of chosen shard `shard`."""
        return f"{self.hook}/{self.shards[shard]['name']}"


@dataclass(frozen=True)
class HookTensors:
    """Tensors of one hook's chosen shards, concatenated in manifest order."""

    meta: dict
    config: dict
    """The collection config cfg.json records ({} without one)."""
    tensors: dict[str, torch.Tensor]


class Collection:
    """The collection at one store: hook metadata read once, shards read verified.

    `uri` is the collection as the user named it (in messages)."""

    def __init__(self, store: Store, uri: str | None = None):
        self.store = store
        self.uri = uri or store.uri

    @classmethod
    def open(cls, uri: str, anonymous: bool = False) -> Collection:
        """The collection at `uri` (`anonymous`: see open_store)."""
        return cls(open_store(uri, anonymous), uri)

    @cached_property
    def hooks(self) -> list[dict]:
        """metadata.json of every hook."""
        return list_hooks(self.store)

    @cached_property
    def config(self) -> dict:
        """The collection config cfg.json records ({} without one)."""
        has_cfg = self.store.exists("cfg.json")
        return self.store.get_json("cfg.json").get("config", {}) if has_cfg else {}

    def hook(self, hook: str | None = None, layer: int | None = None) -> dict:
        """The metadata of the one complete hook matching `hook` (path or short form) and/or
        `layer` (neither: the only hook)."""
        return choose_hook(self.store.uri, self.hooks, hook, layer)

    def statistics(self, hook: str) -> dict:
        """The hook's statistics.json (a UserError without one)."""
        return read_statistics(self.store, hook)

    def choose(self, meta: dict, shards: slice | str = ":") -> HookShards:
        """The hook `meta` with the shards `shards` selects (a slice, or one as text: ':-1');
        selecting none is a UserError."""
        chosen = shards if isinstance(shards, slice) else parse_slice(shards)
        hook = HookShards(meta, meta["shards"][chosen])
        if not hook.shards:
            raise UserError(
                f"the shard slice [{_text(chosen.start)}:{_text(chosen.stop)}] of {self.uri} "
                f"selects none of its {len(meta['shards'])} shards; collect more or change "
                "the shard slice"
            )
        return hook

    def check_same_tokens(self, first: dict, other: dict) -> None:
        """Refuse a hook (metadata `other`) whose shards hold other numbers of tokens than
        those of `first`: they were not collected together, so row i would not be the same
        token."""
        a, b = ([s["n_tokens"] for s in m["shards"]] for m in (first, other))
        if a != b:
            raise UserError(
                f"hooks {first['hook']} and {other['hook']} of {self.uri} store different "
                f"tokens ({sum(a):,} in {len(a)} shards against {sum(b):,} in {len(b)}); read "
                "hooks collected together, in one collection run"
            )

    def shard_uri(self, key: str) -> str:
        return self.store.child(key)

    def shard_problem(self, key: str, record: dict) -> str | None:
        """Why the shard at `key` does not match its manifest record (size, checksum, rows;
        'missing'), or None when it does."""
        try:
            return self._checked_bytes(key, record)[1]
        except FileNotFoundError:
            return "missing"

    def _checked_bytes(self, key: str, record: dict) -> tuple[bytes | None, str | None]:
        """(the shard's bytes, None) when they match the record, else (None or the bytes,
        the problem); a wrong size is found before anything is read."""
        size = self.store.size(key)
        if size != record["n_bytes"]:
            return None, f"size {size:,} bytes, manifest n_bytes {record['n_bytes']:,}"
        data = self.store.get(key)
        return data, shard_problem(data, record) or rows_problem(data, record)

    def read_shard(self, hook: HookShards, shard: int, names: tuple[str, ...]) -> dict:
        """Tensors `names` of chosen shard `shard` (scaled acts decoded), verified first."""
        key = hook.key(shard)
        where = f"shard {self.shard_uri(key)}"
        data, problem = self._checked_bytes(key, hook.shards[shard])
        if problem is not None:
            raise UserError(f"{where} does not match its manifest ({problem}); recollect it")
        try:
            return decode_shard(data, names, where)
        except ValueError as err:
            raise UserError(f"{err}; recollect it") from None

    def read(self, hook: HookShards, names: tuple[str, ...] = ()) -> HookTensors:
        """token_ids, seq_ids, positions (plus `names`, e.g. 'acts') of the chosen shards."""
        keep = ("token_ids", "seq_ids", "positions", *names)
        parts = [self.read_shard(hook, s, keep) for s in range(len(hook.shards))]
        tensors = {k: torch.cat([p[k] for p in parts]) for k in keep}
        return HookTensors(hook.meta, self.config, tensors)

    def fetch(
        self, objects: ObjectReader, hook: HookShards, shard: int, into: memoryview | None
    ) -> tuple[Buffer | None, str]:
        """(bytes, status) of chosen shard `shard` read whole by `objects`: status is "ok",
        "corrupt" (its checksum still wrong after a second read) or why it could not be read.
        A store that is away or refuses us raises (no shard's fault)."""
        record, buf = hook.shards[shard], None
        for _ in range(2):
            try:
                buf = objects.read(hook.key(shard), record["n_bytes"], into)
            except UserError:
                raise
            except Exception as err:  # reported to the reader, which names the shard
                return None, str(err) or type(err).__name__
            if shard_problem(buf, record) is None:
                return buf, "ok"
        return buf, "corrupt"

    def stored_rows(self, hook: HookShards, shard: int, data: Buffer) -> StoredRows:
        """Views of fetched shard bytes: acts as stored, token ids, scales (scaled acts),
        their shapes and dtypes checked against the manifest."""
        record = hook.shards[shard]
        where = f"shard {self.shard_uri(hook.key(shard))}"
        try:
            tensors = decode_shard(data, ("acts", "token_ids"), where, raw=True)
        except ValueError as err:
            raise UserError(f"{err}; recollect it") from None
        acts, ids = tensors["acts"], tensors["token_ids"]
        expected = [record["n_tokens"], hook.d_model]
        if list(acts.shape) != expected or acts.dtype != hook.stored_dtype:
            raise UserError(
                f"{where} holds acts {list(acts.shape)} {acts.dtype}, but metadata.json says "
                f"{expected} {hook.stored_dtype}; recollect it"
            )
        if list(ids.shape) != expected[:1] or ids.dtype != torch.int32:
            raise UserError(
                f"{where} holds token_ids {list(ids.shape)} {ids.dtype}, but metadata.json says "
                f"[{record['n_tokens']}] int32; recollect it"
            )
        return acts, ids, tensors.get("scales")


def read_collection(
    uri: str,
    hook: str | None,
    shards: str = ":",
    names: tuple[str, ...] = (),
    anonymous: bool = False,
) -> HookTensors:
    """token_ids, seq_ids, positions (plus `names`) of the shards `shards` selects of one hook
    of the collection at `uri`, checksums verified (`anonymous`: see open_store)."""
    collection = Collection.open(uri, anonymous)
    return collection.read(collection.choose(collection.hook(hook), shards), names)


def _text(bound: int | None) -> str:
    return "" if bound is None else str(bound)
