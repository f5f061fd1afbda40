"""Anthropic's wire format: /v1/messages, streamed or not."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from spendgate.providers.base import (
    Prompt,
    StreamFormat,
    StreamState,
    as_count,
    as_mapping,
    as_text,
    bare_path,
    output_limit,
    sse_only,
)
from spendgate.providers.wire import EndpointKind, Family, RequestFacts, Usage

__all__ = ["ADAPTER", "AnthropicAdapter"]


class AnthropicAdapter:
    family = Family.ANTHROPIC

    def endpoint_kind(self, method: str, path: str) -> EndpointKind:
        if method.upper() != "POST":
            return EndpointKind.OTHER
        path = bare_path(path).rstrip("/")
        return EndpointKind.MESSAGES if path.endswith("/v1/messages") else EndpointKind.OTHER

    def request_facts(self, kind: EndpointKind, body: Mapping[str, Any], path: str) -> RequestFacts:
        # Anthropic's own name is max_tokens; OpenAI's are honoured too, so no limit goes unseen.
        return RequestFacts(
            model=as_text(body.get("model")), stream=body.get("stream") is True, max_output_tokens=output_limit(body)
        )

    def prompt(self, kind: EndpointKind, body: Mapping[str, Any]) -> Prompt | None:
        if kind is not EndpointKind.MESSAGES:
            return None
        p = Prompt()
        p.walk(body.get("system"))
        p.messages(body.get("messages"))
        p.json(body.get("tools"))
        return p

    def prepare_stream(self, kind: EndpointKind, body: dict[str, Any]) -> bool:
        return False  # message_start and message_delta always carry usage

    def stream_format(self, content_type: str, stream: bool) -> StreamFormat | None:
        return sse_only(content_type, stream)

    def unask_usage(self, event: Mapping[str, Any], raw: bytes) -> bytes:
        return raw

    def usage_from_json(self, kind: EndpointKind, body: Mapping[str, Any]) -> Usage | None:
        u = body.get("usage")
        if not isinstance(u, dict):
            return None
        return self.usage(u, as_text(body.get("model")), as_text(body.get("id")))

    def usage(self, raw: Mapping[str, Any], model: str | None, response_id: str | None) -> Usage:
        # Anthropic's input_tokens excludes the cached part; genai-prices' includes it.
        cache_write = as_count(raw.get("cache_creation_input_tokens"))
        cache_read = as_count(raw.get("cache_read_input_tokens"))
        return Usage(
            input_tokens=as_count(raw.get("input_tokens")) + cache_write + cache_read,
            output_tokens=as_count(raw.get("output_tokens")),
            cache_read_tokens=cache_read,
            cache_write_tokens=cache_write,
            model_reported=model,
            upstream_request_id=response_id,
        )

    def observe(self, kind: EndpointKind, event: Mapping[str, Any], state: StreamState) -> None:
        etype = event.get("type")
        if etype == "content_block_delta":
            delta = as_mapping(event.get("delta"))
            state.add_text(delta.get("text"))
            state.add_text(delta.get("thinking"))
            state.add_text(delta.get("partial_json"))
        elif etype == "message_start":
            message = as_mapping(event.get("message"))
            state.model = as_text(message.get("model")) or state.model
            state.response_id = as_text(message.get("id")) or state.response_id
            u = message.get("usage")
            if isinstance(u, dict):
                state.raw_usage = dict(u)
        elif etype == "message_delta":
            # Counts here are cumulative: the latest value replaces the earlier one.
            u = event.get("usage")
            if isinstance(u, dict):
                merged = dict(state.raw_usage or {})
                merged.update((k, v) for k, v in u.items() if v is not None)
                state.raw_usage = merged
        elif etype == "message_stop":
            state.completed = True


ADAPTER = AnthropicAdapter()
