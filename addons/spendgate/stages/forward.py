"""Stage: send the request where the config says, with the team's key, and pass answers on.

The upstream key is set here, last, on a request whose destination is that provider's own
host on 443 or its configured `upstream` (routing fixed the host; `Destinations` checks the
address actually connected to). Answers pass on as they come; an upstream that echoes the
team's key gets it redacted before the client sees it. Traffic to other hosts streams through
untouched and is never buffered.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable

from mitmproxy import http

from spendgate.access import MODEL_PORT
from spendgate.providers.credentials import upstream_auth_headers
from spendgate.stages.call import REQUEST_ID_HEADER, get_call, new_request_id
from spendgate.stages.redaction import Redactor


class Forward:
    def __init__(self, redactor: Redactor) -> None:
        self.redactor = redactor

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if get_call(flow) is None and flow.response is None:
            flow.request.stream = True  # another host: relayed as it arrives, never held in memory

    def request(self, flow: http.HTTPFlow) -> None:
        call = get_call(flow)
        if call is None or flow.response is not None:
            return
        up = call.provider.upstream
        if up is not None:
            flow.request.scheme, flow.request.host, flow.request.port = up.scheme, up.host, up.port
        else:
            flow.request.scheme, flow.request.host, flow.request.port = "https", call.host, MODEL_PORT
        key = call.byok_key or call.provider.api_key
        if key:
            name, value = upstream_auth_headers(call.provider.spec, key)
            flow.request.headers[name] = value
        if call.stream:
            # A compressed event stream cannot be read as it passes.
            flow.request.headers["accept-encoding"] = "identity"
        if call.body_changed and call.body is not None and not call.uploads:
            # A stage changed what is sent (stream usage asked for, output limit lowered); the
            # content setter encodes it again as the request's content-encoding says.
            flow.request.content = json.dumps(call.body, separators=(",", ":")).encode()

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        call = get_call(flow)
        resp = flow.response
        if resp is None:
            return
        resp.headers[REQUEST_ID_HEADER] = call.request_id if call else new_request_id()
        if call is None:
            resp.stream = True
            return
        self.redactor.headers(resp.headers)
        if resp.stream:
            resp.stream = _redacting(resp.stream, self.redactor)

    def response(self, flow: http.HTTPFlow) -> None:
        call = get_call(flow)
        resp = flow.response
        if call is None or resp is None or resp.stream or not resp.raw_content or not self.redactor.active:
            return
        content = resp.get_content(strict=False) or b""
        clean = self.redactor.whole(content)
        if clean is not content:
            resp.set_content(clean)


StreamCallback = Callable[[bytes], "bytes | Iterable[bytes]"]


def _redacting(inner: bool | StreamCallback, redactor: Redactor) -> bool | StreamCallback:
    """Chain redaction after whatever stream callback (the meter's tap) is already set."""
    if not redactor.active:
        return inner
    stream = redactor.stream()

    def on_chunk(chunk: bytes) -> Iterable[bytes]:
        out = inner(chunk) if callable(inner) else [chunk]
        parts = [out] if isinstance(out, bytes) else list(out)
        if not chunk:  # end of stream: release what was held back
            return [b for b in (stream.feed(b"".join(parts)), stream.flush()) if b]
        cleaned = stream.feed(b"".join(parts)) if parts else b""
        return [cleaned] if cleaned else []

    return on_chunk
