"""Shard format, checksums and exact running statistics (see docs/storage-format.md)."""

from __future__ import annotations

import json
import math
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import xxhash
from safetensors.torch import save as save_safetensors

from saesweep.format.quant import HELD_DTYPE, SCALED_DTYPES, dequantize

SCHEMA_VERSION = 1
"""Schema version of collections whose activations are plain floats."""
SCALED_SCHEMA_VERSION = 2
"""Schema version of collections with scaled 8-bit activations (a `scales` tensor per shard),
which a reader of version 1 would misread."""
KNOWN_SCHEMA_VERSIONS = (SCHEMA_VERSION, SCALED_SCHEMA_VERSION)
SAFETENSORS_DTYPES = {
    "F8_E4M3": torch.float8_e4m3fn,
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "I32": torch.int32,
    "I64": torch.int64,
}
"""safetensors dtype codes of the tensors a shard holds."""
ACT_DTYPES = {
    **{str(t).removeprefix("torch."): t for t in (torch.bfloat16, torch.float16, torch.float32)},
    **SCALED_DTYPES,
}
"""Activation dtypes a collection may store, by their names in metadata.json."""
SHARD_TENSORS = ("acts", "scales", "token_ids", "seq_ids", "positions")
ID_BYTES_PER_TOKEN = 4 + 8 + 4
"""token_ids (int32), seq_ids (int64) and positions (int32) of one stored token."""
MAX_HEADER_BYTES = 100_000_000
"""The longest safetensors header read (the safetensors library's own limit)."""
SEQ_CHUNK_BITS = 20
"""seq_ids = document index << SEQ_CHUNK_BITS | chunk index within the document."""


def checksum(data: bytes | memoryview) -> str:
    """The checksum recorded for a shard: xxh3-128 of its bytes, as 'xxh3_128:<hex>'."""
    return "xxh3_128:" + xxhash.xxh3_128_hexdigest(data)


def file_checksum(path: Path, chunk: int = 16 << 20) -> str:
    """`checksum` of the file at `path`, read in chunks (bounded memory)."""
    digest = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return "xxh3_128:" + digest.hexdigest()


def shard_name(machine: int, index: int) -> str:
    return f"shard-m{machine:04d}-{index:06d}.safetensors"


def schema_version(act_dtype: str) -> int:
    """The schema version of a collection storing activations as `act_dtype`."""
    return SCALED_SCHEMA_VERSION if act_dtype in SCALED_DTYPES else SCHEMA_VERSION


def held_dtype(act_dtype: str) -> torch.dtype:
    """The dtype activations are held in before they are written as `act_dtype`."""
    return HELD_DTYPE if act_dtype in SCALED_DTYPES else ACT_DTYPES[act_dtype]


def bytes_per_token(act_dtype: str, d_model: int) -> int:
    """Stored bytes of one token of a hook (headers aside): acts, scale, ids."""
    scale = 4 if act_dtype in SCALED_DTYPES else 0
    return d_model * ACT_DTYPES[act_dtype].itemsize + scale + ID_BYTES_PER_TOKEN


def encode_shard(
    acts: torch.Tensor,
    token_ids: torch.Tensor,
    seq_ids: torch.Tensor,
    positions: torch.Tensor,
    scales: torch.Tensor | None = None,
) -> bytes:
    """Serialize one shard to safetensors bytes (`scales` [n] float32 with scaled 8-bit
    `acts`, see format.quant)."""
    tensors = {
        "acts": acts.contiguous(),
        "token_ids": token_ids.to(torch.int32).contiguous(),
        "seq_ids": seq_ids.to(torch.int64).contiguous(),
        "positions": positions.to(torch.int32).contiguous(),
    }
    version = SCHEMA_VERSION
    if scales is not None:
        tensors["scales"] = scales.to(torch.float32).contiguous()
        version = SCALED_SCHEMA_VERSION
    return save_safetensors(tensors, metadata={"schema_version": str(version)})


def safetensors_header(data, where: str) -> tuple[dict, int]:
    """The JSON header of safetensors bytes (8-byte little-endian length, then JSON) and the
    offset where the tensor data starts. The length is checked before anything is read."""
    try:
        (length,) = struct.unpack("<Q", data[:8])
        if length > min(len(data) - 8, MAX_HEADER_BYTES):
            raise ValueError
        header = json.loads(bytes(data[8 : 8 + length]))
    except (struct.error, ValueError, RecursionError) as err:
        raise ValueError(f"{where} is not a safetensors file") from err
    if not isinstance(header, dict):
        raise ValueError(f"{where}: its safetensors header is not a JSON object")
    return header, 8 + length


