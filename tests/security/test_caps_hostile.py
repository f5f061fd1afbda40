"""Dodging a spend cap over HTTP, as a hostile developer would try it (issue 12), against a real
``spendgate serve`` (``gw_caps``: clamping on, unpriced models refused) and the TLS mock.

Each attack spells what a request asks for in a way a provider would still honour, but a naive
reader of the body would miss: answers asked for as floats or strings, limits in two fields, a
model hidden in a URL-encoded path or in Gemini's proto field names, a compressed body, a WAV
header that lies. Each must be refused before it reaches the mock, or sent with a limit the
reservation pays for. WebSockets are in ``test_caps_hostile_ws.py``.
"""

from __future__ import annotations

import gzip
import itertools
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.rig.gateway import GatewayProcess
from tests.rig.hostile import CALLS, HostileClient
from tests.rig.leaks import SecretScan
from tests.rig.ledger import Ledger
from tests.rig.mock_provider import MockProvider, RecordedRequest
from tests.rig.rawclient import basic
from tests.unit.stages.test_bodies import field, form, upload, wav

MSGS = [{"role": "user", "content": "Say hi."}]
MULTI = "gpt-4.1"  # $1 / $40 per 1M tokens (gw_caps' overrides)
OUT_USD = 40 / 1_000_000
CHAT = "https://api.openai.com/v1/chat/completions"
COMPLETIONS = "https://api.openai.com/v1/completions"
TRANSCRIBE = "https://api.openai.com/v1/audio/transcriptions"
AZURE = "https://myres.openai.azure.com/openai/deployments"
GEMINI = "https://generativelanguage.googleapis.com/v1beta/models/gemini-1.5-pro:generateContent"
LIMITED = "x-spendgate-output-limited"
LIMIT_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens")


@pytest.fixture(scope="module")
def lg(gw_caps: GatewayProcess) -> Iterator[Ledger]:
    ledger = Ledger.of(gw_caps)
    yield ledger
    ledger.close()


_seq = itertools.count(1)


def mint(lg: Ledger, scan: SecretScan, name: str, cap: str | None = "0.05", **kw: Any) -> str:
    """A key for a user of this test alone (the cap is the user's), known to the secret scan."""
    user = f"{name}-{next(_seq)}"
    key = str(lg.key(user, cap=cap, **kw)["key"])
    scan.add_key(f"gateway key of {user}@sec-caps", key)
    return key


def post(gw: GatewayProcess, scan: SecretScan, key: str, url: str, **kw: Any) -> httpx.Response:
    with gw.httpx_client(key, user="mallory") as h:
        r = h.post(url, **kw)
    scan.record_httpx(r)
    return r


def refused(r: httpx.Response, status: int = 429, code: str | int = "spendgate_budget_exceeded") -> None:
    assert r.status_code == status, r.text[:500]
    err = r.json()["error"]
    assert code in (err.get("code"), err.get("status")), err


def limits_sent(rec: RecordedRequest) -> dict[str, Any]:
    body = rec.json if isinstance(rec.json, dict) else json.loads(gzip.decompress(rec.body))
    return {k: body[k] for k in LIMIT_FIELDS if k in body}


# --------------------------------------------------------------------------- every answer asked for


@pytest.mark.parametrize("n", [10.0, "10", " 10 ", 1e2, 10**9], ids=["float", "string", "padded", "exponent", "huge"])
def test_n_however_spelled_counts_every_answer(gw_caps: GatewayProcess, lg: Ledger, scan: SecretScan,
                                               mock_provider: MockProvider, n: object) -> None:
    """One answer of 500 tokens ($0.02) fits a $0.05 cap; ten do not, nor ten of min_output_tokens (256)."""
    key = mint(lg, scan, "n")
    refused(post(gw_caps, scan, key, CHAT, json={"model": MULTI, "messages": MSGS, "max_tokens": 500, "n": n}))
    assert mock_provider.requests == []
    ok = post(gw_caps, scan, key, CHAT, json={"model": MULTI, "messages": MSGS, "max_tokens": 500, "n": 1})
    assert ok.status_code == 200, ok.text[:300]


