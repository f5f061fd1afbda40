"""One mitmproxy addon that runs the gateway's stages in order.

mitmproxy dispatches every event to every addon through a generic path (addon tree
traversal, a context manager per call); for ten small stages that cost more than the
stages themselves. The pipeline resolves, once, which stages implement which hook and
calls them directly, in list order, awaiting the async ones. Stages stay plain addons
with mitmproxy's hook signatures.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any, Callable

from mitmproxy import http

from spendgate.call import get_call, refuse

log = logging.getLogger("spendgate.pipeline")

REQUEST_HOOKS = frozenset({"http_connect", "requestheaders", "request"})
HOOKS = (
    "tls_clienthello", "tls_start_server", "server_connect", "http_connect", "requestheaders", "request",
    "responseheaders", "response", "error",
)


class Pipeline:
    def __init__(self, stages: list[Any]) -> None:
        self.stages = stages
        self._chains: dict[str, list[tuple[Callable[..., Any], bool]]] = {}
        for hook in HOOKS:
            chain = []
            for stage in stages:
                fn = getattr(stage, hook, None)
                if fn is not None:
                    chain.append((fn, inspect.iscoroutinefunction(fn)))
            self._chains[hook] = chain
            if not chain:
                continue
            if any(is_async for _, is_async in chain):
                setattr(self, hook, self._async_runner(hook, chain))
            else:
                setattr(self, hook, self._sync_runner(hook, chain))

    def _sync_runner(self, hook: str, chain: list[tuple[Callable[..., Any], bool]]) -> Callable[[Any], None]:
        fns = [fn for fn, _ in chain]

        def run(arg: Any) -> None:
            for fn in fns:
                try:
                    fn(arg)
                except Exception as e:
                    self._failed(hook, fn, arg, e)

        return run

    def _async_runner(self, hook: str, chain: list[tuple[Callable[..., Any], bool]]) -> Callable[[Any], Any]:
        async def run(arg: Any) -> None:
            for fn, is_async in chain:
                try:
                    if is_async:
                        await fn(arg)
                    else:
                        fn(arg)
                except Exception as e:
                    self._failed(hook, fn, arg, e)

        return run

    @staticmethod
    def _failed(hook: str, fn: Callable[..., Any], arg: Any, e: Exception) -> None:
        """A stage broke. Fail closed: a request it was deciding on does not go upstream ungoverned."""
        stage = type(getattr(fn, "__self__", fn)).__name__
        log.error("stage %s failed in %s: %s", stage, hook, type(e).__name__, exc_info=log.isEnabledFor(logging.DEBUG))
        if hook == "server_connect" and hasattr(arg, "server"):
            arg.server.error = "the gateway failed while checking this destination"
            return
        if hook not in REQUEST_HOOKS or not isinstance(arg, http.HTTPFlow) or arg.response is not None:
            return
        call = get_call(arg)
        if call is not None:
            refuse(arg, call, 500, "spendgate_internal_error",
                   "The gateway failed while checking this request, so it was not sent. Try again; if it persists, tell your admin.",
                   "gateway_error")
        else:
            arg.response = http.Response.make(500, b"Spendgate: internal error; the request was not sent.\n",
                                              {"content-type": "text/plain"})
