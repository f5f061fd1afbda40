"""Stage: usage and cost. Reads usage from responses and streams as they pass; estimates with
tiktoken when the provider gave none (cut-off streams, clients that hung up, JSON answers
without usage: counted from their text), and prices images and speech that report none by what
the request asked for. The row says where the price came from (`cost_source`)."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import replace

from mitmproxy import http

from spendgate.pricing import Pricer
from spendgate.providers import adapter_for, usage_from_json
from spendgate.providers.stream import StreamTap
from spendgate.providers.tokens import count_text, estimate_input_tokens
from spendgate.providers.wire import EndpointKind, Usage, UsageSource
from spendgate.stages.call import OFF_LOOP_BYTES, Call, client_gone, get_call
from spendgate.stages.estimate import Estimator

CAPTURE_LIMIT = 4 * 1024 * 1024


_TEXT_KINDS = frozenset({EndpointKind.CHAT, EndpointKind.RESPONSES, EndpointKind.MESSAGES, EndpointKind.COMPLETIONS,
                         EndpointKind.EMBEDDINGS, EndpointKind.REALTIME})


class Meter:
    def __init__(self, pricer: Pricer, estimator: Estimator) -> None:
        self.pricer = pricer
        self.estimator = estimator

    def request(self, flow: http.HTTPFlow) -> None:
        call = get_call(flow)
        if call is None or flow.response is not None or call.body is None or not call.stream:
            return
        if adapter_for(call.provider.spec.family).prepare_stream(call.endpoint_kind, call.body):
            call.metering.added_usage = True
            call.body_changed = True  # Forward sends the changed body

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
        text: str | None = None  # a JSON answer's generated text, to count when it reports no usage
        resp = flow.response
        if m.tap is not None:
            usage = m.tap.usage
            m.response_bytes = m.stream_bytes
        elif resp is not None and flow.error is None:
            raw = resp.raw_content or b""
            m.response_bytes = len(raw)
            if resp.headers.get("content-type", "").startswith("application/json") and raw:
                usage, text = await self._parse(call, resp)
        estimated = False
        if call.endpoint_kind.metered and not call.upgrade:
            needs_estimate = usage is None or (m.tap is not None and not m.tap.completed)
            # Estimate only what the provider will bill: it answered, or the client left while it worked.
            reached = resp is not None or (flow.error is not None and client_gone(flow))
            if needs_estimate and reached and (resp is None or resp.status_code < 400):
                usage = await self._estimate(call, usage, m.tap, text)
                estimated = True
            elif usage is not None and call.endpoint_kind not in _TEXT_KINDS and not usage.images and usage.only_tokens:
                usage = self._with_media(call, usage, await self.estimator.usage(call))
        if usage is not None:
            m.usage = usage
            m.source = UsageSource.ESTIMATED if estimated else UsageSource.PROVIDER
            priced = self.pricer.price(call.provider.name, usage.model_reported, call.model_requested, usage=usage)
            m.cost, m.cost_source = priced.cost, priced.source

    async def _parse(self, call: Call, resp: http.Response) -> tuple[Usage | None, str | None]:
        family, kind = call.provider.spec.family, call.endpoint_kind

        def parse() -> tuple[Usage | None, str | None]:
            try:
                doc = json.loads(resp.get_content(strict=False) or b"")
            except (ValueError, UnicodeDecodeError, RecursionError):
                return None, None
            if not isinstance(doc, dict):
                return None, None
            usage = usage_from_json(family, kind, doc)
            text = adapter_for(family).response_text(kind, doc) if usage is None and kind in _TEXT_KINDS else None
            return usage, text

        if len(resp.raw_content or b"") > OFF_LOOP_BYTES:
            return await asyncio.to_thread(parse)
        return parse()

    @staticmethod
    def _with_media(call: Call, usage: Usage, asked: Usage) -> Usage:
        """Reported usage of a media request, with the units it did not report taken from what was asked."""
        return replace(usage, input_characters=usage.input_characters or asked.input_characters,
                       audio_seconds=usage.audio_seconds or (asked.audio_seconds if not usage.input_tokens else 0.0),
                       images=usage.images or (asked.images if call.endpoint_kind is EndpointKind.IMAGES else 0))

    async def _estimate(self, call: Call, partial: Usage | None, tap: StreamTap | None, text: str | None) -> Usage:
        """Count what we saw: the prompt from the request body, the output from the streamed or
        answered text. Media without usage is what the request asked for."""
        family, kind, model = call.provider.spec.family, call.endpoint_kind, call.model_requested
        if kind not in _TEXT_KINDS:
            asked = await self.estimator.usage(call)
            return self._with_media(call, partial, asked) if partial is not None else asked
        answer = tap.output_text if tap is not None else (text or "".join(call.metering.streamed_text))

        def count() -> tuple[int, int]:
            inp = partial.input_tokens if partial and partial.input_tokens else (
                estimate_input_tokens(family, kind, call.body or {}, model)
            )
            return inp, count_text(answer, model)

        if call.request_bytes > OFF_LOOP_BYTES or len(answer) > OFF_LOOP_BYTES:
            inp, out = await asyncio.to_thread(count)
        else:
            inp, out = count()
        base = partial or Usage()
        return replace(base, input_tokens=inp, output_tokens=max(out, base.output_tokens))
