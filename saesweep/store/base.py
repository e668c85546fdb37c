"""The storage interface every backend implements: flat keys under one root URI."""

from __future__ import annotations

import json
import mmap
from abc import ABC, abstractmethod
from pathlib import Path

from saesweep.errors import UserError


class ObjectReader(ABC):
    """Whole objects read for a consumer that holds them a while (the Reader's shards): mapped
    where they lie (local files, no copy) or received into a buffer the consumer provides
    (see Store.maps_objects)."""

    @abstractmethod
    def read(self, key: str, n_bytes: int, into: memoryview | None) -> memoryview | mmap.mmap:
        """The `n_bytes` bytes of the object at `key`: mapped (`into` is None) or received
        into `into`; a mapped object of another size is an OSError. Runs on many threads at
        once."""

    def close(self) -> None:
        """End running reads: nothing is written into a caller's buffer after this returns."""
        return None


class Store(ABC):
    """Objects addressed by '/'-separated keys relative to the store's root URI.

    Writes are all-or-nothing: after `put` returns the object is whole, and a failed
    `put` leaves either the previous object or none, never a partial one.
    """

    uri: str
    maps_objects: bool = False
    """Whether object_reader() maps objects where they lie (page cache, which the kernel can
    evict) rather than receiving them into buffers the consumer holds in memory."""

    @abstractmethod
    def put(self, key: str, data: bytes) -> None:
        """Write `data` to `key` atomically."""

    @abstractmethod
    def put_file(self, key: str, path: Path) -> None:
        """Write the file at `path` to `key` atomically (large objects: multipart)."""

    @abstractmethod
    def get(self, key: str) -> bytes:
        """Read a whole object; raises FileNotFoundError when absent."""

    @abstractmethod
    def get_range(self, key: str, start: int, end: int) -> bytes:
        """Read bytes [start, end) of an object."""

    @abstractmethod
    def object_reader(
        self, n_loops: int = 1, connections: int = 16, retry_s: float = 300.0
    ) -> ObjectReader:
        """An ObjectReader of this store's keys; remote stores receive with `n_loops`
        event-loop threads of up to `connections` connections each, retrying transient
        failures for up to `retry_s` seconds."""

    @abstractmethod
    def exists(self, key: str) -> bool:
        """Whether `key` holds an object."""

    @abstractmethod
    def size(self, key: str) -> int:
        """Size of the object in bytes; raises FileNotFoundError when absent."""

    @abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """Keys under `prefix` (recursively), sorted."""

    def list_sizes(self, prefix: str = "") -> dict[str, int]:
        """Size in bytes of every object under `prefix` (the keys `list(prefix)` gives)."""
        return {key: self.size(key) for key in self.list(prefix)}

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove `key` if present."""

    def lock_path(self, key: str) -> Path | None:
        """A local file beside `key` whose flock (saesweep.locks) holds `key` for one process,
        or None where the store has no such lock (S3: writers are not detected)."""
        return None

    def local_path(self, key: str) -> Path | None:
        """The local file behind `key`, for readers that read local files directly, or None
        where the store has none (S3)."""
        return None

    def check_writable(self) -> None:
        """Raise a UserError, before anything is written, when this store cannot be written
        for a reason known in advance (S3 without credentials); otherwise nothing."""
        return None

    def child(self, key: str) -> str:
        """The full URI of `key`."""
        return f"{self.uri.rstrip('/')}/{key}"

    def get_json(self, key: str):
        """The JSON object at key; a damaged one is a UserError naming it."""
        try:
            return json.loads(self.get(key))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise UserError(f"{self.child(key)} is not valid JSON ({err}); it is damaged") from None

    def put_json(self, key: str, value) -> None:
        self.put(key, json.dumps(value, indent=1, sort_keys=True).encode() + b"\n")
