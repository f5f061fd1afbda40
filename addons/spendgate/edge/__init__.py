"""The wire edge: what the gateway does inside mitmproxy's HTTP layer, below the hooks.

Hooks alone cannot bound what a client or an upstream does between them. mitmproxy 12
reads a refused request's whole body before answering it, sends `100 Continue` before an
addon can refuse, buffers a chunked body without limit, lets a client send headers forever,
answers a dead upstream with its own HTML page and never times out an upstream that accepts
a request and then says nothing. `install()` replaces mitmproxy's `HttpStream` and
`Http1Server` (looked up by name when a connection starts) with the subclasses below:

- a request a stage refused at its headers is answered at once and its body is never read
  into memory (HTTP/1: the connection closes; HTTP/2: the stream's DATA is dropped);
- a body passing `max_request_bytes` while it arrives gets the gateway's 413;
- HTTP/1 request headers are bounded in size (431) and in time (408, against slowloris);
- no response headers within `upstream_timeout`, or a response silent for
  `stream_idle_timeout`: the upstream request is cancelled and the client gets the gateway's
  504 (or, mid-stream, the stream is cut);
- an upstream that cannot be reached, or fails before answering, gets the gateway's 502.

Answers are built by the stages' own rules (`Answers`), so they are provider-shaped and carry
`x-spendgate-request-id`, and the hooks still run so every refused request has its audit row.
mitmproxy is pinned below 13; a test checks the overridden methods still exist.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Protocol

from mitmproxy import flow as mflow
from mitmproxy import http
from mitmproxy.proxy import commands, events, layer
from mitmproxy.proxy.layers import http as http_layers
from mitmproxy.proxy.layers.http import DropStream, GetHttpConnection, HttpStream, SendHttp
from mitmproxy.proxy.layers.http._events import (
    ErrorCode,
    HttpEvent,
    RequestData,
    RequestEndOfMessage,
    RequestHeaders,
    RequestProtocolError,
    ResponseData,
    ResponseEndOfMessage,
    ResponseHeaders,
    ResponseProtocolError,
)
from mitmproxy.proxy.layers.http._hooks import HttpErrorHook, HttpResponseHeadersHook
from mitmproxy.proxy.layers.http._http1 import Http1Server
from mitmproxy.utils import human

from spendgate.edge import websocket
from spendgate.edge.http2 import GatewayHttp2Server
from spendgate.stages.call import REQUEST_ID_HEADER, new_request_id

log = logging.getLogger("spendgate.edge")

# Timers re-arm at most this far ahead: a finished request leaves at most one short timer behind.
TIMER_PERIOD = 5.0


@dataclass(frozen=True)
class Limits:
    max_request_bytes: int
    max_header_bytes: int
    header_timeout: float
    upstream_timeout: float
    stream_idle_timeout: float


class Answers(Protocol):
    """The stages' answers for refusals the edge makes (see `routing.EdgeAnswers`)."""

    def refuse_too_large(self, flow: http.HTTPFlow, limit: int) -> None:
        """Set `flow.response` (and the request's outcome) for a body over `limit`."""

    def upstream_failed(self, flow: http.HTTPFlow, status: int, code: str, message: str, final: bool) -> http.Response:
        """The answer for an upstream fault. `final`: nothing of the response reached the client,
        so this answer is the request's outcome."""


@dataclass
class _Installed:
    limits: Limits
    answers: Answers


_current: _Installed | None = None


def install(limits: Limits, answers: Answers) -> None:
    """Make every new connection use the gateway's HTTP layers. Idempotent; the last call wins."""
    global _current
    _current = _Installed(limits, answers)
    http_layers.HttpStream = GatewayHttpStream  # type: ignore[misc]
    http_layers.Http1Server = GatewayHttp1Server  # type: ignore[attr-defined]
    http_layers.Http2Server = GatewayHttp2Server  # type: ignore[attr-defined]
    websocket.install()


def _conf() -> _Installed:
    assert _current is not None, "spendgate.edge.install() was not called"
    return _current


