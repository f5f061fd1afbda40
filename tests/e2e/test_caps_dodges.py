"""Caps that cannot be dodged (issue 12), through real `spendgate serve` processes and real SDKs:
unknown prices (refused, or settled at the fallback rates; unknown for uncapped callers, with one
Slack alert a day), `n` / `best_of` / `candidateCount`, models named by the path (Azure, Gemini),
images and audio priced, batches and fine-tuning refused for capped callers unless allowed, answers
without usage counted from their text, and output clamping (the agent asking for 64,000 tokens).

Three gateways, one per config, shared by the tests that use it:

* ``gw``: the defaults (``unknown_model = "refuse"``, ``clamp_output = true``, ``min_output_tokens =
  256``, ``allow_unmetered = []`` — none of them written in its config), plus Slack and token price
  overrides for the multiplier tests;
* ``fallback_gw``: ``unknown_model = "fallback"`` (default rates), ``clamp_output = false``,
  ``allow_unmetered = ["batches"]``;
* ``media_gw``: the defaults plus ``per_image`` / ``per_million_characters`` / ``per_minute`` overrides.

Every refusal is checked against the mock: a refused request never reaches it. Spend is measured
from the audit rows (``cost_usd``).
"""

from __future__ import annotations

import io
import re
import struct
import time
import wave
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any

import anthropic
import httpx
import openai
import pytest

from tests.rig.gateway import GatewayProcess, Inline
from tests.rig.ledger import Ledger, Row, nusd, usd
from tests.rig.mock_provider import MockProvider, RecordedRequest, content_pieces
from tests.rig.slack_mock import SlackMock, SlackRequest

MSGS = [{"role": "user", "content": "Say hi."}]
TEXT = "".join(content_pieces(5))  # the mock's default answer
OMEGA = "gpt-9-omega"  # a model no price list knows
OPUS = "claude-opus-4-1"  # genai-prices: $15 / $75 per 1M tokens
OPUS_OUT = Decimal(75) / 1_000_000
GPT4O_OUT = Decimal(10) / 1_000_000  # gpt-4o, genai-prices: $2.50 / $10 per 1M
# The multiplier tests' models: priced by override at $1 / $40 per 1M tokens.
MULTI, INSTRUCT, GEMINI_MULTI = "gpt-4.1", "gpt-3.5-turbo-instruct", "gemini-1.5-pro"
MULTI_OUT = Decimal(40) / 1_000_000
TOKEN_PRICES = {f"openai:{MULTI}": Inline(input=1.0, output=40.0), f"openai:{INSTRUCT}": Inline(input=1.0, output=40.0),
                f"gemini:{GEMINI_MULTI}": Inline(input=1.0, output=40.0)}
# Media priced by what they bill. Token prices of 0 so only the media unit counts.
MEDIA_PRICES = {"openai:dall-e-3": Inline(input=0.0, output=0.0, per_image=0.04),
                "openai:tts-1-hd": Inline(input=0.0, output=0.0, per_million_characters=20.0),
                "openai:whisper-1": Inline(input=0.0, output=0.0, per_minute=0.012)}
FALLBACK_IN_NUSD, FALLBACK_OUT_NUSD = 15_000, 75_000  # the default fallback: $15 / $75 per 1M tokens, per token
LIMITED = "x-spendgate-output-limited"
AZURE = "https://myres.openai.azure.com"
GEMINI = "https://generativelanguage.googleapis.com/v1beta/models"
MISTRAL = "https://api.mistral.ai/v1"
LIMIT_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens")


# --------------------------------------------------------------------------- gateways


@pytest.fixture(scope="module")
def slack_server() -> Iterator[SlackMock]:
    with SlackMock() as s:
        yield s


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, _mock_provider_session: MockProvider,
       slack_server: SlackMock) -> Iterator[GatewayProcess]:
    """The defaults: nothing of issue 12 is written in this config."""
    g = GatewayProcess(tmp_path_factory.mktemp("e2e-caps-defaults"), _mock_provider_session.url, name="caps-defaults",
                       overrides={"prices": {"overrides": TOKEN_PRICES},
                                  "alerts": {"slack": {"webhook_url": slack_server.webhook_url,
                                                       "thresholds": [50, 80, 100]}}})
    g.start()
    yield g
    g.stop()


@pytest.fixture(scope="module")
def fallback_gw(tmp_path_factory: pytest.TempPathFactory, _mock_provider_session: MockProvider,
                ) -> Iterator[GatewayProcess]:
    g = GatewayProcess(tmp_path_factory.mktemp("e2e-caps-fallback"), _mock_provider_session.url, name="caps-fallback",
                       overrides={"prices": {"unknown_model": "fallback", "overrides": TOKEN_PRICES},
                                  "budgets": {"clamp_output": False, "allow_unmetered": ["batches"]}})
    g.start()
    yield g
    g.stop()


