"""Every provider and endpoint kind, streamed and not, through a real `spendgate serve`:
the audit row's tokens equal the usage block the mock sent, and its cost is genai-prices'
price for that usage, to the nano-dollar.

All traffic runs once per module (one gateway, one `spendgate audit` read); each case is then
its own test, so a failure names the provider and endpoint.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import genai_prices
import openai
import pytest

from spendgate.providers import BUILTIN_PROVIDERS
from tests.rig.gateway import PROVIDER_BASE_URLS, GatewayProcess
from tests.rig.mock_provider import MockProvider, RecordedRequest

REQUEST_ID = "x-spendgate-request-id"
NANO = Decimal("1e-9")
MSGS = [{"role": "user", "content": "Count the sheep in the meadow, please."}]
GEMINI = "https://generativelanguage.googleapis.com/v1beta/models"
AZURE = "https://myres.openai.azure.com"
AZURE_API_VERSION = "2024-10-21"

Send = Callable[[GatewayProcess, str], str]  # (gateway, gateway key) -> x-spendgate-request-id


@dataclass(frozen=True)
class Case:
    id: str
    provider: str  # audit `provider` (spendgate's name)
    kind: str  # audit `endpoint_kind`
    model: str  # audit `model_requested`
    stream: bool
    host: str
    send: Send
    tokens: dict[str, int] = field(default_factory=dict)  # mock usage overrides
    scenario: dict[str, Any] = field(default_factory=dict)  # other mock scenario params
    priced: bool = True  # genai-prices knows the model


# --------------------------------------------------------------------------- clients


def _consume(parsed: Any, stream: bool) -> None:
    if stream:
        for _ in parsed:
            pass


def openai_chat(model: str, stream: bool, *, base_url: str = PROVIDER_BASE_URLS["openai"],
                client_usage: bool = False) -> Send:
    def send(gw: GatewayProcess, key: str) -> str:
        c = gw.openai_client(key, base_url=base_url)
        extra: dict[str, Any] = {"stream_options": {"include_usage": True}} if client_usage else {}
        raw = c.chat.completions.with_raw_response.create(model=model, messages=MSGS, stream=stream, **extra)
        _consume(raw.parse(), stream)
        return raw.headers[REQUEST_ID]
    return send


def openai_responses(model: str, stream: bool) -> Send:
    def send(gw: GatewayProcess, key: str) -> str:
        raw = gw.openai_client(key).responses.with_raw_response.create(
            model=model, input="Count the sheep in the meadow, please.", stream=stream)
        _consume(raw.parse(), stream)
        return raw.headers[REQUEST_ID]
    return send


def openai_completions(model: str, stream: bool) -> Send:
    def send(gw: GatewayProcess, key: str) -> str:
        raw = gw.openai_client(key).completions.with_raw_response.create(
            model=model, prompt="Once upon a time", max_tokens=50, stream=stream)
        _consume(raw.parse(), stream)
        return raw.headers[REQUEST_ID]
    return send


def openai_embeddings(model: str) -> Send:
    def send(gw: GatewayProcess, key: str) -> str:
        raw = gw.openai_client(key).embeddings.with_raw_response.create(model=model, input=["one sheep", "two sheep"])
        raw.parse()
        return raw.headers[REQUEST_ID]
    return send


def anthropic_messages(model: str, stream: bool) -> Send:
    def send(gw: GatewayProcess, key: str) -> str:
        # The gateway key in the SDK's key slot this time, not in the proxy URL.
        raw = gw.anthropic_client(key, via="apikey").messages.with_raw_response.create(
            model=model, max_tokens=256, messages=MSGS, stream=stream)
        _consume(raw.parse(), stream)
        return raw.headers[REQUEST_ID]
    return send


def gemini(model: str, method: str, *, alt_sse: bool = False, key_in_query: bool = False) -> Send:
    def send(gw: GatewayProcess, key: str) -> str:
        params = {"alt": "sse"} if alt_sse else {}
        headers = {}
        if key_in_query:
            params["key"] = key
        else:
            headers["x-goog-api-key"] = key
        body = {"contents": [{"role": "user", "parts": [{"text": "Count the sheep in the meadow, please."}]}]}
        with gw.httpx_client() as h, h.stream("POST", f"{GEMINI}/{model}:{method}", params=params, json=body,
                                              headers=headers) as r:
            r.read()
            assert r.status_code == 200, r.text
            return r.headers[REQUEST_ID]
    return send


def azure_sdk(deployment: str, stream: bool) -> Send:
    def send(gw: GatewayProcess, key: str) -> str:
        http = openai.DefaultHttpxClient(proxy=gw.proxy_url(key), verify=gw.ssl_context(), trust_env=False)
        c = openai.AzureOpenAI(api_key="unused", api_version=AZURE_API_VERSION, azure_endpoint=AZURE,
                               http_client=http, max_retries=0)
        raw = c.chat.completions.with_raw_response.create(model=deployment, messages=MSGS, stream=stream)
        _consume(raw.parse(), stream)
        return raw.headers[REQUEST_ID]
    return send


def azure_raw(deployment: str, body_model: str | None) -> Send:
    """Azure's REST shape: the deployment in the path, the model in the body only if the client put it there."""
    def send(gw: GatewayProcess, key: str) -> str:
        body: dict[str, Any] = {"messages": MSGS}
        if body_model:
            body["model"] = body_model
        with gw.httpx_client() as h:
            r = h.post(f"{AZURE}/openai/deployments/{deployment}/chat/completions",
                       params={"api-version": AZURE_API_VERSION}, json=body, headers={"api-key": key})
        assert r.status_code == 200, r.text
        return r.headers[REQUEST_ID]
    return send


