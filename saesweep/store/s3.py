"""S3 store (AWS or any S3-compatible endpoint) over boto3, with multipart uploads."""

from __future__ import annotations

import contextlib
import itertools
import os
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import boto3
from botocore import UNSIGNED
from botocore.config import Config
from botocore.exceptions import (
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    HTTPClientError,
    IncompleteReadError,
    NoCredentialsError,
    ParamValidationError,
    PartialCredentialsError,
    ReadTimeoutError,
    ResponseStreamingError,
)

from saesweep.errors import UserError, redact
from saesweep.store.base import ObjectReader, Store
from saesweep.store.s3_async import BlockingRangeReader
from saesweep.store.s3_common import (
    CREDENTIAL_HINT,
    Access,
    access_for,
    backoff_s,
    boto_session,
    is_transient_reply,
    region_for,
    reply_error,
)

MIN_PART_SIZE = 5 << 20
DEFAULT_PART_SIZE = 32 << 20
CHUNK_BYTES = 8 << 20
"""Size of one range GET of an object read whole (S3Store.object_reader)."""


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """Split s3://bucket/prefix into (bucket, prefix without slashes at either end)."""
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    if not bucket:
        raise UserError(f"store URI {uri!r} names no bucket; use s3://BUCKET/PREFIX")
    if "@" in bucket:
        raise UserError(
            f"store URI {redact(uri)} carries credentials, which S3 URIs never hold; use "
            "s3://BUCKET/PREFIX and set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
        )
    return bucket, prefix.strip("/")


def endpoint_from_env() -> str | None:
    """The custom S3 endpoint from S3_ENDPOINT_URL, or None for AWS. An endpoint that carries
    a user name or password is refused: S3 clients never send them (requests are signed with
    the AWS_* keys), so they would only be printed, into logs, by the first error message."""
    endpoint = os.environ.get("S3_ENDPOINT_URL") or None
    parts = urllib.parse.urlsplit(endpoint or "")
    if "@" in parts.netloc:
        raise UserError(
            f"S3_ENDPOINT_URL={redact(endpoint)} carries credentials, which S3 requests never "
            "use; remove them from the URL and set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
        )
    if endpoint and (parts.scheme not in ("http", "https") or not parts.netloc or parts.query
                     or parts.fragment):  # fmt: skip
        raise UserError(
            f"S3_ENDPOINT_URL={redact(endpoint)} is not an S3 endpoint (scheme http or https, a "
            "host, no query or fragment); use a URL such as http://127.0.0.1:8333"
        )
    return endpoint


def is_transient(err: BaseException) -> bool:
    """Whether an S3 call failed for a reason worth retrying (network, 5xx, throttling)."""
    if isinstance(err, HTTPClientError):
        return True
    if isinstance(err, ClientError):
        status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return is_transient_reply(status, err.response.get("Error", {}).get("Code", ""))
    return False


def with_retries(call, attempts: int, retryable):
    """`call()`, retried with backoff while `retryable(error)`, at most `attempts` times."""
    for attempt in itertools.count():
        try:
            return call()
        except Exception as err:
            if attempt + 1 >= attempts or not retryable(err):
                raise
            time.sleep(backoff_s(attempt))


def is_stream_error(err: BaseException) -> bool:
    """Whether a response body broke off mid-read (botocore does not retry those)."""
    return isinstance(err, ResponseStreamingError | IncompleteReadError | ReadTimeoutError)


class RangeReads(ObjectReader):
    """Objects received into the caller's buffers by concurrent signed range GETs of
    CHUNK_BYTES, on several event-loop threads taken in turn (the kernel copies each body
    straight into the buffer)."""

    def __init__(self, loops: list[BlockingRangeReader]):
        self.loops, self.turn = loops, itertools.count()

    def read(self, key: str, n_bytes: int, into: memoryview | None) -> memoryview:
        view = into[:n_bytes]
        self.loops[next(self.turn) % len(self.loops)].fetch_into(key, view, CHUNK_BYTES)
        return view

    def close(self) -> None:
        for loop in self.loops:
            loop.close()


