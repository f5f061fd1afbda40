"""The mock provider itself, spoken to directly (no gateway) with the real SDKs and httpx."""

from __future__ import annotations

import base64
import json
import os
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
import tomllib
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest

from tests.rig.gateway import UPSTREAM_KEYS, GatewayProcess, Inline, parse_json_output
from tests.rig.mock_provider import MockProvider, Scenario, content_pieces

MSGS = [{"role": "user", "content": "Say hello"}]


@pytest.fixture
def ctx(mock_provider: MockProvider) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(mock_provider.cert_path))


@pytest.fixture
def oai(mock_provider: MockProvider, ctx: ssl.SSLContext) -> openai.OpenAI:
    http = openai.DefaultHttpxClient(verify=ctx, trust_env=False)
    return openai.OpenAI(api_key="test-key", base_url=f"{mock_provider.url}/v1", http_client=http, max_retries=0)


@pytest.fixture
def ant(mock_provider: MockProvider, ctx: ssl.SSLContext) -> anthropic.Anthropic:
    http = anthropic.DefaultHttpxClient(verify=ctx, trust_env=False)
    return anthropic.Anthropic(api_key="test-key", base_url=mock_provider.url, http_client=http, max_retries=0)


@pytest.fixture
def hx(mock_provider: MockProvider, ctx: ssl.SSLContext) -> httpx.Client:
    with httpx.Client(base_url=mock_provider.url, verify=ctx, trust_env=False, timeout=10) as c:
        yield c


def expected_input(body: bytes) -> int:
    return 10 + len(body) // 4


# --------------------------------------------------------------------------- OpenAI


def test_openai_chat_non_stream(oai: openai.OpenAI, mock_provider: MockProvider) -> None:
    r = oai.chat.completions.create(model="gpt-4o-mini", messages=MSGS)
    rec = mock_provider.wait_for(1)[0]
    assert (rec.provider, rec.endpoint, rec.model, rec.stream) == ("openai", "chat", "gpt-4o-mini", False)
    assert r.choices[0].message.content == "".join(content_pieces(5))
    assert r.usage is not None
    assert r.usage.prompt_tokens == rec.tokens["input_tokens"] == expected_input(rec.body)
    assert r.usage.completion_tokens == rec.tokens["output_tokens"] == 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + 5
    assert r.usage.prompt_tokens_details.cached_tokens == 0
    assert r.usage.completion_tokens_details.reasoning_tokens == 0
    assert rec.usage_sent and rec.usage == r.usage.model_dump(exclude_none=True)
    assert rec.completed and rec.response_status == 200
    assert rec.headers["authorization"] == "Bearer test-key"
    assert rec.request_id and rec.request_id.startswith("req_")


