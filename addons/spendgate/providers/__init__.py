"""What the gateway knows about each provider, and the one place provider differences live.

A provider is a row of `BUILTIN_PROVIDERS` (hosts, where its key goes, its wire family, its
genai-prices id, whether its path names the model). Each wire family's JSON (endpoint kind,
request facts, prompt, usage, stream events) is read by its adapter (`openai`, `anthropic`,
`gemini`; interface in `base`). Adding an OpenAI-compatible provider is one row here. Pure: no I/O.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal
from urllib.parse import unquote

from spendgate.providers import anthropic, gemini, openai
from spendgate.providers.base import Prompt, WireAdapter
from spendgate.providers.wire import EndpointKind, Family, RequestFacts, Usage

UpstreamAuth = Literal["bearer", "x-api-key", "api-key", "x-goog-api-key"]

_AZURE_DEPLOYMENT = re.compile(r"/openai/deployments/([^/]+)/")


@dataclass(frozen=True)
class ProviderSpec:
    name: str
    family: Family  # wire format; the OpenAI-compatible providers speak OPENAI
    hosts: tuple[str, ...]  # default hosts, globs allowed
    upstream_auth: UpstreamAuth
    default_key_env: str
    genai_prices_id: str
    model_in_path: re.Pattern[str] | None = None  # the path names the model (Azure deployments)
    chat_limit_field: str = "max_tokens"  # the output limit the gateway inserts into a chat completion


BUILTIN_PROVIDERS: dict[str, ProviderSpec] = {
    p.name: p
    for p in (
        ProviderSpec("openai", Family.OPENAI, ("api.openai.com",), "bearer", "OPENAI_API_KEY", "openai",
                     chat_limit_field="max_completion_tokens"),
        ProviderSpec("anthropic", Family.ANTHROPIC, ("api.anthropic.com",), "x-api-key", "ANTHROPIC_API_KEY",
                     "anthropic"),
        ProviderSpec("gemini", Family.GEMINI, ("generativelanguage.googleapis.com",), "x-goog-api-key",
                     "GEMINI_API_KEY",
                     "google"),
        ProviderSpec("azure", Family.OPENAI, ("*.openai.azure.com",), "api-key", "AZURE_OPENAI_API_KEY", "azure",
                     _AZURE_DEPLOYMENT, chat_limit_field="max_completion_tokens"),
        ProviderSpec("mistral", Family.OPENAI, ("api.mistral.ai",), "bearer", "MISTRAL_API_KEY", "mistral"),
        ProviderSpec("groq", Family.OPENAI, ("api.groq.com",), "bearer", "GROQ_API_KEY", "groq"),
        ProviderSpec("deepseek", Family.OPENAI, ("api.deepseek.com",), "bearer", "DEEPSEEK_API_KEY", "deepseek"),
        ProviderSpec("openrouter", Family.OPENAI, ("openrouter.ai",), "bearer", "OPENROUTER_API_KEY", "openrouter"),
        ProviderSpec("xai", Family.OPENAI, ("api.x.ai",), "bearer", "XAI_API_KEY", "x-ai"),
        ProviderSpec("together", Family.OPENAI, ("api.together.xyz", "api.together.ai"), "bearer", "TOGETHER_API_KEY",
                     "together"),
    )
}

_ADAPTERS: dict[Family, WireAdapter] = {
    Family.OPENAI: openai.ADAPTER,
    Family.ANTHROPIC: anthropic.ADAPTER,
    Family.GEMINI: gemini.ADAPTER,
}


def adapter_for(family: Family) -> WireAdapter:
    return _ADAPTERS[family]


def endpoint_kind_for(family: Family, method: str, path: str) -> EndpointKind:
    """What a request is, from its method and path. Only POSTs generate tokens; a GET of
    /v1/responses/{id} or of stored chat completions is OTHER."""
    return _ADAPTERS[family].endpoint_kind(method, path)


def request_facts(spec: ProviderSpec, kind: EndpointKind, body: Mapping[str, Any] | None, path: str) -> RequestFacts:
    """What the request asks for. Where the provider routes by path (Azure deployments), the
    path's model is the one that answers, whatever the body says."""
    facts = _ADAPTERS[spec.family].request_facts(kind, body if isinstance(body, Mapping) else {}, path)
    if spec.model_in_path is not None:
        m = spec.model_in_path.search(path.split("?", 1)[0])
        if m:
            facts = replace(facts, model=unquote(m.group(1)))
    return facts


def unmetered(spec: ProviderSpec, method: str, path: str) -> str | None:
    """The name of a billable request the gateway cannot price up front (see `WireAdapter.unmetered`)."""
    return _ADAPTERS[spec.family].unmetered(method, path)


def usage_from_json(family: Family, kind: EndpointKind, body: Mapping[str, Any]) -> Usage | None:
    """Usage from a non-streamed response body; None if it reports none."""
    if not isinstance(body, Mapping):
        return None
    return _ADAPTERS[family].usage_from_json(kind, body)


def prompt_of(family: Family, kind: EndpointKind, body: Mapping[str, Any]) -> Prompt | None:
    """The text, media and framing a request's prompt is billed for; None for endpoints without one."""
    return _ADAPTERS[family].prompt(kind, body) if isinstance(body, Mapping) else None


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
