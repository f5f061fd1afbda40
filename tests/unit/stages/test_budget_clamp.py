"""The Budgets stage's output clamping (`[budgets] clamp_output`), on a real store through the real
audit writer (the `Stage` of test_budget.py): a request whose full output limit does not fit what
is left of its caps is sent with the limit the rest pays for, in each provider's own field, and
says so in `x-spendgate-output-limited`; below `min_output_tokens` it is refused."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any

import pytest
from mitmproxy import http

from spendgate.pricing import PriceOverride, Pricer
from spendgate.providers.tokens import estimate_input_tokens
from spendgate.stages.budget import LIMITED_HEADER, REMAINING_HEADER, Budgets, CapRules
from spendgate.stages.call import META, Call, Outcome
from spendgate.stages.estimate import Estimator
from spendgate.store import Database
from spendgate.store.maintenance import LiveHolds
from spendgate.testing import tcall, tflow, tprovider
from tests.unit.stages.test_budget import CAP, CENT, TTL, Stage, error_of, status, usd

NOW = datetime(2026, 7, 1, 12, tzinfo=timezone.utc)
MIN_OUTPUT = 5
# $0.0001 per input token, $0.01 per output token (one CENT): a $0.10 cap pays for 9 output tokens beside a prompt.
RATES = {"input": 100, "output": 10000}
PRICES = {f"{p}:{m}": PriceOverride.parse(RATES) for p, m in (
    ("openai", "gpt-4o"), ("openai", "gpt-3.5-turbo-instruct"), ("openai", "text-embedding-3-small"),
    ("anthropic", "claude-sonnet-4-5"), ("gemini", "gemini-2.5-pro"), ("mistral", "mistral-large-latest"),
    ("azure", "gpt-4o-prod"))}
MSGS = [{"role": "user", "content": "Say hi."}]
GEMINI_PATH = "/v1beta/models/gemini-2.5-pro:generateContent"


class ClampStage(Stage):
    """test_budget's Stage with clamping on, prices for every provider used here, and requests to any of them."""

    def __init__(self, db: Database, clamp: bool = True) -> None:
        super().__init__(db, NOW, clamp=clamp)
        self.budgets = Budgets(self.registry.budgets_for, self.writer.reserve, LiveHolds().add, Pricer(PRICES),
                               Estimator(20), CapRules(TTL, True, clamp_output=clamp, min_output_tokens=MIN_OUTPUT),
                               clock=self.clock)

    def send(self, key: Any, body: dict[str, Any], provider: str = "openai", path: str = "/v1/chat/completions",
             host: str = "api.openai.com") -> http.HTTPFlow:
        self.registry.refresh()
        f = tflow(host, path, body=body)
        tcall(f, provider=tprovider(provider), key=key)
        asyncio.run(self.policy.request(f))
        if f.response is None:
            asyncio.run(self.admit(f))
        return f


def sent(f: http.HTTPFlow) -> dict[str, Any]:
    """The body as Forward sends it."""
    call = f.metadata[META]
    assert isinstance(call, Call) and call.body is not None and call.body_changed
    return call.body


def limited_header(st: Stage, f: http.HTTPFlow) -> str | None:
    f.response = http.Response.make(200, b"{}", {"content-type": "application/json"})
    st.budgets.responseheaders(f)
    return f.response.headers.get(LIMITED_HEADER)


def assert_fits_exactly(f: http.HTTPFlow, left: int, choices: int = 1) -> int:
    """The limit sent is the most the cap's rest pays for: one more token per answer would not fit."""
    call = f.metadata[META]
    assert f.response is None and call.hold is not None, f.response and f.response.content
    limit = call.output_limited
    assert limit is not None and call.max_output_tokens == limit
    body = call.body or {}
    prompt_cost = estimate_input_tokens(call.provider.spec.family, call.endpoint_kind, body,
                                        call.model_requested) * 100_000  # nano-USD
    assert call.hold.estimate_nusd == prompt_cost + limit * choices * CENT <= left
    assert prompt_cost + (limit + 1) * choices * CENT > left
    return limit


