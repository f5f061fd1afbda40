"""Stage: usage and cost. Reads usage from responses and SSE streams as they pass; estimates
with tiktoken when the provider gave none (cut-off streams, clients that hung up)."""

from __future__ import annotations

import asyncio
import json
import time
from decimal import Decimal
from typing import Any

from mitmproxy import http

from spendgate.call import OFF_LOOP_BYTES, Call, get_call
from spendgate.pricing import Pricer
from spendgate.outcome import client_gone
from spendgate.runtime import Runtime
from spendgate.tokens import count_text, estimate_input_tokens
from spendgate.usage import EndpointKind, Family, StreamTap, Usage, UsageSource, add_include_usage, usage_from_json

CAPTURE_LIMIT = 4 * 1024 * 1024


class Meter:
    def __init__(self, rt: Runtime, pricer: Pricer) -> None:
        self.rt = rt
        self.pricer = pricer

    def request(self, flow: http.HTTPFlow) -> None:
        call = get_call(flow)
        if call is None or flow.response is not None or call.body is None:
            return
        kind = EndpointKind(call.endpoint_kind)
        if call.family == "openai" and call.stream and kind in (EndpointKind.CHAT, EndpointKind.COMPLETIONS):
            if add_include_usage(call.body):
                # Exact streamed counts: ask for the usage chunk, and remove it before the client sees it.
                call.extra["strip_usage"] = True
                flow.request.content = json.dumps(call.body, separators=(",", ":")).encode()

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        call = get_call(flow)
        if call is None or flow.response is None:
            return
        call.extra["t_headers"] = time.perf_counter()
        ctype = flow.response.headers.get("content-type", "")
        # Gemini streams without ?alt=sse are one JSON array sent piece by piece.
        gemini_array = call.family == "gemini" and call.stream and ctype.startswith("application/json")
        if not (ctype.startswith("text/event-stream") or gemini_array):
            return
        tap = StreamTap(Family(call.family), EndpointKind(call.endpoint_kind), bool(call.extra.get("strip_usage")))
        call.extra["tap"] = tap
        capture = call.extra.get("capture")
        counter = {"bytes": 0}
        call.extra["stream_counter"] = counter

        def on_chunk(chunk: bytes) -> list[bytes]:
            if chunk and "t_first" not in call.extra:
                call.extra["t_first"] = time.perf_counter()
            out = tap.feed(chunk)
            counter["bytes"] += len(out)
            if capture is not None and len(capture) < CAPTURE_LIMIT:
                capture.extend(out)
            return [out] if out else []

        flow.response.stream = on_chunk

    async def response(self, flow: http.HTTPFlow) -> None:
        call = get_call(flow)
        if call is None or call.outcome is not None or flow.response is None:
            return
        call.extra["t_resp0"] = time.perf_counter()
        await self._settle(flow, call)

    async def error(self, flow: http.HTTPFlow) -> None:
        call = get_call(flow)
        if call is None or call.outcome is not None:
            return
        call.extra["t_resp0"] = time.perf_counter()
        await self._settle(flow, call)

    async def _settle(self, flow: http.HTTPFlow, call: Call) -> None:
        usage: Usage | None = None
        tap: StreamTap | None = call.extra.get("tap")
        resp = flow.response
        if tap is not None:
            usage = tap.usage
            call.extra["response_bytes"] = call.extra["stream_counter"]["bytes"]
        elif resp is not None and flow.error is None:
            raw = resp.raw_content or b""
            call.extra["response_bytes"] = len(raw)
            if resp.headers.get("content-type", "").startswith("application/json") and raw:
                usage = await self._parse_usage(call, resp)
        estimated = False
        if call.endpoint_kind != EndpointKind.OTHER.value:
            needs_estimate = usage is None or (tap is not None and not tap.completed)
            # Estimate only what the provider will bill: it answered, or the client left while it worked.
            reached = resp is not None or (flow.error is not None and client_gone(flow))
            if needs_estimate and reached and (resp is None or resp.status_code < 400):
                usage = await self._estimate(call, usage, tap)
                estimated = True
        if usage is not None:
            call.extra["usage"] = usage
            call.extra["usage_source"] = (UsageSource.ESTIMATED if estimated else UsageSource.PROVIDER).value
            model = usage.model_reported or call.model_requested
            cost = self.pricer.cost(call.provider.name, model, usage)
            call.extra["cost"] = cost

    async def _parse_usage(self, call: Call, resp: http.Response) -> Usage | None:
        def parse() -> Usage | None:
            try:
                doc = json.loads(resp.get_content(strict=False) or b"")
            except (ValueError, UnicodeDecodeError):
                return None
            if not isinstance(doc, dict):
                return None
            return usage_from_json(Family(call.family), EndpointKind(call.endpoint_kind), doc)

        if len(resp.raw_content or b"") > OFF_LOOP_BYTES:
            return await asyncio.to_thread(parse)
        return parse()

    async def _estimate(self, call: Call, partial: Usage | None, tap: StreamTap | None) -> Usage:
        """Count what we saw: the prompt from the request body, the output from the streamed text."""
        family, kind, model = Family(call.family), EndpointKind(call.endpoint_kind), call.model_requested

        def count() -> tuple[int, int]:
            inp = partial.input_tokens if partial and partial.input_tokens else (
                estimate_input_tokens(family, kind, call.body or {}, model)
            )
            out = count_text(tap.output_text, model)[0] if tap is not None else 0
            return inp, out

        if call.request_bytes > OFF_LOOP_BYTES or (tap is not None and tap.output_text_bytes > OFF_LOOP_BYTES):
            inp, out = await asyncio.to_thread(count)
        else:
            inp, out = count()
        base = partial or Usage()
        return Usage(
            input_tokens=inp,
            output_tokens=max(out, base.output_tokens),
            cache_read_tokens=base.cache_read_tokens,
            cache_write_tokens=base.cache_write_tokens,
            reasoning_tokens=base.reasoning_tokens,
            model_reported=base.model_reported,
            upstream_request_id=base.upstream_request_id,
        )


def nano_usd(cost: Decimal | None) -> int | None:
    """Money is stored as integer nano-USD: exact on SQLite and PostgreSQL.

    >>> nano_usd(Decimal("0.0000125"))
    12500
    """
    if cost is None:
        return None
    return int((cost * 1_000_000_000).to_integral_value())


def body_text(content: bytes | None) -> str | None:
    if content is None:
        return None
    return content.decode("utf-8", "replace")


