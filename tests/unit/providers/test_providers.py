"""spendgate.providers: the provider table, host matching, request facts (Azure's model in the path),
key placement (`credentials`), provider-shaped errors (`errors`), foreign keys.

Pure functions, plus the real openai / anthropic SDKs fed an error body through an in-memory
transport, to show each SDK surfaces the gateway's message.
"""

from __future__ import annotations

import json

import anthropic
import httpx2
import openai
import pytest
from genai_prices.data_snapshot import get_snapshot

from spendgate.providers import BUILTIN_PROVIDERS, HostMatcher, request_facts
from spendgate.providers.credentials import (
    KEY_HEADERS,
    KEY_QUERY_PARAMS,
    looks_like_provider_key,
    strip_bearer,
    upstream_auth_headers,
)
from spendgate.providers.errors import error_body
from spendgate.providers.wire import EndpointKind, RequestFacts

# Never write a full provider-key-shaped literal into a file: a leak scanner reads the source.
SK = "sk-"
OPENAI_LIKE = SK + "proj" + "A" * 20
ANTHROPIC_LIKE = SK + "ant-" + "api03" + "b" * 20
GOOGLE_LIKE = "AI" + "za" + "Sy" + "C" * 30
GROQ_LIKE = "gs" + "k_" + "D" * 40
XAI_LIKE = "xa" + "i-" + "E" * 40
HEX32 = "0123456789abcdef" * 2


def all_hosts() -> dict[str, str]:
    return {h: name for name, spec in BUILTIN_PROVIDERS.items() for h in spec.hosts}


# -- hosts --------------------------------------------------------------------


def test_builtin_provider_table() -> None:
    assert set(BUILTIN_PROVIDERS) == {
        "openai", "anthropic", "gemini", "azure", "mistral", "groq", "deepseek", "openrouter", "xai", "together",
    }
    assert BUILTIN_PROVIDERS["azure"].hosts == ("*.openai.azure.com",)
    fams = {n: s.family for n, s in BUILTIN_PROVIDERS.items()}
    assert fams["anthropic"] == "anthropic" and fams["gemini"] == "gemini"
    assert {n for n, f in fams.items() if f == "openai"} == set(BUILTIN_PROVIDERS) - {"anthropic", "gemini"}
    # Only Azure names the model in the path (its deployment).
    assert {n for n, s in BUILTIN_PROVIDERS.items() if s.model_in_path is not None} == {"azure"}


def test_every_provider_is_priced_under_an_id_genai_prices_knows() -> None:
    known = {p.id for p in get_snapshot().providers}
    ids = {n: s.genai_prices_id for n, s in BUILTIN_PROVIDERS.items()}
    assert set(ids.values()) <= known, set(ids.values()) - known
    assert ids["gemini"] == "google" and ids["xai"] == "x-ai"  # the two whose names differ


# -- request facts: the model in the path ---------------------------------------


@pytest.mark.parametrize(
    ("provider", "path", "body", "facts"),
    [
        ("azure", "/openai/deployments/gpt4o-prod/chat/completions?api-version=2024-10-21",
         {"messages": [], "stream": True, "max_tokens": 50}, RequestFacts("gpt4o-prod", True, 50)),
        ("azure", "/openai/deployments/emb-small/embeddings", {"input": "x"}, RequestFacts("emb-small", False, None)),
        # The deployment answers, whatever the body says: the path wins (a body naming an allowed
        # model must not get a disallowed deployment past the allow-list).
        ("azure", "/openai/deployments/prod/chat/completions", {"model": "gpt-4o"},
         RequestFacts("prod", False, None)),
        ("azure", "/openai/deployments/gpt%2D4o/chat/completions", {}, RequestFacts("gpt-4o", False, None)),
        ("azure", "/openai/v1/chat/completions", {"messages": []}, RequestFacts(None, False, None)),  # no deployment
        ("azure", "/openai/deployments/d/chat/completions", None, RequestFacts("d", False, None)),
        # The query is not part of the path: a deployment named there is not the model.
        ("azure", "/openai/chat/completions?x=/openai/deployments/evil/", {}, RequestFacts(None, False, None)),
        # OpenAI itself has no such rule: the same path names no model.
        ("openai", "/openai/deployments/gpt4o-prod/chat/completions", {}, RequestFacts(None, False, None)),
    ],
)
def test_request_facts_model_in_path(provider: str, path: str, body: dict[str, object] | None,
                                     facts: RequestFacts) -> None:
    assert request_facts(BUILTIN_PROVIDERS[provider], EndpointKind.CHAT, body, path) == facts


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("api.openai.com", "openai"),
        ("API.OpenAI.com", "openai"),
        ("api.openai.com.", "openai"),  # fully-qualified form
        ("api.anthropic.com", "anthropic"),
        ("generativelanguage.googleapis.com", "gemini"),
        ("my-resource.openai.azure.com", "azure"),
        ("EastUS-Prod.openai.azure.com", "azure"),
        ("a.b.openai.azure.com", "azure"),  # fnmatch's * spans dots; still under the azure domain
        ("openai.azure.com", None),  # the glob needs a resource label
        ("evil-openai.azure.com", None),
        ("openai.azure.com.evil.example", None),
        ("api.mistral.ai", "mistral"),
        ("api.groq.com", "groq"),
        ("api.deepseek.com", "deepseek"),
        ("openrouter.ai", "openrouter"),
        ("api.x.ai", "xai"),
        ("api.together.xyz", "together"),
        ("api.together.ai", "together"),
        ("api.openai.com.evil.example", None),
        ("xapi.openai.com", None),
        ("openai.com", None),
        ("example.com", None),
        ("127.0.0.1", None),
        ("", None),
    ],
)
def test_host_matcher(host: str, expected: str | None) -> None:
    assert HostMatcher(all_hosts()).match(host) == expected


