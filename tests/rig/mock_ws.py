"""WebSocket side of the mock provider: RFC 6455 over the mock's own (TLS) socket, framed by wsproto.

The HTTP server parses the upgrade request as any other request; :func:`serve` answers it
(``101``, or a provider-shaped refusal), negotiates ``permessage-deflate`` when the client
offers it, and runs one single-threaded loop per socket: it reads frames (answering pings,
closes), queues the client's messages, and drives the protocol handler
(:mod:`tests.rig.mock_realtime`) one message at a time, in order. A handler is a generator of
actions (send a frame, sleep, abort the TCP connection, close), so slow / hang / truncate
scenarios keep reading the socket while they wait.

Everything is recorded in a :class:`RecordedWsSession` (``MockProvider.ws_sessions``): the
upgrade's headers (Authorization included), every message in and out, and one
:class:`WsCall` per model response with the usage the mock reported.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import socket
import threading
import time
from collections import deque
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Ping, Pong, TextMessage
from wsproto.extensions import Extension, PerMessageDeflate
from wsproto.handshake import server_extensions_handshake
from wsproto.utilities import LocalProtocolError, split_comma_header

if TYPE_CHECKING:
    from .mock_provider import RecordedRequest, Scenario, _Handler

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
WS_ENDPOINTS = {"responses_ws", "realtime", "live"}
_POLL_S = 0.02  # longest the loop sleeps without looking at commands, the clock and the stop flag


# --------------------------------------------------------------------------- records


@dataclasses.dataclass
class WsMessage:
    """One WebSocket data message (fragments joined)."""

    direction: str  # "in" (client -> mock) | "out" (mock -> client)
    kind: str  # "text" | "binary"
    data: str | bytes
    at: float  # time.monotonic()

    @property
    def text(self) -> str:
        return self.data if isinstance(self.data, str) else bytes(self.data).decode("utf-8", "replace")

    @property
    def json(self) -> Any:
        try:
            return json.loads(self.text)
        except ValueError:
            return None


@dataclasses.dataclass
class WsCall:
    """One model response on a socket: a Responses ``response.create``, a Realtime
    ``response.create`` or a Gemini Live turn."""

    index: int  # 0-based, per session
    kind: str  # "response.create" | "response.append" | "realtime.response" | "live.turn"
    request: dict[str, Any]  # the client message that started it (JSON)
    model: str | None
    scenario: Scenario
    tokens: dict[str, int]  # plan_tokens()-style numbers (+ audio_* for realtime)
    response_id: str = ""
    events: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # server events, in order
    usage: dict[str, Any] | None = None  # provider-native usage object that reached the wire
    usage_sent: bool = False
    completed: bool = False  # ended normally (response.completed / response.done completed / turnComplete)
    failed: bool = False  # ended with an error event, response.failed or a failed response.done
    started_at: float = dataclasses.field(default_factory=time.monotonic)
    finished_at: float | None = None

    def event_types(self) -> list[str]:
        return [str(e.get("type") or next(iter(e), "")) for e in self.events]


@dataclasses.dataclass
class RecordedWsSession:
    """One WebSocket connection the mock accepted (or refused)."""

    seq: int
    provider: str  # openai | gemini
    endpoint: str  # responses_ws | realtime | live
    path: str
    query: str
    header_list: list[tuple[str, str]]
    headers: dict[str, str]
    host: str
    client_addr: str
    request: RecordedRequest  # the upgrade, also in MockProvider.requests
    scenario_header: str | None  # x-mock-scenario of the upgrade (applies to every call)
    model: str | None = None  # from the URL, session.update or setup
    status: int | None = None  # 101, or the refusal status
    accepted: bool = False
    extensions: str | None = None  # Sec-WebSocket-Extensions answered (None: none negotiated)
    subprotocol: str | None = None
    messages: list[WsMessage] = dataclasses.field(default_factory=list)
    calls: list[WsCall] = dataclasses.field(default_factory=list)
    pings: int = 0
    pongs: int = 0
    close_code: int | None = None  # code in the close frame the mock received
    close_reason: str | None = None
    closed_by: str | None = None  # "client" | "server" | "abort" (TCP cut, no close frame) | "lost"
    server_close_code: int | None = None  # code in the close frame the mock sent
    opened_at: float = dataclasses.field(default_factory=time.monotonic)
    closed_at: float | None = None
    finished: threading.Event = dataclasses.field(default_factory=threading.Event, repr=False)
    _commands: deque[tuple[Any, ...]] = dataclasses.field(default_factory=deque, repr=False)
    _changed: threading.Condition = dataclasses.field(default_factory=threading.Condition, repr=False)

    @property
    def deflate(self) -> bool:
        return bool(self.extensions and "permessage-deflate" in self.extensions)

    @property
    def authorization(self) -> str | None:
        return self.headers.get("authorization")

    def header(self, name: str, default: str | None = None) -> str | None:
        return self.headers.get(name.lower(), default)

    def received(self) -> list[Any]:
        """The client's messages, JSON-decoded (None where not JSON)."""
        return [m.json for m in list(self.messages) if m.direction == "in"]

    def sent(self) -> list[Any]:
        return [m.json for m in list(self.messages) if m.direction == "out"]

    def sent_types(self) -> list[str]:
        out = []
        for e in self.sent():
            if isinstance(e, dict):
                out.append(str(e.get("type") or next(iter(e), "")))
        return out

    @property
    def closed(self) -> bool:
        return self.finished.is_set()

    def wait_closed(self, timeout: float = 5.0) -> RecordedWsSession:
        if not self.finished.wait(timeout):
            raise TimeoutError(f"ws session #{self.seq} {self.path} still open")
        return self

    def wait_calls(self, n: int = 1, timeout: float = 5.0, finished: bool = True) -> list[WsCall]:
        """Wait until ``n`` calls started (and, by default, ended one way or another)."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                calls = list(self.calls)
                done = [c for c in calls if c.finished_at is not None] if finished else calls
                if len(done) >= n or (self.closed and len(calls) < n):
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._changed.wait(min(left, 0.1))
        if len(done) < n:
            raise TimeoutError(f"ws session #{self.seq}: {len(done)} call(s), wanted {n}")
        return calls

    def server_close(self, code: int = 1000, reason: str = "") -> None:
        """Ask the mock to close this socket (a close frame; the loop waits for the reply)."""
        self._commands.append(("close", code, reason))

    def abort(self) -> None:
        """Cut the TCP connection (no close frame)."""
        self._commands.append(("abort",))

    def send(self, obj: Any, binary: bool = False) -> None:
        """Push one unsolicited server message (dict/list: JSON; str / bytes as is)."""
        self._commands.append(("send", obj, binary))

    def _notify(self) -> None:
        with self._changed:
            self._changed.notify_all()


# --------------------------------------------------------------------------- handshake


def is_upgrade(headers: dict[str, str]) -> bool:
    return ("websocket" in (headers.get("upgrade") or "").lower()
            and "upgrade" in (headers.get("connection") or "").lower())


def route(rec: RecordedRequest) -> bool:
    """Sets provider / endpoint / model for a WebSocket upgrade; False when the path is unknown."""
    p = rec.path
    q = rec.query_params
    if "GenerativeService.BidiGenerateContent" in p:
        rec.provider, rec.endpoint = "gemini", "live"
        return True
    rec.provider = "openai"
    if p.endswith("/realtime"):
        rec.endpoint = "realtime"
        rec.model = (q.get("model") or q.get("deployment") or [""])[-1] or None
        if rec.model is None and p.startswith("/openai/deployments/"):
            rec.model = p.split("/")[3]
        return True
    if p.endswith("/responses"):
        rec.endpoint = "responses_ws"
        return True
    return False


def _offers(rec: RecordedRequest) -> list[str]:
    out: list[str] = []
    for k, v in rec.header_list:
        if k.lower() == "sec-websocket-extensions":
            out.extend(split_comma_header(v.encode()))
    return out


def _subprotocol(rec: RecordedRequest) -> str | None:
    offered = [s.strip() for k, v in rec.header_list if k.lower() == "sec-websocket-protocol" for s in v.split(",")]
    return "realtime" if "realtime" in offered else None


def serve(handler: _Handler, rec: RecordedRequest) -> None:
    """Answer the upgrade ``rec`` on ``handler``'s connection and run the session to its end."""
    from . import mock_realtime
    from .mock_provider import Scenario, _client_key, error_body

    mock = handler.server.mock
    handler.close_connection = True
    header = rec.headers.get("x-mock-scenario")
    up = Scenario.parse(header) if header else Scenario()
    sess = RecordedWsSession(
        seq=0, provider=rec.provider, endpoint=rec.endpoint, path=rec.path, query=rec.query,
        header_list=rec.header_list, headers=rec.headers, host=rec.host, client_addr=rec.client_addr,
        request=rec, scenario_header=header, model=rec.model,
    )
    mock._record_ws(sess)
    try:
        handler._wait(up.first_delay_ms / 1000)
        refuse: tuple[int, str] | None = None
        if (rec.headers.get("sec-websocket-version") or "").strip() != "13" or not rec.headers.get("sec-websocket-key"):
            refuse = (426 if rec.headers.get("sec-websocket-key") else 400, "Mock: bad WebSocket upgrade.")
        elif rec.endpoint not in WS_ENDPOINTS:
            refuse = (404, f"Invalid URL (GET {rec.path})")
        elif "reject" in up.flags:
            refuse = (up.status or 403, "Mock: WebSocket upgrade refused.")
        elif (rec.provider == "openai" and mock.expected_keys.get("openai")
              and _client_key(rec) != mock.expected_keys["openai"]):
            refuse = (401, "Mock: incorrect API key provided.")
        if refuse is not None:
            status, msg = refuse
            sess.status = status
            extra = [("Sec-WebSocket-Version", "13")] if status == 426 else None
            handler._send_json(rec, status, error_body(rec.provider, status, msg, rec.request_id), extra_headers=extra)
            return
        key = rec.headers["sec-websocket-key"].strip().encode()
        accept = base64.b64encode(hashlib.sha1(key + WS_GUID).digest()).decode()
        headers = [("Upgrade", "websocket"), ("Connection", "Upgrade"), ("Sec-WebSocket-Accept", accept)]
        extensions: list[Extension] = []
        if mock.ws_deflate and "no_deflate" not in up.flags:
            pmd = PerMessageDeflate()
            agreed = server_extensions_handshake(_offers(rec), [pmd])
            if agreed:
                sess.extensions = agreed.decode()
                headers.append(("Sec-WebSocket-Extensions", sess.extensions))
                extensions.append(pmd)
        sess.subprotocol = _subprotocol(rec)
        if sess.subprotocol:
            headers.append(("Sec-WebSocket-Protocol", sess.subprotocol))
        headers += handler._provider_headers(rec)
        handler._begin(rec, 101, headers)
        sess.status, sess.accepted, rec.completed = 101, True, True
        rec.finished_at = time.time()
        rec.finished.set()
        loop = WsLoop(handler, sess, Connection(ConnectionType.SERVER, extensions, _leftover(handler)))
        loop.run(mock_realtime.handler_for(sess, mock, loop))
    finally:
        sess.closed_at = time.monotonic()
        sess.finished.set()
        sess._notify()