def test_best_of_above_n_counts_every_generated_answer(gw_caps: GatewayProcess, lg: Ledger, scan: SecretScan,
                                                       mock_provider: MockProvider) -> None:
    key = mint(lg, scan, "best-of")
    body = {"model": "gpt-3.5-turbo-instruct", "prompt": "Say hi.", "max_tokens": 500, "n": 1, "best_of": 10}
    refused(post(gw_caps, scan, key, COMPLETIONS, json=body))
    assert mock_provider.requests == []


@pytest.mark.parametrize("config", [
    {"candidateCount": "8", "maxOutputTokens": 500},
    {"candidateCount": 8.0, "maxOutputTokens": "500"},
], ids=["string", "float"])
def test_gemini_candidate_count_however_spelled(gw_caps: GatewayProcess, lg: Ledger, scan: SecretScan,
                                                mock_provider: MockProvider, config: dict[str, Any]) -> None:
    key = mint(lg, scan, "gemini-candidates")
    body = {"contents": [{"role": "user", "parts": [{"text": "Say hi."}]}], "generationConfig": config}
    refused(post(gw_caps, scan, key, GEMINI, json=body), code="RESOURCE_EXHAUSTED")
    assert mock_provider.requests == []


def test_gemini_proto_field_names_are_read_too(gw_caps: GatewayProcess, lg: Ledger, scan: SecretScan,
                                               mock_provider: MockProvider) -> None:
    """Gemini's parser takes `generation_config` / `candidate_count` as well as the camelCase names."""
    key = mint(lg, scan, "gemini-snake")
    body = {"contents": [{"role": "user", "parts": [{"text": "Say hi."}]}],
            "generation_config": {"candidate_count": 8, "max_output_tokens": 500}}
    refused(post(gw_caps, scan, key, GEMINI, json=body), code="RESOURCE_EXHAUSTED")
    assert mock_provider.requests == []


# --------------------------------------------------------------------------- output limits


def assert_clamped(r: httpx.Response, rec: RecordedRequest, cap_usd: float) -> int:
    """Sent with a lowered limit the cap pays for, in every field the request used, and said so."""
    assert r.status_code == 200, r.text[:300]
    limit = int(r.headers[LIMITED])
    assert 256 <= limit and limit * OUT_USD <= cap_usd, limit
    sent = limits_sent(rec)
    assert sent and all(isinstance(v, int) and not isinstance(v, bool) and v <= limit for v in sent.values()), sent
    return limit


@pytest.mark.parametrize("limit", [64000.0, "64000", 64000.5, 10**15], ids=["float", "string", "fraction", "absurd"])
def test_an_output_limit_however_spelled_is_clamped(gw_caps: GatewayProcess, lg: Ledger, scan: SecretScan,
                                                    mock_provider: MockProvider, limit: object) -> None:
    """$0.50 pays for the default estimate (4096 tokens, $0.16) but not for 64,000 ($2.56): read
    as "no limit", the request would go out asking for 64,000."""
    key = mint(lg, scan, "limit", cap="0.50")
    r = post(gw_caps, scan, key, CHAT, json={"model": MULTI, "messages": MSGS, "max_tokens": limit})
    (rec,) = mock_provider.wait_for(1)
    assert_clamped(r, rec, 0.50)


def test_both_limit_fields_are_clamped_and_neither_is_raised(gw_caps: GatewayProcess, lg: Ledger, scan: SecretScan,
                                                             mock_provider: MockProvider) -> None:
    """A provider may honour either field: the larger counts, and both go out at most the lowered limit."""
    key = mint(lg, scan, "both-limits", cap="0.50")
    body = {"model": MULTI, "messages": MSGS, "max_completion_tokens": 100, "max_tokens": 64000}
    r = post(gw_caps, scan, key, CHAT, json=body)
    (rec,) = mock_provider.wait_for(1)
    limit = assert_clamped(r, rec, 0.50)
    assert limits_sent(rec) == {"max_completion_tokens": 100, "max_tokens": limit}