@pytest.fixture(scope="module")
def media_gw(tmp_path_factory: pytest.TempPathFactory, _mock_provider_session: MockProvider,
             ) -> Iterator[GatewayProcess]:
    g = GatewayProcess(tmp_path_factory.mktemp("e2e-caps-media"), _mock_provider_session.url, name="caps-media",
                       overrides={"prices": {"overrides": {**TOKEN_PRICES, **MEDIA_PRICES}}})
    g.start()
    yield g
    g.stop()


@pytest.fixture(autouse=True)
def _attach_logs(request: pytest.FixtureRequest) -> None:
    """conftest attaches the logs of these gateways to a failing test's report."""
    request.node._spendgate_gateways = [request.getfixturevalue(n) for n in ("gw", "fallback_gw", "media_gw")
                                        if n in request.fixturenames]


_ledgers: dict[str, Ledger] = {}


def ledger(gw: GatewayProcess) -> Ledger:
    """The gateway's database, read directly (see tests/rig/ledger.py)."""
    if gw.db_url not in _ledgers:
        _ledgers[gw.db_url] = Ledger.of(gw)
    return _ledgers[gw.db_url]


@pytest.fixture(scope="module", autouse=True)
def _close_ledgers() -> Iterator[None]:
    yield
    for lg in _ledgers.values():
        lg.close()
    _ledgers.clear()


# --------------------------------------------------------------------------- helpers


def error_body(e: Any) -> dict[str, Any]:
    """The provider-shaped error JSON of an SDK exception (or an httpx response)."""
    resp = e if isinstance(e, httpx.Response) else e.response
    body = resp.json()
    assert isinstance(body, dict) and isinstance(body.get("error"), dict), body
    return body


def error_message(e: Any) -> str:
    return str(error_body(e)["error"]["message"])


def scenario(spec: str) -> dict[str, str]:
    """Headers choosing the mock's scenario for one request (the gateway passes them on)."""
    return {"x-mock-scenario": spec}


def cost_of(row: Row) -> Decimal:
    assert row["cost_usd"] is not None, row
    return Decimal(row["cost_usd"])


def only(rows: list[Row], **match: Any) -> Row:
    """The one row whose fields equal ``match``."""
    found = [r for r in rows if all(r.get(k) == v for k, v in match.items())]
    assert len(found) == 1, (match, [{k: r.get(k) for k in ("endpoint_kind", "model_requested", "outcome")}
                                     for r in rows])
    return found[0]


def limits_sent(rec: RecordedRequest) -> dict[str, int]:
    """Every output-limit field of the request the mock received (Gemini's as ``maxOutputTokens``)."""
    body = rec.json if isinstance(rec.json, dict) else {}
    out = {k: body[k] for k in LIMIT_FIELDS if k in body}
    gc = body.get("generationConfig") or {}
    if "maxOutputTokens" in gc:
        out["maxOutputTokens"] = gc["maxOutputTokens"]
    return out


def limited(headers: Any) -> int | None:
    v = headers.get(LIMITED)
    return int(v) if v is not None else None


def fallback_nusd(input_tokens: int, output_tokens: int) -> int:
    return input_tokens * FALLBACK_IN_NUSD + output_tokens * FALLBACK_OUT_NUSD


def wav_seconds(seconds: int, rate: int = 16_000) -> bytes:
    """A real WAV file of silence: 16-bit mono (the mock bills len(file) / 32000 seconds)."""
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(struct.pack("<h", 0) * rate * seconds)
    return buf.getvalue()


def kind_of(msg: SlackRequest) -> str:
    """An alert's kind, from its context block ("unpriced_model · <dedupe key>")."""
    try:
        return str(msg.blocks[-1]["elements"][0]["text"]).split(" ", 1)[0]
    except (IndexError, KeyError, TypeError):
        return ""


def spend_to(gw: GatewayProcess, key: str, user: str, usd_amount: str) -> None:
    """One gpt-4o chat that costs exactly ``usd_amount`` ($2.50 per 1M prompt tokens, no output)."""
    tokens = int(Decimal(usd_amount) * 1_000_000 / Decimal("2.5"))
    gw.openai_client(key).chat.completions.create(model="gpt-4o", messages=MSGS, max_tokens=1,
                                                  extra_headers=scenario(f"ok; input_tokens={tokens}; output_tokens=0"))
    rows = ledger(gw).settled(user, where=lambda rs: any(r["outcome"] == "completed" for r in rs))
    assert ledger(gw).held("user", user)[0] == nusd(usd_amount), rows


# --------------------------------------------------------------------------- 1. unknown prices


