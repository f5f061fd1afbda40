"""Gemini's wire format: generateContent and streamGenerateContent (SSE with ?alt=sse, else
one JSON array sent piecemeal). The model sits in the path."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from spendgate.providers.base import (
    Prompt,
    StreamFormat,
    StreamState,
    as_count,
    as_limit,
    as_mapping,
    as_text,
    bare_path,
    sse_only,
)
from spendgate.providers.wire import EndpointKind, Family, RequestFacts, Usage

__all__ = ["ADAPTER", "GeminiAdapter"]

_MODEL_IN_PATH = re.compile(r"/(?:tuned)?[mM]odels/([^/:?]+):")


class GeminiAdapter:
    family = Family.GEMINI

    def endpoint_kind(self, method: str, path: str) -> EndpointKind:
        if method.upper() != "POST":
            return EndpointKind.OTHER
        path = bare_path(path).rstrip("/")
        if path.endswith((":generateContent", ":streamGenerateContent")):
            return EndpointKind.CHAT
        return EndpointKind.OTHER

    def request_facts(self, kind: EndpointKind, body: Mapping[str, Any], path: str) -> RequestFacts:
        path = bare_path(path)
        m = _MODEL_IN_PATH.search(path)
        return RequestFacts(
            model=m.group(1) if m else as_text(body.get("model")),
            stream=path.endswith(":streamGenerateContent"),
            max_output_tokens=as_limit(as_mapping(body.get("generationConfig")).get("maxOutputTokens")),
        )

    def prompt(self, kind: EndpointKind, body: Mapping[str, Any]) -> Prompt | None:
        if kind is not EndpointKind.CHAT:
            return None
        p = Prompt()
        p.walk(body.get("systemInstruction") or body.get("system_instruction"))
        p.turns(body.get("contents"))
        p.json(body.get("tools"))
        return p

    def prepare_stream(self, kind: EndpointKind, body: dict[str, Any]) -> bool:
        return False  # every streamed chunk carries usageMetadata

    def stream_format(self, content_type: str, stream: bool) -> StreamFormat | None:
        # Without ?alt=sse a stream is one JSON array sent piece by piece.
        if stream and content_type.startswith("application/json"):
            return StreamFormat.JSON_ARRAY
        return sse_only(content_type, stream)

    def unask_usage(self, event: Mapping[str, Any], raw: bytes) -> bytes:
        return raw

    def usage_from_json(self, kind: EndpointKind, body: Mapping[str, Any]) -> Usage | None:
        u = body.get("usageMetadata")
        if not isinstance(u, dict):
            return None
        return self.usage(u, as_text(body.get("modelVersion")), as_text(body.get("responseId")))

    def usage(self, raw: Mapping[str, Any], model: str | None, response_id: str | None) -> Usage:
        # candidatesTokenCount excludes thoughts; promptTokenCount includes cached content but not
        # tool-use prompt tokens (genai-prices adds those to input too).
        thoughts = as_count(raw.get("thoughtsTokenCount"))
        return Usage(
            input_tokens=as_count(raw.get("promptTokenCount")) + as_count(raw.get("toolUsePromptTokenCount")),
            output_tokens=as_count(raw.get("candidatesTokenCount")) + thoughts,
            cache_read_tokens=as_count(raw.get("cachedContentTokenCount")),
            reasoning_tokens=thoughts,
            model_reported=model,
            upstream_request_id=response_id,
        )

    def observe(self, kind: EndpointKind, event: Mapping[str, Any], state: StreamState) -> None:
        state.model = as_text(event.get("modelVersion")) or state.model
        state.response_id = as_text(event.get("responseId")) or state.response_id
        u = event.get("usageMetadata")
        if isinstance(u, dict):
            state.raw_usage = u
        candidates = event.get("candidates")
        if not isinstance(candidates, list):
            return
        for cand in candidates:
            if not isinstance(cand, dict):
                continue
            if cand.get("finishReason"):
                state.completed = True
            parts = as_mapping(cand.get("content")).get("parts")
            if isinstance(parts, list):
                for part in parts:
                    part = as_mapping(part)
                    state.add_text(part.get("text"))
                    if "functionCall" in part:
                        state.add_text(json.dumps(part["functionCall"], separators=(",", ":")))


ADAPTER = GeminiAdapter()
