"""S3Store and the async range reader against a real SeaweedFS server (no mocks)."""

from __future__ import annotations

import asyncio
import os
import pickle
import random
import subprocess
import sys
from pathlib import Path

import pytest
from s3_ranges import async_reader, get_range, get_ranges, submit
from s3server import free_ports
from test_store_file import exercise_store

from saesweep.errors import UserError
from saesweep.store import open_store
from saesweep.store.s3 import MIN_PART_SIZE, S3Store
from saesweep.store.s3_async import S3ReadError

ROOT = Path(__file__).resolve().parents[1]


def pending_uploads(store: S3Store) -> list:
    return store._client.list_multipart_uploads(Bucket=store.bucket).get("Uploads", [])


def random_ranges(size: int, n: int, seed: int = 0) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    starts = [rng.randrange(size) for _ in range(n)]
    return [(s, min(size, s + rng.randrange(1, 50_000))) for s in starts]


def test_s3_store_contract(s3_env, tmp_path):
    store = open_store(s3_env)
    assert isinstance(store, S3Store) and store.uri == s3_env
    exercise_store(store, tmp_path)


def test_s3_store_pickles_and_works_after(s3_env):
    store = open_store(s3_env)
    store.put("k", b"value")
    copy = pickle.loads(pickle.dumps(store))
    assert (copy.bucket, copy.prefix, copy.endpoint) == (store.bucket, "run", store.endpoint)
    assert copy.get("k") == b"value"


def test_multipart_put_file_reads_back_exactly(s3_env, tmp_path):
    store = S3Store.from_uri(s3_env, part_size=MIN_PART_SIZE, upload_threads=2)
    data = os.urandom(2 * MIN_PART_SIZE + 12345)
    (tmp_path / "big.bin").write_bytes(data)
    store.put_file("big.bin", tmp_path / "big.bin")
    assert store.size("big.bin") == len(data)
    assert store.get("big.bin") == data
    edge = MIN_PART_SIZE
    assert store.get_range("big.bin", edge - 100, edge + 100) == data[edge - 100 : edge + 100]
    assert pending_uploads(store) == []


def test_failed_multipart_upload_leaves_previous_object_and_no_upload(s3_env, tmp_path):
    store = S3Store.from_uri(s3_env, part_size=MIN_PART_SIZE, upload_threads=1)
    store.put("big.bin", b"previous")
    (tmp_path / "big.bin").write_bytes(os.urandom(3 * MIN_PART_SIZE))

    def fail_second_part(params, **_):
        if params["PartNumber"] == 2:
            raise RuntimeError("injected part failure")

    store._client.meta.events.register("before-parameter-build.s3.UploadPart", fail_second_part)
    with pytest.raises(RuntimeError, match="injected"):
        store.put_file("big.bin", tmp_path / "big.bin")
    assert store.get("big.bin") == b"previous"
    assert store.list() == ["big.bin"]
    assert pending_uploads(store) == []


def test_async_reader_many_concurrent_ranges(s3_env):
    store = open_store(s3_env)
    objects = {f"obj-{i}": os.urandom(1 << 20) for i in range(2)}
    for key, data in objects.items():
        store.put(key, data)
    ranges = [(key, s, e) for key in objects for s, e in random_ranges(1 << 20, 100)]
    with store.range_reader(max_connections=16) as reader:
        got = get_ranges(reader, ranges)
    assert got == [objects[key][s:e] for key, s, e in ranges]


def test_async_reader_streams_into_one_buffer(s3_env):
    store = open_store(s3_env)
    data = os.urandom(3_000_000)
    store.put("obj", data)
    cuts = list(range(0, len(data), 256_000)) + [len(data)]

    async def read_all() -> bytearray:
        out = bytearray(len(data))
        view = memoryview(out)
        async with async_reader(store, max_connections=8) as reader:
            await asyncio.gather(
                *(
                    reader.get_range_into("obj", s, e, view[s:e])
                    for s, e in zip(cuts, cuts[1:], strict=False)
                )
            )
        return out

    assert asyncio.run(read_all()) == data


def test_async_reader_errors(s3_env):
    store = open_store(s3_env)
    store.put("obj", b"0123456789")
    with store.range_reader(attempts=2) as reader:
        with pytest.raises(FileNotFoundError, match="missing"):
            get_range(reader, "missing", 0, 5)
        with pytest.raises(ValueError, match="past the end"):
            get_range(reader, "obj", 5, 20)


