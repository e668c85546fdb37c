"""HTTP/1.1 GETs whose bodies the kernel copies straight into the caller's buffer.

aiohttp hands every received chunk over as a fresh `bytes` object through its StreamReader,
which the caller then copies into place: on the measured 2-core VM its range GETs cost about
0.75 CPU s/GB. Here an `asyncio.BufferedProtocol` gives the socket the caller's buffer itself,
so a body costs one kernel copy (0.31-0.41 CPU s/GB for the same GETs, signing included).

Only what S3 range GETs need: one request at a time per connection, keep-alive, success bodies
framed by Content-Length; error bodies may also be chunked or end at close; plain TCP or TLS;
through an HTTP proxy (HTTP_PROXY, HTTPS_PROXY, NO_PROXY, read as botocore reads them, so the
range reads go where boto3's requests go): plain requests in absolute form to the proxy, TLS
through a CONNECT tunnel.
"""

from __future__ import annotations

import asyncio
import base64
import socket
import ssl
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from botocore.utils import get_environ_proxies

from saesweep.errors import UserError

HEAD_LIMIT = 64 << 10
"""Longest status line plus headers accepted."""
ERROR_BODY_LIMIT = 1 << 20
"""Longest error body kept (S3 error documents are a few hundred bytes)."""
UNTIL_CLOSE, CHUNKED = -1, -2
"""Error bodies framed by the connection closing, or by chunked transfer encoding."""


class ProtocolError(ConnectionError):
    """The server's reply broke HTTP/1.1 framing; the connection is dropped."""


@dataclass(frozen=True)
class Proxy:
    """An HTTP proxy: where it listens, the Proxy-Authorization header value its URL's
    credentials give (None without), and the variable that named it (for messages, which
    never show the credentials)."""

    host: str
    port: int
    authorization: str | None
    variable: str

    def wants_credentials(self) -> UserError:
        """The error for the proxy's 407 (Proxy Authentication Required)."""
        return UserError(
            f"the proxy {self.host}:{self.port} ({self.variable}) asks for credentials "
            f"(HTTP 407); put them in {self.variable} as http://USER:PASSWORD@host:port"
        )


def proxy_for(url: str) -> Proxy | None:
    """The proxy the environment names for `url` (HTTPS_PROXY for https, HTTP_PROXY for
    http, either in lower case; none when NO_PROXY covers its host), or None."""
    scheme = urlsplit(url).scheme
    spec = get_environ_proxies(url).get(scheme)
    if not spec:
        return None
    variable = f"{scheme.upper()}_PROXY"
    parts = urlsplit(spec if "://" in spec else f"http://{spec}")
    if parts.scheme != "http" or not parts.hostname:
        raise UserError(
            f"{variable} must be an http:// proxy URL such as http://proxy.example.com:3128 "
            f"(it names a {parts.scheme}:// one); fix {variable} or list the endpoint's host "
            "in NO_PROXY"
        )
    authorization = None
    if parts.username is not None:
        pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
        authorization = "Basic " + base64.b64encode(pair.encode()).decode()
    return Proxy(parts.hostname, parts.port or 80, authorization, variable)


@dataclass(frozen=True)
class Reply:
    """A reply's status and headers (names lower-case); `into_target` when its body filled the
    caller's buffer, else `body` holds an error body (or None when none was read)."""

    status: int
    headers: dict[str, str]
    into_target: bool
    body: bytes | None


def parse_head(head: bytes) -> tuple[str, int, dict[str, str]]:
    """(version, status, headers) of an HTTP/1.x status line and header block."""
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise ProtocolError(f"not an HTTP/1.1 status line: {lines[0][:80]!r}")
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep:
            raise ProtocolError(f"malformed header line: {line[:80]!r}")
        headers[name.strip().lower()] = value.strip()
    return parts[0], int(parts[1]), headers


def dechunk(raw: bytes) -> bytes | None:
    """The body of a complete chunked transfer encoding, or None while it is incomplete."""
    out, pos = bytearray(), 0
    while True:
        end = raw.find(b"\r\n", pos)
        if end < 0:
            return None
        try:
            size = int(raw[pos:end].split(b";")[0], 16)
        except ValueError as err:
            raise ProtocolError("malformed chunk size") from err
        if size == 0:
            return bytes(out) if raw.find(b"\r\n\r\n", end) >= 0 else None
        if len(raw) < end + 2 + size + 2:
            return None
        out += raw[end + 2 : end + 2 + size]
        pos = end + 2 + size + 2