@pytest.mark.parametrize(
    "provider, path, body, field",
    [
        ("openai", "/v1/chat/completions", {"model": "gpt-4o", "messages": MSGS, "max_tokens": 64000},
         ("max_tokens",)),
        ("openai", "/v1/chat/completions", {"model": "gpt-4o", "messages": MSGS, "max_completion_tokens": 64000},
         ("max_completion_tokens",)),
        # Both fields: both lowered, so neither is left for the provider to honour.
        ("openai", "/v1/chat/completions", {"model": "gpt-4o", "messages": MSGS, "max_completion_tokens": 64000,
                                            "max_tokens": 64000}, ("max_completion_tokens", "max_tokens")),
        # No limit at all (the default is estimated): OpenAI's own field is inserted...
        ("openai", "/v1/chat/completions", {"model": "gpt-4o", "messages": MSGS}, ("max_completion_tokens",)),
        # ... and for providers that know only the older one, that one.
        ("mistral", "/v1/chat/completions", {"model": "mistral-large-latest", "messages": MSGS}, ("max_tokens",)),
        ("azure", "/openai/deployments/gpt-4o-prod/chat/completions?api-version=2024-10-21", {"messages": MSGS},
         ("max_completion_tokens",)),
        ("openai", "/v1/responses", {"model": "gpt-4o", "input": "Say hi."}, ("max_output_tokens",)),
        ("openai", "/v1/responses", {"model": "gpt-4o", "input": "Say hi.", "max_output_tokens": 900},
         ("max_output_tokens",)),
        ("openai", "/v1/completions", {"model": "gpt-3.5-turbo-instruct", "prompt": "Say hi."}, ("max_tokens",)),
        ("anthropic", "/v1/messages", {"model": "claude-sonnet-4-5", "messages": MSGS, "max_tokens": 64000},
         ("max_tokens",)),
    ],
)
def test_the_lowered_limit_is_written_in_the_provider_s_field(db: Database, provider: str, path: str,
                                                               body: dict[str, Any], field: tuple[str, ...]) -> None:
    st = ClampStage(db)
    st.store.set_budget("user", "agent", CAP, "day", actor="test")
    key = st.key("agent")
    f = st.send(key, body, provider, path)
    limit = assert_fits_exactly(f, CAP)
    out = sent(f)
    assert {k: out[k] for k in ("max_tokens", "max_completion_tokens", "max_output_tokens") if k in out} == {
        k: limit for k in field}
    assert limited_header(st, f) == str(limit)
    held = f.metadata[META].hold.estimate_nusd
    assert f.response is not None and Decimal(f.response.headers[REMAINING_HEADER]) == usd(CAP - held) < usd(CENT)
    assert status(db, NOW, "user", "agent")["reserved_nusd"] == held  # the reservation is what was sent


@pytest.mark.parametrize("config, after", [
    ({"maxOutputTokens": 64000}, {"maxOutputTokens": "LIMIT"}),
    ({}, {"maxOutputTokens": "LIMIT"}),
    ({"maxOutputTokens": 64000, "thinkingConfig": {"thinkingBudget": 32000}},
     {"maxOutputTokens": "LIMIT", "thinkingConfig": {"thinkingBudget": "LIMIT"}}),
    ({"thinkingConfig": {"thinkingBudget": 2}, "temperature": 0},
     {"maxOutputTokens": "LIMIT", "thinkingConfig": {"thinkingBudget": 2}, "temperature": 0}),
])
def test_gemini_is_clamped_in_generation_config(db: Database, config: dict[str, Any], after: dict[str, Any]) -> None:
    st = ClampStage(db)
    st.store.set_budget("user", "gem", CAP, "day", actor="test")
    body = {"contents": [{"role": "user", "parts": [{"text": "Say hi."}]}], "generationConfig": config}
    f = st.send(st.key("gem"), body, "gemini", GEMINI_PATH, "generativelanguage.googleapis.com")
    limit = assert_fits_exactly(f, CAP)
    want = json.loads(json.dumps(after).replace('"LIMIT"', str(limit)))
    assert sent(f)["generationConfig"] == want