def test_openai_chat_stream_without_include_usage(oai: openai.OpenAI, mock_provider: MockProvider) -> None:
    chunks = list(oai.chat.completions.create(model="gpt-4o", messages=MSGS, stream=True))
    rec = mock_provider.wait_for(1)[0]
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert all(c.usage is None for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "".join(content_pieces(5))
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert rec.stream and not rec.include_usage and not rec.usage_sent and rec.usage is None
    assert rec.response_body.endswith(b"data: [DONE]\n\n")
    assert ("Transfer-Encoding", "chunked") in rec.response_headers


def test_openai_chat_stream_include_usage(oai: openai.OpenAI, mock_provider: MockProvider) -> None:
    chunks = list(oai.chat.completions.create(
        model="gpt-4o", messages=MSGS, stream=True, stream_options={"include_usage": True}
    ))
    rec = mock_provider.wait_for(1)[0]
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert last.usage.prompt_tokens == expected_input(rec.body)
    assert last.usage.completion_tokens == 5
    assert rec.include_usage and rec.usage_sent and rec.usage["prompt_tokens"] == last.usage.prompt_tokens
    # 1 role chunk + 5 content + 1 finish + 1 usage
    assert len(chunks) == 8


def test_openai_responses(oai: openai.OpenAI, mock_provider: MockProvider) -> None:
    r = oai.responses.create(model="gpt-4o", input="Say hello")
    rec = mock_provider.wait_for(1)[0]
    assert rec.endpoint == "responses"
    assert r.output_text == "".join(content_pieces(5))
    assert r.usage.input_tokens == expected_input(rec.body)
    assert r.usage.output_tokens == 5
    assert r.usage.input_tokens_details.cached_tokens == 0
    assert r.usage.output_tokens_details.reasoning_tokens == 0
    assert r.usage.total_tokens == r.usage.input_tokens + 5


def test_openai_responses_stream(oai: openai.OpenAI, mock_provider: MockProvider) -> None:
    events = list(oai.responses.create(model="gpt-4o", input="Say hello", stream=True))
    rec = mock_provider.wait_for(1)[0]
    types = [e.type for e in events]
    assert types[0] == "response.created" and types[-1] == "response.completed"
    assert types.count("response.output_text.delta") == 5
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == "".join(content_pieces(5))
    done = events[-1].response
    assert done.usage.input_tokens == rec.tokens["input_tokens"] == expected_input(rec.body)
    assert done.usage.output_tokens == 5
    assert [e["event"] for e in rec.sse_events()] == types
    assert rec.usage_sent


def test_openai_legacy_completions(oai: openai.OpenAI, mock_provider: MockProvider) -> None:
    r = oai.completions.create(model="gpt-3.5-turbo-instruct", prompt="Say hello")
    assert r.usage.completion_tokens == 5 and r.choices[0].text == "".join(content_pieces(5))
    chunks = list(oai.completions.create(model="gpt-3.5-turbo-instruct", prompt="hi", stream=True,
                                         stream_options={"include_usage": True}))
    recs = mock_provider.wait_for(2)
    assert chunks[-1].usage.prompt_tokens == expected_input(recs[1].body)
    assert [r.endpoint for r in recs] == ["completions", "completions"]


def test_openai_embeddings_base64_default_and_float(oai: openai.OpenAI, hx: httpx.Client,
                                                    mock_provider: MockProvider) -> None:
    r = oai.embeddings.create(model="text-embedding-3-small", input=["a", "b"])  # SDK asks for base64
    rec = mock_provider.wait_for(1)[0]
    assert rec.json["encoding_format"] == "base64"
    assert len(r.data) == 2 and len(r.data[0].embedding) == 8
    assert r.usage.prompt_tokens == r.usage.total_tokens == expected_input(rec.body)
    raw = hx.post("/v1/embeddings", json={"model": "text-embedding-3-small", "input": "x", "dimensions": 4}).json()
    assert len(raw["data"][0]["embedding"]) == 4 and isinstance(raw["data"][0]["embedding"][0], float)
    b64 = json.loads(rec.response_body)["data"][0]["embedding"]
    assert list(struct.unpack("<8f", base64.b64decode(b64))) == pytest.approx(r.data[0].embedding)


def test_openai_models(oai: openai.OpenAI) -> None:
    ids = [m.id for m in oai.models.list()]
    assert "gpt-4o" in ids


def test_azure_deployment_path(mock_provider: MockProvider, ctx: ssl.SSLContext) -> None:
    client = openai.AzureOpenAI(
        api_key="azure-test", api_version="2024-10-21", azure_endpoint=mock_provider.url,
        http_client=openai.DefaultHttpxClient(verify=ctx, trust_env=False), max_retries=0,
    )
    r = client.chat.completions.create(model="my-deploy", messages=MSGS)
    rec = mock_provider.wait_for(1)[0]
    assert rec.path == "/openai/deployments/my-deploy/chat/completions"
    assert rec.query_params["api-version"] == ["2024-10-21"]
    assert (rec.endpoint, rec.deployment, rec.headers["api-key"]) == ("chat", "my-deploy", "azure-test")
    assert r.usage.completion_tokens == 5


@pytest.mark.parametrize("path", ["/openai/v1/chat/completions", "/api/v1/chat/completions", "/chat/completions"])
def test_openai_compatible_prefixes(hx: httpx.Client, mock_provider: MockProvider, path: str) -> None:
    r = hx.post(path, json={"model": "llama", "messages": MSGS})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5
    assert mock_provider.wait_for(1)[0].endpoint == "chat"


# --------------------------------------------------------------------------- Anthropic


def test_anthropic_messages(ant: anthropic.Anthropic, mock_provider: MockProvider) -> None:
    m = ant.messages.create(model="claude-sonnet-4-20250514", max_tokens=50, messages=MSGS)
    rec = mock_provider.wait_for(1)[0]
    assert (rec.provider, rec.endpoint) == ("anthropic", "messages")
    assert m.content[0].text == "".join(content_pieces(5))
    assert m.usage.input_tokens == expected_input(rec.body)
    assert m.usage.output_tokens == 5
    assert m.usage.cache_creation_input_tokens == 0 and m.usage.cache_read_input_tokens == 0
    # anthropic 2.x sends its key as a Bearer token (x-api-key on older versions)
    assert "test-key" in (rec.header("x-api-key"), rec.header("authorization", "").removeprefix("Bearer "))
    assert "anthropic-version" in rec.headers
    assert ("request-id", rec.request_id) in rec.response_headers


def test_anthropic_stream_helper(ant: anthropic.Anthropic, mock_provider: MockProvider) -> None:
    with ant.messages.stream(model="claude-sonnet-4-20250514", max_tokens=50, messages=MSGS) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    rec = mock_provider.wait_for(1)[0]
    assert text == "".join(content_pieces(5))
    assert final.usage.input_tokens == rec.tokens["input_tokens"]
    assert final.usage.output_tokens == 5
    assert [e["event"] for e in rec.sse_events()] == [
        "message_start", "content_block_start", "ping", *["content_block_delta"] * 5,
        "content_block_stop", "message_delta", "message_stop",
    ]


def test_anthropic_raw_stream_events(ant: anthropic.Anthropic, mock_provider: MockProvider) -> None:
    scenario = {"x-mock-scenario": "ok; cache_read_tokens=7; cache_write_tokens=3"}
    events = list(ant.messages.create(model="claude-3-5-haiku-20241022", max_tokens=9, messages=MSGS, stream=True,
                                      extra_headers=scenario))
    start, delta = events[0], [e for e in events if e.type == "message_delta"][0]
    assert start.message.usage.output_tokens == 1
    assert start.message.usage.cache_read_input_tokens == 7
    assert start.message.usage.cache_creation_input_tokens == 3
    assert delta.usage.output_tokens == 5
    rec = mock_provider.wait_for(1)[0]
    assert rec.usage["cache_read_input_tokens"] == 7 and rec.tokens["cache_write_tokens"] == 3


def test_anthropic_count_tokens(ant: anthropic.Anthropic, mock_provider: MockProvider) -> None:
    r = ant.messages.count_tokens(model="claude-sonnet-4-20250514", messages=MSGS)
    assert r.input_tokens == expected_input(mock_provider.wait_for(1)[0].body)


# --------------------------------------------------------------------------- Gemini


def test_gemini_generate(hx: httpx.Client, mock_provider: MockProvider) -> None:
    body = {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}
    r = hx.post("/v1beta/models/gemini-2.0-flash:generateContent", json=body, headers={"x-goog-api-key": "g"})
    rec = mock_provider.wait_for(1)[0]
    assert (rec.provider, rec.endpoint, rec.model) == ("gemini", "generate", "gemini-2.0-flash")
    j = r.json()
    assert j["candidates"][0]["content"]["parts"][0]["text"] == "".join(content_pieces(5))
    u = j["usageMetadata"]
    assert u["promptTokenCount"] == expected_input(rec.body)
    assert u["candidatesTokenCount"] == 5
    assert u["totalTokenCount"] == u["promptTokenCount"] + 5
    assert u["cachedContentTokenCount"] == 0 and u["thoughtsTokenCount"] == 0


def test_gemini_stream_sse(hx: httpx.Client, mock_provider: MockProvider) -> None:
    r = hx.post("/v1beta/models/gemini-2.5-pro:streamGenerateContent", params={"alt": "sse"},
                json={"contents": []}, headers={"x-mock-scenario": "ok; reasoning_tokens=4; output_tokens=10"})
    datas = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: ")]
    assert len(datas) == 5 and "\r\n\r\n" in r.text
    assert [d["usageMetadata"]["candidatesTokenCount"] for d in datas] == [2, 4, 6, 8, 10]  # running totals
    last = datas[-1]
    assert last["candidates"][0]["finishReason"] == "STOP"
    assert last["usageMetadata"]["thoughtsTokenCount"] == 4
    assert last["usageMetadata"]["totalTokenCount"] == last["usageMetadata"]["promptTokenCount"] + 14
    rec = mock_provider.wait_for(1)[0]
    assert rec.stream and rec.usage == last["usageMetadata"]


def test_gemini_stream_json_array(hx: httpx.Client) -> None:
    r = hx.post("/v1beta/models/gemini-2.0-flash:streamGenerateContent", json={"contents": []})
    arr = r.json()
    assert len(arr) == 5 and arr[-1]["usageMetadata"]["candidatesTokenCount"] == 5


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(("path", "headers", "check"), [
    ("/v1/nope", {}, lambda j: j["error"]["type"] == "invalid_request_error"),
    ("/v1/messages/nope", {"anthropic-version": "2023-06-01"},
     lambda j: j["type"] == "error" and j["error"]["type"] == "not_found_error"),
    ("/v1beta/nope", {}, lambda j: j["error"]["status"] == "NOT_FOUND" and j["error"]["code"] == 404),
])
def test_unknown_paths_404_provider_shaped(hx: httpx.Client, path: str, headers: dict[str, str], check) -> None:
    r = hx.post(path, json={}, headers=headers)
    assert r.status_code == 404 and check(r.json())


def test_error500_header_openai(oai: openai.OpenAI, mock_provider: MockProvider) -> None:
    with pytest.raises(openai.InternalServerError) as ei:
        oai.chat.completions.create(model="gpt-4o", messages=MSGS, extra_headers={"x-mock-scenario": "error500"})
    assert ei.value.body["type"] == "server_error"
    rec = mock_provider.wait_for(1)[0]
    assert rec.response_status == 500 and rec.scenario.error_status == 500 and not rec.usage_sent


def test_error_via_set_next_anthropic(ant: anthropic.Anthropic, mock_provider: MockProvider) -> None:
    mock_provider.set_next("error500")
    with pytest.raises(anthropic.InternalServerError) as ei:
        ant.messages.create(model="claude-sonnet-4-20250514", max_tokens=5, messages=MSGS)
    assert ei.value.body["error"]["type"] == "api_error"
    ant.messages.create(model="claude-sonnet-4-20250514", max_tokens=5, messages=MSGS)  # queue consumed
    mock_provider.set_next("error429", retry_after=7)
    with pytest.raises(anthropic.RateLimitError) as ei2:
        ant.messages.create(model="claude-sonnet-4-20250514", max_tokens=5, messages=MSGS)
    assert ei2.value.response.headers["retry-after"] == "7"


def test_set_default_and_match(oai: openai.OpenAI, hx: httpx.Client, mock_provider: MockProvider) -> None:
    mock_provider.set_default("ok", chunks=2, input_tokens=1000)
    mock_provider.set_next("ok", match="/embeddings", input_tokens=3)
    r = oai.chat.completions.create(model="gpt-4o", messages=MSGS)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (1000, 2)
    e = hx.post("/v1/embeddings", json={"model": "m", "input": "x"}).json()
    assert e["usage"]["prompt_tokens"] == 3


def test_usage_overrides_and_chunks(oai: openai.OpenAI, mock_provider: MockProvider) -> None:
    mock_provider.set_next("ok", chunks=3, usage_tokens={"input": 111, "output": 22, "cache_read": 5, "reasoning": 9})
    chunks = list(oai.chat.completions.create(model="o3-mini", messages=MSGS, stream=True,
                                              stream_options={"include_usage": True}))
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) == 3
    u = chunks[-1].usage
    assert (u.prompt_tokens, u.completion_tokens, u.prompt_tokens_details.cached_tokens,
            u.completion_tokens_details.reasoning_tokens) == (111, 22, 5, 9)
    assert mock_provider.last.tokens == {"input_tokens": 111, "output_tokens": 22, "cache_read_tokens": 5,
                                         "cache_write_tokens": 0, "reasoning_tokens": 9}


