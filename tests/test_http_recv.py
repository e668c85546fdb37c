"""The receive-into-buffer HTTP/1.1 client against a loopback server that sends exact bytes
(framings SeaweedFS never produces: chunked and close-delimited bodies, broken replies)."""

from __future__ import annotations

import asyncio
import ssl
import subprocess

import pytest

from saesweep.errors import UserError
from saesweep.store.http_recv import ConnectionPool, ProtocolError, dechunk
from saesweep.store.s3_async import AsyncRangeReader, http_get

REQUEST = b"GET /obj HTTP/1.1\r\nHost: x\r\n\r\n"


async def serve(
    replies: list[bytes], piece: int = 1 << 20, stall: bool = False, tls=None, delay: float = 0
):
    """A server that answers the n-th request (on any connection) with replies[n], sent in
    pieces of `piece` bytes `delay` s apart; closes a connection after a reply with
    "Connection: close" or without framing. Returns (server, [accepted connections])."""
    accepted = [0]
    queue = list(replies)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted[0] += 1
        while queue:
            if not await reader.readuntil(b"\r\n\r\n"):
                break
            if stall:
                await asyncio.sleep(10)
            reply = queue.pop(0)
            for i in range(0, len(reply), piece):
                writer.write(reply[i : i + piece])
                await writer.drain()
                await asyncio.sleep(delay)
            framed = b"Content-Length" in reply or b"chunked" in reply
            if b"Connection: close" in reply or not framed:
                break
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=tls)
    return server, accepted


def run(replies: list[bytes], targets: list[int], piece=1 << 20, timeout=5.0, delay=0.0):
    """(replies, accepted connections, target buffers) of len(targets) GETs in a row."""

    async def main():
        server, accepted = await serve(replies, piece, delay=delay)
        port = server.sockets[0].getsockname()[1]
        pool = ConnectionPool("127.0.0.1", port, tls=None, limit=1, connect_timeout=5)
        buffers = [bytearray(n) for n in targets]
        try:
            got = [await pool.get(REQUEST, memoryview(b), timeout) for b in buffers]
        finally:
            pool.close()
            server.close()
        return got, accepted[0], buffers

    return asyncio.run(main())


def ok(body: bytes, extra: str = "") -> bytes:
    head = f"HTTP/1.1 206 Partial Content\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
    return head.encode() + body


def test_bodies_land_in_the_target_and_connections_are_kept_alive():
    bodies = [bytes(range(256)) * 40, b"x" * 7, b"tail"]
    got, accepted, buffers = run([ok(b) for b in bodies], [len(b) for b in bodies], piece=997)
    assert [r.into_target for r in got] == [True] * 3
    assert [bytes(b) for b in buffers] == bodies
    assert accepted == 1


def test_connection_close_opens_a_new_connection():
    got, accepted, buffers = run([ok(b"ab", "Connection: close\r\n"), ok(b"cd")], [2, 2])
    assert [bytes(b) for b in buffers] == [b"ab", b"cd"]
    assert accepted == 2


def test_error_bodies_chunked_or_until_close():
    xml = b"<Error><Code>NoSuchKey</Code></Error>"
    chunked = (
        b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"%x\r\n" % 10
        + xml[:10]
        + b"\r\n"
        + b"%x;ext=1\r\n" % (len(xml) - 10)
        + xml[10:]
        + b"\r\n0\r\n\r\n"
    )
    until_close = b"HTTP/1.1 500 Internal Server Error\r\n\r\n" + xml
    got, accepted, _ = run([chunked, until_close], [5, 5], piece=3)
    assert [(r.status, r.into_target, r.body) for r in got] == [
        (404, False, xml),
        (500, False, xml),
    ]
    assert accepted == 1


def test_unexpected_length_is_reported_not_read():
    reply = b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n123456789"
    (got,), _, buffer = run([reply], [4])
    assert (got.status, got.into_target, got.body) == (200, False, None)
    assert bytes(buffer[0]) == b"\0" * 4


@pytest.mark.parametrize(
    "reply",
    [b"SSH-2.0-OpenSSH\r\n\r\n", b"HTTP/1.1 206 OK\r\nno colon here\r\n\r\n"],
)
def test_broken_replies_raise_protocol_errors(reply):
    with pytest.raises(ProtocolError):
        run([reply], [4])


def test_a_reply_cut_short_is_a_connection_error():
    reply = b"HTTP/1.1 206 Partial Content\r\nContent-Length: 10\r\nConnection: close\r\n\r\n12345"
    with pytest.raises(ConnectionError, match="closed mid-reply"):
        run([reply], [10])


