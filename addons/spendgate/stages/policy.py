"""Stage: what the request is and whether this key may make it (size, body, model)."""

from __future__ import annotations

import asyncio
from typing import Any

from mitmproxy import http

from spendgate.providers import endpoint_kind_for, request_facts
from spendgate.providers.wire import EndpointKind
from spendgate.stages.bodies import BodyError, decode, decoded_size, parse_json_object
from spendgate.stages.call import OFF_LOOP_BYTES, Outcome, get_call, refuse


def _read(raw: bytes, encoding: str | None, limit: int, want_json: bool) -> dict[str, Any] | None:
    """The JSON body, decoded within `limit`; a body that is not JSON is only measured. Raises BodyError."""
    if not want_json:
        decoded_size(raw, encoding, limit)
        return None
    return parse_json_object(decode(raw, encoding, limit))


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
        path = flow.request.path
        kind = endpoint_kind_for(call.provider.spec.family, flow.request.method, path)
        call.endpoint_kind = kind
        limit = self.max_request_bytes
        encoding = flow.request.headers.get("content-encoding")
        want_json = kind is not EndpointKind.OTHER
        try:
            if encoding is None and not want_json:
                body = None  # nothing to decode or parse; the edge already bounded the size
            elif len(content) > OFF_LOOP_BYTES:
                # A large body (up to max_request_bytes) would stall every other request while it parses.
                body = await asyncio.to_thread(_read, content, encoding, limit, want_json)
            else:
                body = _read(content, encoding, limit, want_json)
        except BodyError as e:
            refuse(flow, call, e.status, e.code, str(e), Outcome.BLOCKED_POLICY)
            return
        call.body = body
        facts = request_facts(call.provider.spec, kind, body, path)
        model = facts.model
        call.model_requested = model
        call.stream = facts.stream
        call.max_output_tokens = facts.max_output_tokens
        key = call.key
        if key is not None and not key.model_allowed(model):
            refuse(flow, call, 403, "spendgate_model_not_allowed",
                   f"Model {model!r} is not allowed for key {key.key_id} (allowed: {', '.join(key.allowed_models)}).",
                   Outcome.BLOCKED_POLICY)
