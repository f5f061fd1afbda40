"""OpenAI's wire format, also spoken by Azure OpenAI (deployment in the path) and the
OpenAI-compatible providers: chat/completions, responses, completions, embeddings."""

from __future__ import annotations

import re
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

__all__ = ["ADAPTER", "OpenAIAdapter", "add_include_usage", "cut_usage_null", "is_usage_only_chunk"]

# OpenAI adds `"usage":null` to every chunk once include_usage is set; this is that span.
_USAGE_NULL_AFTER = re.compile(rb',\s*"usage"\s*:\s*null')
_USAGE_NULL_BEFORE = re.compile(rb'"usage"\s*:\s*null\s*,')


class OpenAIAdapter:
    family = Family.OPENAI

    def endpoint_kind(self, method: str, path: str) -> EndpointKind:
        if method.upper() != "POST":
            return EndpointKind.OTHER
        path = bare_path(path).rstrip("/")
        if path.endswith("/chat/completions"):
            return EndpointKind.CHAT
        if path.endswith("/responses"):
            return EndpointKind.RESPONSES
        if path.endswith("/completions"):
            return EndpointKind.COMPLETIONS
        if path.endswith("/embeddings"):
            return EndpointKind.EMBEDDINGS
        return EndpointKind.OTHER

    def request_facts(self, kind: EndpointKind, body: Mapping[str, Any], path: str) -> RequestFacts:
        return RequestFacts(
            model=as_text(body.get("model")), stream=body.get("stream") is True, max_output_tokens=output_limit(body)
        )

    def prompt(self, kind: EndpointKind, body: Mapping[str, Any]) -> Prompt | None:
        p = Prompt()
        if kind is EndpointKind.CHAT:
            p.messages(body.get("messages"))
            p.json(body.get("tools"))
            p.json(body.get("functions"))
            p.json(_response_schema(body.get("response_format")))
        elif kind is EndpointKind.RESPONSES:
            p.walk(body.get("instructions"))
            value = body.get("input")
            if isinstance(value, list):
                p.messages(value)
            else:
                p.walk(value)
            p.json(body.get("tools"))
            p.json(_response_schema(as_mapping(body.get("text")).get("format")))
        elif kind is EndpointKind.COMPLETIONS:
            if not p.token_lists(body.get("prompt")):
                p.walk(body.get("prompt"))
        elif kind is EndpointKind.EMBEDDINGS:
            if not p.token_lists(body.get("input")):
                p.walk(body.get("input"))
        else:
            return None
        return p

    def prepare_stream(self, kind: EndpointKind, body: dict[str, Any]) -> bool:
        # Exact streamed counts: ask for the usage chunk (the tap removes it before the client sees it).
        return kind in (EndpointKind.CHAT, EndpointKind.COMPLETIONS) and add_include_usage(body)

    def stream_format(self, content_type: str, stream: bool) -> StreamFormat | None:
        return sse_only(content_type, stream)

    def unask_usage(self, event: Mapping[str, Any], raw: bytes) -> bytes:
        """Undo what include_usage did to one event: the usage-only chunk goes, and the
        `"usage":null` member of every other chunk is cut out."""
        if is_usage_only_chunk(event):
            return b""
        if "usage" in event and event["usage"] is None:
            return cut_usage_null(raw)
        return raw

    def usage_from_json(self, kind: EndpointKind, body: Mapping[str, Any]) -> Usage | None:
        u = body.get("usage")
        if not isinstance(u, dict):
            # Groq has reported stream usage under x_groq.
            u = as_mapping(body.get("x_groq")).get("usage")
            if not isinstance(u, dict):
                return None
        return self.usage(u, as_text(body.get("model")), as_text(body.get("id")))

    def usage(self, raw: Mapping[str, Any], model: str | None, response_id: str | None) -> Usage:
        # Chat / completions / embeddings say `prompt_tokens`; responses says `input_tokens`.
        if "prompt_tokens" in raw or "completion_tokens" in raw:
            inp = as_count(raw.get("prompt_tokens"))
            out = as_count(raw.get("completion_tokens"))
            in_details = as_mapping(raw.get("prompt_tokens_details"))
            out_details = as_mapping(raw.get("completion_tokens_details"))
            cache_read = as_count(in_details.get("cached_tokens"))
            if not cache_read:
                # DeepSeek reports its cache as hit/miss counts; prompt_tokens already includes both.
                cache_read = as_count(raw.get("prompt_cache_hit_tokens"))
        else:
            inp = as_count(raw.get("input_tokens"))
            out = as_count(raw.get("output_tokens"))
            in_details = as_mapping(raw.get("input_tokens_details"))
            out_details = as_mapping(raw.get("output_tokens_details"))
            cache_read = as_count(in_details.get("cached_tokens"))
        return Usage(
            input_tokens=inp,
            output_tokens=out,
            cache_read_tokens=cache_read,
            cache_write_tokens=as_count(in_details.get("cache_write_tokens")),
            reasoning_tokens=as_count(out_details.get("reasoning_tokens")),
            model_reported=model,
            upstream_request_id=response_id,
        )

    def observe(self, kind: EndpointKind, event: Mapping[str, Any], state: StreamState) -> None:
        if kind is EndpointKind.RESPONSES or str(event.get("type", "")).startswith("response."):
            _observe_responses_event(event, state)
        else:
            _observe_chunk(event, state)