def decode_shard(
    data, names: tuple[str, ...] | None = None, where: str = "the shard", raw: bool = False
) -> dict[str, torch.Tensor]:
    """Tensors `names` (default: all) of safetensors bytes `data`, as views of `data` (no copy:
    a read-only file mapping stays read-only). Scaled 8-bit `acts` come decoded to float32
    (a copy) unless `raw`."""
    header, data_start = safetensors_header(data, where)
    names = tuple(n for n in header if n != "__metadata__") if names is None else names
    tensors = {name: _tensor_view(data, data_start, header, name, where) for name in names}
    acts = tensors.get("acts")
    if acts is None or acts.dtype not in SCALED_DTYPES.values():
        return tensors
    scales = _tensor_view(data, data_start, header, "scales", where)
    if list(scales.shape) != [len(acts)] or scales.dtype != torch.float32:
        raise ValueError(
            f"{where} holds scales {list(scales.shape)} {scales.dtype}, but its acts need "
            f"[{len(acts)}] float32"
        )
    if raw:
        return tensors | {"scales": scales}
    return tensors | {"acts": dequantize(acts, scales)}


def _tensor_view(data, data_start: int, header: dict, name: str, where: str) -> torch.Tensor:
    info = header.get(name)
    if not isinstance(info, dict) or info.get("dtype") not in SAFETENSORS_DTYPES:
        raise ValueError(f"{where} holds no tensor {name!r} of a shard's dtypes")
    dtype, shape, offsets = (
        SAFETENSORS_DTYPES[info["dtype"]],
        info.get("shape"),
        info.get("data_offsets"),
    )
    if not _counts(shape) or not (_counts(offsets) and len(offsets) == 2):
        raise ValueError(
            f"{where}: the header's shape or data_offsets of {name!r} are not lists of "
            "integers of 0 or more"
        )
    (start, end), n_bytes = offsets, math.prod(shape) * dtype.itemsize
    if end - start != n_bytes or data_start + end > len(data):
        raise ValueError(f"{where}: the header's shape or offsets of {name!r} do not fit the file")
    with warnings.catch_warnings():  # read-only file mappings: the views are only read
        warnings.filterwarnings("ignore", "The given buffer is not writable")
        flat = torch.frombuffer(
            data, dtype=dtype, count=n_bytes // dtype.itemsize, offset=data_start + start
        )
    return flat.view(shape)


def _counts(value) -> bool:
    """Whether `value` is a list of integers (not booleans) of 0 or more."""
    return isinstance(value, list) and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
    )


def shard_problem(data, record: dict) -> str | None:
    """Why shard bytes differ from their manifest record (n_bytes, checksum), or None."""
    if len(data) != record["n_bytes"]:
        return f"size {len(data):,} bytes, manifest n_bytes {record['n_bytes']:,}"
    found = checksum(data)
    if found != record["checksum"]:
        return f"checksum mismatch (manifest {record['checksum']}, file {found})"
    return None


def rows_problem(data, record: dict) -> str | None:
    """Why a shard whose bytes match its record does not hold the record's n_tokens rows in
    every tensor its header lists (or has no readable header), or None."""
    try:
        header, _ = safetensors_header(data, "the file")
    except ValueError as err:
        return str(err)
    for name in (n for n in SHARD_TENSORS if n in header):
        shape = header[name].get("shape") if isinstance(header[name], dict) else None
        if not _counts(shape) or shape[:1] != [record["n_tokens"]]:
            return f"{name} has shape {shape}, but the manifest says {record['n_tokens']:,} rows"
    return None


@dataclass
class RunningStats:
    """Exact per-dimension mean and variance in float64, mergeable across shards and machines.

    Merging uses Chan et al.'s parallel formula, which includes each part's own sum of
    squared deviations (m2), so the result equals a single pass over all tokens.
    """

    n: int
    mean: np.ndarray
    m2: np.ndarray
    norm_sum: float

    @classmethod
    def empty(cls, d: int) -> RunningStats:
        return cls(0, np.zeros(d), np.zeros(d), 0.0)

    @classmethod
    def of(cls, acts: torch.Tensor) -> RunningStats:
        x = acts.to(torch.float64)
        mean = x.mean(0) if len(x) else torch.zeros(x.shape[1], dtype=torch.float64)
        m2 = ((x - mean) ** 2).sum(0)
        return cls(len(x), mean.numpy(), m2.numpy(), float(x.norm(dim=1).sum()))

    def merge(self, other: RunningStats) -> RunningStats:
        n = self.n + other.n
        if n == 0:
            return self
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.n / n)
        m2 = self.m2 + other.m2 + delta**2 * (self.n * other.n / n)
        return RunningStats(n, mean, m2, self.norm_sum + other.norm_sum)

    def to_json(self) -> dict:
        return {
            "n": self.n,
            "mean": self.mean.tolist(),
            "m2": self.m2.tolist(),
            "norm_sum": self.norm_sum,
        }

    @classmethod
    def from_json(cls, obj: dict) -> RunningStats:
        return cls(
            obj["n"],
            np.asarray(obj["mean"], dtype=np.float64),
            np.asarray(obj["m2"], dtype=np.float64),
            float(obj["norm_sum"]),
        )

    def summary(self) -> dict:
        """The statistics.json body: population std (ddof=0) and mean L2 norm per token."""
        n = max(self.n, 1)
        return {
            "schema_version": SCHEMA_VERSION,
            "n": self.n,
            "mean": self.mean.tolist(),
            "std": np.sqrt(self.m2 / n).tolist(),
            "mean_norm": self.norm_sum / n,
            "m2": self.m2.tolist(),
        }
