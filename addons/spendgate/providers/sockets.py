"""The WebSocket protocols the gateway meters, message by message: what a client message asks the
model for, and what a server message says about a call. Pure: JSON in, facts out.

* OpenAI Responses, WebSocket mode (`GET /v1/responses`, Codex CLI's default): each
  `response.create` is one model call, answered by the same events as the SSE stream
  (`response.completed` / `.incomplete` / `.failed` carry the response and its usage).
* OpenAI Realtime (`GET /v1/realtime?model=`): the session's model (`session.update` may change
  it); every `response.create` is one call over the conversation so far; `response.done` ends it
  with its usage.
* Gemini Live (`…GenerativeService.BidiGenerateContent`): `setup` names the model; each completed
  client turn is one call; `serverContent.turnComplete` ends it, `usageMetadata` says its usage.

A call's `body` is shaped like the HTTP request for the same model call (Responses-like, or
Gemini `contents`), so the gateway estimates, prices and caps it as it would over HTTP.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Callable
from urllib.parse import parse_qs, urlsplit

from spendgate.providers.base import as_limit, as_mapping, as_text, bare_path
from spendgate.providers.wire import EndpointKind, Family

__all__ = ["ClientStep", "ModelCall", "ServerStep", "SocketProtocol", "protocol_for"]

_CONTEXT_LIMIT = 256  # conversation items / turns kept for estimates (the provider keeps them all)
_AUDIO_BYTES_PER_TOKEN = 2400  # 24 kHz 16-bit PCM is 48,000 bytes a second, ~10 audio tokens a second: twice that


class SocketKind(StrEnum):
    RESPONSES = "responses"
    REALTIME = "realtime"
    LIVE = "live"


@dataclass
class ModelCall:
    """One model call a client message starts."""

    kind: EndpointKind
    model: str | None
    body: dict[str, Any]  # request-shaped, for the allow-list, the estimate and the price
    max_output_tokens: int | None
    limit: Callable[[int], bytes] | None = None  # the message with its output limit lowered, when it can be
    client_event_id: str | None = None


@dataclass
class ClientStep:
    call: ModelCall | None = None
    model: str | None = None  # the session asks for this model from now on (checked against the allow-list)
    replace: bytes | None = None  # forward this instead of the message


@dataclass
class ServerStep:
    response_id: str | None = None  # the provider named the pending call's response
    output: bool = False  # generated output is flowing (time to first token)
    text: str | None = None  # generated text in this message (to estimate a call cut short)
    done: dict[str, Any] | None = None  # the call ended: a JSON body with its usage, as the HTTP API answers
    status: int = 200  # of `done`: >= 400 for a failed call
    error: str | None = None
    client_event_id: str | None = None  # the client event an error answers


class SocketProtocol:
    """Per-socket state of one protocol; subclasses read their provider's messages."""

    kind: SocketKind
    endpoint_kind: EndpointKind
    error_events = True  # the protocol has error events; else a refusal closes the socket with its reason

    def __init__(self, model: str | None) -> None:
        self.model = model

    def from_client(self, event: dict[str, Any], raw: bytes) -> ClientStep:
        raise NotImplementedError

    def from_server(self, event: dict[str, Any]) -> ServerStep:
        raise NotImplementedError

    def unsolicited(self) -> ModelCall | None:
        """The call a response the provider started by itself makes (voice activity detection),
        None where every response follows a client message."""
        return None

    def cancel(self, response_id: str | None) -> bytes | None:
        """A client event that stops a response the server started; None: there is none (close instead)."""
        return None

    def error_event(self, status: int, code: str, message: str, client_event_id: str | None = None) -> bytes | None:
        """A provider-shaped error event for the client; None: this protocol has none (close instead)."""
        err_type = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}.get(
            status, "invalid_request_error")
        return json.dumps({"type": "error", "status": status,
                           "error": {"type": err_type, "code": code, "message": message, "param": None,
                                     **({"event_id": client_event_id} if client_event_id else {})}}).encode()