def test_unpriced_model_is_refused_for_a_capped_caller_with_the_line_to_add(
        gw: GatewayProcess, mock_provider: MockProvider) -> None:
    key = gw.create_key("unpriced-capped", cap="0.05", period="day")["key"]  # the CLI, as an admin does it
    with pytest.raises(openai.PermissionDeniedError) as oi:
        gw.openai_client(key).chat.completions.create(model=OMEGA, messages=MSGS, max_tokens=16)
    e = oi.value
    assert e.status_code == 403 and e.code == "spendgate_unpriced_model", error_body(e)
    msg = error_message(e)
    for part in (OMEGA, "[prices.overrides]", f'"openai:{OMEGA}" = {{ input = '):
        assert part in msg, (part, msg)
    # Anthropic-shaped, with the provider's own prefix in the line to add.
    with pytest.raises(anthropic.PermissionDeniedError) as ai:
        gw.anthropic_client(key).messages.create(model="claude-9-omega", max_tokens=16, messages=MSGS)
    assert ai.value.status_code == 403
    assert '"anthropic:claude-9-omega" = { input = ' in error_message(ai.value), error_message(ai.value)
    assert mock_provider.requests == [], "an unpriced request of a capped caller must not go upstream"

    ledger(gw).settled("unpriced-capped", 2)
    rows = gw.cli_json("audit", "--user", "unpriced-capped")  # as an admin reads them
    assert sorted((r["model_requested"], r["outcome"], r["status_code"]) for r in rows) == [
        ("claude-9-omega", "blocked_policy", 403), (OMEGA, "blocked_policy", 403)]


def test_unpriced_model_is_served_to_an_uncapped_caller_and_recorded_as_unknown(
        gw: GatewayProcess, mock_provider: MockProvider) -> None:
    key = ledger(gw).key("unpriced-free")["key"]
    out = gw.openai_client(key).chat.completions.create(model=OMEGA, messages=MSGS, max_tokens=16)
    assert out.choices[0].message.content == TEXT
    rec = mock_provider.wait_for(1)[0]
    ledger(gw).settled("unpriced-free", 1)
    (row,) = gw.cli_json("audit", "--user", "unpriced-free")
    assert (row["outcome"], row["status_code"], row["model_requested"]) == ("completed", 200, OMEGA)
    assert row["cost_source"] == "unknown" and row["cost_usd"] is None, row
    assert (row["input_tokens"], row["output_tokens"]) == (rec.tokens["input_tokens"], rec.tokens["output_tokens"])


def test_unpriced_model_alerts_admins_once_a_day(gw: GatewayProcess, mock_provider: MockProvider,
                                                 slack_server: SlackMock) -> None:
    model = "gpt-9-sigma"  # a model of its own: the alert is once per model per day, gateway-wide
    key = ledger(gw).key("unpriced-alert")["key"]
    client = gw.openai_client(key)
    for _ in range(2):
        client.chat.completions.create(model=model, messages=MSGS, max_tokens=16)
    assert len(mock_provider.wait_for(2)) == 2

    def unpriced(m: SlackRequest) -> bool:
        return kind_of(m) == "unpriced_model" and model in m.body.decode(errors="replace")

    slack_server.wait_for(1, timeout=15, where=unpriced)
    time.sleep(2.5)  # two evaluator ticks and a retry: a second message would be here by now
    assert len([m for m in slack_server.messages if unpriced(m)]) == 1


def test_fallback_settles_an_unpriced_model_at_the_fallback_rates(
        fallback_gw: GatewayProcess, mock_provider: MockProvider) -> None:
    gw = fallback_gw
    key = ledger(gw).key("fallback-one", cap="1.00")["key"]
    out = gw.openai_client(key).chat.completions.create(model=OMEGA, messages=MSGS, max_tokens=16)
    assert out.choices[0].message.content == TEXT
    rec = mock_provider.wait_for(1)[0]
    (row,) = ledger(gw).settled("fallback-one", 1)
    assert (row["outcome"], row["cost_source"]) == ("completed", "fallback"), row
    t = rec.tokens
    assert (row["input_tokens"], row["output_tokens"]) == (t["input_tokens"], t["output_tokens"])
    assert row["cost_nusd"] == fallback_nusd(t["input_tokens"], t["output_tokens"]), row  # $15 / $75 per 1M, exactly
    assert ledger(gw).held("user", "fallback-one") == (row["cost_nusd"], 0)


