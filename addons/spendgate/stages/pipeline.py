"""One mitmproxy addon that runs the gateway's stages in order.

mitmproxy dispatches every event to every addon through a generic path (addon tree
traversal, a context manager per call); for a dozen small stages that cost more than the
stages themselves. The pipeline resolves, once, which stages implement which hook and calls
them directly, in list order, awaiting the async ones. It also:

- fails closed: a stage that raises while a request is being decided refuses the request (500);
- measures each stage, adding its time to the request's `timing` (before it leaves / after);
- ends each request once: the first of `response` or `error` runs every stage's
  `finish(flow, call)`, in order, exactly once (meter, record, metrics, alerts).
"""

from __future__ import annotations

import inspect
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from mitmproxy import http
from mitmproxy.utils import human

from spendgate.stages.call import Call, Outcome, get_call, refuse

log = logging.getLogger(__name__)

REQUEST_HOOKS = frozenset({"http_connect", "requestheaders", "request"})
PRE_HOOKS = frozenset({"requestheaders", "request"})  # their time is gateway time before the request leaves
HOOKS = (
    "tls_clienthello", "tls_start_server", "server_connect", "http_connect", "requestheaders", "request",
    "responseheaders", "response", "error", "websocket_start", "websocket_message", "websocket_end",
)
_Chain = list[tuple[str, Callable[..., Any], bool]]


class Pipeline:
    def __init__(self, stages: list[Any]) -> None:
        self.stages = stages
        self.seconds: dict[str, float] = {type(s).__name__: 0.0 for s in stages}  # per stage, for diagnostics
        self._finish = self._chain(stages, "finish")
        for hook in HOOKS:
            chain = self._chain(stages, hook)
            ends = hook in ("response", "error")
            if not chain and not ends:
                continue
            if ends or any(is_async for _, _, is_async in chain):
                setattr(self, hook, self._async_runner(hook, chain, ends))
            else:
                setattr(self, hook, self._sync_runner(hook, chain))
        for stage in stages:
            bind = getattr(stage, "bind_pipeline", None)
            if bind is not None:
                bind(self.end)  # a stage that ends calls of its own (WebSocket model calls)

    @staticmethod
    def _chain(stages: list[Any], hook: str) -> _Chain:
        out: _Chain = []
        for stage in stages:
            fn = getattr(stage, hook, None)
            if fn is not None:
                out.append((type(stage).__name__, fn, inspect.iscoroutinefunction(fn)))
        return out

    def _sync_runner(self, hook: str, chain: _Chain) -> Callable[[Any], None]:
        pre = hook in PRE_HOOKS
        seconds = self.seconds

        decides = hook in REQUEST_HOOKS

        def run(arg: Any) -> None:
            spent = 0.0
            for name, fn, _ in chain:
                t = time.perf_counter()
                open_ = decides and isinstance(arg, http.HTTPFlow) and arg.response is None
                try:
                    fn(arg)
                except Exception as e:
                    self._failed(hook, name, arg, e)
                if open_ and arg.response is not None:
                    log_refusal(name, arg)
                dt = time.perf_counter() - t
                seconds[name] += dt
                spent += dt
            _account(arg, spent, pre)

        return run

    def _async_runner(self, hook: str, chain: _Chain, ends: bool) -> Callable[[Any], Any]:
        pre = hook in PRE_HOOKS
        seconds = self.seconds

        decides = hook in REQUEST_HOOKS

        async def run(arg: Any) -> None:
            spent = 0.0
            for name, fn, is_async in chain:
                t = time.perf_counter()
                open_ = decides and isinstance(arg, http.HTTPFlow) and arg.response is None
                try:
                    if is_async:
                        await fn(arg)
                    else:
                        fn(arg)
                except Exception as e:
                    self._failed(hook, name, arg, e)
                if open_ and arg.response is not None:
                    log_refusal(name, arg)
                dt = time.perf_counter() - t
                seconds[name] += dt
                spent += dt
            _account(arg, spent, pre)
            if ends and isinstance(arg, http.HTTPFlow):
                await self.end(arg)

        return run

    async def end(self, flow: http.HTTPFlow) -> None:
        """Run every stage's `finish` once per request, whichever of response / error comes first."""
        call = get_call(flow)
        if call is None or call.finished:
            return
        call.finished = True
        for name, fn, is_async in self._finish:
            t = time.perf_counter()
            try:
                if is_async:
                    await fn(flow, call)
                else:
                    fn(flow, call)
            except Exception as e:
                log.error("stage %s failed to finish request %s: %s: %s", name, call.request_id, type(e).__name__,
                          str(e)[:300], exc_info=True)
            dt = time.perf_counter() - t
            self.seconds[name] += dt
            call.timing.post += dt

    @staticmethod
    def _failed(hook: str, stage: str, arg: Any, e: Exception) -> None:
        """A stage broke. Fail closed: a request it was deciding on does not go upstream ungoverned."""
        log.error("stage %s failed in %s: %s: %s", stage, hook, type(e).__name__, str(e)[:300], exc_info=True)
        if hook == "server_connect" and hasattr(arg, "server"):
            arg.server.error = "the gateway failed while checking this destination"
            return
        if hook not in REQUEST_HOOKS or not isinstance(arg, http.HTTPFlow) or arg.response is not None:
            return
        call = get_call(arg)
        if call is not None:
            refuse(arg, call, 500, "spendgate_internal_error",
                   "The gateway failed while checking this request, so it was not sent. Try again; if it persists, "
                   "tell your admin.", Outcome.GATEWAY_ERROR)
        else:
            arg.response = http.Response.make(500, b"Spendgate: internal error; the request was not sent.\n",
                                              {"content-type": "text/plain"})


def log_refusal(stage: str, flow: http.HTTPFlow) -> None:
    """Every refusal says why, at info (never a credential: no query string, no header values)."""
    if not log.isEnabledFor(logging.INFO) or flow.response is None or flow.response.status_code < 400:
        return  # the gateway's own answers (the CA download) are not refusals
    call = get_call(flow)
    req, resp = flow.request, flow.response
    path = req.path.split("?", 1)[0]
    target = f"{req.pretty_host}:{req.port}" if req.method == "CONNECT" else f"{req.pretty_host}{path}"
    log.info("refused %s %s %r from %s (%s): %d %s: %s", call.request_id if call else "-", req.method, target[:300],
             human.format_address(flow.client_conn.peername), stage, resp.status_code,
             (call.error if call else None) or "-", refusal_reason(resp)[:500])


def refusal_reason(resp: http.Response) -> str:
    """The message of an answer the gateway made: a provider error's `message`, or the text."""
    content = resp.get_content(strict=False) or b""
    try:
        body = json.loads(content)
    except ValueError:
        return content.decode("utf-8", "replace").strip()
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return str(err["message"])
    return content.decode("utf-8", "replace").strip()


def _account(arg: Any, spent: float, pre: bool) -> None:
    call = get_call(arg) if isinstance(arg, http.HTTPFlow) else None
    if isinstance(call, Call):
        if pre:
            call.timing.pre += spent
        else:
            call.timing.post += spent
