"""Provider-shaped error bodies: the provider's own SDK shows the gateway's message as its error."""

from __future__ import annotations

import json

_OPENAI_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
    404: "not_found_error", 407: "authentication_error", 413: "invalid_request_error",
    429: "rate_limit_exceeded", 502: "api_error", 503: "api_error", 504: "api_error",
}
_ANTHROPIC_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
    404: "not_found_error", 407: "authentication_error", 413: "request_too_large",
    429: "rate_limit_error", 502: "api_error", 503: "overloaded_error", 504: "api_error",
}
_GEMINI_STATUS = {
    400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
    407: "UNAUTHENTICATED", 413: "INVALID_ARGUMENT", 429: "RESOURCE_EXHAUSTED",
    502: "UNAVAILABLE", 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED",
}


def error_body(family: str, status: int, code: str, message: str) -> bytes:  # family: a providers.wire.Family
    """A provider-shaped error, so that provider's SDK shows `message` to the developer."""
    if family == "anthropic":
        doc: dict[str, object] = {
            "type": "error",
            "error": {"type": _ANTHROPIC_TYPES.get(status, "api_error"), "message": message},
        }
    elif family == "gemini":
        doc = {"error": {"code": status, "message": message, "status": _GEMINI_STATUS.get(status, "UNKNOWN")}}
    else:
        doc = {
            "error": {
                "message": message,
                "type": _OPENAI_TYPES.get(status, "api_error"),
                "param": None,
                "code": code,
            }
        }
    return json.dumps(doc).encode()