class GatewayHttpStream(HttpStream):
    """One request/response exchange, with the gateway's bounds (see the module docstring)."""

    _wakeup: commands.RequestWakeup | None = None
    _deadline = 0.0  # response headers are due by then (monotonic)
    _last_data = 0.0  # when the upstream last sent response data
    _answered = False  # the client has the gateway's own answer; what follows is dropped
    _streaming = False  # response headers went to the client: too late for a status code
    _dropped = 0  # bytes of a refused request's body read and thrown away (HTTP/2)

    # -- events ---------------------------------------------------------------

    def _handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        if isinstance(event, events.Wakeup):
            if event.command is self._wakeup:
                yield from self._on_wakeup()
            return
        if self._answered and isinstance(event, (RequestProtocolError, ResponseProtocolError)):
            # The client left while its refused body was dropped, or the upstream we gave up on
            # closed: the request already has its answer and its audit row.
            if isinstance(event, RequestProtocolError) and self.client_state != self.state_done:
                self.client_state = self.state_errored
                yield DropStream(self.stream_id)
                self._release()
            return
        commands_ = super()._handle_event(event)
        try:
            command = next(commands_)
            while True:
                result = yield command
                if isinstance(command, DropStream) and command.stream_id == self.stream_id:
                    self._release()
                command = commands_.send(result)
        except StopIteration:
            return

    def _release(self) -> None:
        """mitmproxy has dropped the stream, but its layers keep it in reference cycles until a full
        collection (100-280 ms each with finished flows piled up, every request in flight waiting).
        Letting go of the flow here frees it, and the call with it, as soon as the hooks are done."""
        self.__dict__.pop("flow", None)

    def passthrough(self, event: events.Event) -> layer.CommandGenerator[None]:
        # After a CONNECT or a WebSocket upgrade this stream relays for its child layers; only
        # our own timer must not reach them.
        if isinstance(event, events.Wakeup) and event.command is self._wakeup:
            return
        yield from super().passthrough(event)

    # -- request side ---------------------------------------------------------

    def state_wait_for_request_headers(self, event: RequestHeaders) -> layer.CommandGenerator[None]:
        yield from super().state_wait_for_request_headers(event)
        refused_at_headers = self.flow.response is not None and self.client_state == self.state_consume_request_body
        if refused_at_headers and not event.end_stream:
            yield from self._answer_before_body()

    def state_consume_request_body(self, event: events.Event) -> layer.CommandGenerator[None]:
        if isinstance(event, RequestData):
            limit = _conf().limits.max_request_bytes
            if len(self.request_body_buf) + len(event.data) > limit:
                self.request_body_buf.clear()  # type: ignore[no-untyped-call]
                _conf().answers.refuse_too_large(self.flow, limit)
                yield from self._answer_before_body()
                return
        yield from super().state_consume_request_body(event)

    def _answer_before_body(self) -> layer.CommandGenerator[None]:
        """Send the refusal now; the body still on its way is never read into memory.

        HTTP/1: the connection closes after the answer (what follows on it is that body). HTTP/2:
        only the stream is done; its remaining DATA frames are dropped as they come.
        """
        response = self.flow.response
        assert response is not None
        h1 = not (self.flow.request.is_http2 or self.flow.request.is_http3)
        if h1:
            response.headers["connection"] = "close"
        self.client_state = self.state_drop_request_body
        response.timestamp_start = time.time()
        yield HttpResponseHeadersHook(self.flow)
        if (yield from self.check_killed(True)):
            return
        yield from self.send_response()
        yield self._to_client(ResponseEndOfMessage(self.stream_id))
        self._answered = True
        if h1:
            yield from self._close_client("request refused before its body was read")

    def state_drop_request_body(self, event: events.Event) -> layer.CommandGenerator[None]:
        if isinstance(event, RequestData):
            self._dropped += len(event.data)
            if self._dropped > _conf().limits.max_request_bytes:
                yield from self._close_client("the body of a refused request passed max_request_bytes")
        elif isinstance(event, RequestEndOfMessage):
            self.client_state = self.state_done
            self.flow.live = False
            yield DropStream(self.stream_id)

    def _close_client(self, why: str) -> layer.CommandGenerator[None]:
        log.info("closing client connection %s: %s", human.format_address(self.context.client.peername), why)
        if self.flow.request.is_http2 or self.flow.request.is_http3:
            yield self._to_client(ResponseProtocolError(self.stream_id, why, ErrorCode.CANCEL))
        else:
            yield commands.CloseConnection(self.context.client)
        self.client_state = self.state_errored
        yield DropStream(self.stream_id)

    # -- upstream side --------------------------------------------------------

    def make_server_connection(self) -> layer.CommandGenerator[bool]:
        connection, err = yield GetHttpConnection(
            (self.flow.request.host, self.flow.request.port),
            self.flow.request.scheme == "https",
            self.flow.server_conn.via,
            self.flow.server_conn.transport_protocol,
        )
        if err:
            yield from self._fail_upstream(502, "spendgate_upstream_unreachable",
                                           f"The upstream could not be reached: {err}")
            return False
        self.context.server = self.flow.server_conn = connection
        timeout = _conf().limits.upstream_timeout
        self._deadline = time.monotonic() + timeout
        yield from self._arm(timeout)
        return True

    def state_wait_for_response_headers(self, event: ResponseHeaders) -> layer.CommandGenerator[None]:
        self._last_data = time.monotonic()
        yield from super().state_wait_for_response_headers(event)

    def start_response_stream(self) -> layer.CommandGenerator[None]:
        self._streaming = True
        yield from super().start_response_stream()

    def state_stream_response_body(self, event: events.Event) -> layer.CommandGenerator[None]:
        if isinstance(event, ResponseData):
            self._last_data = time.monotonic()
        yield from super().state_stream_response_body(event)

    def state_consume_response_body(self, event: events.Event) -> layer.CommandGenerator[None]:
        if isinstance(event, ResponseData):
            self._last_data = time.monotonic()
        yield from super().state_consume_response_body(event)

    def handle_protocol_error(
        self, event: RequestProtocolError | ResponseProtocolError
    ) -> layer.CommandGenerator[None]:
        upstream_failed_first = (
            isinstance(event, ResponseProtocolError)
            and not self._streaming
            and self.client_state != self.state_errored
            and self.server_state not in (self.state_done, self.state_errored)
        )
        if upstream_failed_first:
            yield from self._fail_upstream(502, "spendgate_upstream_error",
                                           f"The upstream failed before answering: {event.message}")
            return
        yield from super().handle_protocol_error(event)

    def _fail_upstream(self, status: int, code: str, message: str) -> layer.CommandGenerator[None]:
        """The upstream is unreachable, failed or timed out: the client gets the gateway's answer."""
        final = not self._streaming
        self.flow.error = mflow.Error(message)
        answer = _conf().answers.upstream_failed(self.flow, status, code, message, final)
        yield HttpErrorHook(self.flow)
        if (yield from self.check_killed(False)):
            return
        self.server_state = self.state_errored
        self.flow.live = False
        self._answered = True
        log.warning("%s %s: %s", self.flow.request.method, self.flow.request.pretty_url.split("?", 1)[0][:200], message)
        if final:
            yield self._to_client(ResponseHeaders(self.stream_id, answer, end_stream=False))
            if answer.raw_content:
                yield self._to_client(ResponseData(self.stream_id, answer.raw_content))
            yield self._to_client(ResponseEndOfMessage(self.stream_id))
        else:
            yield self._to_client(ResponseProtocolError(self.stream_id, message, ErrorCode.GENERIC_SERVER_ERROR))
        if self.client_state in (self.state_done, self.state_errored):
            yield DropStream(self.stream_id)
        else:
            self.client_state = self.state_drop_request_body

    def _cancel_upstream(self, why: str) -> layer.CommandGenerator[None]:
        yield SendHttp(RequestProtocolError(self.stream_id, why, ErrorCode.CANCEL), self.context.server)

    # -- timers ---------------------------------------------------------------

    def _arm(self, delay: float) -> layer.CommandGenerator[None]:
        self._wakeup = commands.RequestWakeup(max(0.01, min(delay, TIMER_PERIOD)))
        yield self._wakeup

    def _on_wakeup(self) -> layer.CommandGenerator[None]:
        self._wakeup = None
        if self._answered:
            return
        limits = _conf().limits
        now = time.monotonic()
        if self.server_state == self.state_wait_for_response_headers:
            if now < self._deadline:
                yield from self._arm(self._deadline - now)
                return
            yield from self._cancel_upstream("no response in time")
            yield from self._fail_upstream(
                504, "spendgate_upstream_timeout",
                f"The upstream sent no response within {limits.upstream_timeout:g} s "
                "([proxy] upstream_timeout_seconds).")
        elif self.server_state in (self.state_stream_response_body, self.state_consume_response_body):
            idle_until = self._last_data + limits.stream_idle_timeout
            if now < idle_until:
                yield from self._arm(idle_until - now)
                return
            yield from self._cancel_upstream("response idle")
            yield from self._fail_upstream(
                504, "spendgate_upstream_timeout",
                f"The upstream went idle for {limits.stream_idle_timeout:g} s in the middle of its response and was "
                "cut ([proxy] stream_idle_timeout_seconds).")

    def _to_client(self, event: HttpEvent) -> SendHttp:
        return SendHttp(event, self.context.client)


