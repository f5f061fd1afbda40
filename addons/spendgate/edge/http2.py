"""HTTP/2 from clients without silent resets.

h2 refuses a request whose header value has surrounding whitespace by tearing down the whole
connection, without a word: curl exactly as the provider docs show it, with `$OPENAI_API_KEY`
unset, sends `authorization: Bearer ` and gets a reset. Here h2's inbound check is off and the
gateway checks requests itself: surrounding whitespace is trimmed (as HTTP/1 does), and what
would be dangerous to pass on (CR, LF or NUL in a value, connection-specific headers, misplaced
or unknown pseudo-headers, upper-case names) still closes the connection, now with a log line
that says why.
"""

from __future__ import annotations

import logging
from typing import Any

import h2.config
import h2.errors
import h2.events
from mitmproxy.proxy import layer
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.layers.http._http2 import Http2Connection, Http2Server
from mitmproxy.utils import human

__all__ = ["GatewayHttp2Server", "header_problem"]

log = logging.getLogger("spendgate.edge")

_PSEUDO = frozenset({b":method", b":scheme", b":authority", b":path", b":protocol"})
_CONNECTION_SPECIFIC = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"})
_WHITESPACE = b" \t"


def header_problem(headers: list[tuple[bytes, bytes]], trailers: bool = False) -> str | None:
    """Why these request headers must not be passed on, or None. Surrounding whitespace is not a reason."""
    regular = False
    for name, value in headers:
        if not name:
            return "an empty header name"
        if any(c in value for c in b"\r\n\x00"):
            return f"a CR, LF or NUL in the value of {name[:64]!r}"
        if name.startswith(b":"):
            if regular or trailers:
                return f"pseudo-header {name[:64]!r} after regular headers"
            if name not in _PSEUDO:
                return f"unknown pseudo-header {name[:64]!r}"
            continue
        regular = True
        if name != name.lower():
            return f"an upper-case header name {name[:64]!r}"
        if any(c in name for c in b" \t\r\n\x00:"):
            return f"an invalid header name {name[:64]!r}"
        if name in _CONNECTION_SPECIFIC or (name == b"te" and value.strip(_WHITESPACE).lower() != b"trailers"):
            return f"connection-specific header {name.decode('latin-1')!r}"
    return None


def _trimmed(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    return [(n, v.strip(_WHITESPACE)) for n, v in headers]


class GatewayHttp2Server(Http2Server):
    h2_conf = h2.config.H2Configuration(**Http2Connection.h2_conf_defaults, client_side=False)

    def __init__(self, context: Context) -> None:
        super().__init__(context)
        self.h2_conn.config.validate_inbound_headers = False  # checked in handle_h2_event instead

    def handle_h2_event(self, event: h2.events.Event) -> layer.CommandGenerator[bool]:
        if isinstance(event, (h2.events.RequestReceived, h2.events.TrailersReceived)):
            headers: Any = event.headers or []
            problem = header_problem(list(headers), trailers=isinstance(event, h2.events.TrailersReceived))
            if problem is not None:
                yield from self.protocol_error(f"Invalid HTTP/2 request headers: {problem}")
                return True
            event.headers = _trimmed(list(headers))
        return (yield from super().handle_h2_event(event))

    def protocol_error(self, message: str, error_code: int = h2.errors.ErrorCodes.PROTOCOL_ERROR,
                       ) -> layer.CommandGenerator[None]:
        # mitmproxy logs this at info on its own logger: say it where admins look.
        log.warning("client %s: HTTP/2 connection closed: %s", human.format_address(self.conn.peername), message)
        yield from super().protocol_error(message, error_code)
