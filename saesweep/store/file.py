"""Local-disk store: atomic writes by rename, plain reads."""

from __future__ import annotations

import errno
import mmap
import os
import shutil
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from saesweep.errors import UserError, printable
from saesweep.store.base import ObjectReader, Store

MAP_POPULATE = getattr(mmap, "MAP_POPULATE", 0)
"""Linux: read a mapping in when it is made (elsewhere pages are read on first use)."""


def write_atomic(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Call write(f) on a temporary file beside `path`, flush it to disk, then rename it onto
    `path`: readers (and a run resumed after a crash) see the old file or the new one, never a
    mix. A full disk or an unwritable directory is a UserError naming `path`."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        raise UserError(
            f"cannot write {path} ({err.strerror or err}); check the path and its permissions"
        ) from err
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o644)
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            raise UserError(
                f"cannot write {path}: the disk holding it is full; free space there and "
                "rerun the same command to resume"
            ) from err
        raise


def open_regular(path: Path) -> BinaryIO:
    """`path` opened for reading if it is a regular file (a FIFO or device in a collection would
    hang or never end a read); a directory is an IsADirectoryError, anything else an OSError."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    mode = os.fstat(fd).st_mode
    if stat.S_ISREG(mode):
        return os.fdopen(fd, "rb")
    os.close(fd)
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
    raise OSError(f"{path} is not a regular file")


def map_file(path: Path, n_bytes: int) -> mmap.mmap:
    """A read-only mapping of the local file at `path`, which must hold `n_bytes` bytes, read
    in from the page cache before it is handed out (MAP_POPULATE: its reader never waits on
    the disk)."""
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        if size != n_bytes:  # checked before the mapping reads anything in
            raise OSError(f"{path} holds {size} bytes, its manifest says {n_bytes}")
        return mmap.mmap(f.fileno(), 0, flags=mmap.MAP_SHARED | MAP_POPULATE, prot=mmap.PROT_READ)


class MappedFiles(ObjectReader):
    """A FileStore's objects mapped read-only where they lie: no copy, no buffer."""

    def __init__(self, store: FileStore):
        self.store = store

    def read(self, key: str, n_bytes: int, into: memoryview | None) -> mmap.mmap:
        return map_file(self.store.local_path(key), n_bytes)


class FileStore(Store):
    maps_objects = True

    def __init__(self, root: Path):
        self.root = Path(root).resolve()
        self.uri = f"file://{self.root}"

    def _path(self, key: str) -> Path:
        """The file behind `key`; a key that leads outside the root (an absolute path, '..', a
        symlink out) is a UserError."""
        path = self.root / key
        if (
            key.startswith("/")
            or ".." in key.split("/")
            or not path.resolve().is_relative_to(self.root)
        ):
            raise UserError(
                f"the key {printable(repr(key))} leads outside the store at {self.uri} (an "
                "absolute path, '..' or a symlink out of it); a collection's names stay inside it"
            )
        return path

    def put(self, key: str, data: bytes) -> None:
        write_atomic(self._path(key), lambda f: f.write(data))

    def put_file(self, key: str, path: Path) -> None:
        def copy(f):
            with open(path, "rb") as src:
                shutil.copyfileobj(src, f, length=16 << 20)

        write_atomic(self._path(key), copy)

    def get(self, key: str) -> bytes:
        with open_regular(self._path(key)) as f:
            return f.read()

    def get_range(self, key: str, start: int, end: int) -> bytes:
        with open_regular(self._path(key)) as f:
            f.seek(start)
            return f.read(end - start)

    def object_reader(
        self, n_loops: int = 1, connections: int = 16, retry_s: float = 300.0
    ) -> MappedFiles:
        return MappedFiles(self)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def size(self, key: str) -> int:
        return self._path(key).stat().st_size

    def list(self, prefix: str = "") -> list[str]:
        base = self._path(prefix) if prefix else self.root
        if base.is_file():
            return [prefix]
        if not base.is_dir():
            return []
        keys = (p.relative_to(self.root).as_posix() for p in base.rglob("*") if p.is_file())
        return sorted(k for k in keys if not Path(k).name.startswith("."))

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def lock_path(self, key: str) -> Path:
        path = self._path(key)
        return path.with_name(f".{path.stem}.lock")

    def local_path(self, key: str) -> Path:
        return self._path(key)