class GatewayHttp1Server(Http1Server):
    """mitmproxy's HTTP/1 server, with bounded request headers (size and time)."""

    _head_since: float | None = None
    _head_wakeup: commands.RequestWakeup | None = None

    def _handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        if isinstance(event, events.Wakeup):
            if event.command is self._head_wakeup:
                yield from self._on_wakeup()
            return
        yield from super()._handle_event(event)

    def start(self, event: events.Event) -> layer.CommandGenerator[None]:
        yield from super().start(event)
        yield from self._arm_head()  # a new connection must send a request within the time too

    state = start

    def read_headers(self, event: events.ConnectionEvent) -> layer.CommandGenerator[None]:
        if isinstance(event, events.DataReceived):
            limit = _conf().limits.max_header_bytes
            if len(self.buf) > limit:
                end = bytes(self.buf).find(b"\r\n\r\n")
                if end == -1 or end > limit:
                    yield from self._refuse(431, "Request Header Fields Too Large",
                                            f"request headers are over {limit} bytes ([proxy] max_header_bytes)")
                    return
        yield from super().read_headers(event)
        if self.state != self.read_headers:
            self._head_since = None  # the head is complete (or the connection is done)
        elif self.buf and self._head_since is None:
            yield from self._arm_head()  # a head is arriving in pieces: it must complete in time

    def _arm_head(self) -> layer.CommandGenerator[None]:
        # Most heads arrive whole in one read and never need this timer; a new connection and a
        # head that arrives in pieces do.
        self._head_since = time.monotonic()
        self._head_wakeup = commands.RequestWakeup(min(_conf().limits.header_timeout, TIMER_PERIOD))
        yield self._head_wakeup

    def _on_wakeup(self) -> layer.CommandGenerator[None]:
        self._head_wakeup = None
        if self._head_since is None or self.state != self.read_headers:
            return
        timeout = _conf().limits.header_timeout
        left = self._head_since + timeout - time.monotonic()
        if left > 0:
            self._head_wakeup = commands.RequestWakeup(min(left, TIMER_PERIOD))
            yield self._head_wakeup
            return
        yield from self._refuse(408, "Request Timeout", f"no complete request headers within {timeout:g} s "
                                                         "([proxy] header_timeout_seconds)")

    def _refuse(self, status: int, reason: str, why: str) -> layer.CommandGenerator[None]:
        log.info("closing connection from %s: %s", human.format_address(self.conn.peername), why)
        body = f"Spendgate: {why}.\n".encode()
        head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: text/plain\r\ncontent-length: {len(body)}\r\n"
                f"connection: close\r\n{REQUEST_ID_HEADER}: {new_request_id()}\r\n\r\n").encode()
        yield commands.SendData(self.conn, head + body)
        yield commands.CloseConnection(self.conn)
        self._head_since = None
        self.state = self.done  # type: ignore[method-assign,assignment]
