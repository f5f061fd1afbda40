"""Stage 2: what the request is and whether this key may make it (size, body, model)."""

from __future__ import annotations

import asyncio
import json
import time
import re
from typing import Any

from mitmproxy import http

from spendgate.call import OFF_LOOP_BYTES, get_call, refuse
from spendgate.runtime import Runtime
from spendgate.usage import EndpointKind, Family, endpoint_kind_for, request_facts

_AZURE_DEPLOYMENT = re.compile(r"/openai/deployments/([^/]+)/")


def _parse_json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None


class Policy:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        call = get_call(flow)
        if call is None or flow.response is not None:
            return
        limit = self.rt.settings.proxy.max_request_bytes
        length = flow.request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            refuse(flow, call, 413, "spendgate_request_too_large",
                   f"Request body is {length} bytes; this gateway accepts at most {limit}.", "blocked_policy")

    async def request(self, flow: http.HTTPFlow) -> None:
        call = get_call(flow)
        if call is None or flow.response is not None:
            return
        call.extra["t_req0"] = time.perf_counter()
        content = flow.request.raw_content or b""
        call.request_bytes = len(content)
        if len(content) > self.rt.settings.proxy.max_request_bytes:
            refuse(flow, call, 413, "spendgate_request_too_large",
                   f"Request body is {len(content)} bytes; this gateway accepts at most "
                   f"{self.rt.settings.proxy.max_request_bytes}.", "blocked_policy")
            return
        family = Family(call.family)
        path = flow.request.path
        kind = endpoint_kind_for(family, flow.request.method, path)
        call.endpoint_kind = kind.value
        body: dict[str, Any] | None = None
        if kind is not EndpointKind.OTHER:
            raw = flow.request.get_content(strict=False) or b""
            # A large body (up to max_request_bytes) would stall every other request while it parses.
            parsed = await asyncio.to_thread(_parse_json, raw) if len(raw) > OFF_LOOP_BYTES else _parse_json(raw)
            if not isinstance(parsed, dict):
                refuse(flow, call, 400, "spendgate_invalid_json",
                       "The request body is not a JSON object; nothing was sent to the provider.", "blocked_policy")
                return
            body = parsed
        call.body = body
        facts = request_facts(family, kind, body, path)
        model = facts.model
        if model is None and call.provider.name == "azure":
            m = _AZURE_DEPLOYMENT.search(path)
            model = m.group(1) if m else None
        call.model_requested = model
        call.stream = facts.stream
        call.max_output_tokens = facts.max_output_tokens
        key = call.key
        if key is not None and not key.model_allowed(model):
            refuse(flow, call, 403, "spendgate_model_not_allowed",
                   f"Model {model!r} is not allowed for key {key.key_id} (allowed: {', '.join(key.allowed_models)}).",
                   "blocked_policy")
