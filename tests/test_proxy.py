"""S3 range reads through a real HTTP proxy (Debian's tinyproxy): HTTP_PROXY forwards plain
requests, HTTPS_PROXY tunnels TLS with CONNECT, NO_PROXY bypasses, credentials in the proxy
URL authenticate and are never printed."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import subprocess
import time
from pathlib import Path

import pytest
from s3server import free_ports
from synthetic import make_collection
from test_http_recv import REQUEST, ok, self_signed, serve

from saesweep import Reader
from saesweep.errors import UserError
from saesweep.store.http_recv import ConnectionPool, Proxy, proxy_for
from saesweep.store.s3_async import AsyncRangeReader

SIZES = [300, 250, 310, 90]


class Tinyproxy:
    """tinyproxy on a free loopback port, logging every request to `log`."""

    def __init__(self, root: Path, basic_auth: tuple[str, str] | None = None):
        (self.port,) = free_ports(1)
        self.log = root / "tinyproxy.log"
        conf = root / "tinyproxy.conf"
        lines = [f"Port {self.port}", "Listen 127.0.0.1", "Timeout 60", f'LogFile "{self.log}"']
        lines += ["LogLevel Connect", "MaxClients 64", "Allow 127.0.0.1"]
        if basic_auth:
            lines.append(f"BasicAuth {basic_auth[0]} {basic_auth[1]}")
        conf.write_text("\n".join(lines) + "\n")
        self.proc = subprocess.Popen(["tinyproxy", "-d", "-c", str(conf)])
        for _ in range(200):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port)):
                break
            time.sleep(0.05)

    def requests(self) -> list[str]:
        """The request lines the proxy logged so far."""
        text = self.log.read_text() if self.log.exists() else ""
        return [line.split("): ", 1)[1] for line in text.splitlines() if "Request (" in line]

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def tinyproxy(tmp_path):
    proxy = Tinyproxy(tmp_path)
    yield proxy
    proxy.stop()


def test_s3_reads_go_through_http_proxy_unless_no_proxy(s3_env, tinyproxy, monkeypatch):
    make_collection(s3_env, SIZES)
    bucket = s3_env.removeprefix("s3://").split("/")[0]
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{tinyproxy.port}")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    tokens = sorted(int(v) for b in Reader(s3_env, batch_size=64) for v in b[:, 0].tolist())
    assert tokens == list(range(sum(SIZES)))
    shard_gets = [r for r in tinyproxy.requests() if f"/{bucket}/run/" in r and ".safetensors" in r]
    assert len(shard_gets) >= len(SIZES), "every shard's range GETs went through the proxy"
    assert all(r.startswith("GET http://127.0.0.1:") for r in shard_gets)
    before = len(tinyproxy.requests())
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    assert sum(len(b) for b in Reader(s3_env, batch_size=64)) == sum(SIZES)
    assert len(tinyproxy.requests()) == before, "NO_PROXY: straight to the endpoint"


def tls_through(proxy: Proxy, tmp_path: Path, body: bytes) -> tuple[bytes, int]:
    """(what one GET received, connections the server accepted): a TLS server for localhost
    reached through `proxy` by CONNECT."""
    server_tls = self_signed(tmp_path)

    async def main():
        server, accepted = await serve([ok(body), ok(body)], tls=server_tls)
        port = server.sockets[0].getsockname()[1]
        client_tls = ssl.create_default_context(cafile=str(tmp_path / "cert.pem"))
        pool = ConnectionPool("localhost", port, client_tls, 1, 5, proxy=proxy)
        buffers = [bytearray(len(body)), bytearray(len(body))]
        try:
            for buffer in buffers:
                assert (await pool.get(REQUEST, memoryview(buffer), 5.0)).into_target
        finally:
            pool.close()
            server.close()
        assert buffers[0] == buffers[1]
        return bytes(buffers[0]), accepted[0]

    return asyncio.run(main())


async def plain_get(endpoint: str) -> None:
    async with AsyncRangeReader("b", endpoint, anonymous=True, attempts=1) as reader:
        await reader.get_object_into("k", memoryview(bytearray(4)), 4)


def test_tls_goes_through_a_connect_tunnel_with_the_urls_credentials(tmp_path, monkeypatch):
    proxy = Tinyproxy(tmp_path, basic_auth=("alice", "s3cret"))
    try:
        monkeypatch.setenv("HTTPS_PROXY", f"http://alice:s3cret@127.0.0.1:{proxy.port}")
        authorized = proxy_for("https://localhost:9/b/k")
        body = bytes(range(256)) * 300
        got, accepted = tls_through(authorized, tmp_path, body)
        assert got == body and accepted == 1, "one tunnel, kept alive for both GETs"
        assert any(r.startswith("CONNECT localhost:") for r in proxy.requests())
        anonymous = Proxy("127.0.0.1", proxy.port, None, "HTTPS_PROXY")
        with pytest.raises(UserError, match=r"asks for credentials \(HTTP 407\).*HTTPS_PROXY"):
            tls_through(anonymous, tmp_path, body)
        monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{proxy.port}")
        with pytest.raises(UserError, match=r"asks for credentials \(HTTP 407\).*HTTP_PROXY"):
            asyncio.run(plain_get("http://127.0.0.1:9"))
    finally:
        proxy.stop()


def test_proxy_urls_are_read_as_botocore_reads_them(monkeypatch):
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    assert proxy_for("http://127.0.0.1:8333/b/k") is None
    monkeypatch.setenv("HTTPS_PROXY", "proxy.example.com:3128")
    assert proxy_for("https://s3.amazonaws.com/b/k") == Proxy(
        "proxy.example.com", 3128, None, "HTTPS_PROXY"
    )
    assert proxy_for("http://127.0.0.1:8333/b/k") is None, "HTTPS_PROXY is for https only"
    monkeypatch.setenv("NO_PROXY", ".amazonaws.com")
    assert proxy_for("https://s3.amazonaws.com/b/k") is None
    monkeypatch.setenv("HTTPS_PROXY", "socks5://u:hidden@proxy.example.com:1080")
    with pytest.raises(UserError, match="HTTPS_PROXY must be an http:// proxy URL") as err:
        proxy_for("https://s3.example.com/b/k")
    assert "hidden" not in str(err.value)