def test_a_silent_server_times_out():
    async def main():
        server, _ = await serve([ok(b"late")], stall=True)
        port = server.sockets[0].getsockname()[1]
        pool = ConnectionPool("127.0.0.1", port, tls=None, limit=1, connect_timeout=5)
        try:
            await pool.get(REQUEST, memoryview(bytearray(4)), timeout=0.2)
        finally:
            pool.close()
            server.close()

    with pytest.raises(TimeoutError):
        asyncio.run(main())


def test_dechunk():
    assert dechunk(b"3\r\nabc\r\n0\r\n\r\n") == b"abc"
    assert dechunk(b"3\r\nabc\r\n0\r\n") is None
    assert dechunk(b"3\r\nab") is None
    with pytest.raises(ProtocolError):
        dechunk(b"zz\r\n")


def self_signed(tmp_path) -> ssl.SSLContext:
    """A server context with a fresh self-signed certificate for localhost (tmp_path/cert.pem)."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
        + ["-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost"]
        + ["-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert, key)
    return server_tls


def test_tls(tmp_path):
    server_tls = self_signed(tmp_path)
    cert = tmp_path / "cert.pem"
    body = bytes(range(256)) * 4000

    async def main():
        server, accepted = await serve([ok(body), ok(body[:10])], piece=10_000, tls=server_tls)
        port = server.sockets[0].getsockname()[1]
        client_tls = ssl.create_default_context(cafile=str(cert))
        pool = ConnectionPool("localhost", port, tls=client_tls, limit=1, connect_timeout=5)
        buffers = [bytearray(len(body)), bytearray(10)]
        try:
            replies = [await pool.get(REQUEST, memoryview(b), 5.0) for b in buffers]
        finally:
            pool.close()
            server.close()
        return replies, accepted[0], buffers

    replies, accepted, buffers = asyncio.run(main())
    assert [r.into_target for r in replies] == [True, True]
    assert bytes(buffers[0]) == body and bytes(buffers[1]) == body[:10]
    assert accepted == 1


def test_a_slow_but_steady_reply_is_not_a_timeout():
    body = b"y" * 64
    got, _, buffers = run([ok(body)], [len(body)], piece=4, timeout=0.3, delay=0.05)
    assert got[0].into_target and bytes(buffers[0]) == body  # 1.0 s in all, 0.05 s gaps


def test_interim_replies_are_skipped_and_http_1_0_is_not_kept_alive():
    interim = b"HTTP/1.1 100 Continue\r\n\r\n" + ok(b"abc")
    old = b"HTTP/1.0 206 Partial Content\r\nContent-Length: 2\r\n\r\nde"
    got, accepted, buffers = run([interim, old, ok(b"fg")], [3, 2, 2])
    assert [bytes(b) for b in buffers] == [b"abc", b"de", b"fg"]
    assert accepted == 2


def test_untrusted_certificate_is_a_user_error(tmp_path):
    server_tls = self_signed(tmp_path)

    async def main():
        server, _ = await serve([ok(b"x")], tls=server_tls)
        port = server.sockets[0].getsockname()[1]
        pool = ConnectionPool(
            "localhost", port, tls=ssl.create_default_context(), limit=1, connect_timeout=5
        )
        try:
            await pool.get(REQUEST, memoryview(bytearray(1)), 5.0)
        finally:
            pool.close()
            server.close()

    with pytest.raises(UserError, match="certificate of localhost.*failed verification"):
        asyncio.run(main())


def test_host_header_as_signed():
    assert b"\r\nHost: [::1]:8333\r\n" in http_get("http://[::1]:8333/b/k", {})
    assert b"\r\nHost: s3.example.com\r\n" in http_get("https://s3.example.com:443/b/k", {})


def test_failed_object_read_leaves_no_range_writing(monkeypatch):
    """One range fails (416) while another is still arriving: by the time get_object_into
    raises, the other is cancelled, so the caller's buffer is never written afterwards."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "any")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "any")

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode()
        start = int(head.split("Range: bytes=")[1].split("-")[0])
        if start == 0:
            await asyncio.sleep(0.5)
            writer.write(ok(b"X" * 10, "Content-Range: bytes 0-9/20\r\n"))
        else:
            writer.write(b"HTTP/1.1 416 Range Not Satisfiable\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()

    async def main():
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        target = bytearray(20)
        async with AsyncRangeReader("b", f"http://127.0.0.1:{port}") as reader:
            with pytest.raises(ValueError, match="starts past its end"):
                await reader.get_object_into("k", memoryview(target), 10)
            await asyncio.sleep(0.8)
        server.close()
        return bytes(target)

    assert asyncio.run(main()) == b"\0" * 20