def _limit_value(value: object) -> int | None:
    return as_limit(value)  # Realtime says "inf" for no limit


class ResponsesSocket(SocketProtocol):
    kind = SocketKind.RESPONSES
    endpoint_kind = EndpointKind.RESPONSES

    def from_client(self, event: dict[str, Any], raw: bytes) -> ClientStep:
        if event.get("type") not in ("response.create", "response.append"):
            return ClientStep()
        model = as_text(event.get("model")) or self.model
        self.model = model
        body = {k: v for k, v in event.items() if k != "type"}
        if event.get("generate") is False:
            body["max_output_tokens"] = 0  # a warm-up: nothing is generated

        def limit(n: int) -> bytes:
            return json.dumps({**event, "max_output_tokens": n}, separators=(",", ":")).encode()

        return ClientStep(ModelCall(self.endpoint_kind, model, body, as_limit(body.get("max_output_tokens")), limit))

    def from_server(self, event: dict[str, Any]) -> ServerStep:
        etype = event.get("type")
        if not isinstance(etype, str):
            return ServerStep()
        response = as_mapping(event.get("response"))
        if etype == "response.created":
            return ServerStep(response_id=as_text(response.get("id")))
        if etype.endswith(".delta"):
            return ServerStep(output=True, text=None if "audio" in etype else as_text(event.get("delta")))
        if etype in ("response.completed", "response.incomplete"):
            return ServerStep(response_id=as_text(response.get("id")), done=dict(response))
        if etype == "response.failed":
            err = as_mapping(response.get("error"))
            return ServerStep(response_id=as_text(response.get("id")), done=dict(response), status=500,
                              error=f"response failed: {as_text(err.get('message')) or 'upstream error'}"[:500])
        if etype == "error":
            err = as_mapping(event.get("error"))
            status = as_limit(event.get("status")) or 400
            return ServerStep(done={}, status=max(status, 400),
                              error=f"upstream error: {as_text(err.get('message')) or as_text(err.get('code'))}"[:500])
        return ServerStep()


