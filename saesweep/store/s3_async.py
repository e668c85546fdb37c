"""Concurrent S3 range GETs over aiohttp, SigV4-signed with botocore, retrying transient errors."""

from __future__ import annotations

import asyncio
import itertools
import re
import threading
from concurrent.futures import Future
from urllib.parse import quote

import aiohttp
import yarl
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest

from saesweep.errors import UserError
from saesweep.store.s3 import CREDENTIAL_HINT, backoff_s, boto_session, region_for

CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


class S3ReadError(OSError):
    """A range read that still failed after all its retries."""


class _Transient(Exception):
    """A failure worth retrying: 5xx, throttling, or a body cut short."""


TRANSIENT = (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError, _Transient)


class AsyncRangeReader:
    """Byte ranges of objects in one bucket, fetched concurrently over a pooled HTTP session.

    Keys are relative to `prefix`. Custom endpoints (SeaweedFS, MinIO) use path-style URLs;
    AWS uses virtual-hosted ones. Create and use it inside one event loop.
    """

    def __init__(
        self,
        bucket: str,
        endpoint: str | None = None,
        region: str | None = None,
        max_connections: int = 64,
        prefix: str = "",
        attempts: int = 10,
        backoff_base_s: float = 0.25,
        backoff_cap_s: float = 4.0,
        connect_timeout_s: float = 5.0,
        read_timeout_s: float = 60.0,
    ):
        session = boto_session()
        self.bucket, self.endpoint, self.prefix = bucket, endpoint, prefix.strip("/")
        self.region = region or region_for(session)
        self.max_connections, self.attempts = max_connections, attempts
        self._backoff = (backoff_base_s, backoff_cap_s)
        self._timeout = aiohttp.ClientTimeout(
            sock_connect=connect_timeout_s, sock_read=read_timeout_s
        )
        self._credentials = session.get_credentials()
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> AsyncRangeReader:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def object_key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def url(self, key: str) -> str:
        path = quote(self.object_key(key), safe="/-_.~")
        if self.endpoint:
            return f"{self.endpoint.rstrip('/')}/{self.bucket}/{path}"
        return f"https://{self.bucket}.s3.{self.region}.amazonaws.com/{path}"

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=self.max_connections)
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=self._timeout,
                auto_decompress=False,
                read_bufsize=4 << 20,
            )
        return self._session

    def _signed_headers(self, url: str, start: int, end: int) -> dict[str, str]:
        request = AWSRequest(method="GET", url=url, headers={"Range": f"bytes={start}-{end - 1}"})
        S3SigV4Auth(self._credentials.get_frozen_credentials(), "s3", self.region).add_auth(request)
        return dict(request.headers.items())

    async def get_range(self, key: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of `key`."""
        buffer = bytearray(end - start)
        await self.get_range_into(key, start, end, memoryview(buffer))
        return bytes(buffer)

    async def get_range_into(self, key: str, start: int, end: int, buffer: memoryview) -> None:
        """Stream bytes [start, end) of `key` into writable `buffer` (end - start bytes)."""
        target = memoryview(buffer).cast("B")
        if target.nbytes != end - start:
            raise ValueError(f"buffer holds {target.nbytes} bytes, range needs {end - start}")
        if end == start:
            return
        for attempt in itertools.count():
            try:
                return await self._fetch_into(key, start, end, target)
            except TRANSIENT as err:
                if attempt + 1 >= self.attempts:
                    raise S3ReadError(
                        f"reading bytes [{start}, {end}) of {self.url(key)} failed "
                        f"{self.attempts} times; last error: {err!r}"
                    ) from err
                await asyncio.sleep(backoff_s(attempt, *self._backoff))

    async def _fetch_into(self, key: str, start: int, end: int, target: memoryview) -> None:
        url = self.url(key)
        headers = self._signed_headers(url, start, end)
        async with self._http().get(yarl.URL(url, encoded=True), headers=headers) as response:
            if response.status not in (200, 206):
                raise await self._status_error(response, key)
            self._check_extent(response, key, start, end)
            filled = 0
            async for chunk in response.content.iter_any():
                if filled + len(chunk) > target.nbytes:
                    raise _Transient(f"body of {url} longer than the {target.nbytes} asked for")
                target[filled : filled + len(chunk)] = chunk
                filled += len(chunk)
            if filled != target.nbytes:
                raise _Transient(f"body of {url} cut short at {filled} of {target.nbytes} bytes")

    def _check_extent(
        self, response: aiohttp.ClientResponse, key: str, start: int, end: int
    ) -> None:
        """Refuse a reply that does not cover exactly [start, end) (a range past the end)."""
        if response.status == 200:
            if response.content_length == end - start and start == 0:
                return
            raise S3ReadError(f"{self.url(key)}: the server ignored the Range header")
        match = CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", ""))
        if match is None or int(match[1]) != start or int(match[2]) != end - 1:
            raise ValueError(
                f"bytes [{start}, {end}) run past the end of {self.url(key)} "
                f"(Content-Range {response.headers.get('Content-Range')!r})"
            )

    async def _status_error(self, response: aiohttp.ClientResponse, key: str) -> Exception:
        body = await response.text(errors="replace")
        code = re.search(r"<Code>(.*?)</Code>", body)
        code = code[1] if code else str(response.status)
        if response.status >= 500 or response.status == 429 or code == "SlowDown":
            return _Transient(f"HTTP {response.status} {code}")
        if code == "NoSuchBucket":
            return UserError(
                f"bucket {self.bucket!r} does not exist at {self._where()}; "
                "create it or fix the store URI"
            )
        if response.status == 404:
            return FileNotFoundError(f"s3://{self.bucket}/{self.object_key(key)} does not exist")
        if response.status == 403:
            return UserError(
                f"S3 at {self._where()} rejected the credentials for bucket "
                f"{self.bucket!r} ({code}); {CREDENTIAL_HINT}"
            )
        if response.status == 416:
            return ValueError(f"the range asked of {self.url(key)} starts past its end")
        return S3ReadError(f"GET {self.url(key)} failed: HTTP {response.status} {code}")

    def _where(self) -> str:
        return self.endpoint or "AWS S3"


class BlockingRangeReader:
    """An AsyncRangeReader driven from synchronous code by a private event-loop thread."""

    def __init__(self, *args, **kwargs):
        self.reader = AsyncRangeReader(*args, **kwargs)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, daemon=True, name="s3-range-reader"
        )
        self._thread.start()

    def __enter__(self) -> BlockingRangeReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def submit(self, ranges: list[tuple[str, int, int]]) -> Future[list[bytes]]:
        """Start fetching (key, start, end) ranges concurrently; the future gives their bytes."""
        return asyncio.run_coroutine_threadsafe(self._gather(ranges), self._loop)

    async def _gather(self, ranges: list[tuple[str, int, int]]) -> list[bytes]:
        return list(await asyncio.gather(*(self.reader.get_range(*r) for r in ranges)))

    def get_ranges(self, ranges: list[tuple[str, int, int]]) -> list[bytes]:
        """The bytes of each (key, start, end) range, fetched concurrently."""
        return self.submit(ranges).result()

    def get_range(self, key: str, start: int, end: int) -> bytes:
        return self.get_ranges([(key, start, end)])[0]

    def close(self) -> None:
        if self._loop.is_closed():
            return
        asyncio.run_coroutine_threadsafe(self.reader.close(), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()
