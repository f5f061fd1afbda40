"""Stage: WebSockets on model hosts, governed message by message.

Identity is checked at the upgrade (as any request) and again while the socket is open: a
revoked or expired key's socket is closed within a second. Each model call a client message
starts (`providers.sockets`) becomes a call of its own, admitted by the same stages as an HTTP
request (rate limit, caps with clamping, the begun audit row) before the message goes upstream,
and ended, with the usage its completion event reports, by the same `finish` chain (meter,
record, metrics, alerts): one audit row per model response, plus the upgrade's own row. A call
that is refused is answered with a provider-shaped error event instead of being forwarded (Gemini
Live, which has none, is closed with the reason). A socket the gateway cannot meter is refused
at the upgrade for a caller under a cap (`Budgets`, as `unmetered = "websocket"`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from mitmproxy import flow as mflow
from mitmproxy import http
from mitmproxy.proxy.layers.websocket import WebSocketMessageInjected
from mitmproxy.websocket import WebSocketMessage
from wsproto.frame_protocol import Opcode

from spendgate.edge.websocket import SocketClose, SocketSend, to_client
from spendgate.keys import KeyRecord
from spendgate.providers.sockets import ClientStep, ModelCall, ServerStep, SocketProtocol, protocol_for
from spendgate.stages.bodies import BodyError, parse_json_object
from spendgate.stages.call import META, Call, Outcome, get_call, new_request_id, refuse
from spendgate.store.models import utcnow

log = logging.getLogger(__name__)

MONITOR_SECONDS = 0.2  # with the registry's 0.25 s poll, a revoke closes a socket well within 1 s
_CLOSE_POLICY = 1008


class KeyLookup(Protocol):
    def get(self, key_id: str) -> KeyRecord | None: ...


class Admit(Protocol):
    """A stage hook that may refuse a call (`flow.response` set): rate limit, budgets, record."""

    def __call__(self, flow: http.HTTPFlow) -> Awaitable[None] | None: ...


@dataclass
class _Pending:
    flow: http.HTTPFlow  # the call's own flow (its request is the message, its response the completion)
    call: Call
    response_id: str | None = None
    client_event_id: str | None = None


@dataclass
class _Socket:
    flow: http.HTTPFlow
    upgrade: Call
    protocol: SocketProtocol
    pending: deque[_Pending] = field(default_factory=deque)
    closing: bool = False


class Sockets:
    def __init__(self, keys: KeyLookup, admit: list[Admit], monitor_seconds: float = MONITOR_SECONDS) -> None:
        self.keys = keys
        self.admit = admit  # in order; each may refuse
        self.monitor_seconds = monitor_seconds
        self.end: Callable[[http.HTTPFlow], Awaitable[None]] | None = None  # the pipeline's finish chain
        self.inject: Callable[[Any], None] = _inject
        self._open: dict[str, _Socket] = {}
        self._monitor: asyncio.Task[None] | None = None

    def bind_pipeline(self, end: Callable[[http.HTTPFlow], Awaitable[None]]) -> None:
        self.end = end

    # -- the upgrade ------------------------------------------------------------

    def request(self, flow: http.HTTPFlow) -> None:
        call = get_call(flow)
        if call is None or flow.response is not None:
            return
        if flow.request.headers.get("upgrade", "").lower() != "websocket":
            return
        call.upgrade = True
        protocol = protocol_for(call.provider.spec.family, flow.request.path, flow.request.headers)
        if protocol is None:
            call.unmetered = "websocket"  # refused for a caller under a cap
            return
        call.endpoint_kind = protocol.endpoint_kind
        call.model_requested = protocol.model
        call.stream = True
        key = call.key
        if key is not None and protocol.model and not key.model_allowed(protocol.model):
            refuse(flow, call, 403, "spendgate_model_not_allowed", _not_allowed(key, protocol.model),
                   Outcome.BLOCKED_POLICY)
            return
        flow.metadata["spendgate.socket"] = protocol

    def websocket_start(self, flow: http.HTTPFlow) -> None:
        call = get_call(flow)
        protocol = flow.metadata.get("spendgate.socket")
        if call is None or not isinstance(protocol, SocketProtocol):
            return
        self._open[flow.id] = _Socket(flow, call, protocol)
        if call.key is not None and (self._monitor is None or self._monitor.done()):
            self._monitor = asyncio.get_running_loop().create_task(self._watch_keys())

    async def websocket_end(self, flow: http.HTTPFlow) -> None:
        sock = self._open.pop(flow.id, None)
        if sock is None:
            return
        by_client = bool(flow.websocket and flow.websocket.closed_by_client)
        while sock.pending:
            p = sock.pending.popleft()
            # A call cut short is charged for what it used: its prompt, and the text it streamed.
            if by_client:
                p.flow.error = mflow.Error("client disconnected before the response completed")
            else:
                p.flow.error = mflow.Error("the WebSocket closed before the response completed")
                if p.call.timing.first_chunk is not None:  # the model answered: estimate what it used
                    p.flow.response = http.Response.make(200, b"", {"content-type": "text/plain"})
            await self._end(p.flow)

    # -- messages ---------------------------------------------------------------

    async def websocket_message(self, flow: http.HTTPFlow) -> None:
        sock = self._open.get(flow.id)
        assert flow.websocket is not None
        if sock is None:
            return
        message = flow.websocket.messages[-1]
        if message.injected:
            return
        if sock.closing and message.from_client:
            # The close is on its way, behind messages that arrived with this one: none of them goes upstream
            # unchecked. (The provider's messages are still read: a completion settles its call.)
            message.drop()  # type: ignore[no-untyped-call]
            return
        if message.from_client:
            event, why = _client_json(message)
        else:
            event, why = _json(message), ""
        if event is None:
            if message.from_client:
                # Every client message of these protocols is a JSON object. One the gateway cannot read
                # is not sent: a provider's parser may read a model call in it (after a byte-order mark,
                # before trailing data, under a repeated key) that the gateway did not check.
                message.drop()  # type: ignore[no-untyped-call]
                self._say(sock, 400, "spendgate_invalid_json", why, None, close=not sock.protocol.error_events)
            return
        try:
            if message.from_client:
                await self._from_client(sock, message, event)
            else:
                await self._from_server(sock, event)
        except Exception as e:  # fail closed: a call the gateway could not check does not go upstream
            log.error("WebSocket message handling failed: %s: %s", type(e).__name__, str(e)[:300], exc_info=True)
            if message.from_client:
                message.drop()  # type: ignore[no-untyped-call]
                self._say(sock, 500, "spendgate_internal_error",
                          "The gateway failed while checking this message, so it was not sent. Try again.", None)

    async def _from_client(self, sock: _Socket, message: WebSocketMessage, event: dict[str, Any]) -> None:
        step: ClientStep = sock.protocol.from_client(event, message.content)
        key = self.keys.get(sock.upgrade.key.key_id) if sock.upgrade.key is not None else None
        if sock.upgrade.key is not None and (key is None or _invalid(key)):
            message.drop()  # type: ignore[no-untyped-call]
            self._close_for_key(sock, key)
            return
        if step.model is not None:
            if key is not None and not key.model_allowed(step.model):
                message.drop()  # type: ignore[no-untyped-call]
                self._say(sock, 403, "spendgate_model_not_allowed", _not_allowed(key, step.model), None,
                          close=not sock.protocol.error_events)
                return
            sock.protocol.model = step.model
        if step.call is None:
            return
        pending = await self._admit(sock, step.call, key, len(message.content))
        if pending is None:
            message.drop()  # type: ignore[no-untyped-call]
            return
        limited = pending.call.output_limited
        if limited is not None and step.call.limit is not None:
            message.content = step.call.limit(limited)
        sock.pending.append(pending)

    async def _admit(self, sock: _Socket, mc: ModelCall, key: KeyRecord | None, size: int,
                     running: bool = False, cancel: bytes | None = None) -> _Pending | None:
        """The call, admitted by the HTTP stages; None (and an error event said) when one refused it.
        `running`: the call already runs upstream; a refusal stops it with `cancel`, or, where the
        protocol has no such message, by closing the socket."""
        up = sock.upgrade
        call = Call(new_request_id(), up.provider, up.host, client_addr=up.client_addr, user_agent=up.user_agent,
                    key=key, byok_key=up.byok_key, endpoint_kind=mc.kind, model_requested=mc.model, stream=True,
                    max_output_tokens=mc.max_output_tokens, body=mc.body, request_bytes=size,
                    started_at=utcnow())
        path = sock.flow.request.path.split("?", 1)[0]
        sub = http.HTTPFlow(sock.flow.client_conn, sock.flow.server_conn)
        sub.request = http.Request.make("WS", f"https://{up.host}{path}", b"",
                                        http.Headers(content_type="application/json"))
        sub.request.http_version = sock.flow.request.http_version
        sub.metadata[META] = call
        if key is not None and not key.model_allowed(mc.model):
            refuse(sub, call, 403, "spendgate_model_not_allowed", _not_allowed(key, mc.model), Outcome.BLOCKED_POLICY)
        for stage in self.admit:
            if sub.response is not None:
                break
            result = stage(sub)
            if result is not None:
                await result
        if sub.response is None:
            return _Pending(sub, call, client_event_id=mc.client_event_id)
        status, code = call.status_code or 403, call.error or "spendgate_refused"
        if running and cancel is not None:
            self.inject(WebSocketMessageInjected(sock.flow, WebSocketMessage(Opcode.TEXT, True, cancel)))
        self._say(sock, status, code, _message_of(sub.response), mc.client_event_id,
                  close=call.outcome is Outcome.BLOCKED_CAP or not sock.protocol.error_events
                  or (running and cancel is None))
        await self._end(sub)
        return None

    async def _from_server(self, sock: _Socket, event: dict[str, Any]) -> None:
        step: ServerStep = sock.protocol.from_server(event)
        started = False  # a response the provider started by itself (voice activity detection)
        if step.response_id is not None:
            for p in sock.pending:
                if p.response_id is None or p.response_id == step.response_id:
                    p.response_id = step.response_id
                    break
            else:
                started = step.done is None
        elif step.output and not sock.pending:
            started = True
        if started:
            await self._started_by_server(sock, step.response_id)
        if sock.pending:
            head = sock.pending[0].call
            if step.output and head.timing.first_chunk is None:
                head.timing.first_chunk = time.perf_counter()
            if step.text:
                _keep_text(head, step.text)
        if step.done is None or not sock.pending:
            return
        p = self._match(sock, step)
        sock.pending.remove(p)
        p.flow.response = http.Response.make(step.status, json.dumps(step.done).encode(),
                                             {"content-type": "application/json"})
        if step.error:
            p.call.error = step.error
        await self._end(p.flow)

    async def _started_by_server(self, sock: _Socket, response_id: str | None) -> None:
        """Admit a response nobody asked for over the socket (server voice activity detection): it is
        held, audited and settled like any call. Refused, it is cancelled where the protocol can
        (Realtime `response.cancel`), else the socket is closed."""
        mc = sock.protocol.unsolicited()
        if mc is None:
            return
        key = self.keys.get(sock.upgrade.key.key_id) if sock.upgrade.key is not None else None
        if sock.upgrade.key is not None and (key is None or _invalid(key)):
            self._close_for_key(sock, key)
            return
        pending = await self._admit(sock, mc, key, 0, running=True, cancel=sock.protocol.cancel(response_id))
        if pending is not None:
            pending.response_id = response_id
            sock.pending.append(pending)

    @staticmethod
    def _match(sock: _Socket, step: ServerStep) -> _Pending:
        for p in sock.pending:
            if step.client_event_id is not None and p.client_event_id == step.client_event_id:
                return p
            if step.response_id is not None and p.response_id == step.response_id:
                return p
        return sock.pending[0]

    async def _end(self, flow: http.HTTPFlow) -> None:
        if self.end is not None:
            await self.end(flow)

    # -- telling the client ------------------------------------------------------

    def _say(self, sock: _Socket, status: int, code: str, message: str, client_event_id: str | None,
             close: bool = False) -> None:
        event = sock.protocol.error_event(status, code, message, client_event_id)
        if close or event is None:
            sock.closing = True
            self.inject(SocketClose(sock.flow, to_client(event or b""), code=_CLOSE_POLICY,
                                    reason=f"{code}: {message}"))
        else:
            self.inject(SocketSend(sock.flow, to_client(event)))

    def _close_for_key(self, sock: _Socket, key: KeyRecord | None) -> None:
        if key is None or key.state == "revoked":
            code = "spendgate_key_revoked"
            text = f"Spendgate key {sock.upgrade.key.key_id if sock.upgrade.key else ''} has been revoked. " \
                   "Ask your admin for a new key."
        else:
            code = "spendgate_key_expired"
            text = f"Spendgate key {key.key_id} has expired. Ask your admin for a new key."
        self._say(sock, 403, code, text, None, close=True)

    async def _watch_keys(self) -> None:
        """Close the sockets of keys revoked or expired since their upgrade."""
        while self._open:
            await asyncio.sleep(self.monitor_seconds)
            for sock in list(self._open.values()):
                up = sock.upgrade.key
                if up is None or sock.closing:
                    continue
                key = self.keys.get(up.key_id)
                if key is None or _invalid(key):
                    self._close_for_key(sock, key)


_TEXT_LIMIT = 64 * 1024


def _keep_text(call: Call, text: str) -> None:
    """Streamed text of a call, bounded: what an estimate counts if the call is cut short."""
    m = call.metering
    if m.streamed_bytes < _TEXT_LIMIT:
        m.streamed_text.append(text[:_TEXT_LIMIT])
    m.streamed_bytes += len(text)


def _invalid(key: KeyRecord) -> bool:
    return key.state == "revoked" or (key.expires_at is not None and key.expires_at <= utcnow())


def _not_allowed(key: KeyRecord, model: str | None) -> str:
    return f"Model {model!r} is not allowed for key {key.key_id} (allowed: {', '.join(key.allowed_models)})."


def _json(message: WebSocketMessage) -> dict[str, Any] | None:
    try:
        event = json.loads(message.content)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    return event if isinstance(event, dict) else None


def _client_json(message: WebSocketMessage) -> tuple[dict[str, Any] | None, str]:
    """A client message read as strictly as a request body (`parse_json_object`), or why it is not one."""
    try:
        return parse_json_object(message.content), ""
    except BodyError as e:
        return None, str(e).replace("request body", "message").replace("to the provider", "upstream")


def _message_of(response: http.Response) -> str:
    """The message of a refusal the stages answered (every provider shape has one)."""
    try:
        body = json.loads(response.content or b"")
    except ValueError:
        return "refused"
    err = body.get("error") if isinstance(body, dict) else None
    msg = err.get("message") if isinstance(err, dict) else None
    return msg if isinstance(msg, str) else "refused"


def _inject(event: Any) -> None:
    from mitmproxy import ctx

    ctx.master.addons.get("proxyserver").inject_event(event)  # type: ignore[no-untyped-call]
