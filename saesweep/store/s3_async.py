"""Concurrent S3 range GETs received straight into the caller's buffers (store.http_recv),
SigV4-signed with botocore (or unsigned: anonymous reads of a public bucket), retrying
transient errors."""

from __future__ import annotations

import asyncio
import itertools
import re
import ssl
import threading
import time
from concurrent.futures import Future
from urllib.parse import quote, urlsplit

from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest

from saesweep.errors import UserError
from saesweep.store.http_recv import ConnectionPool, Reply, proxy_for
from saesweep.store.s3_common import (
    access_for,
    backoff_s,
    boto_session,
    is_transient_reply,
    region_for,
    reply_error,
)

CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


class S3ReadError(OSError):
    """A range read that still failed after all its retries."""


class StoreUnreachable(UserError):
    """The store kept failing transiently for longer than the retry budget."""


class _Transient(Exception):
    """A failure worth retrying: 5xx, throttling, or a body cut short."""


TRANSIENT = (asyncio.TimeoutError, ConnectionError, _Transient)
"""Worth a retry: no reply, a reply cut short or broken (http_recv.ProtocolError is a
ConnectionError), 5xx and throttling."""


class AsyncRangeReader:
    """Byte ranges of objects in one bucket, fetched concurrently over kept-alive connections.

    Keys are relative to `prefix`. Custom endpoints (SeaweedFS, MinIO) use path-style URLs;
    AWS uses virtual-hosted ones. A range GET that receives nothing for read_timeout_s is dropped
    and retried. `session`: a boto3 session to take credentials and region from (default: a
    new one); without credentials, or with `anonymous`, requests are unsigned (no
    Authorization header). Create and use it inside one event loop.
    """

    def __init__(
        self,
        bucket: str,
        endpoint: str | None = None,
        region: str | None = None,
        max_connections: int = 64,
        prefix: str = "",
        attempts: int | None = None,
        retry_s: float = 300.0,
        backoff_base_s: float = 0.25,
        backoff_cap_s: float = 8.0,
        connect_timeout_s: float = 5.0,
        read_timeout_s: float = 60.0,
        session=None,
        anonymous: bool = False,
    ):
        session = session or boto_session()
        self.bucket, self.endpoint, self.prefix = bucket, endpoint, prefix.strip("/")
        self.region = region or region_for(session)
        self.max_connections, self.attempts, self.retry_s = max_connections, attempts, retry_s
        self._backoff = (backoff_base_s, backoff_cap_s)
        self._timeouts = (connect_timeout_s, read_timeout_s)
        self.access = access_for(session, anonymous)
        self._pool: ConnectionPool | None = None

    async def __aenter__(self) -> AsyncRangeReader:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def object_key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def uri(self, key: str) -> str:
        """The object as messages name it: s3://bucket/prefix/key (never the endpoint's URL,
        whose path errors.redact hides)."""
        return f"s3://{self.bucket}/{self.object_key(key)}"

    def url(self, key: str) -> str:
        path = quote(self.object_key(key), safe="/-_.~")
        if self.endpoint:
            return f"{self.endpoint.rstrip('/')}/{self.bucket}/{path}"
        return f"https://{self.bucket}.s3.{self.region}.amazonaws.com/{path}"

    def _connections(self, url: str) -> ConnectionPool:
        if self._pool is None:
            parts = urlsplit(url)
            tls = ssl.create_default_context() if parts.scheme == "https" else None
            port = parts.port or (443 if tls else 80)
            self._pool = ConnectionPool(
                parts.hostname, port, tls, self.max_connections, self._timeouts[0], proxy_for(url)
            )
        return self._pool

    def _headers(self, url: str, start: int, end: int) -> dict[str, str]:
        """The request's headers: its Range, plus the SigV4 signature unless anonymous."""
        request = AWSRequest(method="GET", url=url, headers={"Range": f"bytes={start}-{end - 1}"})
        if self.access.signed:
            frozen = self.access.credentials.get_frozen_credentials()
            S3SigV4Auth(frozen, "s3", self.region).add_auth(request)
        return dict(request.headers.items())

    async def get_object_into(self, key: str, target: memoryview, chunk_bytes: int) -> None:
        """The first len(target) bytes of `key` into `target`, as concurrent range GETs of
        chunk_bytes each. When one fails, the others are cancelled before this raises: no
        range writes into `target` once the caller has it back."""
        n_bytes = len(target)
        ranges = [(s, min(s + chunk_bytes, n_bytes)) for s in range(0, n_bytes, chunk_bytes)]
        await all_or_none([self.get_range_into(key, s, e, target[s:e]) for s, e in ranges])

    async def get_range_into(self, key: str, start: int, end: int, buffer: memoryview) -> None:
        """Stream bytes [start, end) of `key` into writable `buffer` (end - start bytes)."""
        target = memoryview(buffer).cast("B")
        if target.nbytes != end - start:
            raise ValueError(f"buffer holds {target.nbytes} bytes, range needs {end - start}")
        if end == start:
            return
        first_failure = None
        for attempt in itertools.count():
            try:
                return await self._fetch_into(key, start, end, target)
            except TRANSIENT as err:
                first_failure = first_failure or time.monotonic()
                if self.attempts is not None and attempt + 1 >= self.attempts:
                    raise S3ReadError(
                        f"reading bytes [{start}, {end}) of {self.uri(key)} failed "
                        f"{self.attempts} times; last error: {err!r}"
                    ) from err
                if time.monotonic() - first_failure >= self.retry_s:
                    raise StoreUnreachable(
                        f"S3 at {self._where()} has not answered reads of {self.uri(key)} for "
                        f"{self.retry_s:g} s (last error: {err!r}); check that it is running "
                        "and reachable, or allow a longer outage with --train-data.retry-s"
                    ) from None
                await asyncio.sleep(backoff_s(attempt, *self._backoff))

    async def _fetch_into(self, key: str, start: int, end: int, target: memoryview) -> None:
        url = self.url(key)
        pool = self._connections(url)
        headers = self._headers(url, start, end)
        forward = pool.proxy is not None and pool.tls is None  # the proxy forwards the request
        if forward and pool.proxy.authorization:
            headers["Proxy-Authorization"] = pool.proxy.authorization
        request = http_get(url, headers, absolute=forward)
        reply = await pool.get(request, target, self._timeouts[1])
        if reply.status not in (200, 206):
            raise self._status_error(reply, key)
        self._check_extent(reply, key, start, end)

    def _check_extent(self, reply: Reply, key: str, start: int, end: int) -> None:
        """Refuse a reply that does not cover exactly [start, end) (a range past the end, a
        server that ignored the Range header or framed the body without Content-Length)."""
        if reply.status == 200:
            if reply.into_target and start == 0:
                return
            raise S3ReadError(f"{self.url(key)}: the server ignored the Range header")
        match = CONTENT_RANGE.fullmatch(reply.headers.get("content-range", ""))
        if match is None or int(match[1]) != start or int(match[2]) != end - 1:
            raise ValueError(
                f"bytes [{start}, {end}) run past the end of {self.url(key)} "
                f"(Content-Range {reply.headers.get('content-range')!r})"
            )
        if not reply.into_target:
            raise S3ReadError(
                f"{self.url(key)}: the reply's Content-Length is not the {end - start} bytes "
                "of its Content-Range"
            )

    def _status_error(self, reply: Reply, key: str) -> Exception:
        body = (reply.body or b"").decode("utf-8", errors="replace")
        code = re.search(r"<Code>(.*?)</Code>", body)
        code = code[1] if code else str(reply.status)
        if is_transient_reply(reply.status, code):
            return _Transient(f"HTTP {reply.status} {code}")
        uri = f"s3://{self.bucket}/{self.object_key(key)}"
        mapped = reply_error(reply.status, code, uri, self._where(), self.access)
        if mapped is not None:
            return mapped
        if reply.status == 407 and self._pool.proxy is not None:
            return self._pool.proxy.wants_credentials()
        if reply.status == 416:
            return ValueError(f"the range asked of {self.url(key)} starts past its end")
        return S3ReadError(f"GET {self.url(key)} failed: HTTP {reply.status} {code}")

    def _where(self) -> str:
        return self.endpoint or "AWS S3"