def test_truncate_stream(oai: openai.OpenAI, ant: anthropic.Anthropic, mock_provider: MockProvider) -> None:
    mock_provider.set_next("truncate")
    got = []
    with pytest.raises(Exception):  # noqa: B017 - httpx2 RemoteProtocolError (incomplete chunked read)
        for c in oai.chat.completions.create(model="gpt-4o", messages=MSGS, stream=True,
                                             stream_options={"include_usage": True}):
            got.append(c)
    rec = mock_provider.wait_for(1)[0]
    assert not rec.completed and not rec.usage_sent
    assert sum(1 for c in got if c.choices and c.choices[0].delta.content) <= 2
    assert b"[DONE]" not in rec.response_body

    mock_provider.set_next("truncate")
    with pytest.raises(Exception):
        with ant.messages.stream(model="claude-sonnet-4-20250514", max_tokens=5, messages=MSGS) as s:
            s.get_final_message()
    rec = mock_provider.wait_for(2)[1]
    assert not rec.usage_sent and b"message_start" in rec.response_body and b"message_delta" not in rec.response_body


def test_slow_chunks_arrive_one_by_one(hx: httpx.Client, mock_provider: MockProvider) -> None:
    arrivals = []
    body = {"model": "gpt-4o", "messages": MSGS, "stream": True}
    scenario = {"x-mock-scenario": "slow; delay_ms=80; chunks=3"}
    with hx.stream("POST", "/v1/chat/completions", json=body, headers=scenario) as r:
        t0 = time.monotonic()
        for line in r.iter_lines():
            if line.startswith("data: "):
                arrivals.append(time.monotonic() - t0)
    assert len(arrivals) == 6  # role, 3 content, finish, [DONE]
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    assert min(gaps) >= 0.06, gaps
    rec = mock_provider.wait_for(1)[0]
    assert len(rec.chunk_times) == 6


