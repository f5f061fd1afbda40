"""A local HTTP server standing in for Slack: incoming webhooks and ``chat.postMessage``.

* ``POST <any path but /api/…>``: an incoming webhook; answers ``200 ok`` like Slack does.
* ``POST /api/chat.postMessage``: the Web API; checks ``Authorization: Bearer <token>`` (when a
  token is set) and answers ``{"ok": true, "channel": …, "ts": …}``.

Every request is recorded (:class:`SlackRequest`), with the status answered; ``messages`` are
the delivered ones. Failure modes for tests:

* :meth:`SlackMock.fail_next` — answer the next N requests with a status (429 with ``Retry-After``, 500…);
* :meth:`SlackMock.down` / :meth:`SlackMock.up` — close the port (connection refused) and reopen it;
* :meth:`SlackMock.hang` — accept requests but do not answer until :meth:`SlackMock.release`.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

WEBHOOK_PATH = "/services/T0SPENDGATE/B0ALERTS/mockwebhooksecret"


@dataclasses.dataclass
class SlackRequest:
    seq: int
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    at: float  # time.monotonic() on arrival
    wall: float  # time.time() on arrival
    status: int | None = None  # what the mock answered (None: not answered, e.g. hung)

    @property
    def kind(self) -> str:
        if self.path.startswith("/api/"):
            return self.path[len("/api/"):]
        return "webhook"

    @property
    def json(self) -> Any:
        try:
            return json.loads(self.body)
        except ValueError:
            return None

    @property
    def text(self) -> str:
        j = self.json
        return j.get("text", "") if isinstance(j, dict) else ""

    @property
    def blocks(self) -> list[dict[str, Any]]:
        j = self.json
        b = j.get("blocks") if isinstance(j, dict) else None
        if isinstance(b, str):
            try:
                b = json.loads(b)
            except ValueError:
                return []
        return b if isinstance(b, list) else []

    @property
    def delivered(self) -> bool:
        return self.status == 200 and (self.kind == "webhook" or (self.json or {}).get("channel") is not None)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def do_POST(self) -> None:
        mock = self.server.mock
        n = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(n) if n else b""
        rec = SlackRequest(0, "POST", self.path.split("?", 1)[0], {k.lower(): v for k, v in self.headers.items()},
                           body, time.monotonic(), time.time())
        mock._record(rec)
        if mock._hang.is_set():
            mock._released.wait(60)
            self.close_connection = True
            return
        forced = mock._take_forced()
        if forced is not None:
            status, retry_after = forced
            headers = {"Retry-After": str(retry_after)} if retry_after is not None else {}
            if rec.kind == "webhook":
                self._send(rec, status, b"rate_limited" if status == 429 else b"internal_error", "text/plain", headers)
            else:
                err = "ratelimited" if status == 429 else "internal_error"
                self._send(rec, status, json.dumps({"ok": False, "error": err}).encode(), "application/json", headers)
            return
        if rec.kind == "webhook":
            self._send(rec, 200, b"ok", "text/html")
            return
        if rec.kind == "chat.postMessage":
            auth = rec.headers.get("authorization", "")
            if mock.token is not None and auth != f"Bearer {mock.token}":
                self._send(rec, 200, json.dumps({"ok": False, "error": "invalid_auth"}).encode(), "application/json")
                rec.status = 401  # answered 200 like Slack, but not delivered
                return
            j = rec.json if isinstance(rec.json, dict) else {}
            ts = f"{int(rec.wall)}.{rec.seq:06d}"
            out = {"ok": True, "channel": j.get("channel"), "ts": ts,
                   "message": {"text": j.get("text"), "ts": ts, "type": "message"}}
            self._send(rec, 200, json.dumps(out).encode(), "application/json")
            return
        self._send(rec, 200, json.dumps({"ok": False, "error": "unknown_method"}).encode(), "application/json")
        rec.status = 404

    def _send(self, rec: SlackRequest, status: int, body: bytes, ctype: str,
              headers: dict[str, str] | None = None) -> None:
        rec.status = status
        self.send_response(status)
        self.send_header("content-type", ctype)
        self.send_header("content-length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)
        with self.server.mock._cond:
            self.server.mock._cond.notify_all()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, addr: tuple[str, int], mock: SlackMock) -> None:
        self.mock = mock
        super().__init__(addr, _Handler)


class SlackMock:
    """Args:
        host / port: where to listen (port 0: any free port, kept across down()/up()).
        token: bot token chat.postMessage must carry (None: any).
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, token: str | None = None) -> None:
        self.host = host
        self.port = port
        self.token = token
        self.requests: list[SlackRequest] = []
        self._cond = threading.Condition()
        self._forced: deque[tuple[int, int | None]] = deque()
        self._hang = threading.Event()
        self._released = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # ---- lifecycle

    def start(self) -> SlackMock:
        self._server = _Server((self.host, self.port), self)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"slack-mock-{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.release()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def __enter__(self) -> SlackMock:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def down(self) -> None:
        """Close the port: clients get "connection refused"."""
        self.stop()

    def up(self) -> None:
        if self._server is None:
            self.start()

    def hang(self) -> None:
        """Accept and read requests, answer none (until release())."""
        self._released.clear()
        self._hang.set()

    def release(self) -> None:
        self._hang.clear()
        self._released.set()

    def reset(self) -> None:
        with self._cond:
            self.requests.clear()
            self._forced.clear()
        self.release()
        self.up()

    # ---- urls

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def webhook_url(self) -> str:
        return self.url + WEBHOOK_PATH

    @property
    def api_url(self) -> str:
        return self.url + "/api/"

    # ---- behaviour

    def fail_next(self, status: int = 429, retry_after: int | None = None, times: int = 1) -> None:
        """Answer the next ``times`` requests with ``status`` (and ``Retry-After``), then normally."""
        with self._cond:
            for _ in range(times):
                self._forced.append((status, retry_after))

    def _take_forced(self) -> tuple[int, int | None] | None:
        with self._cond:
            return self._forced.popleft() if self._forced else None

    # ---- records

    def _record(self, rec: SlackRequest) -> None:
        with self._cond:
            rec.seq = len(self.requests) + 1
            self.requests.append(rec)
            self._cond.notify_all()

    @property
    def messages(self) -> list[SlackRequest]:
        """Delivered messages, in arrival order."""
        with self._cond:
            return [r for r in self.requests if r.delivered]

    def wait_for(self, n: int, timeout: float = 10.0,
                 where: Callable[[SlackRequest], bool] = lambda r: True) -> list[SlackRequest]:
        """Wait until at least ``n`` delivered messages match ``where``; returns them."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                got = [r for r in self.requests if r.delivered and where(r)]
                if len(got) >= n:
                    return got
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"Slack mock: {len(got)} matching message(s) of {n} after {timeout}s; "
                                       f"all requests: {[(r.kind, r.status, r.text[:80]) for r in self.requests]}")
                self._cond.wait(min(left, 0.1))