class Connection(asyncio.BufferedProtocol):
    """One kept-alive connection: `get(request, target)` sends a GET and receives a success
    body of exactly len(target) bytes into `target` itself."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.reusable = False
        self._head = bytearray(HEAD_LIMIT)
        self._scratch = bytearray(64 << 10)
        self._waiter: asyncio.Future | None = None

    def connection_made(self, transport) -> None:
        self.transport, self.reusable = transport, True

    def eof_received(self) -> None:
        self.reusable = False  # the peer is closing: take no new request (connection_lost follows)

    def connection_lost(self, exc: Exception | None) -> None:
        self.reusable = False
        if self._waiter is None or self._waiter.done():
            return
        if self._sink == "body" and self._want == UNTIL_CLOSE:
            self._finish(bytes(self._body))
        else:
            detail = f": {exc}" if exc else ""
            self._waiter.set_exception(ConnectionError(f"connection closed mid-reply{detail}"))

    def close(self) -> None:
        self.reusable = False
        if self.transport is not None:
            self.transport.abort()

    async def get(self, request: bytes, target: memoryview, timeout: float) -> Reply:
        """The reply to `request`; TimeoutError once no byte has arrived for `timeout` s."""
        loop = asyncio.get_running_loop()
        self._target, self._filled, self._head_len = target, 0, 0
        self._sink, self._want, self._body, self._reply = "head", 0, bytearray(), None
        self._waiter = loop.create_future()
        self._timeout, self._last_bytes = timeout, loop.time()
        self._timer = loop.call_later(timeout, self._check_silence)
        self.transport.write(request)
        try:
            return await self._waiter
        except BaseException:  # a timeout or cancellation leaves the reply half-read
            self.close()
            raise
        finally:
            self._timer.cancel()
            self._waiter, self._target = None, None

    def _check_silence(self) -> None:
        """Fail the request after `timeout` s without a byte; otherwise look again later."""
        if self._waiter is None or self._waiter.done():
            return
        loop = asyncio.get_running_loop()
        quiet = loop.time() - self._last_bytes
        if quiet >= self._timeout:
            self._waiter.set_exception(TimeoutError(f"no reply bytes for {self._timeout:g} s"))
        else:
            self._timer = loop.call_later(self._timeout - quiet, self._check_silence)

    def get_buffer(self, sizehint: int) -> memoryview | bytearray:
        if self._waiter is not None and self._sink == "target":
            return self._target[self._filled :]
        if self._waiter is not None and self._sink == "head":
            return memoryview(self._head)[self._head_len :]
        return self._scratch

    def buffer_updated(self, nbytes: int) -> None:
        try:
            if self._waiter is None or self._waiter.done():
                raise ProtocolError("bytes arrived with no request outstanding")
            self._last_bytes = asyncio.get_running_loop().time()
            if self._sink == "target":
                self._filled += nbytes
                if self._filled == len(self._target):
                    self._finish(None)
            elif self._sink == "head":
                self._head_len += nbytes
                self._on_head()
            else:
                self._on_body(self._scratch[:nbytes])
        except ProtocolError as err:
            if self._waiter is not None and not self._waiter.done():
                self._waiter.set_exception(err)
            self.close()

    def _on_head(self) -> None:
        end = self._head.find(b"\r\n\r\n", 0, self._head_len)
        if end < 0:
            if self._head_len == HEAD_LIMIT:
                raise ProtocolError(f"reply headers longer than {HEAD_LIMIT} bytes")
            return
        version, status, headers = parse_head(bytes(self._head[:end]))
        extra = bytes(self._head[end + 4 : self._head_len])
        if 100 <= status < 200:  # an interim reply: the real one follows
            self._head[: len(extra)], self._head_len = extra, len(extra)
            self._on_head()
            return
        connection = headers.get("connection", "").lower()
        if connection == "close" or (version == "HTTP/1.0" and connection != "keep-alive"):
            self.reusable = False
        self._reply = (status, headers)
        length = headers.get("content-length")
        length = int(length) if length is not None and length.isdigit() else None
        if status in (200, 206) and length == len(self._target):
            if len(extra) > len(self._target):
                raise ProtocolError("reply body longer than its Content-Length")
            self._sink = "target"
            self._target[: len(extra)] = extra
            self._filled = len(extra)
            if self._filled == len(self._target):
                self._finish(None)
            return
        if status in (200, 206) or (length or 0) > ERROR_BODY_LIMIT:
            self.reusable = False  # a body we will not read: the connection cannot go on
            self._finish(None)
            return
        if "chunked" in headers.get("transfer-encoding", "").lower():
            self._want = CHUNKED
        elif length is None:
            self._want, self.reusable = UNTIL_CLOSE, False
        else:
            self._want = length
        self._sink = "body"
        self._on_body(extra)

    def _on_body(self, data) -> None:
        self._body += data
        if len(self._body) > ERROR_BODY_LIMIT:
            raise ProtocolError(f"error reply body longer than {ERROR_BODY_LIMIT} bytes")
        if self._want == CHUNKED:
            body = dechunk(bytes(self._body))
            if body is not None:
                self._finish(body)
        elif self._want >= 0 and len(self._body) >= self._want:
            if len(self._body) > self._want:
                raise ProtocolError("reply body longer than its Content-Length")
            self._finish(bytes(self._body))

    def _finish(self, body: bytes | None) -> None:
        """Answer the request: `body` is the error body read, None when the body went into
        the target or was not read."""
        status, headers = self._reply
        into_target, self._sink = self._sink == "target", "done"
        self._waiter.set_result(Reply(status, headers, into_target, body))


class ConnectionPool:
    """Up to `limit` kept-alive connections to one host, used one request at a time each;
    over TLS when `tls` (a client context) is given; through `proxy` when given (with TLS a
    CONNECT tunnel; without, the proxy is the peer and requests must be in absolute form)."""

    def __init__(
        self,
        host: str,
        port: int,
        tls: ssl.SSLContext | None,
        limit: int,
        connect_timeout: float,
        proxy: Proxy | None = None,
    ):
        self.host, self.port, self.limit, self.connect_timeout = host, port, limit, connect_timeout
        self.tls, self.proxy = tls, proxy
        self._idle: list[Connection] = []
        self._slots: asyncio.Semaphore | None = None

    async def get(self, request: bytes, target: memoryview, timeout: float) -> Reply:
        self._slots = self._slots or asyncio.Semaphore(self.limit)
        async with self._slots:
            conn = self._take_idle() or await self._connect()
            try:
                reply = await conn.get(request, target, timeout)
            except BaseException:
                conn.close()
                raise
            if conn.reusable:
                self._idle.append(conn)
            else:
                conn.close()
            return reply

    def _take_idle(self) -> Connection | None:
        while self._idle:
            conn = self._idle.pop()
            if conn.reusable:
                return conn
        return None

    async def _connect(self) -> Connection:
        loop = asyncio.get_running_loop()
        hostname = self.host if self.tls else None
        proxy = self.proxy
        try:
            if proxy is None:
                where = {"host": self.host, "port": self.port}
            elif self.tls is None:
                where = {"host": proxy.host, "port": proxy.port}
            else:
                where = {"sock": await asyncio.wait_for(self._tunnel(), self.connect_timeout)}
            _, conn = await asyncio.wait_for(
                loop.create_connection(Connection, **where, ssl=self.tls, server_hostname=hostname),
                self.connect_timeout,
            )
        except ssl.SSLCertVerificationError as err:  # no retry will fix it
            raise UserError(
                f"the TLS certificate of {self.host}:{self.port} failed verification "
                f"({err.verify_message}); fix the endpoint URL or the server's certificate"
            ) from err
        except OSError as err:  # refused, unresolvable, a dropped handshake: worth a retry
            via = ""
            if proxy is not None:
                via = f" through the proxy {proxy.host}:{proxy.port} ({proxy.variable})"
            raise ConnectionError(f"cannot connect to {self.host}:{self.port}{via}: {err}") from err
        return conn

    async def _tunnel(self) -> socket.socket:
        """A socket to the proxy, tunnelled by CONNECT to host:port (TLS goes over it)."""
        loop, proxy = asyncio.get_running_loop(), self.proxy
        family, kind, proto, _, address = (
            await loop.getaddrinfo(proxy.host, proxy.port, type=socket.SOCK_STREAM)
        )[0]
        sock = socket.socket(family, kind, proto)
        sock.setblocking(False)
        name = f"[{self.host}]" if ":" in self.host else self.host
        target = f"{name}:{self.port}"
        try:
            await loop.sock_connect(sock, address)
            lines = [f"CONNECT {target} HTTP/1.1", f"Host: {target}"]
            if proxy.authorization:
                lines.append(f"Proxy-Authorization: {proxy.authorization}")
            await loop.sock_sendall(sock, ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
            head = bytearray()
            while b"\r\n\r\n" not in head:  # the proxy says nothing more until TLS begins
                data = await loop.sock_recv(sock, 1)
                if not data or len(head) >= HEAD_LIMIT:
                    raise ConnectionError("the proxy closed the CONNECT tunnel before replying")
                head += data
            _, status, _ = parse_head(bytes(head[:-4]))
            if status == 407:
                raise proxy.wants_credentials()
            if not 200 <= status < 300:
                raise ConnectionError(f"the proxy refused to CONNECT to {target}: HTTP {status}")
        except BaseException:
            sock.close()
            raise
        return sock

    def close(self) -> None:
        for conn in self._idle:
            conn.close()
        self._idle.clear()