def test_fallback_holds_the_cap_against_twenty_20000_token_requests(
        fallback_gw: GatewayProcess, mock_provider: MockProvider) -> None:
    """The issue's dodge: twenty requests the provider bills at 20,000 prompt tokens each (the
    prompt the gateway sees is small) went through a $0.01 cap at $0."""
    gw, cap = fallback_gw, Decimal("0.01")
    key = ledger(gw).key("fallback-burst", cap=str(cap))["key"]
    client = gw.openai_client(key)
    statuses = []
    for _ in range(20):
        try:
            client.chat.completions.create(model=OMEGA, messages=MSGS, max_tokens=16,
                                           extra_headers=scenario("ok; input_tokens=20000"))
            statuses.append(200)
        except openai.RateLimitError as e:
            assert e.code == "spendgate_budget_exceeded", error_body(e)
            statuses.append(429)
    served = statuses.count(200)
    assert served >= 1 and len(mock_provider.requests) == served, statuses
    rows = ledger(gw).settled("fallback-burst", 20)
    completed = [r for r in rows if r["outcome"] == "completed"]
    assert len(completed) == served and all(r["outcome"] == "blocked_cap" for r in rows if r not in completed)
    for r in completed:
        assert r["cost_source"] == "fallback" and r["cost_nusd"] == fallback_nusd(r["input_tokens"], r["output_tokens"])
    one_request = usd(fallback_nusd(20000, 5))  # $0.300375: what one of them really costs
    total = sum(cost_of(r) for r in completed)
    assert total <= cap + one_request, f"spent {total} against a {cap} cap ({served} served)"


# --------------------------------------------------------------------------- 2. multipliers


def _chat_n(gw: GatewayProcess, key: str, mult: int, limit: int) -> Any:
    return gw.openai_client(key).chat.completions.with_raw_response.create(
        model=MULTI, messages=MSGS, max_tokens=limit, n=mult)


def _completions_best_of(gw: GatewayProcess, key: str, mult: int, limit: int) -> Any:
    return gw.openai_client(key).completions.with_raw_response.create(
        model=INSTRUCT, prompt="Say hi.", max_tokens=limit, best_of=mult)


def _completions_n(gw: GatewayProcess, key: str, mult: int, limit: int) -> Any:
    return gw.openai_client(key).completions.with_raw_response.create(
        model=INSTRUCT, prompt="Say hi.", max_tokens=limit, n=mult)


def _gemini_candidates(gw: GatewayProcess, key: str, mult: int, limit: int) -> Any:
    body = {"contents": [{"role": "user", "parts": [{"text": "Say hi."}]}],
            "generationConfig": {"candidateCount": mult, "maxOutputTokens": limit}}
    with gw.httpx_client(key) as h:
        return h.post(f"{GEMINI}/{GEMINI_MULTI}:generateContent", json=body)


MULTIPLIERS = {"chat-n": _chat_n, "completions-best_of": _completions_best_of, "completions-n": _completions_n,
               "gemini-candidateCount": _gemini_candidates}


@pytest.mark.parametrize("shape", list(MULTIPLIERS))
def test_every_answer_asked_for_counts_in_the_estimate(fallback_gw: GatewayProcess, mock_provider: MockProvider,
                                                       shape: str) -> None:
    """500 tokens a choice at $40 per 1M: one answer is $0.02 and fits a $0.05 cap, ten are $0.20
    and do not (clamp_output = false, so the request is refused rather than lowered)."""
    gw, send = fallback_gw, MULTIPLIERS[shape]
    user = f"mult-{shape}"
    key = ledger(gw).key(user, cap="0.05")["key"]
    ok = send(gw, key, 1, 500)
    assert ok.status_code == 200
    assert len(mock_provider.wait_for(1)) == 1
    ledger(gw).settled(user, 1)
    if shape.startswith("gemini"):
        r = send(gw, key, 10, 500)
        assert r.status_code == 429, r.text
        assert error_body(r)["error"]["status"] == "RESOURCE_EXHAUSTED"
    else:
        with pytest.raises(openai.RateLimitError) as oi:
            send(gw, key, 10, 500)
        assert oi.value.code == "spendgate_budget_exceeded"
        m = re.search(r"estimated \$([0-9.]+)", error_message(oi.value))
        if m:  # the estimate it names counts the ten answers
            assert Decimal(m.group(1)) >= 10 * 500 * MULTI_OUT, error_message(oi.value)
    assert len(mock_provider.requests) == 1, "the ten-answer request must not reach the provider"
    rows = ledger(gw).settled(user, 2)
    assert [r["outcome"] for r in rows] == ["completed", "blocked_cap"]


def test_five_n10_requests_without_clamping_are_refused_once_the_estimate_with_n_passes(
        fallback_gw: GatewayProcess, mock_provider: MockProvider) -> None:
    """Each request uses every token it may: 10 choices x 500 tokens = $0.20 against a $0.25 cap.
    Counted as one answer ($0.02), the second would fit too; counted as ten, it does not."""
    gw, cap, user = fallback_gw, Decimal("0.25"), "n10-noclamp"
    key = ledger(gw).key(user, cap=str(cap))["key"]
    client = gw.openai_client(key)
    statuses = []
    for i in range(5):
        try:
            raw = client.chat.completions.with_raw_response.create(
                model=MULTI, messages=MSGS, max_tokens=500, n=10, extra_headers=scenario("ok; chunks=500"))
            assert limited(raw.headers) is None  # clamp_output = false: never lowered
            assert limits_sent(mock_provider.last) == {"max_tokens": 500}
            statuses.append(200)
        except openai.RateLimitError as e:
            assert e.code == "spendgate_budget_exceeded" and LIMITED not in e.response.headers
            statuses.append(429)
        ledger(gw).settled(user, i + 1)  # settle before the next, so the outcome is determined
    assert statuses == [200, 429, 429, 429, 429]
    assert len(mock_provider.requests) == 1
    rows = ledger(gw).rows(user)
    total = sum(cost_of(r) for r in rows if r["outcome"] == "completed")
    assert Decimal("0.20") <= total <= cap, total


