"""An export's output directory, written whole or not at all."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from saesweep.errors import UserError


@contextmanager
def staged_output(out: Path) -> Iterator[Path]:
    """A new directory beside `out` to write an export into: renamed to `out` when the block
    ends, removed when it raises, so `out` holds a whole export or nothing. `out` must not
    exist yet, or be an empty directory."""
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise UserError(f"{out} already exists; remove it or give another --out")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staged = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    except OSError as err:
        raise UserError(f"cannot write {out} ({err.strerror or err}); check the path") from err
    try:
        yield staged
        if out.exists():
            out.rmdir()
        os.replace(staged, out)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