def test_hang_then_client_timeout(hx: httpx.Client, mock_provider: MockProvider) -> None:
    with pytest.raises(httpx.ReadTimeout):
        hx.post("/v1/chat/completions", json={"model": "m", "messages": MSGS},
                headers={"x-mock-scenario": "hang; hang_s=1"}, timeout=0.3)
    rec = mock_provider.wait_for(1, finished=False)[0]
    assert "hang" in rec.scenario.flags
    assert rec.finished.wait(3)


def test_headers_and_bytes_recorded(hx: httpx.Client, mock_provider: MockProvider) -> None:
    content = json.dumps({"model": "gpt-4o", "messages": MSGS}).encode()
    r = hx.post("/v1/chat/completions?foo=bar", content=content,
                headers={"X-Custom-Thing": "Abc", "Content-Type": "application/json", "Host": "api.openai.com"})
    rec = mock_provider.wait_for(1)[0]
    assert ("X-Custom-Thing", "Abc") in rec.header_list
    assert rec.headers["x-custom-thing"] == "Abc" and rec.host == "api.openai.com"
    assert rec.body == content and rec.query == "foo=bar" and rec.method == "POST"
    assert rec.response_body == r.content == rec.response_raw
    assert rec.timestamp <= time.time()


def test_gzip_scenario(hx: httpx.Client, mock_provider: MockProvider) -> None:
    r = hx.post("/v1/chat/completions", json={"model": "m", "messages": MSGS, "stream": True},
                headers={"x-mock-scenario": "gzip", "Accept-Encoding": "gzip"})
    assert r.headers["content-encoding"] == "gzip"
    rec = mock_provider.wait_for(1)[0]
    assert r.content == rec.response_body and rec.response_raw != rec.response_body


