"""Range reads returning bytes, for tests (the reader receives ranges into its own buffers)."""

from __future__ import annotations

from concurrent.futures import Future

from saesweep.store.s3 import S3Store
from saesweep.store.s3_async import AsyncRangeReader, BlockingRangeReader, all_or_none


async def range_bytes(reader: AsyncRangeReader, key: str, start: int, end: int) -> bytes:
    """Bytes [start, end) of `key`."""
    buffer = bytearray(end - start)
    await reader.get_range_into(key, start, end, memoryview(buffer))
    return bytes(buffer)


def submit(reader: BlockingRangeReader, ranges: list[tuple[str, int, int]]) -> Future:
    """Start fetching (key, start, end) ranges concurrently; the future gives their bytes."""
    return reader.schedule(lambda: all_or_none([range_bytes(reader.reader, *r) for r in ranges]))


def get_ranges(reader: BlockingRangeReader, ranges: list[tuple[str, int, int]]) -> list[bytes]:
    return submit(reader, ranges).result()


def get_range(reader: BlockingRangeReader, key: str, start: int, end: int) -> bytes:
    return get_ranges(reader, [(key, start, end)])[0]


def async_reader(store: S3Store, max_connections: int = 64, **kwargs) -> AsyncRangeReader:
    """An AsyncRangeReader for the store's keys, sharing its session."""
    return AsyncRangeReader(max_connections=max_connections, **store.reader_args(), **kwargs)
