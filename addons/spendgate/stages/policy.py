"""Stage: what the request is and whether this key may make it (size, body, model)."""

from __future__ import annotations

import asyncio
from typing import Any

from mitmproxy import http

from spendgate.providers import endpoint_kind_for, request_facts, unmetered
from spendgate.providers.wire import EndpointKind, Upload
from spendgate.stages.bodies import BodyError, decode, decoded_size, parse_form, parse_json_object
from spendgate.stages.call import OFF_LOOP_BYTES, Outcome, get_call, refuse

_Read = tuple[dict[str, Any] | None, list[Upload], int]


def _read(raw: bytes, encoding: str | None, limit: int, want: str | None) -> _Read:
    """The body, decoded within `limit`: a JSON object (`want="json"`), a form's fields and files
    (a multipart content type), else only measured; and its decoded size. Raises BodyError."""
    if want is None:
        return None, [], decoded_size(raw, encoding, limit)
    plain = decode(raw, encoding, limit)
    if want == "json":
        return parse_json_object(plain), [], len(plain)
    fields, uploads = parse_form(plain, want)
    return dict(fields), uploads, len(plain)


def _wanted(kind: EndpointKind, method: str, content_type: str) -> str | None:
    """What of the body the gateway reads: JSON for what it meters, a form's fields for uploads.
    A GET has no body (a WebSocket upgrade: its messages are metered one by one)."""
    if not kind.metered or method.upper() != "POST":
        return None
    if content_type.lower().startswith("multipart/form-data"):
        return content_type
    return "json"


class Policy:
    def __init__(self, max_request_bytes: int) -> None:
        self.max_request_bytes = max_request_bytes

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        call = get_call(flow)
        if call is None or flow.response is not None:
            return
        limit = self.max_request_bytes
        length = flow.request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            # Refused at the headers: the edge answers before the body is uploaded.
            refuse(flow, call, 413, "spendgate_request_too_large",
                   f"Request body is {length} bytes; this gateway accepts at most {limit} ([proxy] max_request_bytes).",
                   Outcome.BLOCKED_POLICY)

    async def request(self, flow: http.HTTPFlow) -> None:
        call = get_call(flow)
        if call is None or flow.response is not None:
            return
        content = flow.request.raw_content or b""
        call.request_bytes = len(content)
        path, method = flow.request.path, flow.request.method
        spec = call.provider.spec
        kind = endpoint_kind_for(spec.family, method, path)
        call.endpoint_kind = kind
        call.unmetered = unmetered(spec, method, path)
        limit = self.max_request_bytes
        encoding = flow.request.headers.get("content-encoding")
        want = _wanted(kind, method, flow.request.headers.get("content-type", ""))
        body: dict[str, Any] | None
        uploads: list[Upload]
        size: int
        try:
            if encoding is None and want is None:
                body, uploads, size = None, [], len(content)  # nothing to decode or parse; the edge bounded it
            elif len(content) > OFF_LOOP_BYTES:
                # A large body (up to max_request_bytes) would stall every other request while it parses.
                body, uploads, size = await asyncio.to_thread(_read, content, encoding, limit, want)
            else:
                body, uploads, size = _read(content, encoding, limit, want)
        except BodyError as e:
            refuse(flow, call, e.status, e.code, str(e), Outcome.BLOCKED_POLICY)
            return
        call.body = body
        call.body_bytes = size
        call.uploads = tuple(uploads)
        facts = request_facts(spec, kind, body, path)
        model = facts.model
        call.model_requested = model
        call.stream = facts.stream
        call.max_output_tokens = facts.max_output_tokens
        call.choices = facts.choices
        call.thinking_budget = facts.thinking_budget
        key = call.key
        if key is not None and not key.model_allowed(model):
            refuse(flow, call, 403, "spendgate_model_not_allowed",
                   f"Model {model!r} is not allowed for key {key.key_id} (allowed: {', '.join(key.allowed_models)}).",
                   Outcome.BLOCKED_POLICY)
