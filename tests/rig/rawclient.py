"""Hand-made HTTP/1.1 and HTTP/2 through the gateway: what no SDK would send.

A hostile client controls every byte: the CONNECT target, the TLS SNI, the Host header, the
request line, the framing and the timing. These helpers do the plumbing (CONNECT, TLS that
trusts the gateway CA with a chosen SNI, reading one response) and leave the bytes to the test.
Every read has a timeout, so a gateway that never answers fails a test instead of hanging it.
"""

from __future__ import annotations

import base64
import json
import select
import socket
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events

HeaderList = Sequence[tuple[str, str | bytes]]


def basic(user: str, password: str) -> str:
    """A ``Proxy-Authorization`` value, as ``HTTPS_PROXY=http://user:password@…`` makes one."""
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@dataclass
class RawResponse:
    """One response as it came off the wire."""

    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes
    raw: bytes  # every byte read for it (status line, headers, framing, body): for leak scans

    def header(self, name: str) -> str | None:
        name = name.lower()
        return next((v for k, v in self.headers if k.lower() == name), None)

    def json(self) -> Any:
        return json.loads(self.body)


class PeerClosed(ConnectionError):
    """The gateway closed the connection before a complete response arrived."""


def http1_request(method: str, target: str, headers: HeaderList = (), body: bytes | None = None) -> bytes:
    """The bytes of one HTTP/1.1 request; ``Content-Length`` is added for a body unless framing is given.

    Values may be bytes, so a test can send what no well-behaved client would.
    """
    names = {k.lower() for k, _ in headers}
    lines = [f"{method} {target} HTTP/1.1".encode()]
    for k, v in headers:
        lines.append(k.encode() + b": " + (v if isinstance(v, bytes) else v.encode()))
    if body is not None and not names & {"content-length", "transfer-encoding"}:
        lines.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join(lines) + b"\r\n\r\n" + (body or b"")


def chunked(body: bytes, size: int) -> bytes:
    """``body`` in HTTP/1.1 chunked framing, ``size`` bytes a chunk."""
    out = [b"%x\r\n%s\r\n" % (len(body[i:i + size]), body[i:i + size]) for i in range(0, len(body), size)]
    return b"".join(out) + b"0\r\n\r\n"


