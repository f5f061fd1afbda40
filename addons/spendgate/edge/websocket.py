"""The gateway's WebSocket layer: mitmproxy's, plus two things an addon cannot do from a hook.

* `SocketSend`: a message to the client that no hook sees (the gateway's own error events);
* `SocketClose`: close both sides now, with a close code and reason (a revoked key, a cap reached),
  after an optional last message to the client.

Both are injected events (`proxyserver.inject_event`), handled on the connection's own task in
order with its traffic; `websocket_end` runs as for any close.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import wsproto.events
from mitmproxy.proxy import commands, events, layer
from mitmproxy.proxy.layers import websocket as ws_layers
from mitmproxy.proxy.layers.websocket import WebsocketEndHook, WebsocketLayer, WebSocketMessageInjected
from mitmproxy.websocket import WebSocketMessage
from wsproto.connection import ConnectionState
from wsproto.frame_protocol import Opcode

__all__ = ["GatewayWebsocketLayer", "Inject", "SocketClose", "SocketSend", "install", "to_client"]


@dataclass
class SocketSend(WebSocketMessageInjected):
    """Send `message` to the client as is: the gateway's own words, not relayed traffic."""


@dataclass
class SocketClose(WebSocketMessageInjected):
    """Close both sides with `code` / `reason`, after sending `message` (if not empty) to the client."""

    code: int = 1008
    reason: str = ""


def to_client(data: bytes, text: bool = True) -> WebSocketMessage:
    """A message from the gateway to the client (`from_client` False)."""
    return WebSocketMessage(Opcode.TEXT if text else Opcode.BINARY, False, data)


class GatewayWebsocketLayer(WebsocketLayer):
    def relay_messages(self, event: events.Event) -> layer.CommandGenerator[None]:
        if isinstance(event, (SocketSend, SocketClose)):
            if event.message.content:
                yield from self._send_to_client(event.message)
            if isinstance(event, SocketClose):
                yield from self._close(event.code, event.reason)
            return
        yield from WebsocketLayer.relay_messages(self, event)

    def _send_to_client(self, message: WebSocketMessage) -> layer.CommandGenerator[None]:
        if self.client_ws.state is not ConnectionState.OPEN:
            return
        if message.is_text:
            yield self.client_ws.send2(wsproto.events.TextMessage(data=message.content.decode("utf-8", "replace")))
        else:
            yield self.client_ws.send2(wsproto.events.BytesMessage(data=message.content))

    def _close(self, code: int, reason: str) -> layer.CommandGenerator[None]:
        assert self.flow.websocket
        ws = self.flow.websocket
        if ws.timestamp_end is not None:
            return
        ws.timestamp_end = time.time()
        ws.closed_by_client = False
        ws.close_code = code
        ws.close_reason = reason
        # A close reason is at most 123 bytes (RFC 6455 5.5).
        close = wsproto.events.CloseConnection(code=code, reason=reason.encode()[:123].decode("utf-8", "ignore"))
        for conn in (self.server_ws, self.client_ws):
            if conn.state in {ConnectionState.OPEN, ConnectionState.REMOTE_CLOSING}:
                yield conn.send2(close)
            yield commands.CloseConnection(conn.conn)
        yield WebsocketEndHook(self.flow)
        self.flow.live = False
        self._handle_event = self.done


def install() -> None:
    """Every new WebSocket uses the gateway's layer (mitmproxy's HTTP layer looks it up by module attribute)."""
    ws_layers.WebsocketLayer = GatewayWebsocketLayer  # type: ignore[misc]


Inject = Callable[[WebSocketMessageInjected], None]