def test_expect_key(hx: httpx.Client, mock_provider: MockProvider) -> None:
    mock_provider.expect_key("openai", UPSTREAM_KEYS["openai"])
    bad = hx.post("/v1/chat/completions", json={"model": "m"}, headers={"Authorization": "Bearer nope"})
    good = hx.post("/v1/chat/completions", json={"model": "m"},
                   headers={"Authorization": f"Bearer {UPSTREAM_KEYS['openai']}"})
    assert (bad.status_code, good.status_code) == (401, 200)
    assert bad.json()["error"]["code"] == "invalid_api_key"


def test_cost_endpoints(hx: httpx.Client, mock_provider: MockProvider) -> None:
    mock_provider.set_costs(openai_usd="12.34", anthropic_usd=Decimal("5.5"))
    now = int(time.time())
    o = hx.get("/v1/organization/costs", params={"start_time": now - 3 * 86400, "bucket_width": "1d"}).json()
    assert o["object"] == "page" and len(o["data"]) in (3, 4)
    total = sum(res["amount"]["value"] for b in o["data"] for res in b["results"])
    assert total == pytest.approx(12.34)
    a = hx.get("/v1/organizations/cost_report", params={"starting_at": "2026-01-01T00:00:00Z",
                                                         "ending_at": "2026-01-03T00:00:00Z"}).json()
    assert [b["starting_at"] for b in a["data"]] == ["2026-01-01T00:00:00Z", "2026-01-02T00:00:00Z"]
    cents = sum(Decimal(res["amount"]) for b in a["data"] for res in b["results"])
    assert cents == Decimal("550") and a["has_more"] is False
    assert mock_provider.find(endpoint="cost_report")[0].provider == "anthropic"


# --------------------------------------------------------------------------- server robustness


