"""OpenAI's wire format, also spoken by Azure OpenAI (deployment in the path) and the
OpenAI-compatible providers: chat/completions, responses, completions, embeddings."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from spendgate.providers.base import (
    OUTPUT_LIMIT_KEYS,
    Prompt,
    StreamFormat,
    StreamState,
    as_count,
    as_limit,
    as_mapping,
    as_text,
    bare_path,
    lowered,
    output_limit,
    sse_only,
)
from spendgate.providers.openai_stream import (
    add_include_usage,
    cut_usage_null,
    is_usage_only_chunk,
    observe_chunk,
    observe_responses_event,
)
from spendgate.providers.wire import EndpointKind, Family, RequestFacts, Upload, Usage

__all__ = ["ADAPTER", "OpenAIAdapter", "add_include_usage", "cut_usage_null", "is_usage_only_chunk", "resource_name"]

_USAGE_OBJECT = re.compile(r'"usage"\s*:\s*\{')


class OpenAIAdapter:
    family = Family.OPENAI

    def endpoint_kind(self, method: str, path: str) -> EndpointKind:
        path = bare_path(path).rstrip("/")
        if method.upper() != "POST":
            if method.upper() == "GET":
                if _REALTIME.search(path):
                    return EndpointKind.REALTIME  # the Realtime WebSocket
                for pattern, listed in _LISTINGS:
                    if pattern.search(path):
                        return listed
            return EndpointKind.OTHER
        for suffix, kind in _POSTS:
            if path.endswith(suffix):
                return kind
        if _RESPONSES.search(path):
            return EndpointKind.RESPONSES
        if _REALTIME.search(path):
            return EndpointKind.REALTIME
        return EndpointKind.OTHER

    def unmetered(self, method: str, path: str) -> str | None:
        if method.upper() != "POST":
            return None
        kind = self.endpoint_kind(method, path)
        if kind is EndpointKind.BATCHES:
            return "batches"
        if kind is EndpointKind.REALTIME:
            return "realtime"  # client secrets and WebRTC calls: the session runs where the gateway cannot see
        if kind is not EndpointKind.OTHER or _FREE_POSTS.search(bare_path(path).rstrip("/")):
            return None
        return resource_name(bare_path(path).rstrip("/"))

    def request_facts(self, kind: EndpointKind, body: Mapping[str, Any], path: str) -> RequestFacts:
        choices = 1
        if kind in (EndpointKind.CHAT, EndpointKind.IMAGES):
            choices = _answers(body.get("n"))
        elif kind is EndpointKind.COMPLETIONS:
            # best_of answers are all generated (and billed) server-side; n of them are returned.
            choices = max(_answers(body.get("n")), _answers(body.get("best_of")))
        return RequestFacts(
            model=as_text(body.get("model")), stream=_is_true(body.get("stream")),
            max_output_tokens=output_limit(body), choices=choices,
        )

    def set_output_limit(self, kind: EndpointKind, body: dict[str, Any], limit: int, field: str) -> None:
        """Lower every output limit the body sets to `limit`; with none, insert the endpoint's own
        field (`field` is the chat completions one, which differs by provider)."""
        present = [k for k in OUTPUT_LIMIT_KEYS if body.get(k) is not None]
        for k in present:
            body[k] = lowered(body[k], limit)
        if not present:
            own = {EndpointKind.RESPONSES: "max_output_tokens", EndpointKind.CHAT: field}
            body[own.get(kind, "max_tokens")] = limit

    def response_text(self, kind: EndpointKind, body: Mapping[str, Any]) -> str:
        state = StreamState()
        if kind is EndpointKind.RESPONSES:
            _walk_output(body.get("output"), state)
        else:
            for choice in body.get("choices") or ():
                choice = as_mapping(choice)
                state.add_text(choice.get("text"))
                message = as_mapping(choice.get("message"))
                state.add_text(message.get("content"))
                state.add_text(message.get("reasoning_content"))
                state.add_text(message.get("refusal"))
                for call in message.get("tool_calls") or ():
                    state.add_text(as_mapping(as_mapping(call).get("function")).get("arguments"))
        return state.output_text

    def media_usage(self, kind: EndpointKind, body: Mapping[str, Any], uploads: Sequence[Upload],
                    facts: RequestFacts, prompt_tokens: int) -> Usage | None:
        """What an image or audio request will bill, before it is sent; None for text endpoints."""
        model = (facts.model or "").lower()
        if kind is EndpointKind.IMAGES:
            n = facts.choices
            if model.startswith(("gpt-image", "chatgpt-image")):
                per = _image_tokens(body.get("quality"), body.get("size"))
                image_in = sum(1 + u.size // 1024 for u in uploads)  # every file part: images, a mask
                return Usage(input_tokens=prompt_tokens + image_in, output_tokens=per * n, images=n)
            return Usage(images=n)
        if kind is EndpointKind.AUDIO:
            text = body.get("input")
            if isinstance(text, str):  # speech: characters in, audio out
                chars = len(text)
                return Usage(input_tokens=prompt_tokens, output_tokens=2 * chars, output_audio_tokens=2 * chars,
                             input_characters=chars)
            # Every file part, whatever it is named: a provider's form parser may find the audio where the
            # gateway's would not.
            seconds = sum(u.audio_seconds if u.audio_seconds is not None else u.size / _COMPRESSED_AUDIO_BPS
                          for u in uploads)
            audio_tokens = math.ceil(seconds * _AUDIO_TOKENS_PER_SECOND)
            out = math.ceil(seconds * _TRANSCRIPT_TOKENS_PER_SECOND)
            return Usage(input_tokens=audio_tokens + prompt_tokens, input_audio_tokens=audio_tokens,
                         output_tokens=out, audio_seconds=round(seconds, 3))
        return None

    def prompt(self, kind: EndpointKind, body: Mapping[str, Any]) -> Prompt | None:
        p = Prompt()
        if kind is EndpointKind.CHAT:
            p.messages(body.get("messages"))
            p.json(body.get("tools"))
            p.json(body.get("functions"))
            p.json(_response_schema(body.get("response_format")))
        elif kind in (EndpointKind.RESPONSES, EndpointKind.REALTIME):
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

    def unask_usage(self, event: Mapping[str, Any] | None, raw: bytes) -> bytes:
        """Undo what include_usage did to one event: the usage-only chunk goes, and the
        `"usage":null` member of every other chunk is cut out."""
        if event is None:  # a text-only chunk: it cannot be the usage chunk
            return cut_usage_null(raw) if b'"usage"' in raw else raw
        if is_usage_only_chunk(event):
            return b""
        if "usage" in event and event["usage"] is None:
            return cut_usage_null(raw)
        return raw

    def text_only(self, kind: EndpointKind, name: str, data: str) -> bool:
        if name.endswith(".delta"):
            return True  # Responses API: output deltas; usage comes on response.completed
        if kind is EndpointKind.RESPONSES or name != "message" or '"x_groq"' in data:
            return False
        # Chat / completions chunks: only the one with a usage object matters (the model and id
        # are on every chunk, the end is `[DONE]`).
        return _USAGE_OBJECT.search(data) is None

    def usage_from_json(self, kind: EndpointKind, body: Mapping[str, Any]) -> Usage | None:
        u = body.get("usage")
        if kind is EndpointKind.IMAGES:
            images = len(body["data"]) if isinstance(body.get("data"), list) else 0
            if not isinstance(u, dict):
                return Usage(images=images) if images else None  # DALL-E answers bill per image, without usage
            base = self.usage(u, as_text(body.get("model")), None)
            return replace(base, images=images)
        if kind is EndpointKind.AUDIO and isinstance(u, dict) and u.get("type") == "duration":
            return Usage(audio_seconds=_seconds(u.get("seconds")))  # whisper bills the audio's length
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
            # transcriptions say input_token_details
            in_details = as_mapping(raw.get("input_tokens_details") or raw.get("input_token_details"))
            out_details = as_mapping(raw.get("output_tokens_details") or raw.get("output_token_details"))
            cache_read = as_count(in_details.get("cached_tokens"))
        return Usage(
            input_tokens=inp,
            output_tokens=out,
            cache_read_tokens=cache_read,
            cache_write_tokens=as_count(in_details.get("cache_write_tokens")),
            reasoning_tokens=as_count(out_details.get("reasoning_tokens")),
            model_reported=model,
            upstream_request_id=response_id,
            input_audio_tokens=as_count(in_details.get("audio_tokens")),
            output_audio_tokens=as_count(out_details.get("audio_tokens")),
        )

    def observe(self, kind: EndpointKind, event: Mapping[str, Any], state: StreamState) -> None:
        if kind is EndpointKind.RESPONSES or str(event.get("type", "")).startswith("response."):
            observe_responses_event(event, state)
        else:
            observe_chunk(event, state)


ADAPTER = OpenAIAdapter()

# POST paths that make a model answer, by suffix (Azure and the compatible providers prefix them).
_POSTS = (
    ("/chat/completions", EndpointKind.CHAT), ("/completions", EndpointKind.COMPLETIONS),
    ("/embeddings", EndpointKind.EMBEDDINGS), ("/images/generations", EndpointKind.IMAGES),
    ("/images/edits", EndpointKind.IMAGES), ("/images/variations", EndpointKind.IMAGES),
    ("/audio/speech", EndpointKind.AUDIO), ("/audio/transcriptions", EndpointKind.AUDIO),
    ("/audio/translations", EndpointKind.AUDIO), ("/batches", EndpointKind.BATCHES), ("/files", EndpointKind.FILES),
)
_RESPONSES = re.compile(r"/responses$")
_REALTIME = re.compile(r"/realtime(?:/|$)")
_LISTINGS = (
    (re.compile(r"/models(?:/[^/]+)?$"), EndpointKind.MODELS),
    (re.compile(r"/files(?:/[^/]+(?:/content)?)?$"), EndpointKind.FILES),
    (re.compile(r"/batches(?:/[^/]+)?$"), EndpointKind.BATCHES),
)
# POSTs that bill nothing: uploads, moderation, counting, cancelling, stored-completion metadata.
_FREE_POSTS = re.compile(
    r"/(?:uploads(?:/[^/]+(?:/parts|/complete|/cancel))?|moderations|responses/input_tokens"
    r"|responses/[^/]+/cancel|batches/[^/]+/cancel|fine_tuning/jobs/[^/]+/(?:cancel|pause|resume)"
    r"|chat/completions/[^/]+|files/[^/]+)$")
_VERSION_PREFIX = re.compile(r"^/(?:api/)?(?:openai/)?(?:v\d[^/]*/)?(?:deployments/[^/]+/)?")

# OpenAI's image token table (output tokens per image): low / medium / high, square / other.
_IMAGE_TOKENS = {"low": (272, 408), "medium": (1056, 1584), "high": (4160, 6240)}
_COMPRESSED_AUDIO_BPS = 2000  # bytes a second of 16 kbit/s speech: a file's duration is at most this long
_AUDIO_TOKENS_PER_SECOND = 20  # transcription models bill ~10 audio tokens a second; twice that, to be safe
_TRANSCRIPT_TOKENS_PER_SECOND = 5  # fast speech is ~3 words a second


def resource_name(path: str) -> str:
    """What a path is about, for messages and `[budgets] allow_unmetered`: /v1/fine_tuning/jobs is
    "fine_tuning"."""
    rest = _VERSION_PREFIX.sub("", path).strip("/")
    return rest.split("/", 1)[0] or "/"


def _answers(value: object) -> int:
    n = as_limit(value)
    return min(max(n, 1), 128) if n is not None else 1


def _is_true(value: object) -> bool:
    return value is True or value == "true"  # multipart forms say "true"


def _seconds(value: object) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 1e7:
        return float(value)
    return 0.0


def _image_tokens(quality: object, size: object) -> int:
    square, other = _IMAGE_TOKENS.get(quality if isinstance(quality, str) else "", _IMAGE_TOKENS["high"])
    return square if size in (None, "auto", "1024x1024") else other


def _walk_output(output: object, state: StreamState) -> None:
    for item in output if isinstance(output, list) else ():
        item = as_mapping(item)
        state.add_text(item.get("arguments"))
        for part in item.get("content") or ():
            part = as_mapping(part)
            state.add_text(part.get("text"))


def _response_schema(fmt: object) -> object:
    fmt = as_mapping(fmt)
    return fmt.get("json_schema") or fmt.get("schema")
