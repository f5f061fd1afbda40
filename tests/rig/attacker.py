"""A stand-in for a host the gateway must not reach, or must not give keys to.

:class:`Listener` accepts TCP on one loopback address, counts connections and keeps every byte
it is sent. A connection that opens with a TLS handshake is answered with the listener's own
self-signed certificate and its decrypted bytes are kept: an attacker with its own certificate
sees the plaintext of whatever the gateway sends it. Every request gets a short ``200 ok``.
"""

from __future__ import annotations

import socket
import ssl
import tempfile
import threading
from pathlib import Path
from urllib.parse import unquote

from tests.rig.mock_provider import generate_cert

ANSWER = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 11\r\nConnection: close\r\n\r\nlistener ok"


class Listener:
    """Records connections and bytes on ``host``:``port`` (0: a free port).

    Args:
        host: address to bind, e.g. ``127.0.0.1``, ``127.0.0.3`` or ``::1``.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self._tmp = tempfile.TemporaryDirectory(prefix="listener-")
        self.cert_path, key_path = generate_cert(Path(self._tmp.name))
        self.cert_der = ssl.PEM_cert_to_DER_cert(self.cert_path.read_text())
        self._ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._ctx.load_cert_chain(self.cert_path, key_path)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._sock = socket.create_server((host, port), family=family)
        self.port: int = self._sock.getsockname()[1]
        self._lock = threading.Lock()
        self._connections = 0
        self._received: list[bytes] = []
        self._history: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name=f"listener-{self.port}", daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        """``host:port`` as a CONNECT target (IPv6 in brackets)."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def connections(self) -> int:
        with self._lock:
            return self._connections

    @property
    def received(self) -> bytes:
        with self._lock:
            return b"".join(self._received)

    @property
    def history(self) -> bytes:
        """Every byte received since the listener started, whatever :meth:`clear` forgot."""
        with self._lock:
            return b"".join(self._history)

    def saw(self, secret: str) -> bool:
        """Whether ``secret`` reached the listener, raw or percent-encoded (at any depth)."""
        text = self.received.decode("latin-1")
        for _ in range(3):
            if secret in text:
                return True
            text = unquote(text)
        return secret in text

    def clear(self) -> None:
        """Forget connections and bytes (not the :attr:`history`)."""
        with self._lock:
            self._connections = 0
            self._received.clear()

    def _serve(self) -> None:
        self._sock.settimeout(0.2)
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except (TimeoutError, OSError):
                continue
            with self._lock:
                self._connections += 1
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _keep(self, data: bytes) -> None:
        with self._lock:
            self._received.append(data)
            self._history.append(data)

    def _answer(self, conn: socket.socket) -> None:
        conn.settimeout(5)
        try:
            first = conn.recv(1, socket.MSG_PEEK)
            stream: socket.socket = self._ctx.wrap_socket(conn, server_side=True) if first == b"\x16" else conn
            with stream:
                buf = b""
                while b"\r\n\r\n" not in buf:
                    chunk = stream.recv(65536)
                    if not chunk:
                        return
                    buf += chunk
                    self._keep(chunk)
                stream.sendall(ANSWER)
                while chunk := stream.recv(65536):  # whatever else is sent (a body) is kept too
                    self._keep(chunk)
        except (OSError, ssl.SSLError):
            pass

    def close(self) -> None:
        self._stop.set()
        self._sock.close()
        self._thread.join(2)
        self._tmp.cleanup()

    def __enter__(self) -> Listener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
