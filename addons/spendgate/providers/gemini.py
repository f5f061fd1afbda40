"""Gemini's wire format: generateContent and streamGenerateContent (SSE with ?alt=sse, else
one JSON array sent piecemeal). The model sits in the path."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
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
    lowered,
    sse_only,
)
from spendgate.providers.wire import EndpointKind, Family, RequestFacts, Upload, Usage

__all__ = ["ADAPTER", "GeminiAdapter"]

_MODEL_IN_PATH = re.compile(r"/(?:tuned)?[mM]odels/([^/:?]+):")
_LIVE = re.compile(r"\.BidiGenerateContent(?:Constrained)?$")


def _bare_model(model: str | None) -> str | None:
    return model.removeprefix("models/") if model else model


def _snake(name: str) -> str:
    return re.sub(r"[A-Z]", lambda m: "_" + m.group(0).lower(), name)


def _both(obj: Mapping[str, Any], name: str) -> list[Any]:
    """A field under its JSON name and its proto name (`generationConfig`, `generation_config`):
    Gemini's proto3 JSON parser accepts either."""
    return [obj[n] for n in dict.fromkeys((name, _snake(name))) if obj.get(n) is not None]


def _configs(body: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return [c for c in _both(body, "generationConfig") if isinstance(c, dict)]


def _asked(objs: list[Mapping[str, Any]], name: str) -> int | None:
    """The largest value any spelling of `name` asks for."""
    values = [n for o in objs for v in _both(o, name) if (n := as_limit(v)) is not None]
    return max(values) if values else None


def _output_limit(configs: list[Mapping[str, Any]]) -> int | None:
    """maxOutputTokens as Gemini reads it: proto3 JSON takes 0 for "not set" (the model's own maximum)."""
    limit = _asked(configs, "maxOutputTokens")
    return None if limit == 0 else limit


def resource_name(path: str) -> str:
    """What a path is about: the method after ':' (models/imagen-3:predict is "predict"), else the
    collection (/v1beta/cachedContents is "cachedContents")."""
    if ":" in path.rsplit("/", 1)[-1]:
        return path.rsplit(":", 1)[-1]
    parts = [p for p in path.split("/") if p and not re.fullmatch(r"v\d\w*", p) and p != "upload"]
    return parts[0] if parts else "/"


class GeminiAdapter:
    family = Family.GEMINI

    def endpoint_kind(self, method: str, path: str) -> EndpointKind:
        path = bare_path(path).rstrip("/")
        if method.upper() == "GET":
            if _LIVE.search(path):
                return EndpointKind.REALTIME  # Gemini Live, a WebSocket
            if re.search(r"/(?:tuned)?[mM]odels(?:/[^/:]+)?$", path):
                return EndpointKind.MODELS
            if re.search(r"/files(?:/[^/]+)?$", path):
                return EndpointKind.FILES
            return EndpointKind.OTHER
        if method.upper() != "POST":
            return EndpointKind.OTHER
        if path.endswith((":generateContent", ":streamGenerateContent")):
            return EndpointKind.CHAT
        if path.endswith((":embedContent", ":batchEmbedContents")):
            return EndpointKind.EMBEDDINGS
        if path.endswith(":batchGenerateContent"):
            return EndpointKind.BATCHES
        if re.search(r"/files$", path):
            return EndpointKind.FILES
        return EndpointKind.OTHER

    def unmetered(self, method: str, path: str) -> str | None:
        if method.upper() != "POST":
            return None
        kind = self.endpoint_kind(method, path)
        if kind is EndpointKind.BATCHES:
            return "batches"
        path = bare_path(path).rstrip("/")
        if kind is not EndpointKind.OTHER or path.endswith((":countTokens", ":cancel")):
            return None
        return resource_name(path)

    def request_facts(self, kind: EndpointKind, body: Mapping[str, Any], path: str) -> RequestFacts:
        path = bare_path(path)
        m = _MODEL_IN_PATH.search(path)
        configs = _configs(body)
        candidates = _asked(configs, "candidateCount")
        budget = _asked([t for c in configs for t in _both(c, "thinkingConfig") if isinstance(t, dict)],
                        "thinkingBudget")
        return RequestFacts(
            model=m.group(1) if m else _bare_model(as_text(body.get("model"))),  # the path routes: it wins
            stream=path.endswith(":streamGenerateContent"),
            max_output_tokens=_output_limit(configs),
            choices=min(max(candidates, 1), 128) if candidates is not None else 1,
            thinking_budget=max(budget, 0) if budget is not None else 0,
        )

    def set_output_limit(self, kind: EndpointKind, body: dict[str, Any], limit: int, field: str) -> None:
        configs = [c for c in _configs(body) if isinstance(c, dict)]
        if not configs:
            configs = [{}]
            body["generationConfig"] = configs[0]
        for config in configs:
            names = [n for n in ("maxOutputTokens", "max_output_tokens") if n in config] or ["maxOutputTokens"]
            for name in names:
                config[name] = lowered(config.get(name), limit)
            for thinking in _both(config, "thinkingConfig"):
                if not isinstance(thinking, dict):
                    continue
                for name in ("thinkingBudget", "thinking_budget"):
                    budget = as_limit(thinking.get(name))
                    if budget is not None and budget > limit:
                        thinking[name] = limit

    def response_text(self, kind: EndpointKind, body: Mapping[str, Any]) -> str:
        state = StreamState()
        self.observe(kind, body, state)
        return state.output_text

    def media_usage(self, kind: EndpointKind, body: Mapping[str, Any], uploads: Sequence[Upload],
                    facts: RequestFacts, prompt_tokens: int) -> Usage | None:
        return None

    def prompt(self, kind: EndpointKind, body: Mapping[str, Any]) -> Prompt | None:
        if kind is EndpointKind.EMBEDDINGS:
            p = Prompt()
            p.walk(body.get("content"))
            for request in body.get("requests") or ():
                p.walk(as_mapping(request).get("content"))
            return p
        if kind not in (EndpointKind.CHAT, EndpointKind.REALTIME):  # REALTIME: a Live turn
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

    def unask_usage(self, event: Mapping[str, Any] | None, raw: bytes) -> bytes:
        return raw

    def text_only(self, kind: EndpointKind, name: str, data: str) -> bool:
        return False  # every chunk carries usageMetadata, the last one the final counts

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
            # Live says responseTokenCount
            output_tokens=as_count(raw.get("candidatesTokenCount") or raw.get("responseTokenCount")) + thoughts,
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
