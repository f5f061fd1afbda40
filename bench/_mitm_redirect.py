"""mitmdump -s script for the bare-mitmproxy baseline of bench/proxy_overhead.py.

Does the minimum the gateway's Forward stage does, so both paths do the same interception work:
requests for api.openai.com go to ``--set bench_upstream=HOST:PORT`` over HTTPS, and SSE answers
are streamed to the client as they arrive instead of buffered.
"""

from __future__ import annotations

from typing import Any

from mitmproxy import ctx, http


class Redirect:
    def __init__(self) -> None:
        self.host = ""
        self.port = 0

    def load(self, loader: Any) -> None:
        loader.add_option("bench_upstream", str, "", "HOST:PORT that api.openai.com traffic is sent to (HTTPS).")

    def configure(self, updated: set[str]) -> None:
        if "bench_upstream" in updated and ctx.options.bench_upstream:
            host, _, port = ctx.options.bench_upstream.rpartition(":")
            self.host, self.port = host, int(port)

    def request(self, flow: http.HTTPFlow) -> None:
        if self.port and flow.request.pretty_host == "api.openai.com":
            flow.request.scheme, flow.request.host, flow.request.port = "https", self.host, self.port

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None and flow.response.headers.get("content-type", "").startswith("text/event-stream"):
            flow.response.stream = True


addons = [Redirect()]