def test_keep_alive_and_concurrency(hx: httpx.Client, mock_provider: MockProvider, ctx: ssl.SSLContext) -> None:
    hx.post("/v1/chat/completions", json={"model": "m"})
    hx.post("/v1/chat/completions", json={"model": "m"})
    a, b = mock_provider.wait_for(2)
    assert a.client_addr == b.client_addr  # same connection

    def one(i: int) -> int:
        with httpx.Client(base_url=mock_provider.url, verify=ctx, trust_env=False, timeout=15) as c:
            r = c.post("/v1/chat/completions", json={"model": "m", "stream": True, "i": i},
                       headers={"x-mock-scenario": "slow; delay_ms=20; chunks=3"})
            return r.status_code

    with ThreadPoolExecutor(72) as pool:
        assert set(pool.map(one, range(72))) == {200}
    assert len(mock_provider.wait_for(74)) == 74


def test_client_disconnect_mid_stream(mock_provider: MockProvider, ctx: ssl.SSLContext, hx: httpx.Client) -> None:
    raw = socket.create_connection(("127.0.0.1", mock_provider.port))
    s = ctx.wrap_socket(raw, server_hostname="127.0.0.1")
    body = json.dumps({"model": "m", "stream": True}).encode()
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: api.openai.com\r\nContent-Type: application/json\r\n"
              b"x-mock-scenario: slow; delay_ms=50; chunks=20\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    assert b"200" in s.recv(100)
    s.close()
    rec = mock_provider.wait_for(1, timeout=5)[0]
    assert rec.client_disconnected and not rec.completed
    assert hx.post("/v1/chat/completions", json={"model": "m"}).status_code == 200


def test_scenario_parse() -> None:
    sc = Scenario.parse("slow; truncate; delay_ms=5, chunks=7")
    assert sc.flags == {"slow", "truncate"} and sc.delay_ms == 5 and sc.chunks == 7
    assert Scenario.parse("error", status=503).error_status == 503
    assert Scenario.parse("slow").stream_delay_s == 0.2
    with pytest.raises(ValueError):
        Scenario.parse("ok", bogus=1)