def test_five_n10_requests_with_clamping_get_a_lower_limit_per_choice_and_never_pass_the_cap(
        gw: GatewayProcess, mock_provider: MockProvider) -> None:
    """10 choices x 2000 tokens ($0.80) asked against a $0.25 cap: each is sent with the per-choice
    limit the remaining budget pays for, until fewer than min_output_tokens (256) fit."""
    cap, user, n = Decimal("0.25"), "n10-clamp", 10
    key = ledger(gw).key(user, cap=str(cap))["key"]
    client = gw.openai_client(key)
    served = 0
    for i in range(5):
        remaining = cap - usd(ledger(gw).held("user", user)[0])
        before = len(mock_provider.requests)
        try:
            raw = client.chat.completions.with_raw_response.create(
                model=MULTI, messages=MSGS, max_tokens=2000, n=n,
                extra_headers=scenario("ok; chunks=100"))  # 100 of the (>= 256) tokens each choice may use
        except openai.RateLimitError as e:
            assert e.code == "spendgate_budget_exceeded", error_body(e)
            assert len(mock_provider.requests) == before
            # refused only when not even min_output_tokens per choice fit (the prompt costs ~$0.0001)
            assert remaining < 256 * n * MULTI_OUT + Decimal("0.001"), remaining
        else:
            served += 1
            limit = limited(raw.headers)
            assert limit is not None, dict(raw.headers)
            assert 256 <= limit < 2000 and n * limit * MULTI_OUT <= remaining, (limit, remaining)
            assert set(limits_sent(mock_provider.last).values()) == {limit}, limits_sent(mock_provider.last)
            if i == 0:  # all of the cap was left: the limit is what it pays for, not a token of it less than half
                assert n * limit * MULTI_OUT >= cap / 2, limit
        ledger(gw).settled(user, i + 1)
    assert served >= 1
    total = sum(cost_of(r) for r in ledger(gw).rows(user) if r["outcome"] == "completed")
    assert total <= cap, f"spent {total} against a {cap} cap"


# --------------------------------------------------------------------------- 3. the path names the model


def azure_client(gw: GatewayProcess, key: str, deployment: str) -> openai.AzureOpenAI:
    http = openai.DefaultHttpxClient(proxy=gw.proxy_url(key), verify=gw.ssl_context(), trust_env=False)
    return openai.AzureOpenAI(api_key="unused", api_version="2024-10-21", azure_endpoint=AZURE,
                              azure_deployment=deployment, http_client=http, max_retries=0)


def test_azure_deployment_in_the_path_is_the_model_the_allow_list_checks(
        gw: GatewayProcess, mock_provider: MockProvider) -> None:
    key = ledger(gw).key("azure-picky", models=["gpt-4o-mini*"])["key"]
    with pytest.raises(openai.PermissionDeniedError) as oi:  # the body names an allowed model; the path wins
        azure_client(gw, key, "gpt-4o-prod").chat.completions.create(model="gpt-4o-mini", messages=MSGS)
    assert oi.value.status_code == 403 and oi.value.code == "spendgate_model_not_allowed", error_body(oi.value)
    assert mock_provider.requests == []
    out = azure_client(gw, key, "gpt-4o-mini").chat.completions.create(model="gpt-4o", messages=MSGS)
    assert out.choices[0].message.content == TEXT
    (rec,) = mock_provider.wait_for(1)
    assert rec.deployment == "gpt-4o-mini"


def test_gemini_model_in_the_path_is_the_model_the_allow_list_checks(
        gw: GatewayProcess, mock_provider: MockProvider) -> None:
    key = ledger(gw).key("gemini-picky", models=["gemini-2.0-flash*"])["key"]
    contents = [{"role": "user", "parts": [{"text": "Say hi."}]}]
    with gw.httpx_client(key) as h:
        r = h.post(f"{GEMINI}/gemini-2.5-pro:generateContent", json={"model": "models/gemini-2.0-flash",
                                                                      "contents": contents})
        assert r.status_code == 403, r.text
        assert error_body(r)["error"]["code"] == 403 and error_body(r)["error"]["status"] == "PERMISSION_DENIED"
        assert mock_provider.requests == []
        r = h.post(f"{GEMINI}/gemini-2.0-flash:generateContent", json={"model": "models/gemini-2.5-pro",
                                                                       "contents": contents})
        assert r.status_code == 200, r.text
    (rec,) = mock_provider.wait_for(1)
    assert rec.model == "gemini-2.0-flash"