@pytest.mark.parametrize("limit", [None, -1], ids=["none", "negative"])
def test_the_limit_sent_is_the_one_reserved(gw_caps: GatewayProcess, lg: Ledger, scan: SecretScan,
                                            mock_provider: MockProvider, limit: int | None) -> None:
    """A capped request that sets no output limit (or one no provider takes) is held at [budgets]
    default_max_output_tokens and sent with that limit: else the provider may write up to the model's
    own maximum, and N such requests in flight pass the cap by N times that."""
    key = mint(lg, scan, "no-limit", cap="0.50")
    body: dict[str, Any] = {"model": MULTI, "messages": MSGS}
    if limit is not None:
        body["max_tokens"] = limit
    r = post(gw_caps, scan, key, CHAT, json=body)
    assert r.status_code in (200, 400), r.text[:300]
    if r.status_code == 200:
        (rec,) = mock_provider.wait_for(1)
        sent = limits_sent(rec)
        assert sent and all(isinstance(v, int) and 0 < v <= 4096 for v in sent.values()), sent
        assert int(r.headers[LIMITED]) == max(sent.values())  # the client is told the limit it was given


def test_a_gzip_body_is_clamped_and_sent_gzip_encoded(gw_caps: GatewayProcess, lg: Ledger, scan: SecretScan,
                                                      mock_provider: MockProvider) -> None:
    key = mint(lg, scan, "gzip-clamp", cap="0.50")
    raw = json.dumps({"model": MULTI, "messages": MSGS, "max_tokens": 64000}).encode()
    r = post(gw_caps, scan, key, CHAT, content=gzip.compress(raw),
             headers={"content-type": "application/json", "content-encoding": "gzip"})
    (rec,) = mock_provider.wait_for(1)
    limit = int(r.headers[LIMITED])
    assert rec.header("content-encoding") == "gzip" and int(rec.header("content-length") or 0) == len(rec.body)
    sent = json.loads(gzip.decompress(rec.body))  # re-encoded as the request says, not sent as plain JSON
    assert sent["max_tokens"] == limit and 256 <= limit and limit * OUT_USD <= 0.50
    assert {k: v for k, v in sent.items() if k not in ("max_tokens", "max_completion_tokens")} == {
        k: v for k, v in json.loads(raw).items() if k != "max_tokens"}


# --------------------------------------------------------------------------- the model in the path


@pytest.mark.parametrize("deployment", ["gpt%2D4.1", "gpt-4%2E1", "%67pt-4.1"])
def test_an_url_encoded_azure_deployment_is_the_model_checked(gw_caps: GatewayProcess, lg: Ledger,
                                                              scan: SecretScan, mock_provider: MockProvider,
                                                              deployment: str) -> None:
    key = mint(lg, scan, "azure-encoded", cap="1.00", models=["gpt-4o-mini*"])
    url = f"{AZURE}/{deployment}/chat/completions?api-version=2024-10-21"
    refused(post(gw_caps, scan, key, url, json={"model": "gpt-4o-mini", "messages": MSGS}), 403,
            "spendgate_model_not_allowed")
    assert mock_provider.requests == []


def test_an_url_encoded_allowed_deployment_is_priced_as_its_model(gw_caps: GatewayProcess, lg: Ledger,
                                                                  scan: SecretScan,
                                                                  mock_provider: MockProvider) -> None:
    user = "azure-encoded-ok"
    key = str(lg.key(user, cap="1.00", models=["gpt-4o-mini*"])["key"])
    scan.add_key(f"gateway key of {user}@sec-caps", key)
    url = f"{AZURE}/gpt-4o%2Dmini/chat/completions?api-version=2024-10-21"
    r = post(gw_caps, scan, key, url, json={"model": "gpt-4.1", "messages": MSGS, "max_tokens": 16})
    assert r.status_code == 200, r.text[:300]
    (row,) = lg.settled(user, 1)
    assert (row["model_requested"], row["cost_source"]) == ("gpt-4o-mini", "override"), row
    assert row["cost_nusd"] == row["input_tokens"] * 1000 + row["output_tokens"] * 40_000


