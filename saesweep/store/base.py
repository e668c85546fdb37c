"""The storage interface every backend implements: flat keys under one root URI."""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from pathlib import Path

from saesweep.errors import UserError


class Store(ABC):
    """Objects addressed by '/'-separated keys relative to the store's root URI.

    Writes are all-or-nothing: after `put` returns the object is whole, and a failed
    `put` leaves either the previous object or none, never a partial one.
    """

    uri: str

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