class HTTP1:
    """One HTTP/1.1 connection (plain or TLS) that keeps unread bytes between responses.

    Args:
        sock: a connected socket, plain or TLS.
        record: called with the raw bytes of every response read (a leak collector).
    """

    def __init__(self, sock: socket.socket, record: Callable[[bytes], None] | None = None) -> None:
        self.sock = sock
        self.record = record
        self._buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self, deadline: float) -> None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("no complete response before the deadline")
        self.sock.settimeout(left)
        try:
            chunk = self.sock.recv(65536)
        except ssl.SSLZeroReturnError:
            chunk = b""
        except ConnectionResetError as e:
            raise PeerClosed(f"connection reset after {len(self._buf)} bytes: {self._buf[:200]!r}") from e
        if not chunk:
            raise PeerClosed(f"connection closed after {len(self._buf)} bytes: {self._buf[:200]!r}")
        self._buf += chunk

    def _take(self, n: int) -> bytes:
        out, self._buf = self._buf[:n], self._buf[n:]
        return out

    def _read_until(self, marker: bytes, deadline: float) -> bytes:
        while marker not in self._buf:
            self._fill(deadline)
        return self._take(self._buf.index(marker) + len(marker))

    def _read_exactly(self, n: int, deadline: float) -> bytes:
        while len(self._buf) < n:
            self._fill(deadline)
        return self._take(n)

    def read_response(self, timeout: float = 10.0, *, head: bool = False) -> RawResponse:
        """Read the next response (a ``1xx`` is returned on its own, as the client sees it).

        ``head``: the request was a HEAD or a CONNECT, so a 2xx carries no body.
        """
        deadline = time.monotonic() + timeout
        start = self._read_until(b"\r\n\r\n", deadline)
        lines = start[:-4].decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        status = int(parts[1])
        reason = parts[2] if len(parts) > 2 else ""
        headers = [(k.strip(), v.strip()) for k, _, v in (ln.partition(":") for ln in lines[1:])]
        resp = RawResponse(status, reason, headers, b"", start)
        te = (resp.header("transfer-encoding") or "").lower()
        length = resp.header("content-length")
        if status < 200 or status in (204, 304) or (head and status < 300):
            pass
        elif "chunked" in te:
            body = b""
            while True:
                size_line = self._read_until(b"\r\n", deadline)
                resp.raw += size_line
                size = int(size_line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    resp.raw += self._read_until(b"\r\n", deadline)  # no trailers expected
                    break
                data = self._read_exactly(size + 2, deadline)
                resp.raw += data
                body += data[:-2]
            resp.body = body
        elif length is not None:
            resp.body = self._read_exactly(int(length), deadline)
            resp.raw += resp.body
        else:  # delimited by the close
            try:
                while True:
                    self._fill(deadline)
            except PeerClosed:
                pass
            resp.body = self._take(len(self._buf))
            resp.raw += resp.body
        if self.record is not None:
            self.record(resp.raw)
        return resp

    def exchange(self, request: bytes, timeout: float = 10.0) -> RawResponse:
        self.send(request)
        return self.read_response(timeout, head=request.startswith((b"HEAD ", b"CONNECT ")))

    def closed_by_peer(self, timeout: float = 3.0) -> bool:
        """True when the peer closes (EOF or reset) within ``timeout`` and sends nothing more."""
        if self._buf:
            return False
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = self.sock.recv(65536)
            except (TimeoutError, BlockingIOError):
                return False
            except ssl.SSLZeroReturnError:
                return True
            except (ConnectionResetError, BrokenPipeError, ssl.SSLError):
                return True
            if not chunk:
                return True
            self._buf += chunk
            return False
        return False

    def wait_readable(self, timeout: float) -> bool:
        """Whether a byte (or EOF) is waiting to be read within ``timeout`` seconds."""
        if self._buf or (isinstance(self.sock, ssl.SSLSocket) and self.sock.pending()):
            return True
        ready, _, _ = select.select([self.sock], [], [], timeout)
        return bool(ready)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> HTTP1:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_proxy(port: int, host: str = "127.0.0.1", timeout: float = 10.0,
               record: Callable[[bytes], None] | None = None) -> HTTP1:
    """A plain TCP connection to the gateway's proxy port."""
    return HTTP1(socket.create_connection((host, port), timeout=timeout), record)


def connect(port: int, target: str, *, proxy_auth: str | None = None, host_header: str | None = None,
            extra_headers: HeaderList = (), timeout: float = 10.0,
            record: Callable[[bytes], None] | None = None) -> tuple[RawResponse, HTTP1]:
    """``CONNECT target`` to the gateway; returns its answer and the connection, left open."""
    conn = open_proxy(port, timeout=timeout, record=record)
    headers: list[tuple[str, str | bytes]] = [("Host", host_header or target)]
    if proxy_auth is not None:
        headers.append(("Proxy-Authorization", proxy_auth))
    headers += list(extra_headers)
    resp = conn.exchange(http1_request("CONNECT", target, headers), timeout)
    return resp, conn


def start_tls(conn: HTTP1, *, cafile: Path | str, server_hostname: str | None, alpn: Sequence[str] = ("http/1.1",),
              check_hostname: bool = True, timeout: float = 10.0) -> HTTP1:
    """TLS over an open tunnel, trusting only ``cafile``; ``server_hostname`` is the SNI sent (None: no SNI).

    ``check_hostname=False`` still verifies the chain, for SNI values a certificate cannot name.
    """
    ctx = ssl.create_default_context(cafile=str(cafile))
    ctx.check_hostname = check_hostname and server_hostname is not None
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    conn.sock.settimeout(timeout)
    tls = ctx.wrap_socket(conn.sock, server_hostname=server_hostname)
    return HTTP1(tls, conn.record)


class TunnelRefused(AssertionError):
    """The gateway did not answer a CONNECT with 200."""

    def __init__(self, response: RawResponse) -> None:
        super().__init__(f"CONNECT answered {response.status} {response.reason}: {response.body[:300]!r}")
        self.response = response


def tls_tunnel(port: int, target: str, *, cafile: Path | str, sni: str | None, proxy_auth: str | None = None,
               alpn: Sequence[str] = ("http/1.1",), check_hostname: bool = True, timeout: float = 10.0,
               record: Callable[[bytes], None] | None = None) -> HTTP1:
    """CONNECT then TLS with the given SNI; raises :class:`TunnelRefused` unless the CONNECT got 200."""
    resp, conn = connect(port, target, proxy_auth=proxy_auth, timeout=timeout, record=record)
    if resp.status != 200:
        conn.close()
        raise TunnelRefused(resp)
    return start_tls(conn, cafile=cafile, server_hostname=sni, alpn=alpn, check_hostname=check_hostname,
                     timeout=timeout)


def h2_request(conn: HTTP1, headers: HeaderList, body: bytes = b"", timeout: float = 10.0) -> RawResponse:
    """One HTTP/2 request on a fresh TLS connection that negotiated ``h2``; pseudo-headers as given.

    Outbound header validation is off, so ``:authority`` and ``host`` can say anything.
    A stream reset or GOAWAY before a response gives status 0.
    """
    sock = conn.sock
    h2c = h2.connection.H2Connection(h2.config.H2Configuration(
        client_side=True, header_encoding="utf-8", validate_outbound_headers=False,
        normalize_outbound_headers=False, validate_inbound_headers=False))
    h2c.initiate_connection()
    stream_id = h2c.get_next_available_stream_id()
    h2c.send_headers(stream_id, [(k, v if isinstance(v, str) else v.decode("latin-1")) for k, v in headers],
                     end_stream=not body)
    if body:
        h2c.send_data(stream_id, body, end_stream=True)
    sock.sendall(h2c.data_to_send())
    status, resp_headers, data = 0, [], b""
    deadline = time.monotonic() + timeout
    done = False
    while not done:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("no complete HTTP/2 response before the deadline")
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, ssl.SSLZeroReturnError):
            chunk = b""
        if not chunk:
            break
        for ev in h2c.receive_data(chunk):
            if isinstance(ev, h2.events.ResponseReceived) and ev.stream_id == stream_id:
                resp_headers = [(str(k), str(v)) for k, v in ev.headers or []]
                status = int(dict(resp_headers).get(":status", "0"))
            elif isinstance(ev, h2.events.DataReceived) and ev.stream_id == stream_id:
                data += ev.data or b""
                h2c.acknowledge_received_data(ev.flow_controlled_length or 0, stream_id)
            elif isinstance(ev, (h2.events.StreamEnded, h2.events.StreamReset)) and ev.stream_id == stream_id:
                done = True
            elif isinstance(ev, h2.events.ConnectionTerminated):
                done = True
        pending = h2c.data_to_send()
        if pending:
            sock.sendall(pending)
    # HPACK may Huffman-code header values: `raw` holds them decoded, so a leak scan can read them.
    raw = "\r\n".join(f"{k}: {v}" for k, v in resp_headers).encode() + b"\r\n\r\n" + data
    if conn.record is not None:
        conn.record(raw)
    return RawResponse(status, "", [(k, v) for k, v in resp_headers if not k.startswith(":")], data, raw)
