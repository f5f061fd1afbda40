"""The per-request record every stage reads and writes (`flow.metadata["spendgate"]`)."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from mitmproxy import http

from spendgate.keys import KeyRecord
from spendgate.models import utcnow
from spendgate.providers import error_body
from spendgate.settings import ProviderSettings

META = "spendgate"
REQUEST_ID_HEADER = "x-spendgate-request-id"
OFF_LOOP_BYTES = 64 * 1024  # bodies larger than this are parsed / counted in a worker thread


def new_request_id() -> str:
    return "sgr_" + secrets.token_hex(12)


@dataclass
class Call:
    request_id: str
    provider: ProviderSettings
    host: str = ""  # as the client asked; the upstream override changes flow.request.host
    started_at: datetime = field(default_factory=utcnow)
    t0: float = field(default_factory=time.perf_counter)
    key: KeyRecord | None = None
    credential_source: str | None = None  # proxy | header | query
    byok_passthrough: bool = False
    byok_key: str | None = field(default=None, repr=False)  # the client's own provider key (BYOK keys only)
    endpoint_kind: str = "other"
    model_requested: str | None = None
    stream: bool = False
    max_output_tokens: int | None = None
    body: dict[str, Any] | None = None
    outcome: str | None = None
    status_code: int | None = None
    error: str | None = None
    request_bytes: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def family(self) -> str:
        return self.provider.spec.family

    @property
    def user(self) -> str | None:
        return self.key.user if self.key else None


def get_call(flow: http.HTTPFlow) -> Call | None:
    c = flow.metadata.get(META)
    return c if isinstance(c, Call) else None


def refuse(
    flow: http.HTTPFlow,
    call: Call,
    status: int,
    code: str,
    message: str,
    outcome: str,
    headers: dict[str, str] | None = None,
) -> None:
    """Answer the client ourselves, in the provider's error shape; nothing goes upstream.

    Refused at its headers, the request is answered before its body is read (see `edge`), so a
    client waiting for `100 Continue` must not get one.
    """
    call.outcome = outcome
    call.status_code = status
    call.error = code
    flow.request.headers.pop("expect", None)
    flow.response = refusal_response(call, status, code, message, headers)


def refusal_response(call: Call, status: int, code: str, message: str,
                     headers: dict[str, str] | None = None) -> http.Response:
    hdrs = {"content-type": "application/json", REQUEST_ID_HEADER: call.request_id}
    if headers:
        hdrs.update(headers)
    return http.Response.make(status, error_body(call.family, status, code, message), hdrs)


def plain_response(status: int, text: str, headers: dict[str, str] | None = None) -> http.Response:
    """For answers that belong to no provider (CONNECT, other hosts): short text, with a request id."""
    hdrs = {"content-type": "text/plain", REQUEST_ID_HEADER: new_request_id()}
    if headers:
        hdrs.update(headers)
    return http.Response.make(status, f"Spendgate: {text}\n".encode(), hdrs)