# --------------------------------------------------------------------------- the matrix

# Distinct numbers per shape, so a count taken from the wrong field cannot pass by accident.
OAI_TOKENS = {"input_tokens": 1234, "output_tokens": 87, "cache_read_tokens": 512, "reasoning_tokens": 31}
RESP_TOKENS = {"input_tokens": 2345, "output_tokens": 96, "cache_read_tokens": 1024, "reasoning_tokens": 48}
LEGACY_TOKENS = {"input_tokens": 321, "output_tokens": 45}
EMBED_TOKENS = {"input_tokens": 777}
ANT_TOKENS = {"input_tokens": 901, "output_tokens": 73, "cache_read_tokens": 2048, "cache_write_tokens": 333}
GEM_TOKENS = {"input_tokens": 1500, "output_tokens": 52, "cache_read_tokens": 600, "reasoning_tokens": 64}

OAI_HOST, ANT_HOST, GEM_HOST = "api.openai.com", "api.anthropic.com", "generativelanguage.googleapis.com"
AZ_HOST = "myres.openai.azure.com"
MISTRAL = "https://api.mistral.ai/v1"
GROQ = "https://api.groq.com/openai/v1"

CASES = [
    Case("openai-chat", "openai", "chat", "gpt-4o", False, OAI_HOST, openai_chat("gpt-4o", False), OAI_TOKENS),
    Case("openai-chat-stream", "openai", "chat", "gpt-4o", True, OAI_HOST, openai_chat("gpt-4o", True), OAI_TOKENS),
    Case("openai-chat-stream-client-usage", "openai", "chat", "gpt-4o-mini", True, OAI_HOST,
         openai_chat("gpt-4o-mini", True, client_usage=True), OAI_TOKENS),
    Case("openai-chat-reasoning-model", "openai", "chat", "o3-mini", False, OAI_HOST,
         openai_chat("o3-mini", False), OAI_TOKENS),
    Case("openai-responses", "openai", "responses", "gpt-4.1", False, OAI_HOST,
         openai_responses("gpt-4.1", False), RESP_TOKENS),
    Case("openai-responses-stream", "openai", "responses", "gpt-4.1", True, OAI_HOST,
         openai_responses("gpt-4.1", True), RESP_TOKENS),
    Case("openai-completions", "openai", "completions", "gpt-3.5-turbo-instruct", False, OAI_HOST,
         openai_completions("gpt-3.5-turbo-instruct", False), LEGACY_TOKENS),
    Case("openai-completions-stream", "openai", "completions", "gpt-3.5-turbo-instruct", True, OAI_HOST,
         openai_completions("gpt-3.5-turbo-instruct", True), LEGACY_TOKENS),
    Case("openai-embeddings", "openai", "embeddings", "text-embedding-3-small", False, OAI_HOST,
         openai_embeddings("text-embedding-3-small"), EMBED_TOKENS),
    Case("anthropic-messages", "anthropic", "messages", "claude-sonnet-4-20250514", False, ANT_HOST,
         anthropic_messages("claude-sonnet-4-20250514", False), ANT_TOKENS),
    Case("anthropic-messages-stream", "anthropic", "messages", "claude-sonnet-4-20250514", True, ANT_HOST,
         anthropic_messages("claude-sonnet-4-20250514", True), ANT_TOKENS),
    Case("gemini-generate", "gemini", "chat", "gemini-2.5-flash", False, GEM_HOST,
         gemini("gemini-2.5-flash", "generateContent"), GEM_TOKENS),
    Case("gemini-stream-sse", "gemini", "chat", "gemini-2.5-flash", True, GEM_HOST,
         gemini("gemini-2.5-flash", "streamGenerateContent", alt_sse=True, key_in_query=True), GEM_TOKENS),
    # Without ?alt=sse Gemini streams one JSON array, element by element (its REST default).
    Case("gemini-stream-json-array", "gemini", "chat", "gemini-2.5-flash", True, GEM_HOST,
         gemini("gemini-2.5-flash", "streamGenerateContent"), GEM_TOKENS),
    Case("azure-chat", "azure", "chat", "gpt-4o", False, AZ_HOST, azure_sdk("gpt-4o", False), OAI_TOKENS),
    Case("azure-chat-stream", "azure", "chat", "gpt-4o", True, AZ_HOST, azure_sdk("gpt-4o", True), OAI_TOKENS),
    # No `model` in the body: the deployment names the model.
    Case("azure-deployment-is-model", "azure", "chat", "o3-mini", False, AZ_HOST, azure_raw("o3-mini", None),
         OAI_TOKENS),
    # The deployment answers whatever the body says (the path wins); Azure reports the real model,
    # which prices it.
    Case("azure-body-model", "azure", "chat", "prod-east", False, AZ_HOST, azure_raw("prod-east", "gpt-4o"),
         OAI_TOKENS, scenario={"model": "gpt-4o"}),
    Case("mistral-chat", "mistral", "chat", "mistral-small-latest", False, "api.mistral.ai",
         openai_chat("mistral-small-latest", False, base_url=MISTRAL), OAI_TOKENS),
    Case("mistral-chat-stream", "mistral", "chat", "mistral-small-latest", True, "api.mistral.ai",
         openai_chat("mistral-small-latest", True, base_url=MISTRAL), OAI_TOKENS),
    Case("groq-chat", "groq", "chat", "llama-3.3-70b-versatile", False, "api.groq.com",
         openai_chat("llama-3.3-70b-versatile", False, base_url=GROQ), OAI_TOKENS),
    Case("groq-chat-stream", "groq", "chat", "llama-3.3-70b-versatile", True, "api.groq.com",
         openai_chat("llama-3.3-70b-versatile", True, base_url=GROQ), OAI_TOKENS),
    # Models genai-prices does not know: tokens recorded, cost null (never a guess).
    Case("unknown-model", "openai", "chat", "acme-internal-7", False, OAI_HOST,
         openai_chat("acme-internal-7", False), OAI_TOKENS, priced=False),
    Case("unknown-model-stream", "openai", "chat", "acme-internal-7", True, OAI_HOST,
         openai_chat("acme-internal-7", True), OAI_TOKENS, priced=False),
]