def test_async_reader_retries_through_server_restart(s3_env, s3_server):
    store = open_store(s3_env)
    data = os.urandom(1 << 20)
    store.put("obj", data)
    ranges = [("obj", s, e) for s, e in random_ranges(len(data), 64, seed=1)]
    with store.range_reader(max_connections=8) as reader:
        assert get_range(reader, "obj", 0, 100) == data[:100]
        s3_server.stop()
        pending = submit(reader, ranges)
        s3_server.start()
        assert pending.result() == [data[s:e] for _, s, e in ranges]


def test_unreachable_endpoint_is_a_user_error(monkeypatch):
    endpoint = f"http://127.0.0.1:{free_ports(1)[0]}"
    monkeypatch.setenv("S3_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "anything")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "anything")
    store = open_store("s3://some-bucket/prefix")
    with pytest.raises(UserError, match=f"{endpoint}.*S3_ENDPOINT_URL"):
        store.get("key")
    with (
        store.range_reader(attempts=2, backoff_base_s=0.01) as reader,
        pytest.raises(S3ReadError, match="failed 2 times"),
    ):
        get_range(reader, "key", 0, 10)


@pytest.mark.parametrize("variable", ["AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID"])
def test_wrong_credentials_are_a_user_error(s3_env, monkeypatch, variable):
    open_store(s3_env).put("obj", b"x")
    monkeypatch.setenv(variable, "wrong-value")
    store = open_store(s3_env)
    for call in (lambda: store.get("obj"), lambda: store.exists("obj"), store.list):
        with pytest.raises(UserError, match="credentials"):
            call()
    with store.range_reader() as reader, pytest.raises(UserError, match="credentials"):
        get_range(reader, "obj", 0, 1)


def test_missing_credentials_are_a_user_error(s3_env, monkeypatch, tmp_path):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    # reads are sent unsigned (test_anonymous.py), which a private bucket refuses
    with pytest.raises(UserError, match="not public.*AWS_ACCESS_KEY_ID.*AWS_PROFILE"):
        open_store(s3_env).get("obj")
    with pytest.raises(UserError, match="needs S3 credentials.*AWS_ACCESS_KEY_ID"):
        open_store(s3_env).put("obj", b"x")
    monkeypatch.setenv("AWS_PROFILE", "no-such-profile")
    with pytest.raises(UserError, match="'no-such-profile' \\(AWS_PROFILE\\) is not configured"):
        open_store(s3_env).get("obj")


def test_missing_bucket_is_a_user_error(s3_env):
    store = open_store("s3://no-such-bucket-saesweep/prefix")
    for call in (lambda: store.get("k"), lambda: store.exists("k"), store.list):
        with pytest.raises(UserError, match="no-such-bucket-saesweep.*create it"):
            call()


def test_malformed_endpoint_and_bucket_name_are_user_errors(s3_env, monkeypatch):
    with pytest.raises(UserError, match="S3 refused a request for s3://Bad_Bucket!/p: .*bucket"):
        open_store("s3://Bad_Bucket!/p").get("k")
    monkeypatch.setenv("S3_ENDPOINT_URL", "127.0.0.1:9")
    with pytest.raises(UserError, match="S3_ENDPOINT_URL=127.0.0.1:9 is not an S3 endpoint"):
        open_store("s3://bucket/p").get("k")


def test_closed_range_reader_refuses_new_reads(s3_env):
    store = open_store(s3_env)
    store.put("obj", b"0123456789")
    reader = store.range_reader()
    target = memoryview(bytearray(10))
    reader.fetch_into("obj", target, chunk_bytes=4)
    assert bytes(target) == b"0123456789"
    reader.close()
    with pytest.raises(ConnectionError, match="closed"):
        reader.fetch_into("obj", target, chunk_bytes=4)


def test_credentials_in_the_endpoint_url_are_refused_and_never_printed(s3_server, tmp_path):
    """A password written into S3_ENDPOINT_URL would be echoed by every error message into
    the logs; it is refused, shown redacted, before any request."""
    host = s3_server.endpoint.split("://", 1)[1]
    env = {**os.environ, **s3_server.env(), "S3_ENDPOINT_URL": f"http://user:hunter2pw@{host}"}
    runs = tmp_path / "runs"
    commands = [
        ["collect.py", "--out", "s3://creds/x", "--max-tokens", "100", "--device", "cpu"],
        ["train.py", "--train-data.uri", "s3://creds/x", "--runs-root", str(runs)],
    ]
    for command in commands:
        proc = subprocess.run(
            [sys.executable, *command], cwd=ROOT, env=env, capture_output=True, text=True
        )
        assert proc.returncode == 2, proc.stderr
        assert "S3_ENDPOINT_URL=http://***@" in proc.stderr and "carries credentials" in proc.stderr
        assert "hunter2pw" not in proc.stdout + proc.stderr
    assert not runs.exists()
