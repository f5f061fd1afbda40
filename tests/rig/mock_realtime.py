"""The three WebSocket protocols of the mock provider, driven by :class:`tests.rig.mock_ws.WsLoop`.

* OpenAI Responses API, WebSocket mode (``GET /v1/responses``, as Codex CLI uses it): each
  ``response.create`` is answered, in order, with the same events as the SSE stream
  (``response.created`` ... ``response.completed`` with usage). ``response.append`` (the older
  ``responses_websockets=2026-02-04`` protocol) is answered the same way; ``response.processed``
  is accepted silently. Usage: ``input_tokens = 10 + len(frame bytes) // 4``,
  ``output_tokens = chunks``.
* OpenAI Realtime (``GET /v1/realtime?model=``): GA event names (``response.output_text.delta``,
  ``conversation.item.added`` / ``.done``); with ``OpenAI-Beta: realtime=v1`` the beta names
  (``response.text.delta``, ``conversation.item.created``). Usage on ``response.done``:
  ``input_tokens = 10 + (bytes of every conversation.item.create so far + the
  response.create frame) // 4`` text tokens, plus audio tokens = committed audio bytes // 4800
  (``audio_input_tokens`` overrides); ``output_tokens = chunks`` text (+ ``audio_output_tokens``).
* Gemini Live (``/ws/...GenerativeService.BidiGenerateContent``): ``setup`` ->
  ``setupComplete``; ``clientContent`` (``turnComplete: true``) / ``realtimeInput`` text ->
  ``serverContent.modelTurn`` parts, ``generationComplete``, ``turnComplete`` with
  ``usageMetadata`` (``promptTokenCount = 10 + bytes of all turns so far // 4``,
  ``responseTokenCount = chunks``). Frames are binary (JSON bytes), as the service sends them.

Scenarios per call: ``slow`` (``delay_ms`` between events), ``errorNNN`` (an error event; Gemini:
close 1011), ``failed`` (response.failed / a failed response.done), ``hang`` (silence for
``hang_s``), ``truncate`` (TCP cut after ``truncate_after`` deltas), ``first_delay_ms``.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import time
import uuid
from collections.abc import Iterator
from typing import Any

from .mock_provider import (
    _ERROR_MESSAGES,
    _client_key,
    content_pieces,
    openai_error,
    openai_responses_usage,
    plan_tokens,
    responses_api_events,
)
from .mock_ws import RecordedWsSession, WsCall, WsLoop, WsMessage

Action = tuple[Any, ...]


def handler_for(sess: RecordedWsSession, mock: Any, loop: WsLoop) -> _Protocol:
    cls = {"responses_ws": ResponsesWs, "realtime": RealtimeWs, "live": GeminiLive}[sess.endpoint]
    return cls(sess, mock, loop)


class _Protocol:
    binary = False

    def __init__(self, sess: RecordedWsSession, mock: Any, loop: WsLoop) -> None:
        self.sess, self.mock, self.loop = sess, mock, loop
        self._ids = itertools.count(1)

    def on_open(self) -> Iterator[Action]:
        return iter(())

    def on_message(self, msg: WsMessage) -> Iterator[Action]:
        return iter(())

    def on_close(self) -> None:
        for call in self.sess.calls:
            if call.finished_at is None:
                call.finished_at = time.monotonic()

    def _id(self, prefix: str) -> str:
        return f"{prefix}_mock{self.sess.seq:04d}{next(self._ids):04d}{uuid.uuid4().hex[:6]}"

    def new_call(self, kind: str, request: dict[str, Any], raw_len: int, model: str | None,
                 override: str | None = None) -> WsCall:
        sc = self.mock._scenario_for_ws(self.sess, override)
        tokens = plan_tokens(b"x" * raw_len, sc)
        call = WsCall(index=len(self.sess.calls), kind=kind, request=request, model=sc.model or model,
                      scenario=sc, tokens=tokens)
        self.sess.calls.append(call)
        self.sess._notify()
        return call

    def send(self, call: WsCall | None, obj: dict[str, Any]) -> Action:
        if call is not None:
            call.events.append(obj)
        return ("send", obj, self.binary)

    def stream(self, call: WsCall, events: list[tuple[dict[str, Any], bool, dict[str, Any] | None]],
               on_cut: Iterator[Action] | None = None) -> Iterator[Action]:
        """Sends (event, is_content, final_usage) triples with the call's delays and cuts."""
        sc = call.scenario
        if "hang" in sc.flags:
            yield ("sleep", sc.hang_s)
        if sc.first_delay_ms:
            yield ("sleep", sc.first_delay_ms / 1000)
        cut_after = sc.truncate_after if sc.truncate_after is not None else max(1, sc.chunks // 2)
        cut = "truncate" in sc.flags or "failed" in sc.flags
        sent = 0
        for i, (obj, content, usage) in enumerate(events):
            if cut and content and sent >= cut_after:
                if "truncate" in sc.flags:
                    yield ("abort",)
                elif on_cut is not None:
                    yield from on_cut
                return
            if i and sc.stream_delay_s:
                yield ("sleep", sc.stream_delay_s)
            yield self.send(call, obj)
            sent += content
            if usage is not None:
                call.usage, call.usage_sent = usage, True

    def finish(self, call: WsCall, completed: bool) -> None:
        call.completed, call.failed = completed, not completed
        call.finished_at = time.monotonic()
        self.sess._notify()


def _error_status(call: WsCall) -> int | None:
    return call.scenario.error_status


# --------------------------------------------------------------------------- Responses WebSocket mode


class ResponsesWs(_Protocol):
    def on_message(self, msg: WsMessage) -> Iterator[Action]:
        ev = msg.json
        kind = ev.get("type") if isinstance(ev, dict) else None
        if msg.kind == "binary" or kind not in ("response.create", "response.append", "response.processed"):
            yield ("send", self._error(400, "invalid_request_error", "invalid_value",
                                       f"Invalid value: {kind!r}. Supported values are: 'response.create'.", "type"))
            return
        if kind == "response.processed":
            return
        assert isinstance(ev, dict)
        meta = ev.get("metadata") if isinstance(ev.get("metadata"), dict) else {}
        model = ev.get("model") if isinstance(ev.get("model"), str) else self.sess.model
        if model:
            self.sess.model = model
        call = self.new_call(kind, ev, len(msg.text.encode()), model, meta.get("mock_scenario"))
        status = _error_status(call)
        if status is not None or ev.get("background") is True:
            if status is None:
                status, err = 400, self._error(400, "invalid_request_error", "unsupported_parameter",
                                               "background is not supported over WebSocket.", "background")
            else:
                err = self._error(status, None, None, _ERROR_MESSAGES.get(status, f"Mock error {status}."))
            if "hang" in call.scenario.flags:
                yield ("sleep", call.scenario.hang_s)
            yield self.send(call, err)
            self.finish(call, False)
            return
        call.response_id = self._id("resp")
        usage = openai_responses_usage(call.tokens)
        stream_id = ev.get("stream_id")
        _, events = responses_api_events(call.response_id, self._id("msg"), call.model or "gpt-4o", int(time.time()),
                                         ev, content_pieces(call.scenario.chunks), usage)
        seq = [(dict(data, **({"stream_id": stream_id} if stream_id else {})), content, u)
               for _, data, content, u in events]
        if ev.get("generate") is False:  # warm-up: no output, nothing billed
            zero = openai_responses_usage({**call.tokens, "output_tokens": 0, "reasoning_tokens": 0})
            created, completed = seq[0][0], seq[-1][0]
            completed["response"] = {**completed["response"], "output": [], "usage": zero}
            seq = [(created, False, None), (completed, False, zero)]
        yield from self.stream(call, seq, on_cut=self._failed(call, seq))
        if call.finished_at is None and not self.loop.done:
            self.finish(call, True)

    def _failed(self, call: WsCall, seq: list[tuple[dict[str, Any], bool, Any]]) -> Iterator[Action]:
        resp = seq[-1][0]["response"]
        failed = {**resp, "status": "failed", "usage": None, "output": [],
                  "error": {"code": "server_error", "message": _ERROR_MESSAGES[500]}}
        yield self.send(call, {"type": "response.failed", "sequence_number": len(call.events), "response": failed})
        self.finish(call, False)

    def _error(self, status: int, type_: str | None, code: str | None, message: str,
               param: str | None = None) -> dict[str, Any]:
        err = openai_error(status, message, type_, code)["error"]
        err["param"] = param
        return {"type": "error", "status": status, "error": err}


# --------------------------------------------------------------------------- OpenAI Realtime


class RealtimeWs(_Protocol):
    def __init__(self, sess: RecordedWsSession, mock: Any, loop: WsLoop) -> None:
        super().__init__(sess, mock, loop)
        self.beta = "realtime=v1" in (sess.headers.get("openai-beta") or "")
        self.conversation_bytes = 0
        self.audio_pending = 0
        self.audio_committed = 0
        self.last_item: str | None = None
        self.session: dict[str, Any] = {
            "id": self._id("sess"), "object": "realtime.session", "model": sess.model or "gpt-realtime",
            "instructions": "", "tools": [], "tool_choice": "auto", "max_output_tokens": "inf",
            "expires_at": int(time.time()) + 1800,
        }
        if self.beta:
            self.session.update({"modalities": ["text", "audio"], "voice": "alloy", "temperature": 0.8,
                                 "input_audio_format": "pcm16", "output_audio_format": "pcm16"})
        else:
            self.session.update({"type": "realtime", "output_modalities": ["audio"], "tracing": None,
                                 "truncation": "auto", "prompt": None,
                                 "audio": {"input": {"format": {"type": "audio/pcm", "rate": 24000}},
                                           "output": {"format": {"type": "audio/pcm", "rate": 24000},
                                                      "voice": "alloy", "speed": 1.0}}})

    def _event(self, type_: str, **fields: Any) -> dict[str, Any]:
        return {"type": type_, "event_id": self._id("event"), **fields}

    def on_open(self) -> Iterator[Action]:
        yield self.send(None, self._event("session.created", session=dict(self.session)))

    def on_message(self, msg: WsMessage) -> Iterator[Action]:
        ev = msg.json
        kind = ev.get("type") if isinstance(ev, dict) else None
        client_id = ev.get("event_id") if isinstance(ev, dict) else None
        if not isinstance(ev, dict) or msg.kind == "binary":
            yield self.send(None, self._error("invalid_request_error", "invalid_json", "Invalid JSON.", None,
                                              client_id))
        elif kind == "session.update":
            upd = ev.get("session") if isinstance(ev.get("session"), dict) else {}
            self.session.update({k: v for k, v in upd.items() if k not in ("id", "object")})
            if isinstance(upd.get("model"), str):
                self.sess.model = upd["model"]
            yield self.send(None, self._event("session.updated", session=dict(self.session)))
        elif kind == "conversation.item.create":
            item = dict(ev.get("item") or {})
            item.setdefault("id", self._id("item"))
            item.update({"object": "realtime.item", "status": "completed"})
            self.conversation_bytes += len(msg.text.encode())
            yield from self._item_events(item)
        elif kind == "input_audio_buffer.append":
            try:
                self.audio_pending += len(base64.b64decode(str(ev.get("audio") or ""), validate=False))
            except (binascii.Error, ValueError):
                yield self.send(None, self._error("invalid_request_error", "invalid_value", "Invalid audio.",
                                                  "audio", client_id))
        elif kind == "input_audio_buffer.commit":
            self.audio_committed += self.audio_pending
            self.audio_pending = 0
            item = {"id": self._id("item"), "object": "realtime.item", "type": "message", "status": "completed",
                    "role": "user", "content": [{"type": "input_audio", "transcript": None}]}
            yield self.send(None, self._event("input_audio_buffer.committed", previous_item_id=self.last_item,
                                              item_id=item["id"]))
            yield from self._item_events(item)
        elif kind == "input_audio_buffer.clear":
            self.audio_pending = 0
            yield self.send(None, self._event("input_audio_buffer.cleared"))
        elif kind == "response.create":
            yield from self._respond(ev, len(msg.text.encode()))
        elif kind == "response.cancel":
            yield self.send(None, self._error("invalid_request_error", "response_cancel_not_active",
                                              "Cancellation failed: no active response found", None, client_id))
        else:
            yield self.send(None, self._error("invalid_request_error", "invalid_value",
                                              f"Invalid value: '{kind}'.", "type", client_id))

    def _item_events(self, item: dict[str, Any]) -> Iterator[Action]:
        prev, self.last_item = self.last_item, item["id"]
        if self.beta:
            yield self.send(None, self._event("conversation.item.created", previous_item_id=prev, item=item))
        else:
            yield self.send(None, self._event("conversation.item.added", previous_item_id=prev, item=item))
            yield self.send(None, self._event("conversation.item.done", previous_item_id=prev, item=item))

    def _error(self, type_: str, code: str | None, message: str, param: str | None,
               client_event_id: str | None) -> dict[str, Any]:
        return self._event("error", error={"type": type_, "code": code, "message": message, "param": param,
                                           "event_id": client_event_id})

    def _respond(self, ev: dict[str, Any], raw_len: int) -> Iterator[Action]:
        opts = ev.get("response") if isinstance(ev.get("response"), dict) else {}
        meta = opts.get("metadata") if isinstance(opts.get("metadata"), dict) else {}
        call = self.new_call("realtime.response", ev, self.conversation_bytes + raw_len, self.sess.model,
                             meta.get("mock_scenario"))
        sc, t = call.scenario, call.tokens
        audio_in = sc.audio_input_tokens if sc.audio_input_tokens is not None else self.audio_committed // 4800
        audio_out = sc.audio_output_tokens or 0
        t.update(audio_input_tokens=audio_in, audio_output_tokens=audio_out)
        status = _error_status(call)
        if status is not None:
            err = openai_error(status, _ERROR_MESSAGES.get(status, f"Mock error {status}."))["error"]
            yield self.send(call, self._error(err["type"], err["code"], err["message"], None, ev.get("event_id")))
            self.finish(call, False)
            return
        call.response_id = rid = self._id("resp")
        item_id = self._id("item")
        mods_key = "modalities" if self.beta else "output_modalities"
        modalities = opts.get(mods_key) or self.session.get(mods_key) or ["text"]
        usage = {
            "total_tokens": t["input_tokens"] + audio_in + t["output_tokens"] + audio_out,
            "input_tokens": t["input_tokens"] + audio_in, "output_tokens": t["output_tokens"] + audio_out,
            "input_token_details": {"text_tokens": t["input_tokens"], "audio_tokens": audio_in, "image_tokens": 0,
                                    "cached_tokens": t["cache_read_tokens"],
                                    "cached_tokens_details": {"text_tokens": t["cache_read_tokens"],
                                                              "audio_tokens": 0, "image_tokens": 0}},
            "output_token_details": {"text_tokens": t["output_tokens"], "audio_tokens": audio_out},
        }

        def response(status_: str, output: list[Any], usage_: Any, details: Any = None) -> dict[str, Any]:
            r = {"object": "realtime.response", "id": rid, "status": status_, "status_details": details,
                 "output": output, "conversation_id": None if opts.get("conversation") == "none" else "conv_mock",
                 mods_key: modalities, "max_output_tokens": opts.get("max_output_tokens", "inf"),
                 "metadata": meta or None, "usage": usage_}
            if not self.beta:
                r["audio"] = {"output": {"format": {"type": "audio/pcm", "rate": 24000}, "voice": "alloy"}}
            return r

        pieces = content_pieces(sc.chunks)
        text = "".join(pieces)
        ptype = "text" if self.beta else "output_text"
        item = {"id": item_id, "object": "realtime.item", "type": "message", "status": "in_progress",
                "role": "assistant", "content": []}
        done_item = {**item, "status": "completed", "content": [{"type": ptype, "text": text}]}
        loc = {"response_id": rid, "item_id": item_id, "output_index": 0, "content_index": 0}
        delta, done = ("response.text.delta", "response.text.done") if self.beta else \
            ("response.output_text.delta", "response.output_text.done")
        E = self._event
        rate = [{"name": "requests", "limit": 5000, "remaining": 4999, "reset_seconds": 0.012},
                {"name": "tokens", "limit": 400000, "remaining": 399000, "reset_seconds": 0.15}]
        seq: list[tuple[dict[str, Any], bool, Any]] = [
            (E("response.created", response=response("in_progress", [], None)), False, None),
            (E("rate_limits.updated", rate_limits=rate), False, None),
            (E("response.output_item.added", response_id=rid, output_index=0, item=item), False, None),
        ]
        if self.beta:
            seq.append((E("conversation.item.created", previous_item_id=self.last_item, item=item), False, None))
        else:
            seq.append((E("conversation.item.added", previous_item_id=self.last_item, item=item), False, None))
        seq.append((E("response.content_part.added", **loc, part={"type": "text", "text": ""}), False, None))
        seq += [(E(delta, **loc, delta=p), True, None) for p in pieces]
        seq += [
            (E(done, **loc, text=text), False, None),
            (E("response.content_part.done", **loc, part={"type": "text", "text": text}), False, None),
            (E("response.output_item.done", response_id=rid, output_index=0, item=done_item), False, None),
        ]
        if not self.beta:
            seq.append((E("conversation.item.done", previous_item_id=self.last_item, item=done_item), False, None))
        seq.append((E("response.done", response=response("completed", [done_item], usage)), False, usage))
        if opts.get("conversation") != "none":
            self.last_item = item_id

        def failed() -> Iterator[Action]:
            details = {"type": "failed", "error": {"type": "server_error", "code": "server_error",
                                                   "message": _ERROR_MESSAGES[500]}}
            yield self.send(call, E("response.done", response=response("failed", [], None, details)))
            self.finish(call, False)

        yield from self.stream(call, seq, on_cut=failed())
        if call.finished_at is None and not self.loop.done:
            self.finish(call, True)


# --------------------------------------------------------------------------- Gemini Live


class GeminiLive(_Protocol):
    def __init__(self, sess: RecordedWsSession, mock: Any, loop: WsLoop) -> None:
        super().__init__(sess, mock, loop)
        self.binary = "text_frames" not in (sess.scenario_header or "")
        self.setup: dict[str, Any] | None = None
        self.turn_bytes = 0
        self.audio_bytes = 0

    def on_open(self) -> Iterator[Action]:
        want = self.mock.expected_keys.get("gemini")
        if want:
            got = _client_key(self.sess.request) or (self.sess.request.query_params.get("access_token") or [None])[-1]
            if got != want:
                yield ("close", 1008, "API key not valid. Please pass a valid API key.")

    def on_message(self, msg: WsMessage) -> Iterator[Action]:
        ev = msg.json
        if not isinstance(ev, dict):
            yield ("close", 1007, "Request contains an invalid argument.")
            return
        if self.setup is None:
            if not isinstance(ev.get("setup"), dict) or not ev["setup"].get("model"):
                yield ("close", 1007, "Request contains an invalid argument.")
                return
            self.setup = ev["setup"]
            model = str(self.setup["model"])
            self.sess.model = model.removeprefix("models/")
            self.turn_bytes += len(msg.text.encode())
            yield self.send(None, {"setupComplete": {}})
            return
        if isinstance(ev.get("clientContent"), dict):
            self.turn_bytes += len(msg.text.encode())
            if ev["clientContent"].get("turnComplete"):
                yield from self._turn(ev)
        elif isinstance(ev.get("realtimeInput"), dict):
            ri = ev["realtimeInput"]
            for chunk in [ri.get("audio"), ri.get("video"), *(ri.get("mediaChunks") or [])]:
                if isinstance(chunk, dict) and chunk.get("data"):
                    self.audio_bytes += len(str(chunk["data"])) * 3 // 4
            if ri.get("text"):
                self.turn_bytes += len(msg.text.encode())
                yield from self._turn(ev)
            elif (ri.get("audioStreamEnd") or "activityEnd" in ri) and self.audio_bytes:
                yield from self._turn(ev)
        elif isinstance(ev.get("toolResponse"), dict):
            self.turn_bytes += len(msg.text.encode())
            yield from self._turn(ev)
        else:
            yield ("close", 1007, "Request contains an invalid argument.")

    def _turn(self, ev: dict[str, Any]) -> Iterator[Action]:
        call = self.new_call("live.turn", ev, self.turn_bytes, self.sess.model)
        sc, t = call.scenario, call.tokens
        status = _error_status(call)
        if status is not None:
            if "hang" in sc.flags:
                yield ("sleep", sc.hang_s)
            self.finish(call, False)
            reason = ("Resource has been exhausted (e.g. check quota)." if status == 429
                      else "Internal error encountered.")
            yield ("close", 1011, reason)
            return
        audio_in = sc.audio_input_tokens if sc.audio_input_tokens is not None else self.audio_bytes // 3200
        prompt = t["input_tokens"] + audio_in
        details = [{"modality": "TEXT", "tokenCount": t["input_tokens"]}]
        if audio_in:
            details.append({"modality": "AUDIO", "tokenCount": audio_in})
        usage: dict[str, Any] = {
            "promptTokenCount": prompt, "responseTokenCount": t["output_tokens"],
            "totalTokenCount": prompt + t["output_tokens"] + t["reasoning_tokens"],
            "promptTokensDetails": details,
            "responseTokensDetails": [{"modality": "TEXT", "tokenCount": t["output_tokens"]}],
        }
        if t["cache_read_tokens"]:
            usage["cachedContentTokenCount"] = t["cache_read_tokens"]
        if t["reasoning_tokens"]:
            usage["thoughtsTokenCount"] = t["reasoning_tokens"]
        seq: list[tuple[dict[str, Any], bool, Any]] = [
            ({"serverContent": {"modelTurn": {"role": "model", "parts": [{"text": p}]}}}, True, None)
            for p in content_pieces(sc.chunks)]
        seq.append(({"serverContent": {"generationComplete": True}}, False, None))
        seq.append(({"serverContent": {"turnComplete": True}, "usageMetadata": usage}, False, usage))

        def failed() -> Iterator[Action]:
            self.finish(call, False)
            yield ("close", 1011, "Internal error encountered.")

        yield from self.stream(call, seq, on_cut=failed())
        if call.finished_at is None and not self.loop.done:
            self.finish(call, True)