def test_standalone_process() -> None:
    root = Path(__file__).resolve().parents[2]
    p = subprocess.Popen([sys.executable, "-m", "tests.rig.mock_provider", "--port", "0"], cwd=root,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONPATH": str(root)})
    try:
        port = int(p.stdout.readline())
        r = httpx.post(f"https://127.0.0.1:{port}/v1/messages", json={"model": "c", "max_tokens": 1},
                       verify=False, trust_env=False)
        assert r.json()["usage"]["output_tokens"] == 5
    finally:
        p.terminate()
        p.wait(5)
    assert p.returncode == 0


# --------------------------------------------------------------------------- gateway rig (no process)


def test_gateway_config_rendering(tmp_path: Path, mock_provider: MockProvider) -> None:
    gw = GatewayProcess(tmp_path, mock_provider.url, overrides={
        "proxy": {"max_request_bytes": 1024},
        "budgets": {"fail_closed": False},
        "prices": {"overrides": {"openai:gpt-4o": Inline(input=2.5, output=10.0)}},
    }, extra_config='[alerts.slack]\nwebhook_url = "http://127.0.0.1:1/hook"\n')
    cfg = tomllib.loads(gw.config_path.read_text())
    assert cfg["proxy"]["listen"] == f"127.0.0.1:{gw.port}" and cfg["proxy"]["max_request_bytes"] == 1024
    assert cfg["providers"]["azure"] == {"api_key": "env:AZURE_OPENAI_API_KEY", "upstream": mock_provider.url,
                                         "verify_upstream_tls": False}
    assert set(cfg["providers"]) == set(UPSTREAM_KEYS)
    assert cfg["prices"]["overrides"]["openai:gpt-4o"] == {"input": 2.5, "output": 10.0}
    assert cfg["database"]["url"].startswith("sqlite:///") and cfg["alerts"]["slack"]["webhook_url"]
    env = gw.env()
    assert env["OPENAI_API_KEY"] == UPSTREAM_KEYS["openai"] and "HTTPS_PROXY" not in env
    cenv = gw.client_env("sg_abc_def")
    assert cenv["HTTPS_PROXY"] == f"http://dev:sg_abc_def@127.0.0.1:{gw.port}"
    assert cenv["SSL_CERT_FILE"] == str(gw.ca_path) and "NO_PROXY" not in cenv
    assert parse_json_output('note\n{"key": "k"}\n') == {"key": "k"}


def test_threads_do_not_leak_after_stop() -> None:
    before = threading.active_count()
    with MockProvider() as m:
        httpx.get(f"{m.url}/v1/models", verify=False, trust_env=False)
    time.sleep(0.2)
    assert threading.active_count() <= before + 1


# --------------------------------------------------------------------------- multipliers, usage-less answers


def settled(mock: MockProvider) -> Any:
    """The last request, once the mock has finished answering it (its usage is recorded after the write)."""
    return mock.wait_for(len(mock.requests))[-1]



def test_chat_n_choices_and_no_usage(oai: openai.OpenAI, mock_provider: MockProvider) -> None:
    r = oai.chat.completions.create(model="gpt-4o-mini", messages=MSGS, n=3)
    assert [c.index for c in r.choices] == [0, 1, 2] and r.usage.completion_tokens == 15
    assert settled(mock_provider).n == 3 and settled(mock_provider).tokens["output_tokens"] == 15
    chunks = list(oai.chat.completions.create(model="gpt-4o", messages=MSGS, n=2, stream=True,
                                              stream_options={"include_usage": True}))
    per_choice = [sum(1 for c in chunks for ch in c.choices if ch.index == i and ch.delta.content) for i in (0, 1)]
    assert per_choice == [5, 5] and chunks[-1].usage.completion_tokens == 10

    mock_provider.set_next("no_usage")
    r = oai.chat.completions.create(model="gpt-4o-mini", messages=MSGS)
    assert r.usage is None and r.choices[0].message.content == "".join(content_pieces(5))
    rec = settled(mock_provider)
    assert b'"usage"' not in rec.response_body and rec.usage is None and not rec.usage_sent
    mock_provider.set_next("no_usage")
    chunks = list(oai.chat.completions.create(model="gpt-4o", messages=MSGS, stream=True,
                                              stream_options={"include_usage": True}))
    assert all(c.usage is None for c in chunks) and b'"usage"' not in settled(mock_provider).response_body
    mock_provider.set_next("no_usage")
    completion = oai.completions.create(model="gpt-3.5-turbo-instruct", prompt="x")
    assert "usage" not in completion.model_dump(exclude_none=True)


def test_legacy_best_of_and_gemini_candidate_count(oai: openai.OpenAI, hx: httpx.Client,
                                                   mock_provider: MockProvider) -> None:
    r = oai.completions.create(model="gpt-3.5-turbo-instruct", prompt="x", n=2, best_of=3)
    assert len(r.choices) == 2 and r.usage.completion_tokens == 15  # billed for best_of
    body = {"contents": [{"role": "user", "parts": [{"text": "hi"}]}], "generationConfig": {"candidateCount": 2}}
    g = hx.post("/v1beta/models/gemini-2.0-flash:generateContent", json=body).json()
    assert [c["index"] for c in g["candidates"]] == [0, 1]
    assert g["usageMetadata"]["candidatesTokenCount"] == 10
    s = hx.post("/v1beta/models/gemini-2.0-flash:streamGenerateContent?alt=sse", json=body)
    last = json.loads([ln for ln in s.text.splitlines() if ln.startswith("data: ")][-1][6:])
    assert len(last["candidates"]) == 2 and last["usageMetadata"]["candidatesTokenCount"] == 10


# --------------------------------------------------------------------------- images, audio, files, batches


def test_images_generate_gpt_image_and_dalle(oai: openai.OpenAI, mock_provider: MockProvider) -> None:
    r = oai.images.generate(model="gpt-image-1", prompt="a red cube", n=2, size="1024x1536", quality="medium")
    rec = settled(mock_provider)
    assert rec.endpoint == "images" and len(r.data) == 2 and base64.b64decode(r.data[0].b64_json).startswith(b"\x89PNG")
    assert (r.usage.output_tokens, r.usage.input_tokens) == (2 * 1584, expected_input(rec.body))
    assert r.usage.input_tokens_details.text_tokens == r.usage.input_tokens
    assert r.usage.input_tokens_details.image_tokens == 0
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    assert (r.size, r.quality) == ("1024x1536", "medium")
    assert rec.usage == r.usage.model_dump(exclude_none=True) and rec.n == 2
    d = oai.images.generate(model="dall-e-3", prompt="a cube")
    assert d.usage is None and d.data[0].url and d.data[0].revised_prompt == "a cube"
    e = oai.images.edit(model="gpt-image-1", image=("in.png", b"\x89PNG" + b"\x00" * 3000, "image/png"), prompt="bluer")
    assert settled(mock_provider).endpoint == "image_edits" and e.usage.input_tokens_details.image_tokens == 3
    with oai.images.generate(model="gpt-image-1", prompt="x", stream=True, partial_images=1) as stream:
        kinds = [ev.type for ev in stream]
    assert kinds == ["image_generation.partial_image", "image_generation.completed"]
    assert settled(mock_provider).usage["output_tokens"] == 4160


def test_audio_speech_transcription_translation(oai: openai.OpenAI, hx: httpx.Client,
                                                mock_provider: MockProvider) -> None:
    speech = oai.audio.speech.create(model="gpt-4o-mini-tts", voice="alloy", input="Hello there")
    assert speech.response.headers["content-type"] == "audio/mpeg" and speech.content[:2] == b"\xff\xfb"
    rec = settled(mock_provider)
    assert rec.endpoint == "speech" and rec.model == "gpt-4o-mini-tts" and rec.tokens["input_characters"] == 11
    wav = oai.audio.speech.create(model="tts-1", voice="alloy", input="x", response_format="wav")
    assert wav.content[:4] == b"RIFF" and wav.response.headers["content-type"] == "audio/wav"

    audio = b"RIFF" + b"\x00" * 64000  # 2 s of 16 kHz 16-bit mono
    t = oai.audio.transcriptions.create(model="gpt-4o-transcribe", file=("a.wav", audio, "audio/wav"),
                                        prompt="abcdefgh")
    assert t.text == "".join(content_pieces(5))
    u = t.usage
    assert (u.type, u.input_token_details.audio_tokens, u.input_token_details.text_tokens) == ("tokens", 160, 2)
    assert (u.input_tokens, u.output_tokens, u.total_tokens) == (162, 5, 167)
    rec = settled(mock_provider)
    assert (rec.endpoint, rec.model, rec.usage["input_tokens"]) == ("transcriptions", "gpt-4o-transcribe", 162)
    w = oai.audio.transcriptions.create(model="whisper-1", file=("a.wav", audio, "audio/wav"))
    assert (w.usage.type, w.usage.seconds) == ("duration", 2.0)
    v = oai.audio.transcriptions.create(model="whisper-1", file=("a.wav", audio), response_format="verbose_json")
    assert v.duration == 2.0 and v.usage.seconds == 2.0
    assert oai.audio.transcriptions.create(model="whisper-1", file=("a.wav", audio), response_format="text").strip() \
        == "".join(content_pieces(5))
    stream = oai.audio.transcriptions.create(model="gpt-4o-mini-transcribe", file=("a.wav", audio), stream=True)
    evs = list(stream)
    assert [e.type for e in evs] == ["transcript.text.delta"] * 5 + ["transcript.text.done"]
    assert evs[-1].usage.output_tokens == 5
    tr = hx.post("/v1/audio/translations", data={"model": "whisper-1"}, files={"file": ("a.wav", audio)})
    assert tr.json() == {"text": "".join(content_pieces(5))} and settled(mock_provider).endpoint == "translations"


def test_files_batches_fine_tuning(oai: openai.OpenAI, hx: httpx.Client, mock_provider: MockProvider) -> None:
    line = json.dumps({"custom_id": "r1", "method": "POST", "url": "/v1/chat/completions",
                       "body": {"model": "gpt-4o-mini", "messages": MSGS}}).encode()
    f = oai.files.create(file=("batch.jsonl", line + b"\n"), purpose="batch")
    assert (f.object, f.bytes, f.filename, f.purpose) == ("file", len(line) + 1, "batch.jsonl", "batch")
    assert settled(mock_provider).endpoint == "files" and mock_provider.files[f.id]["content"] == line + b"\n"
    assert oai.files.content(f.id).content == line + b"\n" and oai.files.retrieve(f.id).id == f.id
    assert settled(mock_provider).endpoint == "file"
    assert hx.get("/v1/files/file-nope/content").status_code == 404
    b = oai.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert (b.object, b.status, b.model, b.request_counts.total) == ("batch", "validating", "gpt-4o-mini", 0)
    assert oai.batches.retrieve(b.id).id == b.id and mock_provider.find(endpoint="batches")[0].model == "gpt-4o-mini"
    j = oai.fine_tuning.jobs.create(model="gpt-4o-mini-2024-07-18", training_file=f.id)
    assert (j.object, j.status, j.training_file, j.hyperparameters.n_epochs) == ("fine_tuning.job", "validating_files",
                                                                              f.id, "auto")
    assert oai.fine_tuning.jobs.retrieve(j.id).id == j.id
    assert [r.endpoint for r in mock_provider.requests][-2:] == ["fine_tuning", "fine_tuning_job"]
