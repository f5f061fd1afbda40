"""OpenAI's streams: the events that carry usage, the model and the text, and the usage chunk the
gateway asks for (and hides again) when the client did not."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from spendgate.providers.base import StreamState, as_mapping, as_text

__all__ = ["add_include_usage", "cut_usage_null", "is_usage_only_chunk", "observe_chunk", "observe_responses_event"]

# OpenAI adds `"usage":null` to every chunk once include_usage is set; this is that span.
_USAGE_NULL_AFTER = re.compile(rb',\s*"usage"\s*:\s*null')
_USAGE_NULL_BEFORE = re.compile(rb'"usage"\s*:\s*null\s*,')


def observe_chunk(obj: Mapping[str, Any], state: StreamState) -> None:
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


def observe_responses_event(obj: Mapping[str, Any], state: StreamState) -> None:
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