def test_host_matcher_prefers_exact_names_over_globs() -> None:
    m = HostMatcher({"*.example.com": "glob", "api.example.com": "exact"})
    assert m.match("api.example.com") == "exact"
    assert m.match("other.example.com") == "glob"


def test_host_matcher_custom_hosts() -> None:
    m = HostMatcher({"llm.internal.example": "openai", "*.proxy.example": "anthropic"})
    assert m.match("llm.internal.example") == "openai"
    assert m.match("eu.proxy.example") == "anthropic"
    assert m.match("api.openai.com") is None  # only what is configured


# -- key placement ------------------------------------------------------------


@pytest.mark.parametrize(
    ("provider", "header", "value"),
    [
        ("openai", "authorization", "Bearer K"),
        ("anthropic", "x-api-key", "K"),
        ("gemini", "x-goog-api-key", "K"),
        ("azure", "api-key", "K"),
        ("mistral", "authorization", "Bearer K"),
        ("groq", "authorization", "Bearer K"),
        ("deepseek", "authorization", "Bearer K"),
        ("openrouter", "authorization", "Bearer K"),
        ("xai", "authorization", "Bearer K"),
        ("together", "authorization", "Bearer K"),
    ],
)
def test_upstream_auth_headers(provider: str, header: str, value: str) -> None:
    assert upstream_auth_headers(BUILTIN_PROVIDERS[provider], "K") == (header, value)
    assert header in KEY_HEADERS  # whatever the gateway sets, it also strips from clients


def test_every_sdk_key_slot_is_stripped() -> None:
    assert set(KEY_HEADERS) == {"authorization", "x-api-key", "api-key", "x-goog-api-key"}
    assert KEY_QUERY_PARAMS == ("key",)  # Gemini's ?key=


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("Bearer abc", "abc"),
        ("bearer abc", "abc"),
        ("BEARER  abc ", "abc"),
        ("abc", "abc"),
        (" abc ", "abc"),
        ("Bearer", ""),  # `Authorization: Bearer $OPENAI_API_KEY` with the variable unset: no key
        ("Bearer ", ""),
        (" Bearer  ", ""),
        ("Basic abc", "Basic abc"),
    ],
)
def test_strip_bearer(value: str, expected: str) -> None:
    assert strip_bearer(value) == expected


# -- foreign keys -------------------------------------------------------------


@pytest.mark.parametrize("value", [OPENAI_LIKE, ANTHROPIC_LIKE, GOOGLE_LIKE, GROQ_LIKE, XAI_LIKE, HEX32,
                                   SK + "A" * 16, SK + "abc_DEF-123" + "x" * 10])
def test_looks_like_provider_key(value: str) -> None:
    assert looks_like_provider_key(value)


@pytest.mark.parametrize(
    "value",
    [
        "",
        "sg_abcd1234_" + "a" * 43,  # a gateway key is never "foreign"
        "unused",
        "Bearer " + OPENAI_LIKE,  # the caller strips the scheme first
        SK + "short",
        SK + "A" * 15,
        OPENAI_LIKE + " ",
        OPENAI_LIKE + "!",
        "AIza" + "short",
        HEX32[:-1],
        HEX32.upper(),
        "x" * 200,
    ],
)
def test_does_not_look_like_provider_key(value: str) -> None:
    assert not looks_like_provider_key(value)


