"""The receive-into-buffer HTTP/1.1 client against a loopback server that sends exact bytes
(framings SeaweedFS never produces: chunked and close-delimited bodies, broken replies)."""

from __future__ import annotations

import asyncio
import ssl
import subprocess

import pytest

from saesweep.store.http_recv import ConnectionPool, ProtocolError, dechunk

REQUEST = b"GET /obj HTTP/1.1\r\nHost: x\r\n\r\n"


async def serve(replies: list[bytes], piece: int = 1 << 20, stall: bool = False, tls=None):
    """A server that answers the n-th request (on any connection) with replies[n], sent in
    pieces of `piece` bytes; closes a connection after a reply with "Connection: close" or
    without framing. Returns (server, list of accepted connection count)."""
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
            head = reply.split(b"\r\n\r\n")[0]
            framed = b"Content-Length" in head or b"chunked" in head
            if b"Connection: close" in head or not framed:
                break
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=tls)
    return server, accepted


def run(replies: list[bytes], targets: list[int], piece: int = 1 << 20, timeout: float = 5.0):
    """(replies, accepted connections, target buffers) of len(targets) GETs in a row."""

    async def main():
        server, accepted = await serve(replies, piece)
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


def test_tls(tmp_path):
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
