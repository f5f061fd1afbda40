"""What the gateway knows about each provider: hosts, where keys sit, error shapes.

Pure data and functions, no I/O. Each wire family's JSON (endpoint kind, request facts, usage,
stream events) is read by its adapter module here (openai, anthropic, gemini; interface in
`base`), dispatched from `spendgate.usage`.
"""

from __future__ import annotations

import fnmatch
import json
import re
from dataclasses import dataclass
from typing import Literal

FamilyName = Literal["openai", "anthropic", "gemini"]
UpstreamAuth = Literal["bearer", "x-api-key", "api-key", "x-goog-api-key"]


@dataclass(frozen=True)
class ProviderSpec:
    name: str
    family: FamilyName  # wire format; the OpenAI-compatible providers speak "openai"
    hosts: tuple[str, ...]  # default hosts, globs allowed
    upstream_auth: UpstreamAuth
    default_key_env: str
    genai_prices_id: str


BUILTIN_PROVIDERS: dict[str, ProviderSpec] = {
    p.name: p
    for p in (
        ProviderSpec("openai", "openai", ("api.openai.com",), "bearer", "OPENAI_API_KEY", "openai"),
        ProviderSpec("anthropic", "anthropic", ("api.anthropic.com",), "x-api-key", "ANTHROPIC_API_KEY", "anthropic"),
        ProviderSpec("gemini", "gemini", ("generativelanguage.googleapis.com",), "x-goog-api-key", "GEMINI_API_KEY", "google"),
        ProviderSpec("azure", "openai", ("*.openai.azure.com",), "api-key", "AZURE_OPENAI_API_KEY", "azure"),
        ProviderSpec("mistral", "openai", ("api.mistral.ai",), "bearer", "MISTRAL_API_KEY", "mistral"),
        ProviderSpec("groq", "openai", ("api.groq.com",), "bearer", "GROQ_API_KEY", "groq"),
        ProviderSpec("deepseek", "openai", ("api.deepseek.com",), "bearer", "DEEPSEEK_API_KEY", "deepseek"),
        ProviderSpec("openrouter", "openai", ("openrouter.ai",), "bearer", "OPENROUTER_API_KEY", "openrouter"),
        ProviderSpec("xai", "openai", ("api.x.ai",), "bearer", "XAI_API_KEY", "x-ai"),
        ProviderSpec("together", "openai", ("api.together.xyz", "api.together.ai"), "bearer", "TOGETHER_API_KEY", "together"),
    )
}

# Where SDKs put an API key. All are read and all are removed, whatever the provider.
KEY_HEADERS = ("authorization", "x-api-key", "api-key", "x-goog-api-key")
KEY_QUERY_PARAMS = ("key",)

# Shapes of real provider keys, to tell "your own provider key" from garbage.
_FOREIGN_KEY = re.compile(
    r"^(sk-[A-Za-z0-9_\-]{16,}|sk-ant-[A-Za-z0-9_\-]{16,}|AIza[A-Za-z0-9_\-]{20,}|gsk_[A-Za-z0-9]{20,}|xai-[A-Za-z0-9]{20,}|[0-9a-f]{32})$"
)


def looks_like_provider_key(value: str) -> bool:
    return bool(_FOREIGN_KEY.match(value))


class HostMatcher:
    """Maps a request host to a configured provider name (exact names first, then globs)."""

    def __init__(self, hosts: dict[str, str]) -> None:
        self._exact = {h: n for h, n in hosts.items() if not any(c in h for c in "*?[")}
        self._globs = [(h, n) for h, n in hosts.items() if h not in self._exact]

    def match(self, host: str) -> str | None:
        host = host.lower().rstrip(".")
        found = self._exact.get(host)
        if found is not None:
            return found
        for pattern, name in self._globs:
            if fnmatch.fnmatchcase(host, pattern):
                return name
        return None


def strip_bearer(value: str) -> str:
    scheme, _, rest = value.partition(" ")
    if scheme.lower() == "bearer" and rest:
        return rest.strip()
    return value.strip()


def upstream_auth_headers(spec: ProviderSpec, key: str) -> tuple[str, str]:
    if spec.upstream_auth == "bearer":
        return "authorization", f"Bearer {key}"
    return spec.upstream_auth, key


# -- error shapes ----------------------------------------------------------------

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


def error_body(family: str, status: int, code: str, message: str) -> bytes:
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