def test_anthropic_thinking_budget_stays_below_the_lowered_limit(db: Database) -> None:
    st = ClampStage(db)
    st.store.set_budget("user", "claude", CAP, "day", actor="test")
    body = {"model": "claude-sonnet-4-5", "messages": MSGS, "max_tokens": 64000,
            "thinking": {"type": "enabled", "budget_tokens": 32000}}
    f = st.send(st.key("claude"), body, "anthropic", "/v1/messages", "api.anthropic.com")
    limit = assert_fits_exactly(f, CAP)
    assert sent(f)["max_tokens"] == limit and sent(f)["thinking"] == {"type": "enabled", "budget_tokens": limit - 1}


def test_a_limit_that_fits_is_sent_unchanged(db: Database) -> None:
    st = ClampStage(db)
    st.store.set_budget("user", "small", CAP, "day", actor="test")
    f = st.send(st.key("small"), {"model": "gpt-4o", "messages": MSGS, "max_tokens": 3})
    call = f.metadata[META]
    assert f.response is None and call.output_limited is None and not call.body_changed
    assert limited_header(st, f) is None


@pytest.mark.parametrize(
    "provider, path, body, field",
    [
        ("openai", "/v1/chat/completions", {"model": "gpt-4o", "messages": MSGS}, "max_completion_tokens"),
        ("openai", "/v1/chat/completions", {"model": "gpt-4o", "messages": MSGS, "max_tokens": -1}, "max_tokens"),
        ("gemini", GEMINI_PATH, {"contents": [{"parts": [{"text": "hi"}]}], "generationConfig": {
            "maxOutputTokens": 0}}, "maxOutputTokens"),
    ],
    ids=["none", "negative", "gemini-zero"],
)
def test_a_request_without_a_limit_is_sent_with_the_one_it_is_held_at(
    db: Database, provider: str, path: str, body: dict[str, Any], field: str
) -> None:
    """Held at the default (20 here) and sent without a limit, the provider could write up to the
    model's maximum: N such requests in flight would pass the cap by N times that."""
    st = ClampStage(db)
    st.store.set_budget("user", "nolimit", 100 * CAP, "day", actor="test")  # the default fits with room
    host = {"gemini": "generativelanguage.googleapis.com"}.get(provider, "api.openai.com")
    f = st.send(st.key("nolimit"), body, provider, path, host)
    call = f.metadata[META]
    assert f.response is None and call.hold is not None
    config = sent(f).get("generationConfig", sent(f))
    assert config[field] == 20 == call.max_output_tokens and limited_header(st, f) == "20"


def test_without_a_cap_nothing_is_inserted(db: Database) -> None:
    st = ClampStage(db)
    f = st.send(st.key("free"), {"model": "gpt-4o", "messages": MSGS})
    call = f.metadata[META]
    assert f.response is None and not call.body_changed and call.output_limited is None


def test_below_min_output_tokens_the_request_is_refused(db: Database) -> None:
    st = ClampStage(db)
    st.store.set_budget("user", "late", CAP, "day", actor="test")
    key = st.key("late")
    first = st.send(key, {"model": "gpt-4o", "messages": MSGS, "max_tokens": 5})  # $0.05 held
    assert first.response is None
    # $0.05 is left: 4 tokens fit beside the prompt, fewer than min_output_tokens (5).
    second = st.send(key, {"model": "gpt-4o", "messages": MSGS, "max_tokens": 64000})
    assert second.response is not None and second.response.status_code == 429
    call = second.metadata[META]
    assert call.outcome is Outcome.BLOCKED_CAP and call.output_limited is None
    err = error_of(second)
    assert err["code"] == "spendgate_budget_exceeded"
    assert f"Not even {MIN_OUTPUT} output tokens fit" in err["message"] and "min_output_tokens" in err["message"]
    assert LIMITED_HEADER not in second.response.headers
    assert status(db, NOW, "user", "late")["reserved_nusd"] == first.metadata[META].hold.estimate_nusd