def _leftover(handler: _Handler) -> bytes:
    """Bytes the client sent right after its upgrade request, already in the HTTP reader's buffer."""
    sock = handler.connection
    try:
        sock.setblocking(False)
        buffered = handler.rfile.peek(65536)  # type: ignore[attr-defined]  # a BufferedReader
        return handler.rfile.read(len(buffered)) if buffered else b""
    except (OSError, ValueError):
        return b""
    finally:
        try:
            sock.setblocking(True)
        except OSError:
            pass


# --------------------------------------------------------------------------- the loop


Action = tuple[Any, ...]  # ("send", obj[, binary]) | ("sleep", s) | ("abort",) | ("close", code, reason)


class WsLoop:
    """Reads frames and runs one handler generator at a time, without a second thread."""

    def __init__(self, handler: _Handler, sess: RecordedWsSession, ws: Connection) -> None:
        self.handler = handler
        self.sock = handler.connection
        self.sess = sess
        self.ws = ws
        self.stopping = handler.server.mock._stopping
        self.pending: deque[WsMessage] = deque()
        self.done = False
        self._frag: list[Any] = []

    # ---- I/O

    def _sendall(self, data: bytes) -> None:
        if not data:
            return
        self.sock.settimeout(10)
        self.sock.sendall(data)

    def send(self, obj: Any, binary: bool = False) -> None:
        if self.ws.state is not ConnectionState.OPEN:
            return
        text = obj if isinstance(obj, (str, bytes)) else json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
        if binary or isinstance(text, bytes):
            raw = text.encode() if isinstance(text, str) else text
            data: str | bytes = raw
            frame = self.ws.send(BytesMessage(data=raw))
            kind = "binary"
        else:
            data = text
            frame = self.ws.send(TextMessage(data=text))
            kind = "text"
        self.sess.messages.append(WsMessage("out", kind, data, time.monotonic()))
        self._sendall(frame)

    def close(self, code: int = 1000, reason: str = "") -> None:
        if self.ws.state in (ConnectionState.OPEN, ConnectionState.REMOTE_CLOSING):
            if self.sess.closed_by is None:
                self.sess.closed_by = "server"
            self.sess.server_close_code = code
            self._sendall(self.ws.send(CloseConnection(code=code, reason=reason or None)))
        if self.ws.state is ConnectionState.CLOSED:
            self.done = True

    def abort(self) -> None:
        if self.sess.closed_by is None:
            self.sess.closed_by = "abort"
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.done = True

    def _recv(self, timeout: float) -> bytes | None:
        """Received bytes; b"" at EOF; None when nothing arrived in time."""
        self.sock.settimeout(max(timeout, 0.001))
        try:
            data: bytes = self.sock.recv(65536)
            return data
        except TimeoutError:
            return None
        except (ConnectionError, OSError):
            return b""

    def _feed(self, data: bytes) -> None:
        try:
            self.ws.receive_data(data if data else None)
        except LocalProtocolError:
            self.done = True
            return
        self._drain(eof=not data)

    def _drain(self, eof: bool = False) -> None:
        """Handles the events wsproto has parsed so far."""
        for ev in self.ws.events():
            if isinstance(ev, (TextMessage, BytesMessage)):
                self._frag.append(ev.data)
                if ev.message_finished:
                    text = isinstance(ev, TextMessage)
                    joined: str | bytes = "".join(self._frag) if text else b"".join(bytes(b) for b in self._frag)
                    self._frag = []
                    msg = WsMessage("in", "text" if text else "binary", joined, time.monotonic())
                    self.sess.messages.append(msg)
                    self.pending.append(msg)
                    self.sess._notify()
            elif isinstance(ev, Ping):
                self.sess.pings += 1
                self._sendall(self.ws.send(ev.response()))
            elif isinstance(ev, Pong):
                self.sess.pongs += 1
            elif isinstance(ev, CloseConnection):
                if eof:
                    self.sess.closed_by = self.sess.closed_by or "lost"
                    self.done = True
                    return
                self.sess.close_code, self.sess.close_reason = ev.code, ev.reason
                if self.sess.closed_by is None:
                    self.sess.closed_by = "client"
                if self.ws.state is ConnectionState.REMOTE_CLOSING:
                    self._sendall(self.ws.send(ev.response()))
                self.done = True

    # ---- driving

    def _command(self, cmd: tuple[Any, ...]) -> None:
        if cmd[0] == "send":
            self.send(cmd[1], cmd[2])
        elif cmd[0] == "close":
            self.close(cmd[1], cmd[2])
        elif cmd[0] == "abort":
            self.abort()

    def _act(self, action: Action) -> float:
        """Performs one action; returns seconds to wait before the next one."""
        kind = action[0]
        if kind == "send":
            self.send(action[1], bool(action[2]) if len(action) > 2 else False)
        elif kind == "sleep":
            return float(action[1])
        elif kind == "abort":
            self.abort()
        elif kind == "close":
            self.close(action[1], action[2] if len(action) > 2 else "")
        return 0.0

    def run(self, handler: Any) -> None:
        gen: Iterator[Action] | None = handler.on_open()
        wake = time.monotonic()
        close_deadline: float | None = None
        try:
            self._drain()  # frames that came with the upgrade request
            while not self.done:
                if self.stopping.is_set():
                    self.abort()
                    break
                while self.sess._commands and not self.done:
                    self._command(self.sess._commands.popleft())
                now = time.monotonic()
                while gen is not None and not self.done and now >= wake:
                    try:
                        action = next(gen)
                    except StopIteration:
                        gen = None
                        self.sess._notify()
                        break
                    wait = self._act(action)
                    if wait > 0:
                        wake = time.monotonic() + wait
                        break
                if self.done:
                    break
                if gen is None and self.pending and self.ws.state is ConnectionState.OPEN:
                    gen = handler.on_message(self.pending.popleft())
                    wake = time.monotonic()
                    continue
                if self.ws.state is ConnectionState.LOCAL_CLOSING:
                    close_deadline = close_deadline or time.monotonic() + 2.0
                    if time.monotonic() > close_deadline:
                        self.abort()
                        break
                timeout = min(_POLL_S, max(0.0, wake - time.monotonic())) if gen is not None else _POLL_S
                data = self._recv(timeout)
                if data is not None:
                    self._feed(data)
        except (ConnectionError, OSError, LocalProtocolError):
            self.sess.closed_by = self.sess.closed_by or "lost"
        finally:
            handler.on_close()
            self.sess._notify()
