"""A leaky "provider" upstream: it answers with the credential it was sent.

Real providers echo a wrong key back in their error messages ("Incorrect API key provided:
sk-…"), and a debugging proxy may reflect headers. Pointed at by a provider's ``upstream``, this
server lets a test check that the gateway redacts the team's upstream key before the client
sees it. The request header ``x-echo-mode`` picks where the key comes back:

* ``error`` (default): a 401 OpenAI-shaped error whose message contains the key;
* ``header``: a 200 chat completion with the key in the ``x-upstream-debug`` header;
* ``stream``: a 200 SSE chat stream with the key in one delta, written in two halves split
  inside the key (so a redactor must carry state across reads).
"""

from __future__ import annotations

import json
import ssl
import tempfile
import threading
import time
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from tests.rig.mock_provider import generate_cert

MODE_HEADER = "x-echo-mode"


def _credential(headers: Any) -> str:
    auth = headers.get("Authorization") or ""
    if auth.lower().startswith("bearer "):
        return str(auth[7:].strip())
    for name in ("x-api-key", "api-key", "x-goog-api-key"):
        if headers.get(name):
            return str(headers[name])
    return ""


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        key = _credential(self.headers)
        self.server.echo.record(key)
        mode = self.headers.get(MODE_HEADER, "error")
        if mode == "stream":
            self._stream(key)
        elif mode == "header":
            self._json(200, {"id": "chatcmpl-echo", "object": "chat.completion", "model": "echo",
                             "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"},
                                          "finish_reason": "stop"}],
                             "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}},
                       [("x-upstream-debug", f"received key={key}")])
        else:
            self._json(401, {"error": {"message": f"Incorrect API key provided: {key}. You can find your API key "
                                                  "at https://platform.openai.com/account/api-keys.",
                                       "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}})

    do_GET = do_POST

    def _json(self, status: int, doc: dict[str, Any], headers: Sequence[tuple[str, str]] = ()) -> None:
        body = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for k, v in headers:
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _stream(self, key: str) -> None:
        def event(delta: dict[str, Any], finish: str | None = None) -> bytes:
            chunk = {"id": "chatcmpl-echo", "object": "chat.completion.chunk", "created": 0, "model": "echo",
                     "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            return b"data: " + json.dumps(chunk).encode() + b"\n\n"

        leaky = event({"content": f"your key is {key}, keep it safe"})
        cut = leaky.index(key.encode()) + len(key) // 2
        writes = [event({"role": "assistant", "content": ""}), leaky[:cut], leaky[cut:],
                  event({}, "stop"), b"data: [DONE]\n\n"]
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for data in writes:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()
            time.sleep(0.05)  # each write its own TCP read at the gateway
        self.wfile.write(b"0\r\n\r\n")


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, echo: EchoUpstream, ctx: ssl.SSLContext) -> None:
        self.echo = echo
        self.ctx = ctx
        super().__init__(("127.0.0.1", 0), _Handler)

    def finish_request(self, request: Any, client_address: Any) -> None:
        try:  # the handshake runs on the request's own thread, not the accept loop
            request.settimeout(10)
            conn = self.ctx.wrap_socket(request, server_side=True)
        except (OSError, ssl.SSLError):
            request.close()
            return
        try:
            _Handler(conn, client_address, self)
        except OSError:  # the gateway hung up
            pass
        finally:
            conn.close()


class EchoUpstream:
    """HTTPS on 127.0.0.1 with a fresh self-signed certificate (configure ``verify_upstream_tls = false``)."""

    def __init__(self) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="echo-upstream-")
        cert, key = generate_cert(Path(self._tmp.name))
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        self._server = _Server(self, ctx)
        self.port: int = self._server.server_address[1]
        self._lock = threading.Lock()
        self._keys: list[str] = []
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name=f"echo-upstream-{self.port}", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def record(self, key: str) -> None:
        with self._lock:
            self._keys.append(key)

    @property
    def keys_received(self) -> list[str]:
        """The credential of every request received, in order."""
        with self._lock:
            return list(self._keys)

    def clear(self) -> None:
        with self._lock:
            self._keys.clear()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
        self._tmp.cleanup()

    def __enter__(self) -> EchoUpstream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