# --------------------------------------------------------------------------- 4. other billable endpoints

TTS_TEXT = ("The quick brown fox jumps over the lazy dog. " * 3)[:100]  # 100 characters
WAV_10S = wav_seconds(10)  # whisper bills 10 seconds


def _image_gpt(client: Any) -> None:
    client.images.generate(model="gpt-image-1", prompt="A red square.", quality="low", size="1024x1024")


def _image_dalle(client: Any) -> None:
    client.images.generate(model="dall-e-3", prompt="A red square.", n=1, size="1024x1024")


def _speech(model: str) -> Callable[[Any], None]:
    def send(client: Any) -> None:
        client.audio.speech.create(model=model, voice="alloy", input=TTS_TEXT).read()
    return send


def _transcription(client: Any) -> None:
    client.audio.transcriptions.create(model="whisper-1", file=("speech.wav", WAV_10S, "audio/wav"))


MEDIA = {"gpt-image-1": _image_gpt, "dall-e-3": _image_dalle, "tts-1": _speech("tts-1"),
         "tts-1-hd": _speech("tts-1-hd"), "whisper-1": _transcription}


def test_images_and_audio_are_priced_and_audited(media_gw: GatewayProcess, mock_provider: MockProvider) -> None:
    gw, user = media_gw, "media"
    key = ledger(gw).key(user, cap="5.00")["key"]
    client = gw.openai_client(key)
    for send in MEDIA.values():
        send(client)
    recs = mock_provider.wait_for(5)
    rows = ledger(gw).settled(user, 5)
    image = only(rows, model_requested="gpt-image-1")
    rec = next(r for r in recs if r.model == "gpt-image-1")
    assert (image["endpoint_kind"], image["cost_source"]) == ("images", "provider"), image
    # genai-prices: $5 per 1M text input tokens, $40 per 1M output (image) tokens; the mock's usage
    assert (image["input_tokens"], image["output_tokens"]) == (rec.usage["input_tokens"], 272)
    assert image["cost_nusd"] == image["input_tokens"] * 5_000 + 272 * 40_000, image
    expected = {  # model: (endpoint_kind, cost_source, USD)
        "dall-e-3": ("images", "override", Decimal("0.04")),  # per_image x 1
        "tts-1": ("audio", "provider", Decimal("0.0015")),  # genai-prices: $15 per 1M characters x 100
        "tts-1-hd": ("audio", "override", Decimal("0.002")),  # per_million_characters = 20 x 100
        "whisper-1": ("audio", "override", Decimal("0.002")),  # per_minute = 0.012 x 10 s
    }
    for model, (kind, source, cost) in expected.items():
        row = only(rows, model_requested=model)
        assert (row["endpoint_kind"], row["cost_source"], row["outcome"]) == (kind, source, "completed"), row
        assert cost_of(row) == cost, (model, row["cost_usd"])


def test_images_and_audio_are_refused_past_the_cap(media_gw: GatewayProcess, mock_provider: MockProvider) -> None:
    """$0.0001 left: an endpoint estimated at $0 would still pass."""
    gw, user = media_gw, "media-broke"
    key = ledger(gw).key(user, cap="0.05")["key"]
    spend_to(gw, key, user, "0.0499")
    before = len(mock_provider.requests)
    client = gw.openai_client(key)
    for model, send in MEDIA.items():
        with pytest.raises(openai.RateLimitError) as oi:
            send(client)
        assert oi.value.code == "spendgate_budget_exceeded", (model, error_body(oi.value))
    assert len(mock_provider.requests) == before, "a refused media request reached the provider"
    rows = ledger(gw).settled(user, 6)
    refused = [r for r in rows if r["outcome"] == "blocked_cap"]
    assert sorted(r["model_requested"] for r in refused) == sorted(MEDIA)
    assert {r["endpoint_kind"] for r in refused} == {"images", "audio"}


def _batch(client: Any) -> Any:
    return client.batches.create(input_file_id="file-mock-input", endpoint="/v1/chat/completions",
                                 completion_window="24h")


def _fine_tune(client: Any) -> Any:
    return client.fine_tuning.jobs.create(model="gpt-4o-mini-2024-07-18", training_file="file-mock-train")


