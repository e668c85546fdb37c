"""Names and sizes read from a collection someone else may have written, checked where they
enter (manifests, part files, listings)."""

from __future__ import annotations

import re

from saesweep.errors import UserError, printable

UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f/\\]")
"""Characters a hook or shard name may not hold: control characters and path separators."""


def checked_name(name: object, where: str, field: str) -> str:
    """`name` when it is one plain file or directory name, which joined to its root stays
    inside it; else a UserError naming the file `where` and its `field`."""
    if isinstance(name, str) and name not in ("", ".", "..") and not UNSAFE.search(name):
        return name
    shown = printable(repr(name))
    raise UserError(
        f"{where} has {field} {shown}, which is not a plain name inside the collection (no '/', "
        "'..' or control characters); the collection is damaged or was not written by saesweep"
    )


def checked_records(records: object, where: str) -> list[dict]:
    """Shard records (name, n_tokens, n_bytes, checksum) with safe names and sizes."""
    if not isinstance(records, list):
        raise UserError(f"{where} has a 'shards' field that is not a list; it is damaged")
    for i, record in enumerate(records):
        field = f"shards[{i}]"
        if not isinstance(record, dict):
            raise UserError(f"{where} has a {field} that is not an object; it is damaged")
        checked_name(record.get("name"), where, f"{field}.name")
        if not isinstance(record.get("checksum"), str):
            raise UserError(f"{where} has no checksum string in {field}; it is damaged")
        for size in ("n_tokens", "n_bytes"):
            value = record.get(size)
            if type(value) is not int or value < 0:
                raise UserError(
                    f"{where} has {field}.{size} {printable(repr(value))}, not a count of "
                    "0 or more; it is damaged"
                )
    return records