class RealtimeSocket(SocketProtocol):
    kind = SocketKind.REALTIME
    endpoint_kind = EndpointKind.REALTIME

    def __init__(self, model: str | None, beta: bool) -> None:
        super().__init__(model)
        self.beta = beta
        self.instructions: object = None
        self.max_output: int | None = None
        self.items: list[object] = []  # the conversation so far, as text parts
        self.audio_bytes = 0

    def from_client(self, event: dict[str, Any], raw: bytes) -> ClientStep:
        etype = event.get("type")
        if etype == "session.update":
            session = as_mapping(event.get("session"))
            if "instructions" in session:
                self.instructions = session.get("instructions")
            limit_key = "max_response_output_tokens" if "max_response_output_tokens" in session else "max_output_tokens"
            if limit_key in session:
                self.max_output = _limit_value(session.get(limit_key))
            model = as_text(session.get("model"))
            if model and model != self.model:
                return ClientStep(model=model)
            return ClientStep()
        if etype == "conversation.item.create":
            self._remember(event.get("item"))
        elif etype == "input_audio_buffer.append":
            audio = event.get("audio")
            self.audio_bytes += len(audio) * 3 // 4 if isinstance(audio, str) else 0
        elif etype == "response.create":
            return ClientStep(self._call(event))
        return ClientStep()

    def model_changed(self, model: str) -> None:
        self.model = model

    def unsolicited(self) -> ModelCall | None:
        return _running(self._call({"type": "response.create"}))

    def cancel(self, response_id: str | None) -> bytes | None:
        return json.dumps({"type": "response.cancel", **({"response_id": response_id} if response_id else {})}).encode()

    def _remember(self, item: object) -> None:
        self.items.append(item)
        del self.items[:-_CONTEXT_LIMIT]

    def _call(self, event: dict[str, Any]) -> ModelCall:
        opts = as_mapping(event.get("response"))
        limit_key = "max_response_output_tokens" if "max_response_output_tokens" in opts else "max_output_tokens"
        asked = _limit_value(opts.get(limit_key)) if limit_key in opts else self.max_output
        items = list(opts.get("input") or ()) if opts.get("conversation") == "none" else [*self.items,
                                                                                         *(opts.get("input") or ())]
        body: dict[str, Any] = {"model": self.model, "instructions": opts.get("instructions", self.instructions),
                                "input": items}
        if asked is not None:
            body["max_output_tokens"] = asked
        audio_tokens = self.audio_bytes // _AUDIO_BYTES_PER_TOKEN
        if audio_tokens:
            # Committed audio, as text of the same token count (the estimate never decodes audio).
            body["input"] = [*items, {"type": "input_text", "text": "x " * min(audio_tokens, 200_000)}]

        def limit(n: int) -> bytes:
            out = dict(event)
            out["response"] = {**opts, limit_key: n}
            return json.dumps(out, separators=(",", ":")).encode()

        return ModelCall(self.endpoint_kind, self.model, body, asked, limit, as_text(event.get("event_id")))

    def from_server(self, event: dict[str, Any]) -> ServerStep:
        etype = event.get("type")
        if not isinstance(etype, str):
            return ServerStep()
        response = as_mapping(event.get("response"))
        if etype == "response.created":
            return ServerStep(response_id=as_text(response.get("id")))
        if etype.endswith(".delta"):
            # Text, or the transcript of spoken output; audio itself is not counted.
            return ServerStep(output=True, text=as_text(event.get("delta")) if etype != "response.audio.delta"
                              and etype != "response.output_audio.delta" else None)
        if etype in ("conversation.item.added", "conversation.item.created", "conversation.item.done"):
            item = as_mapping(event.get("item"))
            if item.get("role") == "assistant" and etype != "conversation.item.added":
                self._remember(item)
            return ServerStep()
        if etype == "response.done":
            self.audio_bytes = 0
            status = response.get("status")
            body = {**response, "model": self.model}
            if status == "failed":
                details = as_mapping(as_mapping(response.get("status_details")).get("error"))
                return ServerStep(response_id=as_text(response.get("id")), done=body, status=500,
                                  error=f"response failed: {as_text(details.get('message')) or 'upstream error'}"[:500])
            return ServerStep(response_id=as_text(response.get("id")), done=body)
        if etype == "error":
            err = as_mapping(event.get("error"))
            client_event = as_text(err.get("event_id"))
            return ServerStep(done={} if client_event else None, status=400, client_event_id=client_event,
                              error=f"upstream error: {as_text(err.get('message')) or as_text(err.get('code'))}"[:500])
        return ServerStep()

    def error_event(self, status: int, code: str, message: str, client_event_id: str | None = None) -> bytes | None:
        err_type = "invalid_request_error"
        return json.dumps({"type": "error", "event_id": "event_spendgate",
                           "error": {"type": err_type, "code": code, "message": message, "param": None,
                                     "event_id": client_event_id}}).encode()