def test_batches_and_fine_tuning_are_refused_for_a_capped_caller(gw: GatewayProcess,
                                                                 mock_provider: MockProvider) -> None:
    capped = gw.openai_client(ledger(gw).key("unmetered-capped", cap="10")["key"])
    for send, name in ((_batch, r"batches"), (_fine_tune, r"fine[_-]tuning")):
        with pytest.raises(openai.PermissionDeniedError) as oi:
            send(capped)
        assert oi.value.status_code == 403 and oi.value.code == "spendgate_unmetered_endpoint", error_body(oi.value)
        msg = error_message(oi.value)
        assert re.search(name, msg, re.I) and "[budgets] allow_unmetered" in msg, msg
    assert mock_provider.requests == []
    free = gw.openai_client(ledger(gw).key("unmetered-free")["key"])  # no cap: always passes
    assert _batch(free).status == "validating"
    assert _fine_tune(free).status == "validating_files"
    assert len(mock_provider.wait_for(2)) == 2
    rows = ledger(gw).settled("unmetered-capped", 2)
    assert {r["outcome"] for r in rows} == {"blocked_policy"} and "batches" in {r["endpoint_kind"] for r in rows}
    rows = ledger(gw).settled("unmetered-free", 2)
    assert only(rows, endpoint_kind="batches")["outcome"] == "completed"


def test_allow_unmetered_lets_batches_through_for_a_capped_caller(fallback_gw: GatewayProcess,
                                                                  mock_provider: MockProvider) -> None:
    gw = fallback_gw  # allow_unmetered = ["batches"]
    client = gw.openai_client(ledger(gw).key("unmetered-allowed", cap="10")["key"])
    assert _batch(client).status == "validating"
    with pytest.raises(openai.PermissionDeniedError) as oi:  # only what is named
        _fine_tune(client)
    assert oi.value.code == "spendgate_unmetered_endpoint"
    (rec,) = mock_provider.wait_for(1)
    assert rec.endpoint == "batches"
    rows = ledger(gw).settled("unmetered-allowed", 2)
    assert only(rows, endpoint_kind="batches")["outcome"] == "completed"


def test_model_listings_and_file_uploads_are_not_refused_for_a_capped_caller(
        gw: GatewayProcess, mock_provider: MockProvider) -> None:
    client = gw.openai_client(ledger(gw).key("listings", cap="0.01")["key"])
    assert "gpt-4o" in [m.id for m in client.models.list()]
    f = client.files.create(file=("batch.jsonl", b'{"custom_id": "1", "method": "POST"}\n'), purpose="batch")
    assert f.status == "processed"
    assert [r.endpoint for r in mock_provider.wait_for(2)] == ["models", "files"]
    rows = ledger(gw).settled("listings", 2)
    assert [(r["endpoint_kind"], r["outcome"]) for r in rows] == [("models", "completed"), ("files", "completed")]


# --------------------------------------------------------------------------- 5. answers without usage


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_an_answer_without_usage_is_counted_from_its_text(gw: GatewayProcess, mock_provider: MockProvider,
                                                          endpoint: str) -> None:
    user = f"no-usage-{endpoint}"
    client = gw.openai_client(ledger(gw).key(user, cap="1.00")["key"])
    if endpoint == "chat":
        out = client.chat.completions.create(model="gpt-4o", messages=MSGS, max_tokens=1000,
                                             extra_headers=scenario("no_usage"))
        assert out.usage is None and out.choices[0].message.content == TEXT
    else:
        out = client.completions.create(model=INSTRUCT, prompt="Say hi.", max_tokens=1000,
                                        extra_headers=scenario("no_usage"))
        assert out.usage is None and out.choices[0].text == TEXT
    (row,) = ledger(gw).settled(user, 1)
    assert row["usage_source"] == "estimated", row
    # the five words of the answer, not the request's limit of 1000
    assert 0 < row["output_tokens"] < 100 and row["input_tokens"] > 0, row
    assert cost_of(row) > 0


# --------------------------------------------------------------------------- 6. output clamping


def _opus_stream(gw: GatewayProcess, key: str, headers: dict[str, str] | None = None) -> tuple[Any, str]:
    """Claude Code's shape: a stream asking for max_tokens 64000. (headers, text)."""
    raw = gw.anthropic_client(key).messages.with_raw_response.create(
        model=OPUS, max_tokens=64000, messages=MSGS, stream=True, extra_headers=headers or {})
    text = "".join(ev.delta.text for ev in raw.parse() if ev.type == "content_block_delta")
    return raw.headers, text


def test_agent_asking_for_64000_tokens_with_1_dollar_left_is_clamped(gw: GatewayProcess,
                                                                     mock_provider: MockProvider) -> None:
    """$4.80 of output asked for, $1 left: served with the limit $1 pays for. A second agent in the
    same position whose model then uses every token it was allowed still ends within its cap."""
    cap = Decimal("1.00")
    key = ledger(gw).key("agent", cap=str(cap))["key"]
    headers, text = _opus_stream(gw, key)
    assert text == TEXT
    n = limited(headers)
    assert n is not None and 256 <= n < 64000, dict(headers)
    assert n * OPUS_OUT <= cap and n * OPUS_OUT >= cap * Decimal("0.5"), n
    rec = mock_provider.wait_for(1)[0]
    assert limits_sent(rec) == {"max_tokens": n}, limits_sent(rec)
    assert "x-spendgate-budget-remaining-usd" in headers
    ledger(gw).settled("agent", 1)
    assert usd(ledger(gw).held("user", "agent")[0]) <= cap

    key2 = ledger(gw).key("agent-greedy", cap=str(cap))["key"]
    headers2, _ = _opus_stream(gw, key2, scenario(f"ok; input_tokens=1; output_tokens={n}"))
    assert limited(headers2) == n, "the same request from the same budget is lowered the same"
    (row,) = ledger(gw).settled("agent-greedy", 1)
    assert row["output_tokens"] == n
    spent = usd(ledger(gw).held("user", "agent-greedy")[0])
    assert cap * Decimal("0.5") <= spent <= cap, f"spent {spent} against a {cap} cap"