# -- error shapes -------------------------------------------------------------

STATUSES = [400, 401, 403, 404, 407, 413, 429, 502, 503, 504, 418]


@pytest.mark.parametrize("status", STATUSES)
def test_openai_shape(status: int) -> None:
    doc = json.loads(error_body("openai", status, "spendgate_x", "the message"))
    assert set(doc) == {"error"}
    err = doc["error"]
    assert err["message"] == "the message" and err["code"] == "spendgate_x"
    assert isinstance(err["type"], str) and err["type"]
    assert "param" in err


@pytest.mark.parametrize("status", STATUSES)
def test_anthropic_shape(status: int) -> None:
    doc = json.loads(error_body("anthropic", status, "spendgate_x", "the message"))
    assert doc["type"] == "error"
    assert doc["error"]["message"] == "the message"
    assert isinstance(doc["error"]["type"], str) and doc["error"]["type"]


@pytest.mark.parametrize("status", STATUSES)
def test_gemini_shape(status: int) -> None:
    doc = json.loads(error_body("gemini", status, "spendgate_x", "the message"))
    err = doc["error"]
    assert err["code"] == status and isinstance(err["code"], int)
    assert err["message"] == "the message"
    assert isinstance(err["status"], str) and err["status"].isupper()


@pytest.mark.parametrize(
    ("status", "anthropic_type", "gemini_status"),
    [
        (401, "authentication_error", "UNAUTHENTICATED"),
        (403, "permission_error", "PERMISSION_DENIED"),
        (404, "not_found_error", "NOT_FOUND"),
        (413, "request_too_large", "INVALID_ARGUMENT"),
        (429, "rate_limit_error", "RESOURCE_EXHAUSTED"),
        (400, "invalid_request_error", "INVALID_ARGUMENT"),
    ],
)
def test_types_match_what_the_providers_send(status: int, anthropic_type: str, gemini_status: str) -> None:
    assert json.loads(error_body("anthropic", status, "c", "m"))["error"]["type"] == anthropic_type
    assert json.loads(error_body("gemini", status, "c", "m"))["error"]["status"] == gemini_status


def test_message_is_json_escaped() -> None:
    msg = 'model "gpt-4o" is not allowed\n<&>\u00e9'
    for fam in ("openai", "anthropic", "gemini"):
        doc = json.loads(error_body(fam, 403, "c", msg))
        assert doc["error"]["message"] == msg


def _transport(status: int, body: bytes) -> httpx2.MockTransport:
    return httpx2.MockTransport(
        lambda request: httpx2.Response(status, content=body, headers={"content-type": "application/json"})
    )


@pytest.mark.parametrize(
    ("status", "exc"),
    [
        (400, openai.BadRequestError),
        (401, openai.AuthenticationError),
        (403, openai.PermissionDeniedError),
        (413, openai.APIStatusError),
        (429, openai.RateLimitError),
        (503, openai.InternalServerError),
    ],
)
def test_openai_sdk_surfaces_the_message(status: int, exc: type[Exception]) -> None:
    body = error_body("openai", status, "spendgate_test_code", "Spendgate says no, and why.")
    client = openai.OpenAI(api_key="x", base_url="https://api.openai.com/v1", max_retries=0,
                           http_client=openai.DefaultHttpxClient(transport=_transport(status, body)))
    with pytest.raises(exc) as info:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    e = info.value
    assert isinstance(e, openai.APIStatusError) and e.status_code == status
    assert "Spendgate says no, and why." in str(e)
    assert e.code == "spendgate_test_code"


@pytest.mark.parametrize(
    ("status", "exc"),
    [
        (400, anthropic.BadRequestError),
        (401, anthropic.AuthenticationError),
        (403, anthropic.PermissionDeniedError),
        (413, anthropic.APIStatusError),
        (429, anthropic.RateLimitError),
        (503, anthropic.InternalServerError),
    ],
)
def test_anthropic_sdk_surfaces_the_message(status: int, exc: type[Exception]) -> None:
    body = error_body("anthropic", status, "spendgate_test_code", "Spendgate says no, and why.")
    client = anthropic.Anthropic(api_key="x", base_url="https://api.anthropic.com", max_retries=0,
                                 http_client=anthropic.DefaultHttpxClient(transport=_transport(status, body)))
    with pytest.raises(exc) as info:
        client.messages.create(model="claude-sonnet-4-20250514", max_tokens=5,
                               messages=[{"role": "user", "content": "hi"}])
    e = info.value
    assert isinstance(e, anthropic.APIStatusError) and e.status_code == status
    assert "Spendgate says no, and why." in str(e)
