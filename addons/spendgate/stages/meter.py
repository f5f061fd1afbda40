"""Stage: usage and cost. Reads usage from responses and streams as they pass; estimates with
tiktoken when the provider gave none (cut-off streams, clients that hung up)."""

from __future__ import annotations

import asyncio
import json
import time

from mitmproxy import http

from spendgate.pricing import Pricer
from spendgate.providers import adapter_for, usage_from_json
from spendgate.providers.stream import StreamTap
from spendgate.providers.tokens import count_text, estimate_input_tokens
from spendgate.providers.wire import EndpointKind, Usage, UsageSource
from spendgate.stages.call import OFF_LOOP_BYTES, Call, client_gone, get_call

CAPTURE_LIMIT = 4 * 1024 * 1024


class Meter:
    def __init__(self, pricer: Pricer) -> None:
        self.pricer = pricer

    def request(self, flow: http.HTTPFlow) -> None:
        call = get_call(flow)
        if call is None or flow.response is not None or call.body is None or not call.stream:
            return
        if adapter_for(call.provider.spec.family).prepare_stream(call.endpoint_kind, call.body):
            call.metering.added_usage = True
            flow.request.content = json.dumps(call.body, separators=(",", ":")).encode()

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        call = get_call(flow)
        if call is None or flow.response is None:
            return
        adapter = adapter_for(call.provider.spec.family)
        fmt = adapter.stream_format(flow.response.headers.get("content-type", ""), call.stream)
        if fmt is None:
            return
        m = call.metering
        tap = m.tap = StreamTap(adapter, call.endpoint_kind, fmt, m.added_usage)
        capture = call.capture.response if call.capture is not None else None
        timing = call.timing

        def on_chunk(chunk: bytes) -> list[bytes]:
            if chunk and timing.first_chunk is None:
                timing.first_chunk = time.perf_counter()
            out = tap.feed(chunk)
            m.stream_bytes += len(out)
            if capture is not None and len(capture) < CAPTURE_LIMIT:
                capture.extend(out)
            return [out] if out else []

        flow.response.stream = on_chunk

    async def finish(self, flow: http.HTTPFlow, call: Call) -> None:
        if call.outcome is not None:
            return  # refused or failed before any answer: nothing was used
        m = call.metering
        usage: Usage | None = None
        resp = flow.response
        if m.tap is not None:
            usage = m.tap.usage
            m.response_bytes = m.stream_bytes
        elif resp is not None and flow.error is None:
            raw = resp.raw_content or b""
            m.response_bytes = len(raw)
            if resp.headers.get("content-type", "").startswith("application/json") and raw:
                usage = await self._parse_usage(call, resp)
        estimated = False
        if call.endpoint_kind is not EndpointKind.OTHER:
            needs_estimate = usage is None or (m.tap is not None and not m.tap.completed)
            # Estimate only what the provider will bill: it answered, or the client left while it worked.
            reached = resp is not None or (flow.error is not None and client_gone(flow))
            if needs_estimate and reached and (resp is None or resp.status_code < 400):
                usage = await self._estimate(call, usage, m.tap)
                estimated = True
        if usage is not None:
            m.usage = usage
            m.source = UsageSource.ESTIMATED if estimated else UsageSource.PROVIDER
            m.cost = self.pricer.cost(call.provider.name, usage.model_reported or call.model_requested, usage)

    async def _parse_usage(self, call: Call, resp: http.Response) -> Usage | None:
        def parse() -> Usage | None:
            try:
                doc = json.loads(resp.get_content(strict=False) or b"")
            except (ValueError, UnicodeDecodeError, RecursionError):
                return None
            if not isinstance(doc, dict):
                return None
            return usage_from_json(call.provider.spec.family, call.endpoint_kind, doc)

        if len(resp.raw_content or b"") > OFF_LOOP_BYTES:
            return await asyncio.to_thread(parse)
        return parse()

    async def _estimate(self, call: Call, partial: Usage | None, tap: StreamTap | None) -> Usage:
        """Count what we saw: the prompt from the request body, the output from the streamed text."""
        family, kind, model = call.provider.spec.family, call.endpoint_kind, call.model_requested

        def count() -> tuple[int, int]:
            inp = partial.input_tokens if partial and partial.input_tokens else (
                estimate_input_tokens(family, kind, call.body or {}, model)
            )
            out = count_text(tap.output_text, model) if tap is not None else 0
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
