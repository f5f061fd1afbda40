"""Stage 3: send the request where the config says, and pass answers on as they come."""

from __future__ import annotations

from mitmproxy import http

from spendgate.call import REQUEST_ID_HEADER, get_call, new_request_id
from spendgate.runtime import Runtime


class Forward:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt

    def request(self, flow: http.HTTPFlow) -> None:
        call = get_call(flow)
        if call is None or flow.response is not None:
            return
        up = call.provider.upstream
        if up is not None:
            flow.request.scheme, flow.request.host, flow.request.port = up.scheme, up.host, up.port
        if call.stream:
            # A compressed event stream cannot be read as it passes.
            flow.request.headers["accept-encoding"] = "identity"

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        call = get_call(flow)
        if flow.response is None:
            return
        flow.response.headers[REQUEST_ID_HEADER] = call.request_id if call else new_request_id()
        if call is None:
            return
        ctype = flow.response.headers.get("content-type", "")
        if ctype.startswith("text/event-stream") and not flow.response.stream:
            flow.response.stream = True