def expected_tokens(case: Case, usage: dict[str, Any]) -> dict[str, int]:
    """Our columns from the provider's own usage block. Conventions (genai-prices'): input is the
    TOTAL input including cache reads and writes; output includes reasoning."""
    if case.provider == "anthropic":  # input_tokens there excludes both cache parts
        cr, cw = usage.get("cache_read_input_tokens", 0), usage.get("cache_creation_input_tokens", 0)
        return {"input_tokens": usage["input_tokens"] + cr + cw, "output_tokens": usage["output_tokens"],
                "cache_read_tokens": cr, "cache_write_tokens": cw, "reasoning_tokens": 0}
    if case.provider == "gemini":  # candidatesTokenCount excludes thoughts
        thoughts = usage.get("thoughtsTokenCount", 0)
        return {"input_tokens": usage["promptTokenCount"], "output_tokens": usage["candidatesTokenCount"] + thoughts,
                "cache_read_tokens": usage.get("cachedContentTokenCount", 0), "cache_write_tokens": 0,
                "reasoning_tokens": thoughts}
    if case.kind == "responses":
        return {"input_tokens": usage["input_tokens"], "output_tokens": usage["output_tokens"],
                "cache_read_tokens": usage["input_tokens_details"]["cached_tokens"], "cache_write_tokens": 0,
                "reasoning_tokens": usage["output_tokens_details"]["reasoning_tokens"]}
    details_in = usage.get("prompt_tokens_details") or {}
    details_out = usage.get("completion_tokens_details") or {}
    return {"input_tokens": usage["prompt_tokens"], "output_tokens": usage.get("completion_tokens", 0),
            "cache_read_tokens": details_in.get("cached_tokens", 0), "cache_write_tokens": 0,
            "reasoning_tokens": details_out.get("reasoning_tokens", 0)}


