"""Stores: `open_store(uri)` for a local path, a file:// URI or s3://bucket/prefix."""

from __future__ import annotations

from pathlib import Path

from saesweep.errors import UserError
from saesweep.store.base import Store
from saesweep.store.file import FileStore

__all__ = ["Store", "FileStore", "open_store"]


def open_store(uri: str, anonymous: bool = False) -> Store:
    """The store behind `uri`. S3 signs its requests with credentials from the usual AWS places;
    without any, or with `anonymous` (ignored for local paths), it sends unsigned ones, which
    read a public bucket; writes need credentials."""
    if uri.startswith("s3://"):
        from saesweep.store.s3 import S3Store

        return S3Store.from_uri(uri, anonymous=anonymous)
    if uri.startswith("file://"):
        return FileStore(Path(uri.removeprefix("file://")))
    if "://" in uri:
        raise UserError(
            f"unsupported store URI {uri!r}; use a path, file://PATH or s3://BUCKET/PREFIX"
        )
    return FileStore(Path(uri))