async def all_or_none(coros: list) -> list:
    """The coroutines' results, run concurrently; on the first failure the others are
    cancelled and waited for, then that failure is raised."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def http_get(url: str, headers: dict[str, str], absolute: bool = False) -> bytes:
    """The bytes of a GET request for `url` with `headers` (Host as SigV4 signed it); the
    request target in absolute form (scheme and host too) when `absolute`, as a proxy that
    forwards plain HTTP requests needs."""
    parts = urlsplit(url)
    default = {"http": 80, "https": 443}[parts.scheme]
    name = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    host = name if parts.port in (None, default) else f"{name}:{parts.port}"
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    if absolute:
        target = f"{parts.scheme}://{host}{target}"
    lines = [f"GET {target} HTTP/1.1", f"Host: {host}", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


class BlockingRangeReader:
    """An AsyncRangeReader driven from synchronous code by a private event-loop thread."""

    def __init__(self, *args, **kwargs):
        self.reader = AsyncRangeReader(*args, **kwargs)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, daemon=True, name="s3-range-reader"
        )
        self._thread.start()
        self._lock, self._closed = threading.Lock(), False

    def __enter__(self) -> BlockingRangeReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def schedule(self, make_coro) -> Future:
        """Schedule a coroutine on the loop; once close() has begun, refuse instead (under the
        lock, anything scheduled before is cancelled by close(), so no caller waits forever)."""
        with self._lock:
            if self._closed:
                raise ConnectionError("the range reader is closed")
            return asyncio.run_coroutine_threadsafe(make_coro(), self._loop)

    def fetch_into(self, key: str, target: memoryview, chunk_bytes: int) -> None:
        """Fill `target` with the start of `key` (see AsyncRangeReader.get_object_into)."""
        self.schedule(lambda: self.reader.get_object_into(key, target, chunk_bytes)).result()

    async def _shutdown(self) -> None:
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.reader.close()

    def close(self) -> None:
        """Cancel what is in flight (its connections are dropped, so nothing writes into a
        caller's buffer after this returns), then stop the loop."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            shutdown = asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop)
        shutdown.result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()
