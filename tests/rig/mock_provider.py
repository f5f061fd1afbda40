"""A local HTTPS mock of the hosted model APIs, speaking their wire formats.

One server answers for every provider (any Host header); requests are routed by path:

* OpenAI (and OpenAI-compatible hosts, Azure deployments): ``.../chat/completions``,
  ``.../responses``, ``.../completions``, ``.../embeddings``, ``GET .../models[/{id}]``,
  ``GET /v1/organization/costs``; images, audio, files, batches and fine-tuning
  (:mod:`tests.rig.mock_media`).
* WebSockets (:mod:`tests.rig.mock_ws`, :mod:`tests.rig.mock_realtime`): the Responses API's
  WebSocket mode (``GET /v1/responses``), the Realtime API (``GET /v1/realtime?model=``) and
  Gemini Live (``/ws/google.ai.generativelanguage.v1beta.GenerativeService.BidiGenerateContent``),
  recorded in ``MockProvider.ws_sessions``.
* Anthropic: ``POST /v1/messages``, ``POST /v1/messages/count_tokens``, ``GET /v1/models``,
  ``GET /v1/organizations/cost_report``.
* Gemini: ``POST /v1beta/models/{model}:generateContent`` / ``:streamGenerateContent`` /
  ``:countTokens``.

Usage numbers are deterministic (see :func:`plan_tokens`):

* ``input_tokens  = 10 + len(request body bytes) // 4``
* ``output_tokens = chunks`` (number of content pieces; default 5), times ``n`` / ``best_of`` /
  ``candidateCount`` when the request asks for several answers
* ``cache_read_tokens = cache_write_tokens = reasoning_tokens = 0``

each overridable per request. Every request is recorded (:class:`RecordedRequest`) with the
exact bytes answered and the usage reported, so tests can compare exactly.

Scenarios are chosen per request by the ``x-mock-scenario`` header (``"slow; delay_ms=50;
chunks=3"``), else by the next queued :meth:`MockProvider.set_next`, else by
:meth:`MockProvider.set_default`.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import datetime as dt
import fnmatch
import ipaddress
import json
import re
import signal
import socket
import ssl
import struct
import sys
import tempfile
import threading
import time
import uuid
import zlib
from collections import deque
from collections.abc import Iterable
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from . import mock_media, mock_ws

SCENARIO_HEADER = "x-mock-scenario"

WORDS = ["Hello", "from", "the", "mock", "provider", "streaming", "tokens", "one", "by", "one"]
DEFAULT_CHUNKS = 5
DEFAULT_SLOW_DELAY_MS = 200
DEFAULT_HANG_S = 60.0

PROVIDER_HOSTS = ["api.openai.com", "api.anthropic.com", "generativelanguage.googleapis.com"]

OPENAI_MODELS = ["gpt-4o", "gpt-4o-mini", "gpt-4.1", "o3-mini", "text-embedding-3-small"]
ANTHROPIC_MODELS = ["claude-sonnet-4-20250514", "claude-3-5-haiku-20241022"]

_DISCONNECT_ERRORS = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, ssl.SSLError, TimeoutError)


class _ClientGone(Exception):
    pass


# --------------------------------------------------------------------------- scenarios

_INT_PARAMS = {
    "chunks",
    "delay_ms",
    "first_delay_ms",
    "status",
    "input_tokens",
    "output_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
    "truncate_after",
    "retry_after",
    "audio_input_tokens",
    "audio_output_tokens",
}
_FLOAT_PARAMS = {"hang_s", "audio_seconds"}
_STR_PARAMS = {"model"}
_ERROR_RE = re.compile(r"^error(\d{3})$")


@dataclasses.dataclass
class Scenario:
    """What the mock does with one request.

    flags: any of ``ok``, ``error500`` / ``errorNNN`` / ``error`` (with ``status``), ``slow``,
    ``truncate``, ``hang``, ``gzip``, ``no_usage`` (chat / legacy completions answer without
    usage), and for WebSockets ``failed`` (response.failed / a failed response.done), ``reject``
    (the upgrade is refused with ``status``, default 403; upgrade header only), ``no_deflate``
    (do not negotiate permessage-deflate) and ``text_frames`` (Gemini Live in text frames).
    Several may be combined (``"slow; truncate"``).
    """

    flags: frozenset[str] = frozenset({"ok"})
    chunks: int = DEFAULT_CHUNKS
    delay_ms: int | None = None  # between SSE events; default 0, or 200 with "slow"
    first_delay_ms: int = 0  # before the response headers
    hang_s: float = DEFAULT_HANG_S
    status: int | None = None  # for error scenarios
    retry_after: int | None = None
    truncate_after: int | None = None  # content pieces sent before a "truncate" cut
    input_tokens: int | None = None
    output_tokens: int | None = None
    cache_read_tokens: int | None = None
    cache_write_tokens: int | None = None
    reasoning_tokens: int | None = None
    model: str | None = None  # model name reported in the answer (default: the requested one)
    audio_input_tokens: int | None = None  # Realtime: input audio tokens (default: from the audio sent)
    audio_output_tokens: int | None = None  # Realtime: output audio tokens (default 0)
    audio_seconds: float | None = None  # transcription: billed duration (default: from the file size)

    @property
    def name(self) -> str:
        return "+".join(sorted(self.flags))

    @property
    def error_status(self) -> int | None:
        for f in self.flags:
            m = _ERROR_RE.match(f)
            if m:
                return int(m.group(1))
        if "error" in self.flags:
            return self.status or 500
        return None

    @property
    def stream_delay_s(self) -> float:
        if self.delay_ms is not None:
            return self.delay_ms / 1000
        return DEFAULT_SLOW_DELAY_MS / 1000 if "slow" in self.flags else 0.0

    @classmethod
    def parse(cls, spec: str | Scenario | None = None, **params: Any) -> Scenario:
        """``"slow; delay_ms=50; chunks=3"`` (``;`` or ``,`` separated) plus keyword overrides."""
        if isinstance(spec, Scenario):
            sc = dataclasses.replace(spec)
        else:
            sc = cls()
            flags: set[str] = set()
            for token in re.split(r"[;,]", spec or ""):
                token = token.strip()
                if not token:
                    continue
                if "=" in token:
                    k, v = (s.strip() for s in token.split("=", 1))
                    params.setdefault(k, v)
                else:
                    flags.add(token.lower())
            if flags:
                sc.flags = frozenset(flags)
        usage = params.pop("usage_tokens", None) or params.pop("usage", None)
        if usage:
            for k, v in usage.items():
                k = k if k.endswith("_tokens") else f"{k}_tokens"
                params.setdefault(k, v)
        for k, v in params.items():
            if k in _INT_PARAMS:
                setattr(sc, k, int(v))
            elif k in _FLOAT_PARAMS:
                setattr(sc, k, float(v))
            elif k in _STR_PARAMS:
                setattr(sc, k, str(v))
            elif k == "hang_ms":
                sc.hang_s = int(v) / 1000
            elif k in ("flags", "scenario"):
                sc.flags = frozenset([v] if isinstance(v, str) else v)
            else:
                raise ValueError(f"unknown mock scenario parameter {k!r}")
        if sc.chunks < 1:
            raise ValueError("chunks must be >= 1")
        return sc


def plan_tokens(body: bytes, sc: Scenario) -> dict[str, int]:
    """The usage the mock reports for a request (before any scenario cuts the answer short)."""
    return {
        "input_tokens": sc.input_tokens if sc.input_tokens is not None else 10 + len(body) // 4,
        "output_tokens": sc.output_tokens if sc.output_tokens is not None else sc.chunks,
        "cache_read_tokens": sc.cache_read_tokens or 0,
        "cache_write_tokens": sc.cache_write_tokens or 0,
        "reasoning_tokens": sc.reasoning_tokens or 0,
    }


def content_pieces(n: int) -> list[str]:
    return [(WORDS[i % len(WORDS)] if i == 0 else " " + WORDS[i % len(WORDS)]) for i in range(n)]


# --------------------------------------------------------------------------- usage shapes


def openai_chat_usage(t: dict[str, int]) -> dict[str, Any]:
    return {
        "prompt_tokens": t["input_tokens"],
        "completion_tokens": t["output_tokens"],
        "total_tokens": t["input_tokens"] + t["output_tokens"],
        "prompt_tokens_details": {"cached_tokens": t["cache_read_tokens"], "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": t["reasoning_tokens"],
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def openai_legacy_usage(t: dict[str, int]) -> dict[str, Any]:
    return {
        "prompt_tokens": t["input_tokens"],
        "completion_tokens": t["output_tokens"],
        "total_tokens": t["input_tokens"] + t["output_tokens"],
    }


def openai_responses_usage(t: dict[str, int]) -> dict[str, Any]:
    return {
        "input_tokens": t["input_tokens"],
        "input_tokens_details": {"cached_tokens": t["cache_read_tokens"]},
        "output_tokens": t["output_tokens"],
        "output_tokens_details": {"reasoning_tokens": t["reasoning_tokens"]},
        "total_tokens": t["input_tokens"] + t["output_tokens"],
    }


def anthropic_usage(t: dict[str, int], output_tokens: int | None = None) -> dict[str, Any]:
    return {
        "input_tokens": t["input_tokens"],
        "cache_creation_input_tokens": t["cache_write_tokens"],
        "cache_read_input_tokens": t["cache_read_tokens"],
        "cache_creation": {"ephemeral_5m_input_tokens": t["cache_write_tokens"], "ephemeral_1h_input_tokens": 0},
        "output_tokens": t["output_tokens"] if output_tokens is None else output_tokens,
        "service_tier": "standard",
    }


def gemini_usage(t: dict[str, int], candidates: int | None = None) -> dict[str, Any]:
    out = t["output_tokens"] if candidates is None else candidates
    return {
        "promptTokenCount": t["input_tokens"],
        "candidatesTokenCount": out,
        "totalTokenCount": t["input_tokens"] + out + t["reasoning_tokens"],
        "cachedContentTokenCount": t["cache_read_tokens"],
        "thoughtsTokenCount": t["reasoning_tokens"],
        "promptTokensDetails": [{"modality": "TEXT", "tokenCount": t["input_tokens"]}],
    }


def openai_error(status: int, message: str, type_: str | None = None, code: str | None = None) -> dict[str, Any]:
    defaults = {
        400: ("invalid_request_error", None),
        401: ("invalid_request_error", "invalid_api_key"),
        403: ("invalid_request_error", "unsupported_country_region_territory"),
        404: ("invalid_request_error", None),
        429: ("requests", "rate_limit_exceeded"),
        500: ("server_error", None),
        503: ("server_error", None),
    }
    t, c = defaults.get(status, ("server_error", None))
    return {"error": {"message": message, "type": type_ or t, "param": None, "code": code if code else c}}


def anthropic_error(status: int, message: str, request_id: str | None = None) -> dict[str, Any]:
    types = {
        400: "invalid_request_error",
        401: "authentication_error",
        403: "permission_error",
        404: "not_found_error",
        413: "request_too_large",
        429: "rate_limit_error",
        500: "api_error",
        529: "overloaded_error",
    }
    body: dict[str, Any] = {"type": "error", "error": {"type": types.get(status, "api_error"), "message": message}}
    if request_id:
        body["request_id"] = request_id
    return body


def gemini_error(status: int, message: str) -> dict[str, Any]:
    statuses = {
        400: "INVALID_ARGUMENT",
        401: "UNAUTHENTICATED",
        403: "PERMISSION_DENIED",
        404: "NOT_FOUND",
        429: "RESOURCE_EXHAUSTED",
        500: "INTERNAL",
        503: "UNAVAILABLE",
        504: "DEADLINE_EXCEEDED",
    }
    return {"error": {"code": status, "message": message, "status": statuses.get(status, "INTERNAL")}}


def error_body(provider: str, status: int, message: str, request_id: str | None = None) -> dict[str, Any]:
    if provider == "anthropic":
        return anthropic_error(status, message, request_id)
    if provider == "gemini":
        return gemini_error(status, message)
    return openai_error(status, message)


_ERROR_MESSAGES = {
    400: "Mock: bad request.",
    401: "Mock: incorrect API key provided.",
    403: "Mock: forbidden.",
    404: "Mock: not found.",
    429: "Mock: rate limit reached for requests.",
    500: "The server had an error while processing your request. Sorry about that!",
    502: "Mock: bad gateway.",
    503: "Mock: the engine is currently overloaded, please try again later.",
    529: "Overloaded",
}


# --------------------------------------------------------------------------- records


@dataclasses.dataclass
class RecordedRequest:
    """One request the mock received, and what it answered."""

    seq: int
    method: str
    path: str  # without the query string
    query: str  # raw query string ("" if none)
    header_list: list[tuple[str, str]]  # as received: case and order preserved, repeats kept
    headers: dict[str, str]  # lower-cased names (last value wins)
    body: bytes
    timestamp: float  # time.time() at arrival
    client_addr: str
    host: str  # Host header as received
    provider: str = "openai"  # openai | anthropic | gemini
    endpoint: str = "unknown"  # chat | responses | completions | embeddings | models | messages |
    #   count_tokens | generate | stream_generate | costs | cost_report | images | image_edits | speech |
    #   transcriptions | translations | files | file | file_content | batches | batch | fine_tuning |
    #   responses_ws | realtime | live (WebSocket upgrades; see ws_sessions) | unknown
    deployment: str | None = None  # Azure deployment name, if the Azure path form was used
    model: str | None = None  # requested model (body, path or deployment)
    model_reported: str | None = None  # model name put in the answer
    stream: bool = False
    include_usage: bool = False  # OpenAI stream_options.include_usage
    scenario: Scenario = dataclasses.field(default_factory=Scenario)
    tokens: dict[str, int] = dataclasses.field(default_factory=dict)  # plan_tokens(); normalised
    usage: dict[str, Any] | None = None  # provider-native usage object of the *final* usage sent
    usage_sent: bool = False  # the final (complete) usage reached the wire
    request_id: str | None = None  # x-request-id / request-id header the mock answered with
    response_status: int | None = None
    response_headers: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    response_body: bytes = b""  # payload as the client should decode it (no chunk framing, no gzip)
    response_raw: bytes = b""  # payload bytes on the wire (after Content-Encoding, no chunk framing)
    chunk_times: list[float] = dataclasses.field(default_factory=list)  # time.monotonic() per write
    completed: bool = False  # the full answer was sent
    client_disconnected: bool = False
    finished_at: float | None = None
    finished: threading.Event = dataclasses.field(default_factory=threading.Event, repr=False)
    n: int = 1  # answers asked for: chat / completions ``n`` (``best_of``), Gemini ``candidateCount``

    @property
    def json(self) -> Any:
        try:
            return json.loads(self.body)
        except ValueError:
            return None

    @property
    def query_params(self) -> dict[str, list[str]]:
        return parse_qs(self.query, keep_blank_values=True)

    def header(self, name: str, default: str | None = None) -> str | None:
        return self.headers.get(name.lower(), default)

    def sse_events(self) -> list[dict[str, Any]]:
        """The SSE events answered, as ``{"event": name|None, "data": str}``."""
        events = []
        text = self.response_body.decode("utf-8", "replace").replace("\r\n", "\n")
        for block in text.split("\n\n"):
            if not block.strip():
                continue
            ev: dict[str, Any] = {"event": None, "data": ""}
            data = []
            for line in block.split("\n"):
                if line.startswith("event:"):
                    ev["event"] = line[6:].strip()
                elif line.startswith("data:"):
                    data.append(line[5:].lstrip(" "))
            ev["data"] = "\n".join(data)
            events.append(ev)
        return events


@dataclasses.dataclass
class _Event:
    data: bytes
    content: bool = False  # carries a content piece (counts toward truncate_after)
    final_usage: dict[str, Any] | None = None  # this event carries the complete usage


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def _sse(data: Any, event: str | None = None, sep: str = "\n") -> bytes:
    payload = data if isinstance(data, str) else _dumps(data)
    head = f"event: {event}{sep}" if event else ""
    return f"{head}data: {payload}{sep}{sep}".encode()


def responses_api_response(resp_id: str, model: str, created_at: int, payload: dict[str, Any], status: str,
                           output: list[Any], usage: dict[str, Any] | None) -> dict[str, Any]:
    """A Responses API ``response`` object (POST /v1/responses answer, and inside stream events)."""
    return {
        "id": resp_id, "object": "response", "created_at": created_at, "status": status,
        "background": False, "error": None, "incomplete_details": None,
        "instructions": payload.get("instructions"), "max_output_tokens": payload.get("max_output_tokens"),
        "model": model, "output": output, "parallel_tool_calls": True,
        "previous_response_id": payload.get("previous_response_id"),
        "reasoning": {"effort": None, "summary": None}, "service_tier": "default", "store": True,
        "temperature": 1.0, "text": {"format": {"type": "text"}}, "tool_choice": "auto", "tools": [],
        "top_p": 1.0, "truncation": "disabled", "usage": usage, "user": None, "metadata": {},
    }


def responses_api_events(resp_id: str, msg_id: str, model: str, created_at: int, payload: dict[str, Any],
                         pieces: list[str], usage: dict[str, Any],
                         ) -> tuple[dict[str, Any], list[tuple[str, dict[str, Any], bool, dict[str, Any] | None]]]:
    """The completed response, and its streaming events as ``(type, data, is_content, final_usage)``.

    The order is the documented one (response.created, response.in_progress,
    response.output_item.added, response.content_part.added, response.output_text.delta...,
    response.output_text.done, response.content_part.done, response.output_item.done,
    response.completed); SSE (``stream: true``) and the WebSocket mode send the same events.
    """
    text = "".join(pieces)

    def response(status: str, output: list[Any], usage_: dict[str, Any] | None) -> dict[str, Any]:
        return responses_api_response(resp_id, model, created_at, payload, status, output, usage_)

    part_done = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
    item_done = {"id": msg_id, "type": "message", "status": "completed", "role": "assistant", "content": [part_done]}
    item_start = {"id": msg_id, "type": "message", "status": "in_progress", "role": "assistant", "content": []}
    loc = {"item_id": msg_id, "output_index": 0, "content_index": 0}
    seq = iter(range(1_000_000))
    events: list[tuple[str, dict[str, Any], bool, dict[str, Any] | None]] = []

    def ev(name: str, data: dict[str, Any], content: bool = False, final: dict[str, Any] | None = None) -> None:
        events.append((name, {"type": name, "sequence_number": next(seq), **data}, content, final))

    ev("response.created", {"response": response("in_progress", [], None)})
    ev("response.in_progress", {"response": response("in_progress", [], None)})
    ev("response.output_item.added", {"output_index": 0, "item": item_start})
    ev("response.content_part.added",
       {**loc, "part": {"type": "output_text", "text": "", "annotations": [], "logprobs": []}})
    for p in pieces:
        ev("response.output_text.delta", {**loc, "delta": p, "logprobs": []}, content=True)
    ev("response.output_text.done", {**loc, "text": text, "logprobs": []})
    ev("response.content_part.done", {**loc, "part": part_done})
    ev("response.output_item.done", {"output_index": 0, "item": item_done})
    final = response("completed", [item_done], usage)
    ev("response.completed", {"response": final}, final=usage)
    return final, events


# --------------------------------------------------------------------------- TLS


def generate_cert(directory: Path, extra_hosts: Iterable[str] = ()) -> tuple[Path, Path]:
    """Self-signed EC certificate for 127.0.0.1, localhost and the provider hostnames."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "spendgate mock provider")])
    now = dt.datetime.now(dt.UTC)
    dns = ["localhost", *PROVIDER_HOSTS, "*.openai.azure.com", *extra_hosts]
    san = x509.SubjectAlternativeName(
        [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))] + [x509.DNSName(h) for h in dict.fromkeys(dns)]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(san, critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path = directory / "mock-provider-cert.pem"
    key_path = directory / "mock-provider-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


# --------------------------------------------------------------------------- HTTP server


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 512

    def __init__(self, addr: tuple[str, int], mock: MockProvider, ssl_ctx: ssl.SSLContext | None) -> None:
        self.mock = mock
        self.ssl_ctx = ssl_ctx
        super().__init__(addr, _Handler)

    def finish_request(self, request: Any, client_address: Any) -> None:
        conn = request
        try:  # no Nagle: each SSE event must leave as soon as it is written
            request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        if self.ssl_ctx is not None:
            try:
                request.settimeout(10)
                conn = self.ssl_ctx.wrap_socket(request, server_side=True)  # handshake off the accept thread
                conn.settimeout(None)
            except (OSError, ssl.SSLError):
                request.close()
                return
        self.mock._track(conn, True)
        try:
            _Handler(conn, client_address, self)
        except _DISCONNECT_ERRORS + (OSError,):
            pass
        finally:
            self.mock._track(conn, False)
            try:
                conn.close()
            except OSError:
                pass

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, _DISCONNECT_ERRORS + (OSError, _ClientGone)):
            return
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "mock-provider/1"
    sys_version = ""
    timeout = 120  # idle keep-alive connections
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass

    def version_string(self) -> str:
        return self.server_version

    def do_GET(self) -> None:
        self._handle()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = do_GET

    # ---- plumbing

    def _read_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            parts = []
            while True:
                line = self.rfile.readline(65537)
                size = int(line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass
                    break
                parts.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(parts)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _write(self, data: bytes) -> None:
        try:
            self.wfile.write(data)
            self.wfile.flush()
        except _DISCONNECT_ERRORS + (OSError, ValueError) as e:
            raise _ClientGone() from e

    def _wait(self, seconds: float) -> None:
        if seconds > 0:
            self.server.mock._stopping.wait(seconds)

    def _begin(self, rec: RecordedRequest, status: int, headers: list[tuple[str, str]]) -> None:
        rec.response_status = status
        rec.response_headers = headers
        try:
            self.send_response(status)
            for k, v in headers:
                self.send_header(k, v)
            self.end_headers()
        except _DISCONNECT_ERRORS + (OSError,) as e:
            raise _ClientGone() from e

    def _provider_headers(self, rec: RecordedRequest) -> list[tuple[str, str]]:
        if rec.provider == "anthropic":
            return [("request-id", rec.request_id or ""), ("anthropic-organization-id", "mock-org")]
        if rec.provider == "gemini":
            return [("x-goog-request-id", rec.request_id or ""), ("server-timing", "gfet4t7; dur=12")]
        return [("x-request-id", rec.request_id or ""), ("openai-processing-ms", "12"),
                ("openai-version", "2020-10-01")]

    def _accepts_gzip(self, rec: RecordedRequest) -> bool:
        return "gzip" in rec.scenario.flags and "gzip" in (rec.headers.get("accept-encoding") or "")

    def _send_json(self, rec: RecordedRequest, status: int, obj: Any, usage: dict[str, Any] | None = None,
                   extra_headers: list[tuple[str, str]] | None = None) -> None:
        body = (json.dumps(obj, indent=2) if rec.provider == "gemini" else _dumps(obj)).encode()
        raw = body
        headers = [("Content-Type", "application/json"), *self._provider_headers(rec), *(extra_headers or [])]
        if self._accepts_gzip(rec):
            raw = _gzip(body)
            headers.append(("Content-Encoding", "gzip"))
        headers.append(("Content-Length", str(len(raw))))
        truncate = "truncate" in rec.scenario.flags and status < 400
        if truncate:
            self.close_connection = True
        self._begin(rec, status, headers)
        rec.response_body = body
        if truncate:
            cut = raw[: len(raw) // 2]
            rec.response_raw = cut
            rec.response_body = cut if raw is body else b""
            self._write(cut)
            rec.chunk_times.append(time.monotonic())
            return
        rec.response_raw = raw
        self._write(raw)
        rec.chunk_times.append(time.monotonic())
        rec.completed = True
        if usage is not None:
            rec.usage = usage
            rec.usage_sent = True

    def _send_stream(self, rec: RecordedRequest, events: list[_Event], content_type: str = "text/event-stream") -> None:
        sc = rec.scenario
        headers = [
            ("Content-Type",
             content_type if content_type != "text/event-stream" else "text/event-stream; charset=utf-8"),
            ("Cache-Control", "no-cache"),
            *self._provider_headers(rec),
        ]
        gz = zlib.compressobj(6, zlib.DEFLATED, 31) if self._accepts_gzip(rec) else None
        if gz is not None:
            headers.append(("Content-Encoding", "gzip"))
        headers.append(("Transfer-Encoding", "chunked"))
        truncate = "truncate" in sc.flags
        cut_after = sc.truncate_after if sc.truncate_after is not None else max(1, sc.chunks // 2)
        if truncate:
            self.close_connection = True
        self._begin(rec, 200, headers)
        delay = sc.stream_delay_s
        content_sent = 0
        for i, ev in enumerate(events):
            if truncate and ev.content and content_sent >= cut_after:
                return  # close without the rest, without the terminating chunk
            if i and delay:
                self._wait(delay)
                if self.server.mock._stopping.is_set():
                    return
            wire = ev.data
            if gz is not None:
                wire = gz.compress(ev.data) + gz.flush(zlib.Z_SYNC_FLUSH)
            self._write(b"%x\r\n%s\r\n" % (len(wire), wire))
            rec.chunk_times.append(time.monotonic())
            rec.response_body += ev.data
            rec.response_raw += wire
            if ev.content:
                content_sent += 1
            if ev.final_usage is not None:
                rec.usage = ev.final_usage
                rec.usage_sent = True
        if truncate:
            return
        tail = b""
        if gz is not None:
            tail = gz.flush()
            rec.response_raw += tail
        self._write((b"%x\r\n%s\r\n" % (len(tail), tail) if tail else b"") + b"0\r\n\r\n")
        rec.completed = True

    # ---- request entry

    def _handle(self) -> None:
        mock = self.server.mock
        body = self._read_body()
        split = urlsplit(self.path)
        path = split.path
        if self.path.startswith(("http://", "https://")):  # absolute-form, e.g. sent to us as a proxy
            path = split.path or "/"
        header_list = [(k, v) for k, v in self.headers.items()]
        rec = RecordedRequest(
            seq=0,
            method=self.command,
            path=path,
            query=split.query,
            header_list=header_list,
            headers={k.lower(): v for k, v in header_list},
            body=body,
            timestamp=time.time(),
            client_addr=f"{self.client_address[0]}:{self.client_address[1]}",
            host=self.headers.get("Host", ""),
        )
        _route(rec)
        rec.scenario = mock._scenario_for(rec)
        rec.request_id = (
            f"req_{uuid.uuid4().hex[:24]}" if rec.provider != "gemini" else uuid.uuid4().hex[:16]
        )
        payload = rec.json if isinstance(rec.json, dict) else {}
        if rec.model is None and isinstance(payload.get("model"), str):
            rec.model = payload["model"]
        rec.model_reported = rec.scenario.model or rec.model
        rec.stream = rec.stream or bool(payload.get("stream"))
        so = payload.get("stream_options")
        rec.include_usage = bool(isinstance(so, dict) and so.get("include_usage"))
        rec.tokens = plan_tokens(body, rec.scenario)
        rec.n = _answers_asked(rec, payload)
        if rec.n > 1 and rec.scenario.output_tokens is None:
            rec.tokens["output_tokens"] *= rec.n
        mock._record(rec)
        if (rec.headers.get("connection") or "").lower() == "close":
            self.close_connection = True
        try:
            self._dispatch(rec)
        except _ClientGone:
            rec.client_disconnected = True
            self.close_connection = True
        finally:
            rec.finished_at = time.time()
            rec.finished.set()

    def _dispatch(self, rec: RecordedRequest) -> None:
        mock = self.server.mock
        sc = rec.scenario
        if rec.endpoint in mock_ws.WS_ENDPOINTS or mock_ws.is_upgrade(rec.headers):
            mock_ws.serve(self, rec)
            return
        if "hang" in sc.flags:
            self._wait(sc.hang_s)
            if mock._stopping.is_set():
                self.close_connection = True
                return
        self._wait(sc.first_delay_ms / 1000)
        if mock.expected_keys.get(rec.provider) and rec.endpoint not in ("costs", "cost_report"):
            want = mock.expected_keys[rec.provider]
            got = _client_key(rec)
            if got != want:
                self._send_json(rec, 401, error_body(rec.provider, 401, _ERROR_MESSAGES[401], rec.request_id))
                return
        status = sc.error_status
        if status is not None:
            extra = []
            if status == 429 or sc.retry_after is not None:
                extra.append(("Retry-After", str(sc.retry_after if sc.retry_after is not None else 1)))
            msg = _ERROR_MESSAGES.get(status, f"Mock error {status}.")
            self._send_json(rec, status, error_body(rec.provider, status, msg, rec.request_id), extra_headers=extra)
            return
        handler = getattr(self, f"_ep_{rec.provider}_{rec.endpoint}", None)
        if handler is None and rec.provider == "openai" and rec.endpoint in mock_media.ENDPOINTS:
            mock_media.ENDPOINTS[rec.endpoint](self, rec)
            return
        if handler is None:
            msg = f"Invalid URL ({rec.method} {rec.path})" if rec.provider == "openai" else f"Not found: {rec.path}"
            self._send_json(rec, 404, error_body(rec.provider, 404, msg, rec.request_id))
            return
        handler(rec)

    # ---- OpenAI

    def _ep_openai_chat(self, rec: RecordedRequest) -> None:
        sc, t = rec.scenario, rec.tokens
        pieces = content_pieces(sc.chunks)
        cid, created, model = f"chatcmpl-mock{rec.seq:06d}", int(rec.timestamp), rec.model_reported or "gpt-4o-mini"
        with_usage = "no_usage" not in sc.flags
        usage = openai_chat_usage(t) if with_usage else None
        n = rec.n
        if not rec.stream:
            body: dict[str, Any] = {
                "id": cid,
                "object": "chat.completion",
                "created": created,
                "model": model,
                "choices": [{
                    "index": i,
                    "message": {"role": "assistant", "content": "".join(pieces), "refusal": None, "annotations": []},
                    "logprobs": None,
                    "finish_reason": "stop",
                } for i in range(n)],
                "usage": usage,
                "service_tier": "default",
                "system_fingerprint": "fp_mock",
            }
            if not with_usage:
                del body["usage"]
            self._send_json(rec, 200, body, usage=usage)
            return
        include_usage = rec.include_usage and with_usage

        def chunk(delta: dict[str, Any], finish: str | None, index: int = 0) -> dict[str, Any]:
            c: dict[str, Any] = {
                "id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                "service_tier": "default", "system_fingerprint": "fp_mock",
                "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}],
            }
            if include_usage:
                c["usage"] = None
            return c

        events = [_Event(_sse(chunk({"role": "assistant", "content": "", "refusal": None}, None, i))) for i in range(n)]
        events += [_Event(_sse(chunk({"content": p}, None, i)), content=True) for p in pieces for i in range(n)]
        events += [_Event(_sse(chunk({}, "stop", i))) for i in range(n)]
        if include_usage:
            events.append(_Event(_sse({
                "id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                "service_tier": "default", "system_fingerprint": "fp_mock", "choices": [], "usage": usage,
            }), final_usage=usage))
        events.append(_Event(b"data: [DONE]\n\n"))
        self._send_stream(rec, events)

    def _ep_openai_completions(self, rec: RecordedRequest) -> None:
        sc, t = rec.scenario, rec.tokens
        pieces = content_pieces(sc.chunks)
        cid, created = f"cmpl-mock{rec.seq:06d}", int(rec.timestamp)
        model = rec.model_reported or "gpt-3.5-turbo-instruct"
        with_usage = "no_usage" not in sc.flags
        usage = openai_legacy_usage(t) if with_usage else None
        payload = rec.json if isinstance(rec.json, dict) else {}
        choices = _positive_int(payload.get("n"))
        if not rec.stream:
            body: dict[str, Any] = {
                "id": cid, "object": "text_completion", "created": created, "model": model,
                "choices": [{"text": "".join(pieces), "index": i, "logprobs": None, "finish_reason": "stop"}
                            for i in range(choices)],
                "usage": usage, "system_fingerprint": "fp_mock",
            }
            if not with_usage:
                del body["usage"]
            self._send_json(rec, 200, body, usage=usage)
            return

        def chunk(text: str, finish: str | None) -> dict[str, Any]:
            c: dict[str, Any] = {
                "id": cid, "object": "text_completion", "created": created, "model": model,
                "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}],
                "system_fingerprint": "fp_mock",
            }
            if rec.include_usage and with_usage:
                c["usage"] = None
            return c

        events = [_Event(_sse(chunk(p, None)), content=True) for p in pieces]
        events.append(_Event(_sse(chunk("", "stop"))))
        if rec.include_usage and with_usage:
            events.append(_Event(_sse({
                "id": cid, "object": "text_completion", "created": created, "model": model,
                "choices": [], "usage": usage, "system_fingerprint": "fp_mock",
            }), final_usage=usage))
        events.append(_Event(b"data: [DONE]\n\n"))
        self._send_stream(rec, events)

    def _ep_openai_responses(self, rec: RecordedRequest) -> None:
        payload = rec.json if isinstance(rec.json, dict) else {}
        usage = openai_responses_usage(rec.tokens)
        final, events = responses_api_events(
            f"resp_mock{rec.seq:06d}", f"msg_mock{rec.seq:06d}", rec.model_reported or "gpt-4o",
            int(rec.timestamp), payload, content_pieces(rec.scenario.chunks), usage)
        if not rec.stream:
            self._send_json(rec, 200, final, usage=usage)
            return
        self._send_stream(rec, [_Event(_sse(data, event=name), content=content, final_usage=u)
                                for name, data, content, u in events])

    def _ep_openai_embeddings(self, rec: RecordedRequest) -> None:
        payload = rec.json if isinstance(rec.json, dict) else {}
        inp = payload.get("input", "")
        if isinstance(inp, str) or (isinstance(inp, list) and inp and isinstance(inp[0], int)):
            n = 1
        else:
            n = max(1, len(inp)) if isinstance(inp, list) else 1
        dims = int(payload.get("dimensions") or 8)
        b64 = payload.get("encoding_format") == "base64"
        data = []
        for i in range(n):
            vec = [round((((i + 1) * 7 + j * 3) % 17) / 17 - 0.5, 6) for j in range(dims)]
            emb: Any = base64.b64encode(struct.pack(f"<{dims}f", *vec)).decode() if b64 else vec
            data.append({"object": "embedding", "index": i, "embedding": emb})
        usage = {"prompt_tokens": rec.tokens["input_tokens"], "total_tokens": rec.tokens["input_tokens"]}
        model = rec.model_reported or "text-embedding-3-small"
        self._send_json(rec, 200, {"object": "list", "data": data, "model": model, "usage": usage}, usage=usage)

    def _ep_openai_models(self, rec: RecordedRequest) -> None:
        data = [{"id": m, "object": "model", "created": 1686935002, "owned_by": "system"} for m in OPENAI_MODELS]
        self._send_json(rec, 200, {"object": "list", "data": data})

    def _ep_openai_model(self, rec: RecordedRequest) -> None:
        self._send_json(rec, 200, {"id": rec.model, "object": "model", "created": 1686935002, "owned_by": "system"})

    def _ep_openai_costs(self, rec: RecordedRequest) -> None:
        q = {k: v[-1] for k, v in rec.query_params.items()}
        now = int(time.time())
        start = int(q.get("start_time") or now - 7 * 86400)
        end = int(q.get("end_time") or now)
        limit = int(q.get("limit") or 7)
        buckets = []
        s = start - start % 86400
        while s < end and len(buckets) < limit:
            buckets.append({"object": "bucket", "start_time": s, "end_time": s + 86400, "results": []})
            s += 86400
        if not buckets:
            buckets.append({"object": "bucket", "start_time": start, "end_time": start + 86400, "results": []})
        usd = self.server.mock.costs["openai"]
        buckets[-1]["results"] = [{
            "object": "organization.costs.result",
            "amount": {"value": float(usd), "currency": "usd"},
            "line_item": None,
            "project_id": None,
        }]
        self._send_json(rec, 200, {"object": "page", "data": buckets, "has_more": False, "next_page": None})

    # ---- Anthropic

    def _ep_anthropic_messages(self, rec: RecordedRequest) -> None:
        sc, t = rec.scenario, rec.tokens
        pieces = content_pieces(sc.chunks)
        mid, model = f"msg_mock{rec.seq:06d}", rec.model_reported or "claude-sonnet-4-20250514"
        usage = anthropic_usage(t)
        message: dict[str, Any] = {
            "id": mid, "type": "message", "role": "assistant", "model": model,
            "content": [{"type": "text", "text": "".join(pieces)}],
            "stop_reason": "end_turn", "stop_sequence": None, "usage": usage,
        }
        if not rec.stream:
            self._send_json(rec, 200, message, usage=usage)
            return
        start_msg = {**message, "content": [], "stop_reason": None, "usage": anthropic_usage(t, output_tokens=1)}
        events = [
            _Event(_sse({"type": "message_start", "message": start_msg}, event="message_start")),
            _Event(_sse({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
                        event="content_block_start")),
            _Event(_sse({"type": "ping"}, event="ping")),
        ]
        events += [
            _Event(_sse({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": p}},
                        event="content_block_delta"), content=True)
            for p in pieces
        ]
        delta_usage = {"output_tokens": t["output_tokens"]}
        events += [
            _Event(_sse({"type": "content_block_stop", "index": 0}, event="content_block_stop")),
            _Event(_sse({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                         "usage": delta_usage}, event="message_delta"), final_usage=usage),
            _Event(_sse({"type": "message_stop"}, event="message_stop")),
        ]
        self._send_stream(rec, events)

    def _ep_anthropic_count_tokens(self, rec: RecordedRequest) -> None:
        self._send_json(rec, 200, {"input_tokens": rec.tokens["input_tokens"]})

    def _ep_anthropic_models(self, rec: RecordedRequest) -> None:
        data = [{"type": "model", "id": m, "display_name": m, "created_at": "2025-05-14T00:00:00Z"}
                for m in ANTHROPIC_MODELS]
        self._send_json(rec, 200, {"data": data, "has_more": False, "first_id": data[0]["id"],
                                   "last_id": data[-1]["id"]})

    def _ep_anthropic_cost_report(self, rec: RecordedRequest) -> None:
        q = {k: v[-1] for k, v in rec.query_params.items()}
        now = dt.datetime.now(dt.UTC)
        start = _parse_rfc3339(q.get("starting_at")) or now - dt.timedelta(days=7)
        end = _parse_rfc3339(q.get("ending_at")) or now
        limit = int(q.get("limit") or 7)
        day = start.replace(hour=0, minute=0, second=0, microsecond=0)
        buckets = []
        while day < end and len(buckets) < limit:
            nxt = day + dt.timedelta(days=1)
            buckets.append({"starting_at": _rfc3339(day), "ending_at": _rfc3339(nxt), "results": []})
            day = nxt
        if not buckets:
            buckets.append({"starting_at": _rfc3339(day), "ending_at": _rfc3339(day + dt.timedelta(days=1)),
                            "results": []})
        cents = self.server.mock.costs["anthropic"] * 100
        buckets[-1]["results"] = [{
            "currency": "USD", "amount": format(cents.normalize(), "f") if cents else "0",
            "workspace_id": None, "description": None, "cost_type": None, "context_window": None,
            "model": None, "service_tier": None, "token_type": None,
        }]
        self._send_json(rec, 200, {"data": buckets, "has_more": False, "next_page": None})

    # ---- Gemini

    def _gemini_response(self, rec: RecordedRequest, text: str, usage: dict[str, Any], final: bool) -> dict[str, Any]:
        cands = []
        for i in range(rec.n):  # candidateCount
            cand: dict[str, Any] = {"content": {"parts": [{"text": text}], "role": "model"}, "index": i}
            if final:
                cand["finishReason"] = "STOP"
            cands.append(cand)
        return {
            "candidates": cands, "usageMetadata": usage,
            "modelVersion": rec.model_reported or "gemini-2.0-flash", "responseId": f"mockresp{rec.seq:06d}",
        }

    def _ep_gemini_generate(self, rec: RecordedRequest) -> None:
        pieces = content_pieces(rec.scenario.chunks)
        usage = gemini_usage(rec.tokens)
        self._send_json(rec, 200, self._gemini_response(rec, "".join(pieces), usage, True), usage=usage)

    def _ep_gemini_stream_generate(self, rec: RecordedRequest) -> None:
        pieces = content_pieces(rec.scenario.chunks)
        t = rec.tokens
        n = len(pieces)
        objs = []
        for i, p in enumerate(pieces, 1):
            final = i == n
            # running totals; only the last chunk is complete
            u = gemini_usage(t) if final else gemini_usage(t, candidates=(t["output_tokens"] * i) // n)
            objs.append((self._gemini_response(rec, p, u, final), u if final else None))
        if rec.query_params.get("alt", [""])[-1] == "sse":
            events = [_Event(_sse(o, sep="\r\n"), content=True, final_usage=u) for o, u in objs]
            self._send_stream(rec, events)
        else:  # a JSON array, streamed element by element
            events = []
            for i, (o, u) in enumerate(objs):
                prefix = "[" if i == 0 else "\n,\r\n"
                events.append(_Event((prefix + json.dumps(o, indent=2)).encode(), content=True, final_usage=u))
            events.append(_Event(b"\n]"))
            self._send_stream(rec, events, content_type="application/json; charset=UTF-8")

    def _ep_gemini_count_tokens(self, rec: RecordedRequest) -> None:
        self._send_json(rec, 200, {"totalTokens": rec.tokens["input_tokens"]})


def _gzip(data: bytes) -> bytes:
    c = zlib.compressobj(6, zlib.DEFLATED, 31)
    return c.compress(data) + c.flush()


def _rfc3339(d: dt.datetime) -> str:
    return d.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_rfc3339(s: str | None) -> dt.datetime | None:
    if not s:
        return None
    d = dt.datetime.fromisoformat(s.replace("Z", "+00:00"))
    return d if d.tzinfo else d.replace(tzinfo=dt.UTC)


def _client_key(rec: RecordedRequest) -> str | None:
    auth = rec.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    for h in ("x-api-key", "api-key", "x-goog-api-key"):
        if rec.headers.get(h):
            return rec.headers[h]
    for proto in (rec.headers.get("sec-websocket-protocol") or "").split(","):
        if proto.strip().startswith("openai-insecure-api-key."):  # browser Realtime clients
            return proto.strip()[len("openai-insecure-api-key."):]
    key = rec.query_params.get("key")
    return key[-1] if key else None


def _positive_int(v: Any) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else 1


def _answers_asked(rec: RecordedRequest, payload: dict[str, Any]) -> int:
    """How many answers the request bills for: ``n`` (and ``best_of``), or ``candidateCount``."""
    if rec.endpoint == "chat":
        return _positive_int(payload.get("n"))
    if rec.endpoint == "completions":
        return max(_positive_int(payload.get("n")), _positive_int(payload.get("best_of")))
    if rec.endpoint in ("generate", "stream_generate"):
        gc = payload.get("generationConfig") or payload.get("generation_config") or {}
        if isinstance(gc, dict):
            return _positive_int(gc.get("candidateCount", gc.get("candidate_count")))
    return 1


_GEMINI_RE = re.compile(r"^/(?:v1beta|v1|v1alpha)/(?:models|tunedModels)/([^/:]+):(\w+)$")
_AZURE_RE = re.compile(r"^/openai/deployments/([^/]+)(/.*)$")
_GEMINI_METHODS = {"generateContent": "generate", "streamGenerateContent": "stream_generate",
                   "countTokens": "count_tokens"}


def _route(rec: RecordedRequest) -> None:
    """Sets rec.provider / endpoint / model / deployment / stream from method + path (+ host)."""
    p, m = rec.path, rec.method
    host = rec.host.split(":")[0].lower()
    if m == "GET" and mock_ws.is_upgrade(rec.headers):
        mock_ws.route(rec)
        return
    if m == "GET" and p == "/v1/organization/costs":
        rec.provider, rec.endpoint = "openai", "costs"
        return
    if m == "GET" and p == "/v1/organizations/cost_report":
        rec.provider, rec.endpoint = "anthropic", "cost_report"
        return
    g = _GEMINI_RE.match(p)
    if g and m == "POST" and g.group(2) in _GEMINI_METHODS:
        rec.provider, rec.endpoint, rec.model = "gemini", _GEMINI_METHODS[g.group(2)], g.group(1)
        rec.stream = rec.endpoint == "stream_generate"
        return
    is_anthropic = "anthropic" in host or "anthropic-version" in rec.headers or p.startswith("/v1/messages")
    if is_anthropic:
        rec.provider = "anthropic"
        if m == "POST" and p == "/v1/messages":
            rec.endpoint = "messages"
        elif m == "POST" and p == "/v1/messages/count_tokens":
            rec.endpoint = "count_tokens"
        elif m == "GET" and p == "/v1/models":
            rec.endpoint = "models"
        return
    if "googleapis" in host or p.startswith("/v1beta/") and not p.endswith(("/chat/completions", "/embeddings")):
        rec.provider = "gemini"
        return
    rec.provider = "openai"
    a = _AZURE_RE.match(p)
    if a:
        rec.deployment, p = a.group(1), a.group(2)
        rec.model = rec.deployment
    if m == "POST":
        for suffix, ep in (("/chat/completions", "chat"), ("/responses", "responses"),
                           ("/completions", "completions"), ("/embeddings", "embeddings"),
                           *mock_media.POST_SUFFIXES):
            if p.endswith(suffix):
                rec.endpoint = ep
                return
    elif m == "GET":
        ep = mock_media.get_endpoint(p)
        if ep:
            rec.endpoint = ep
            return
        if p.endswith("/models"):
            rec.endpoint = "models"
            return
        mm = re.search(r"/models/([^/]+)$", p)
        if mm:
            rec.endpoint, rec.model = "model", mm.group(1)


_MODEL_ENDPOINTS = {"chat", "responses", "completions", "embeddings", "messages", "generate", "stream_generate",
                    "count_tokens", "models", "model", "unknown"}


# --------------------------------------------------------------------------- public API


class MockProvider:
    """In-process HTTPS mock of OpenAI, Anthropic and Gemini.

    HTTP requests land in ``requests`` (:class:`RecordedRequest`); WebSocket upgrades too (their
    101 / refusal), and each socket in ``ws_sessions`` (:class:`mock_ws.RecordedWsSession`: the
    upgrade headers, every message in and out, one :class:`mock_ws.WsCall` per model response).
    A socket's calls take their scenario from the message (``metadata.mock_scenario``), else the
    upgrade's ``x-mock-scenario``, else ``set_next`` (matched on the socket's path), else the default.

    Args:
        host: address to bind (default 127.0.0.1).
        port: port to bind (0: any free port).
        tls: serve HTTPS with a fresh self-signed certificate (default) or plain HTTP.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, tls: bool = True) -> None:
        self.host = host
        self._want_port = port
        self.tls = tls
        self.requests: list[RecordedRequest] = []
        self.ws_sessions: list[mock_ws.RecordedWsSession] = []  # every WebSocket upgrade, in order
        self.ws_deflate = True  # negotiate permessage-deflate when a client offers it
        self.files: dict[str, dict[str, Any]] = {}  # POST /v1/files uploads: id -> FileObject + "content"
        self.batches: dict[str, dict[str, Any]] = {}
        self.fine_tuning_jobs: dict[str, dict[str, Any]] = {}
        self.expected_keys: dict[str, str] = {}  # provider -> upstream key; others get 401
        self.costs: dict[str, Decimal] = {"openai": Decimal("0"), "anthropic": Decimal("0")}
        self._lock = threading.Condition()
        self._seq = 0
        self._ws_seq = 0
        self._default = Scenario()
        self._next: deque[tuple[Scenario, str | None]] = deque()
        self._stopping = threading.Event()
        self._conns: set[Any] = set()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self.cert_path: Path | None = None
        self.key_path: Path | None = None
        self.port = 0

    # ---- lifecycle

    def start(self) -> MockProvider:
        ctx = None
        if self.tls:
            self._tmp = tempfile.TemporaryDirectory(prefix="mock-provider-")
            self.cert_path, self.key_path = generate_cert(Path(self._tmp.name))
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(self.cert_path, self.key_path)
            ctx.set_alpn_protocols(["http/1.1"])
            # No TLS 1.3 session tickets: with them, a client that reads and writes its TLS socket from two
            # threads at once (websockets' sync client) now and then lost the request it wrote.
            ctx.num_tickets = 0
        self._stopping.clear()
        self._server = _Server((self.host, self._want_port), self, ctx)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name=f"mock-provider-{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            with self._lock:
                conns = list(self._conns)
            for c in conns:
                try:
                    c.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> MockProvider:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    # ---- scenario control

    def set_default(self, scenario: str | Scenario = "ok", **params: Any) -> None:
        """Scenario for every request without a header or a queued ``set_next``."""
        with self._lock:
            self._default = Scenario.parse(scenario, **params)

    def set_next(self, scenario: str | Scenario = "ok", *, match: str | None = None, **params: Any) -> None:
        """Queue a scenario for the next model request (FIFO; repeated calls queue more).

        Args:
            match: only a request whose path contains this substring (or matches this glob,
                if it has ``*``) consumes it. Cost-report requests never consume the queue.
        """
        with self._lock:
            self._next.append((Scenario.parse(scenario, **params), match))

    def set_costs(self, openai_usd: Any = None, anthropic_usd: Any = None) -> None:
        """Amounts the provider cost endpoints report (sum over the returned buckets)."""
        with self._lock:
            if openai_usd is not None:
                self.costs["openai"] = Decimal(str(openai_usd))
            if anthropic_usd is not None:
                self.costs["anthropic"] = Decimal(str(anthropic_usd))

    def expect_key(self, provider: str, key: str | None) -> None:
        """Answer 401 (provider-shaped) to requests for ``provider`` not carrying ``key``."""
        with self._lock:
            if key is None:
                self.expected_keys.pop(provider, None)
            else:
                self.expected_keys[provider] = key

    def reset(self) -> None:
        """Forget requests, scenarios, expected keys and costs."""
        with self._lock:
            self.requests.clear()
            self.ws_sessions.clear()
            self.files.clear()
            self.batches.clear()
            self.fine_tuning_jobs.clear()
            self.ws_deflate = True
            self._default = Scenario()
            self._next.clear()
            self.expected_keys.clear()
            self.costs = {"openai": Decimal("0"), "anthropic": Decimal("0")}

    def clear(self) -> None:
        """Forget recorded requests (and WebSocket sessions)."""
        with self._lock:
            self.requests.clear()
            self.ws_sessions.clear()

    def _scenario_for(self, rec: RecordedRequest) -> Scenario:
        header = rec.headers.get(SCENARIO_HEADER)
        if header:
            return Scenario.parse(header)
        if rec.endpoint in ("costs", "cost_report") or rec.endpoint in mock_ws.WS_ENDPOINTS:
            with self._lock:
                return dataclasses.replace(self._default)
        return self._take_scenario(rec.path)

    def _take_scenario(self, path: str) -> Scenario:
        """The first queued ``set_next`` matching ``path`` (consumed), else the default."""
        with self._lock:
            for i, (sc, match) in enumerate(self._next):
                if match is None or (fnmatch.fnmatch(path, match) if "*" in match else match in path):
                    del self._next[i]
                    return dataclasses.replace(sc)
            return dataclasses.replace(self._default)

    def _scenario_for_ws(self, sess: mock_ws.RecordedWsSession, override: str | None = None) -> Scenario:
        """Scenario of one model call on a socket: the message's own ``metadata.mock_scenario``,
        else the upgrade's ``x-mock-scenario``, else the next ``set_next`` matching the path,
        else the default. (The upgrade itself never consumes ``set_next``.)"""
        if override:
            return Scenario.parse(override)
        if sess.scenario_header:
            return Scenario.parse(sess.scenario_header)
        return self._take_scenario(sess.path)

    # ---- records

    def _record(self, rec: RecordedRequest) -> None:
        with self._lock:
            self._seq += 1
            rec.seq = self._seq
            self.requests.append(rec)
            self._lock.notify_all()

    def _record_ws(self, sess: mock_ws.RecordedWsSession) -> None:
        with self._lock:
            self._ws_seq += 1
            sess.seq = self._ws_seq
            self.ws_sessions.append(sess)
            self._lock.notify_all()

    def wait_for_ws(self, n: int = 1, timeout: float = 5.0, closed: bool = False) -> list[mock_ws.RecordedWsSession]:
        """Wait until at least ``n`` WebSocket upgrades arrived (and, with ``closed``, ended)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while len(self.ws_sessions) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"mock saw {len(self.ws_sessions)} WebSocket session(s), wanted {n}")
                self._lock.wait(left)
            snapshot = list(self.ws_sessions)
        if closed:
            for sess in snapshot[:n]:
                sess.wait_closed(max(0.0, deadline - time.monotonic()))
        return snapshot

    @property
    def last_ws(self) -> mock_ws.RecordedWsSession:
        with self._lock:
            if not self.ws_sessions:
                raise AssertionError("the mock received no WebSocket upgrade")
            return self.ws_sessions[-1]

    def find_ws(self, *, endpoint: str | None = None, path: str | None = None) -> list[mock_ws.RecordedWsSession]:
        with self._lock:
            return [s for s in self.ws_sessions
                    if (endpoint is None or s.endpoint == endpoint) and (path is None or path in s.path)]

    def _track(self, conn: Any, add: bool) -> None:
        with self._lock:
            (self._conns.add if add else self._conns.discard)(conn)

    def wait_for(self, n: int = 1, timeout: float = 5.0, finished: bool = True) -> list[RecordedRequest]:
        """Wait until at least ``n`` requests arrived (and, by default, were fully answered).

        Returns a snapshot of ``requests``; raises ``TimeoutError`` with what was seen.
        """
        deadline = time.monotonic() + timeout
        with self._lock:
            while len(self.requests) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"mock saw {len(self.requests)} request(s), wanted {n}: "
                                       f"{[(r.method, r.path) for r in self.requests]}")
                self._lock.wait(left)
            snapshot = list(self.requests)
        if finished:
            for r in snapshot[:n]:
                if not r.finished.wait(max(0.0, deadline - time.monotonic())):
                    raise TimeoutError(f"request #{r.seq} {r.method} {r.path} not finished")
        return snapshot

    @property
    def last(self) -> RecordedRequest:
        with self._lock:
            if not self.requests:
                raise AssertionError("the mock received no request")
            return self.requests[-1]

    def find(self, *, provider: str | None = None, endpoint: str | None = None,
             path: str | None = None) -> list[RecordedRequest]:
        with self._lock:
            return [r for r in self.requests
                    if (provider is None or r.provider == provider)
                    and (endpoint is None or r.endpoint == endpoint)
                    and (path is None or path in r.path)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.rig.mock_provider", description=__doc__.split("\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--no-tls", action="store_true", help="plain HTTP (benchmarks)")
    ap.add_argument("--scenario", default=None, help='default scenario, e.g. "slow; delay_ms=20"')
    ap.add_argument("--keep-records", action="store_true", help="keep request records (default: drop them)")
    args = ap.parse_args(argv)
    mock = MockProvider(args.host, args.port, tls=not args.no_tls).start()
    if args.scenario:
        mock.set_default(args.scenario)
    if not args.keep_records:  # a long benchmark must not grow memory without bound
        orig = mock._record

        def _record(rec: RecordedRequest) -> None:
            orig(rec)
            with mock._lock:
                if len(mock.requests) > 1000:
                    del mock.requests[:500]
        mock._record = _record  # type: ignore[method-assign]
        orig_ws = mock._record_ws

        def _record_ws(sess: mock_ws.RecordedWsSession) -> None:
            orig_ws(sess)
            with mock._lock:
                if len(mock.ws_sessions) > 200:
                    del mock.ws_sessions[:100]
        mock._record_ws = _record_ws  # type: ignore[method-assign]
    print(mock.port, flush=True)
    print(f"mock provider at {mock.url} cert={mock.cert_path}", file=sys.stderr, flush=True)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: done.set())
    signal.signal(signal.SIGINT, lambda *a: done.set())
    while not done.wait(0.5):
        pass
    mock.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
