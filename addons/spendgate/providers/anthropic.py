"""Anthropic's wire format: /v1/messages, streamed or not."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from spendgate.providers.base import (
    OUTPUT_LIMIT_KEYS,
    Prompt,
    StreamFormat,
    StreamState,
    as_count,
    as_mapping,
    as_text,
    bare_path,
    lowered,
    output_limit,
    sse_only,
)
from spendgate.providers.wire import EndpointKind, Family, RequestFacts, Upload, Usage

__all__ = ["ADAPTER", "AnthropicAdapter"]


class AnthropicAdapter:
    family = Family.ANTHROPIC

    def endpoint_kind(self, method: str, path: str) -> EndpointKind:
        path = bare_path(path).rstrip("/")
        post = method.upper() == "POST"
        if post and path.endswith("/v1/messages"):
            return EndpointKind.MESSAGES
        if re.search(r"/v1/messages/batches(?:/[^/]+)?$", path) and (post or method.upper() == "GET"):
            return EndpointKind.BATCHES
        if re.search(r"/v1/files(?:/[^/]+(?:/content)?)?$", path):
            return EndpointKind.FILES
        if method.upper() == "GET" and re.search(r"/v1/models(?:/[^/]+)?$", path):
            return EndpointKind.MODELS
        return EndpointKind.OTHER

    def unmetered(self, method: str, path: str) -> str | None:
        if method.upper() != "POST":
            return None
        kind = self.endpoint_kind(method, path)
        if kind is EndpointKind.BATCHES and path.rstrip("/").endswith("/batches"):
            return "batches"
        path = bare_path(path).rstrip("/")
        if kind is not EndpointKind.OTHER or not path.startswith("/v1/") or _FREE_POSTS.search(path):
            return None  # /api/… is the console's and Claude Code's own (no model answers)
        return resource_name(path)

    def request_facts(self, kind: EndpointKind, body: Mapping[str, Any], path: str) -> RequestFacts:
        # Anthropic's own name is max_tokens; OpenAI's are honoured too, so no limit goes unseen.
        # A thinking budget is part of max_tokens.
        return RequestFacts(
            model=as_text(body.get("model")), stream=body.get("stream") is True, max_output_tokens=output_limit(body)
        )

    def set_output_limit(self, kind: EndpointKind, body: dict[str, Any], limit: int, field: str) -> None:
        present = [k for k in OUTPUT_LIMIT_KEYS if body.get(k) is not None]
        for k in present or ["max_tokens"]:
            body[k] = lowered(body.get(k), limit)
        thinking = body.get("thinking")
        if isinstance(thinking, dict) and isinstance(thinking.get("budget_tokens"), int):
            # Anthropic requires budget_tokens < max_tokens; keep what is left for the answer.
            thinking["budget_tokens"] = min(thinking["budget_tokens"], max(limit - 1, 1))

    def response_text(self, kind: EndpointKind, body: Mapping[str, Any]) -> str:
        state = StreamState()
        for block in body.get("content") or ():
            block = as_mapping(block)
            state.add_text(block.get("text"))
            state.add_text(block.get("thinking"))
            if isinstance(block.get("input"), dict):
                state.add_text(json.dumps(block["input"], separators=(",", ":")))
        return state.output_text

    def media_usage(self, kind: EndpointKind, body: Mapping[str, Any], uploads: Sequence[Upload],
                    facts: RequestFacts, prompt_tokens: int) -> Usage | None:
        return None

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

    def unask_usage(self, event: Mapping[str, Any] | None, raw: bytes) -> bytes:
        return raw

    def text_only(self, kind: EndpointKind, name: str, data: str) -> bool:
        return name == "content_block_delta" or data.startswith('{"type":"content_block_delta"')

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

_FREE_POSTS = re.compile(r"/v1/(?:messages/count_tokens|messages/batches/[^/]+/cancel|files)$")


def resource_name(path: str) -> str:
    """/v1/complete is "complete"."""
    return path.removeprefix("/v1/").split("/", 1)[0] or "/"