def genai_price(case: Case, model: str, t: dict[str, int]) -> Decimal:
    usage = genai_prices.Usage(input_tokens=t["input_tokens"], cache_read_tokens=t["cache_read_tokens"],
                               cache_write_tokens=t["cache_write_tokens"], output_tokens=t["output_tokens"])
    provider_id = BUILTIN_PROVIDERS[case.provider].genai_prices_id
    return genai_prices.calc_price(usage, model, provider_id=provider_id).total_price


# --------------------------------------------------------------------------- traffic, once per module


@dataclass
class Result:
    request_id: str | None = None
    rec: RecordedRequest | None = None
    error: BaseException | None = None


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, _mock_provider_session: MockProvider) -> Iterator[GatewayProcess]:
    g = GatewayProcess(tmp_path_factory.mktemp("gw-usage"), _mock_provider_session.url, name="usage")
    g.start()
    yield g
    g.stop()


@pytest.fixture(autouse=True)
def _attach_log(request: pytest.FixtureRequest, gw: GatewayProcess) -> None:
    request.node._spendgate_gateways = [gw]


@pytest.fixture(scope="module")
def key(gw: GatewayProcess) -> dict[str, Any]:
    return gw.create_key("uma", team="t-usage")


@pytest.fixture(scope="module")
def traffic(gw: GatewayProcess, key: dict[str, Any], _mock_provider_session: MockProvider) -> dict[str, Result]:
    mock = _mock_provider_session
    out: dict[str, Result] = {}
    for case in CASES:
        mock.reset()
        mock.set_next("ok", **case.tokens, **case.scenario)
        res = out[case.id] = Result()
        try:
            res.request_id = case.send(gw, key["key"])
            res.rec = mock.wait_for(1)[0]
        except Exception as e:  # noqa: BLE001 - reported by this case's own test
            res.error = e
    mock.reset()
    return out


@pytest.fixture(scope="module")
def rows(gw: GatewayProcess, traffic: dict[str, Result]) -> dict[str, dict[str, Any]]:
    """`spendgate audit --format json`, read once every request's row is completed."""
    ids = {r.request_id for r in traffic.values() if r.request_id}
    deadline = time.monotonic() + 15
    while True:
        found = {r["id"]: r for r in gw.cli_json("audit", "--limit", "100000")}
        if all(i in found and found[i]["ended_at"] for i in ids) or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_audit_row_tokens_and_cost(case: Case, traffic: dict[str, Result], rows: dict[str, dict[str, Any]],
                                   key: dict[str, Any]) -> None:
    res = traffic[case.id]
    if res.error is not None:
        raise res.error
    rec = res.rec
    assert rec is not None and res.request_id
    assert rec.response_status == 200 and rec.completed
    assert rec.usage_sent and rec.usage is not None, "the mock sent no final usage block"
    assert rec.stream == case.stream

    row = rows.get(res.request_id)
    assert row is not None, f"no audit row with id {res.request_id} (the x-spendgate-request-id header)"
    assert row["ended_at"] is not None, row
    assert (row["provider"], row["host"], row["endpoint_kind"], row["model_requested"], row["stream"]) == (
        case.provider, case.host, case.kind, case.model, case.stream)
    assert (row["user"], row["team"], row["key_id"]) == ("uma", "t-usage", key["key_id"])
    assert (row["outcome"], row["status_code"], row["error"]) == ("completed", 200, None)
    assert row["usage_source"] == "provider", "the provider reported usage: the row must carry it, not an estimate"

    want = expected_tokens(case, rec.usage)
    for k in ("cache_read_tokens", "cache_write_tokens", "reasoning_tokens"):
        if case.tokens.get(k):
            assert want[k] > 0, f"mock override {k} did not reach its usage block"
    got = {k: row[k] for k in want}
    assert got == want, f"audit row tokens differ from the mock's usage block {rec.usage}"

    if not case.priced:
        with pytest.raises(LookupError):
            genai_price(case, rec.model_reported or case.model, want)
        assert row["cost_usd"] is None
        return
    price = genai_price(case, rec.model_reported or case.model, want)
    assert price > 0
    assert row["cost_usd"] is not None, "a model genai-prices knows must be priced"
    assert abs(Decimal(row["cost_usd"]) - price) <= NANO, (row["cost_usd"], price)


def test_unknown_model_warns_once(gw: GatewayProcess, rows: dict[str, dict[str, Any]]) -> None:
    unknown = [r for r in rows.values() if r["model_requested"] == "acme-internal-7"]
    assert len(unknown) == 2 and all(r["cost_usd"] is None and r["input_tokens"] > 0 for r in unknown)
    warnings = [line for line in gw.log_text().splitlines() if "acme-internal-7" in line]
    assert len(warnings) == 1, warnings
    assert "price" in warnings[0].lower()