def test_clamping_fits_the_tightest_of_several_caps(db: Database) -> None:
    st = ClampStage(db)
    st.store.set_budget("user", "dana", CAP, "day", actor="test")
    st.store.set_budget("team", "core", 7 * CENT, "week", actor="test")
    st.store.set_budget("global", "global", 100 * CENT, "month", actor="test")
    key = st.key("dana", team="core")
    f = st.send(key, {"model": "gpt-4o", "messages": MSGS, "max_tokens": 64000})
    limit = assert_fits_exactly(f, 7 * CENT)
    assert limit == 6
    held = f.metadata[META].hold.estimate_nusd
    for scope, name in (("user", "dana"), ("team", "core"), ("global", "global")):
        assert status(db, NOW, scope, name)["reserved_nusd"] == held


def test_clamping_sees_what_others_hold_against_a_shared_cap(db: Database) -> None:
    st = ClampStage(db)
    st.store.set_budget("team", "core", CAP, "day", actor="test")
    ann, bob = st.key("ann", team="core"), st.key("bob", team="core")
    first = st.send(ann, {"model": "gpt-4o", "messages": MSGS, "max_tokens": 64000})
    assert first.response is None and first.metadata[META].output_limited == 9
    second = st.send(bob, {"model": "gpt-4o", "messages": MSGS, "max_tokens": 64000})  # nothing left
    assert second.response is not None and second.response.status_code == 429
    st.finish(first, 4 * CENT)  # it used less than it held: the rest is free again
    third = st.send(bob, {"model": "gpt-4o", "messages": MSGS, "max_tokens": 64000})
    assert_fits_exactly(third, CAP - 4 * CENT)


@pytest.mark.parametrize("n", [2, 3])
def test_every_answer_gets_the_lowered_limit(db: Database, n: int) -> None:
    """The limit is per answer: n answers of `limit` tokens fit, n answers of limit + 1 do not."""
    st = ClampStage(db)
    st.store.set_budget("user", "multi", 40 * CENT, "day", actor="test")
    f = st.send(st.key("multi"), {"model": "gpt-4o", "messages": MSGS, "max_tokens": 64000, "n": n})
    limit = assert_fits_exactly(f, 40 * CENT, choices=n)
    assert limit == (40 * CENT - 1) // (n * CENT)
    assert sent(f)["max_tokens"] == limit and sent(f)["n"] == n


def test_best_of_is_clamped_per_generated_answer(db: Database) -> None:
    st = ClampStage(db)
    st.store.set_budget("user", "bestof", 40 * CENT, "day", actor="test")
    body = {"model": "gpt-3.5-turbo-instruct", "prompt": "Say hi.", "max_tokens": 64000, "n": 1, "best_of": 4}
    f = st.send(st.key("bestof"), body, path="/v1/completions")
    assert assert_fits_exactly(f, 40 * CENT, choices=4) == 9


def test_clamp_off_refuses_what_does_not_fit(db: Database) -> None:
    st = ClampStage(db, clamp=False)
    st.store.set_budget("user", "strict", CAP, "day", actor="test")
    f = st.send(st.key("strict"), {"model": "gpt-4o", "messages": MSGS, "max_tokens": 64000})
    assert f.response is not None and f.response.status_code == 429
    assert "min_output_tokens" not in error_of(f)["message"]
    assert f.metadata[META].output_limited is None


def test_what_has_no_output_limit_is_refused_not_clamped(db: Database) -> None:
    st = ClampStage(db)
    st.store.set_budget("user", "emb", CENT // 100, "day", actor="test")  # $0.0001: one input token
    text = "word " * 500
    f = st.send(st.key("emb"), {"model": "text-embedding-3-small", "input": text}, path="/v1/embeddings")
    assert f.response is not None and f.response.status_code == 429
    assert "min_output_tokens" not in error_of(f)["message"]  # nothing a lower limit could fix
    assert f.metadata[META].output_limited is None