ADAPTER = OpenAIAdapter()


def _response_schema(fmt: object) -> object:
    fmt = as_mapping(fmt)
    return fmt.get("json_schema") or fmt.get("schema")


def _observe_chunk(obj: Mapping[str, Any], state: StreamState) -> None:
    state.model = as_text(obj.get("model")) or state.model
    state.response_id = as_text(obj.get("id")) or state.response_id
    u = obj.get("usage")
    if not isinstance(u, dict):
        u = as_mapping(obj.get("x_groq")).get("usage")
    if isinstance(u, dict):
        state.raw_usage = u
    choices = obj.get("choices")
    if not isinstance(choices, list):
        return
    for choice in choices:
        if not isinstance(choice, dict):
            continue
        state.add_text(choice.get("text"))  # completions
        delta = choice.get("delta")
        if not isinstance(delta, dict):
            continue
        state.add_text(delta.get("content"))
        state.add_text(delta.get("reasoning_content"))  # DeepSeek et al.
        state.add_text(delta.get("reasoning"))
        state.add_text(delta.get("refusal"))
        calls = delta.get("tool_calls")
        if isinstance(calls, list):
            for call in calls:
                fn = as_mapping(call).get("function")
                state.add_text(as_mapping(fn).get("arguments"))


def _observe_responses_event(obj: Mapping[str, Any], state: StreamState) -> None:
    etype = obj.get("type")
    if not isinstance(etype, str):
        return
    if etype.endswith(".delta"):
        if "audio" not in etype:
            state.add_text(obj.get("delta"))
        return
    response = obj.get("response")
    if not isinstance(response, dict):
        return
    state.model = as_text(response.get("model")) or state.model
    state.response_id = as_text(response.get("id")) or state.response_id
    u = response.get("usage")
    if isinstance(u, dict):
        state.raw_usage = u
    # `incomplete` is a proper end too (e.g. max_output_tokens reached); `failed` is not.
    if etype in ("response.completed", "response.incomplete"):
        state.completed = True


def add_include_usage(body: dict[str, Any]) -> bool:
    """Ask a chat / completions stream for its usage chunk.

    Returns True when the gateway, not the client, asked for it: the caller must then run the
    response through `StreamTap(..., strip_usage_chunk=True)`. Mutates `body`.
    """
    if body.get("stream") is not True:
        return False
    options = body.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage") is True:
        return False
    if not isinstance(options, dict):
        options = {}
        body["stream_options"] = options
    options["include_usage"] = True
    return True


def is_usage_only_chunk(obj: Mapping[str, Any]) -> bool:
    """The chunk include_usage adds, which the client did not ask for."""
    if not isinstance(obj.get("usage"), dict):
        return False
    choices = obj.get("choices")
    if choices == []:
        return True
    # Some OpenAI-compatible servers send one content-free choice alongside the usage.
    return isinstance(choices, list) and all(
        isinstance(c, dict)
        and not c.get("delta")
        and not c.get("text")
        and c.get("finish_reason") is None
        and c.get("logprobs") is None
        for c in choices
    )


def cut_usage_null(raw: bytes) -> bytes:
    """`raw` without the `"usage":null` member include_usage added to a chunk's JSON."""
    # A `"` inside a JSON string is always escaped, so this span can only be the key itself.
    # The top-level key follows `choices`, so the last match is the one OpenAI added.
    matches = list(_USAGE_NULL_AFTER.finditer(raw)) or list(_USAGE_NULL_BEFORE.finditer(raw))
    if not matches:
        return raw
    m = matches[-1]
    return raw[: m.start()] + raw[m.end() :]