class S3Store(Store):
    """Objects under s3://bucket/prefix; picklable, with one lazily made client per process.

    Requests are signed with the configured AWS credentials; without any, or with
    `anonymous=True`, they are sent unsigned, which reads a public bucket (s3_common.Access).
    Writes always need credentials."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        endpoint: str | None = None,
        part_size: int = DEFAULT_PART_SIZE,
        upload_threads: int = 4,
        attempts: int = 4,
        anonymous: bool = False,
    ):
        if part_size < MIN_PART_SIZE:
            raise ValueError(f"part_size must be at least {MIN_PART_SIZE} bytes (S3 minimum)")
        self.bucket, self.prefix, self.endpoint = bucket, prefix.strip("/"), endpoint
        self.part_size, self.upload_threads = part_size, upload_threads
        self.attempts, self._bucket_seen = attempts, False
        self.uri = f"s3://{bucket}/{self.prefix}".rstrip("/")
        self._client_pid, self._client_obj, self._lock = None, None, threading.Lock()
        self.anonymous, self._session_obj, self._access_obj = anonymous, None, None

    @classmethod
    def from_uri(cls, uri: str, **kwargs) -> S3Store:
        """The store for s3://bucket/prefix, with the endpoint from S3_ENDPOINT_URL (kwargs:
        the constructor's, e.g. anonymous=True)."""
        bucket, prefix = parse_s3_uri(uri)
        return cls(bucket, prefix, endpoint=endpoint_from_env(), **kwargs)

    def __getstate__(self):
        state = self.__dict__.copy()
        state.update(
            _client_pid=None, _client_obj=None, _lock=None, _session_obj=None, _access_obj=None
        )
        return state

    def __setstate__(self, state):
        self.__dict__.update(state, _lock=threading.Lock())

    @property
    def endpoint_name(self) -> str:
        return self.endpoint or "AWS S3"

    @property
    def session(self) -> boto3.session.Session:
        """This process's boto3 session (its credentials and region), made with the client:
        making one costs about 90 ms of CPU, so range readers share it."""
        _ = self._client
        return self._session_obj

    @property
    def access(self) -> Access:
        """Whether this process's requests are signed (s3_common.Access)."""
        _ = self._client
        return self._access_obj

    def check_writable(self) -> None:
        """A UserError naming the missing credentials when this store cannot be written."""
        self.access.require_write(self.uri)

    @property
    def _client(self):
        if self._client_pid != os.getpid():
            with self._lock:
                if self._client_pid != os.getpid():
                    self._client_obj = self._make_client()
                    self._client_pid = os.getpid()
        return self._client_obj

    def _make_client(self):
        session = self._session_obj = boto_session()
        self._access_obj = access_for(session, self.anonymous)
        config = Config(
            signature_version=None if self._access_obj.signed else UNSIGNED,
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            retries={"mode": "standard", "total_max_attempts": self.attempts},
            connect_timeout=5,
            read_timeout=60,
            max_pool_connections=max(32, 4 * self.upload_threads),
            s3={"addressing_style": "path"} if self.endpoint else None,
        )
        try:
            return session.client(
                "s3", endpoint_url=self.endpoint, config=config, region_name=region_for(session)
            )
        except ValueError as err:
            raise UserError(
                f"S3_ENDPOINT_URL={self.endpoint!r} is not a valid endpoint ({err}); "
                "use a URL such as http://127.0.0.1:8333"
            ) from None

    def key_of(self, key: str) -> str:
        """The object key in the bucket for store key `key`."""
        return f"{self.prefix}/{key}" if self.prefix else key

    def range_reader(self, max_connections: int = 64, **kwargs) -> BlockingRangeReader:
        """A BlockingRangeReader (its own event-loop thread) for this store's keys (see
        saesweep.store.s3_async for kwargs), sharing this store's session."""
        return BlockingRangeReader(max_connections=max_connections, **self.reader_args(), **kwargs)

    def object_reader(
        self, n_loops: int = 1, connections: int = 16, retry_s: float = 300.0
    ) -> RangeReads:
        loops = max(1, n_loops)
        return RangeReads([self.range_reader(connections, retry_s=retry_s) for _ in range(loops)])

    def reader_args(self) -> dict:
        """What a range reader of this store's keys is made with: where, and the session."""
        return {
            "bucket": self.bucket,
            "endpoint": self.endpoint,
            "prefix": self.prefix,
            "session": self.session,
            "anonymous": self.anonymous,
        }

    @contextlib.contextmanager
    def _errors(self, key: str = ""):
        """Turn botocore failures into FileNotFoundError or one-sentence UserErrors."""
        try:
            yield
        except ClientError as err:
            raise self._client_error(err, key) from err
        except ParamValidationError as err:
            raise UserError(
                f"S3 refused a request for {self.uri}: {' '.join(str(err).split())}"
            ) from None
        except (NoCredentialsError, PartialCredentialsError) as err:
            raise UserError(f"no usable S3 credentials for {self.uri}; {CREDENTIAL_HINT}") from err
        except (
            EndpointConnectionError,
            ConnectTimeoutError,
            ConnectionClosedError,
            ReadTimeoutError,
        ) as err:
            raise UserError(
                f"cannot reach the S3 endpoint {self.endpoint_name} for {self.uri}; "
                "check S3_ENDPOINT_URL and that the server is running"
            ) from err

    def _client_error(self, err: ClientError, key: str) -> Exception:
        """FileNotFoundError or a UserError for an S3 error reply (after botocore's retries)."""
        error = err.response.get("Error", {})
        status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        mapped = self._error_for(error.get("Code", ""), key, status)
        if mapped is not None:
            return mapped
        hint = " (from AWS a bare 400 usually means expired credentials)" if status == 400 else ""
        return UserError(
            f"S3 at {self.endpoint_name} answered {status or '?'} {error.get('Code', '')} "
            f"{error.get('Message', '')} for {self.child(key)}{hint}; fix that and rerun"
        )

    def _error_for(self, code: str, key: str, status: int = 0) -> Exception | None:
        """The exception to raise for S3 error `code`, or None to keep the original."""
        where = self.child(key) if key else self.uri
        return reply_error(status, code, where, self.endpoint_name, self.access)

    def _check_bucket(self) -> None:
        """Raise a UserError if the bucket is missing (HEAD on a key cannot tell)."""
        if self._bucket_seen:
            return
        try:
            with self._errors():
                self._client.head_bucket(Bucket=self.bucket)
        except FileNotFoundError as err:
            raise self._error_for("NoSuchBucket", "") from err
        self._bucket_seen = True

    def put(self, key: str, data: bytes) -> None:
        self.check_writable()
        with self._errors(key):
            self._client.put_object(Bucket=self.bucket, Key=self.key_of(key), Body=data)

    def put_file(self, key: str, path: Path) -> None:
        self.check_writable()
        size = Path(path).stat().st_size
        if size <= self.part_size:
            with self._errors(key), open(path, "rb") as f:
                self._client.put_object(Bucket=self.bucket, Key=self.key_of(key), Body=f)
            return
        with self._errors(key):
            upload = self._client.create_multipart_upload(Bucket=self.bucket, Key=self.key_of(key))
        try:
            with self._errors(key):
                self._upload_parts(key, upload["UploadId"], Path(path), size)
        except BaseException:
            self._abort(key, upload["UploadId"])
            raise

    def _upload_parts(self, key: str, upload_id: str, path: Path, size: int) -> None:
        offsets = range(0, size, self.part_size)
        with open(path, "rb") as f, ThreadPoolExecutor(self.upload_threads) as pool:
            jobs = [
                pool.submit(
                    self._upload_part,
                    key,
                    upload_id,
                    f.fileno(),
                    n + 1,
                    offset,
                    min(self.part_size, size - offset),
                )
                for n, offset in enumerate(offsets)
            ]
            try:
                parts = [job.result() for job in jobs]
            except BaseException:
                pool.shutdown(cancel_futures=True)
                raise
        self._client.complete_multipart_upload(
            Bucket=self.bucket,
            Key=self.key_of(key),
            UploadId=upload_id,
            MultipartUpload={"Parts": parts},
        )

    def _upload_part(
        self, key: str, upload_id: str, fd: int, number: int, offset: int, length: int
    ) -> dict:
        body = os.pread(fd, length, offset)
        if len(body) != length:
            raise OSError(f"the file uploaded to {self.child(key)} shrank during the upload")
        reply = with_retries(
            lambda: self._client.upload_part(
                Bucket=self.bucket,
                Key=self.key_of(key),
                UploadId=upload_id,
                PartNumber=number,
                Body=body,
            ),
            self.attempts,
            is_transient,
        )
        return {"PartNumber": number, "ETag": reply["ETag"]}

    def _abort(self, key: str, upload_id: str) -> None:
        with contextlib.suppress(Exception):
            self._client.abort_multipart_upload(
                Bucket=self.bucket, Key=self.key_of(key), UploadId=upload_id
            )

    def _read(self, key: str, **ranged) -> bytes:
        def read() -> bytes:
            reply = self._client.get_object(Bucket=self.bucket, Key=self.key_of(key), **ranged)
            return reply["Body"].read()

        with self._errors(key):
            return with_retries(read, self.attempts, is_stream_error)

    def get(self, key: str) -> bytes:
        return self._read(key)

    def get_range(self, key: str, start: int, end: int) -> bytes:
        if end <= start:
            return b""
        return self._read(key, Range=f"bytes={start}-{end - 1}")

    def _head(self, key: str) -> dict:
        try:
            with self._errors(key):
                return self._client.head_object(Bucket=self.bucket, Key=self.key_of(key))
        except FileNotFoundError:
            self._check_bucket()
            raise

    def exists(self, key: str) -> bool:
        try:
            self._head(key)
        except FileNotFoundError:
            return False
        return True

    def size(self, key: str) -> int:
        return self._head(key)["ContentLength"]

    def list(self, prefix: str = "") -> list[str]:
        return sorted(self.list_sizes(prefix))

    def list_sizes(self, prefix: str = "") -> dict[str, int]:
        """One LIST per 1000 objects (sizes come with the listing), not a HEAD per object."""
        start = self.key_of(prefix) if prefix else (f"{self.prefix}/" if self.prefix else "")
        pages = self._client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=start
        )
        with self._errors():
            objects = [(o["Key"], o["Size"]) for page in pages for o in page.get("Contents", [])]
        strip = len(self.prefix) + 1 if self.prefix else 0
        sizes = {name[strip:]: size for name, size in objects if not name.endswith("/")}
        under = prefix.rstrip("/") + "/"
        return {k: n for k, n in sizes.items() if not prefix or k == prefix or k.startswith(under)}

    def delete(self, key: str) -> None:
        self.check_writable()
        with self._errors(key):
            self._client.delete_object(Bucket=self.bucket, Key=self.key_of(key))