def _openai_chat(gw: GatewayProcess, key: str) -> Any:
    raw = gw.openai_client(key).chat.completions.with_raw_response.create(model="gpt-4o", messages=MSGS)
    raw.parse()
    return raw.headers


def _openai_responses(gw: GatewayProcess, key: str) -> Any:
    raw = gw.openai_client(key).responses.with_raw_response.create(model="gpt-4o", input="Say hi.")
    raw.parse()
    return raw.headers


def _gemini(gw: GatewayProcess, key: str) -> Any:
    with gw.httpx_client(key) as h:
        r = h.post(f"{GEMINI}/gemini-2.0-flash:generateContent",
                   json={"contents": [{"role": "user", "parts": [{"text": "Say hi."}]}]})
    assert r.status_code == 200, r.text
    return r.headers


def _mistral(gw: GatewayProcess, key: str) -> Any:
    raw = gw.openai_client(key, base_url=MISTRAL).chat.completions.with_raw_response.create(
        model="mistral-large-latest", messages=MSGS)
    raw.parse()
    return raw.headers


# name: (send, cap, USD per output token, the field the gateway inserts)
INSERTED = {
    "openai-chat": (_openai_chat, "0.02", GPT4O_OUT, "max_completion_tokens"),
    "openai-responses": (_openai_responses, "0.02", GPT4O_OUT, "max_output_tokens"),
    "gemini": (_gemini, "0.001", Decimal("0.4") / 1_000_000, "maxOutputTokens"),
    "mistral": (_mistral, "0.01", Decimal(6) / 1_000_000, "max_tokens"),
}


@pytest.mark.parametrize("shape", list(INSERTED))
def test_a_request_without_an_output_limit_gets_one_inserted(gw: GatewayProcess, mock_provider: MockProvider,
                                                             shape: str) -> None:
    """The cap pays for fewer than the default 4096 output tokens: the forwarded request carries
    the limit it does pay for, in the provider's own field."""
    send, cap, per_token, field = INSERTED[shape]
    key = ledger(gw).key(f"insert-{shape}", cap=cap)["key"]
    headers = send(gw, key)
    n = limited(headers)
    assert n is not None and 256 <= n < 4096, dict(headers)
    assert n * per_token <= Decimal(cap), n
    (rec,) = mock_provider.wait_for(1)
    assert limits_sent(rec) == {field: n}, limits_sent(rec)


def test_fewer_than_min_output_tokens_affordable_is_refused_naming_the_cap(
        gw: GatewayProcess, mock_provider: MockProvider) -> None:
    key = ledger(gw).key("too-little", cap="0.002")["key"]  # gpt-4o: 200 output tokens
    with pytest.raises(openai.RateLimitError) as oi:
        gw.openai_client(key).chat.completions.create(model="gpt-4o", messages=MSGS)
    assert oi.value.code == "spendgate_budget_exceeded" and LIMITED not in oi.value.response.headers
    msg = error_message(oi.value)
    assert "cap" in msg and "user too-little" in msg and "$0.002" in msg, msg
    key = ledger(gw).key("too-little-agent", cap="0.01")["key"]  # Opus: 133 output tokens
    with pytest.raises(anthropic.RateLimitError) as ai:
        _opus_stream(gw, key)
    assert ai.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]
    msg = error_message(ai.value)
    assert "cap" in msg and "user too-little-agent" in msg, msg
    assert mock_provider.requests == []
    assert [r["outcome"] for r in ledger(gw).settled("too-little", 1)] == ["blocked_cap"]


def test_without_clamping_the_agent_is_refused_as_before(fallback_gw: GatewayProcess,
                                                         mock_provider: MockProvider) -> None:
    gw = fallback_gw  # clamp_output = false
    key = ledger(gw).key("agent-noclamp", cap="1.00")["key"]
    with pytest.raises(anthropic.RateLimitError) as ai:
        _opus_stream(gw, key)
    assert LIMITED not in ai.value.response.headers
    assert "cap" in error_message(ai.value) and "user agent-noclamp" in error_message(ai.value)
    assert mock_provider.requests == []
    assert [r["outcome"] for r in ledger(gw).settled("agent-noclamp", 1)] == ["blocked_cap"]