class LiveSocket(SocketProtocol):
    kind = SocketKind.LIVE
    endpoint_kind = EndpointKind.REALTIME
    error_events = False

    def __init__(self, model: str | None) -> None:
        super().__init__(model)
        self.config: dict[str, Any] = {}
        self.system: object = None
        self.turns: list[object] = []
        self.usage: dict[str, Any] | None = None

    def from_client(self, event: dict[str, Any], raw: bytes) -> ClientStep:
        if isinstance(event.get("setup"), dict):
            setup = event["setup"]
            self.config = dict(as_mapping(setup.get("generationConfig") or setup.get("generation_config")))
            self.system = setup.get("systemInstruction") or setup.get("system_instruction")
            model = as_text(setup.get("model"))
            model = model.removeprefix("models/") if model else model
            return ClientStep(model=model) if model else ClientStep()
        content = event.get("clientContent") or event.get("client_content")
        if isinstance(content, dict):
            for turn in content.get("turns") or ():
                self.turns.append(turn)
            del self.turns[:-_CONTEXT_LIMIT]
            if content.get("turnComplete") or content.get("turn_complete"):
                return ClientStep(self._call())
            return ClientStep()
        realtime = event.get("realtimeInput") or event.get("realtime_input")
        if isinstance(realtime, dict):
            if isinstance(realtime.get("text"), str):
                self.turns.append({"role": "user", "parts": [{"text": realtime["text"]}]})
                return ClientStep(self._call())
            if realtime.get("audioStreamEnd") or "activityEnd" in realtime:
                return ClientStep(self._call())
            return ClientStep()
        tool = event.get("toolResponse") or event.get("tool_response")
        if isinstance(tool, dict):
            self.turns.append({"role": "user", "parts": [{"functionResponse": tool}]})
            return ClientStep(self._call())
        return ClientStep()

    def model_changed(self, model: str) -> None:
        self.model = model

    def unsolicited(self) -> ModelCall | None:
        return _running(self._call())  # automatic activity detection ended a spoken turn

    def _call(self) -> ModelCall:
        body: dict[str, Any] = {"model": self.model, "contents": list(self.turns), "generationConfig": self.config}
        if self.system is not None:
            body["systemInstruction"] = self.system
        limits = [n for k in ("maxOutputTokens", "max_output_tokens")
                  if (n := as_limit(self.config.get(k))) is not None]
        return ModelCall(self.endpoint_kind, self.model, body, max(limits) if limits else None)

    def from_server(self, event: dict[str, Any]) -> ServerStep:
        if isinstance(event.get("usageMetadata"), dict):
            self.usage = event["usageMetadata"]
        content = as_mapping(event.get("serverContent"))
        turn = as_mapping(content.get("modelTurn"))
        if turn.get("parts"):
            self.turns.append(turn)
            del self.turns[:-_CONTEXT_LIMIT]
        if content.get("turnComplete"):
            usage, self.usage = self.usage, None
            return ServerStep(done={"usageMetadata": usage, "modelVersion": self.model} if usage else {},
                              output=bool(turn), text=_parts_text(turn))
        return ServerStep(output=bool(turn), text=_parts_text(turn))

    def error_event(self, status: int, code: str, message: str, client_event_id: str | None = None) -> bytes | None:
        return None  # Gemini Live has no error event: the socket is closed with the reason


def _running(call: ModelCall) -> ModelCall:
    """A call already running upstream: what can be held for it is its prompt (its output limit can
    no longer be lowered); it is refused, and stopped, only when not even that fits."""
    body = {**call.body, "max_output_tokens": 0}
    if isinstance(body.get("generationConfig"), dict):
        body["generationConfig"] = {**body["generationConfig"], "maxOutputTokens": 0}
    return ModelCall(call.kind, call.model, body, 0, None, call.client_event_id)


def _parts_text(turn: Any) -> str | None:
    texts = [p["text"] for p in turn.get("parts") or () if isinstance(p, dict) and isinstance(p.get("text"), str)]
    return "".join(texts) or None


_LIVE = re.compile(r"\.BidiGenerateContent(?:Constrained)?$")


def protocol_for(family: Family, path: str, headers: Any = None) -> SocketProtocol | None:
    """The protocol a WebSocket upgrade to `path` speaks, if the gateway can meter it."""
    bare = bare_path(path).rstrip("/")
    query = parse_qs(urlsplit(path).query)
    if family is Family.OPENAI:
        if bare.endswith("/responses"):
            return ResponsesSocket(None)
        if bare.endswith("/realtime"):
            named = query.get("model") or query.get("deployment")
            model = named[0] if named else None
            beta = "realtime=v1" in str((headers or {}).get("openai-beta", "")).lower()
            return RealtimeSocket(model, beta)
    if family is Family.GEMINI and _LIVE.search(bare):
        return LiveSocket(None)
    return None
