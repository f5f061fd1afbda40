"""The Policy stage: the body's size and shape, what the request is, and whether the key may make it."""

from __future__ import annotations

import asyncio
import gzip
import json

import pytest

from spendgate.providers.wire import EndpointKind
from spendgate.stages.call import Outcome
from spendgate.stages.policy import Policy
from spendgate.testing import tcall, tflow, tkey, tprovider

POLICY = Policy(max_request_bytes=4096)
CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 7, "stream": True}


def run(f: object) -> None:
    asyncio.run(POLICY.request(f))  # type: ignore[arg-type]


def test_what_the_request_is() -> None:
    f = tflow(body=CHAT)
    call = tcall(f, kind=EndpointKind.OTHER)
    run(f)
    assert f.response is None
    assert (call.endpoint_kind, call.model_requested, call.stream, call.max_output_tokens) == (
        EndpointKind.CHAT, "gpt-4o", True, 7)
    assert call.body == CHAT and call.request_bytes == len(json.dumps(CHAT))


def test_azure_names_the_model_in_its_path() -> None:
    path = "/openai/deployments/gpt4o-prod/chat/completions?api-version=2024-06-01"
    f = tflow("res.openai.azure.com", path, body={"messages": []})
    call = tcall(f, provider=tprovider("azure"), kind=EndpointKind.OTHER)
    run(f)
    assert call.model_requested == "gpt4o-prod"


def test_gemini_names_the_model_in_its_path() -> None:
    f = tflow("generativelanguage.googleapis.com", "/v1beta/models/gemini-2.0-flash:streamGenerateContent",
              body={"contents": [], "generationConfig": {"maxOutputTokens": 9}})
    call = tcall(f, provider=tprovider("gemini"), kind=EndpointKind.OTHER)
    run(f)
    assert (call.model_requested, call.stream, call.max_output_tokens) == ("gemini-2.0-flash", True, 9)


@pytest.mark.parametrize(("models", "allowed"), [((), True), (("gpt-4o*",), True), (("gpt-4o-mini",), False)])
def test_the_keys_model_allow_list(models: tuple[str, ...], allowed: bool) -> None:
    f = tflow(body=CHAT)
    call = tcall(f, key=tkey(models=models), kind=EndpointKind.OTHER)
    run(f)
    if allowed:
        assert f.response is None
    else:
        assert f.response is not None and f.response.status_code == 403
        assert call.outcome is Outcome.BLOCKED_POLICY and call.error == "spendgate_model_not_allowed"


def test_a_declared_length_over_the_limit_is_refused_at_the_headers_without_100_continue() -> None:
    f = tflow(body=CHAT, headers={"content-length": "5000", "expect": "100-continue"})
    call = tcall(f)
    POLICY.requestheaders(f)
    assert f.response is not None and f.response.status_code == 413
    assert "expect" not in f.request.headers and call.error == "spendgate_request_too_large"


@pytest.mark.parametrize(("raw", "encoding", "status", "code"), [
    (b"not json", None, 400, "spendgate_invalid_json"),
    (b'{"model": "a", "model": "b"}', None, 400, "spendgate_invalid_json"),
    (gzip.compress(b"{" + b" " * 10_000 + b"}"), "gzip", 413, "spendgate_request_too_large"),
    (b"\x1f\x8b garbage", "gzip", 400, "spendgate_invalid_body"),
    (b"{}", "xyz", 415, "spendgate_unsupported_encoding"),
], ids=["invalid", "duplicate-key", "decompresses-too-large", "corrupt-gzip", "unknown-encoding"])
def test_bodies_the_gateway_refuses(raw: bytes, encoding: str | None, status: int, code: str) -> None:
    f = tflow(body=raw, headers={"content-encoding": encoding} if encoding else None)
    call = tcall(f, kind=EndpointKind.OTHER)
    run(f)
    assert f.response is not None and f.response.status_code == status
    assert call.error == code and call.outcome is Outcome.BLOCKED_POLICY


def test_a_small_gzip_body_is_read_as_json() -> None:
    f = tflow(body=gzip.compress(json.dumps(CHAT).encode()), headers={"content-encoding": "gzip"})
    call = tcall(f, kind=EndpointKind.OTHER)
    run(f)
    assert f.response is None and call.body == CHAT


def test_a_non_model_endpoint_is_not_parsed() -> None:
    f = tflow(path="/v1/files", body=b"--boundary binary upload")
    call = tcall(f, kind=EndpointKind.OTHER)
    run(f)
    assert f.response is None and call.body is None and call.endpoint_kind is EndpointKind.FILES