@pytest.mark.parametrize("path", [
    "/openai/deployments/gpt-4o-mini/../gpt-4.1/chat/completions?api-version=2024-10-21",
    "/openai/deployments/gpt-4o-mini/%2E%2E/gpt-4.1/chat/completions?api-version=2024-10-21",
    "/openai/deployments/gpt-4o-mini/./../gpt-4.1/chat/completions?api-version=2024-10-21",
])
def test_dot_segments_cannot_hide_the_deployment(gw_caps: GatewayProcess, lg: Ledger, scan: SecretScan,
                                                 mock_provider: MockProvider, path: str) -> None:
    """An upstream that normalises the path would answer as gpt-4.1, which the key may not use."""
    key = mint(lg, scan, "azure-dots", cap="1.00", models=["gpt-4o-mini*"])
    hostile = HostileClient(gw_caps, scan.record)
    with hostile.tunnel("myres.openai.azure.com:443", auth=basic("mallory", key)) as conn:
        resp = conn.exchange(CALLS["azure"].raw(host="myres.openai.azure.com", target=path))
    assert (resp.status, resp.json()["error"]["code"]) == (400, "spendgate_invalid_path"), resp.body[:300]
    assert mock_provider.requests == []


# --------------------------------------------------------------------------- audio that lies about its length

ONE_SECOND = wav(1)


@pytest.mark.parametrize("audio", [
    wav(60, data_size=32_000),  # the data chunk "is" one second; 59 more follow it
    wav(60, byte_rate=60 * 32_000),  # a byte rate sixty times the sample rate's
    ONE_SECOND + b"data" + (59 * 32_000).to_bytes(4, "little") + b"\0" * 59 * 32_000,  # a second data chunk
], ids=["data-size", "byte-rate", "second-chunk"])
def test_a_wav_header_claiming_one_second_does_not_price_a_minute(gw_caps: GatewayProcess, lg: Ledger,
                                                                   scan: SecretScan, mock_provider: MockProvider,
                                                                   audio: bytes) -> None:
    """whisper-1 at $0.006 a minute, a $0.001 cap: one second fits, a minute does not (the mock, as
    a decoder would, bills the bytes: len / 32,000 seconds)."""
    key = mint(lg, scan, "wav", cap="0.001")
    raw = form(field("model", "whisper-1"), upload(audio))
    ct = "multipart/form-data; boundary=sg-boundary"
    refused(post(gw_caps, scan, key, TRANSCRIBE, content=raw, headers={"content-type": ct}))
    assert mock_provider.requests == []
    ok = post(gw_caps, scan, key, TRANSCRIBE, content=form(field("model", "whisper-1"), upload(ONE_SECOND)),
              headers={"content-type": ct})
    assert ok.status_code == 200, ok.text[:300]


@pytest.mark.parametrize("content_type, parts", [
    # The file part named without quotes: a lenient parser still reads it as `file`.
    ("multipart/form-data; boundary=sg-boundary",
     [field("model", "whisper-1"), upload(b"\xff\xfb" * 60_000, "name=file; filename=speech.mp3", None)]),
    # Two boundaries: the provider may split on the second, and find what the first hides.
    ("multipart/form-data; boundary=sg-boundary; boundary=other", [field("model", "whisper-1")]),
    # The model named twice: the provider may read the other one.
    ("multipart/form-data; boundary=sg-boundary", [field("model", "whisper-1"), field("model", "gpt-4o-transcribe"),
                                                   upload(ONE_SECOND)]),
], ids=["unquoted-name", "two-boundaries", "two-models"])
def test_forms_a_provider_would_read_differently_are_not_sent(gw_caps: GatewayProcess, lg: Ledger, scan: SecretScan,
                                                              mock_provider: MockProvider, content_type: str,
                                                              parts: list[tuple[str, bytes]]) -> None:
    key = mint(lg, scan, "form", cap="0.001")
    r = post(gw_caps, scan, key, TRANSCRIBE, content=form(*parts), headers={"content-type": content_type})
    assert r.status_code in (400, 429), r.text[:300]
    assert mock_provider.requests == []
